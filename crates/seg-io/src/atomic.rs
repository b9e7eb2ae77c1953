//! Atomic file writes: the destination either keeps its old content or receives the complete new
//! content, never a partial file, even if the process dies half-way.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Refuses `output` when it is the same file as one of `inputs`: the same path once both are
/// made absolute and their symbolic links resolved, or (where both exist) the same device and
/// inode, which also catches hard links. Call it before reading anything, so that a command
/// whose `--out` names its input fails without touching either.
///
/// # Errors
/// [`Error::OutputIsInput`] naming both paths; [`Error::Io`] when an existing path cannot be
/// inspected.
pub fn check_output(output: &Path, inputs: &[&Path]) -> Result<()> {
    for &input in inputs {
        if same_file(output, input)? {
            return Err(Error::OutputIsInput {
                output: output.to_path_buf(),
                input: input.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// `path` absolute, with the symbolic links of its existing part resolved.
fn resolved(path: &Path) -> Result<PathBuf> {
    if path.exists() {
        return fs::canonicalize(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    let absolute = std::path::absolute(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) if parent.exists() => Ok(fs::canonicalize(parent)
            .map_err(|source| Error::Io {
                path: parent.to_path_buf(),
                source,
            })?
            .join(name)),
        _ => Ok(absolute),
    }
}

fn same_file(a: &Path, b: &Path) -> Result<bool> {
    if resolved(a)? == resolved(b)? {
        return Ok(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(ma), Ok(mb)) = (fs::metadata(a), fs::metadata(b)) {
            return Ok(ma.dev() == mb.dev() && ma.ino() == mb.ino());
        }
    }
    Ok(false)
}

/// Writes a file atomically: `write` fills a temporary file in the destination's folder, which is
/// flushed to disk and then renamed over `path`. On any error the temporary file is removed and
/// `path` is left untouched.
///
/// The closure receives a buffered writer; its I/O errors are reported with `path`.
pub fn write_atomically<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> std::result::Result<(), Error>,
{
    let tmp = temporary_path(path);
    let io_err = |source: std::io::Error| Error::Write {
        path: path.to_path_buf(),
        what: source.to_string(),
    };
    let result = (|| {
        let file = File::create(&tmp).map_err(io_err)?;
        let mut writer = BufWriter::new(file);
        write(&mut writer)?;
        writer.flush().map_err(io_err)?;
        let file = writer.into_inner().map_err(|e| io_err(e.into_error()))?;
        file.sync_all().map_err(io_err)?;
        fs::rename(&tmp, path).map_err(io_err)
    })();
    if result.is_err() {
        // Best effort: the temporary file is garbage whatever happened.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `dir/.name.<pid>.tmp`: hidden, unique per process, on the same file system as `path` so that
/// the final rename is atomic.
fn temporary_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".to_owned());
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("seg-data-atomic-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary() {
        let dir = scratch("fail");
        let path = dir.join("out.bin");
        fs::write(&path, b"old").unwrap();
        let err = write_atomically(&path, |w| {
            w.write_all(b"partial").unwrap();
            Err(Error::Content {
                path: path.clone(),
                what: "simulated failure".into(),
            })
        });
        assert!(err.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "temporary file left behind"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_successful_write_replaces_the_file() {
        let dir = scratch("ok");
        let path = dir.join("out.bin");
        fs::write(&path, b"old").unwrap();
        write_atomically(&path, |w| {
            w.write_all(b"new content").map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })
        })
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new content");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_folder_is_an_error_naming_the_file() {
        let path = std::env::temp_dir().join("seg-data-no-such-dir/x/out.bin");
        let err = write_atomically(&path, |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("out.bin"), "{err}");
    }
}

#[cfg(test)]
mod output_tests {
    use super::*;

    #[test]
    fn an_output_that_is_an_input_is_refused_by_path_link_or_inode() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("raw.tif");
        fs::write(&input, b"raw").unwrap();
        let other = dir.path().join("pred.tif");
        check_output(&other, &[&input]).unwrap();
        // The same path, spelled differently.
        let dotted = dir.path().join(".").join("raw.tif");
        let err = check_output(&dotted, &[&other, &input]).unwrap_err();
        assert!(matches!(err, Error::OutputIsInput { .. }), "{err}");
        assert!(err.to_string().contains("would destroy"), "{err}");
        // A hard link to the input.
        let hard = dir.path().join("hard.tif");
        fs::hard_link(&input, &hard).unwrap();
        assert!(check_output(&hard, &[&input]).is_err());
        #[cfg(unix)]
        {
            let soft = dir.path().join("soft.tif");
            std::os::unix::fs::symlink(&input, &soft).unwrap();
            assert!(check_output(&soft, &[&input]).is_err());
        }
        // Nothing was touched.
        assert_eq!(fs::read(&input).unwrap(), b"raw");
    }
}

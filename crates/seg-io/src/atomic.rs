//! Atomic file writes: the destination either keeps its old content or receives the complete new
//! content, never a partial file, even if the process dies half-way.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

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
    let io_err = |source| Error::Io {
        path: path.to_path_buf(),
        source,
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

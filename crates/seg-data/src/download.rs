//! Dataset downloads: HTTP(S) with resume, SHA-256 verification, and safe unzipping.
//!
//! A download goes to `<file>.part` and is resumed from there with an HTTP range request; only a
//! complete file whose SHA-256 matches (where one is known) is renamed into place.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// One file to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub url: String,
    /// Name of the file in the target folder.
    pub file_name: String,
    /// Expected SHA-256 (lower-case hex), when published.
    pub sha256: Option<String>,
}

/// Options of [`download`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadOptions {
    /// Accept TLS certificates that fail verification (cremi.org's has expired). Off unless the
    /// user asks.
    pub accept_invalid_certificates: bool,
    /// Time allowed to connect before giving up.
    pub connect_timeout: Duration,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        DownloadOptions {
            accept_invalid_certificates: false,
            connect_timeout: Duration::from_secs(15),
        }
    }
}

const CREMI_BASE: &str = "https://cremi.org/static/data";
const LIVECELL_BASE: &str =
    "http://livecell-dataset.s3.eu-central-1.amazonaws.com/LIVECell_dataset_2021";

/// The cropped CREMI samples A, B, C with torch-em's SHA-256 values.
pub fn cremi_files() -> Vec<Remote> {
    [
        (
            "A",
            "4c563d1b78acb2bcfb3ea958b6fe1533422f7f4a19f3e05b600bfa11430b510d",
        ),
        (
            "B",
            "887e85521e00deead18c94a21ad71f278d88a5214c7edeed943130a1f4bb48b8",
        ),
        (
            "C",
            "2874496f224d222ebc29d0e4753e8c458093e1d37bc53acd1b69b19ed1ae7052",
        ),
    ]
    .iter()
    .map(|(s, sha)| Remote {
        url: format!("{CREMI_BASE}/sample_{s}_20160501.hdf"),
        file_name: format!("sample{s}.h5"),
        sha256: Some((*sha).to_owned()),
    })
    .collect()
}

/// LIVECell's images archive and its three COCO files (no published checksums).
pub fn livecell_files() -> Vec<Remote> {
    let mut files = vec![Remote {
        url: format!("{LIVECELL_BASE}/images.zip"),
        file_name: "images.zip".into(),
        sha256: None,
    }];
    for split in ["train", "val", "test"] {
        files.push(Remote {
            url: format!("{LIVECELL_BASE}/annotations/LIVECell/livecell_coco_{split}.json"),
            file_name: format!("{split}.json"),
            sha256: None,
        });
    }
    files
}

/// SHA-256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Downloads `remote` into `dir` (resuming a `.part` file), verifies its SHA-256 when known,
/// and returns the final path. An existing complete file is verified and kept.
/// `progress(done, total)` is called as bytes arrive.
///
/// # Errors
/// [`Error::Download`] for network failures (with what to download by hand and where to put
/// it), certificate failures (naming the option that accepts them), HTTP errors and checksum
/// mismatches; [`Error::Io`] for local files.
pub fn download(
    remote: &Remote,
    dir: &Path,
    options: &DownloadOptions,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let target = dir.join(&remote.file_name);
    if target.is_file() {
        verify(remote, &target)?;
        return Ok(target);
    }
    let part = dir.join(format!("{}.part", remote.file_name));
    let have = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let err = |what: String| Error::Download {
        url: remote.url.clone(),
        what,
    };
    let manual = format!(
        "download {} by hand and save it as {}",
        remote.url,
        target.display()
    );
    let tls = ureq::tls::TlsConfig::builder()
        .disable_verification(options.accept_invalid_certificates)
        .build();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_connect(Some(options.connect_timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent.get(&remote.url);
    if have > 0 {
        request = request.header("Range", &format!("bytes={have}-"));
    }
    let response = request.call().map_err(|e| {
        let text = e.to_string();
        if text.to_lowercase().contains("certificate") {
            err(format!(
                "the server's TLS certificate was rejected ({text}); cremi.org's certificate has expired — \
                 pass --accept-invalid-certificates to download anyway, or {manual}"
            ))
        } else {
            err(format!("cannot reach the server ({text}); no network? {manual}"))
        }
    })?;
    let status = response.status().as_u16();
    let resumed = status == 206;
    if !(status == 200 || resumed) {
        return Err(err(format!("HTTP status {status}; {manual}")));
    }
    let length = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let start = if resumed { have } else { 0 };
    let total = length.map(|l| l + start);
    let io = |source| Error::Io {
        path: part.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(&part)
        .map_err(io)?;
    let mut body = response.into_body().into_reader();
    let mut buffer = vec![0u8; 1 << 16];
    let mut done = start;
    progress(done, total);
    loop {
        let n = body.read(&mut buffer).map_err(|e| {
            err(format!(
                "the transfer broke after {done} bytes ({e}); run the command again to resume"
            ))
        })?;
        if n == 0 {
            break;
        }
        file.write_all(&buffer[..n]).map_err(io)?;
        done += n as u64;
        progress(done, total);
    }
    file.sync_all().map_err(io)?;
    drop(file);
    if let Some(t) = total {
        if done != t {
            return Err(err(format!(
                "received {done} of {t} bytes; run the command again to resume"
            )));
        }
    }
    verify(remote, &part).inspect_err(|_| {
        // A complete file with the wrong content cannot be resumed into the right one.
        let _ = fs::remove_file(&part);
    })?;
    fs::rename(&part, &target).map_err(|source| Error::Io {
        path: target.clone(),
        source,
    })?;
    Ok(target)
}

fn verify(remote: &Remote, path: &Path) -> Result<()> {
    if let Some(expected) = &remote.sha256 {
        let actual = sha256_file(path)?;
        if &actual != expected {
            return Err(Error::Download {
                url: remote.url.clone(),
                what: format!(
                    "{} has SHA-256 {actual}, expected {expected}",
                    path.display()
                ),
            });
        }
    }
    Ok(())
}

/// Records the SHA-256 of files without a published checksum in `dir/SHA256SUMS` the first time
/// and verifies them against it afterwards.
///
/// # Errors
/// [`Error::Download`] naming a file whose checksum changed.
pub fn record_or_verify_checksums(dir: &Path, files: &[&str]) -> Result<()> {
    let sums_path = dir.join("SHA256SUMS");
    let mut known: Vec<(String, String)> = fs::read_to_string(&sums_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.split_once("  ")
                .map(|(h, f)| (f.to_owned(), h.to_owned()))
        })
        .collect();
    for name in files {
        let actual = sha256_file(&dir.join(name))?;
        match known.iter().find(|(f, _)| f == name) {
            Some((_, recorded)) if *recorded != actual => {
                return Err(Error::Download {
                    url: dir.join(name).display().to_string(),
                    what: format!(
                        "SHA-256 {actual} differs from {recorded} recorded in {} at the first download; \
                         the file changed or is corrupt — delete it and fetch again",
                        sums_path.display()
                    ),
                })
            }
            Some(_) => {}
            None => known.push(((*name).to_owned(), actual)),
        }
    }
    let text: String = known.iter().map(|(f, h)| format!("{h}  {f}\n")).collect();
    seg_io::atomic::write_atomically(&sums_path, |w| {
        w.write_all(text.as_bytes())
            .map_err(|source| seg_io::Error::Io {
                path: sums_path.clone(),
                source,
            })
    })?;
    Ok(())
}

/// Unpacks a zip archive into `dest`, refusing any entry whose path would leave `dest`
/// (absolute paths, `..`). Returns the number of files written.
///
/// # Errors
/// [`Error::Content`] for a corrupt archive or an escaping entry; [`Error::Io`] for writes.
pub fn unzip_safely(archive: &Path, dest: &Path) -> Result<usize> {
    let content = |what: String| Error::Content {
        path: archive.to_path_buf(),
        what,
    };
    let file = File::open(archive).map_err(|source| Error::Io {
        path: archive.to_path_buf(),
        source,
    })?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| content(format!("not a readable zip archive: {e}")))?;
    let mut written = 0;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| content(format!("entry {i}: {e}")))?;
        let Some(relative) = entry.enclosed_name() else {
            return Err(content(format!(
                "entry {:?} would be written outside {}",
                entry.name(),
                dest.display()
            )));
        };
        let out = dest.join(relative);
        let io = |source| Error::Io {
            path: out.clone(),
            source,
        };
        if entry.is_dir() {
            fs::create_dir_all(&out).map_err(io)?;
            continue;
        }
        if let Some(parent) = out.parent() {
            fs::create_dir_all(parent).map_err(io)?;
        }
        let mut target = File::create(&out).map_err(io)?;
        std::io::copy(&mut entry, &mut target)
            .map_err(|e| content(format!("entry {:?}: {e}", entry.name())))?;
        written += 1;
    }
    Ok(written)
}

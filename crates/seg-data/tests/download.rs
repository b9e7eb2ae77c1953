//! Downloads against a small HTTP server on the loopback interface.

#![cfg(feature = "download")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use seg_data::download::{
    download, record_or_verify_checksums, sha256_file, unzip_safely, DownloadOptions, Remote,
};

/// A fresh directory, removed when the guard drops.
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("seg-data-dl-{name}-"))
        .tempdir()
        .unwrap()
}

/// Serves `body` to `requests` connections, honouring `Range: bytes=N-`; the first response is
/// cut after `cut_first` bytes when given. Returns the URL and a counter of body bytes sent.
fn serve(body: Vec<u8>, requests: usize, cut_first: Option<usize>) -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/data.bin", listener.local_addr().unwrap());
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().take(requests).enumerate() {
            let mut stream = stream.unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut start = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    start = v.trim().trim_end_matches('-').parse().unwrap();
                }
            }
            let rest = &body[start..];
            let head = if start > 0 {
                format!("HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n", rest.len(), body.len() - 1, body.len())
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    rest.len()
                )
            };
            stream.write_all(head.as_bytes()).unwrap();
            let len = match cut_first {
                Some(cut) if n == 0 => cut.min(rest.len()),
                _ => rest.len(),
            };
            let _ = stream.write_all(&rest[..len]);
            counter.fetch_add(len as u64, Ordering::SeqCst);
        }
    });
    (url, sent)
}

fn body() -> Vec<u8> {
    (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_broken_download_resumes_where_it_stopped() {
    let data = body();
    let (url, sent) = serve(data.clone(), 2, Some(100_000));
    let dir_guard = scratch("resume");
    let dir = dir_guard.path().to_path_buf();
    let remote = Remote {
        url,
        file_name: "data.bin".into(),
        sha256: Some(sha(&data)),
    };
    let err = download(&remote, &dir, &DownloadOptions::default(), &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("run the command again to resume"), "{err}");
    assert_eq!(
        std::fs::metadata(dir.join("data.bin.part")).unwrap().len(),
        100_000
    );
    let mut seen = Vec::new();
    let path = download(
        &remote,
        &dir,
        &DownloadOptions::default(),
        &mut |done, total| seen.push((done, total)),
    )
    .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(
        sent.load(Ordering::SeqCst),
        300_000,
        "the second request sent only the rest"
    );
    assert_eq!(seen.first(), Some(&(100_000, Some(300_000))));
    assert_eq!(seen.last(), Some(&(300_000, Some(300_000))));
    assert!(!dir.join("data.bin.part").exists());
    // Already there: verified, not downloaded again (the server is gone).
    assert_eq!(
        download(&remote, &dir, &DownloadOptions::default(), &mut |_, _| {}).unwrap(),
        path
    );
}

#[test]
fn a_checksum_mismatch_keeps_nothing() {
    let (url, _) = serve(body(), 1, None);
    let dir_guard = scratch("sha");
    let dir = dir_guard.path().to_path_buf();
    let remote = Remote {
        url,
        file_name: "data.bin".into(),
        sha256: Some("00".repeat(32)),
    };
    let err = download(&remote, &dir, &DownloadOptions::default(), &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("SHA-256") && err.contains(&"00".repeat(32)),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

#[test]
fn an_unreachable_server_fails_fast_and_says_what_to_do() {
    let dir_guard = scratch("offline");
    let dir = dir_guard.path().to_path_buf();
    // Nothing listens on port 1 of the loopback interface.
    let remote = Remote {
        url: "http://127.0.0.1:1/sample_A_20160501.hdf".into(),
        file_name: "sampleA.h5".into(),
        sha256: None,
    };
    let start = Instant::now();
    let err = download(&remote, &dir, &DownloadOptions::default(), &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(
        err.contains("by hand")
            && err.contains("sampleA.h5")
            && err.contains("sample_A_20160501.hdf"),
        "{err}"
    );
}

#[test]
fn checksums_are_recorded_then_verified() {
    let dir_guard = scratch("sums");
    let dir = dir_guard.path().to_path_buf();
    std::fs::write(dir.join("a.json"), b"{}").unwrap();
    record_or_verify_checksums(&dir, &["a.json"]).unwrap();
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    assert!(sums.contains(&sha256_file(&dir.join("a.json")).unwrap()));
    record_or_verify_checksums(&dir, &["a.json"]).unwrap();
    std::fs::write(dir.join("a.json"), b"{ }").unwrap();
    let err = record_or_verify_checksums(&dir, &["a.json"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("a.json") && err.contains("differs"), "{err}");
}

/// A stored (uncompressed) zip archive with the given entries, written by hand.
fn zip_bytes(entries: &[(&str, &[u8])]) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let (mut out, mut central) = (Vec::new(), Vec::new());
    for (name, data) in entries {
        let (offset, crc) = (out.len() as u32, crc32(data));
        let fields = |v: &mut Vec<u8>| {
            v.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            v.extend_from_slice(&crc.to_le_bytes());
            v.extend_from_slice(&(data.len() as u32).to_le_bytes());
            v.extend_from_slice(&(data.len() as u32).to_le_bytes());
            v.extend_from_slice(&(name.len() as u16).to_le_bytes());
            v.extend_from_slice(&[0, 0]);
        };
        out.extend_from_slice(&[0x50, 0x4b, 3, 4]);
        fields(&mut out);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        central.extend_from_slice(&[0x50, 0x4b, 1, 2, 20, 0]);
        fields(&mut central);
        central.extend_from_slice(&[0; 10]); // comment length, disk, internal and external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let start = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&[0x50, 0x4b, 5, 6, 0, 0, 0, 0]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&start.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

#[test]
fn unzipping_writes_inside_the_target_only() {
    let dir_guard = scratch("zip");
    let dir = dir_guard.path().to_path_buf();
    let good = dir.join("good.zip");
    std::fs::write(
        &good,
        zip_bytes(&[("images/a/x.tif", b"xx"), ("images/y.tif", b"y")]),
    )
    .unwrap();
    let dest = dir.join("out");
    assert_eq!(unzip_safely(&good, &dest).unwrap(), 2);
    let mut text = String::new();
    std::fs::File::open(dest.join("images/a/x.tif"))
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, "xx");

    let evil = dir.join("evil.zip");
    std::fs::write(&evil, zip_bytes(&[("../escaped.txt", b"gotcha")])).unwrap();
    let err = unzip_safely(&evil, &dir.join("out2"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("evil.zip") && err.contains("outside"), "{err}");
    assert!(!dir.join("escaped.txt").exists());

    let corrupt = dir.join("corrupt.zip");
    std::fs::write(&corrupt, b"PK\x03\x04 not really").unwrap();
    assert!(unzip_safely(&corrupt, &dir.join("out3"))
        .unwrap_err()
        .to_string()
        .contains("corrupt.zip"));
}

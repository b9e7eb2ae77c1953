//! HDF5 files written by h5py (3.x, libhdf5 1.14): `libver="latest"` layouts and soft links.
//! Each holds `volumes/raw`, a (2, 8, 8) u8 volume of 0…127; the soft-link file and the
//! chunked one also `volumes/alias`, a soft link to it.

use std::path::PathBuf;

use seg_io::hdf5::{PureHdf5, VolumeSource};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// The default (pure-Rust) reader reads h5py's default files; for the layout of
/// `libver="latest"` and for soft links, which it does not implement, the error says so and names
/// what reads them.
#[test]
fn h5py_files_read_or_say_what_is_unsupported_and_what_reads_them() {
    let read =
        |name: &str, key: &str| PureHdf5::open(&data(name)).and_then(|f| f.read_u8(key, 0..2));
    let v = read("h5py-soft-link.h5", "volumes/raw").unwrap();
    assert_eq!(v.dim(), (2, 8, 8));
    assert!(v.iter().enumerate().all(|(i, &x)| x as usize == i));
    let e = read("h5py-soft-link.h5", "volumes/alias")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("h5py-soft-link.h5")
            && e.contains("soft or external link")
            && e.contains("hdf5-c"),
        "{e}"
    );
    for name in ["h5py-latest-chunked.h5", "h5py-latest-contiguous.h5"] {
        match read(name, "volumes/raw") {
            // Read where the reader implements the layout …
            Ok(v) => assert!(
                v.iter().enumerate().all(|(i, &x)| x as usize == i),
                "{name}"
            ),
            // … otherwise a message that names the cause and the way out.
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.contains(name) && e.contains("libver") && e.contains("hdf5-c"),
                    "{e}"
                );
            }
        }
    }
}

/// The C-library backend follows soft links (libhdf5 resolves them).
#[cfg(feature = "hdf5-c")]
#[test]
fn the_c_library_backend_follows_soft_links() {
    let f = seg_io::hdf5::LibHdf5::open(&data("h5py-soft-link.h5")).unwrap();
    let v = f.read_u8("volumes/alias", 0..2).unwrap();
    assert!(v.iter().enumerate().all(|(i, &x)| x as usize == i));
}

/// A dataset can declare any shape: reading 10^15 bytes is refused before allocating, with the
/// figures and a way out.
#[test]
fn a_declared_volume_beyond_memory_is_refused_before_allocating() {
    let f = PureHdf5::open(&data("h5py-declared-1e15.h5")).unwrap();
    assert_eq!(f.shape("volumes/raw").unwrap(), vec![100_000; 3]);
    let e = f
        .read_u8("volumes/raw", 0..100_000)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("h5py-declared-1e15.h5")
            && e.contains("931322.57 GiB")
            && e.contains("--slices"),
        "{e}"
    );
}

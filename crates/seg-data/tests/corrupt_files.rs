//! The readers turn corrupt files into errors, never panics: many random byte corruptions and
//! truncations of valid TIFF, HDF5 and COCO files.

use ndarray::Array3;
use seg_data::cremi::{read_cremi, CremiSplit, LABEL_KEY, RAW_KEY};
use seg_data::synthetic::SplitMix64;
use seg_io::hdf5::{write_volumes, VolumeData};
use seg_io::tiff::{read_tiff, write_tiff, Compression, WriteOptions};

fn corruptions(valid: &[u8], count: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = SplitMix64::new(seed);
    (0..count)
        .map(|i| {
            let mut b = valid.to_vec();
            if i % 4 == 0 {
                b.truncate(rng.below(valid.len()));
            } else {
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(b.len());
                    b[at] = rng.next_u64() as u8;
                }
            }
            b
        })
        .collect()
}

fn check_no_panic(
    name: &str,
    valid: Vec<u8>,
    read: impl Fn(&std::path::Path) + std::panic::RefUnwindSafe,
) {
    let guard = tempfile::Builder::new()
        .prefix(&format!("seg-data-corrupt-{name}-"))
        .tempdir()
        .unwrap();
    let dir = guard.path();
    for (i, bytes) in corruptions(&valid, 300, 42).into_iter().enumerate() {
        let path = dir.join(format!("{i}"));
        std::fs::write(&path, &bytes).unwrap();
        let outcome = std::panic::catch_unwind(|| read(&path));
        assert!(
            outcome.is_ok(),
            "{name}: corruption {i} made the reader panic"
        );
    }
}

#[test]
fn corrupt_tiff_files_never_panic() {
    let guard = tempfile::Builder::new()
        .prefix("seg-data-corrupt-src-")
        .tempdir()
        .unwrap();
    let dir = guard.path();
    for (k, compression) in [
        Compression::None,
        Compression::Lzw,
        Compression::Deflate,
        Compression::PackBits,
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.join(format!("{k}.tif"));
        let a = Array3::from_shape_fn((2, 40, 30), |(z, y, x)| (z * 1000 + y * 30 + x) as u16);
        write_tiff(&path, a.view(), &{
            let mut opts = WriteOptions::default();
            opts.compression = compression;
            opts
        })
        .unwrap();
        check_no_panic(&format!("tiff-{k}"), std::fs::read(&path).unwrap(), |p| {
            let _ = read_tiff(p).map(|t| t.into_labels());
        });
    }
}

#[test]
fn corrupt_hdf5_files_never_panic() {
    let guard = tempfile::Builder::new()
        .prefix("seg-data-corrupt-h5-")
        .tempdir()
        .unwrap();
    let dir = guard.path();
    let path = dir.join("valid.h5");
    let raw = Array3::from_shape_fn((3, 70, 65), |(z, y, x)| ((z + y * x) % 256) as u8);
    let ids = Array3::from_shape_fn((3, 70, 65), |(z, y, x)| (z * 7 + y / 9 + x / 11) as u64);
    write_volumes(
        &path,
        &[
            (RAW_KEY, VolumeData::U8(raw.view()), Some([40.0, 4.0, 4.0])),
            (LABEL_KEY, VolumeData::U64(ids.view()), None),
        ],
    )
    .unwrap();
    check_no_panic("hdf5", std::fs::read(&path).unwrap(), |p| {
        let _ = read_cremi(p, CremiSplit::All);
    });
}

#[test]
fn corrupt_coco_files_never_panic() {
    let json = br#"{"images":[{"id":1,"width":20,"height":10,"file_name":"A172_x.tif"}],
        "annotations":[{"id":1,"image_id":1,"category_id":1,"segmentation":[[1,1,8,1,8,6,1,6]],"area":35,"iscrowd":0}],
        "categories":[{"id":1,"name":"cell"}]}"#;
    check_no_panic("coco", json.to_vec(), |p| {
        if let Ok(bytes) = std::fs::read(p) {
            seg_data::fuzz::coco_json(&bytes);
        }
    });
}

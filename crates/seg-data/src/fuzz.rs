//! The fuzz targets' bodies and their seed inputs, shared by the `cargo fuzz` targets in
//! `fuzz/` (nightly, libFuzzer) and `cargo xtask fuzz` (any toolchain). Each body only has to
//! return: an error is fine, a panic, abort, hang or runaway allocation is a defect.

use std::path::PathBuf;

use ndarray::Array3;

use crate::cremi::{read_cremi, CremiSplit, LABEL_KEY, RAW_KEY};

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    /// Runs the code under test on one input.
    pub run: fn(&[u8]),
    /// Valid inputs that mutations start from.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "coco_json",
        run: coco_json,
        seeds: coco_seeds,
    },
    Target {
        name: "polygon_mask",
        run: polygon_mask,
        seeds: polygon_seeds,
    },
    Target {
        name: "tiff_reader",
        run: tiff_reader,
        seeds: tiff_seeds,
    },
    Target {
        name: "hdf5_reader",
        run: hdf5_reader,
        seeds: hdf5_seeds,
    },
    Target {
        name: "zarr_reader",
        run: zarr_reader,
        seeds: zarr_seeds,
    },
];

/// A scratch file of this process for the file readers.
fn scratch(ext: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vimseg-fuzz-{}.{ext}", std::process::id()))
}

/// Removes this process's scratch files.
pub fn remove_scratch() {
    for ext in ["tif", "h5", "seed.tif", "seed.h5", "check.tif", "check.h5"] {
        let _ = std::fs::remove_file(scratch(ext));
    }
    for ext in ["zarr", "seed.zarr"] {
        let _ = std::fs::remove_dir_all(scratch(ext));
    }
}

/// COCO annotations → LIVECell label images.
pub fn coco_json(data: &[u8]) {
    if let Ok(coco) = serde_json::from_slice::<seg_io::coco::CocoFile>(data) {
        for image in coco.images.iter().take(4) {
            let anns: Vec<_> = coco
                .annotations
                .iter()
                .filter(|a| a.image_id == image.id)
                .collect();
            let _ = crate::livecell::annotations_to_labels(image, &anns, 50);
        }
    }
}

fn coco_seeds() -> Vec<Vec<u8>> {
    vec![
        br#"{"images": [{"id": 1, "width": 24, "height": 20, "file_name": "a.tif"}],
 "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
   "segmentation": [[2.0, 2.0, 15.5, 3.0, 14.0, 12.0, 3.0, 11.0]], "area": 120.0, "iscrowd": 0},
  {"id": 2, "image_id": 1, "segmentation": [[10, 10, 20, 10, 20, 18, 10, 18]]}],
 "categories": [{"id": 1, "name": "cell"}]}"#
            .to_vec(),
    ]
}

/// A polygon of little-endian f64 coordinates on an image of at most 64×64 (first two bytes).
pub fn polygon_mask(data: &[u8]) {
    use seg_io::coco::{segmentation_mask, Segmentation};
    if data.len() < 2 {
        return;
    }
    let (h, w) = (1 + data[0] as usize % 64, 1 + data[1] as usize % 64);
    let coords: Vec<f64> = data[2..]
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    let _ = segmentation_mask(&Segmentation::Polygons(vec![coords]), h, w);
}

fn polygon_seeds() -> Vec<Vec<u8>> {
    let mut seed = vec![40u8, 50];
    for v in [3.0f64, 4.0, 30.5, 5.0, 28.0, 35.0, 6.0, 33.0] {
        seed.extend_from_slice(&v.to_le_bytes());
    }
    vec![seed]
}

/// A TIFF file read as a label image.
pub fn tiff_reader(data: &[u8]) {
    let path = scratch("tif");
    if std::fs::write(&path, data).is_ok() {
        let _ = seg_io::tiff::read_tiff(&path).map(|t| t.into_label_ids());
    }
}

fn tiff_seeds() -> Vec<Vec<u8>> {
    use seg_io::tiff::{write_tiff, Compression, WriteOptions};
    let path = scratch("seed.tif");
    let stack = Array3::from_shape_fn((2, 9, 11), |(z, y, x)| (z * 31 + y * 7 + x) as u16);
    let mut seeds = Vec::new();
    for compression in [Compression::None, Compression::Deflate] {
        let mut opts = WriteOptions::default();
        opts.compression = compression;
        if write_tiff(&path, stack.view(), &opts).is_ok() {
            seeds.extend(std::fs::read(&path).ok());
        }
    }
    let _ = std::fs::remove_file(&path);
    seeds
}

/// An HDF5 file read as a CREMI volume (raw and labels datasets).
pub fn hdf5_reader(data: &[u8]) {
    let path = scratch("h5");
    if std::fs::write(&path, data).is_ok() {
        let _ = read_cremi(&path, CremiSplit::All);
    }
}

fn hdf5_seeds() -> Vec<Vec<u8>> {
    use seg_io::hdf5::{write_volumes, VolumeData};
    let path = scratch("seed.h5");
    let raw = Array3::from_shape_fn((2, 8, 8), |(z, y, x)| (z * 64 + y * 8 + x) as u8);
    let ids = Array3::from_shape_fn((2, 8, 8), |(_, y, x)| (y / 4 * 2 + x / 4) as u64);
    let written = write_volumes(
        &path,
        &[
            (RAW_KEY, VolumeData::U8(raw.view()), Some([40.0, 4.0, 4.0])),
            (LABEL_KEY, VolumeData::U64(ids.view()), None),
        ],
    );
    let seeds = written
        .ok()
        .and_then(|()| std::fs::read(&path).ok())
        .into_iter()
        .collect();
    let _ = std::fs::remove_file(&path);
    seeds
}

/// The chunk of a one-chunk Zarr v3 array with the default chunk key encoding.
const ZARR_CHUNK: &str = "c/0/0/0";

/// A Zarr v3 array read as a volume: the input is a 2-byte little-endian length, that many
/// bytes of `zarr.json`, and the bytes of chunk (0, 0, 0); the first box of at most 64 per axis
/// is read.
pub fn zarr_reader(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let n = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    let (meta, chunk) = data[2..].split_at(n);
    let dir = scratch("zarr");
    let _ = std::fs::remove_dir_all(&dir);
    let chunk_path = dir.join(ZARR_CHUNK);
    let written = chunk_path
        .parent()
        .map(std::fs::create_dir_all)
        .and_then(|r| r.ok())
        .and_then(|()| std::fs::write(dir.join("zarr.json"), meta).ok())
        .and_then(|()| std::fs::write(&chunk_path, chunk).ok());
    if written.is_none() {
        return;
    }
    if let Ok(array) = seg_io::volume::open_image(&dir) {
        use seg_io::volume::VolumeSource;
        let [z, y, x] = VolumeSource::shape(&array);
        if z > 0 && y > 0 && x > 0 {
            let _ = array.read_box(0..z.min(64), 0..y.min(64), 0..x.min(64));
        }
    }
}

fn zarr_seeds() -> Vec<Vec<u8>> {
    use seg_io::volume::{Element, ZarrArray};
    let dir = scratch("seed.zarr");
    let _ = std::fs::remove_dir_all(&dir);
    let values = Array3::from_shape_fn((2, 9, 11), |(z, y, x)| (z * 31 + y * 7 + x) as f32);
    let seed = ZarrArray::create(
        &dir,
        &[2, 9, 11],
        &[2, 9, 11],
        Element::F32,
        &["z", "y", "x"],
    )
    .and_then(|a| a.write_f32(&[0, 0, 0], &values.into_dyn()))
    .ok()
    .and_then(|()| {
        let meta = std::fs::read(dir.join("zarr.json")).ok()?;
        let chunk = std::fs::read(dir.join(ZARR_CHUNK)).ok()?;
        let mut seed = (meta.len() as u16).to_le_bytes().to_vec();
        seed.extend(meta);
        seed.extend(chunk);
        Some(seed)
    });
    let _ = std::fs::remove_dir_all(&dir);
    seed.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_has_seeds_it_accepts() {
        for t in TARGETS {
            let seeds = (t.seeds)();
            assert!(!seeds.is_empty(), "{}", t.name);
            for s in &seeds {
                (t.run)(s);
            }
        }
        // The seeds are valid inputs, not noise.
        let tiff = tiff_seeds();
        std::fs::write(scratch("check.tif"), &tiff[1]).unwrap();
        assert!(seg_io::tiff::read_tiff(scratch("check.tif")).is_ok());
        std::fs::write(scratch("check.h5"), &hdf5_seeds()[0]).unwrap();
        assert!(read_cremi(&scratch("check.h5"), CremiSplit::All).is_ok());
        assert!(serde_json::from_slice::<seg_io::coco::CocoFile>(&coco_seeds()[0]).is_ok());
        // The Zarr seed reads back as the array it was made from.
        zarr_reader(&zarr_seeds()[0]);
        let array = seg_io::volume::open_image(&scratch("zarr")).unwrap();
        let read = seg_io::volume::VolumeSource::read_box(&array, 1..2, 8..9, 10..11).unwrap();
        assert_eq!(read[[0, 0, 0]], (31 + 8 * 7 + 10) as f32);
        remove_scratch();
        assert!(!scratch("check.h5").exists());
    }
}

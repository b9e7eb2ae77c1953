//! The CREMI volumes as the paper splits them: per sample (A, B, C), slices 0–75 train, 75–100
//! validation, 100–125 test.
//!
//! Keys: `volumes/raw` (u8) and `volumes/labels/neuron_ids` (u64 in the files, narrowed to u32
//! here with a check), each with a `resolution` attribute (nm, z/y/x).

use std::ops::Range;
use std::path::Path;

use ndarray::Array3;

use crate::{Error, Result};
use seg_io::hdf5::{ElementType, PureHdf5, VolumeSource};

pub const RAW_KEY: &str = "volumes/raw";
pub const LABEL_KEY: &str = "volumes/labels/neuron_ids";

/// The paper's split of each volume along z.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CremiSplit {
    Train,
    Val,
    Test,
    /// Every slice.
    All,
}

impl CremiSplit {
    /// The slices of the split in a volume of `depth` slices: exactly 0–75 / 75–100 / 100–125
    /// for the 125-slice CREMI volumes, the same fractions (60 % / 20 % / 20 %) for others.
    pub fn z_range(self, depth: usize) -> Range<usize> {
        let at = |fraction: usize| (depth * fraction).div_ceil(100).min(depth);
        let (train_end, val_end) = (at(60), at(80));
        match self {
            CremiSplit::Train => 0..train_end,
            CremiSplit::Val => train_end..val_end,
            CremiSplit::Test => val_end..depth,
            CremiSplit::All => 0..depth,
        }
    }
}

/// Raw data and neuron ids of some slices of a CREMI volume.
#[derive(Debug, Clone)]
pub struct CremiVolume {
    pub raw: Array3<u8>,
    pub labels: Array3<u32>,
    /// Voxel size in nm (z, y, x), when the file records it.
    pub resolution: Option<[f64; 3]>,
    /// The slices read, in the file's z coordinates.
    pub slices: Range<usize>,
}

/// Reads a split of a CREMI-layout HDF5 file with the pure-Rust backend.
///
/// # Errors
/// [`Error::Io`] for a missing file; [`Error::Content`] for a file that is not HDF5, a missing
/// key, wrong dtypes or shapes (raw and labels must match), or a neuron id above u32::MAX (ids
/// are never silently truncated).
pub fn read_cremi(path: &Path, split: CremiSplit) -> Result<CremiVolume> {
    read_cremi_from(&PureHdf5::open(path)?, split)
}

/// [`read_cremi`] over any [`VolumeSource`].
pub fn read_cremi_from(source: &dyn VolumeSource, split: CremiSplit) -> Result<CremiVolume> {
    let path = source.path();
    let content = |what: String| Error::Content {
        path: path.to_path_buf(),
        what,
    };
    let raw_shape = source.shape(RAW_KEY)?;
    let label_shape = source.shape(LABEL_KEY)?;
    if raw_shape.len() != 3 || raw_shape != label_shape {
        return Err(content(format!(
            "{RAW_KEY} has shape {raw_shape:?} and {LABEL_KEY} {label_shape:?}; expected equal 3-D shapes"
        )));
    }
    if source.element_type(RAW_KEY)? != ElementType::U8 {
        return Err(content(format!("{RAW_KEY} is not 8-bit unsigned")));
    }
    let slices = split.z_range(raw_shape[0]);
    let raw = source.read_u8(RAW_KEY, slices.clone())?;
    let ids = source.read_u64(LABEL_KEY, slices.clone())?;
    if let Some((index, value)) = ids.indexed_iter().find(|(_, v)| **v > u64::from(u32::MAX)) {
        return Err(content(format!(
            "{LABEL_KEY}: neuron id {value} at {:?} does not fit in u32",
            (index.0 + slices.start, index.1, index.2)
        )));
    }
    let resolution = source
        .attr_f64(RAW_KEY, "resolution")?
        .and_then(|r| <[f64; 3]>::try_from(r).ok());
    Ok(CremiVolume {
        raw,
        labels: ids.mapv(|v| v as u32),
        resolution,
        slices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use seg_io::hdf5::{write_volumes, VolumeData};

    #[test]
    fn the_paper_split_is_exact_for_125_slices_and_proportional_otherwise() {
        assert_eq!(CremiSplit::Train.z_range(125), 0..75);
        assert_eq!(CremiSplit::Val.z_range(125), 75..100);
        assert_eq!(CremiSplit::Test.z_range(125), 100..125);
        assert_eq!(CremiSplit::Train.z_range(10), 0..6);
        assert_eq!(CremiSplit::Val.z_range(10), 6..8);
        assert_eq!(CremiSplit::Test.z_range(10), 8..10);
        for d in 1..40 {
            let (a, b, c) = (
                CremiSplit::Train.z_range(d),
                CremiSplit::Val.z_range(d),
                CremiSplit::Test.z_range(d),
            );
            assert_eq!((a.start, a.end, b.end, c.end), (0, b.start, c.start, d));
        }
    }

    /// A file path in a fresh directory that is removed when the guard drops.
    fn scratch(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::Builder::new()
            .prefix("seg-data-cremi-")
            .tempdir()
            .unwrap();
        let path = dir.path().join(name);
        (dir, path)
    }

    #[test]
    fn a_written_cremi_file_reads_back_by_split() {
        let raw =
            Array3::from_shape_fn((10, 70, 90), |(z, y, x)| ((z * 7 + y * 3 + x) % 256) as u8);
        let ids = Array3::from_shape_fn((10, 70, 90), |(z, y, x)| {
            (z * 1000 + (y / 10) * 10 + x / 10) as u64 + (1 << 31)
        });
        let (_path_dir, path) = scratch("sample.h5");
        write_volumes(
            &path,
            &[
                (RAW_KEY, VolumeData::U8(raw.view()), Some([40.0, 4.0, 4.0])),
                (
                    LABEL_KEY,
                    VolumeData::U64(ids.view()),
                    Some([40.0, 4.0, 4.0]),
                ),
            ],
        )
        .unwrap();
        let test = read_cremi(&path, CremiSplit::Test).unwrap();
        assert_eq!(test.slices, 8..10);
        assert_eq!(test.raw, raw.slice(ndarray::s![8..10, .., ..]));
        assert_eq!(
            test.labels,
            ids.slice(ndarray::s![8..10, .., ..]).mapv(|v| v as u32)
        );
        assert_eq!(test.resolution, Some([40.0, 4.0, 4.0]));
    }

    /// Both backends read the same file identically (when the C library is built in).
    #[cfg(feature = "hdf5-c")]
    #[test]
    fn the_c_library_backend_reads_what_the_pure_one_reads() {
        let raw =
            Array3::from_shape_fn((6, 50, 70), |(z, y, x)| ((z * 11 + y + 3 * x) % 256) as u8);
        let ids = Array3::from_shape_fn((6, 50, 70), |(z, y, x)| {
            (z * 100 + y / 10 * 10 + x / 10) as u64
        });
        let (_path_dir, path) = scratch("both-backends.h5");
        write_volumes(
            &path,
            &[
                (RAW_KEY, VolumeData::U8(raw.view()), Some([40.0, 4.0, 4.0])),
                (LABEL_KEY, VolumeData::U64(ids.view()), None),
            ],
        )
        .unwrap();
        for split in [CremiSplit::Train, CremiSplit::Test, CremiSplit::All] {
            let pure = read_cremi(&path, split).unwrap();
            let c = read_cremi_from(&seg_io::hdf5::LibHdf5::open(&path).unwrap(), split).unwrap();
            assert_eq!(
                (pure.raw, pure.labels, pure.resolution),
                (c.raw, c.labels, c.resolution)
            );
        }
    }

    #[test]
    fn ids_beyond_u32_wrong_keys_and_foreign_files_are_errors() {
        let raw = Array3::<u8>::zeros((2, 4, 4));
        let mut ids = Array3::<u64>::zeros((2, 4, 4));
        ids[[1, 2, 3]] = 1 << 40;
        let (_path_dir, path) = scratch("big-ids.h5");
        write_volumes(
            &path,
            &[
                (RAW_KEY, VolumeData::U8(raw.view()), None),
                (LABEL_KEY, VolumeData::U64(ids.view()), None),
            ],
        )
        .unwrap();
        let err = read_cremi(&path, CremiSplit::All).unwrap_err().to_string();
        assert!(
            err.contains("big-ids.h5")
                && err.contains("1099511627776")
                && err.contains("(1, 2, 3)"),
            "{err}"
        );

        let (_other_dir, other) = scratch("other-keys.h5");
        write_volumes(&other, &[("volumes/raw", VolumeData::U8(raw.view()), None)]).unwrap();
        let err = read_cremi(&other, CremiSplit::All).unwrap_err().to_string();
        assert!(
            err.contains("other-keys.h5") && err.contains("neuron_ids"),
            "{err}"
        );

        let (_wrong_type_dir, wrong_type) = scratch("u64-raw.h5");
        write_volumes(
            &wrong_type,
            &[
                (RAW_KEY, VolumeData::U64(ids.view()), None),
                (LABEL_KEY, VolumeData::U64(ids.view()), None),
            ],
        )
        .unwrap();
        assert!(read_cremi(&wrong_type, CremiSplit::All)
            .unwrap_err()
            .to_string()
            .contains("8-bit"));

        let (_text_dir, text) = scratch("text.h5");
        std::fs::write(&text, b"not hdf5").unwrap();
        assert!(read_cremi(&text, CremiSplit::All)
            .unwrap_err()
            .to_string()
            .contains("text.h5"));
        let (_truncated_dir, truncated) = scratch("truncated.h5");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
        assert!(read_cremi(&truncated, CremiSplit::All)
            .unwrap_err()
            .to_string()
            .contains("truncated.h5"));
        assert!(read_cremi(&scratch("missing.h5").1, CremiSplit::All)
            .unwrap_err()
            .to_string()
            .contains("missing.h5"));
    }
}

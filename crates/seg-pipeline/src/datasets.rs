//! The data of an experiment or a training run: the paper's splits of CREMI and LIVECell, a
//! user's own folders in any of three layouts, and the embedded synthetic stand-ins.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{Array2, Axis};
use seg_data::cremi::{read_cremi, CremiSplit};
use seg_data::livecell::{LivecellDataset, LivecellOptions, Split};
use seg_data::sampling::{standardize, ImageFiles, ImageSource, VolumeSlices};
use seg_data::synthetic::{
    write_cremi_like, write_livecell_like, CellImageOptions, EmVolumeOptions,
};
use seg_io::tiff::read_tiff;
use serde_json::json;

use crate::error::file_error;
use crate::{Context, Error, Result};

/// The paper's two datasets.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dataset {
    Cremi,
    Livecell,
}

impl Dataset {
    /// `cremi` or `livecell`.
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Cremi => "cremi",
            Dataset::Livecell => "livecell",
        }
    }

    /// The settings the paper trains on this dataset.
    pub fn settings(self) -> Vec<seg_targets::TargetSetting> {
        use seg_targets::TargetSetting;
        match self {
            Dataset::Cremi => vec![TargetSetting::Cremi],
            Dataset::Livecell => vec![
                TargetSetting::LivecellBoundaries,
                TargetSetting::LivecellDistances,
            ],
        }
    }
}

impl std::str::FromStr for Dataset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cremi" => Ok(Dataset::Cremi),
            "livecell" => Ok(Dataset::Livecell),
            _ => Err(Error::Option {
                option: "dataset".into(),
                what: format!("{s:?}: expected cremi or livecell"),
            }),
        }
    }
}

/// One test image: standardised raw, the raw as 8-bit grey for pictures, and the ground-truth
/// instance labels.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub name: String,
    pub raw: Array2<f32>,
    pub raw_u8: Array2<u8>,
    pub labels: Array2<u32>,
}

/// Training and validation sources, the test images, and a description for logs and reports.
#[derive(Clone)]
pub struct Splits {
    pub train: Arc<dyn ImageSource>,
    pub val: Arc<dyn ImageSource>,
    pub test: Vec<TestImage>,
    pub description: serde_json::Value,
}

/// The paper's splits of `dataset` under `dir`, with at most `limit` test images.
///
/// # Errors
/// A missing file (with the command that fetches it), unreadable files, an empty test split.
pub fn load_splits(dataset: Dataset, dir: &Path, limit: Option<usize>) -> Result<Splits> {
    let splits = match dataset {
        Dataset::Cremi => load_cremi(dir, limit)?,
        Dataset::Livecell => load_livecell(dir, limit)?,
    };
    if splits.test.is_empty() {
        return Err(Error::Input {
            path: dir.to_path_buf(),
            what: "the test split has no image".into(),
        });
    }
    Ok(splits)
}

/// CREMI samples A, B and C under `dir`, split per volume in z (60 / 20 / 20 %).
fn load_cremi(dir: &Path, limit: Option<usize>) -> Result<Splits> {
    let files: Vec<PathBuf> = ["A", "B", "C"]
        .iter()
        .map(|s| dir.join(format!("sample{s}.h5")))
        .collect();
    for f in &files {
        if !f.exists() {
            return Err(Error::Input {
                path: f.clone(),
                what: format!(
                    "missing; fetch CREMI with `vimseg data fetch cremi --dir {}`",
                    dir.display()
                ),
            });
        }
    }
    let read = |split| -> Result<Vec<_>> {
        files
            .iter()
            .map(|f| read_cremi(f, split).context(|| format!("{}: reading CREMI", f.display())))
            .collect()
    };
    let (train, val, test) = (
        read(CremiSplit::Train)?,
        read(CremiSplit::Val)?,
        read(CremiSplit::Test)?,
    );
    let mut images = Vec::new();
    for (f, v) in files.iter().zip(&test) {
        for (i, z) in v.slices.clone().enumerate() {
            let raw_u8 = v.raw.index_axis(Axis(0), i).to_owned();
            let mut raw = raw_u8.mapv(f32::from);
            standardize(&mut raw);
            images.push(TestImage {
                name: format!(
                    "{}-z{z}",
                    f.file_stem().unwrap_or_default().to_string_lossy()
                ),
                raw,
                raw_u8,
                labels: v.labels.index_axis(Axis(0), i).to_owned(),
            });
        }
    }
    if let Some(n) = limit {
        // Spread the subset over the three volumes.
        let step = (images.len() / n.max(1)).max(1);
        images = images.into_iter().step_by(step).take(n).collect();
    }
    let shape = train[0].raw.dim();
    Ok(Splits {
        description: json!({
            "dataset": "cremi", "dir": dir.display().to_string(),
            "volume_shape": [shape.0, shape.1, shape.2],
            "split": "per volume: z 0-60% train, 60-80% val, 80-100% test (0-75/75-100/100-125 for 125 slices)",
            "test_images": images.len(),
        }),
        train: Arc::new(VolumeSlices::new(train)),
        val: Arc::new(VolumeSlices::new(val)),
        test: images,
    })
}

/// The image/label file pairs of one LIVECell split.
fn livecell_files(root: &Path, split: Split) -> Result<ImageFiles> {
    let ds = LivecellDataset::open(root, split, &LivecellOptions::default()).context(|| {
        format!(
            "{}: opening the LIVECell {} split",
            root.display(),
            split.name()
        )
    })?;
    Ok(ImageFiles::new(
        ds.samples
            .iter()
            .map(|s| (s.image.clone(), s.labels.clone()))
            .collect(),
    )?)
}

/// LIVECell's official train / val / test splits under `root`.
fn load_livecell(root: &Path, limit: Option<usize>) -> Result<Splits> {
    let train = livecell_files(root, Split::Train)?;
    let val = livecell_files(root, Split::Val)?;
    let test = LivecellDataset::open(root, Split::Test, &LivecellOptions::default())?;
    let mut images = Vec::new();
    for s in test.samples.iter().take(limit.unwrap_or(usize::MAX)) {
        let raw = read_tiff(&s.image)?
            .into_f32()
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|_| Error::Input {
                path: s.image.clone(),
                what: "not a 2-D image".into(),
            })?;
        let labels = read_tiff(&s.labels)?
            .into_label_ids()?
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|_| Error::Input {
                path: s.labels.clone(),
                what: "not a 2-D label image".into(),
            })?;
        let raw_u8 = crate::picture::grey_u8(&raw);
        let mut raw = raw;
        standardize(&mut raw);
        images.push(TestImage {
            name: s
                .image
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string(),
            raw,
            raw_u8,
            labels,
        });
    }
    Ok(Splits {
        description: json!({
            "dataset": "livecell", "dir": root.display().to_string(),
            "split": "official train/val/test JSON", "train_images": train.len(),
            "val_images": val.len(), "test_images": images.len(),
        }),
        train: Arc::new(train),
        val: Arc::new(val),
        test: images,
    })
}

/// Image/label TIFF pairs of `dir/images` and `dir/labels`, matched by file name.
fn tiff_pairs(dir: &Path) -> Result<ImageFiles> {
    let (images, labels) = (dir.join("images"), dir.join("labels"));
    let mut names: Vec<_> = std::fs::read_dir(&images)
        .map_err(file_error(&images))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "tif" || e == "tiff"))
        .collect();
    names.sort();
    let mut pairs = Vec::new();
    for image in names {
        let label = labels.join(image.file_name().unwrap_or_default());
        if !label.exists() {
            return Err(Error::Input {
                path: image,
                what: format!("no label image {}", label.display()),
            });
        }
        pairs.push((image, label));
    }
    if pairs.is_empty() {
        return Err(Error::Input {
            path: images,
            what: "no TIFF images".into(),
        });
    }
    Ok(ImageFiles::new(pairs)?)
}

/// The training and validation sources of a user's folder.
#[derive(Clone)]
pub struct TrainingSources {
    pub train: Arc<dyn ImageSource>,
    pub val: Arc<dyn ImageSource>,
    /// The layout and files, for the run's record.
    pub description: serde_json::Value,
}

/// Training and validation sources from a user's folder, with a description of the layout:
///
/// - a LIVECell root (with `train.json`): the official train and val splits;
/// - `train/{images,labels}` and `val/{images,labels}`: TIFF pairs matched by file name;
/// - `.h5` volumes in the CREMI layout: each split per volume in z (60 / 20 %).
pub fn training_sources(data: &Path) -> Result<TrainingSources> {
    if data.join("train.json").exists() {
        return Ok(TrainingSources {
            train: Arc::new(livecell_files(data, Split::Train)?),
            val: Arc::new(livecell_files(data, Split::Val)?),
            description: json!({"layout": "livecell", "dir": data.display().to_string()}),
        });
    }
    if data.join("train").join("images").is_dir() {
        return Ok(TrainingSources {
            train: Arc::new(tiff_pairs(&data.join("train"))?),
            val: Arc::new(tiff_pairs(&data.join("val"))?),
            description: json!({"layout": "tiff-pairs", "dir": data.display().to_string()}),
        });
    }
    let mut h5: Vec<PathBuf> = std::fs::read_dir(data)
        .map_err(file_error(data))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "h5" || e == "hdf" || e == "hdf5")
        })
        .collect();
    h5.sort();
    if h5.is_empty() {
        return Err(Error::Input {
            path: data.to_path_buf(),
            what:
                "no train.json (LIVECell), train/images (TIFF pairs) or .h5 volumes (CREMI layout)"
                    .into(),
        });
    }
    let read = |split| -> Result<Vec<_>> {
        h5.iter()
            .map(|f| read_cremi(f, split).context(|| f.display().to_string()))
            .collect()
    };
    Ok(TrainingSources {
        train: Arc::new(VolumeSlices::new(read(CremiSplit::Train)?)),
        val: Arc::new(VolumeSlices::new(read(CremiSplit::Val)?)),
        description: json!({"layout": "cremi", "files": h5.iter().map(|p| p.display().to_string()).collect::<Vec<_>>()}),
    })
}

/// The size of a synthetic stand-in data set.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SyntheticSize {
    /// CREMI-like volumes: (depth, side).
    pub em: (usize, usize),
    /// LIVECell-like images: counts of (train, val, test) and (height, width).
    pub cells: ([usize; 3], usize, usize),
}

impl SyntheticSize {
    pub fn new(em: (usize, usize), cells: ([usize; 3], usize, usize)) -> Self {
        SyntheticSize { em, cells }
    }
}

/// Writes the synthetic stand-in of `dataset` into `dir` (deterministic for a size and seed;
/// a folder already holding the same data, marked complete, is reused) and returns `dir`.
pub fn synthetic_data(
    dataset: Dataset,
    size: SyntheticSize,
    seed: u64,
    dir: &Path,
) -> Result<PathBuf> {
    let stamp = dir.join(".complete");
    let wanted = format!("{dataset:?} {:?} {:?} seed {seed}", size.em, size.cells);
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(dir.to_path_buf());
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(file_error(dir))?;
    }
    match dataset {
        Dataset::Cremi => {
            let (depth, side) = size.em;
            let em = {
                let mut opts = EmVolumeOptions::default();
                opts.depth = depth;
                opts.height = side;
                opts.width = side;
                opts
            };
            write_cremi_like(dir, &em, seed)?;
        }
        Dataset::Livecell => {
            let (counts, h, w) = size.cells;
            let cells = {
                let mut opts = CellImageOptions::default();
                opts.height = h;
                opts.width = w;
                opts.cells = (h * w / 2400).max(4);
                opts
            };
            write_livecell_like(dir, counts, &cells, seed)?;
        }
    }
    std::fs::write(&stamp, wanted).map_err(file_error(&stamp))?;
    Ok(dir.to_path_buf())
}

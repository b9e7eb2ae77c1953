//! The LIVECell dataset as torch-em reads it: official train/val/test splits from the COCO JSON
//! files, images in either archive layout, instance labels made from the polygons and cached as
//! TIFF next to the data.
//!
//! Layout under the dataset root (what `vimseg data fetch livecell` produces):
//!
//! ```text
//! root/train.json, val.json, test.json           COCO annotations (official splits)
//! root/images/livecell_train_val_images/[<CellType>/]<file>.tif
//! root/images/livecell_test_images/[<CellType>/]<file>.tif
//! root/annotations/<image folder>/<CellType>/<file>.tif   converted labels (cache)
//! root/annotations/<split>.json.sha256                    the JSON the cache was made from
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::Array2;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::{Error, Result};
use seg_io::coco::{segmentation_mask, CocoAnnotation, CocoFile, CocoImage};
use seg_io::tiff::{write_tiff, WriteOptions};

/// The eight LIVECell cell types.
pub const CELL_TYPES: [&str; 8] = [
    "A172", "BT474", "BV2", "Huh7", "MCF7", "SHSY5Y", "SkBr3", "SKOV3",
];

/// An official LIVECell split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }

    /// The image folder of the split (train and val share one).
    pub fn image_folder(self) -> &'static str {
        match self {
            Split::Train | Split::Val => "livecell_train_val_images",
            Split::Test => "livecell_test_images",
        }
    }
}

/// Options of [`LivecellDataset::open`]; `Default` is torch-em's.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct LivecellOptions {
    /// Keep only images whose file name contains one of these (torch-em's substring test).
    pub cell_types: Option<Vec<String>>,
    /// Instance ids with fewer pixels are removed from the converted labels.
    pub min_size: usize,
}

impl Default for LivecellOptions {
    fn default() -> Self {
        LivecellOptions {
            cell_types: None,
            min_size: 50,
        }
    }
}

/// One image of a split with its converted label image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LivecellSample {
    pub image: PathBuf,
    pub labels: PathBuf,
    pub cell_type: String,
}

/// A LIVECell split, ready to load.
#[derive(Debug, Clone)]
pub struct LivecellDataset {
    pub root: PathBuf,
    pub split: Split,
    pub samples: Vec<LivecellSample>,
    /// Annotations that were skipped, each with the reason (empty for clean data).
    pub skipped: Vec<String>,
    /// Whether the labels were converted now (false: the cache was reused).
    pub converted: bool,
}

impl LivecellDataset {
    /// Opens a split: reads `root/<split>.json`, finds every image, and converts the polygons
    /// to label images unless the cache was made from the same JSON (by SHA-256).
    ///
    /// # Errors
    /// [`Error::Io`] for a missing JSON, [`Error::Content`] for invalid JSON, a missing image
    /// file (naming the paths tried), no "cell" category, or more than 65535 objects per image.
    pub fn open(root: &Path, split: Split, options: &LivecellOptions) -> Result<LivecellDataset> {
        let json_path = root.join(format!("{}.json", split.name()));
        let bytes = std::fs::read(&json_path).map_err(|source| Error::Io {
            path: json_path.clone(),
            source,
        })?;
        let digest = hex(&Sha256::digest(&bytes));
        let coco: CocoFile = serde_json::from_slice(&bytes).map_err(|e| Error::Content {
            path: json_path.clone(),
            what: format!("not a valid COCO annotation file: {e}"),
        })?;
        drop(bytes);
        let cell = match (coco.categories.is_empty(), coco.category_id("cell")) {
            (true, _) => None,
            (false, Some(id)) => Some(id),
            (false, None) => {
                return Err(Error::Content {
                    path: json_path,
                    what: "no category named \"cell\"".into(),
                })
            }
        };
        let mut skipped = Vec::new();
        let known: HashMap<u64, &CocoImage> = coco.images.iter().map(|i| (i.id, i)).collect();
        let mut by_image: HashMap<u64, Vec<&CocoAnnotation>> = HashMap::new();
        for a in &coco.annotations {
            if cell.is_some_and(|c| a.category_id != c) {
                continue;
            }
            if !known.contains_key(&a.image_id) {
                skipped.push(format!(
                    "annotation {}: unknown image id {}",
                    a.id, a.image_id
                ));
                continue;
            }
            by_image.entry(a.image_id).or_default().push(a);
        }
        let wanted = |name: &str| {
            options
                .cell_types
                .as_ref()
                .is_none_or(|types| types.iter().any(|t| name.contains(t.as_str())))
        };
        let mut images: Vec<&CocoImage> = coco
            .images
            .iter()
            .filter(|i| wanted(&i.file_name))
            .collect();
        images.sort_by(|a, b| a.file_name.cmp(&b.file_name));

        let labels_root = root.join("annotations");
        let stamp = labels_root.join(format!("{}.json.sha256", split.name()));
        let samples: Vec<LivecellSample> = images
            .iter()
            .map(|image| {
                let cell_type = image.file_name.split('_').next().unwrap_or("").to_owned();
                Ok(LivecellSample {
                    image: find_image(root, split, &image.file_name, &cell_type)?,
                    labels: labels_root
                        .join(split.image_folder())
                        .join(&cell_type)
                        .join(&image.file_name),
                    cell_type,
                })
            })
            .collect::<Result<_>>()?;
        let fresh = std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == digest)
            && samples.iter().all(|s| s.labels.is_file());
        if !fresh {
            let empty = Vec::new();
            let reports: Vec<Vec<String>> = images
                .par_iter()
                .zip(&samples)
                .map(|(image, sample)| {
                    let anns = by_image.get(&image.id).unwrap_or(&empty);
                    let (labels, report) = annotations_to_labels(image, anns, options.min_size);
                    let labels = labels.map_err(|what| Error::Content {
                        path: json_path.clone(),
                        what: format!("{}: {what}", image.file_name),
                    })?;
                    if let Some(dir) = sample.labels.parent() {
                        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                            path: dir.to_path_buf(),
                            source,
                        })?;
                    }
                    write_tiff(&sample.labels, labels.view(), &WriteOptions::default())?;
                    Ok(report)
                })
                .collect::<Result<_>>()?;
            skipped.extend(reports.into_iter().flatten());
            seg_io::atomic::write_atomically(&stamp, |w| {
                use std::io::Write;
                w.write_all(digest.as_bytes())
                    .map_err(|source| seg_io::Error::Io {
                        path: stamp.clone(),
                        source,
                    })
            })?;
        }
        Ok(LivecellDataset {
            root: root.to_path_buf(),
            split,
            samples,
            skipped,
            converted: !fresh,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `images/<folder>/<CellType>/<file>`, else `images/<folder>/<file>` (both archive layouts).
fn find_image(root: &Path, split: Split, file_name: &str, cell_type: &str) -> Result<PathBuf> {
    let folder = root.join("images").join(split.image_folder());
    let nested = folder.join(cell_type).join(file_name);
    let flat = folder.join(file_name);
    if nested.is_file() {
        Ok(nested)
    } else if flat.is_file() {
        Ok(flat)
    } else {
        Err(Error::Content {
            path: root.join(format!("{}.json", split.name())),
            what: format!(
                "image {file_name} not found at {} or {}",
                nested.display(),
                flat.display()
            ),
        })
    }
}

/// One image's instance labels from its annotations, exactly as torch-em's
/// `_annotations_to_instances`: sorted by the JSON `area` ascending (`iscrowd` → 1; ties keep
/// file order), painted with ids 1…N so later (larger) objects win overlaps, ids with fewer than
/// `min_size` pixels removed, relabelled consecutively, u16.
///
/// Returns the labels (or why they cannot be made) and the annotations that were skipped.
pub fn annotations_to_labels(
    image: &CocoImage,
    annotations: &[&CocoAnnotation],
    min_size: usize,
) -> (std::result::Result<Array2<u16>, String>, Vec<String>) {
    let mut report = Vec::new();
    if image
        .height
        .checked_mul(image.width)
        .is_none_or(|n| n > 1 << 31)
    {
        return (
            Err(format!(
                "implausible image size {}x{}",
                image.height, image.width
            )),
            report,
        );
    }
    let mut order: Vec<&CocoAnnotation> = annotations.to_vec();
    let key = |a: &CocoAnnotation| if a.iscrowd == 0 { a.area } else { 1.0 };
    order.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let mut seg = Array2::<u32>::zeros((image.height, image.width));
    let mut next = 0u32;
    for a in order {
        match segmentation_mask(&a.segmentation, image.height, image.width) {
            Ok(mask) => {
                next += 1;
                seg.zip_mut_with(&mask, |s, m| {
                    if *m {
                        *s = next;
                    }
                });
            }
            Err(problem) => report.push(format!(
                "{}: annotation {} skipped: {problem}",
                image.file_name, a.id
            )),
        }
    }
    let mut counts = vec![0usize; next as usize + 1];
    seg.iter().for_each(|v| counts[*v as usize] += 1);
    let mut new_id = vec![0u32; next as usize + 1];
    let mut kept = 0u32;
    for id in 1..=next as usize {
        if counts[id] >= min_size {
            kept += 1;
            new_id[id] = kept;
        }
    }
    if kept > u32::from(u16::MAX) {
        return (
            Err(format!("{kept} objects do not fit in u16 labels")),
            report,
        );
    }
    (Ok(seg.mapv(|v| new_id[v as usize] as u16)), report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use seg_io::coco::Segmentation;

    fn image(w: usize, h: usize) -> CocoImage {
        CocoImage {
            id: 1,
            width: w,
            height: h,
            file_name: "A172_Phase_A7_1_00d00h00m_1.tif".into(),
        }
    }

    fn square(id: u64, x0: f64, y0: f64, side: f64, area: f64) -> CocoAnnotation {
        CocoAnnotation {
            id,
            image_id: 1,
            category_id: 1,
            segmentation: Segmentation::Polygons(vec![vec![
                x0,
                y0,
                x0 + side,
                y0,
                x0 + side,
                y0 + side,
                x0,
                y0 + side,
            ]]),
            area,
            iscrowd: 0,
        }
    }

    #[test]
    fn larger_objects_win_overlaps_and_small_ones_are_dropped() {
        let big = square(1, 0.0, 0.0, 10.0, 100.0);
        let small = square(2, 5.0, 5.0, 10.0, 90.0); // painted first, partly covered
        let tiny = square(3, 16.0, 0.0, 3.0, 9.0);
        let (labels, report) = annotations_to_labels(&image(20, 20), &[&big, &small, &tiny], 50);
        let labels = labels.unwrap();
        assert!(report.is_empty());
        // ids after relabelling: small -> 1, big -> 2 (tiny, 9 px, removed)
        assert_eq!(labels[[7, 7]], 2, "the larger object wins the overlap");
        assert_eq!(labels[[12, 12]], 1);
        assert_eq!(labels[[1, 17]], 0);
        assert_eq!(labels.iter().filter(|v| **v == 2).count(), 100);
        assert_eq!(labels.iter().filter(|v| **v == 1).count(), 100 - 25);
    }

    #[test]
    fn the_sort_key_is_the_json_area_not_the_drawn_area() {
        // The JSON says the bigger square is "smaller": it is painted first and loses.
        let a = square(1, 0.0, 0.0, 10.0, 10.0);
        let b = square(2, 5.0, 5.0, 8.0, 500.0);
        let (labels, _) = annotations_to_labels(&image(20, 20), &[&a, &b], 0);
        assert_eq!(labels.unwrap()[[7, 7]], 2);
    }

    #[test]
    fn bad_annotations_are_skipped_with_a_reason() {
        let mut bbox = square(7, 0.0, 0.0, 5.0, 25.0);
        bbox.segmentation = Segmentation::Polygons(vec![vec![0.0, 0.0, 5.0, 5.0]]);
        let (labels, report) = annotations_to_labels(&image(10, 10), &[&bbox], 0);
        assert!(labels.unwrap().iter().all(|v| *v == 0));
        assert_eq!(report.len(), 1);
        assert!(
            report[0].contains("annotation 7") && report[0].contains("bounding-box"),
            "{report:?}"
        );
    }
}

//! The paper's external baselines (nnU-Net, U-Mamba) scored from their outputs: semantic class
//! maps (0 background, 1 foreground, 2 boundary) turned into instances with the boundary recipe
//! ([`crate::class_map_prediction`]) and scored like the models trained here.

use std::path::{Path, PathBuf};

use seg_targets::TargetSetting;

use crate::datasets::TestImage;
use crate::{Error, Recipes, Result};

/// A folder of a baseline's outputs: one class-map TIFF per test image, named after it
/// (`<image name>.tif`, e.g. `sampleC-z12.tif` for CREMI, the image's file stem for LIVECell).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Baseline {
    /// `nnunet`, `umamba-bot`, `umamba-enc` (the paper's, shown beside its numbers) or any
    /// other name.
    pub name: String,
    pub dir: PathBuf,
}

impl std::str::FromStr for Baseline {
    type Err = String;

    /// `NAME=DIR`.
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text.split_once('=') {
            Some((name, dir)) if !name.trim().is_empty() && !dir.is_empty() => Ok(Baseline {
                name: name.trim().to_string(),
                dir: PathBuf::from(dir),
            }),
            _ => Err(format!(
                "{text:?}: expected NAME=DIR (e.g. nnunet=results/nnunet-cremi)"
            )),
        }
    }
}

/// The paper's Fig. 2 mSA of its baselines (torch-em's plotting script, as for the models):
/// (LIVECell boundaries, CREMI); they were not run in the distance setting.
fn paper_msa(name: &str) -> Option<(&'static str, f64, f64)> {
    match name.to_ascii_lowercase().as_str() {
        "nnunet" | "nnu-net" | "nnunet-v2" => Some(("nnU-Net v2", 0.228, 0.452)),
        "umamba-bot" | "u-mamba-bot" => Some(("U-Mamba Bot", 0.234, 0.471)),
        "umamba-enc" | "u-mamba-enc" => Some(("U-Mamba Enc", 0.230, 0.467)),
        _ => None,
    }
}

/// The results of one baseline in one setting.
#[non_exhaustive]
#[derive(Debug, Clone, serde::Serialize)]
pub struct BaselineResult {
    pub name: String,
    pub label: String,
    pub setting: String,
    pub msa: f64,
    pub sa50: f64,
    pub sa75: f64,
    pub per_image: Vec<(String, f64)>,
    /// The paper's mSA for this baseline and setting, where it reports one.
    pub paper_msa: Option<f64>,
    pub dir: PathBuf,
}

/// Sums of per-image scores, and their means.
#[derive(Debug, Default)]
pub(crate) struct ScoreSum {
    pub msa: f64,
    pub sa50: f64,
    pub sa75: f64,
    pub per_image: Vec<(String, f64)>,
}

impl ScoreSum {
    /// Scores `seg` of the test image `img` and adds it.
    pub fn add(&mut self, img: &TestImage, seg: ndarray::ArrayView2<u32>) -> Result<()> {
        let score =
            msa_eval::mean_segmentation_accuracy(seg, img.labels.view(), &Default::default())?;
        self.msa += score.msa;
        self.sa50 += score.sa50().unwrap_or(0.0);
        self.sa75 += score.sa75().unwrap_or(0.0);
        self.per_image.push((img.name.clone(), score.msa));
        Ok(())
    }

    /// (mSA, SA50, SA75) averaged over the images added.
    pub fn means(&self) -> (f64, f64, f64) {
        let n = self.per_image.len().max(1) as f64;
        (self.msa / n, self.sa50 / n, self.sa75 / n)
    }
}

/// The output file of `baseline` for the test image `name`.
fn output_file(baseline: &Baseline, name: &str) -> Result<PathBuf> {
    ["tif", "tiff"]
        .iter()
        .map(|ext| baseline.dir.join(format!("{name}.{ext}")))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Input {
            path: baseline.dir.clone(),
            what: format!(
                "baseline {}: no output for the test image {name} (expected {name}.tif: a class \
                 map, 0 background, 1 foreground, 2 boundary)",
                baseline.name
            ),
        })
}

/// Reads a baseline's output for one image as a class map: an integer TIFF of class ids (one
/// 2-D page, or a stack of one), or a float TIFF of per-class probabilities (C, H, W) such as
/// nnU-Net's softmax output (channel c = class c), taken as the most probable class per pixel.
///
/// # Errors
/// [`Error::Input`] naming the file for another shape, NaN probabilities, or an unreadable file.
pub fn read_class_map(path: &Path) -> Result<ndarray::Array2<u32>> {
    let bad = |what: String| Error::Input {
        path: path.to_path_buf(),
        what,
    };
    let image = seg_io::tiff::read_tiff(path)?;
    let shape = image.shape().to_vec();
    let single = |a: ndarray::ArrayD<u32>| match a.ndim() {
        2 => a.into_dimensionality::<ndarray::Ix2>().ok(),
        3 if a.shape()[0] == 1 => a
            .index_axis_move(ndarray::Axis(0), 0)
            .into_dimensionality::<ndarray::Ix2>()
            .ok(),
        _ => None,
    };
    let map = match image {
        seg_io::tiff::TiffImage::F32(p) if p.ndim() == 3 && p.shape()[0] >= 2 => {
            if let Some(i) = p.iter().position(|v| v.is_nan()) {
                return Err(bad(format!("probabilities hold NaN (value {i})")));
            }
            let p = p
                .into_dimensionality::<ndarray::Ix3>()
                .map_err(|e| bad(e.to_string()))?;
            Some(ndarray::Array2::from_shape_fn(
                (p.dim().1, p.dim().2),
                |(y, x)| {
                    (0..p.dim().0)
                        .max_by(|&a, &b| p[[a, y, x]].total_cmp(&p[[b, y, x]]).then(b.cmp(&a)))
                        .unwrap_or(0) as u32
                },
            ))
        }
        seg_io::tiff::TiffImage::F32(_) => None,
        other => single(other.into_label_ids()?),
    };
    map.ok_or_else(|| {
        bad(format!(
            "shape {shape:?}: a class map is one 2-D page of class ids, or a (classes, height, \
             width) float stack of probabilities"
        ))
    })
}

/// Scores `baseline` on the test images in `setting` (a boundary setting).
///
/// # Errors
/// [`Error::Input`] naming the file for a missing output, a class map of another size, or a
/// class the setting does not have; [`Error::Option`] for the distance setting.
pub fn score_baseline(
    baseline: &Baseline,
    test: &[TestImage],
    setting: TargetSetting,
    recipes: &Recipes,
) -> Result<BaselineResult> {
    let mut sum = ScoreSum::default();
    for img in test {
        let path = output_file(baseline, &img.name)?;
        let classes = read_class_map(&path)?;
        if classes.dim() != img.labels.dim() {
            return Err(Error::Input {
                path,
                what: format!(
                    "{:?} pixels, but the test image {} has {:?}",
                    classes.dim(),
                    img.name,
                    img.labels.dim()
                ),
            });
        }
        let pred =
            crate::class_map_prediction(classes.view(), setting).map_err(|e| Error::Input {
                path: path.clone(),
                what: e.to_string(),
            })?;
        let seg = crate::segment(pred.view(), setting, recipes)?;
        sum.add(img, seg.view())?;
    }
    let (msa, sa50, sa75) = sum.means();
    let paper = paper_msa(&baseline.name);
    Ok(BaselineResult {
        name: baseline.name.clone(),
        label: paper.map_or_else(|| baseline.name.clone(), |p| p.0.to_string()),
        setting: setting.to_string(),
        msa,
        sa50,
        sa75,
        per_image: sum.per_image,
        paper_msa: paper.and_then(|(_, livecell, cremi)| match setting {
            TargetSetting::LivecellBoundaries => Some(livecell),
            TargetSetting::Cremi => Some(cremi),
            _ => None,
        }),
        dir: baseline.dir.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// Two 20×20 objects and their class map (1 inside, 2 on each object's border).
    fn image() -> (TestImage, Array2<u32>) {
        let mut labels = Array2::<u32>::zeros((48, 48));
        let mut classes = Array2::<u32>::zeros((48, 48));
        for (id, (y0, x0)) in [(1u32, (2usize, 2usize)), (2, (24, 24))] {
            for y in y0..y0 + 20 {
                for x in x0..x0 + 20 {
                    labels[[y, x]] = id;
                    let border = y == y0 || x == x0 || y == y0 + 19 || x == x0 + 19;
                    classes[[y, x]] = if border { 2 } else { 1 };
                }
            }
        }
        let raw = labels.mapv(|v| v as f32);
        let img = TestImage {
            name: "img-a".into(),
            raw_u8: labels.mapv(|v| v as u8),
            raw,
            labels,
        };
        (img, classes)
    }

    #[test]
    fn class_maps_are_scored_with_the_boundary_recipe_beside_the_papers_number() {
        let dir = tempfile::tempdir().unwrap();
        let (img, classes) = image();
        let opts = seg_io::tiff::WriteOptions::default();
        seg_io::tiff::write_tiff(dir.path().join("img-a.tif"), classes.view(), &opts).unwrap();
        let b: Baseline = format!("nnunet={}", dir.path().display()).parse().unwrap();
        let r = score_baseline(
            &b,
            std::slice::from_ref(&img),
            TargetSetting::LivecellBoundaries,
            &Recipes::default(),
        )
        .unwrap();
        assert_eq!(r.label, "nnU-Net v2");
        assert_eq!(r.paper_msa, Some(0.228));
        // Both objects found. As in the paper's recipe the foreground mask is class 1 only, so
        // each object loses its border (IoU 18²/20² = 0.81): SA passes at 0.50–0.80, 7 of 10.
        assert_eq!(r.sa50, 1.0, "{r:?}");
        assert!((r.msa - 0.7).abs() < 1e-9, "{r:?}");
        assert_eq!(r.per_image.len(), 1);
        // Another name has no paper number.
        let other = Baseline {
            name: "mine".into(),
            dir: dir.path().to_path_buf(),
        };
        let r = score_baseline(
            &other,
            std::slice::from_ref(&img),
            TargetSetting::LivecellBoundaries,
            &Recipes::default(),
        )
        .unwrap();
        assert_eq!((r.label.as_str(), r.paper_msa), ("mine", None));
        // CREMI class maps hold boundaries only (0/1).
        let e = score_baseline(&b, &[img], TargetSetting::Cremi, &Recipes::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("img-a.tif") && e.contains("cremi class maps hold 0…1"),
            "{e}"
        );
    }

    #[test]
    fn missing_or_wrong_outputs_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (img, classes) = image();
        let b = Baseline {
            name: "umamba-bot".into(),
            dir: dir.path().to_path_buf(),
        };
        let score = |img: &TestImage| {
            score_baseline(
                &b,
                std::slice::from_ref(img),
                TargetSetting::LivecellBoundaries,
                &Recipes::default(),
            )
            .unwrap_err()
            .to_string()
        };
        let e = score(&img);
        assert!(e.contains("no output for the test image img-a"), "{e}");
        let opts = seg_io::tiff::WriteOptions::default();
        let small = Array2::<u32>::zeros((10, 10));
        seg_io::tiff::write_tiff(dir.path().join("img-a.tif"), small.view(), &opts).unwrap();
        let e = score(&img);
        assert!(
            e.contains("img-a.tif") && e.contains("(10, 10) pixels"),
            "{e}"
        );
        let mut bad = classes.clone();
        bad[[5, 5]] = 7;
        seg_io::tiff::write_tiff(dir.path().join("img-a.tif"), bad.view(), &opts).unwrap();
        let e = score(&img);
        assert!(e.contains("img-a.tif") && e.contains('7'), "{e}");
        // Probabilities (classes, height, width): the most probable class per pixel, ties to the
        // lower class.
        let mut p = ndarray::Array3::<f32>::zeros((3, 48, 48));
        for ((y, x), &c) in classes.indexed_iter() {
            p[[c as usize, y, x]] = 0.7;
            p[[(c as usize + 1) % 3, y, x]] = 0.2;
        }
        p[[0, 0, 0]] = 0.4;
        p[[2, 0, 0]] = 0.4;
        let path = dir.path().join("img-a.tif");
        seg_io::tiff::write_tiff(&path, p.view(), &opts).unwrap();
        let mut expected = classes.clone();
        expected[[0, 0]] = 0;
        assert_eq!(read_class_map(&path).unwrap(), expected);
        p[[1, 3, 3]] = f32::NAN;
        seg_io::tiff::write_tiff(&path, p.view(), &opts).unwrap();
        assert!(read_class_map(&path)
            .unwrap_err()
            .to_string()
            .contains("NaN"));
        let flat = ndarray::Array2::<f32>::zeros((48, 48));
        seg_io::tiff::write_tiff(&path, flat.view(), &opts).unwrap();
        let e = read_class_map(&path).unwrap_err().to_string();
        assert!(e.contains("img-a.tif") && e.contains("float stack"), "{e}");
        for text in ["nnunet", "=dir", "x="] {
            assert!(text.parse::<Baseline>().is_err(), "{text}");
        }
    }
}

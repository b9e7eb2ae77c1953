use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use msa_eval::{mean_segmentation_accuracy, DatasetScores, MsaOptions, SegmentationAccuracy};
use rayon::prelude::*;
use seg_io::tiff::read_tiff;
use serde::Serialize;

#[derive(clap::Args)]
pub struct Args {
    /// Ground-truth label TIFF, or a folder of them; or a Zarr label volume (an array, or an
    /// OME-Zarr group), scored slice by slice and in 3-D without being read whole.
    #[arg(long)]
    gt: PathBuf,
    /// Segmentation TIFF, or a folder with a file of the same name for every ground-truth file;
    /// or a Zarr label volume of the ground truth's shape.
    #[arg(long)]
    pred: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Label ignored on both sides ("none" to count every label as an object).
    #[arg(long, default_value = "0")]
    ignore_label: String,
}

#[derive(Serialize)]
struct ImageReport {
    name: String,
    msa: f64,
    sa50: f64,
    sa75: f64,
    n_pred: usize,
    n_true: usize,
    per_threshold: Vec<ThresholdReport>,
}

#[derive(Serialize)]
struct ThresholdReport {
    threshold: f64,
    accuracy: f64,
    tp: usize,
    fp: usize,
    #[serde(rename = "fn")]
    fn_: usize,
}

#[derive(Serialize)]
struct Report {
    images: Vec<ImageReport>,
    mean: MeanReport,
    /// Zarr label volumes: the whole volume scored in 3-D.
    #[serde(skip_serializing_if = "Option::is_none")]
    volume: Option<MeanReport>,
}

#[derive(Serialize)]
struct MeanReport {
    n_images: usize,
    msa: f64,
    sa50: f64,
    sa75: f64,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let options = {
        let mut opts = MsaOptions::default();
        opts.ignore_label = parse_ignore(&args.ignore_label)?;
        opts
    };
    let (scores, volume): (Vec<(String, SegmentationAccuracy)>, _) =
        if seg_io::volume::is_zarr(&args.gt) && seg_io::volume::is_zarr(&args.pred) {
            // Label volumes in Zarr, streamed: each slice, and the whole volume in 3-D.
            let open = seg_io::volume::open_array;
            let mut o = seg_pipeline::blockwise::EvaluateOptions::default();
            o.msa = options.clone();
            let s =
                seg_pipeline::blockwise::evaluate_zarr(&open(&args.pred)?, &open(&args.gt)?, &o)?;
            let slices = s
                .slices
                .into_iter()
                .enumerate()
                .map(|(z, a)| (format!("z{z}"), a))
                .collect();
            (slices, Some(s.volume))
        } else {
            let pairs = pair_files(&args.gt, &args.pred)?;
            let scores = pairs
                .par_iter()
                .map(|(name, gt, pred)| Ok((name.clone(), score(gt, pred, &options)?)))
                .collect::<anyhow::Result<_>>()?;
            (scores, None)
        };
    let per_image: Vec<SegmentationAccuracy> = scores.iter().map(|(_, s)| s.clone()).collect();
    let mean = DatasetScores::from_images(&per_image)?;
    let images: Vec<ImageReport> = scores
        .into_iter()
        .map(|(name, s)| ImageReport {
            name,
            msa: s.msa,
            sa50: s.sa50().unwrap_or(f64::NAN),
            sa75: s.sa75().unwrap_or(f64::NAN),
            n_pred: s.n_pred,
            n_true: s.n_true,
            per_threshold: s
                .per_threshold
                .iter()
                .map(|t| ThresholdReport {
                    threshold: t.threshold,
                    accuracy: t.accuracy,
                    tp: t.true_positives,
                    fp: t.false_positives,
                    fn_: t.false_negatives,
                })
                .collect(),
        })
        .collect();
    let report = Report {
        images,
        mean: MeanReport {
            n_images: mean.n_images,
            msa: mean.msa,
            sa50: mean.sa50,
            sa75: mean.sa75,
        },
        volume: volume.map(|v| MeanReport {
            n_images: 1,
            msa: v.msa,
            sa50: v.sa50().unwrap_or(f64::NAN),
            sa75: v.sa75().unwrap_or(f64::NAN),
        }),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn parse_ignore(text: &str) -> anyhow::Result<Option<u64>> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .with_context(|| format!("--ignore-label {text:?}: expected a label id or \"none\""))
}

fn score(gt: &Path, pred: &Path, options: &MsaOptions) -> anyhow::Result<SegmentationAccuracy> {
    let gt_labels = read_tiff(gt)?
        .into_label_ids()
        .with_context(|| format!("{}: not a label image", gt.display()))?;
    let pred_labels = read_tiff(pred)?
        .into_label_ids()
        .with_context(|| format!("{}: not a label image", pred.display()))?;
    mean_segmentation_accuracy(pred_labels.view(), gt_labels.view(), options)
        .with_context(|| format!("scoring {} against {}", pred.display(), gt.display()))
}

fn is_tiff(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("tif") || e.eq_ignore_ascii_case("tiff"))
}

/// `(name, gt, pred)` for one pair of files, or for every TIFF of the gt folder matched by name.
fn pair_files(gt: &Path, pred: &Path) -> anyhow::Result<Vec<(String, PathBuf, PathBuf)>> {
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    match (gt.is_dir(), pred.is_dir()) {
        (false, false) => {
            for p in [gt, pred] {
                if !p.exists() {
                    bail!("{}: no such file", p.display());
                }
            }
            Ok(vec![(name(pred), gt.to_path_buf(), pred.to_path_buf())])
        }
        (true, true) => {
            let mut gts: Vec<PathBuf> = std::fs::read_dir(gt)
                .with_context(|| format!("{}: cannot list the folder", gt.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_tiff(p))
                .collect();
            gts.sort();
            if gts.is_empty() {
                bail!("{}: no .tif or .tiff files", gt.display());
            }
            let missing: Vec<String> = gts
                .iter()
                .map(|g| name(g))
                .filter(|n| !pred.join(n).is_file())
                .collect();
            if !missing.is_empty() {
                bail!(
                    "{}: no segmentation for {} ground-truth file(s): {}",
                    pred.display(),
                    missing.len(),
                    missing.join(", ")
                );
            }
            Ok(gts
                .into_iter()
                .map(|g| {
                    let n = name(&g);
                    let p = pred.join(&n);
                    (n, g, p)
                })
                .collect())
        }
        _ => bail!(
            "--gt {} and --pred {} must both be files or both be folders",
            gt.display(),
            pred.display()
        ),
    }
}

fn print_table(report: &Report) {
    let width = report
        .images
        .iter()
        .map(|i| i.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:<width$}  {:>7}  {:>7}  {:>7}  {:>6}  {:>6}",
        "image", "mSA", "SA50", "SA75", "n_pred", "n_true"
    );
    for i in &report.images {
        println!(
            "{:<width$}  {:>7.4}  {:>7.4}  {:>7.4}  {:>6}  {:>6}",
            i.name, i.msa, i.sa50, i.sa75, i.n_pred, i.n_true
        );
    }
    let m = &report.mean;
    let label = format!("mean ({} images)", m.n_images);
    println!(
        "{label:<width$}  {:>7.4}  {:>7.4}  {:>7.4}",
        m.msa, m.sa50, m.sa75
    );
    if let Some(v) = &report.volume {
        println!(
            "{:<width$}  {:>7.4}  {:>7.4}  {:>7.4}",
            "3-D volume", v.msa, v.sa50, v.sa75
        );
    }
}

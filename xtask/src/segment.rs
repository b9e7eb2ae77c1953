use std::path::PathBuf;

use anyhow::{bail, Context};
use ndarray::{ArrayD, Axis, Ix2};
use seg_io::tiff::{read_tiff, write_tiff, WriteOptions};
use seg_targets::TargetSetting;
use watershed::{
    watershed_from_boundaries, watershed_from_distances, BoundaryRecipe, DistanceRecipe, Flooding,
    MarkerOrder, WatershedOptions,
};

#[derive(clap::Args)]
pub struct Args {
    /// Float32 prediction stack, channels first, in the order `targets` writes them:
    /// livecell-boundaries [foreground, boundaries], livecell-distances [foreground, centre
    /// distance, boundary distance], cremi [boundaries].
    #[arg(long)]
    pred: PathBuf,
    /// livecell-boundaries, livecell-distances or cremi.
    #[arg(long)]
    setting: TargetSetting,
    /// Output u32 label TIFF.
    #[arg(long)]
    out: PathBuf,
    /// Objects under this many pixels are removed [default: 50].
    #[arg(long)]
    min_size: Option<usize>,
    /// Boundary recipes: seeds where foreground − boundaries exceeds this [default: 0.5].
    #[arg(long)]
    seed_threshold: Option<f32>,
    /// Foreground mask threshold [default: 0.5].
    #[arg(long)]
    foreground_threshold: Option<f32>,
    /// Distance recipe: seeds where the centre distance is below this [default: 0.5].
    #[arg(long)]
    center_threshold: Option<f32>,
    /// Distance recipe: seeds where the boundary distance is below this [default: 0.6].
    #[arg(long)]
    boundary_threshold: Option<f32>,
    /// Distance recipe: σ of the smoothing of both distance maps [default: 1.0].
    #[arg(long)]
    sigma: Option<f64>,
    /// Flooding order: classic (scikit-image <= 0.24, the paper's) or monotone (>= 0.25.2).
    #[arg(long, default_value = "classic")]
    flooding: String,
    /// Order of equal-height markers: scikit-image (bit-exact) or raster (faster).
    #[arg(long, default_value = "scikit-image")]
    marker_order: String,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let pred = read_tiff(&args.pred)?.into_f32();
    let channels = stack_channels(pred, args.setting).with_context(|| {
        format!(
            "{}: not a {} prediction stack",
            args.pred.display(),
            args.setting
        )
    })?;
    let watershed = WatershedOptions {
        flooding: match args.flooding.as_str() {
            "classic" => Flooding::Classic,
            "monotone" => Flooding::Monotone,
            other => bail!("--flooding {other:?}: expected classic or monotone"),
        },
        marker_order: match args.marker_order.as_str() {
            "scikit-image" => MarkerOrder::ScikitImage,
            "raster" => MarkerOrder::Raster,
            other => bail!("--marker-order {other:?}: expected scikit-image or raster"),
        },
        ..Default::default()
    };
    let seg = match args.setting {
        TargetSetting::LivecellBoundaries | TargetSetting::Cremi => {
            let defaults = BoundaryRecipe::default();
            let recipe = BoundaryRecipe {
                seed_threshold: args.seed_threshold.unwrap_or(defaults.seed_threshold),
                foreground_threshold: args
                    .foreground_threshold
                    .unwrap_or(defaults.foreground_threshold),
                min_size: args.min_size.unwrap_or(defaults.min_size),
                watershed,
            };
            if args.setting == TargetSetting::Cremi {
                watershed_from_boundaries(channels[0].view(), None, &recipe)
            } else {
                watershed_from_boundaries(channels[1].view(), Some(channels[0].view()), &recipe)
            }
        }
        TargetSetting::LivecellDistances => {
            let defaults = DistanceRecipe::default();
            let recipe = DistanceRecipe {
                center_threshold: args.center_threshold.unwrap_or(defaults.center_threshold),
                boundary_threshold: args
                    .boundary_threshold
                    .unwrap_or(defaults.boundary_threshold),
                foreground_threshold: args
                    .foreground_threshold
                    .unwrap_or(defaults.foreground_threshold),
                smoothing: args.sigma.unwrap_or(defaults.smoothing),
                min_size: args.min_size.unwrap_or(defaults.min_size),
                watershed,
            };
            watershed_from_distances(
                channels[1].view(),
                channels[2].view(),
                channels[0].view(),
                &recipe,
            )
        }
    }
    .with_context(|| format!("{}: post-processing", args.pred.display()))?;
    write_tiff(&args.out, seg.view(), &WriteOptions::default())?;
    let n = seg.iter().copied().max().unwrap_or(0);
    println!(
        "{}: {} objects ({}) -> {}",
        args.pred.display(),
        n,
        args.setting,
        args.out.display()
    );
    Ok(())
}

/// The 2-D channel images of a prediction stack: `(C, H, W)`, or `(H, W)` for one channel.
fn stack_channels(
    pred: ArrayD<f32>,
    setting: TargetSetting,
) -> anyhow::Result<Vec<ndarray::Array2<f32>>> {
    let expected = setting.channels();
    let stack = match pred.ndim() {
        2 => pred.insert_axis(Axis(0)),
        3 => pred,
        _ => bail!(
            "expected a 2-D image or a (channels, height, width) stack, found shape {:?}",
            pred.shape()
        ),
    };
    if stack.shape()[0] != expected.len() {
        bail!(
            "expected {} channel(s) [{}], found {} (shape {:?})",
            expected.len(),
            expected.join(", "),
            stack.shape()[0],
            stack.shape()
        );
    }
    stack
        .outer_iter()
        .map(|c| Ok(c.to_owned().into_dimensionality::<Ix2>()?))
        .collect()
}

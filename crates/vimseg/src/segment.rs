use std::path::PathBuf;

use anyhow::{bail, Context};
use ndarray::{Axis, Ix3};
use seg_io::tiff::{read_tiff, write_tiff, WriteOptions};
use seg_pipeline::{segment, Recipes};
use seg_targets::TargetSetting;
use watershed::{Flooding, MarkerOrder, WatershedOptions};

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
    /// --pred is a semantic class map as nnU-Net / U-Mamba write them (0 background, 1
    /// foreground, 2 boundary; CREMI: 1 boundary), turned into the setting's maps as the paper
    /// scored those baselines; a float (classes, height, width) stack of probabilities (nnU-Net's
    /// softmax output) is taken by its most probable class.
    #[arg(long)]
    class_map: bool,
    /// Output u32 label TIFF.
    #[arg(long)]
    out: PathBuf,
    /// Objects under this many pixels are removed [default: 50].
    #[arg(long)]
    min_size: Option<usize>,
    /// Boundary recipes: seeds where foreground − boundaries exceeds this [default: 0.5].
    #[arg(long, value_parser = crate::args::threshold, allow_negative_numbers = true)]
    seed_threshold: Option<f32>,
    /// Foreground mask threshold [default: 0.5].
    #[arg(long, value_parser = crate::args::threshold, allow_negative_numbers = true)]
    foreground_threshold: Option<f32>,
    /// Distance recipe: seeds where the centre distance is below this [default: 0.5].
    #[arg(long, value_parser = crate::args::threshold, allow_negative_numbers = true)]
    center_threshold: Option<f32>,
    /// Distance recipe: seeds where the boundary distance is below this [default: 0.6].
    #[arg(long, value_parser = crate::args::threshold, allow_negative_numbers = true)]
    boundary_threshold: Option<f32>,
    /// Distance recipe: σ of the smoothing of both distance maps [default: 1.0].
    #[arg(long, value_parser = crate::args::finite, allow_negative_numbers = true)]
    sigma: Option<f64>,
    /// Flooding order: classic (scikit-image <= 0.24, the paper's) or monotone (>= 0.25.2).
    #[arg(long, default_value = "classic")]
    flooding: String,
    /// Order of equal-height markers: scikit-image (bit-exact) or raster (faster).
    #[arg(long, default_value = "scikit-image")]
    marker_order: String,
    /// A Zarr prediction (--pred a folder, e.g. `predict --out pred.ome.zarr`): the block side,
    /// segmented slice by slice into --out (a path ending in .zarr) with ids stitched across
    /// blocks (docs/volumes.md).
    #[arg(long, default_value_t = 1024, value_parser = crate::args::at_least_one)]
    block: usize,
    /// A Zarr prediction: the halo around each block (for exact stitching at least the largest
    /// object's size).
    #[arg(long, default_value_t = 64)]
    halo: usize,
    /// A Zarr prediction: write each block's chunk of the labels as a shard of N×N subchunks
    /// (one file per block; viewers read subchunks). N must divide the block.
    #[arg(long, value_name = "N", value_parser = crate::args::at_least_one)]
    subchunk: Option<usize>,
    /// A Zarr prediction: the format, 3 (Zarr v3, OME-Zarr 0.5) or 2 (Zarr v2, OME-Zarr 0.4, for
    /// readers that do not know v3 yet).
    #[arg(long, value_name = "2|3", default_value = "3")]
    zarr_format: seg_io::volume::ZarrFormat,
    /// A Zarr prediction: the labels' type, auto (u32, or u64 when there are more objects than
    /// u32 ids name) or u64 (as CREMI's ground truth stores its ids).
    #[arg(long, default_value = "auto", value_parser = ["auto", "u64"])]
    labels: String,
    /// A Zarr prediction, cremi: segment in 3-D, in blocks of N slices (× --block²) with the
    /// 3-D seeded watershed, stitched across all block faces (default: slice by slice in 2-D,
    /// as the paper scores CREMI).
    #[arg(long, value_name = "N", value_parser = crate::args::at_least_one)]
    block_z: Option<usize>,
    /// With --block-z: the halo in slices above and below each block.
    #[arg(long, value_name = "N", default_value_t = 0, requires = "block_z")]
    halo_z: usize,
    #[command(flatten)]
    job: crate::job::JobArgs,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    seg_io::atomic::check_output(&args.out, &[&args.pred])?;
    let recipes = recipes(args)?;
    if args.pred.is_dir() {
        return blockwise(args, &recipes);
    }
    if args.job.any() || args.subchunk.is_some() || args.zarr_format != Default::default() {
        bail!(
            "{}: --plan, --task, --subchunk and --zarr-format segment a Zarr prediction block by block; this is \
             a TIFF",
            args.pred.display()
        );
    }
    let pred = if args.class_map {
        let classes = seg_pipeline::baselines::read_class_map(&args.pred)?;
        seg_pipeline::class_map_prediction(classes.view(), args.setting)
            .with_context(|| args.pred.display().to_string())?
            .into_dyn()
    } else {
        read_tiff(&args.pred)?.into_f32()
    };
    let stack = match pred.ndim() {
        2 => pred.insert_axis(Axis(0)),
        3 => pred,
        _ => bail!(
            "{}: expected a 2-D image or a (channels, height, width) stack, found shape {:?}",
            args.pred.display(),
            pred.shape()
        ),
    }
    .into_dimensionality::<Ix3>()?;
    let seg = segment(stack.view(), args.setting, &recipes)
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

/// A Zarr prediction (c, z, y, x), segmented block by block into an OME-Zarr group.
fn blockwise(args: &Args, recipes: &Recipes) -> anyhow::Result<()> {
    if args.class_map {
        bail!("--class-map takes a TIFF class map, not a Zarr prediction");
    }
    if !args
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("zarr"))
    {
        bail!(
            "{}: a Zarr prediction is segmented block by block into a Zarr output: give --out a \
             path ending in .zarr",
            args.pred.display()
        );
    }
    let pred = seg_io::volume::open_array(&args.pred)?;
    let mut opts = seg_pipeline::blockwise::SegmentOptions::default();
    opts.block = args.block;
    opts.halo = args.halo;
    opts.progress = true;
    opts.subchunk = args.subchunk;
    opts.format = args.zarr_format;
    opts.block_z = args.block_z;
    opts.halo_z = args.halo_z;
    if args.labels == "u64" {
        opts.labels = seg_pipeline::blockwise::LabelWidth::U64;
    }
    use seg_pipeline::blockwise::{plan_segment, segment_task, segment_zarr};
    match args.job.step(&args.out)? {
        crate::job::Step::Plan(p) => {
            let plan = plan_segment(&pred, args.setting, recipes, &args.out, &opts, &p)?;
            crate::job::print_plan(&args.out, &plan);
        }
        crate::job::Step::Task(task) => {
            let s = segment_task(&pred, args.setting, recipes, &args.out, &opts, task)?;
            crate::job::report(&args.out, &s)?;
        }
        crate::job::Step::Whole => {
            let s = segment_zarr(&pred, args.setting, recipes, &args.out, &opts)?;
            println!(
                "{}: {} blocks of {z}{b}×{b} ({} done before, {}) -> {} in {:.0} s",
                pred.path().display(),
                s.blocks,
                s.already_done,
                args.setting,
                s.array.display(),
                s.seconds,
                b = opts.block,
                z = opts.block_z.map(|z| format!("{z}×")).unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// The setting's recipes with the options given; options of the other recipe are refused.
fn recipes(args: &Args) -> anyhow::Result<Recipes> {
    let watershed = {
        let mut opts = WatershedOptions::default();
        opts.flooding = match args.flooding.as_str() {
            "classic" => Flooding::Classic,
            "monotone" => Flooding::Monotone,
            other => bail!("--flooding {other:?}: expected classic or monotone"),
        };
        opts.marker_order = match args.marker_order.as_str() {
            "scikit-image" => MarkerOrder::ScikitImage,
            "raster" => MarkerOrder::Raster,
            other => bail!("--marker-order {other:?}: expected scikit-image or raster"),
        };
        opts
    };
    // Options of the other recipe would be silently ignored: refuse them instead.
    let distances = args.setting == TargetSetting::LivecellDistances;
    for (given, name, applies) in [
        (
            args.seed_threshold.is_some(),
            "--seed-threshold",
            !distances,
        ),
        (
            args.center_threshold.is_some(),
            "--center-threshold",
            distances,
        ),
        (
            args.boundary_threshold.is_some(),
            "--boundary-threshold",
            distances,
        ),
        (args.sigma.is_some(), "--sigma", distances),
    ] {
        if given && !applies {
            bail!(
                "{name} does not apply to the {} setting's recipe (see vimseg segment --help)",
                args.setting
            );
        }
    }
    let mut recipes = Recipes::default();
    let b = &mut recipes.boundaries;
    b.seed_threshold = args.seed_threshold.unwrap_or(b.seed_threshold);
    b.foreground_threshold = args.foreground_threshold.unwrap_or(b.foreground_threshold);
    b.min_size = args.min_size.unwrap_or(b.min_size);
    b.watershed = watershed;
    let d = &mut recipes.distances;
    d.center_threshold = args.center_threshold.unwrap_or(d.center_threshold);
    d.boundary_threshold = args.boundary_threshold.unwrap_or(d.boundary_threshold);
    d.foreground_threshold = args.foreground_threshold.unwrap_or(d.foreground_threshold);
    d.smoothing = args.sigma.unwrap_or(d.smoothing);
    d.min_size = args.min_size.unwrap_or(d.min_size);
    d.watershed = watershed;
    Ok(recipes)
}

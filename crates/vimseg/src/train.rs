//! `vimseg train` and `vimseg predict` on a user's own data.

use std::path::PathBuf;

use anyhow::bail;
use seg_io::tiff::{write_tiff, WriteOptions};
use seg_pipeline::predict::{predict_stack, read_stack, StackPrediction};
use seg_targets::TargetSetting;
use seg_train::train::min_instances;
use seg_train::{Start, StopAfter, TileOptions, TrainData, TrainOptions};
use vim_nets::{Canvas, Model, ModelConfig, ModelKind, PresetOptions};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// unet, unetr-b, unetr-l, unetr-h, vim-unet-t or vim-unet-s.
    #[arg(long)]
    model: ModelKind,
    /// cremi, livecell-boundaries or livecell-distances (targets, loss, output channels).
    #[arg(long)]
    setting: TargetSetting,
    /// A folder of CREMI-layout HDF5 files (split per volume 60/20/20 % in z), a LIVECell root
    /// (with train.json), or a folder with train/{images,labels} and val/{images,labels} TIFFs
    /// paired by file name.
    #[arg(long)]
    data: PathBuf,
    /// The run folder (checkpoints `best/`, `latest/`, `validation.jsonl`).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 100_000, value_parser = crate::args::at_least_one)]
    iterations: usize,
    #[arg(long, default_value_t = 512, value_parser = crate::args::at_least_one)]
    patch: usize,
    #[arg(long, default_value_t = 2, value_parser = crate::args::at_least_one)]
    batch: usize,
    #[arg(long, default_value_t = 1e-4, value_parser = crate::args::positive, allow_negative_numbers = true)]
    lr: f64,
    /// UNet / decoder initial features (the paper: 64).
    #[arg(long, default_value_t = 64, value_parser = crate::args::at_least_one)]
    features: usize,
    /// ViT/ViM canvas: paper (1024²) or native (the patch size).
    #[arg(long, default_value = "paper")]
    canvas: String,
    /// Iterations per epoch (validation and checkpoints after each); default one pass.
    #[arg(long, value_parser = crate::args::at_least_one)]
    epoch_length: Option<usize>,
    /// Validation batches per epoch; default the whole validation split.
    #[arg(long, value_parser = crate::args::at_least_one)]
    val_batches: Option<usize>,
    #[command(flatten)]
    run: crate::RunArgs,
    /// Continue the run in --out exactly from its latest checkpoint (refused when the options
    /// or data differ from the run's, except --iterations).
    #[arg(long, conflicts_with = "restart")]
    resume: bool,
    /// With --resume: continue even when options or data differ (the new ones apply from here).
    #[arg(long, requires = "resume")]
    resume_anyway: bool,
    /// Move a run already in --out aside (to OUT.previous-N) and start a new one.
    #[arg(long)]
    restart: bool,
}

pub fn train(args: &TrainArgs) -> anyhow::Result<()> {
    let canvas = match args.canvas.as_str() {
        "paper" => Canvas::Paper,
        "native" => Canvas::Native(args.patch.div_ceil(16) * 16),
        other => bail!("--canvas {other:?}: expected paper or native"),
    };
    let config = ModelConfig::preset(args.model, seg_pipeline::out_channels(args.setting), &{
        let mut opts = PresetOptions::default();
        opts.canvas = canvas;
        opts.features = args.features;
        opts
    });
    let device = seg_train::device(&args.run.device)?;
    let sources = seg_pipeline::datasets::training_sources(&args.data)?;
    let description = sources.description;
    let data = TrainData::for_setting(args.setting, sources.train, sources.val, description);
    let options = {
        let mut opts = TrainOptions::default();
        opts.iterations = args.iterations;
        opts.batch_size = args.batch;
        opts.patch = (args.patch, args.patch);
        opts.lr = args.lr;
        opts.seed = args.run.seed;
        opts.epoch_length = args.epoch_length;
        opts.val_batches = args.val_batches;
        opts.min_instances = min_instances(args.setting);
        opts.precision = args.run.precision;
        opts.checkpoint_activations = args.run.checkpoint_activations;
        opts
    };
    let model = Model::new(config, &device, args.run.seed)?;
    println!(
        "training {} ({} parameters) for {} on {} → {}",
        args.model.name(),
        seg_pipeline::system::group_digits(model.parameter_count()),
        args.setting,
        args.data.display(),
        args.out.display()
    );
    if args.restart {
        if let Some(old) = seg_train::run::set_aside(&args.out)? {
            println!(
                "the run in {} moved to {}",
                args.out.display(),
                old.display()
            );
        }
    }
    let start = match (args.resume, args.resume_anyway) {
        (true, true) => Start::ResumeAnyway,
        (true, false) => Start::Resume,
        _ => Start::New,
    };
    let s = seg_train::train(&model, &data, &options, &args.out, start, StopAfter(None)).map_err(
        |e| {
            let hint = match &e {
                seg_train::Error::ExistingRun { .. } => {
                    "--resume continues it; --restart moves it aside and starts a new run"
                }
                seg_train::Error::CannotResume { .. } => {
                    "--restart moves the folder aside and starts a new run"
                }
                seg_train::Error::ResumeMismatch { .. } => {
                    "--resume-anyway continues under the new options"
                }
                _ => return anyhow::Error::new(e),
            };
            anyhow::anyhow!("{e}\n  hint: {hint}")
        },
    )?;
    println!(
        "done: {} iterations, {} epochs, best validation loss {:.4} ({:.0} s); checkpoints in {}",
        s.iterations,
        s.epochs,
        s.best_val_loss,
        s.seconds,
        args.out.display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct PredictArgs {
    /// A checkpoint folder (e.g. run/best), or a torch-em checkpoint file (best.pt; UNet2d, UNETR
    /// with a SAM encoder and ViM-UNet T/S, rebuilt from its init record; no Python needed).
    #[arg(long)]
    checkpoint: PathBuf,
    /// A 2-D image or a 3-D stack (slices predicted one by one): TIFF, or HDF5 (`.h5`, `.hdf5`,
    /// `.hdf`; a 3-D u8 dataset chosen with --key).
    #[arg(long)]
    input: PathBuf,
    /// The HDF5 dataset to read (CREMI layout by default).
    #[arg(long, default_value = "volumes/raw")]
    key: String,
    /// The slices (HDF5) or pages (TIFF, blockwise into Zarr) to predict, START:END (default:
    /// all).
    #[arg(long)]
    slices: Option<String>,
    /// Float32 TIFF, channels first (a stack: slice-major, then channel); or a path ending in
    /// .zarr: an OME-Zarr group predicted block by block (array `0`, (c, z, y, x), one chunk per
    /// block; an interrupted run resumes), the way for inputs larger than memory. An --input
    /// folder is read as Zarr (an array, or an OME-Zarr group's first dataset) box by box.
    #[arg(long)]
    out: PathBuf,
    /// Tile size: predict in tiles with a halo (default: the whole image at once; blockwise
    /// into Zarr: the block, default 512).
    #[arg(long, value_parser = crate::args::at_least_one)]
    tile: Option<usize>,
    #[arg(long, default_value_t = 128)]
    halo: usize,
    /// Zarr output: write each block's chunk as a shard of N×N subchunks (one file per block;
    /// viewers read subchunks). N must divide the block.
    #[arg(long, value_name = "N", value_parser = crate::args::at_least_one)]
    subchunk: Option<usize>,
    /// Zarr output: the format, 3 (Zarr v3, OME-Zarr 0.5) or 2 (Zarr v2, OME-Zarr 0.4, for
    /// readers that do not know v3 yet).
    #[arg(long, value_name = "2|3", default_value = "3")]
    zarr_format: seg_io::volume::ZarrFormat,
    /// Do not standardise each input (image or tile) before predicting.
    #[arg(long)]
    no_standardize: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute precision: f32, or bf16 mixed precision (meant for CUDA; see docs/gpu.md).
    #[arg(long, default_value = "f32")]
    precision: seg_train::Precision,
    /// Predict in training mode (stochastic depth, BatchNorm batch statistics), as the paper's
    /// ViM-UNet numbers were computed; for fidelity checks only.
    #[arg(long)]
    train_mode: bool,
    #[command(flatten)]
    job: crate::job::JobArgs,
}

/// `START:END` of `--slices`.
fn parse_slices(text: &str) -> anyhow::Result<std::ops::Range<usize>> {
    let parsed = text
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
    match parsed {
        Some((a, b)) if a < b => Ok(a..b),
        _ => bail!("--slices {text:?}: expected START:END with START < END"),
    }
}

pub fn predict(args: &PredictArgs) -> anyhow::Result<()> {
    seg_io::atomic::check_output(&args.out, &[&args.input, &args.checkpoint])?;
    let device = seg_train::device(&args.device)?;
    let (loaded, source) = seg_pipeline::bioimageio::load_for_inference(&args.checkpoint, &device)?;
    let standardize = match loaded.standardize {
        Some(true) if args.no_standardize => bail!(
            "{}: the package standardises its input (zero_mean_unit_variance); \
             --no-standardize would not run it as it describes",
            args.checkpoint.display()
        ),
        Some(declared) => declared,
        None => !args.no_standardize,
    };
    let model = loaded.model;
    let _precision = args.precision.enter()?;
    let slices = args.slices.as_deref().map(parse_slices).transpose()?;
    let is_zarr = |p: &std::path::Path| {
        p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("zarr"))
    };
    if is_zarr(&args.out) || args.input.is_dir() {
        if !is_zarr(&args.out) {
            bail!(
                "{}: a Zarr input is predicted blockwise into a Zarr output: give --out a path \
                 ending in .zarr",
                args.input.display()
            );
        }
        let volume: Box<dyn seg_io::volume::VolumeSource> = if args.input.is_dir() {
            Box::new(seg_io::volume::open_image(&args.input)?)
        } else if seg_pipeline::predict::is_hdf5(&args.input) {
            // One slice at a time: the volume is never read whole.
            Box::new(seg_pipeline::predict::Hdf5Slices::open(
                &args.input,
                &args.key,
                slices,
            )?)
        } else {
            // Strips or tiles as each block needs them: the stack is never read whole.
            Box::new(seg_io::tiff::TiffStack::open(&args.input, slices)?)
        };
        let mut opts = seg_pipeline::blockwise::BlockwiseOptions::default();
        if let Some(t) = args.tile {
            opts.block = t;
        }
        opts.halo = args.halo;
        opts.standardize = standardize;
        opts.train_mode = args.train_mode;
        opts.progress = true;
        opts.model = format!("{} ({source})", args.checkpoint.display());
        opts.subchunk = args.subchunk;
        opts.format = args.zarr_format;
        let input = volume.as_ref();
        use seg_pipeline::blockwise::{plan_predict, predict_task, predict_to_zarr};
        match args.job.step(&args.out)? {
            crate::job::Step::Plan(p) => {
                let plan = plan_predict(&model, input, &args.out, &opts, &p)?;
                crate::job::print_plan(&args.out, &plan);
            }
            crate::job::Step::Task(task) => {
                let s = predict_task(&model, input, &args.out, &opts, task)?;
                crate::job::report(&args.out, &s)?;
            }
            crate::job::Step::Whole => {
                let s = predict_to_zarr(&model, input, &args.out, &opts)?;
                println!(
                    "{}: {} blocks of {b}×{b} ({} done before) from {source} → {} in {:.0} s",
                    args.input.display(),
                    s.blocks,
                    s.already_done,
                    s.array.display(),
                    s.seconds,
                    b = opts.block
                );
            }
        }
        return Ok(());
    }
    if args.job.any() || args.subchunk.is_some() || args.zarr_format != Default::default() {
        bail!(
            "{}: --plan, --task, --subchunk and --zarr-format are for a blockwise prediction into Zarr: give \
             --out a path ending in .zarr",
            args.out.display()
        );
    }
    let stack = read_stack(&args.input, &args.key, slices)?;
    let mut how = StackPrediction::default();
    how.tiles = args.tile.map(|t| {
        let mut opts = TileOptions::default();
        opts.block = (t, t);
        opts.halo = (args.halo, args.halo);
        opts.standardize = standardize;
        opts.progress = true;
        opts.train_mode = args.train_mode;
        opts
    });
    how.standardize = standardize;
    how.train_mode = args.train_mode;
    let all = predict_stack(&model, stack.view(), &how)?;
    let (z, h, w) = stack.dim();
    let c = all.dim().0 / z;
    write_tiff(&args.out, all.view(), &WriteOptions::default())?;
    println!(
        "{}: {z} slice(s) × {c} channel(s) of {h}×{w} from {source} → {}",
        args.input.display(),
        args.out.display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// A checkpoint folder (e.g. run/best) or a torch-em checkpoint file (best.pt).
    #[arg(long)]
    checkpoint: PathBuf,
    /// A folder: model.safetensors (torch-em's names) and config.json, which
    /// `vim_nets::Model::load_exported` and `vimseg predict --checkpoint` read. A path ending
    /// in .zip: a bioimage.io model package (format 0.5; UNet, UNETR, and the ViM-UNet of
    /// torch-em's get_vimunet_model).
    #[arg(long)]
    out: PathBuf,
    /// Package: an author (repeat for several; at least one).
    #[arg(long = "author")]
    authors: Vec<String>,
    /// Package: a maintainer's GitHub user name (repeat for several; the bioimage.io model zoo
    /// asks for one).
    #[arg(long = "maintainer")]
    maintainers: Vec<String>,
    /// Package: the model's name.
    #[arg(long)]
    name: Option<String>,
    /// Package: a one-paragraph description.
    #[arg(long)]
    description: Option<String>,
    /// Package: the licence (SPDX identifier).
    #[arg(long, default_value = "CC-BY-4.0")]
    license: String,
    /// Package: the setting the model was trained for (names the output channels).
    #[arg(long)]
    setting: Option<TargetSetting>,
    /// Package: the test input, a 2-D grey TIFF whose sides are multiples of the model's size
    /// multiple (default: a synthetic 256×256 EM image).
    #[arg(long)]
    test_image: Option<PathBuf>,
}

pub fn export(args: &ExportArgs) -> anyhow::Result<()> {
    let mut inputs = vec![args.checkpoint.as_path()];
    inputs.extend(args.test_image.as_deref());
    seg_io::atomic::check_output(&args.out, &inputs)?;
    let device = seg_train::device("cpu")?;
    let (model, source) = seg_pipeline::bioimageio::load_for_inference(&args.checkpoint, &device)?;
    let package = args
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("zip"));
    if !package {
        if !args.authors.is_empty()
            || !args.maintainers.is_empty()
            || args.name.is_some()
            || args.test_image.is_some()
        {
            bail!(
                "--author, --maintainer, --name and --test-image describe a bioimage.io package: \
                 give --out a path ending in .zip"
            );
        }
        model.model.export(&args.out)?;
        println!(
            "{source} → {} ({}, {})",
            args.out.display(),
            vim_nets::EXPORTED_WEIGHTS,
            vim_nets::EXPORTED_CONFIG
        );
        return Ok(());
    }
    let image = match &args.test_image {
        Some(path) => {
            seg_pipeline::predict::read_stack(path, "", None)?.index_axis_move(ndarray::Axis(0), 0)
        }
        None => seg_pipeline::bioimageio::default_test_image(),
    };
    let mut opts = seg_pipeline::bioimageio::PackageOptions::default();
    opts.authors = args.authors.clone();
    opts.maintainers = args.maintainers.clone();
    opts.license = args.license.clone();
    opts.source = source.clone();
    if let Some(n) = &args.name {
        opts.name = n.clone();
    }
    if let Some(d) = &args.description {
        opts.description = d.clone();
    }
    opts.channel_names = args
        .setting
        .map(|s| s.channels().iter().map(|c| c.to_string()).collect());
    seg_pipeline::bioimageio::export_package(&model.model, &args.out, image.view(), &opts)?;
    // Read back as a user of the package would, and run its test input.
    let difference = seg_pipeline::bioimageio::test_package(&args.out, &device)?;
    anyhow::ensure!(
        difference == 0.0,
        "{}: the package read back gives its test output only within {difference}",
        args.out.display()
    );
    println!(
        "{source} → {} (bioimage.io model package, format {}; read back, its test output \
         reproduced exactly)",
        args.out.display(),
        seg_pipeline::bioimageio::FORMAT_VERSION
    );
    Ok(())
}

//! `cargo xtask train` and `cargo xtask predict` on a user's own data.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use ndarray::{Array3, Axis, Ix2, Ix3};
use seg_data::cremi::{read_cremi, CremiSplit};
use seg_data::livecell::{LivecellDataset, LivecellOptions, Split};
use seg_data::sampling::{ImageFiles, ImageSource, VolumeSlices};
use seg_io::tiff::{read_tiff, write_tiff, WriteOptions};
use seg_targets::TargetSetting;
use seg_train::train::{setting_loss, target_transform};
use seg_train::{checkpoint, predict_tiled, StopAfter, TileOptions, TrainData, TrainOptions};
use serde_json::json;
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
    #[arg(long, default_value_t = 100_000)]
    iterations: usize,
    #[arg(long, default_value_t = 512)]
    patch: usize,
    #[arg(long, default_value_t = 2)]
    batch: usize,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// UNet / decoder initial features (the paper: 64).
    #[arg(long, default_value_t = 64)]
    features: usize,
    /// ViT/ViM canvas: paper (1024²) or native (the patch size).
    #[arg(long, default_value = "paper")]
    canvas: String,
    /// Iterations per epoch (validation and checkpoints after each); default one pass.
    #[arg(long)]
    epoch_length: Option<usize>,
    /// Validation batches per epoch; default the whole validation split.
    #[arg(long)]
    val_batches: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute precision: f32, or bf16 mixed precision (meant for CUDA; see docs/gpu.md).
    #[arg(long, default_value = "f32")]
    precision: seg_train::Precision,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    resume: bool,
}

fn tiff_pairs(dir: &Path) -> anyhow::Result<ImageFiles> {
    let (images, labels) = (dir.join("images"), dir.join("labels"));
    let mut pairs = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(&images)
        .with_context(|| format!("{}: cannot list", images.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "tif" || e == "tiff"))
        .collect();
    names.sort();
    for image in names {
        let label = labels.join(image.file_name().expect("a file"));
        if !label.exists() {
            bail!("{}: no label image {}", image.display(), label.display());
        }
        pairs.push((image, label));
    }
    if pairs.is_empty() {
        bail!("{}: no TIFF images", images.display());
    }
    Ok(ImageFiles::new(pairs)?)
}

type Sources = (
    Arc<dyn ImageSource>,
    Arc<dyn ImageSource>,
    serde_json::Value,
);

/// Train and validation sources from any of the three layouts.
pub fn open_sources(data: &Path) -> anyhow::Result<Sources> {
    if data.join("train.json").exists() {
        let files = |split| -> anyhow::Result<ImageFiles> {
            let ds = LivecellDataset::open(data, split, &LivecellOptions::default())?;
            Ok(ImageFiles::new(
                ds.samples
                    .iter()
                    .map(|s| (s.image.clone(), s.labels.clone()))
                    .collect(),
            )?)
        };
        return Ok((
            Arc::new(files(Split::Train)?),
            Arc::new(files(Split::Val)?),
            json!({"layout": "livecell", "dir": data.display().to_string()}),
        ));
    }
    if data.join("train").join("images").is_dir() {
        return Ok((
            Arc::new(tiff_pairs(&data.join("train"))?),
            Arc::new(tiff_pairs(&data.join("val"))?),
            json!({"layout": "tiff-pairs", "dir": data.display().to_string()}),
        ));
    }
    let mut h5: Vec<PathBuf> = std::fs::read_dir(data)
        .with_context(|| format!("{}: cannot list", data.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "h5" || e == "hdf" || e == "hdf5")
        })
        .collect();
    h5.sort();
    if h5.is_empty() {
        bail!(
            "{}: no train.json (LIVECell), train/images (TIFF pairs) or .h5 volumes (CREMI layout)",
            data.display()
        );
    }
    let read = |split| -> anyhow::Result<Vec<_>> {
        h5.iter()
            .map(|f| read_cremi(f, split).with_context(|| format!("{}", f.display())))
            .collect()
    };
    Ok((
        Arc::new(VolumeSlices::new(read(CremiSplit::Train)?)),
        Arc::new(VolumeSlices::new(read(CremiSplit::Val)?)),
        json!({"layout": "cremi", "files": h5.iter().map(|p| p.display().to_string()).collect::<Vec<_>>()}),
    ))
}

pub fn train(args: &TrainArgs) -> anyhow::Result<()> {
    let canvas = match args.canvas.as_str() {
        "paper" => Canvas::Paper,
        "native" => Canvas::Native(args.patch.div_ceil(16) * 16),
        other => bail!("--canvas {other:?}: expected paper or native"),
    };
    let channels = match args.setting {
        TargetSetting::Cremi => 1,
        TargetSetting::LivecellBoundaries => 2,
        TargetSetting::LivecellDistances => 3,
    };
    let config = ModelConfig::preset(
        args.model,
        channels,
        &PresetOptions {
            canvas,
            features: args.features,
            ..PresetOptions::default()
        },
    );
    let device = seg_train::device(&args.device)?;
    let (train, val, description) = open_sources(&args.data)?;
    let data = TrainData {
        train,
        val,
        transform: target_transform(args.setting),
        loss: setting_loss(args.setting),
        description: json!({"setting": args.setting.to_string(), "data": description}),
    };
    let options = TrainOptions {
        iterations: args.iterations,
        batch_size: args.batch,
        patch: (args.patch, args.patch),
        lr: args.lr,
        seed: args.seed,
        epoch_length: args.epoch_length,
        val_batches: args.val_batches,
        min_instances: (args.setting == TargetSetting::Cremi).then_some(2),
        precision: args.precision,
        ..TrainOptions::default()
    };
    let model = Model::new(config, &device, args.seed)?;
    println!(
        "training {} ({} parameters) for {} on {} → {}",
        args.model.name(),
        crate::models::group(model.parameter_count()),
        args.setting,
        args.data.display(),
        args.out.display()
    );
    let s = seg_train::train(
        &model,
        &data,
        &options,
        &args.out,
        args.resume,
        StopAfter(None),
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
    /// A checkpoint folder (e.g. run/best).
    #[arg(long)]
    checkpoint: PathBuf,
    /// A 2-D image or a 3-D stack (slices predicted one by one): TIFF, or HDF5 (`.h5`, `.hdf5`,
    /// `.hdf`; a 3-D u8 dataset chosen with --key).
    #[arg(long)]
    input: PathBuf,
    /// The HDF5 dataset to read (CREMI layout by default).
    #[arg(long, default_value = "volumes/raw")]
    key: String,
    /// HDF5 only: the slices to predict, START:END (default: all).
    #[arg(long)]
    slices: Option<String>,
    /// Float32 TIFF, channels first (a stack: slice-major, then channel).
    #[arg(long)]
    out: PathBuf,
    /// Tile size: predict in tiles with a halo (default: the whole image at once).
    #[arg(long)]
    tile: Option<usize>,
    #[arg(long, default_value_t = 128)]
    halo: usize,
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
}

/// The input image or stack as f32: TIFF, or a 3-D u8 HDF5 dataset.
fn read_input(args: &PredictArgs) -> anyhow::Result<ndarray::ArrayD<f32>> {
    let ext = args
        .input
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if !matches!(ext.as_str(), "h5" | "hdf5" | "hdf") {
        if args.slices.is_some() {
            bail!("--slices applies to HDF5 input only");
        }
        return Ok(read_tiff(&args.input)?.into_f32());
    }
    use seg_io::hdf5::{ElementType, PureHdf5, VolumeSource};
    let file = PureHdf5::open(&args.input)?;
    let shape = file.shape(&args.key)?;
    if shape.len() != 3 {
        bail!(
            "{}: dataset {} has shape {shape:?}; expected a 3-D (z, y, x) volume",
            args.input.display(),
            args.key
        );
    }
    if file.element_type(&args.key)? != ElementType::U8 {
        bail!(
            "{}: dataset {} is {:?}; predict reads 8-bit raw data",
            args.input.display(),
            args.key,
            file.element_type(&args.key)?
        );
    }
    let z = match &args.slices {
        None => 0..shape[0],
        Some(s) => {
            let parsed = s
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
            match parsed {
                Some((a, b)) if a < b && b <= shape[0] => a..b,
                _ => bail!(
                    "--slices {s:?}: expected START:END with START < END <= {}",
                    shape[0]
                ),
            }
        }
    };
    Ok(file.read_u8(&args.key, z)?.mapv(f32::from).into_dyn())
}

pub fn predict(args: &PredictArgs) -> anyhow::Result<()> {
    let device = seg_train::device(&args.device)?;
    let (model, state) = checkpoint::load_model(&args.checkpoint, &device)?;
    let _precision = args.precision.enter()?;
    let image = read_input(args)?;
    let stack: Array3<f32> = match image.ndim() {
        2 => image.into_dimensionality::<Ix2>()?.insert_axis(Axis(0)),
        3 => image.into_dimensionality::<Ix3>()?,
        n => bail!(
            "{}: a {n}-D image; expected 2-D or a 3-D stack",
            args.input.display()
        ),
    };
    let mut outputs = Vec::new();
    for slice in stack.outer_iter() {
        let pred = match args.tile {
            Some(t) => predict_tiled(
                &model,
                slice,
                &TileOptions {
                    block: (t, t),
                    halo: (args.halo, args.halo),
                    standardize: !args.no_standardize,
                    progress: true,
                    train_mode: args.train_mode,
                },
            )?,
            None => {
                let mut x = slice.to_owned();
                if !args.no_standardize {
                    seg_data::sampling::standardize(&mut x);
                }
                seg_train::predict::predict_image_mode(&model, x.view(), args.train_mode)?
            }
        };
        outputs.push(pred);
    }
    let (c, h, w) = outputs[0].dim();
    let views: Vec<_> = outputs.iter().map(|o| o.view()).collect();
    let all = ndarray::concatenate(Axis(0), &views)?;
    write_tiff(&args.out, all.view(), &WriteOptions::default())?;
    println!(
        "{}: {} slice(s) × {c} channel(s) of {h}×{w} from {} (iteration {}) → {}",
        args.input.display(),
        stack.dim().0,
        state.model.name(),
        state.iteration,
        args.out.display()
    );
    Ok(())
}

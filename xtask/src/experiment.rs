//! `cargo xtask experiment cremi|livecell`: the paper's comparison from data to report.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use ndarray::{Array2, Array3, Axis};
use seg_data::cremi::{read_cremi, CremiSplit};
use seg_data::livecell::{LivecellDataset, LivecellOptions, Split};
use seg_data::sampling::{standardize, ImageFiles, ImageSource, VolumeSlices};
use seg_data::synthetic::{
    write_cremi_like, write_livecell_like, CellImageOptions, EmVolumeOptions,
};
use seg_io::tiff::read_tiff;
use seg_targets::TargetSetting;
use seg_train::checkpoint;
use seg_train::train::{setting_loss, target_transform};
use seg_train::{predict_tiled, StopAfter, TileOptions, TrainData, TrainOptions};
use serde_json::json;
use vim_nets::{Canvas, Model, ModelConfig, ModelKind, PresetOptions};

use crate::report;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataset {
    Cremi,
    Livecell,
}

impl Dataset {
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Cremi => "cremi",
            Dataset::Livecell => "livecell",
        }
    }
    pub fn settings(self) -> Vec<TargetSetting> {
        match self {
            Dataset::Cremi => vec![TargetSetting::Cremi],
            Dataset::Livecell => vec![
                TargetSetting::LivecellBoundaries,
                TargetSetting::LivecellDistances,
            ],
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileName {
    Smoke,
    Quick,
    Paper,
}

#[derive(clap::Args)]
pub struct Args {
    /// cremi or livecell.
    #[arg(value_enum)]
    dataset: Dataset,
    /// smoke (CI, < 2 min), quick (a laptop CPU, ~10 min for CREMI) or paper (the paper's
    /// settings, for a GPU and the real data).
    #[arg(long, value_enum, default_value = "quick")]
    profile: ProfileName,
    /// Fetched real data (`cargo xtask data fetch …`); without it the embedded synthetic data.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Models (comma-separated): unet, unetr-b, unetr-l, unetr-h, vim-unet-t, vim-unet-s.
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute precision: f32, or bf16 mixed precision (meant for CUDA; see docs/gpu.md).
    #[arg(long, default_value = "f32")]
    precision: seg_train::Precision,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Results folder.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Retrain models that are already trained.
    #[arg(long)]
    force: bool,
    /// Override the profile's iteration count.
    #[arg(long)]
    iterations: Option<usize>,
    /// Predict ViM-UNet in training mode, as the paper's numbers were computed (fidelity
    /// checks only; see docs/experiments.md).
    #[arg(long)]
    vim_train_mode: bool,
}

/// Everything a profile fixes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Profile {
    pub name: ProfileName,
    pub iterations: usize,
    pub batch_size: usize,
    pub patch: usize,
    pub lr: f64,
    /// UNet initial features and UNETR/ViM decoder features (paper: 64).
    pub features: usize,
    /// ViT/ViM canvas side; None: the paper's 1024².
    pub canvas: Option<usize>,
    pub epoch_length: Option<usize>,
    pub val_batches: Option<usize>,
    pub tile_block: usize,
    pub tile_halo: usize,
    /// Synthetic data: EM volume size (depth, side) and LIVECell-like image counts and size.
    pub em: (usize, usize),
    pub cells: ([usize; 3], usize, usize),
    /// Test images used (None: all).
    pub test_limit: Option<usize>,
    pub models: Vec<ModelKind>,
}

impl Profile {
    pub fn get(name: ProfileName) -> Profile {
        match name {
            ProfileName::Smoke => Profile {
                name,
                iterations: 3,
                batch_size: 2,
                patch: 64,
                lr: 1e-3,
                features: 8,
                canvas: Some(64),
                epoch_length: Some(3),
                val_batches: Some(2),
                tile_block: 48,
                tile_halo: 8,
                em: (10, 96),
                cells: ([2, 1, 1], 96, 128),
                test_limit: Some(1),
                models: vec![ModelKind::UNet, ModelKind::UnetrB, ModelKind::VimUnetT],
            },
            ProfileName::Quick => Profile {
                name,
                iterations: 120,
                batch_size: 2,
                patch: 96,
                lr: 1e-3,
                features: 16,
                canvas: Some(96),
                epoch_length: Some(30),
                val_batches: Some(6),
                tile_block: 64,
                tile_halo: 16,
                em: (20, 192),
                cells: ([16, 4, 4], 160, 208),
                test_limit: None,
                models: vec![ModelKind::UNet, ModelKind::UnetrB, ModelKind::VimUnetT],
            },
            ProfileName::Paper => Profile {
                name,
                iterations: 100_000,
                batch_size: 2,
                patch: 512,
                lr: 1e-4,
                features: 64,
                canvas: None,
                epoch_length: None,
                val_batches: None,
                tile_block: 512,
                tile_halo: 128,
                em: (125, 1250),
                cells: ([64, 16, 16], 520, 704),
                test_limit: None,
                models: vec![
                    ModelKind::UNet,
                    ModelKind::UnetrB,
                    ModelKind::UnetrL,
                    ModelKind::UnetrH,
                    ModelKind::VimUnetT,
                    ModelKind::VimUnetS,
                ],
            },
        }
    }

    pub fn preset_options(&self) -> PresetOptions {
        PresetOptions {
            canvas: self.canvas.map_or(Canvas::Paper, Canvas::Native),
            features: self.features,
            ..PresetOptions::default()
        }
    }
}

/// One test image: standardised raw and ground-truth instance labels.
pub struct TestImage {
    pub name: String,
    pub raw: Array2<f32>,
    pub raw_u8: Array2<u8>,
    pub labels: Array2<u32>,
}

pub(crate) struct Splits {
    pub(crate) train: Arc<dyn ImageSource>,
    pub(crate) val: Arc<dyn ImageSource>,
    pub(crate) test: Vec<TestImage>,
    pub(crate) description: serde_json::Value,
}

fn to_u8(x: &Array2<f32>) -> Array2<u8> {
    let (lo, hi) = x
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let scale = if hi > lo { 255.0 / (hi - lo) } else { 0.0 };
    x.mapv(|v| ((v - lo) * scale).round().clamp(0.0, 255.0) as u8)
}

pub(crate) fn load_cremi(dir: &Path, limit: Option<usize>) -> anyhow::Result<Splits> {
    let files: Vec<PathBuf> = ["A", "B", "C"]
        .iter()
        .map(|s| dir.join(format!("sample{s}.h5")))
        .collect();
    for f in &files {
        if !f.exists() {
            bail!(
                "{}: missing; fetch CREMI with `cargo xtask data fetch cremi --dir {}`",
                f.display(),
                dir.display()
            );
        }
    }
    let read = |split| -> anyhow::Result<Vec<_>> {
        files
            .iter()
            .map(|f| {
                read_cremi(f, split).with_context(|| format!("{}: reading CREMI", f.display()))
            })
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

fn livecell_files(root: &Path, split: Split) -> anyhow::Result<ImageFiles> {
    let ds =
        LivecellDataset::open(root, split, &LivecellOptions::default()).with_context(|| {
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

fn load_livecell(root: &Path, limit: Option<usize>) -> anyhow::Result<Splits> {
    let train = livecell_files(root, Split::Train)?;
    let val = livecell_files(root, Split::Val)?;
    let test = LivecellDataset::open(root, Split::Test, &LivecellOptions::default())?;
    let mut images = Vec::new();
    for s in test.samples.iter().take(limit.unwrap_or(usize::MAX)) {
        let raw = read_tiff(&s.image)?.into_f32();
        let raw = raw
            .into_dimensionality::<ndarray::Ix2>()
            .with_context(|| format!("{}: not a 2-D image", s.image.display()))?;
        let labels = read_tiff(&s.labels)?
            .into_labels()?
            .into_dimensionality::<ndarray::Ix2>()
            .with_context(|| format!("{}: not a 2-D label image", s.labels.display()))?
            .mapv(|v| v as u32);
        let raw_u8 = to_u8(&raw);
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

/// Writes the embedded synthetic data for a profile into `dir` (deterministic; reused when
/// present).
pub(crate) fn synthetic(
    dataset: Dataset,
    profile: &Profile,
    seed: u64,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    let stamp = dir.join(".complete");
    let wanted = format!(
        "{dataset:?} {:?} {:?} seed {seed}",
        profile.em, profile.cells
    );
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(dir.to_path_buf());
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("{}: cannot clear", dir.display()))?;
    }
    match dataset {
        Dataset::Cremi => {
            let (depth, side) = profile.em;
            let em = EmVolumeOptions {
                depth,
                height: side,
                width: side,
                ..EmVolumeOptions::default()
            };
            write_cremi_like(dir, &em, seed)?;
        }
        Dataset::Livecell => {
            let (counts, h, w) = profile.cells;
            let cells = CellImageOptions {
                height: h,
                width: w,
                cells: (h * w / 2400).max(4),
                ..CellImageOptions::default()
            };
            write_livecell_like(dir, counts, &cells, seed)?;
        }
    }
    std::fs::write(&stamp, wanted)?;
    Ok(dir.to_path_buf())
}

/// Peak resident memory of this process since the last reset, in bytes (Linux).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The results of one model in one setting.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelResult {
    pub model: ModelKind,
    pub label: String,
    pub setting: String,
    pub msa: f64,
    pub sa50: f64,
    pub sa75: f64,
    pub per_image: Vec<(String, f64)>,
    /// Parameters of the model trained here and of the paper's configuration (C = 2).
    pub parameters: usize,
    pub parameters_paper_config: usize,
    pub peak_train_memory_bytes: Option<u64>,
    pub inference_ms_median: f64,
    pub inference_ms_min: f64,
    pub inference_ms_max: f64,
    pub iterations: usize,
    pub best_val_loss: f64,
    pub train_seconds: Option<f64>,
    pub reused_checkpoint: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let mut profile = Profile::get(args.profile);
    if let Some(n) = args.iterations {
        profile.iterations = n;
    }
    if let Some(names) = &args.models {
        profile.models = names
            .iter()
            .map(|n| n.parse::<ModelKind>())
            .collect::<Result<_, _>>()?;
    }
    let device = seg_train::device(&args.device)?;
    let work = args.out.join(format!(
        "{}-{}",
        args.dataset.name(),
        profile_name(args.profile)
    ));
    let (data_dir, synthetic_data) = match &args.data {
        Some(d) => (d.clone(), false),
        None => (
            synthetic(
                args.dataset,
                &profile,
                args.seed,
                &work.join("synthetic-data"),
            )?,
            true,
        ),
    };
    if synthetic_data {
        println!(
            "{} ({} profile) on the embedded synthetic data (no --data given): {}",
            args.dataset.name(),
            profile_name(args.profile),
            data_dir.display()
        );
    } else {
        println!(
            "{} ({} profile) on {}",
            args.dataset.name(),
            profile_name(args.profile),
            data_dir.display()
        );
    }
    let started = Instant::now();
    let splits = match args.dataset {
        Dataset::Cremi => load_cremi(&data_dir, profile.test_limit)?,
        Dataset::Livecell => load_livecell(&data_dir, profile.test_limit)?,
    };
    if splits.test.is_empty() {
        bail!("{}: the test split has no image", data_dir.display());
    }
    println!(
        "  data: {} train / {} val samples per epoch at {p}×{p}, {} test images; device {}, {} threads",
        splits.train.samples_per_epoch((profile.patch, profile.patch))?,
        splits.val.samples_per_epoch((profile.patch, profile.patch))?,
        splits.test.len(),
        args.device,
        rayon::current_num_threads(),
        p = profile.patch,
    );
    let stamp = report::timestamp();
    let base = format!(
        "{}-{}-{stamp}",
        args.dataset.name(),
        profile_name(args.profile)
    );
    let mut report_dir = args.out.join(&base);
    // Two runs in the same second get distinct folders.
    let mut n = 2;
    while report_dir.exists() {
        report_dir = args.out.join(format!("{base}-{n}"));
        n += 1;
    }
    std::fs::create_dir_all(&report_dir)
        .with_context(|| format!("{}: cannot create", report_dir.display()))?;
    let mut results = Vec::new();
    for setting in args.dataset.settings() {
        for &kind in &profile.models {
            let r = run_one(
                args,
                &profile,
                &splits,
                setting,
                kind,
                &device,
                &work,
                &report_dir,
            )
            .with_context(|| format!("{} / {}", setting, kind.name()))?;
            println!(
                "  {:<16} {:<20} mSA {:.3}  SA50 {:.3}  SA75 {:.3}  ({} params, {:.0} ms/image{})",
                kind.label(),
                setting.to_string(),
                r.msa,
                r.sa50,
                r.sa75,
                crate::models::group(r.parameters),
                r.inference_ms_median,
                if r.reused_checkpoint {
                    ", reused checkpoint"
                } else {
                    ""
                }
            );
            results.push(r);
        }
    }
    let meta = json!({
        "dataset": args.dataset.name(),
        "profile": profile,
        "synthetic_data": synthetic_data,
        "data": splits.description,
        "device": args.device,
        "threads": rayon::current_num_threads(),
        "seed": args.seed,
        "git_commit": report::git_commit(),
        "machine": seg_data::machine::describe(),
        "vim_train_mode_inference": args.vim_train_mode,
        "seconds": started.elapsed().as_secs_f64(),
        "work_dir": work.display().to_string(),
    });
    report::write(&report_dir, args.dataset, &meta, &results)?;
    println!(
        "  report: {} (results.md, results.json, msa.png, msa.svg, panels/) in {:.0} s",
        report_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn profile_name(p: ProfileName) -> &'static str {
    match p {
        ProfileName::Smoke => "smoke",
        ProfileName::Quick => "quick",
        ProfileName::Paper => "paper",
    }
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    args: &Args,
    profile: &Profile,
    splits: &Splits,
    setting: TargetSetting,
    kind: ModelKind,
    device: &candle_core::Device,
    work: &Path,
    report_dir: &Path,
) -> anyhow::Result<ModelResult> {
    let channels = match setting {
        TargetSetting::Cremi => 1,
        TargetSetting::LivecellBoundaries => 2,
        TargetSetting::LivecellDistances => 3,
    };
    let config = ModelConfig::preset(kind, channels, &profile.preset_options());
    let paper_count = ModelConfig::preset(kind, 2, &PresetOptions::default()).parameter_count()?;
    let run_dir = work
        .join("runs")
        .join(setting.to_string())
        .join(kind.name());
    let options = TrainOptions {
        iterations: profile.iterations,
        batch_size: profile.batch_size,
        patch: (profile.patch, profile.patch),
        lr: profile.lr,
        seed: args.seed,
        epoch_length: profile.epoch_length,
        val_batches: profile.val_batches,
        min_instances: (setting == TargetSetting::Cremi).then_some(2),
        workers: 2,
        progress: true,
        precision: args.precision,
        ..TrainOptions::default()
    };
    let data = TrainData {
        train: splits.train.clone(),
        val: splits.val.clone(),
        transform: target_transform(setting),
        loss: setting_loss(setting),
        description: json!({"setting": setting.to_string(), "data": splits.description}),
    };
    if args.force && run_dir.exists() {
        std::fs::remove_dir_all(&run_dir)
            .with_context(|| format!("{}: cannot remove", run_dir.display()))?;
    }
    let latest = run_dir.join("latest");
    let mut reused = false;
    let mut train_seconds = None;
    let mut peak = None;
    match checkpoint::resolve(&latest)
        .map(|_| checkpoint::read_state(&latest))
        .transpose()?
    {
        Some(state)
            if state.model != config
                || state.data != data.description
                // Compared as options, so fields added later with defaults still match.
                || serde_json::from_value::<TrainOptions>(state.options.clone()).ok()
                    != Some(options.clone()) =>
        {
            bail!(
                "{} holds a run with another configuration or data; pass --force to retrain",
                run_dir.display()
            );
        }
        Some(state) if state.iteration >= options.iterations => reused = true,
        state => {
            if let Some(s) = &state {
                println!(
                    "  {}: resuming from iteration {} of {}",
                    kind.label(),
                    s.iteration,
                    options.iterations
                );
            } else {
                println!(
                    "  {} ({setting}): training {} iterations",
                    kind.label(),
                    options.iterations
                );
            }
            let model = Model::new(config.clone(), device, args.seed)?;
            reset_peak_rss();
            let summary = seg_train::train(
                &model,
                &data,
                &options,
                &run_dir,
                state.is_some(),
                StopAfter(None),
            )?;
            peak = peak_rss();
            train_seconds = Some(summary.seconds);
        }
    }
    let best = run_dir.join("best");
    let (model, state) = checkpoint::load_model(
        if checkpoint::resolve(&best).is_some() {
            &best
        } else {
            &latest
        },
        device,
    )?;
    let _precision = args.precision.enter()?;
    let train_mode =
        args.vim_train_mode && matches!(kind, ModelKind::VimUnetT | ModelKind::VimUnetS);
    let tile = TileOptions {
        block: (profile.tile_block, profile.tile_block),
        halo: (profile.tile_halo, profile.tile_halo),
        standardize: true,
        progress: false,
        train_mode,
    };
    let predict = |img: &TestImage| -> anyhow::Result<Array3<f32>> {
        Ok(match setting {
            TargetSetting::Cremi => predict_tiled(&model, img.raw.view(), &tile)?,
            _ => match model.max_side() {
                Some(side) if img.raw.dim().0 > side || img.raw.dim().1 > side => predict_tiled(
                    &model,
                    img.raw.view(),
                    &TileOptions {
                        standardize: false,
                        ..tile
                    },
                )?,
                _ => seg_train::predict::predict_image_mode(&model, img.raw.view(), train_mode)?,
            },
        })
    };
    predict(&splits.test[0])?; // warm-up
    let mut times = Vec::new();
    let mut per_image = Vec::new();
    let (mut msa, mut sa50, mut sa75) = (0.0, 0.0, 0.0);
    for (i, img) in splits.test.iter().enumerate() {
        let t = Instant::now();
        let pred = predict(img)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        let seg = segment(&pred, setting)?;
        let score = msa_eval::mean_segmentation_accuracy(
            seg.view(),
            img.labels.view(),
            &Default::default(),
        )?;
        msa += score.msa;
        sa50 += score.sa50().unwrap_or(0.0);
        sa75 += score.sa75().unwrap_or(0.0);
        per_image.push((img.name.clone(), score.msa));
        if i < 2 {
            report::panel(
                &report_dir.join("panels").join(format!(
                    "{setting}-{}-{}.png",
                    kind.name(),
                    img.name
                )),
                img,
                &pred,
                &seg,
            )?;
        }
    }
    let n = splits.test.len() as f64;
    times.sort_by(f64::total_cmp);
    Ok(ModelResult {
        model: kind,
        label: kind.label().to_string(),
        setting: setting.to_string(),
        msa: msa / n,
        sa50: sa50 / n,
        sa75: sa75 / n,
        per_image,
        parameters: model.parameter_count(),
        parameters_paper_config: paper_count,
        peak_train_memory_bytes: peak,
        inference_ms_median: times[times.len() / 2],
        inference_ms_min: times[0],
        inference_ms_max: times[times.len() - 1],
        iterations: state.iteration,
        best_val_loss: state.best_val_loss,
        train_seconds,
        reused_checkpoint: reused,
    })
}

/// The paper's post-processing for a setting (spec §5).
pub fn segment(pred: &Array3<f32>, setting: TargetSetting) -> anyhow::Result<Array2<u32>> {
    use watershed::{
        watershed_from_boundaries, watershed_from_distances, BoundaryRecipe, DistanceRecipe,
    };
    let ch = |i: usize| pred.index_axis(Axis(0), i);
    Ok(match setting {
        TargetSetting::Cremi => watershed_from_boundaries(ch(0), None, &BoundaryRecipe::default())?,
        TargetSetting::LivecellBoundaries => {
            watershed_from_boundaries(ch(1), Some(ch(0)), &BoundaryRecipe::default())?
        }
        TargetSetting::LivecellDistances => {
            watershed_from_distances(ch(1), ch(2), ch(0), &DistanceRecipe::default())?
        }
    })
}

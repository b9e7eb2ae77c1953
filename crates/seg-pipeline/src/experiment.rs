//! The paper's comparison from data to report: for each setting of a dataset and each model,
//! train (or resume, or reuse a finished run), predict the test images in tiles, segment them
//! with the setting's recipe, score them, and write the report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::Array3;
use seg_targets::TargetSetting;
use seg_train::checkpoint;
use seg_train::train::min_instances;
use seg_train::{predict_tiled, Precision, Start, StopAfter, TileOptions, TrainData, TrainOptions};
use serde_json::json;
use vim_nets::{Canvas, Model, ModelConfig, ModelKind, PresetOptions};

use crate::datasets::{load_splits, synthetic_data, Dataset, Splits, SyntheticSize, TestImage};
use crate::error::file_error;
use crate::report::ModelResult;
use crate::setting::{out_channels, segment, Recipes};
use crate::system::{git_commit, peak_rss, reset_peak_rss, timestamp};
use crate::{Context, Error, Result};

/// The experiment profiles: smoke (CI, under two minutes), quick (a laptop CPU, minutes), and
/// paper (the paper's settings, for a GPU and the real data).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileName {
    Smoke,
    Quick,
    Paper,
}

impl ProfileName {
    /// `smoke`, `quick` or `paper`.
    pub fn name(self) -> &'static str {
        match self {
            ProfileName::Smoke => "smoke",
            ProfileName::Quick => "quick",
            ProfileName::Paper => "paper",
        }
    }
}

impl std::str::FromStr for ProfileName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "smoke" => Ok(ProfileName::Smoke),
            "quick" => Ok(ProfileName::Quick),
            "paper" => Ok(ProfileName::Paper),
            _ => Err(Error::Option {
                option: "profile".into(),
                what: format!("{s:?}: expected smoke, quick or paper"),
            }),
        }
    }
}

/// Everything a profile fixes.
#[non_exhaustive]
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

    /// The size of the synthetic stand-in data this profile writes when no data is given.
    pub fn synthetic_size(&self) -> SyntheticSize {
        SyntheticSize::new(self.em, self.cells)
    }

    /// The model options of this profile (canvas and conv-part features).
    pub fn preset_options(&self) -> PresetOptions {
        {
            let mut opts = PresetOptions::default();
            opts.canvas = self.canvas.map_or(Canvas::Paper, Canvas::Native);
            opts.features = self.features;
            opts
        }
    }
}

/// What one experiment runs.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct ExperimentOptions {
    pub dataset: Dataset,
    /// The profile (its fields may be changed: iterations, models, …).
    pub profile: Profile,
    /// Fetched real data; None: the embedded synthetic data, written under `out`.
    pub data: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    pub precision: Precision,
    /// Train with activation checkpointing (less memory, the same gradients).
    pub checkpoint_activations: bool,
    pub seed: u64,
    /// The results folder: runs in `<dataset>-<profile>/runs/`, reports in
    /// `<dataset>-<profile>-<timestamp>/`.
    pub out: PathBuf,
    /// Retrain models that are already trained.
    pub force: bool,
    /// Predict ViM-UNet in training mode, as the paper's numbers were computed (fidelity
    /// checks only).
    pub vim_train_mode: bool,
    /// The post-processing recipes (default: the paper's).
    pub recipes: Recipes,
    /// Outputs of methods trained elsewhere (the paper's nnU-Net and U-Mamba), scored in the
    /// boundary settings beside the models trained here.
    pub baselines: Vec<crate::Baseline>,
}

impl ExperimentOptions {
    /// `dataset` under a profile, on the CPU in f32, seed 0, results in `results/`.
    pub fn new(dataset: Dataset, profile: ProfileName) -> Self {
        ExperimentOptions {
            dataset,
            profile: Profile::get(profile),
            data: None,
            device: "cpu".into(),
            precision: Precision::default(),
            checkpoint_activations: false,
            seed: 0,
            out: PathBuf::from("results"),
            force: false,
            vim_train_mode: false,
            recipes: Recipes::default(),
            baselines: Vec::new(),
        }
    }

    /// The folder of this dataset and profile's runs and synthetic data.
    pub fn work_dir(&self) -> PathBuf {
        self.out.join(format!(
            "{}-{}",
            self.dataset.name(),
            self.profile.name.name()
        ))
    }
}

/// What an experiment reports while it runs.
#[non_exhaustive]
#[derive(Debug)]
pub enum Event<'a> {
    /// The data it runs on: a fetched data set, or the synthetic stand-in written for it.
    Data { dir: &'a Path, synthetic: bool },
    /// The splits are read.
    Splits {
        train_samples: usize,
        val_samples: usize,
        test_images: usize,
    },
    /// A model starts training, from scratch (`from` None) or resumed.
    Training {
        model: ModelKind,
        setting: TargetSetting,
        from: Option<usize>,
        iterations: usize,
    },
    /// A model is scored.
    Scored(&'a ModelResult),
    /// A baseline's outputs are scored.
    BaselineScored(&'a crate::BaselineResult),
    /// The report is written.
    Report { dir: &'a Path, seconds: f64 },
}

/// A finished experiment.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct ExperimentReport {
    /// The report folder (`results.md`, `results.json`, charts, `panels/`).
    pub dir: PathBuf,
    pub results: Vec<ModelResult>,
    pub baselines: Vec<crate::BaselineResult>,
    pub seconds: f64,
}

/// Runs the experiment: every setting of the dataset × every model of the profile, then the
/// report. Models already trained with the same configuration and data are reused, interrupted
/// ones resumed.
///
/// # Errors
/// Missing or unreadable data, a run folder holding another configuration (unless
/// `force`), and the stages' errors, each with the setting and model it happened in.
pub fn run_experiment(
    opts: &ExperimentOptions,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<ExperimentReport> {
    let profile = &opts.profile;
    let device = seg_train::device(&opts.device)?;
    let work = opts.work_dir();
    // One experiment per dataset, profile and output folder at a time.
    let _lock = seg_io::lock::FolderLock::acquire(&work)?;
    let (data_dir, synthetic) = match &opts.data {
        Some(d) => (d.clone(), false),
        None => (
            synthetic_data(
                opts.dataset,
                profile.synthetic_size(),
                opts.seed,
                &work.join("synthetic-data"),
            )?,
            true,
        ),
    };
    on_event(Event::Data {
        dir: &data_dir,
        synthetic,
    });
    let started = Instant::now();
    let splits = load_splits(opts.dataset, &data_dir, profile.test_limit)?;
    let patch = (profile.patch, profile.patch);
    on_event(Event::Splits {
        train_samples: splits.train.samples_per_epoch(patch)?,
        val_samples: splits.val.samples_per_epoch(patch)?,
        test_images: splits.test.len(),
    });
    let prefix = format!("{}-{}", opts.dataset.name(), profile.name.name());
    remove_unfinished_reports(&opts.out, &prefix)?;
    let base = format!("{prefix}-{}", timestamp());
    let mut report_dir = opts.out.join(&base);
    // Two runs in the same second get distinct folders.
    let mut n = 2;
    while report_dir.exists() {
        report_dir = opts.out.join(format!("{base}-{n}"));
        n += 1;
    }
    // The report is assembled in a hidden folder and renamed into place when complete, so a
    // killed experiment leaves no half report (the next one removes the hidden folder).
    let partial = unfinished_report(&opts.out, &report_dir);
    std::fs::create_dir_all(&partial).map_err(file_error(&partial))?;
    let mut results = Vec::new();
    for setting in opts.dataset.settings() {
        for &kind in &profile.models {
            let r = run_model(
                opts, &splits, setting, kind, &device, &work, &partial, on_event,
            )
            .context(|| format!("{setting} / {}", kind.name()))?;
            on_event(Event::Scored(&r));
            results.push(r);
        }
    }
    let mut baselines = Vec::new();
    for setting in opts.dataset.settings() {
        if setting == TargetSetting::LivecellDistances {
            continue; // class maps have no distance form; the paper ran none there
        }
        for b in &opts.baselines {
            let r = crate::baselines::score_baseline(b, &splits.test, setting, &opts.recipes)
                .context(|| format!("{setting} / baseline {}", b.name))?;
            on_event(Event::BaselineScored(&r));
            baselines.push(r);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let meta = json!({
        "dataset": opts.dataset.name(),
        "profile": profile,
        "synthetic_data": synthetic,
        "data": splits.description,
        "device": opts.device,
        "threads": rayon::current_num_threads(),
        "seed": opts.seed,
        "git_commit": git_commit(),
        "machine": seg_data::machine::describe(),
        "vim_train_mode_inference": opts.vim_train_mode,
        "seconds": seconds,
        "work_dir": work.display().to_string(),
    });
    crate::report::write(&partial, opts.dataset, &meta, &results, &baselines)?;
    std::fs::rename(&partial, &report_dir).map_err(file_error(&report_dir))?;
    on_event(Event::Report {
        dir: &report_dir,
        seconds,
    });
    Ok(ExperimentReport {
        dir: report_dir,
        results,
        baselines,
        seconds,
    })
}

/// The hidden folder a report is assembled in before it is renamed to `report_dir`.
fn unfinished_report(out: &Path, report_dir: &Path) -> PathBuf {
    let name = report_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.join(format!(".{name}.partial"))
}

/// Removes the unfinished report folders of killed experiments of this dataset and profile
/// (`out/.<prefix>-….partial`); the caller holds the experiment's lock, so none is in use.
fn remove_unfinished_reports(out: &Path, prefix: &str) -> Result<()> {
    let entries = match std::fs::read_dir(out) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(file_error(out)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(file_error(out))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!(".{prefix}-")) && name.ends_with(".partial") {
            let path = entry.path();
            std::fs::remove_dir_all(&path).map_err(file_error(&path))?;
        }
    }
    Ok(())
}

/// One model of an experiment, train → predict → segment → score: trains `kind` in `setting`
/// on `splits` (or resumes an interrupted run, or reuses a finished one, in
/// `work/runs/<setting>/<model>/`), predicts the test images in tiles, segments them with the
/// setting's recipe, scores them and draws panels of the first two into `report_dir/panels`.
/// [`run_experiment`] calls it for every setting and model.
///
/// # Errors
/// A run folder holding another configuration or data (unless `opts.force`), and the stages'
/// errors.
#[allow(clippy::too_many_arguments)]
pub fn run_model(
    opts: &ExperimentOptions,
    splits: &Splits,
    setting: TargetSetting,
    kind: ModelKind,
    device: &candle_core::Device,
    work: &Path,
    report_dir: &Path,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<ModelResult> {
    let profile = &opts.profile;
    let config = ModelConfig::preset(kind, out_channels(setting), &profile.preset_options());
    let paper_count = ModelConfig::preset(kind, 2, &PresetOptions::default()).parameter_count()?;
    let run_dir = work
        .join("runs")
        .join(setting.to_string())
        .join(kind.name());
    let mut options = TrainOptions::default();
    options.iterations = profile.iterations;
    options.batch_size = profile.batch_size;
    options.patch = (profile.patch, profile.patch);
    options.lr = profile.lr;
    options.seed = opts.seed;
    options.epoch_length = profile.epoch_length;
    options.val_batches = profile.val_batches;
    options.min_instances = min_instances(setting);
    options.workers = 2;
    options.progress = true;
    options.precision = opts.precision;
    options.checkpoint_activations = opts.checkpoint_activations;
    let data = TrainData::for_setting(
        setting,
        splits.train.clone(),
        splits.val.clone(),
        splits.description.clone(),
    );
    if opts.force && run_dir.exists() {
        std::fs::remove_dir_all(&run_dir).map_err(file_error(&run_dir))?;
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
            return Err(Error::Run {
                path: run_dir,
                what: "holds a run with another configuration or data; pass --force to retrain"
                    .into(),
            });
        }
        Some(state) if state.iteration >= options.iterations => reused = true,
        state => {
            on_event(Event::Training {
                model: kind,
                setting,
                from: state.as_ref().map(|s| s.iteration),
                iterations: options.iterations,
            });
            let model = Model::new(config.clone(), device, opts.seed)?;
            reset_peak_rss();
            let summary = seg_train::train(
                &model,
                &data,
                &options,
                &run_dir,
                if state.is_some() {
                    Start::Resume
                } else {
                    Start::New
                },
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
    let _precision = opts.precision.enter()?;
    let train_mode =
        opts.vim_train_mode && matches!(kind, ModelKind::VimUnetT | ModelKind::VimUnetS);
    let mut tile = TileOptions::default();
    tile.block = (profile.tile_block, profile.tile_block);
    tile.halo = (profile.tile_halo, profile.tile_halo);
    tile.standardize = true;
    tile.progress = false;
    tile.train_mode = train_mode;
    // Images larger than a ViM-UNet's canvas are tiled too, standardised as a whole.
    let mut unstandardised_tile = tile;
    unstandardised_tile.standardize = false;
    let predict = |img: &TestImage| -> Result<Array3<f32>> {
        Ok(match setting {
            TargetSetting::Cremi => predict_tiled(&model, img.raw.view(), &tile)?,
            _ => match model.max_side() {
                Some(side) if img.raw.dim().0 > side || img.raw.dim().1 > side => {
                    predict_tiled(&model, img.raw.view(), &unstandardised_tile)?
                }
                _ => seg_train::predict::predict_image_mode(&model, img.raw.view(), train_mode)?,
            },
        })
    };
    predict(&splits.test[0])?; // warm-up
    let mut times = Vec::new();
    let mut scores = crate::baselines::ScoreSum::default();
    for (i, img) in splits.test.iter().enumerate() {
        let t = Instant::now();
        let pred = predict(img)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        let seg = segment(pred.view(), setting, &opts.recipes)?;
        scores.add(img, seg.view())?;
        if i < 2 {
            crate::report::panel(
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
    times.sort_by(f64::total_cmp);
    let (msa, sa50, sa75) = scores.means();
    Ok(ModelResult {
        model: kind,
        label: kind.label().to_string(),
        setting: setting.to_string(),
        msa,
        sa50,
        sa75,
        per_image: scores.per_image,
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

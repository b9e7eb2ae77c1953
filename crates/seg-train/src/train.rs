//! The training loop: Adam, ReduceLROnPlateau on the validation loss after every epoch, best
//! and latest checkpoints, exact resume, a JSON-lines validation log and a progress bar.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::Array4;
use seg_data::sampling::{
    Augmentation, BatchLoader, ImageSource, LabelTransform, LoaderOptions, MinInstances,
};
use seg_targets::{make_targets, TargetSetting};
use vim_nets::Model;

use crate::checkpoint::{self, CheckpointState};
use crate::loss::LossKind;
use crate::optim::{Adam, ReduceLrOnPlateau};
use crate::run::{self, RunContents, RunPaths, Start};
use crate::{Error, Result};

/// Training options; `Default` is the paper's (100,000 iterations, batch 2, 512² patches,
/// lr 1e-4, plateau factor 0.9 / patience 10).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainOptions {
    pub iterations: usize,
    pub batch_size: usize,
    pub patch: (usize, usize),
    pub lr: f64,
    pub seed: u64,
    /// Iterations per epoch; `None`: one pass over the loader (torch-em's epoch).
    pub epoch_length: Option<usize>,
    /// Validation batches (batch size 1) per epoch; `None`: the whole validation loader.
    pub val_batches: Option<usize>,
    pub plateau_factor: f64,
    pub plateau_patience: usize,
    /// `Some`: reject patches with fewer label values (CREMI in the paper).
    pub min_instances: Option<usize>,
    pub flips: bool,
    pub shuffle: bool,
    pub workers: usize,
    pub progress: bool,
    /// Compute precision of forward and backward passes (weights, gradients and Adam stay f32).
    #[serde(default)]
    pub precision: Precision,
    /// Activation checkpointing ([`vim_nets::Model::set_checkpoint_activations`]): less
    /// memory, about one more forward pass of time per step; the same gradients.
    #[serde(default)]
    pub checkpoint_activations: bool,
}

/// The precision a model computes in: f32, or bf16 mixed precision (matrix products and
/// convolutions in bf16; normalisations, softmax, the selective scan and the loss in f32;
/// f32 master weights). The paper trained with PyTorch's fp16 autocast and a gradient scaler;
/// bf16 has f32's exponent range, so it needs no loss scaling. Meant for CUDA: on the CPU,
/// candle has no bf16 kernels for most operations and the casts make it slower than f32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }

    /// Sets the precision for computations on this thread while the guard lives.
    pub fn enter(self) -> Result<vim_nets::Autocast> {
        Ok(vim_nets::Autocast::new(self.dtype())?)
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(Error::Option {
                option: "precision",
                value: s.to_string(),
                problem: "use f32 or bf16".into(),
            }),
        }
    }
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            iterations: 100_000,
            batch_size: 2,
            patch: (512, 512),
            lr: 1e-4,
            seed: 0,
            epoch_length: None,
            val_batches: None,
            plateau_factor: 0.9,
            plateau_patience: 10,
            min_instances: None,
            flips: true,
            shuffle: false,
            workers: 2,
            progress: true,
            precision: Precision::F32,
            checkpoint_activations: false,
        }
    }
}

impl TrainOptions {
    /// Refuses options a run cannot use: zero iterations, batch size, patch sides, epoch length
    /// or validation batches; a learning rate or plateau factor that is not a positive number.
    ///
    /// # Errors
    /// [`Error::Option`] naming the option.
    pub fn check(&self) -> Result<()> {
        let bad = |option: &'static str, value: String, problem: &str| {
            Err(Error::Option {
                option,
                value,
                problem: problem.into(),
            })
        };
        for (option, value) in [
            ("iterations", Some(self.iterations)),
            ("batch_size", Some(self.batch_size)),
            ("patch", Some(self.patch.0.min(self.patch.1))),
            ("epoch_length", self.epoch_length),
            ("val_batches", self.val_batches),
        ] {
            if value == Some(0) {
                return bad(option, "0".into(), "must be at least 1");
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", self.lr.to_string(), "must be a positive number");
        }
        if !(self.plateau_factor.is_finite()
            && self.plateau_factor > 0.0
            && self.plateau_factor <= 1.0)
        {
            return bad(
                "plateau_factor",
                self.plateau_factor.to_string(),
                "must be in (0, 1]",
            );
        }
        Ok(())
    }
}

/// The label transform of a target setting (instance labels → target stack), for the loader.
pub fn target_transform(setting: TargetSetting) -> LabelTransform {
    Arc::new(move |ids| {
        make_targets(ids, setting).map_err(|e| seg_data::Error::Transform(Box::new(e)))
    })
}

/// The loss a target setting trains with (torch-em: Dice; the Dice-based distance loss for
/// LIVECell's distance setting).
pub fn setting_loss(setting: TargetSetting) -> LossKind {
    match setting {
        TargetSetting::LivecellDistances => LossKind::DistanceDice,
        _ => LossKind::Dice,
    }
}

/// What to train on.
#[derive(Clone)]
pub struct TrainData {
    pub train: Arc<dyn ImageSource>,
    pub val: Arc<dyn ImageSource>,
    pub transform: LabelTransform,
    pub loss: LossKind,
    /// A description stored in every checkpoint (dataset, split, setting).
    pub description: serde_json::Value,
}

impl TrainData {
    /// The training data of a target setting: its target transform and loss, with
    /// `{"setting": …, "data": description}` stored in every checkpoint (a run resumes only on
    /// the same description).
    pub fn for_setting(
        setting: TargetSetting,
        train: Arc<dyn ImageSource>,
        val: Arc<dyn ImageSource>,
        description: serde_json::Value,
    ) -> Self {
        TrainData {
            train,
            val,
            transform: target_transform(setting),
            loss: setting_loss(setting),
            description: serde_json::json!({"setting": setting.to_string(), "data": description}),
        }
    }
}

/// The patch rule of a target setting: CREMI patches must hold at least two objects (torch-em's
/// `MinInstanceSampler` in the paper's CREMI runs); the LIVECell settings take any patch.
pub fn min_instances(setting: TargetSetting) -> Option<usize> {
    (setting == TargetSetting::Cremi).then_some(2)
}

/// The outcome of a call to [`train`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainSummary {
    pub iterations: usize,
    pub epochs: u64,
    pub best_val_loss: f64,
    pub last_val_loss: f64,
    /// Whether the run reached its iteration budget (false when stopped early on request).
    pub finished: bool,
    /// Iterations done in this call.
    pub iterations_this_call: usize,
    pub seconds: f64,
}

/// A hook to stop after a number of iterations in this call (tests of resuming use it to
/// interrupt a run as a kill would).
#[derive(Debug, Clone, Copy, Default)]
pub struct StopAfter(pub Option<usize>);

fn to_tensor(a: &Array4<f32>, device: &Device) -> Result<Tensor> {
    let shape = a.dim();
    let v: Vec<f32> = a.iter().copied().collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 31)
}

fn loader_options(o: &TrainOptions, batch_size: usize, seed: u64, augment: bool) -> LoaderOptions {
    {
        let mut opts = LoaderOptions::default();
        opts.patch = o.patch;
        opts.batch_size = batch_size;
        opts.seed = seed;
        opts.min_instances = o.min_instances.map(|min| MinInstances {
            min,
            ..MinInstances::default()
        });
        opts.augmentation = Augmentation {
            flip: if augment && o.flips { 0.5 } else { 0.0 },
            ..Augmentation::default()
        };
        opts.shuffle = o.shuffle;
        opts.workers = o.workers.max(1);
        opts
    }
}

/// The mean validation loss in eval mode over a fixed set of validation patches (the same
/// patches every epoch, so the plateau rule compares like with like).
pub fn validate(model: &Model, data: &TrainData, o: &TrainOptions) -> Result<f64> {
    let opts = loader_options(o, 1, o.seed ^ 0x7661_6C69_6461_7465, false);
    let loader = BatchLoader::epoch(data.val.clone(), data.transform.clone(), &opts, 0)?;
    let limit = o.val_batches.unwrap_or(usize::MAX);
    let (mut total, mut n) = (0.0, 0usize);
    for batch in loader.take(limit) {
        let batch = batch?;
        let x = to_tensor(&batch.raw, model.device())?;
        let t = to_tensor(&batch.targets, model.device())?;
        let y = model.forward(&x, false)?;
        total += f64::from(data.loss.compute(&y, &t)?.to_scalar::<f32>()?);
        n += 1;
    }
    if n == 0 {
        return Err(Error::Data {
            split: "validation",
            problem: "gave no batch".into(),
        });
    }
    Ok(total / n as f64)
}

/// Trains `model` on `data` into the run folder `out` (`latest/`, `best/`,
/// `validation.jsonl`), holding the folder's lock ([`seg_io::lock::FolderLock`]) while it
/// runs. [`Start::Resume`] continues from `out/latest` exactly (same data order, same
/// stochastic-depth draws, same optimizer state); [`Start::New`] refuses a folder that holds
/// anything of a run rather than overwriting it.
///
/// # Errors
/// Data and model errors; the folder held by another process; [`Error::ExistingRun`],
/// [`Error::CannotResume`] and [`Error::ResumeMismatch`] for what the folder holds;
/// [`Error::NonFinite`] when a loss is NaN or infinite (the last good checkpoint stays in place).
pub fn train(
    model: &Model,
    data: &TrainData,
    o: &TrainOptions,
    out: &Path,
    start: Start,
    stop: StopAfter,
) -> Result<TrainSummary> {
    let started = Instant::now();
    o.check()?;
    // A batch of patches and their targets must fit before anything else is done (the
    // network's activations take many times more; this catches absurd patch sizes).
    let channels = model.config().out_channels() + 1;
    seg_io::memory::check_allocation(
        out,
        &format!(
            "a batch of {} patches of {}×{} with their targets",
            o.batch_size, o.patch.0, o.patch.1
        ),
        seg_io::memory::product(&[o.batch_size, o.patch.0, o.patch.1, channels, 4]),
        "use a smaller --patch or --batch",
    )?;
    crate::memory::check_training(model, o, out)?;
    let _lock = seg_io::lock::FolderLock::acquire(out)?;
    let _precision = o.precision.enter()?;
    model.set_checkpoint_activations(o.checkpoint_activations);
    let paths = RunPaths::new(out);
    let vars = model.params().trainable();
    let mut adam = Adam::new(vars, o.lr);
    let mut scheduler = ReduceLrOnPlateau::new(o.plateau_factor, o.plateau_patience);
    let (mut iteration, mut epoch, mut best, mut last) = (0usize, 0u64, f64::INFINITY, f64::NAN);
    let contents = RunContents::inspect(out)?;
    if !contents.is_empty() && start == Start::New {
        return Err(Error::ExistingRun {
            path: out.to_path_buf(),
            found: contents.describe(),
        });
    }
    if let Some((found, state)) = &contents.latest {
        if &state.model != model.config() {
            return Err(Error::Checkpoint {
                path: found.clone(),
                problem: format!(
                    "the checkpoint is for another model configuration ({})",
                    state.model.name()
                ),
            });
        }
        let differences = run::resume_differences(found, state, o, &data.description)?;
        if !differences.is_empty() && start != Start::ResumeAnyway {
            return Err(Error::ResumeMismatch {
                path: out.to_path_buf(),
                differences,
            });
        }
        model.load(&found.join("model.safetensors"))?;
        adam.restore(
            state.adam_step,
            state.lr,
            &checkpoint::load_optimizer(&paths.latest)?,
        )?;
        run::reconcile_log(&paths.log, state)?;
        if start == Start::ResumeAnyway {
            // A new initial learning rate applies from here; otherwise the scheduled one goes on.
            let stored_lr = state.options.get("lr").and_then(|v| v.as_f64());
            if stored_lr != Some(o.lr) {
                adam.lr = o.lr;
            }
        }
        scheduler = state.scheduler.clone();
        iteration = state.iteration;
        epoch = state.epoch;
        best = state.best_val_loss;
        last = state.val_loss;
    } else if !contents.is_empty() {
        return Err(Error::CannotResume {
            path: out.to_path_buf(),
            problem: format!(
                "it holds {} but no latest/ checkpoint (only latest/ has the optimizer state \
                 an exact continuation needs); restore latest/, or move the folder aside and \
                 start a new run",
                contents.describe()
            ),
        });
    }
    let bar = if o.progress {
        let pb = ProgressBar::new(o.iterations as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "  train {bar:30} {pos}/{len} it  loss {msg}  {per_sec}  eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.set_position(iteration as u64);
        pb
    } else {
        ProgressBar::hidden()
    };
    let start_iteration = iteration;
    let state_for = |iteration: usize,
                     epoch: u64,
                     adam: &Adam,
                     scheduler: &ReduceLrOnPlateau,
                     val: f64,
                     best: f64| {
        CheckpointState {
            format: checkpoint::FORMAT.into(),
            model: model.config().clone(),
            iteration,
            epoch,
            lr: adam.lr,
            adam_step: adam.step,
            scheduler: scheduler.clone(),
            val_loss: val,
            best_val_loss: best,
            seed: o.seed,
            options: serde_json::to_value(o).unwrap_or_default(),
            data: data.description.clone(),
            log: None,
        }
    };
    while iteration < o.iterations {
        let opts = loader_options(o, o.batch_size, o.seed, true);
        let loader = BatchLoader::epoch(data.train.clone(), data.transform.clone(), &opts, epoch)?;
        let per_epoch = o.epoch_length.unwrap_or(loader.len()).max(1);
        let mut ran = 0;
        for batch in loader.take(per_epoch) {
            if iteration >= o.iterations {
                break;
            }
            if stop.0.is_some_and(|n| iteration - start_iteration >= n) {
                bar.abandon();
                return Ok(TrainSummary {
                    iterations: iteration,
                    epochs: epoch,
                    best_val_loss: best,
                    last_val_loss: last,
                    finished: false,
                    iterations_this_call: iteration - start_iteration,
                    seconds: started.elapsed().as_secs_f64(),
                });
            }
            let batch = batch?;
            model.reseed(mix(o.seed, iteration as u64));
            let x = to_tensor(&batch.raw, model.device())?;
            let t = to_tensor(&batch.targets, model.device())?;
            let y = model.forward(&x, true)?;
            let loss = data.loss.compute(&y, &t)?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                bar.abandon();
                return Err(Error::NonFinite {
                    iteration: iteration + 1,
                    value,
                    kept: checkpoint::resolve(&paths.latest),
                });
            }
            let grads = model.backward(&loss)?;
            drop(loss);
            adam.step(&grads)?;
            iteration += 1;
            ran += 1;
            bar.set_message(format!("{value:.4}  lr {:.2e}", adam.lr));
            bar.set_position(iteration as u64);
        }
        if ran == 0 {
            return Err(Error::Data {
                split: "training",
                problem: "gave no batch".into(),
            });
        }
        epoch += 1;
        let val = validate(model, data, o)?;
        if !val.is_finite() {
            return Err(Error::NonFinite {
                iteration,
                value: val as f32,
                kept: checkpoint::resolve(&paths.latest),
            });
        }
        last = val;
        adam.lr = scheduler.step(val, adam.lr);
        let improved = val < best;
        if improved {
            best = val;
        }
        let line = serde_json::json!({
            "epoch": epoch, "iteration": iteration, "val_loss": val, "best_val_loss": best,
            "lr": adam.lr, "seconds": started.elapsed().as_secs_f64(),
        });
        let mut state = state_for(iteration, epoch, &adam, &scheduler, val, best);
        state.log = Some(line.clone());
        if improved {
            checkpoint::write(&paths.best, model, &Default::default(), &state)?;
        }
        checkpoint::write(&paths.latest, model, &adam.state_tensors(), &state)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.log)
            .map_err(|e| Error::Checkpoint {
                path: paths.log.clone(),
                problem: format!("cannot open: {e}"),
            })?;
        writeln!(f, "{line}").map_err(|e| Error::Checkpoint {
            path: paths.log.clone(),
            problem: format!("cannot write: {e}"),
        })?;
    }
    bar.finish_and_clear();
    Ok(TrainSummary {
        iterations: iteration,
        epochs: epoch,
        best_val_loss: best,
        last_val_loss: last,
        finished: true,
        iterations_this_call: iteration - start_iteration,
        seconds: started.elapsed().as_secs_f64(),
    })
}

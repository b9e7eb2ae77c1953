#![doc = include_str!("../README.md")]

pub mod checkpoint;
pub mod loss;
pub mod memory;
pub mod optim;
pub mod predict;
pub mod run;
pub mod train;

use std::path::PathBuf;

use candle_core::Device;

pub use loss::{dice_loss, distance_loss, LossKind};
pub use predict::{predict_image, predict_tiled, Predictor, TileOptions};
pub use run::{RunContents, RunPaths, Start};
pub use train::{train, Precision, StopAfter, TrainData, TrainOptions, TrainSummary};

/// Errors of `seg-train`. Each variant names the split, shape, file, device or option at
/// fault; the errors of the model, the data and the targets pass through with their source.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] vim_nets::Error),
    #[error(transparent)]
    Source(#[from] seg_data::Error),
    #[error(transparent)]
    Io(#[from] seg_io::Error),
    /// A pass estimated to need more memory than the machine has ([`memory`]).
    #[error("{0}")]
    Memory(String),
    /// A new run into a folder that already holds one (nothing was changed).
    #[error(
        "{path}: already holds a run ({found}); resume it, or start the new run in another \
             folder (or move this one aside)"
    )]
    ExistingRun { path: PathBuf, found: String },
    /// A run that cannot continue exactly from what its folder holds (nothing was changed).
    #[error("{path}: cannot resume: {problem}")]
    CannotResume { path: PathBuf, problem: String },
    /// A resume whose training options or data differ from those the run was started with.
    #[error("{path}: the run was started with other settings ({}); continue with the stored \
             ones, or resume anyway to apply the new ones from here", differences.join("; "))]
    ResumeMismatch {
        path: PathBuf,
        differences: Vec<String>,
    },
    /// A split of the data that yields nothing usable.
    #[error("the {split} set: {problem}")]
    Data {
        split: &'static str,
        problem: String,
    },
    /// An image or tensor whose shape or values the step cannot take.
    #[error("{what} of shape {shape:?}: {problem}")]
    Shape {
        what: &'static str,
        shape: Vec<usize>,
        problem: String,
    },
    /// A checkpoint or run folder that cannot be read, written or used.
    #[error("{path}: {problem}")]
    Checkpoint { path: PathBuf, problem: String },
    /// The optimiser state stored for a parameter does not fit it.
    #[error("optimizer state for {key}: {problem}")]
    OptimizerState { key: String, problem: String },
    /// A device that cannot be used.
    #[error("device {spec:?}: {problem}")]
    Device { spec: String, problem: String },
    /// An option value that cannot be used.
    #[error("{option} {value:?}: {problem}")]
    Option {
        option: &'static str,
        value: String,
        problem: String,
    },
    /// The loss became NaN or infinite.
    #[error("the loss is {value} at iteration {iteration}; stopped{}", match kept {
        Some(p) => format!(" (the last good checkpoint is {})", p.display()),
        None => " (no checkpoint was written yet)".to_string(),
    })]
    NonFinite {
        iteration: usize,
        value: f32,
        kept: Option<PathBuf>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Parses `cpu`, `cuda` or `cuda:N`. A build without CUDA support, or a machine without a
/// driver or device, gives an error that says so.
pub fn device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| Error::Device {
                spec: spec.clone(),
                problem: "invalid; use cpu, cuda or cuda:N".into(),
            })?,
        None => {
            return Err(Error::Device {
                spec,
                problem: "invalid; use cpu, cuda or cuda:N".into(),
            })
        }
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Device {
            spec,
            problem: "this build has no CUDA support; rebuild with `--features cuda` (see \
                      docs/gpu.md)"
                .into(),
        });
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Device {
        spec,
        problem: format!("no usable CUDA device: {e}"),
    })
}

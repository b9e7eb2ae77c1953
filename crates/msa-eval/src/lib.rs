//! Instance segmentation metrics, exactly as `elf.evaluation` defines them and as the ViM-UNet
//! paper reports them: mean segmentation accuracy (mSA over IoU thresholds 0.50…0.95) with
//! SA50 and SA75, single-threshold matching with IoU, IoP or IoT, and dataset aggregation.
//!
//! - [`mean_segmentation_accuracy`], [`matching`]: score one image (2-D or 3-D, any unsigned
//!   label type, ids up to `u64::MAX`).
//! - [`DatasetScores::from_images`]: the paper's per-dataset numbers (mean of per-image values).
//! - [`Overlap`]: the sparse contingency table; [`linear_sum_assignment`]: the optimal
//!   assignment solver.
//!
//! ```
//! use ndarray::array;
//! use msa_eval::{mean_segmentation_accuracy, DatasetScores, MsaOptions};
//!
//! let gt = array![[1u16, 1, 0], [2, 2, 0]];
//! let perfect = mean_segmentation_accuracy(gt.view(), gt.view(), &MsaOptions::default())?;
//! assert_eq!(perfect.msa, 1.0);
//! let missing = array![[1u16, 1, 0], [0, 0, 0]];
//! let half = mean_segmentation_accuracy(missing.view(), gt.view(), &MsaOptions::default())?;
//! assert_eq!(half.msa, 0.5);
//! let dataset = DatasetScores::from_images(&[perfect, half])?;
//! assert_eq!((dataset.msa, dataset.sa50, dataset.sa75), (0.75, 0.75, 0.75));
//! # Ok::<(), msa_eval::Error>(())
//! ```

mod assignment;
mod dataset;
mod error;
mod overlap;
mod scores;

pub use assignment::linear_sum_assignment;
pub use dataset::DatasetScores;
pub use error::{Error, Result};
pub use overlap::Overlap;
pub use scores::{
    default_thresholds, matching, mean_segmentation_accuracy, Match, MatchCriterion, Matching,
    MatchingOptions, MsaOptions, SegmentationAccuracy, ThresholdScore,
};

#![doc = include_str!("../README.md")]

mod assignment;
mod dataset;
mod error;
mod overlap;
mod scores;
mod tally;

pub use assignment::linear_sum_assignment;
pub use dataset::DatasetScores;
pub use error::{Error, Result};
pub use overlap::Overlap;
pub use scores::{
    default_thresholds, matching, mean_segmentation_accuracy, mean_segmentation_accuracy_of, Match,
    MatchCriterion, Matching, MatchingOptions, MsaOptions, SegmentationAccuracy, ThresholdScore,
};
pub use tally::{PairTally, SizedPair};

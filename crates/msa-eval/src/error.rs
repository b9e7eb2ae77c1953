/// Errors of `msa-eval`.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// Segmentation and ground truth must have the same shape.
    #[error("segmentation has shape {segmentation:?} but ground truth has shape {groundtruth:?}")]
    ShapeMismatch {
        segmentation: Vec<usize>,
        groundtruth: Vec<usize>,
    },
    /// A threshold outside [0, 1] or not a number.
    #[error("invalid threshold {0}: thresholds must lie in [0, 1]")]
    InvalidThreshold(f64),
    /// No thresholds were given.
    #[error("no thresholds given")]
    NoThresholds,
    /// More distinct ids than the table indexes.
    #[error("{count} distinct ids exceed the supported 2^32")]
    TooManyObjects { count: usize },
    /// A dataset summary needs at least one image.
    #[error("no images to summarise")]
    EmptyDataset,
    /// A dataset summary needs the thresholds 0.5 and 0.75 among every image's thresholds.
    #[error("image {index} was not scored at threshold {threshold}")]
    MissingThreshold { index: usize, threshold: f64 },
}

/// Result type of `msa-eval`.
pub type Result<T> = std::result::Result<T, Error>;

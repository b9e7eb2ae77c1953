/// Errors of `watershed`.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// Height map, markers, mask and other inputs must share one shape.
    #[error("{what} has shape {found:?} but the height map has shape {expected:?}")]
    ShapeMismatch {
        what: &'static str,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    /// Only 2-D and 3-D arrays are supported.
    #[error("expected a 2-D or 3-D array, got shape {shape:?}")]
    Dimensionality { shape: Vec<usize> },
    /// A NaN in an input map: the flooding order would be undefined.
    #[error("{what} holds NaN at index {index:?}")]
    NotANumber {
        what: &'static str,
        index: Vec<usize>,
    },
    /// An infinite value in a prediction map given to a recipe (a network's probabilities and
    /// distances are finite; an infinity means a broken prediction).
    #[error("{what} holds {value} at index {index:?}: a prediction map must be finite")]
    Infinite {
        what: &'static str,
        value: f32,
        index: Vec<usize>,
    },
    /// An image too large for the 32-bit pixel indices used by the flooding queue.
    #[error("{pixels} pixels (with a one-pixel border) exceed the supported 2^32")]
    TooLarge { pixels: usize },
    /// An option outside its domain.
    #[error("invalid option {name} = {value}: {reason}")]
    InvalidOption {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    /// An error from the label utilities.
    #[error(transparent)]
    Labels(#[from] seg_targets::Error),
}

/// Result type of `watershed`.
pub type Result<T> = std::result::Result<T, Error>;

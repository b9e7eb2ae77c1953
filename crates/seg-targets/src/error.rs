/// Errors of `seg-targets`.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The functions work on 2-D `(height, width)` and 3-D `(depth, height, width)` arrays.
    #[error("expected a 2-D or 3-D array, got shape {shape:?}")]
    Dimensionality { shape: Vec<usize> },
    /// More objects than the u32 output ids can hold.
    #[error("{count} objects do not fit in u32 ids")]
    TooManyObjects { count: usize },
    /// An option value outside its domain.
    #[error("invalid option {name} = {value}: {reason}")]
    InvalidOption {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    /// An unknown target setting name.
    #[error(
        "unknown target setting {0:?}; expected livecell-boundaries, livecell-distances or cremi"
    )]
    UnknownSetting(String),
}

/// Result type of `seg-targets`.
pub type Result<T> = std::result::Result<T, Error>;

use std::path::PathBuf;

/// Errors of `seg-data`. Every variant names the file, URL or data at fault.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file format error (TIFF, HDF5, COCO JSON, an atomic write), from `seg-io`.
    #[error(transparent)]
    Format(#[from] seg_io::Error),
    /// A file or folder could not be opened, read, written or renamed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A dataset's content does not fit its layout (a missing key or image, wrong shapes).
    #[error("{path}: {what}")]
    Content { path: PathBuf, what: String },
    /// A download failed; `what` says why and what to do instead.
    #[error("{url}: {what}")]
    Download { url: String, what: String },
    /// A label transform (e.g. the training targets) failed; the source is its error.
    #[error("transforming the labels: {0}")]
    Transform(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Samples or patches cannot be drawn as asked (sizes, element types, no valid patch).
    #[error("cannot convert {from} data to {to}: {what}")]
    Conversion {
        from: &'static str,
        to: &'static str,
        what: String,
    },
}

/// Result type of `seg-data`.
pub type Result<T> = std::result::Result<T, Error>;

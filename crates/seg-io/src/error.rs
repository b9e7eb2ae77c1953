use std::path::PathBuf;

/// Errors of `seg-io`. Every variant names the file at fault.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened, read, written or renamed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file could not be written (full disk, no permission, a failing device, …); the
    /// destination keeps its previous content.
    #[error("{path}: cannot write: {what}")]
    Write { path: PathBuf, what: String },
    /// The file is not a valid TIFF file (corrupt, truncated or not a TIFF at all).
    #[error("{path}: not a readable TIFF file: {source}")]
    Tiff {
        path: PathBuf,
        #[source]
        source: ::tiff::TiffError,
    },
    /// The file is a valid TIFF but uses a feature or pixel type this crate does not handle.
    #[error("{path}: unsupported TIFF content: {what}")]
    Unsupported { path: PathBuf, what: String },
    /// The content of the file cannot be represented as asked (shape, value range, dtype).
    #[error("{path}: {what}")]
    Content { path: PathBuf, what: String },
    /// The array handed to a writer has a shape the format cannot store.
    #[error("{path}: cannot write an array of shape {shape:?}: {what}")]
    Shape {
        path: PathBuf,
        shape: Vec<usize>,
        what: String,
    },
    /// A conversion between element types would lose information.
    #[error("cannot convert {from} data to {to}: {what}")]
    Conversion {
        from: &'static str,
        to: &'static str,
        what: String,
    },
    /// An output path names the same file as an input: writing it would destroy the input.
    #[error(
        "{output}: this is the input {input}; writing the output there would destroy it \
         (choose another output path)"
    )]
    OutputIsInput { output: PathBuf, input: PathBuf },
    /// An allocation a file or an option asks for that the machine cannot hold: what needs how
    /// much, what is available, and what to do instead.
    #[error("{path}: {what}")]
    TooLarge { path: PathBuf, what: String },
    /// A Zarr array or group that is missing, does not parse, has another element type, or a
    /// box outside it.
    #[error("{path}: {what}")]
    Zarr { path: PathBuf, what: String },
    /// Another process holds the folder's lock ([`crate::lock::FolderLock`]).
    #[error("{folder}: in use by {} (its lock file is .lock); wait for it to finish or stop it", match holder {
        Some(pid) => format!("process {pid}"),
        None => "another process".to_string(),
    })]
    Locked {
        folder: PathBuf,
        holder: Option<u32>,
    },
}

/// Result type of `seg-io`.
pub type Result<T> = std::result::Result<T, Error>;

use std::path::PathBuf;

/// Errors of `seg-pipeline`: those of the stage crates, passed through, and the pipeline's own,
/// which name the file, folder or option at fault.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] seg_io::Error),
    #[error(transparent)]
    Data(#[from] seg_data::Error),
    #[error(transparent)]
    Targets(#[from] seg_targets::Error),
    #[error(transparent)]
    Train(#[from] seg_train::Error),
    #[error(transparent)]
    Model(#[from] vim_nets::Error),
    #[error(transparent)]
    Watershed(#[from] watershed::Error),
    #[error(transparent)]
    Metric(#[from] msa_eval::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file or folder could not be read, written, listed, created or removed.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An input file or folder whose content or layout the pipeline cannot use.
    #[error("{path}: {what}")]
    Input { path: PathBuf, what: String },
    /// An option value that cannot be used.
    #[error("{option}: {what}")]
    Option { option: String, what: String },
    /// A run or report folder that holds something else than this run would write.
    #[error("{path}: {what}")]
    Run { path: PathBuf, what: String },
    /// The report's chart could not be drawn.
    #[error("drawing the chart: {0}")]
    Chart(String),
    /// What the pipeline was doing when a stage failed.
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
}

/// Result type of `seg-pipeline`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds what the pipeline was doing to an error.
pub trait Context<T> {
    /// `context()` names the step, e.g. "sampleA.h5: reading CREMI".
    fn context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| {
            let source: Error = e.into();
            let context = context().into();
            // A message that already begins with the context (a file's errors name the file)
            // is not prefixed a second time.
            if source.to_string().starts_with(&format!("{context}: ")) {
                source
            } else {
                Error::Context {
                    context,
                    source: Box::new(source),
                }
            }
        })
    }
}

/// An I/O error on `path`.
pub(crate) fn file_error(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::File {
        path: path.to_path_buf(),
        source,
    }
}

//! The library's error type. Every variant carries the context a user needs to act on it:
//! which file, which tensor, which step.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong inside the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed; `context` says what we were doing.
    #[error("{context}: {source}")]
    Tensor {
        /// What the library was doing, e.g. "layer 3 q_proj forward".
        context: String,
        /// The underlying candle error.
        #[source]
        source: candle_core::Error,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A configuration value is invalid or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Training data is unusable (empty, too short, token ids out of range, ...).
    #[error("data: {0}")]
    Data(String),
    /// A tokenizer could not be created or failed to encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An output path holds something relora may not replace: a file or directory relora did
    /// not write (`own` false), or relora's own earlier output when replacing it was not asked
    /// for (`own` true). Nothing was changed.
    #[error("{path}: {}", occupied(found, *own))]
    OutputExists {
        /// The output path.
        path: PathBuf,
        /// What is there, in words ("a directory holding notes.txt, which relora did not write").
        found: String,
        /// Whether it is relora's own earlier output of the same kind.
        own: bool,
    },
    /// A checkpoint is missing, corrupt, truncated or inconsistent.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor has the wrong shape or is missing.
    #[error("tensor {name}: {message}")]
    Shape {
        /// The Hugging Face style tensor name.
        name: String,
        /// Expected vs found.
        message: String,
    },
    /// Too many consecutive steps produced a non-finite loss or gradient.
    #[error("step {step}: {count} consecutive non-finite steps (loss {loss}); stopping")]
    NonFinite {
        /// The optimizer step at which training stopped.
        step: u64,
        /// How many non-finite steps in a row were seen.
        count: u32,
        /// The last loss value observed.
        loss: f64,
    },
    /// The requested device is not available in this build or on this machine.
    #[error("device {0}")]
    Device(String),
    /// Data-parallel training failed: a collective operation, the communicator set-up, or ranks
    /// that disagree. The message names the rank and the operation.
    #[error("distributed: {0}")]
    Distributed(String),
}

impl Error {
    /// Wraps a candle error with a description of the operation.
    pub fn tensor(context: impl Into<String>, source: candle_core::Error) -> Self {
        Error::Tensor {
            context: context.into(),
            source,
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A checkpoint error for `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// The text of an error and its causes, joined by ": ", leaving out a cause whose text is
/// already part of the one before: an [`Error::Io`] shows its OS error and also has it as its
/// source, and a chain printed naively says it twice.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// The message of [`Error::OutputExists`].
fn occupied(found: &str, own: bool) -> String {
    if own {
        format!(
            "already holds {found}; replacing it must be asked for (--force on the command \
             line, overwrite = true in the C API)"
        )
    } else {
        format!(
            "holds {found}; relora replaces only its own earlier output, so nothing was \
             changed: choose another path, or move that away first"
        )
    }
}

/// Adds context to candle results: `x.matmul(&w).ctx("q_proj forward")?`.
pub(crate) trait TensorContext<T> {
    /// Converts a candle error into [`Error::Tensor`] with the given context.
    fn ctx(self, context: &str) -> Result<T>;
    /// Like [`TensorContext::ctx`], with the context built lazily.
    fn with_ctx<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T> TensorContext<T> for candle_core::Result<T> {
    fn ctx(self, context: &str) -> Result<T> {
        self.map_err(|e| Error::tensor(context, e))
    }
    fn with_ctx<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| Error::tensor(f(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_says_each_cause_once() {
        let e = Error::io(
            "/nonexistent",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        let text = report(&e);
        assert_eq!(text.matches("not found").count(), 1, "{text}");
        assert!(text.starts_with("/nonexistent: "), "{text}");
    }
}

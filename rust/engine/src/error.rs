//! The one error type of the engine. The Python binding maps each variant to
//! one exception class of `ckpt.errors` in a single place (`rust/py/errors.rs`).

use std::io;
use std::path::PathBuf;

/// Every failure the engine can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a path of the store.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The bytes of an object do not match its name (BLAKE3 of the raw bytes),
    /// or its payload does not decode to the recorded length.
    #[error("object {object} is damaged: {detail}")]
    Integrity { object: String, detail: String },
    /// An object or argument is not in a form this version understands.
    #[error("object {object}: {detail}")]
    Format { object: String, detail: String },
    /// An object the caller referenced is not in the store.
    #[error("object {object} is missing from the store")]
    Missing { object: String },
    /// The caller passed something unusable (sizes, targets, options).
    #[error("{0}")]
    Invalid(String),
    /// A save was refused before writing anything: its new chunks need more
    /// space than the file system has free.
    #[error("no space for this save: its new chunks need up to {needed} bytes (counted uncompressed) and {free} bytes are free; nothing was written")]
    NoSpace { needed: u64, free: u64 },
    /// A buffer for stored data could not be allocated.
    #[error("cannot allocate {bytes} bytes")]
    OutOfMemory { bytes: u64 },
}

/// Result alias of the engine.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// The object (hex digest) this error is about, when there is one.
    pub fn object(&self) -> Option<&str> {
        match self {
            Error::Integrity { object, .. }
            | Error::Format { object, .. }
            | Error::Missing { object } => Some(object),
            _ => None,
        }
    }
}

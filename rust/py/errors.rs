//! Engine errors become the exception classes of `ckpt.errors`, in this one place.

use ckpt_engine::Error;
use pyo3::exceptions::{PyMemoryError, PyOSError, PyValueError};
use pyo3::PyErr;

pyo3::import_exception!(ckpt.errors, IntegrityError);
pyo3::import_exception!(ckpt.errors, MissingObjectError);
pyo3::import_exception!(ckpt.errors, FormatError);
pyo3::import_exception!(ckpt.errors, StoreFullError);

/// errnos of a full store: no space, quota exceeded, file too large (RLIMIT_FSIZE).
const FULL: [i32; 3] = [libc_errno::ENOSPC, libc_errno::EDQUOT, libc_errno::EFBIG];

/// The errno values (Linux), without a libc dependency in the binding.
mod libc_errno {
    pub const ENOSPC: i32 = 28;
    pub const EDQUOT: i32 = 122;
    pub const EFBIG: i32 = 27;
}

/// Maps an engine error to its Python exception.
pub fn to_py(err: Error) -> PyErr {
    let message = err.to_string();
    match err {
        Error::Io { path, source, .. } => match source.raw_os_error() {
            // A full store is a StoreFullError (also an OSError with the errno).
            Some(errno) if FULL.contains(&errno) => {
                StoreFullError::new_err((errno, message, path.display().to_string()))
            }
            // OSError(errno, strerror, filename) picks the builtin subclass
            // (FileNotFoundError, PermissionError, ...) from the errno.
            Some(errno) => PyOSError::new_err((errno, message, path.display().to_string())),
            None => PyOSError::new_err(message),
        },
        Error::Integrity { object, .. } => IntegrityError::new_err((message, object)),
        Error::Missing { object } => MissingObjectError::new_err((message, object)),
        Error::Format { object, .. } => FormatError::new_err((message, object)),
        Error::Invalid(_) => PyValueError::new_err(message),
        Error::NoSpace { .. } => StoreFullError::new_err((libc_errno::ENOSPC, message)),
        Error::OutOfMemory { .. } => PyMemoryError::new_err(message),
    }
}

/// Short machine-readable kind of an error, for per-chunk reports.
pub fn kind(err: &Error) -> &'static str {
    match err {
        Error::Io { .. } => "io",
        Error::Integrity { .. } => "integrity",
        Error::Missing { .. } => "missing",
        Error::Format { .. } => "format",
        Error::Invalid(_) => "invalid",
        Error::NoSpace { .. } => "io",
        Error::OutOfMemory { .. } => "memory",
    }
}

//! The only PyO3 code of the project: buffers, errors and the exported functions.

pub mod buffers;
pub mod errors;
pub mod functions;

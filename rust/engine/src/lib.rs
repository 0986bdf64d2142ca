//! The engine of the ckpt checkpoint store: chunking, hashing (BLAKE3),
//! byte-group filtering, zstd compression and content-addressed object
//! storage. Pure Rust, no Python: the binding lives in `rust/py/`.
//!
//! The on-disk format is specified in `docs/format.md`.

pub mod backend;
pub mod bytegroup;
pub mod chunk;
pub mod error;
pub mod fault;
#[cfg(test)]
mod fuzz;
pub mod huff;
mod huff_pairs;
pub mod object_id;
pub mod pipeline;
pub mod plan;
pub mod pool;
mod prefetch;

pub use backend::{commit_file, Backend, LocalFs};
pub use chunk::EncodeOptions;
pub use error::{Error, Result};
pub use fault::FAULT_POINTS;
pub use object_id::ObjectId;
pub use pipeline::{
    restore, save, verify, BaseRef, ChunkInfo, ChunkRef, Placement, SaveOptions, Saved, Span,
    TensorIn,
};
pub use plan::ChunkParams;

//! The exported functions: a handful of calls over buffers. Each extracts
//! everything from Python objects first, then releases the GIL for the work.

use super::buffers::{export, RawBuf};
use super::errors::{kind, to_py};
use ckpt_engine::{
    pipeline, Backend, BaseRef, ChunkParams, ChunkRef, EncodeOptions, LocalFs, ObjectId, Placement,
    SaveOptions, TensorIn,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::path::PathBuf;

type SavedChunk = (String, u64, u64, bool, Option<String>, Option<u128>);
type SavedSpan = (usize, u64, u64);
type DepChunk = (String, u64, u64, Option<String>);
type SaveResult = (Vec<SavedChunk>, Vec<Vec<SavedSpan>>, Vec<DepChunk>);
/// `(offset, len, id, fingerprint)` of an earlier chunk of one buffer.
type OfferedBase = (u64, u64, String, Option<u128>);

fn parse_id(text: &str) -> PyResult<ObjectId> {
    ObjectId::parse(text).map_err(to_py)
}

fn chunk_refs(chunks: &[(String, u64)]) -> PyResult<Vec<ChunkRef>> {
    chunks
        .iter()
        .map(|(id, raw_len)| {
            Ok(ChunkRef {
                id: parse_id(id)?,
                raw_len: *raw_len,
            })
        })
        .collect()
}

/// Saves the bytes of `buffers` as chunks under the store `root`.
///
/// `bases` (optional, one list per buffer) offers chunks of an earlier
/// version `(offset, len, id, fingerprint or None)` that new chunks covering
/// exactly those bytes may be stored as deltas against, in chains of at most
/// `delta_depth`, and that such a chunk is taken to be when its XXH3-128
/// fingerprint matches (no BLAKE3 pass). `size_classes` picks the packing
/// rule of docs/format.md section 6 (False: the "width" rule of older stores).
///
/// Returns the distinct chunks `(id, raw_len, stored_len, written, base,
/// fingerprint)`,
/// per buffer its spans `(chunk index, offset in chunk, length)` in byte
/// order, and the delta bases that are not chunks themselves
/// `(id, raw_len, stored_len, base)` (every object a reader needs).
#[pyfunction]
#[pyo3(signature = (root, buffers, groups, *, chunk_size, small_threshold, level, min_saving, durable, threads=None, bases=None, delta_depth=0, size_classes=true))]
#[allow(clippy::too_many_arguments)]
pub fn save_chunks(
    py: Python<'_>,
    root: PathBuf,
    buffers: Vec<Bound<'_, PyAny>>,
    groups: Vec<usize>,
    chunk_size: usize,
    small_threshold: usize,
    level: i32,
    min_saving: f64,
    durable: bool,
    threads: Option<usize>,
    bases: Option<Vec<Vec<OfferedBase>>>,
    delta_depth: u32,
    size_classes: bool,
) -> PyResult<SaveResult> {
    if groups.len() != buffers.len() {
        return Err(PyValueError::new_err(format!(
            "{} buffers but {} group widths",
            buffers.len(),
            groups.len()
        )));
    }
    let bases: Vec<Vec<BaseRef>> = match bases {
        None => vec![Vec::new(); buffers.len()],
        Some(b) if b.len() != buffers.len() => {
            return Err(PyValueError::new_err(format!(
                "{} buffers but {} base lists",
                buffers.len(),
                b.len()
            )))
        }
        Some(b) => b
            .iter()
            .map(|list| {
                list.iter()
                    .map(|(offset, len, id, fingerprint)| {
                        Ok(BaseRef {
                            offset: *offset,
                            len: *len,
                            id: parse_id(id)?,
                            fingerprint: *fingerprint,
                        })
                    })
                    .collect::<PyResult<Vec<_>>>()
            })
            .collect::<PyResult<Vec<_>>>()?,
    };
    let (held, raw) = export(&buffers, false, "buffer")?;
    let opts = SaveOptions {
        chunks: ChunkParams {
            chunk_size,
            small_threshold,
            size_classes,
        },
        encode: EncodeOptions { level, min_saving },
        threads,
        delta_depth,
    };
    let result = py.detach(|| {
        let tensors: Vec<TensorIn<'_>> = raw
            .iter()
            .zip(&groups)
            .zip(&bases)
            .map(|((b, &group), bases)| TensorIn {
                // SAFETY: `held` pins each buffer until after this closure (module docs of `buffers`).
                data: unsafe { slice_of(b) },
                group,
                bases,
            })
            .collect();
        let backend = LocalFs::new(root, durable);
        pipeline::save(&backend, &tensors, &opts)
    });
    drop(held);
    let saved = result.map_err(to_py)?;
    let chunks = saved
        .chunks
        .iter()
        .map(|c| {
            let base = c.base.map(|b| b.hex());
            (
                c.id.hex(),
                c.raw_len,
                c.stored_len,
                c.written,
                base,
                c.fingerprint,
            )
        })
        .collect();
    let spans = saved
        .spans
        .iter()
        .map(|s| s.iter().map(|s| (s.chunk, s.offset, s.len)).collect())
        .collect();
    let deps = saved
        .deps
        .iter()
        .map(|c| (c.id.hex(), c.raw_len, c.stored_len, c.base.map(|b| b.hex())))
        .collect();
    Ok((chunks, spans, deps))
}

/// # Safety
/// `b` must come from a buffer export that outlives the returned slice.
unsafe fn slice_of<'a>(b: &RawBuf) -> &'a [u8] {
    if b.len == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(b.ptr, b.len)
    }
}

/// Reads chunks `(id, raw_len)` into the writable `targets` according to
/// `placements` `(chunk, chunk_offset, len, target, target_offset)`, verifying
/// every chunk's BLAKE3. Targets that are read-only, non-contiguous, share
/// memory, or are not exactly covered are refused before a byte is written.
#[pyfunction]
#[pyo3(signature = (root, chunks, targets, placements, *, threads=None))]
pub fn restore_chunks(
    py: Python<'_>,
    root: PathBuf,
    chunks: Vec<(String, u64)>,
    targets: Vec<Bound<'_, PyAny>>,
    placements: Vec<(usize, u64, u64, usize, u64)>,
    threads: Option<usize>,
) -> PyResult<()> {
    let refs = chunk_refs(&chunks)?;
    let placements: Vec<Placement> = placements.into_iter().map(Placement::from).collect();
    let (held, raw) = export(&targets, true, "target")?;
    let result = py.detach(|| {
        let mut outs: Vec<&mut [u8]> = raw
            .iter()
            .map(|b| {
                if b.len == 0 {
                    &mut [][..]
                } else {
                    // SAFETY: `held` pins each buffer until after this closure;
                    // `export` checked the buffers are writable and disjoint.
                    unsafe { std::slice::from_raw_parts_mut(b.ptr, b.len) }
                }
            })
            .collect();
        let backend = LocalFs::new(root, false);
        pipeline::restore(&backend, &refs, &mut outs, &placements, threads)
    });
    drop(held);
    result.map_err(to_py)
}

/// Re-reads and re-hashes chunks `(id, raw_len)`; per chunk `None` when sound,
/// else `(kind, message)` with kind one of integrity, missing, format, io.
#[pyfunction]
#[pyo3(signature = (root, chunks, *, threads=None))]
pub fn verify_chunks(
    py: Python<'_>,
    root: PathBuf,
    chunks: Vec<(String, u64)>,
    threads: Option<usize>,
) -> PyResult<Vec<Option<(String, String)>>> {
    let refs = chunk_refs(&chunks)?;
    let report = py
        .detach(|| pipeline::verify(&LocalFs::new(root, false), &refs, threads))
        .map_err(to_py)?;
    Ok(report
        .into_iter()
        .map(|r| r.map(|e| (kind(&e).to_string(), e.to_string())))
        .collect())
}

/// The base id each chunk `(id, raw_len)`'s header names: None for a full
/// chunk, and for one whose header cannot be read (verify reports that).
#[pyfunction]
#[pyo3(signature = (root, chunks, *, threads=None))]
pub fn chunk_bases(
    py: Python<'_>,
    root: PathBuf,
    chunks: Vec<(String, u64)>,
    threads: Option<usize>,
) -> PyResult<Vec<Option<String>>> {
    let refs = chunk_refs(&chunks)?;
    let bases = py
        .detach(|| pipeline::header_bases(&LocalFs::new(root, false), &refs, threads))
        .map_err(to_py)?;
    Ok(bases.into_iter().map(|b| b.map(|id| id.hex())).collect())
}

/// Checks that chunks `(id, raw_len)` exist with well-formed headers that
/// record that raw length and match their file size, without decoding them,
/// following delta chains. With `listed` (every object of the manifest as
/// `(id, base id or None)`), every link must be listed with the base its
/// header names. Raises the first problem found (MissingObjectError,
/// FormatError, IntegrityError).
#[pyfunction]
#[pyo3(signature = (root, chunks, *, threads=None, listed=None))]
pub fn probe_chunks(
    py: Python<'_>,
    root: PathBuf,
    chunks: Vec<(String, u64)>,
    threads: Option<usize>,
    listed: Option<Vec<(String, Option<String>)>>,
) -> PyResult<()> {
    let refs = chunk_refs(&chunks)?;
    let listed = listed
        .map(|l| {
            l.iter()
                .map(|(id, base)| Ok((parse_id(id)?, base.as_deref().map(parse_id).transpose()?)))
                .collect::<PyResult<std::collections::HashMap<_, _>>>()
        })
        .transpose()?;
    py.detach(|| pipeline::probe(&LocalFs::new(root, false), &refs, threads, listed.as_ref()))
        .map_err(to_py)
}

/// Every object in the store: `(id, stored_len)`, sorted by id.
#[pyfunction]
pub fn list_objects(py: Python<'_>, root: PathBuf) -> PyResult<Vec<(String, u64)>> {
    let objects = py
        .detach(|| LocalFs::new(root, false).list())
        .map_err(to_py)?;
    Ok(objects.into_iter().map(|(id, n)| (id.hex(), n)).collect())
}

/// Writes `data` atomically to `root/directory/name` (`directory` "" for the
/// root): temp file in `tmp/`, fsync, rename, fsync of the directory (no
/// fsync when not `durable`). For `directory == "versions"` this is a
/// manifest's commit.
#[pyfunction]
#[pyo3(signature = (root, directory, name, data, *, durable=true))]
pub fn commit_file(
    py: Python<'_>,
    root: PathBuf,
    directory: &str,
    name: &str,
    data: &[u8],
    durable: bool,
) -> PyResult<()> {
    py.detach(|| ckpt_engine::commit_file(&root, directory, name, data, durable))
        .map_err(to_py)
}

/// Deletes objects by id (absent ones are skipped); returns the bytes freed.
#[pyfunction]
#[pyo3(signature = (root, ids, *, durable=true))]
pub fn delete_objects(
    py: Python<'_>,
    root: PathBuf,
    ids: Vec<String>,
    durable: bool,
) -> PyResult<u64> {
    let ids: Vec<ObjectId> = ids.iter().map(|s| parse_id(s)).collect::<PyResult<_>>()?;
    py.detach(|| {
        let backend = LocalFs::new(root, durable);
        let mut freed = 0;
        for id in &ids {
            freed += backend.delete(id)?;
        }
        backend.flush()?;
        Ok(freed)
    })
    .map_err(to_py)
}

//! Python buffers held for the length of one call, read and written without
//! the GIL.
//!
//! Why this is sound: a buffer export (`PyObject_GetBuffer`) pins the memory
//! until `PyBuffer_Release`; an exporter such as `bytearray` refuses to resize
//! while exported, and numpy keeps the array's data alive. The `PyUntypedBuffer`
//! values live in the caller's frame until after the GIL-free section, so the
//! pointers stay valid for all of it. Another Python thread may still write to
//! the same memory concurrently; that changes the bytes we hash or fill (a
//! user-level race, exactly as with `hashlib` or `readinto`), not memory safety.

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// A pinned buffer's address and length, movable into a GIL-free section.
#[derive(Clone, Copy)]
pub struct RawBuf {
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: see the module comment: the exporting object keeps the memory alive
// and unmoved until the owning `PyUntypedBuffer` is released after the call.
unsafe impl Send for RawBuf {}
unsafe impl Sync for RawBuf {}

/// Exports the buffers of `objects`; refuses non-contiguous ones and, when
/// `writable`, read-only ones, before anything is read or written.
pub fn export(
    objects: &[Bound<'_, PyAny>],
    writable: bool,
    what: &str,
) -> PyResult<(Vec<PyUntypedBuffer>, Vec<RawBuf>)> {
    let mut held = Vec::with_capacity(objects.len());
    let mut raw = Vec::with_capacity(objects.len());
    for (i, obj) in objects.iter().enumerate() {
        let buf = PyUntypedBuffer::get(obj).map_err(|e| {
            PyTypeError::new_err(format!("{what} {i} does not export a buffer: {e}"))
        })?;
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err(format!(
                "{what} {i} is not C-contiguous"
            )));
        }
        if writable && buf.readonly() {
            return Err(PyValueError::new_err(format!(
                "{what} {i} is read-only; restore needs a writable array"
            )));
        }
        raw.push(RawBuf {
            ptr: buf.buf_ptr() as *mut u8,
            len: buf.len_bytes(),
        });
        held.push(buf);
    }
    if writable {
        check_disjoint(&raw, what)?;
    }
    Ok((held, raw))
}

/// Writable targets must not share memory: two mutable slices over the same
/// bytes would race when filled in parallel.
fn check_disjoint(bufs: &[RawBuf], what: &str) -> PyResult<()> {
    let mut ranges: Vec<(usize, usize, usize)> = bufs
        .iter()
        .enumerate()
        .filter(|(_, b)| b.len > 0)
        .map(|(i, b)| (b.ptr as usize, b.ptr as usize + b.len, i))
        .collect();
    ranges.sort();
    for pair in ranges.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(PyValueError::new_err(format!(
                "{what}s {} and {} share memory; give each its own array",
                pair[0].2, pair[1].2
            )));
        }
    }
    Ok(())
}

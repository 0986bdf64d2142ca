//! The heavy paths: save (hash, dedup, filter, compress, write), restore
//! (read, decode, verify into caller memory) and verify. Each runs its chunks
//! in parallel on rayon; results do not depend on the number of threads.

use crate::backend::{Backend, Mapped};
use crate::chunk::{self, Codec, EncodeOptions, Encoder, Filter, Header};
use crate::error::{Error, Result};
use crate::object_id::ObjectId;
use crate::plan::{plan, ChunkParams, PlannedChunk};
use crate::pool;
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Mutex;

/// One tensor to save: its bytes and the width of its items for byte
/// grouping (1 = none; the component size for floating dtypes).
pub struct TensorIn<'a> {
    pub data: &'a [u8],
    pub group: usize,
}

/// Options of [`save`].
#[derive(Clone, Copy, Debug, Default)]
pub struct SaveOptions {
    pub chunks: ChunkParams,
    pub encode: EncodeOptions,
    pub threads: Option<usize>,
}

/// A chunk referenced by a saved version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    pub id: ObjectId,
    pub raw_len: u64,
    pub stored_len: u64,
    /// True when this save wrote the object; false when it existed (dedup).
    pub written: bool,
}

/// Where a tensor's bytes are: `len` bytes at `offset` of chunk `chunk`
/// (an index into [`Saved::chunks`]); a tensor's spans are in byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub chunk: usize,
    pub offset: u64,
    pub len: u64,
}

/// The result of [`save`]: distinct chunks in first-use order, spans per tensor.
#[derive(Clone, Debug)]
pub struct Saved {
    pub chunks: Vec<ChunkInfo>,
    pub spans: Vec<Vec<Span>>,
}

/// Saves tensors as chunks. Chunks already in the store are neither
/// compressed nor written. Every written object is durable when this returns
/// (if the backend is). Nothing is written for a tensor list that fails validation.
pub fn save(backend: &dyn Backend, tensors: &[TensorIn<'_>], opts: &SaveOptions) -> Result<Saved> {
    validate_save_options(opts)?;
    let sizes: Vec<(usize, usize)> = tensors.iter().map(|t| (t.data.len(), t.group)).collect();
    let planned = plan(&sizes, opts.chunks);
    let claimed: Mutex<HashSet<ObjectId>> = Mutex::new(HashSet::new());
    let results: Vec<(ObjectId, Option<(u64, bool)>)> = pool::run_with(opts.threads, || {
        check_space(backend, tensors, &planned)?;
        planned
            .par_iter()
            .map(|c| save_chunk(backend, tensors, c, &opts.encode, &claimed))
            .collect::<Result<Vec<_>>>()
    })??;
    backend.flush()?;

    // Distinct chunks in first-use order; duplicates take the first one's sizes.
    let mut index: std::collections::HashMap<ObjectId, usize> = Default::default();
    let mut chunks: Vec<ChunkInfo> = Vec::new();
    let mut chunk_of_plan = Vec::with_capacity(planned.len());
    for (i, (id, info)) in results.iter().enumerate() {
        let slot = *index.entry(*id).or_insert_with(|| {
            chunks.push(ChunkInfo {
                id: *id,
                raw_len: planned[i].len as u64,
                stored_len: 0,
                written: false,
            });
            chunks.len() - 1
        });
        if let Some((stored, written)) = info {
            chunks[slot].stored_len = *stored;
            chunks[slot].written |= *written;
        }
        chunk_of_plan.push(slot);
    }
    let mut spans: Vec<Vec<Span>> = vec![Vec::new(); tensors.len()];
    for (i, c) in planned.iter().enumerate() {
        let mut offset = 0u64;
        for p in &c.pieces {
            // Pieces of a tensor are planned in byte order, so pushing keeps it.
            spans[p.tensor].push(Span {
                chunk: chunk_of_plan[i],
                offset,
                len: p.len as u64,
            });
            offset += p.len as u64;
        }
    }
    Ok(Saved { chunks, spans })
}

fn validate_save_options(opts: &SaveOptions) -> Result<()> {
    let c = opts.chunks;
    if c.chunk_size < 4096 || c.chunk_size as u64 > chunk::MAX_RAW_LEN {
        return Err(Error::Invalid(format!(
            "chunk_size must be between 4 KiB and {} MiB, got {}",
            chunk::MAX_RAW_LEN >> 20,
            c.chunk_size
        )));
    }
    if c.small_threshold > c.chunk_size {
        return Err(Error::Invalid(format!(
            "small_threshold ({}) must not exceed chunk_size ({})",
            c.small_threshold, c.chunk_size
        )));
    }
    if !(-7..=22).contains(&opts.encode.level) || opts.encode.level == 0 {
        return Err(Error::Invalid(format!(
            "zstd level must be 1..=22 or a fast level -7..=-1, got {}",
            opts.encode.level
        )));
    }
    if !(0.0..1.0).contains(&opts.encode.min_saving) {
        return Err(Error::Invalid(format!(
            "min_saving must be in [0, 1), got {}",
            opts.encode.min_saving
        )));
    }
    Ok(())
}

/// Most bytes a chunk file takes beyond its raw bytes (header of 16 planes,
/// each zstd plane at most 64 bytes over its raw length).
const CHUNK_OVERHEAD: u64 = (24 + 16 * chunk::MAX_PLANES as u64) + 64 * chunk::MAX_PLANES as u64;

/// Refuses a save whose new chunks cannot fit, before anything is written.
/// Costs one `free_space` call when the tensors fit even uncompressed and
/// undeduplicated (the common case); otherwise hashes every chunk first and
/// counts the ones the store lacks at their uncompressed size.
fn check_space(
    backend: &dyn Backend,
    tensors: &[TensorIn<'_>],
    planned: &[PlannedChunk],
) -> Result<()> {
    let Some(free) = backend.free_space()? else {
        return Ok(());
    };
    let total: u64 = planned.iter().map(|c| c.len as u64 + CHUNK_OVERHEAD).sum();
    if total <= free {
        return Ok(());
    }
    let ids: Vec<(ObjectId, u64)> = planned
        .par_iter()
        .map(|c| (ObjectId::of(&chunk_bytes(tensors, c)), c.len as u64))
        .collect();
    let mut seen = HashSet::new();
    let mut needed = 0u64;
    for (id, len) in ids {
        if seen.insert(id) && backend.stored_size(&id)?.is_none() {
            needed += len + CHUNK_OVERHEAD;
        }
    }
    if needed > free {
        return Err(Error::NoSpace { needed, free });
    }
    Ok(())
}

/// The raw bytes of a planned chunk: borrowed from its tensor, or packed.
fn chunk_bytes<'a>(tensors: &[TensorIn<'a>], c: &PlannedChunk) -> Cow<'a, [u8]> {
    if c.pieces.len() == 1 {
        let p = c.pieces[0];
        Cow::Borrowed(&tensors[p.tensor].data[p.offset..p.offset + p.len])
    } else {
        let mut packed = Vec::with_capacity(c.len);
        for p in &c.pieces {
            packed.extend_from_slice(&tensors[p.tensor].data[p.offset..p.offset + p.len]);
        }
        Cow::Owned(packed)
    }
}

/// Hashes one planned chunk in place (or its packed copy) and writes it unless
/// it exists or another worker of this save claimed it.
fn save_chunk(
    backend: &dyn Backend,
    tensors: &[TensorIn<'_>],
    c: &PlannedChunk,
    opts: &EncodeOptions,
    claimed: &Mutex<HashSet<ObjectId>>,
) -> Result<(ObjectId, Option<(u64, bool)>)> {
    let raw = chunk_bytes(tensors, c);
    let id = ObjectId::of(&raw);
    if !claimed.lock().expect("claim lock").insert(id) {
        return Ok((id, None));
    }
    if let Some(size) = backend.stored_size(&id)? {
        return Ok((id, Some((size, false))));
    }
    let mut encoder = match ENCODER.with(|cell| cell.take()) {
        Some(e) => e,
        None => Encoder::new()?,
    };
    let written = (|| {
        let enc = encoder.encode(&raw, c.group, opts)?;
        let mut parts: Vec<&[u8]> = Vec::with_capacity(1 + enc.payloads.len());
        parts.push(&enc.header);
        parts.extend(enc.payloads.iter().copied());
        backend.put(&id, &parts)?;
        Ok(enc.stored_len)
    })();
    ENCODER.with(|cell| cell.set(Some(encoder)));
    Ok((id, Some((written?, true))))
}

thread_local! {
    // Per-worker buffers, taken out while in use and put back afterwards, so
    // that a task rayon runs on this thread meanwhile finds none and makes
    // its own instead of aliasing them.
    static ENCODER: std::cell::Cell<Option<Encoder>> = const { std::cell::Cell::new(None) };
    static PAYLOAD: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    static PLANES: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    static CHUNK: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` with a per-thread buffer of exactly `len` bytes (contents
/// undefined). The sizes come from stored data (bounded by the format's
/// limits), so a failed allocation is an error, not an abort of the process.
fn with_buffer<R>(
    key: &'static std::thread::LocalKey<std::cell::Cell<Vec<u8>>>,
    len: usize,
    f: impl FnOnce(&mut [u8]) -> Result<R>,
) -> Result<R> {
    let mut buf = key.with(|cell| cell.take());
    if buf.len() < len {
        if buf.try_reserve_exact(len - buf.len()).is_err() {
            key.with(|cell| cell.set(buf));
            return Err(Error::OutOfMemory { bytes: len as u64 });
        }
        buf.resize(len, 0);
    }
    let result = f(&mut buf[..len]);
    key.with(|cell| cell.set(buf));
    result
}

/// A chunk to read: its id and the raw length the manifest records.
#[derive(Clone, Copy, Debug)]
pub struct ChunkRef {
    pub id: ObjectId,
    pub raw_len: u64,
}

/// Copy `len` bytes at `chunk_offset` of chunk `chunk` to `target_offset` of target `target`.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    pub chunk: usize,
    pub chunk_offset: u64,
    pub len: u64,
    pub target: usize,
    pub target_offset: u64,
}

impl From<(usize, u64, u64, usize, u64)> for Placement {
    /// `(chunk, chunk_offset, len, target, target_offset)`, the binding's tuple form.
    fn from(
        (chunk, chunk_offset, len, target, target_offset): (usize, u64, u64, usize, u64),
    ) -> Self {
        Placement {
            chunk,
            chunk_offset,
            len,
            target,
            target_offset,
        }
    }
}

struct SendPtr(*mut u8);
// SAFETY: the pointers address disjoint regions of the caller's targets
// (checked by `check_tiling` before any write), and the targets outlive the
// parallel section because `restore` borrows them mutably for its whole body.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Reads, decodes and verifies chunks into `targets`. The placements must
/// tile every target exactly (each byte written once); this is checked
/// before a byte is written, as are chunk bounds.
pub fn restore(
    backend: &dyn Backend,
    chunks: &[ChunkRef],
    targets: &mut [&mut [u8]],
    placements: &[Placement],
    threads: Option<usize>,
) -> Result<()> {
    let lens: Vec<u64> = targets.iter().map(|t| t.len() as u64).collect();
    check_tiling(chunks, &lens, placements)?;
    let mut by_chunk: Vec<Vec<Placement>> = vec![Vec::new(); chunks.len()];
    for p in placements {
        by_chunk[p.chunk].push(*p);
    }
    let bases: Vec<SendPtr> = targets
        .iter_mut()
        .map(|t| SendPtr(t.as_mut_ptr()))
        .collect();
    let work: Vec<(usize, &Vec<Placement>)> = by_chunk
        .iter()
        .enumerate()
        .filter(|(_, ps)| !ps.is_empty())
        .collect();
    pool::run_with(threads, || {
        work.par_iter().try_for_each(|(ci, ps)| {
            let c = chunks[*ci];
            let whole = ps.len() == 1 && ps[0].chunk_offset == 0 && ps[0].len == c.raw_len;
            if whole {
                let p = ps[0];
                // SAFETY: `check_tiling` proved [target_offset, +len) lies inside
                // target `p.target` and overlaps no other placement.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(
                        bases[p.target].0.add(p.target_offset as usize),
                        p.len as usize,
                    )
                };
                load_chunk(backend, &c, out)
            } else {
                // The header first: the scratch is sized by a checked raw length.
                let opened = open_chunk(backend, &c)?;
                with_buffer(&CHUNK, c.raw_len as usize, |scratch| {
                    decode_chunk(backend, &c, &opened, scratch)?;
                    scatter(scratch, ps, &bases);
                    Ok(())
                })
            }
        })
    })?
}

/// Copies the placements of one decoded chunk into their targets.
fn scatter(scratch: &[u8], ps: &[Placement], bases: &[SendPtr]) {
    for p in ps {
        // SAFETY: `check_tiling` proved each placement's region lies inside its
        // target and overlaps no other placement.
        let out = unsafe {
            std::slice::from_raw_parts_mut(
                bases[p.target].0.add(p.target_offset as usize),
                p.len as usize,
            )
        };
        let start = p.chunk_offset as usize;
        out.copy_from_slice(&scratch[start..start + p.len as usize]);
    }
}

/// Every target byte is covered exactly once and every placement lies inside its chunk.
fn check_tiling(chunks: &[ChunkRef], target_lens: &[u64], placements: &[Placement]) -> Result<()> {
    for c in chunks {
        if c.raw_len > chunk::MAX_RAW_LEN {
            return Err(Error::Format {
                object: c.id.hex(),
                detail: format!("recorded raw length {} exceeds the limit", c.raw_len),
            });
        }
    }
    let mut order: Vec<&Placement> = placements.iter().collect();
    for p in &order {
        if p.target >= target_lens.len() || p.chunk >= chunks.len() {
            return Err(Error::Invalid(format!(
                "placement refers to target {} of {} or chunk {} of {}",
                p.target,
                target_lens.len(),
                p.chunk,
                chunks.len()
            )));
        }
        let end = p.chunk_offset.checked_add(p.len);
        if p.len == 0 || end.is_none_or(|e| e > chunks[p.chunk].raw_len) {
            return Err(Error::Invalid(format!(
                "placement of {} bytes at {} lies outside chunk {} ({} bytes)",
                p.len, p.chunk_offset, chunks[p.chunk].id, chunks[p.chunk].raw_len
            )));
        }
    }
    order.sort_by_key(|p| (p.target, p.target_offset));
    let mut covered = vec![0u64; target_lens.len()];
    for p in order {
        if p.target_offset != covered[p.target] {
            return Err(Error::Invalid(format!(
                "placements of target {} leave a gap or overlap at byte {}",
                p.target, covered[p.target]
            )));
        }
        covered[p.target] += p.len;
    }
    for (t, (&got, &want)) in covered.iter().zip(target_lens).enumerate() {
        if got != want {
            return Err(Error::Invalid(format!(
                "target {t} is {want} bytes but its chunks hold {got}: wrong size"
            )));
        }
    }
    Ok(())
}

const HEAD_MAX: usize = 24 + 16 * chunk::MAX_PLANES;

/// A chunk whose header was read and checked (see [`open_chunk`]).
struct Opened {
    header: Header,
    size: u64,
    /// The whole file, when the backend maps objects.
    mapped: Option<Mapped>,
}

/// Checks chunk `c`'s header: it parses (magic, format version, filter,
/// codecs), records the raw length the manifest expects, and the file has
/// exactly the size the header says.
fn check_header(head: &[u8], size: u64, c: &ChunkRef) -> Result<Header> {
    let object = c.id.hex();
    if c.raw_len > chunk::MAX_RAW_LEN {
        return Err(Error::Format {
            object,
            detail: format!("recorded raw length {} exceeds the limit", c.raw_len),
        });
    }
    let header = Header::parse(head, &object)?;
    if header.raw_len != c.raw_len {
        return Err(Error::Format {
            object,
            detail: format!(
                "chunk holds {} raw bytes, the manifest records {}",
                header.raw_len, c.raw_len
            ),
        });
    }
    if size != header.file_len() {
        return Err(Error::Integrity {
            object,
            detail: format!(
                "file is {size} bytes, its header says {}",
                header.file_len()
            ),
        });
    }
    Ok(header)
}

/// Reads and checks chunk `c`'s header (see [`check_header`]) with one
/// `pread`, without mapping the file.
fn read_header(backend: &dyn Backend, c: &ChunkRef) -> Result<Header> {
    let mut head = [0u8; HEAD_MAX];
    let (n, size) = backend.read_at(&c.id, 0, &mut head)?;
    check_header(&head[..n], size, c)
}

/// Opens chunk `c` for decoding: maps it when the backend can (its header is
/// then checked from the mapping), else reads and checks its header.
fn open_chunk(backend: &dyn Backend, c: &ChunkRef) -> Result<Opened> {
    if c.raw_len >= MAP_RAW_MIN {
        if let Some(m) = backend.map(&c.id)? {
            let header = check_header(&m[..m.len().min(HEAD_MAX)], m.len() as u64, c)?;
            return Ok(Opened {
                header,
                size: m.len() as u64,
                mapped: Some(m),
            });
        }
    }
    let header = read_header(backend, c)?;
    let size = header.file_len();
    Ok(Opened {
        header,
        size,
        mapped: None,
    })
}

/// Chunks of fewer raw bytes are read, not mapped (a mapping costs more).
const MAP_RAW_MIN: u64 = 1 << 20;

/// Checks the headers of `chunks` (see `check_header`) without decoding them:
/// what a load does before it allocates its arrays, so that a manifest that
/// names missing, foreign or mismatched chunks fails before a large
/// allocation and before a byte of the caller's arrays is overwritten.
pub fn probe(backend: &dyn Backend, chunks: &[ChunkRef], threads: Option<usize>) -> Result<()> {
    pool::run_with(threads, || {
        chunks
            .par_iter()
            .try_for_each(|c| read_header(backend, c).map(|_| ()))
    })?
}

/// Bytes of an unfiltered raw chunk read (then hashed) per call.
const RAW_READ_BLOCK: usize = 1 << 20;

/// Reads chunk `c` into `out` (exactly its raw length) and verifies its hash.
pub fn load_chunk(backend: &dyn Backend, c: &ChunkRef, out: &mut [u8]) -> Result<()> {
    let opened = open_chunk(backend, c)?;
    decode_chunk(backend, c, &opened, out)
}

/// Decodes chunk `c`, opened by `open_chunk`, into `out` and verifies its hash.
fn decode_chunk(
    backend: &dyn Backend,
    c: &ChunkRef,
    opened: &Opened,
    out: &mut [u8],
) -> Result<()> {
    let object = c.id.hex();
    if out.len() as u64 != c.raw_len {
        return Err(Error::Invalid(format!(
            "a target of {} bytes for chunk {object} of {} bytes",
            out.len(),
            c.raw_len
        )));
    }
    let header = &opened.header;
    let start = header.header_len() as u64;
    let mut hasher = blake3::Hasher::new();
    let decode_from = |payload: &[u8], hasher: &mut blake3::Hasher, out: &mut [u8]| {
        let mut planes = PLANES.with(|cell| cell.take());
        let decoded =
            chunk::decode_payload(header, payload, &object, out, &mut planes, Some(hasher));
        PLANES.with(|cell| cell.set(planes));
        decoded
    };
    if let Some(m) = &opened.mapped {
        decode_from(&m[start as usize..], &mut hasher, out)?;
    } else if header.filter == Filter::None && header.planes[0].0 == Codec::Raw {
        // Read and hash a cache-sized piece at a time: one pass over `out`.
        let mut done = 0usize;
        while done < out.len() {
            let end = (done + RAW_READ_BLOCK).min(out.len());
            let (got, _) = backend.read_at(&c.id, start + done as u64, &mut out[done..end])?;
            if got != end - done {
                return Err(Error::Integrity {
                    object,
                    detail: format!(
                        "file ends after {} of {} payload bytes",
                        done + got,
                        out.len()
                    ),
                });
            }
            hasher.update(&out[done..end]);
            done = end;
        }
    } else {
        let len = (opened.size - start) as usize;
        with_buffer(&PAYLOAD, len, |payload| {
            let (got, _) = backend.read_at(&c.id, start, payload)?;
            decode_from(&payload[..got], &mut hasher, out)
        })?;
    }
    let actual = ObjectId(*hasher.finalize().as_bytes());
    if actual != c.id {
        return Err(Error::Integrity {
            object,
            detail: format!("content hashes to {actual}"),
        });
    }
    Ok(())
}

/// Re-reads and re-hashes chunks; returns `None` per sound chunk, the error otherwise.
pub fn verify(
    backend: &dyn Backend,
    chunks: &[ChunkRef],
    threads: Option<usize>,
) -> Result<Vec<Option<Error>>> {
    pool::run_with(threads, || {
        chunks
            .par_iter()
            .map(|c| {
                // The header first: the scratch is sized by a checked raw length.
                let opened = open_chunk(backend, c)?;
                with_buffer(&CHUNK, c.raw_len as usize, |scratch| {
                    decode_chunk(backend, c, &opened, scratch)
                })
            })
            .map(Result::err)
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalFs;

    fn store() -> (tempfile::TempDir, LocalFs) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("objects")).unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        let fs = LocalFs::new(dir.path(), true);
        (dir, fs)
    }

    fn data(n: usize, seed: u32) -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
            .collect()
    }

    fn opts(threads: usize) -> SaveOptions {
        SaveOptions {
            chunks: ChunkParams {
                chunk_size: 64 << 10,
                small_threshold: 16 << 10,
            },
            threads: Some(threads),
            ..Default::default()
        }
    }

    fn restore_all(fs: &LocalFs, saved: &Saved, lens: &[usize]) -> Vec<Vec<u8>> {
        let chunks: Vec<ChunkRef> = saved
            .chunks
            .iter()
            .map(|c| ChunkRef {
                id: c.id,
                raw_len: c.raw_len,
            })
            .collect();
        let mut placements = Vec::new();
        for (t, spans) in saved.spans.iter().enumerate() {
            let mut off = 0;
            for s in spans {
                placements.push(Placement {
                    chunk: s.chunk,
                    chunk_offset: s.offset,
                    len: s.len,
                    target: t,
                    target_offset: off,
                });
                off += s.len;
            }
        }
        let mut outs: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0u8; n]).collect();
        let mut targets: Vec<&mut [u8]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
        restore(fs, &chunks, &mut targets, &placements, Some(2)).unwrap();
        outs
    }

    #[test]
    fn round_trip_dedup_and_thread_independence() {
        let (dir, fs) = store();
        let tensors_data = [
            data(300_000, 1),
            data(1000, 2),
            data(0, 3),
            data(5000, 4),
            data(300_000, 1),
        ];
        let tensors: Vec<TensorIn> = tensors_data
            .iter()
            .map(|d| TensorIn { data: d, group: 4 })
            .collect();
        let lens: Vec<usize> = tensors_data.iter().map(|d| d.len()).collect();
        let saved = save(&fs, &tensors, &opts(1)).unwrap();
        assert!(saved.chunks.iter().all(|c| c.written));
        // the two identical tensors share their chunks
        assert_eq!(saved.spans[0], saved.spans[4]);
        assert!(saved.spans[2].is_empty());
        assert_eq!(restore_all(&fs, &saved, &lens), tensors_data.to_vec());

        let files: Vec<_> = fs.list().unwrap();
        let again = save(&fs, &tensors, &opts(2)).unwrap();
        assert!(again.chunks.iter().all(|c| !c.written));
        assert_eq!(
            again.chunks,
            saved
                .chunks
                .iter()
                .map(|c| ChunkInfo {
                    written: false,
                    ..c.clone()
                })
                .collect::<Vec<_>>()
        );
        assert_eq!(fs.list().unwrap(), files);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );

        // same bytes on disk whatever the thread count
        let (_d2, fs2) = store();
        save(&fs2, &tensors, &opts(2)).unwrap();
        for (id, _) in files {
            let h = id.hex();
            let a = std::fs::read(dir.path().join("objects").join(&h[..2]).join(&h[2..])).unwrap();
            let b = std::fs::read(_d2.path().join("objects").join(&h[..2]).join(&h[2..])).unwrap();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn flipped_byte_is_an_integrity_error_naming_the_object() {
        let (dir, fs) = store();
        let d = data(100_000, 9);
        let saved = save(&fs, &[TensorIn { data: &d, group: 1 }], &opts(1)).unwrap();
        let victim = saved.chunks[0].id.hex();
        let path = dir
            .path()
            .join("objects")
            .join(&victim[..2])
            .join(&victim[2..]);
        let mut bytes = std::fs::read(&path).unwrap();
        let k = bytes.len() - 10;
        bytes[k] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let chunks: Vec<ChunkRef> = saved
            .chunks
            .iter()
            .map(|c| ChunkRef {
                id: c.id,
                raw_len: c.raw_len,
            })
            .collect();
        let report = verify(&fs, &chunks, None).unwrap();
        match report[0].as_ref().unwrap() {
            Error::Integrity { object, .. } => assert_eq!(object, &victim),
            e => panic!("unexpected {e:?}"),
        }
        assert!(report[1..].iter().all(|r| r.is_none()));
    }

    #[test]
    fn wrong_sized_targets_are_refused_before_writing() {
        let (_dir, fs) = store();
        let d = data(10_000, 5);
        let saved = save(&fs, &[TensorIn { data: &d, group: 1 }], &opts(1)).unwrap();
        let chunks = vec![ChunkRef {
            id: saved.chunks[0].id,
            raw_len: saved.chunks[0].raw_len,
        }];
        let placement = Placement {
            chunk: 0,
            chunk_offset: 0,
            len: 10_000,
            target: 0,
            target_offset: 0,
        };
        let mut small = vec![7u8; 9_999];
        let err = restore(
            &fs,
            &chunks,
            &mut [small.as_mut_slice()],
            &[placement],
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("outside") || err.to_string().contains("wrong size"),
            "{err}"
        );
        assert!(small.iter().all(|&b| b == 7));
        let mut big = vec![7u8; 10_001];
        assert!(restore(&fs, &chunks, &mut [big.as_mut_slice()], &[placement], None).is_err());
        assert!(big.iter().all(|&b| b == 7));
    }

    #[test]
    fn bad_options_are_refused() {
        let (_dir, fs) = store();
        let mut o = opts(1);
        o.chunks.chunk_size = 10;
        assert!(matches!(save(&fs, &[], &o), Err(Error::Invalid(_))));
        let mut o = opts(1);
        o.threads = Some(0);
        assert!(matches!(save(&fs, &[], &o), Err(Error::Invalid(_))));
    }
}

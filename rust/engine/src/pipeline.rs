//! The heavy paths: save (hash, dedup, filter, compress, write), restore
//! (read, decode, verify into caller memory) and verify. Each runs its chunks
//! in parallel on rayon; results do not depend on the number of threads.

use crate::backend::{Backend, Mapped};
use crate::chunk::{self, Codec, EncodeOptions, Encoder, Filter, Header, Splitter};
use crate::error::{Error, Result};
use crate::object_id::ObjectId;
use crate::plan::{plan, ChunkParams, PlannedChunk};
use crate::pool;
use rayon::prelude::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// One tensor to save: its bytes and the width of its items for byte
/// grouping (1 = none; the component size for floating dtypes).
pub struct TensorIn<'a> {
    pub data: &'a [u8],
    pub group: usize,
    /// Chunks of an earlier version of this tensor that new chunks covering
    /// the same bytes may be stored as deltas against (see [`BaseRef`]).
    pub bases: &'a [BaseRef],
}

/// Bytes `[offset, offset + len)` of a tensor were chunk `id` in an earlier
/// version: a new chunk covering exactly those bytes may become a delta on
/// it, and when its XXH3-128 `fingerprint` (of chunk `id`'s raw bytes) is
/// known and the new bytes have the same one, they are taken to be chunk
/// `id` without BLAKE3-hashing them. Only a 128-bit collision between the
/// new bytes and that one chunk (about 2^-128 for bytes nobody crafted)
/// could make the version keep the old bytes; whoever could craft one
/// controls the tensor's values anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaseRef {
    pub offset: u64,
    pub len: u64,
    pub id: ObjectId,
    pub fingerprint: Option<u128>,
}

/// Options of [`save`].
#[derive(Clone, Copy, Debug, Default)]
pub struct SaveOptions {
    pub chunks: ChunkParams,
    pub encode: EncodeOptions,
    pub threads: Option<usize>,
    /// Longest delta chain a new chunk may end (0: never write deltas).
    pub delta_depth: u32,
}

/// A chunk referenced by a saved version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    pub id: ObjectId,
    pub raw_len: u64,
    pub stored_len: u64,
    /// True when this save wrote the object; false when it existed (dedup).
    pub written: bool,
    /// The base of a delta chunk (which a reader needs as well).
    pub base: Option<ObjectId>,
    /// XXH3-128 of the raw bytes, for chunks that are one piece of one
    /// tensor of at least [`FINGERPRINT_MIN`] bytes (see [`BaseRef`]).
    pub fingerprint: Option<u128>,
}

/// Where a tensor's bytes are: `len` bytes at `offset` of chunk `chunk`
/// (an index into [`Saved::chunks`]); a tensor's spans are in byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub chunk: usize,
    pub offset: u64,
    pub len: u64,
}

/// The result of [`save`]: distinct chunks in first-use order, spans per
/// tensor, and the bases of delta chunks that are not chunks themselves
/// (transitively: every object a reader of the chunks needs).
#[derive(Clone, Debug)]
pub struct Saved {
    pub chunks: Vec<ChunkInfo>,
    pub spans: Vec<Vec<Span>>,
    pub deps: Vec<ChunkInfo>,
}

/// What `save_chunk` learnt of a chunk: none when another worker of this
/// save claimed it, else its stored size, whether this save wrote it, and
/// its base when it is a delta.
type ChunkOutcome = Option<(u64, bool, Option<ObjectId>)>;

/// Saves tensors as chunks. Chunks already in the store are neither
/// compressed nor written. Every written object is durable when this returns
/// (if the backend is). Nothing is written for a tensor list that fails validation.
pub fn save(backend: &dyn Backend, tensors: &[TensorIn<'_>], opts: &SaveOptions) -> Result<Saved> {
    validate_save_options(opts)?;
    let sizes: Vec<(usize, usize)> = tensors.iter().map(|t| (t.data.len(), t.group)).collect();
    let planned = plan(&sizes, opts.chunks);
    let shared = SaveShared {
        claimed: Mutex::new(HashSet::new()),
        existing: AtomicBool::new(false),
    };
    let results: Vec<(ObjectId, Option<u128>, ChunkOutcome)> =
        pool::run_with(opts.threads, || {
            check_space(backend, tensors, &planned)?;
            // Largest chunks first, each worker taking the next one when it is
            // free: a large chunk left for last would keep one worker busy
            // while the others idle (MiniLM saves, interleaved A/B against
            // plan order: 2-7% faster).
            let mut order: Vec<usize> = (0..planned.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(planned[i].len));
            let mut done = order
                .into_iter()
                .par_bridge()
                .map(|i| {
                    let c = &planned[i];
                    with_encoder(|e| {
                        with_chunk_bytes(tensors, c, |raw| {
                            save_chunk(backend, tensors, c, raw, opts, &shared, e)
                        })
                    })
                    .map(|r| (i, r))
                })
                .collect::<Result<Vec<_>>>()?;
            done.sort_unstable_by_key(|(i, _)| *i);
            Ok(done.into_iter().map(|(_, r)| r).collect())
        })??;
    backend.flush()?;

    // Distinct chunks in first-use order; duplicates take the first one's sizes.
    let mut index: std::collections::HashMap<ObjectId, usize> = Default::default();
    let mut chunks: Vec<ChunkInfo> = Vec::new();
    let mut chunk_of_plan = Vec::with_capacity(planned.len());
    for (i, (id, fingerprint, info)) in results.iter().enumerate() {
        let slot = *index.entry(*id).or_insert_with(|| {
            chunks.push(ChunkInfo {
                id: *id,
                raw_len: planned[i].len as u64,
                stored_len: 0,
                written: false,
                base: None,
                fingerprint: None,
            });
            chunks.len() - 1
        });
        if fingerprint.is_some() {
            chunks[slot].fingerprint = *fingerprint;
        }
        if let Some((stored, written, base)) = info {
            chunks[slot].stored_len = *stored;
            chunks[slot].written |= *written;
            chunks[slot].base = *base;
        }
        chunk_of_plan.push(slot);
    }
    let deps = chain_deps(backend, &chunks, &index)?;
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
    Ok(Saved {
        chunks,
        spans,
        deps,
    })
}

/// The bases of the delta chunks among `chunks` that are not chunks
/// themselves, following each chain to its full chunk (headers only).
fn chain_deps(
    backend: &dyn Backend,
    chunks: &[ChunkInfo],
    index: &std::collections::HashMap<ObjectId, usize>,
) -> Result<Vec<ChunkInfo>> {
    let mut deps: Vec<ChunkInfo> = Vec::new();
    let mut seen: HashSet<ObjectId> = HashSet::new();
    for c in chunks {
        let mut next = c.base;
        while let Some(id) = next {
            if index.contains_key(&id) || !seen.insert(id) {
                break; // listed already, with its own chain
            }
            let r = ChunkRef {
                id,
                raw_len: c.raw_len,
            };
            let header = read_header(backend, &r)?;
            let base = header.delta.map(|d| d.base);
            deps.push(ChunkInfo {
                id,
                raw_len: c.raw_len,
                stored_len: header.file_len(),
                written: false,
                base,
                fingerprint: None,
            });
            next = base;
        }
    }
    Ok(deps)
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
        .map(|c| (with_chunk_bytes(tensors, c, ObjectId::of), c.len as u64))
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

/// What the workers of one save share.
struct SaveShared {
    /// Chunks a worker of this save has taken on (the others skip them).
    claimed: Mutex<HashSet<ObjectId>>,
    /// Set at the first chunk found stored (see [`save_chunk`]).
    existing: AtomicBool,
}

/// Runs `f` with the raw bytes of a planned chunk: borrowed from its tensor,
/// or packed into this thread's `PACK` buffer. The buffer is kept between
/// chunks (up to [`PACK_KEEP`]): a fresh one per pack costs a mapping and a
/// page fault per 4 KiB wherever the allocator does not recycle it (MiniLM
/// bf16 saves with glibc's thresholds fixed: 1,900 faults each, and about
/// 12 ms of CPU that keeping the buffer saves). A task rayon runs on this thread while the buffer is out (BLAKE3
/// of a chunk of 1 MiB or more joins) finds none and makes its own.
fn with_chunk_bytes<R>(
    tensors: &[TensorIn<'_>],
    c: &PlannedChunk,
    f: impl FnOnce(&[u8]) -> R,
) -> R {
    if let [p] = c.pieces[..] {
        return f(&tensors[p.tensor].data[p.offset..p.offset + p.len]);
    }
    with_vec(&PACK, |packed| {
        packed.clear();
        packed.reserve_exact(c.len);
        for p in &c.pieces {
            packed.extend_from_slice(&tensors[p.tensor].data[p.offset..p.offset + p.len]);
        }
        let r = f(packed);
        if packed.capacity() > PACK_KEEP {
            *packed = Vec::new(); // a pack of a store with huge chunks: not kept
        }
        r
    })
}

/// Largest pack buffer a worker keeps between chunks (twice the default
/// chunk size: tiny tensors share packs of up to one chunk).
const PACK_KEEP: usize = 16 << 20;

/// Hashes one planned chunk (its bytes `raw`, see [`with_chunk_bytes`]) and
/// writes it unless it exists or another worker of this save claimed it: as
/// a delta when a base is offered and the delta is small, else as a full
/// chunk.
fn save_chunk(
    backend: &dyn Backend,
    tensors: &[TensorIn<'_>],
    c: &PlannedChunk,
    raw: &[u8],
    opts: &SaveOptions,
    shared: &SaveShared,
    encoder: &mut Encoder,
) -> Result<(ObjectId, Option<u128>, ChunkOutcome)> {
    // Split while hashing only while this save has met no stored chunk: a
    // save whose chunks mostly exist (a restarted run) would split for nothing.
    let (id, fingerprint, presplit) = if shared.existing.load(Ordering::Relaxed) {
        let (id, fingerprint) = identify(tensors, c, raw, None);
        (id, fingerprint, None)
    } else {
        let mut splitter = encoder.splitter(raw, c.group);
        let (id, fingerprint) = identify(tensors, c, raw, splitter.as_mut());
        (id, fingerprint, splitter.and_then(Splitter::finish))
    };
    if !shared.claimed.lock().expect("claim lock").insert(id) {
        shared.existing.store(true, Ordering::Relaxed);
        return Ok((id, fingerprint, None));
    }
    if let Some(size) = backend.stored_size(&id)? {
        shared.existing.store(true, Ordering::Relaxed);
        // A delta object's base must be listed by the version as well.
        let r = ChunkRef {
            id,
            raw_len: c.len as u64,
        };
        // a damaged object stays referenced as it is (verify reports it)
        let base = read_header(backend, &r)
            .ok()
            .and_then(|h| h.delta.map(|d| d.base));
        return Ok((id, fingerprint, Some((size, false, base))));
    }
    if let Some((header, frame_len, delta)) = try_delta(backend, tensors, c, raw, opts)? {
        with_vec(&FRAME, |frame| {
            backend.put(&id, &[&header, &frame[..frame_len]])
        })?;
        let stored = (header.len() + frame_len) as u64;
        return Ok((id, fingerprint, Some((stored, true, Some(delta.base)))));
    }
    let cuts = pack_cuts(c);
    let enc = encoder.encode_cut(raw, c.group, &opts.encode, &cuts, presplit)?;
    let mut parts: Vec<&[u8]> = Vec::with_capacity(1 + enc.payloads.len());
    parts.push(&enc.header);
    parts.extend(enc.payloads.iter().copied());
    backend.put(&id, &parts)?;
    Ok((id, fingerprint, Some((enc.stored_len, true, None))))
}

/// Pieces of a pack at least this long start entropy-coder blocks of their own.
const CUT_MIN: usize = 32 << 10;

/// Where the pieces of a pack start (see [`Encoder::encode_cut`]): at each
/// boundary between two pieces of at least [`CUT_MIN`] bytes, so that a
/// pack of biases is not cut into blocks too small to code.
fn pack_cuts(c: &PlannedChunk) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut at = 0;
    for pair in c.pieces.windows(2) {
        at += pair[0].len;
        if pair[0].len >= CUT_MIN && pair[1].len >= CUT_MIN {
            cuts.push(at);
        }
    }
    cuts
}

/// Chunks of at least this many bytes that are one piece of one tensor get
/// a fingerprint (see [`BaseRef`]).
pub const FINGERPRINT_MIN: usize = 64 << 10;

/// The id of a planned chunk and, for one-piece chunks, its fingerprint:
/// taken from the tensor's [`BaseRef`] when the fingerprints agree (no
/// BLAKE3 pass), else BLAKE3 and XXH3 computed in one pass over the bytes.
///
/// With a `split`, the one pass also splits each block into the encoder's
/// planes while it is in cache (only on that path: a chunk with a known
/// fingerprint is most likely unchanged, so it is not split ahead).
fn identify(
    tensors: &[TensorIn<'_>],
    c: &PlannedChunk,
    raw: &[u8],
    mut split: Option<&mut Splitter<'_>>,
) -> (ObjectId, Option<u128>) {
    if c.pieces.len() != 1 || raw.len() < FINGERPRINT_MIN {
        return (ObjectId::of(raw), None);
    }
    let p = c.pieces[0];
    let known = tensors[p.tensor]
        .bases
        .iter()
        .find(|b| b.offset == p.offset as u64 && b.len == p.len as u64 && b.fingerprint.is_some());
    if let Some(k) = known {
        let fingerprint = fingerprint(raw);
        if Some(fingerprint) == k.fingerprint {
            return (k.id, Some(fingerprint));
        }
        return (ObjectId::of(raw), Some(fingerprint));
    }
    // Both hashes from one read of the bytes, a cache-sized block at a time.
    let mut blake = blake3::Hasher::new();
    let mut xxh = twox_hash::XxHash3_128::new();
    for block in raw.chunks(HASH_BLOCK) {
        blake.update(block);
        xxh.write(block);
        if let Some(s) = split.as_deref_mut() {
            s.feed(block);
        }
    }
    (
        ObjectId(*blake.finalize().as_bytes()),
        Some(xxh.finish_128()),
    )
}

/// XXH3-128 of `raw`, the same value as `XxHash3_128::oneshot`, reading
/// ahead of the hasher.
///
/// A chunk that is most likely unchanged is read only for this, straight
/// from memory. Hashed in one call, the reads and the hashing took turns:
/// 5.1-5.5 GB/s on one core where the hasher alone does 28 GB/s in cache
/// and a plain read ~7.6. Fed [`FP_STEP`] bytes at a time, with the lines
/// [`FP_AHEAD`] bytes further on prefetched before each step, the loads are
/// in flight while it hashes: 8.4-9.2 GB/s on one core, 11-14 on two
/// (against 7-8 in one call), on 1 GiB in 8 MiB chunks. The same
/// prefetching in the one pass of BLAKE3, XXH3 and the split (16 KiB steps)
/// measured 1.02 of the CPU without it on full saves, and is not done.
fn fingerprint(raw: &[u8]) -> u128 {
    let mut h = twox_hash::XxHash3_128::new();
    let mut ahead = 0;
    for (k, step) in raw.chunks(FP_STEP).enumerate() {
        crate::prefetch::until(
            raw,
            &mut ahead,
            ((k + 1) * FP_STEP + FP_AHEAD).min(raw.len()),
        );
        h.write(step);
    }
    h.finish_128()
}

/// Bytes [`fingerprint`] hashes per step.
const FP_STEP: usize = 2 << 10;
/// How far ahead of the step being hashed [`fingerprint`] prefetches.
const FP_AHEAD: usize = 4 << 10;

/// Bytes hashed (and split) per step of [`identify`]: a multiple of every
/// item width, small enough to stay in a core's L2 cache between passes.
const HASH_BLOCK: usize = 256 << 10;

/// Chunks smaller than this are never stored as deltas.
pub const DELTA_MIN_LEN: u64 = 64 << 10;
/// A delta is kept only when its frame is at most this share of the raw bytes.
const DELTA_MAX_RATIO: f64 = 0.25;
/// Share of sampled items that must be unchanged for a delta to be tried.
const DELTA_MIN_SAME: f64 = 0.5;

/// Encodes chunk `c` as a delta on the base its tensor offers for exactly its
/// bytes, when there is one, the chain stays within `delta_depth`, a sample
/// says most items are unchanged, and the delta is small. Returns the
/// header, the frame length (the frame is in this thread's `FRAME`) and the
/// delta; `None` to write a full chunk. A base that is missing or damaged
/// only means no delta (it is verified before anything is built on it).
fn try_delta(
    backend: &dyn Backend,
    tensors: &[TensorIn<'_>],
    c: &PlannedChunk,
    raw: &[u8],
    opts: &SaveOptions,
) -> Result<Option<(Vec<u8>, usize, chunk::Delta)>> {
    if opts.delta_depth == 0 || c.pieces.len() != 1 || (c.len as u64) < DELTA_MIN_LEN {
        return Ok(None);
    }
    let p = c.pieces[0];
    let Some(b) = tensors[p.tensor]
        .bases
        .iter()
        .find(|b| b.offset == p.offset as u64 && b.len == p.len as u64)
    else {
        return Ok(None);
    };
    let bref = ChunkRef {
        id: b.id,
        raw_len: raw.len() as u64,
    };
    // The header and a sample with small reads; the base is mapped (and
    // decoded) only when a delta looks worth it.
    let Ok(header) = read_header(backend, &bref) else {
        return Ok(None);
    };
    let depth = header.depth() + 1;
    if depth > opts.delta_depth || !promising(backend, &bref, &header, raw)? {
        return Ok(None);
    }
    let Ok(opened) = open_chunk(backend, &bref) else {
        return Ok(None);
    };
    with_buffer(&BASE, raw.len(), |base| {
        if decode_chunk(backend, &bref, &opened, base).is_err() {
            return Ok(None);
        }
        let limit = (raw.len() as f64 * DELTA_MAX_RATIO) as usize;
        let (patch_len, frame_len) = with_vec(&DELTA, |patch| {
            patch.clear();
            chunk::build_patch(raw, base, patch);
            let frame_len = if patch.len() > limit * 2 {
                Ok(usize::MAX) // changed too much to compress within the limit
            } else {
                with_vec(&FRAME, |frame| compress_delta(patch, frame))
            };
            (patch.len() as u32, frame_len)
        });
        let frame_len = frame_len?;
        if frame_len > limit {
            return Ok(None);
        }
        let delta = chunk::Delta {
            base: b.id,
            depth,
            patch_len,
        };
        let header = chunk::delta_header(raw.len() as u64, frame_len as u64, delta);
        Ok(Some((header, frame_len, delta)))
    })
}

/// Runs `f` with this thread's `key` vector (taken out meanwhile, so a
/// nested user of the same key gets a fresh one instead of aliasing it).
fn with_vec<R>(
    key: &'static std::thread::LocalKey<std::cell::Cell<Vec<u8>>>,
    f: impl FnOnce(&mut Vec<u8>) -> R,
) -> R {
    let mut v = key.with(|cell| cell.take());
    let r = f(&mut v);
    key.with(|cell| cell.set(v));
    r
}

/// Runs `f` with this thread's [`Encoder`] (made on first use), kept for
/// the thread's next chunk.
fn with_encoder<R>(f: impl FnOnce(&mut Encoder) -> Result<R>) -> Result<R> {
    let mut encoder = match ENCODER.with(|cell| cell.take()) {
        Some(e) => e,
        None => Encoder::new()?,
    };
    let r = f(&mut encoder);
    ENCODER.with(|cell| cell.set(Some(encoder)));
    r
}

/// Compresses a delta's patch into `frame` (zstd level 1); returns the
/// frame's length.
fn compress_delta(xor: &[u8], frame: &mut Vec<u8>) -> Result<usize> {
    thread_local! {
        static CCTX: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let err = |e: std::io::Error| Error::Invalid(format!("zstd: {e}"));
    frame.clear();
    frame.reserve(zstd::zstd_safe::compress_bound(xor.len()));
    CCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Compressor::new(1).map_err(err)?);
        }
        let cctx = slot.as_mut().expect("set above");
        cctx.compress_to_buffer(xor, frame).map_err(err)
    })
}

/// Whether most items of `raw` look unchanged from the base, judged on a
/// sample of the base's first byte plane when it is stored raw (the low
/// mantissa byte of a float: it changes whenever the value does). A base
/// that is itself a delta counts as promising (the last delta paid), and
/// so does one whose first plane is compressed (it cannot be sampled cheaply).
fn promising(backend: &dyn Backend, bref: &ChunkRef, h: &Header, raw: &[u8]) -> Result<bool> {
    let (n, rotated) = match h.filter {
        Filter::XorDelta => return Ok(true),
        Filter::ByteGroup(n) => (n, false),
        Filter::ByteGroupRot(n) => (n, true),
        Filter::None => (1, false),
    };
    // The first plane's byte of item i: its low byte, or after the rotation
    // its low byte shifted up by one with the item's top bit below.
    let first_byte = |i: usize| -> u8 {
        let lo = raw[i * n];
        if rotated {
            (lo << 1) | (raw[i * n + n - 1] >> 7)
        } else {
            lo
        }
    };
    if h.planes[0].0 != Codec::Raw {
        return Ok(true);
    }
    const WINDOWS: usize = 32;
    const WINDOW: usize = 128;
    let items = raw.len() / n;
    if items < WINDOWS * WINDOW {
        return Ok(true);
    }
    let start = h.header_len();
    let stride = (items - WINDOW) / (WINDOWS - 1);
    let mut same = 0usize;
    let mut buf = [0u8; WINDOW];
    for w in 0..WINDOWS {
        let first = w * stride;
        let (k, _) = backend.read_at(&bref.id, (start + first) as u64, &mut buf)?;
        same += buf[..k]
            .iter()
            .enumerate()
            .filter(|&(k, &b)| first_byte(first + k) == b)
            .count();
    }
    Ok(same as f64 >= DELTA_MIN_SAME * (WINDOWS * WINDOW) as f64)
}

thread_local! {
    // Per-worker buffers, taken out while in use and put back afterwards, so
    // that a task rayon runs on this thread meanwhile finds none and makes
    // its own instead of aliasing them.
    static ENCODER: std::cell::Cell<Option<Encoder>> = const { std::cell::Cell::new(None) };
    static PAYLOAD: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    static PLANES: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    static CHUNK: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    // The bytes of a pack of small tensors (save).
    static PACK: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    // A delta's base while it is compared (save), a delta's patch (save and
    // restore) and its compressed frame (save).
    static BASE: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    static DELTA: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    static FRAME: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
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
/// Delta chains are followed (headers only). With `listed` (every object a
/// manifest lists, with the base it records for it), each chunk of a chain
/// must be listed with exactly the base its header names, so that nothing
/// outside the manifest is read and gc (which keeps what manifests list)
/// never deletes a base a version needs.
pub fn probe(
    backend: &dyn Backend,
    chunks: &[ChunkRef],
    threads: Option<usize>,
    listed: Option<&std::collections::HashMap<ObjectId, Option<ObjectId>>>,
) -> Result<()> {
    pool::run_with(threads, || {
        chunks.par_iter().try_for_each(|c| {
            let mut id = c.id;
            let mut header = read_header(backend, c)?;
            loop {
                let base = header.delta.map(|d| d.base);
                if let Some(listed) = listed {
                    match listed.get(&id) {
                        Some(recorded) if *recorded == base => {}
                        _ => {
                            return Err(Error::Format {
                                object: id.hex(),
                                detail: match base {
                                    Some(b) => format!(
                                        "a delta on {b}, which the manifest does not record for it"
                                    ),
                                    None => {
                                        "the manifest lists it with a base, but it is a full chunk"
                                            .to_string()
                                    }
                                },
                            })
                        }
                    }
                }
                let Some(d) = header.delta else {
                    return Ok(());
                };
                let r = ChunkRef {
                    id: d.base,
                    raw_len: c.raw_len,
                };
                let next = read_header(backend, &r)?;
                check_link(&id, d.depth, next.depth())?;
                id = d.base;
                header = next;
            }
        })
    })?
}

/// The base each chunk's header names (`None` for a full chunk, or when
/// the header cannot be read: loads and verify report that damage).
pub fn header_bases(
    backend: &dyn Backend,
    chunks: &[ChunkRef],
    threads: Option<usize>,
) -> Result<Vec<Option<ObjectId>>> {
    pool::run_with(threads, || {
        chunks
            .par_iter()
            .map(|c| {
                read_header(backend, c)
                    .ok()
                    .and_then(|h| h.delta.map(|d| d.base))
            })
            .collect()
    })
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
    if out.len() as u64 != c.raw_len {
        return Err(Error::Invalid(format!(
            "a target of {} bytes for chunk {} of {} bytes",
            out.len(),
            c.id,
            c.raw_len
        )));
    }
    let mut hasher = blake3::Hasher::new();
    decode_raw(backend, c, opened, out, Some(&mut hasher))?;
    let actual = ObjectId(*hasher.finalize().as_bytes());
    if actual != c.id {
        if opened.header.delta.is_some() {
            return Err(damaged_link(backend, c));
        }
        return Err(Error::Integrity {
            object: c.id.hex(),
            detail: format!("content hashes to {actual}"),
        });
    }
    Ok(())
}

/// Decodes chunk `c` into `out` (exactly its raw length) without checking
/// its hash; a delta chunk decodes its base into `out` first, then applies
/// itself. With a `hasher`, the final bytes are fed to it in order.
fn decode_raw(
    backend: &dyn Backend,
    c: &ChunkRef,
    opened: &Opened,
    out: &mut [u8],
    hasher: Option<&mut blake3::Hasher>,
) -> Result<()> {
    let object = c.id.hex();
    let header = &opened.header;
    let start = header.header_len() as u64;
    if let Some(d) = header.delta {
        let bref = ChunkRef {
            id: d.base,
            raw_len: c.raw_len,
        };
        let base = open_chunk(backend, &bref)?;
        check_link(&c.id, d.depth, base.header.depth())?;
        decode_raw(backend, &bref, &base, out, None)?;
        let apply = |payload: &[u8], out: &mut [u8]| {
            with_vec(&DELTA, |scratch| {
                chunk::apply_delta(header, payload, &object, out, scratch, hasher)
            })
        };
        return match &opened.mapped {
            Some(m) => apply(&m[start as usize..], out),
            None => with_buffer(&PAYLOAD, (opened.size - start) as usize, |payload| {
                let (got, _) = backend.read_at(&c.id, start, payload)?;
                apply(&payload[..got], out)
            }),
        };
    }
    let decode_from = |payload: &[u8], out: &mut [u8], hasher: Option<&mut blake3::Hasher>| {
        let mut planes = PLANES.with(|cell| cell.take());
        let decoded = chunk::decode_payload(header, payload, &object, out, &mut planes, hasher);
        PLANES.with(|cell| cell.set(planes));
        decoded
    };
    if let Some(m) = &opened.mapped {
        decode_from(&m[start as usize..], out, hasher)?;
    } else if header.filter == Filter::None && header.planes[0].0 == Codec::Raw {
        // Read and hash a cache-sized piece at a time: one pass over `out`.
        let mut hasher = hasher;
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
            if let Some(h) = hasher.as_deref_mut() {
                h.update(&out[done..end]);
            }
            done = end;
        }
    } else {
        let len = (opened.size - start) as usize;
        with_buffer(&PAYLOAD, len, |payload| {
            let (got, _) = backend.read_at(&c.id, start, payload)?;
            decode_from(&payload[..got], out, hasher)
        })?;
    }
    Ok(())
}

/// The error for a delta chunk whose decoded bytes do not hash to its id:
/// names the first object of its chain (from the full chunk up) whose
/// result does not hash to its own id, i.e. the damaged one.
fn damaged_link(backend: &dyn Backend, c: &ChunkRef) -> Error {
    let mut chain: Vec<(ChunkRef, Opened)> = Vec::new();
    let mut next = Some(c.id);
    while let Some(id) = next {
        let r = ChunkRef {
            id,
            raw_len: c.raw_len,
        };
        match open_chunk(backend, &r) {
            Ok(o) => {
                next = o.header.delta.map(|d| d.base);
                chain.push((r, o));
            }
            Err(e) => return e,
        }
        if chain.len() > chunk::MAX_DELTA_DEPTH as usize + 1 {
            break;
        }
    }
    let mut buf = vec![0u8; c.raw_len as usize];
    for (r, o) in chain.iter().rev() {
        let mut hasher = blake3::Hasher::new();
        let step = if o.header.delta.is_some() {
            // `buf` holds the (verified) bytes of this link's base
            let start = o.header.header_len() as u64;
            let mut payload = vec![0u8; (o.size - start) as usize];
            let mut scratch = Vec::new();
            backend.read_at(&r.id, start, &mut payload).and_then(|_| {
                chunk::apply_delta(
                    &o.header,
                    &payload,
                    &r.id.hex(),
                    &mut buf,
                    &mut scratch,
                    Some(&mut hasher),
                )
            })
        } else {
            decode_raw(backend, r, o, &mut buf, Some(&mut hasher))
        };
        if let Err(e) = step {
            return e;
        }
        let actual = ObjectId(*hasher.finalize().as_bytes());
        if actual != r.id {
            let detail = if r.id == c.id {
                format!("content hashes to {actual}")
            } else {
                format!(
                    "content hashes to {actual} (the base of delta chunk {})",
                    c.id
                )
            };
            return Error::Integrity {
                object: r.id.hex(),
                detail,
            };
        }
    }
    Error::Integrity {
        object: c.id.hex(),
        detail: "content does not hash to its id".into(),
    }
}

/// Re-reads and re-hashes chunks; returns `None` per sound chunk, the error otherwise.
///
/// Delta chains are walked from their full chunk up, each link applied to
/// the bytes of the one below it (verified just before), so a chain of `d`
/// deltas costs `d + 1` decodes rather than one per link and depth.
pub fn verify(
    backend: &dyn Backend,
    chunks: &[ChunkRef],
    threads: Option<usize>,
) -> Result<Vec<Option<Error>>> {
    pool::run_with(threads, || {
        // A chunk's base, when it is a delta on another chunk of this list.
        let index: std::collections::HashMap<ObjectId, usize> =
            chunks.iter().enumerate().map(|(i, c)| (c.id, i)).collect();
        let parents: Vec<Option<usize>> = chunks
            .par_iter()
            .map(|c| {
                let base = read_header(backend, c).ok()?.delta?.base;
                index
                    .get(&base)
                    .copied()
                    .filter(|&b| chunks[b].raw_len == c.raw_len)
            })
            .collect();
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); chunks.len()];
        for (i, p) in parents.iter().enumerate() {
            if let Some(p) = *p {
                if p != i {
                    children[p].push(i);
                }
            }
        }
        let roots: Vec<usize> = (0..chunks.len())
            .filter(|&i| parents[i].is_none_or(|p| p == i))
            .collect();
        let results: Vec<Vec<(usize, Option<Error>)>> = roots
            .par_iter()
            .map(|&r| {
                let mut out = Vec::new();
                verify_tree(backend, chunks, &children, r, &mut out);
                out
            })
            .collect();
        let mut report: Vec<Option<Option<Error>>> = (0..chunks.len()).map(|_| None).collect();
        for (i, e) in results.into_iter().flatten() {
            report[i] = Some(e);
        }
        // Anything not reached from a root (a cycle of damaged headers) on its own.
        report
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.unwrap_or_else(|| verify_one(backend, &chunks[i]).err()))
            .collect()
    })
}

fn verify_one(backend: &dyn Backend, c: &ChunkRef) -> Result<()> {
    // The header first: the scratch is sized by a checked raw length.
    let opened = open_chunk(backend, c)?;
    with_buffer(&CHUNK, c.raw_len as usize, |scratch| {
        decode_chunk(backend, c, &opened, scratch)
    })
}

/// Verifies chunk `root` and the deltas built on it (depth first), each
/// delta applied to a copy of its verified base's bytes. A delta whose base
/// failed is verified on its own (its error then names the damaged link).
fn verify_tree(
    backend: &dyn Backend,
    chunks: &[ChunkRef],
    children: &[Vec<usize>],
    root: usize,
    out: &mut Vec<(usize, Option<Error>)>,
) {
    let c = &chunks[root];
    let mut buf = Vec::new();
    // The header first: the buffer is sized by a checked raw length.
    let first = open_chunk(backend, c).and_then(|o| {
        if buf.try_reserve_exact(c.raw_len as usize).is_err() {
            return Err(Error::OutOfMemory { bytes: c.raw_len });
        }
        buf.resize(c.raw_len as usize, 0);
        decode_chunk(backend, c, &o, &mut buf)?;
        Ok(o.header.depth())
    });
    let ok = first.is_ok();
    let depth = *first.as_ref().unwrap_or(&0);
    out.push((root, first.err()));
    // (node, the verified bytes of its base) still to do
    let mut stack: Vec<(usize, std::sync::Arc<Vec<u8>>, u32)> = Vec::new();
    let base = std::sync::Arc::new(buf);
    for &k in &children[root] {
        if ok {
            stack.push((k, base.clone(), depth));
        } else {
            mark_subtree(backend, chunks, children, k, out);
        }
    }
    while let Some((i, base, base_depth)) = stack.pop() {
        let c = &chunks[i];
        let mut bytes = std::sync::Arc::try_unwrap(base).unwrap_or_else(|shared| (*shared).clone());
        let result = apply_verified(backend, c, &mut bytes, base_depth + 1);
        let ok = result.is_ok();
        out.push((i, result.err()));
        let bytes = std::sync::Arc::new(bytes);
        for &k in &children[i] {
            if ok {
                stack.push((k, bytes.clone(), base_depth + 1));
            } else {
                mark_subtree(backend, chunks, children, k, out);
            }
        }
    }
}

/// Verifies chunk `i` and every delta above it on their own.
fn mark_subtree(
    backend: &dyn Backend,
    chunks: &[ChunkRef],
    children: &[Vec<usize>],
    i: usize,
    out: &mut Vec<(usize, Option<Error>)>,
) {
    let mut todo = vec![i];
    while let Some(i) = todo.pop() {
        out.push((i, verify_one(backend, &chunks[i]).err()));
        todo.extend(&children[i]);
    }
}

/// A delta chunk of depth `depth` must sit on a base of depth `depth - 1`
/// (so every chain ends at a full chunk within the depth limit).
fn check_link(delta: &ObjectId, depth: u32, base_depth: u32) -> Result<()> {
    if base_depth + 1 == depth {
        return Ok(());
    }
    Err(Error::Format {
        object: delta.hex(),
        detail: format!("delta of depth {depth} on a base of depth {base_depth}"),
    })
}

/// Applies delta chunk `c` to `bytes` (its base's verified bytes) and checks
/// its recorded depth and the result's hash.
fn apply_verified(backend: &dyn Backend, c: &ChunkRef, bytes: &mut [u8], depth: u32) -> Result<()> {
    let opened = open_chunk(backend, c)?;
    let header = &opened.header;
    check_link(&c.id, header.depth(), depth - 1)?;
    let start = header.header_len();
    let object = c.id.hex();
    let mut hasher = blake3::Hasher::new();
    let apply = |payload: &[u8], hasher: &mut blake3::Hasher, bytes: &mut [u8]| {
        with_vec(&DELTA, |scratch| {
            chunk::apply_delta(header, payload, &object, bytes, scratch, Some(hasher))
        })
    };
    match &opened.mapped {
        Some(m) => apply(&m[start..], &mut hasher, bytes)?,
        None => with_buffer(&PAYLOAD, (opened.size - start as u64) as usize, |payload| {
            let (got, _) = backend.read_at(&c.id, start as u64, payload)?;
            apply(&payload[..got], &mut hasher, bytes)
        })?,
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
                size_classes: true,
            },
            threads: Some(threads),
            ..Default::default()
        }
    }

    /// One ungrouped tensor, one thread.
    fn save_one(fs: &LocalFs, d: &[u8]) -> Saved {
        let t = TensorIn {
            data: d,
            group: 1,
            bases: &[],
        };
        save(fs, &[t], &opts(1)).unwrap()
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
    fn the_read_ahead_fingerprint_is_xxh3_128_of_the_whole_input() {
        let data: Vec<u8> = (0..(1usize << 20) + 4099)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        for n in [
            0,
            1,
            63,
            64,
            2047,
            2048,
            2049,
            4096,
            6143,
            6144,
            6145,
            65_536 + 17,
            data.len(),
        ] {
            assert_eq!(
                fingerprint(&data[..n]),
                twox_hash::XxHash3_128::oneshot(&data[..n]),
                "{n}"
            );
        }
        // an unaligned start
        assert_eq!(
            fingerprint(&data[3..]),
            twox_hash::XxHash3_128::oneshot(&data[3..])
        );
    }

    #[test]
    fn fingerprints_are_xxh3_128_of_each_whole_chunk() {
        // XXH3-128 (seed 0) of the empty input, from the xxHash sanity tests.
        assert_eq!(
            twox_hash::XxHash3_128::oneshot(&[]),
            0x99aa06d3014798d86001c324468d497f
        );
        let (_dir, fs) = store();
        // Two chunks of 600 KiB, hashed in 256 KiB blocks, and a 100 KiB tail.
        let d = data(1300 << 10, 7);
        let t = TensorIn {
            data: &d,
            group: 1,
            bases: &[],
        };
        let mut o = opts(2);
        o.chunks.chunk_size = 600 << 10;
        let saved = save(&fs, &[t], &o).unwrap();
        let mut offset = 0;
        for c in &saved.chunks {
            let bytes = &d[offset..offset + c.raw_len as usize];
            assert_eq!(c.fingerprint, Some(twox_hash::XxHash3_128::oneshot(bytes)));
            offset += c.raw_len as usize;
        }
        assert_eq!((saved.chunks.len(), offset), (3, d.len()));
        // The first chunk's value from xxhash-rust 0.8.21 (the large-input path).
        assert_eq!(
            saved.chunks[0].fingerprint,
            Some(0xbb8f03e1d666fa58310972001d975f81)
        );
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
            .map(|d| TensorIn {
                data: d,
                group: 4,
                bases: &[],
            })
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
                    base: None,
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
        let saved = save_one(&fs, &d);
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
        let saved = save_one(&fs, &d);
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

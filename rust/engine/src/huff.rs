//! Entropy-only zstd frames: each block is zstd's Huffman coder over the
//! bytes (a "compressed literals" block with zero sequences), without LZ
//! match finding.
//!
//! The sign-and-exponent plane of float weights has a skewed byte histogram
//! (about 3 bits of entropy per byte) but almost no repeated sequences, so
//! zstd's match finder costs most of its time and gains almost nothing there.
//! These frames are standard zstd frames (RFC 8878): any zstd decoder reads
//! them, and they decode with the same code path as every other plane.
//!
//! The Huffman stage is zstd's own coder, linked from the zstd-sys crate
//! (pinned in Cargo.toml because these functions are internal to the zstd
//! release): each block's table is built from a sample of the block
//! (`sampled_block`: `HUF_buildCTable_wksp`, `HUF_writeCTable_wksp`, then
//! the pair coder of `huff_pairs`, which writes the bytes zstd's
//! `HUF_compress4X_usingCTable` would, faster), or, where a sample would
//! mislead, from the exact histogram that `HUF_compress4X_repeat` counts.
//! Tests check every frame against zstd's decoder, and the pair coder's
//! streams byte for byte against zstd's coder.

use crate::error::{Error, Result};
use crate::huff_pairs::PairCoder;
use std::os::raw::{c_int, c_uint, c_void};

extern "C" {
    fn HUF_optimalTableLog(
        max_table_log: c_uint,
        src_size: usize,
        max_symbol_value: c_uint,
        work_space: *mut c_void,
        wksp_size: usize,
        table: *mut usize,
        count: *const c_uint,
        flags: c_int,
    ) -> c_uint;
    fn HUF_buildCTable_wksp(
        table: *mut usize,
        count: *const c_uint,
        max_symbol_value: c_uint,
        max_nb_bits: c_uint,
        work_space: *mut c_void,
        wksp_size: usize,
    ) -> usize;
    fn HUF_writeCTable_wksp(
        dst: *mut c_void,
        max_dst_size: usize,
        table: *const usize,
        max_symbol_value: c_uint,
        huff_log: c_uint,
        work_space: *mut c_void,
        wksp_size: usize,
    ) -> usize;
    fn HUF_estimateCompressedSize(
        table: *const usize,
        count: *const c_uint,
        max_symbol_value: c_uint,
    ) -> usize;
    fn HUF_compress4X_usingCTable(
        dst: *mut c_void,
        dst_size: usize,
        src: *const c_void,
        src_size: usize,
        table: *const usize,
        flags: c_int,
    ) -> usize;
    fn HUF_compress4X_repeat(
        dst: *mut c_void,
        dst_size: usize,
        src: *const c_void,
        src_size: usize,
        max_symbol_value: c_uint,
        table_log: c_uint,
        work_space: *mut c_void,
        wksp_size: usize,
        huf_table: *mut usize,
        repeat: *mut c_int,
        flags: c_int,
    ) -> usize;
}

const MAGIC: u32 = 0xFD2F_B528;
const BLOCK: usize = 128 * 1024;
/// Blocks shorter than this are stored raw (a Huffman table would not pay).
const MIN_HUFFMAN_BLOCK: usize = 1024;
const TABLE_LOG: c_uint = 11;
const HUF_REPEAT_NONE: c_int = 0;
/// `HUF_flags_bmi2`: use the coder's BMI2 variant (same output, ~1.5x faster).
const HUF_FLAGS_BMI2: c_int = 1;

/// The coder's flags for this CPU: its BMI2 variant where the CPU has what
/// zstd compiles that variant for (`lzcnt,bmi,bmi2`; zstd builds both
/// variants and leaves the choice to the caller).
fn huf_flags() -> c_int {
    #[cfg(target_arch = "x86_64")]
    {
        static FLAGS: std::sync::OnceLock<c_int> = std::sync::OnceLock::new();
        *FLAGS.get_or_init(|| {
            if std::is_x86_feature_detected!("bmi1")
                && std::is_x86_feature_detected!("bmi2")
                && std::is_x86_feature_detected!("lzcnt")
            {
                HUF_FLAGS_BMI2
            } else {
                0
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0
    }
}

/// Workspace of the Huffman coder (one per worker thread).
pub struct HuffWorkspace {
    work: Vec<u64>,
    table: Vec<usize>,
    pairs: PairCoder,
}

impl Default for HuffWorkspace {
    fn default() -> Self {
        HuffWorkspace {
            // HUF_WORKSPACE_SIZE is 8.5 KiB in zstd 1.5.7; 64 KiB leaves room.
            work: vec![0u64; 8192],
            // HUF_CTABLE_SIZE_ST(255) = 257 entries
            table: vec![0usize; 257],
            pairs: PairCoder::default(),
        }
    }
}

/// Writes `src` into `out` as one zstd frame of entropy-coded blocks, with
/// a block boundary at each offset of `cuts` (ascending; may be empty):
/// where `src` is several arrays back to back (a pack of tensors), each
/// block then codes one array with a table of its own, instead of a table
/// for the mix of two. Deterministic: the frame depends on `src` and `cuts`.
pub fn compress(
    src: &[u8],
    cuts: &[usize],
    out: &mut Vec<u8>,
    ws: &mut HuffWorkspace,
) -> Result<()> {
    compress_with(src, cuts, out, ws, huf_flags(), true)
}

/// The blocks of `len` bytes: at most [`BLOCK`] each, ending at each cut.
fn block_ranges(len: usize, cuts: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::with_capacity(len / BLOCK + cuts.len() + 1);
    let mut start = 0;
    let mut cuts = cuts
        .iter()
        .copied()
        .filter(|&c| c > 0 && c < len)
        .peekable();
    loop {
        while cuts.peek().is_some_and(|&c| c <= start) {
            cuts.next();
        }
        let end = (start + BLOCK)
            .min(len)
            .min(cuts.peek().copied().unwrap_or(len));
        ranges.push(start..end);
        if end >= len {
            return ranges;
        }
        start = end;
    }
}

fn compress_with(
    src: &[u8],
    cuts: &[usize],
    out: &mut Vec<u8>,
    ws: &mut HuffWorkspace,
    flags: c_int,
    sampled: bool,
) -> Result<()> {
    let size = u32::try_from(src.len())
        .map_err(|_| Error::Invalid(format!("plane of {} bytes is too large", src.len())))?;
    out.clear();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    // Frame header: single segment (no window descriptor), 4-byte content size.
    out.push(0xA0);
    out.extend_from_slice(&size.to_le_bytes());
    let ranges = block_ranges(src.len(), cuts);
    for (k, range) in ranges.iter().enumerate() {
        let block = &src[range.clone()];
        let last = k + 1 == ranges.len();
        if block.len() < MIN_HUFFMAN_BLOCK {
            raw_block(out, block, last);
            continue;
        }
        let start = out.len();
        let bound = block.len() + (block.len() >> 8) + 8 + 129;
        // Block and literals headers are filled in below; the coder writes
        // into spare capacity (zeroing it first cost as much as a histogram).
        out.extend_from_slice(&[0u8; 8]);
        // room for the table (at most 129 bytes) and the pair coder's streams
        out.reserve(bound.max(129 + PairCoder::bound(block.len())));
        if sampled {
            if let Some(n) = sampled_block(block, out, start + 8, bound, ws, flags)? {
                finish_block(out, block, start, n, last);
                continue;
            }
        }
        let mut repeat = HUF_REPEAT_NONE;
        // SAFETY: `out` has `bound` bytes of spare capacity after its length
        // `start + 8`; `block`
        // is readable for its length; the workspace is 4-byte aligned (u64)
        // and larger than HUF_WORKSPACE_SIZE; the table has 257 entries as
        // HUF_CTABLE_SIZE_ST(255) requires; `repeat` is HUF_repeat_none so
        // no previous table is read.
        let n = unsafe {
            HUF_compress4X_repeat(
                out.as_mut_ptr().add(start + 8).cast(),
                bound,
                block.as_ptr().cast(),
                block.len(),
                255,
                TABLE_LOG,
                ws.work.as_mut_ptr().cast(),
                ws.work.len() * 8,
                ws.table.as_mut_ptr(),
                &mut repeat,
                flags,
            )
        };
        // SAFETY: a pure function of the code.
        if unsafe { zstd_sys::ZSTD_isError(n) } != 0 {
            return Err(Error::Invalid(format!(
                "zstd Huffman coder failed (code {n})"
            )));
        }
        finish_block(out, block, start, n, last);
    }
    Ok(())
}

/// Ends the block that starts at `start` in `out`, whose coder wrote `n`
/// bytes after the 8 header bytes (0: not compressible, 1: one repeated byte).
fn finish_block(out: &mut Vec<u8>, block: &[u8], start: usize, n: usize, last: bool) {
    let content = 5 + n + 1;
    if n == 0 || content >= block.len() {
        out.truncate(start);
        raw_block(out, block, last);
    } else if n == 1 {
        // a single repeated byte
        out.truncate(start);
        block_header(out, 1, block.len(), last);
        out.push(block[0]);
    } else {
        // Compressed literals, 4 streams, 18-bit sizes (Size_Format 11).
        let lhc = 2u64 | (3 << 2) | ((block.len() as u64) << 4) | ((n as u64) << 22);
        // SAFETY: the coder wrote `n <= bound` bytes after `start + 8`.
        unsafe { out.set_len(start + 8 + n) };
        out.push(0); // Number_of_Sequences = 0
        out[start + 3..start + 8].copy_from_slice(&lhc.to_le_bytes()[..5]);
        let header = (last as u32) | (2 << 1) | ((content as u32) << 3);
        out[start..start + 3].copy_from_slice(&header.to_le_bytes()[..3]);
    }
}

/// Codes `block` with a Huffman table built from a sample of it, or returns
/// None to have it coded with an exact histogram (the previous, slower way).
///
/// zstd's coder counts every byte of a block before building its table; on
/// a bfloat16 exponent plane that count was 18% of a save's instructions.
/// Here the table comes from [`SAMPLE_PIECES`] slices, 1/[`SAMPLE_SHARE`] of
/// the block, spread over it. Every byte value between the block's minimum
/// and maximum (one SIMD-friendly pass) that the sample missed gets a count
/// of 1, so every byte the block holds has a code. Taken only when that adds
/// at most [`MAX_PHANTOMS`] codes (each costs code space), and kept only
/// when the coded size is within [`EXPECT_SLACK`] of what the sample
/// predicts (a run the sample missed, coded with a long code, is redone
/// exactly). On MiniLM this cost 0.00009 (fp32) and 0.00014 (bf16) of raw
/// size; instructions per bf16 save fell 13%.
fn sampled_block(
    block: &[u8],
    out: &mut Vec<u8>,
    at: usize,
    bound: usize,
    ws: &mut HuffWorkspace,
    flags: c_int,
) -> Result<Option<usize>> {
    if block.len() < MIN_SAMPLED_BLOCK {
        return Ok(None);
    }
    let (lo, hi) = min_max(block);
    if lo == hi {
        return Ok(Some(1)); // one repeated byte
    }
    let piece = block.len() / (SAMPLE_SHARE * SAMPLE_PIECES);
    let stride = block.len() / SAMPLE_PIECES;
    let mut tables = [[0u32; 256]; 4];
    for k in 0..SAMPLE_PIECES {
        // Each slice at a different offset within its stride: rows of 2, 4
        // or 8 KiB would otherwise show the sample the same columns only.
        // In bounds: (k % SAMPLE_SHARE + 1) * piece <= stride.
        let at = k * stride + (k % SAMPLE_SHARE) * piece;
        let slice = &block[at..at + piece];
        let mut quads = slice.chunks_exact(4);
        for q in &mut quads {
            // four tables: runs of one value would otherwise serialise the increments
            tables[0][q[0] as usize] += 1;
            tables[1][q[1] as usize] += 1;
            tables[2][q[2] as usize] += 1;
            tables[3][q[3] as usize] += 1;
        }
        for &b in quads.remainder() {
            tables[0][b as usize] += 1;
        }
    }
    let mut count = [0 as c_uint; 256];
    let mut phantoms = 0;
    for (v, c) in count.iter_mut().enumerate() {
        *c = tables[0][v] + tables[1][v] + tables[2][v] + tables[3][v];
        if *c == 0 && (lo as usize..=hi as usize).contains(&v) {
            *c = 1;
            phantoms += 1;
        }
    }
    if phantoms > MAX_PHANTOMS {
        return Ok(None);
    }
    let max_symbol = hi as c_uint;
    let work = ws.work.as_mut_ptr().cast::<c_void>();
    let work_len = ws.work.len() * 8;
    let table = ws.table.as_mut_ptr();
    let failed = |code: usize| Error::Invalid(format!("zstd Huffman table failed (code {code})"));
    // SAFETY: `count` has 256 entries (>= max_symbol + 1); the table has 257
    // entries as HUF_CTABLE_SIZE_ST(255) requires; the workspace is 8-byte
    // aligned and 64 KiB (HUF_WORKSPACE_SIZE and HUF_CTABLE_WORKSPACE_SIZE
    // are under 9 KiB); `out` has `bound` bytes of spare capacity after
    // `at`, and the coder is told what remains after the table; `block` is
    // readable for its length and every byte of it has a code (see above).
    unsafe {
        let log = HUF_optimalTableLog(
            TABLE_LOG,
            block.len(),
            max_symbol,
            work,
            work_len,
            table,
            count.as_ptr(),
            flags,
        );
        let bits = HUF_buildCTable_wksp(table, count.as_ptr(), max_symbol, log, work, work_len);
        if zstd_sys::ZSTD_isError(bits) != 0 {
            return Err(failed(bits));
        }
        let dst = out.as_mut_ptr().add(at);
        let head = HUF_writeCTable_wksp(
            dst.cast(),
            bound,
            table,
            max_symbol,
            bits as c_uint,
            work,
            work_len,
        );
        if zstd_sys::ZSTD_isError(head) != 0 {
            // the table's weights do not compress (a flat histogram over more
            // than 128 values): zstd codes such a block raw; leave it to zstd
            return Ok(None);
        }
        let n = if ws.pairs.load(&ws.table, max_symbol as usize) {
            ws.pairs.encode(block, out, at + head)
        } else {
            HUF_compress4X_usingCTable(
                dst.add(head).cast(),
                bound - head,
                block.as_ptr().cast(),
                block.len(),
                table,
                flags,
            )
        };
        if zstd_sys::ZSTD_isError(n) != 0 {
            return Err(Error::Invalid(format!(
                "zstd Huffman coder failed (code {n})"
            )));
        }
        if n == 0 || head + n + 6 >= block.len() {
            // no gain over a raw block: the sampled table may be what failed,
            // so the exact path decides
            return Ok(None);
        }
        let sampled = (piece * SAMPLE_PIECES) as f64;
        let expect = HUF_estimateCompressedSize(table, count.as_ptr(), max_symbol) as f64
            * block.len() as f64
            / sampled;
        if n as f64 > expect * EXPECT_SLACK + 128.0 {
            return Ok(None);
        }
        Ok(Some(head + n))
    }
}

/// Slices of a block whose byte counts build its Huffman table.
const SAMPLE_PIECES: usize = 16;
/// The sample is 1/SAMPLE_SHARE of the block (16 KiB of 128 KiB).
const SAMPLE_SHARE: usize = 8;
/// Shorter blocks (a plane's last) take the exact path: the sample would be
/// a few hundred bytes and the size check's fixed slack too loose.
const MIN_SAMPLED_BLOCK: usize = 16 << 10;
/// Most byte values a sampled table may add for values the sample missed.
const MAX_PHANTOMS: usize = 16;
/// A sampled table is kept when the block codes to at most this multiple of
/// the size the sample predicts (sampling noise on MiniLM: 0.97-1.04).
const EXPECT_SLACK: f64 = 1.1;

/// Bytes [`min_max`] reads per step, prefetching the next step's lines.
const MM_STEP: usize = 2 << 10;

/// The smallest and largest byte of a non-empty slice (64 lanes at a time,
/// which the compiler turns into vector min/max).
fn min_max(block: &[u8]) -> (u8, u8) {
    let mut lo = [u8::MAX; 64];
    let mut hi = [0u8; 64];
    let whole = block.len() / 64 * 64;
    let mut ahead = 0;
    for (k, step) in block[..whole].chunks(MM_STEP).enumerate() {
        crate::prefetch::until(block, &mut ahead, ((k + 2) * MM_STEP).min(block.len()));
        for c in step.chunks_exact(64) {
            for i in 0..64 {
                lo[i] = lo[i].min(c[i]);
                hi[i] = hi[i].max(c[i]);
            }
        }
    }
    let lanes = block.chunks_exact(64);
    let (mut l, mut h) = (u8::MAX, 0u8);
    for &b in lo.iter().chain(lanes.remainder()) {
        l = l.min(b);
    }
    for &b in hi.iter().chain(lanes.remainder()) {
        h = h.max(b);
    }
    (l, h)
}

fn block_header(out: &mut Vec<u8>, kind: u32, size: usize, last: bool) {
    let header = (last as u32) | (kind << 1) | ((size as u32) << 3);
    out.extend_from_slice(&header.to_le_bytes()[..3]);
}

fn raw_block(out: &mut Vec<u8>, block: &[u8], last: bool) {
    block_header(out, 0, block.len(), last);
    out.extend_from_slice(block);
}

/// Builds zstd's table for `src`'s exact histogram into `ws.table` and
/// returns its largest byte (tests and timings compare coders on it).
#[cfg(test)]
fn exact_table(src: &[u8], ws: &mut HuffWorkspace) -> c_uint {
    let mut count = [0 as c_uint; 256];
    for &b in src {
        count[b as usize] += 1;
    }
    let max_symbol = src.iter().copied().max().unwrap() as c_uint;
    let work = ws.work.as_mut_ptr().cast::<c_void>();
    let work_len = ws.work.len() * 8;
    let table = ws.table.as_mut_ptr();
    // SAFETY: as in `sampled_block`.
    unsafe {
        let log = HUF_optimalTableLog(
            TABLE_LOG,
            src.len(),
            max_symbol,
            work,
            work_len,
            table,
            count.as_ptr(),
            huf_flags(),
        );
        let bits = HUF_buildCTable_wksp(table, count.as_ptr(), max_symbol, log, work, work_len);
        assert_eq!(zstd_sys::ZSTD_isError(bits), 0);
    }
    max_symbol
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(src: &[u8]) -> usize {
        let mut out = Vec::new();
        compress(src, &[], &mut out, &mut HuffWorkspace::default()).unwrap();
        let back = zstd::bulk::decompress(&out, src.len()).unwrap();
        assert_eq!(back, src);
        assert_eq!(
            zstd::zstd_safe::find_frame_compressed_size(&out).unwrap(),
            out.len()
        );
        out.len()
    }

    #[test]
    fn frames_decode_with_zstd_for_every_shape_of_input() {
        let mut x = 1u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // skewed bytes, like a float exponent plane
        let skewed: Vec<u8> = (0..700_000)
            .map(|_| {
                let r = next();
                [0x3c, 0x3d, 0xbc, 0xbd, 0x3b, 0xbb]
                    [(r % 6) as usize * ((r >> 8) % 4 == 0) as usize]
            })
            .collect();
        assert!(check(&skewed) < skewed.len() / 2);
        let random: Vec<u8> = (0..300_000).map(|_| next() as u8).collect();
        assert!(check(&random) <= random.len() + 64);
        check(&vec![7u8; 400_000]); // RLE blocks
        for n in [
            1usize,
            63,
            1023,
            1024,
            1025,
            BLOCK - 1,
            BLOCK,
            BLOCK + 1,
            3 * BLOCK + 17,
        ] {
            check(&skewed[..n]);
        }
        let mut a = Vec::new();
        let mut b = Vec::new();
        compress(&skewed, &[], &mut a, &mut HuffWorkspace::default()).unwrap();
        compress(&skewed, &[], &mut b, &mut HuffWorkspace::default()).unwrap();
        assert_eq!(a, b);
        // The BMI2 variant writes the same frames as the portable one.
        compress_with(&skewed, &[], &mut b, &mut HuffWorkspace::default(), 0, true).unwrap();
        assert_eq!(a, b);
    }

    /// Builds zstd's table for `src`'s exact histogram into `ws.table` and
    /// returns the coded size from zstd's four-stream coder and from the
    /// pair coder (None where the pair coder declines the table), asserting
    /// the bytes are the same.
    fn both_coders(src: &[u8], ws: &mut HuffWorkspace) -> (usize, Option<usize>) {
        let max_symbol = exact_table(src, ws);
        let cap = src.len() * 2 + PairCoder::bound(src.len()) + 64;
        let mut theirs: Vec<u8> = Vec::with_capacity(cap);
        // SAFETY: the table is built; `theirs` has `cap` bytes of capacity.
        let n = unsafe {
            let table = ws.table.as_ptr();
            let n = HUF_compress4X_usingCTable(
                theirs.as_mut_ptr().cast(),
                cap,
                src.as_ptr().cast(),
                src.len(),
                table,
                huf_flags(),
            );
            assert_eq!(zstd_sys::ZSTD_isError(n), 0);
            theirs.set_len(n);
            n
        };
        if !ws.pairs.load(&ws.table, max_symbol as usize) {
            return (n, None);
        }
        let mut ours: Vec<u8> = vec![0xAA; 3];
        ours.reserve(cap);
        let m = ws.pairs.encode(src, &mut ours, 3);
        // SAFETY: `encode` wrote `m` bytes from offset 3.
        unsafe { ours.set_len(3 + m) };
        assert_eq!(&ours[..3], &[0xAA; 3], "bytes before `at` are kept");
        assert_eq!(m, n, "size for {} bytes", src.len());
        assert!(ours[3..] == theirs[..], "bytes for {} bytes", src.len());
        // the build without BMI2 writes the same
        let mut portable: Vec<u8> = Vec::with_capacity(cap);
        let k = ws.pairs.encode_with(src, &mut portable, 0, true);
        // SAFETY: `encode_with` wrote `k` bytes from offset 0.
        unsafe { portable.set_len(k) };
        assert!(portable == theirs, "portable build, {} bytes", src.len());
        (n, Some(m))
    }

    #[test]
    fn the_pair_coder_writes_exactly_zstds_streams() {
        let mut x = 5u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut ws = HuffWorkspace::default();
        let exps = exponents(3 * BLOCK + 3, 11);
        // every length near the small end and around the block's, so each
        // of the four streams is odd and even, shorter and longer
        let lens = (12..80).chain([1000, 1001, 1002, 1003, 16_384, 16_387, BLOCK - 1, BLOCK]);
        for n in lens.clone() {
            assert!(both_coders(&exps[..n], &mut ws).1.is_some());
        }
        // the longest codes (11 bits): counts falling by half per value
        let steep: Vec<u8> = (0..BLOCK)
            .map(|_| 40 + (next().trailing_zeros().min(20) as u8))
            .collect();
        for n in lens {
            assert!(both_coders(&steep[..n], &mut ws).1.is_some());
        }
        // two values; 64 values (the most it takes); 65 (left to zstd)
        let two: Vec<u8> = (0..5000).map(|_| 200 + (next() % 2) as u8).collect();
        assert!(both_coders(&two, &mut ws).1.is_some());
        let wide: Vec<u8> = (0..BLOCK).map(|_| (next() % 64) as u8 * 3).collect();
        assert!(both_coders(&wide, &mut ws).1.is_some());
        let wider: Vec<u8> = (0..BLOCK).map(|_| (next() % 65) as u8).collect();
        assert_eq!(both_coders(&wider, &mut ws).1, None);
        // a table loaded after a wider one codes its own block right
        assert!(both_coders(&exps[..BLOCK], &mut ws).1.is_some());
        // a stream over 65,535 bytes: zstd's coder returns 0, and so does this
        let long: Vec<u8> = (0..400_000).map(|_| (next() % 64) as u8).collect();
        assert_eq!(both_coders(&long, &mut ws), (0, Some(0)));
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(48))]
        /// Any length, alphabet and skew: the pair coder writes zstd's bytes
        /// (or leaves tables of more than 64 values to zstd).
        #[test]
        fn the_pair_coder_matches_zstd_on_any_skewed_input(
            len in 12usize..200_000,
            values in 2u64..80,
            skew in 0u32..12,
            base in 0u8..=255,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let mut x = seed | 1;
            let src: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // a value index whose odds fall with `skew`
                    let i = (x % values).min(((x >> 32).trailing_zeros() / 2 + skew) as u64 % values);
                    base.wrapping_add(i as u8)
                })
                .collect();
            let mut ws = HuffWorkspace::default();
            let distinct = {
                let mut seen = [false; 256];
                src.iter().for_each(|&b| seen[b as usize] = true);
                seen.iter().filter(|&&s| s).count()
            };
            if distinct > 1 {
                let (_, ours) = both_coders(&src, &mut ws);
                proptest::prop_assert_eq!(ours.is_some(), distinct <= crate::huff_pairs::MAX_SYMBOLS);
            }
        }
    }

    #[test]
    fn blocks_end_at_cuts_and_each_array_gets_its_own_table() {
        assert_eq!(block_ranges(10, &[]), vec![0..10]);
        assert_eq!(block_ranges(0, &[]), vec![0..0]);
        assert_eq!(
            block_ranges(3 * BLOCK, &[0, 100, 100, BLOCK + 5, 3 * BLOCK, 9 * BLOCK]),
            vec![
                0..100,
                100..BLOCK + 5,
                BLOCK + 5..2 * BLOCK + 5,
                2 * BLOCK + 5..3 * BLOCK
            ]
        );
        // a smooth array then a random-looking one, the boundary mid-block
        let mut x = 7u64;
        let mut src = exponents(196_608, 3);
        src.extend((0..65_536).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        }));
        let mut cut = Vec::new();
        let mut ws = HuffWorkspace::default();
        compress(&src, &[196_608], &mut cut, &mut ws).unwrap();
        assert_eq!(zstd::bulk::decompress(&cut, src.len()).unwrap(), src);
        let plain = coded(&src, true);
        // the mixed block coded the smooth half with a flatter table
        assert!(
            cut.len() * 100 < plain.len() * 97,
            "{} vs {}",
            cut.len(),
            plain.len()
        );
    }

    /// Exponent-like bytes: values 118..=127, geometric towards 127.
    fn exponents(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                127 - (x.trailing_zeros().min(9) as u8)
            })
            .collect()
    }

    fn coded(src: &[u8], sampled: bool) -> Vec<u8> {
        let mut out = Vec::new();
        compress_with(
            src,
            &[],
            &mut out,
            &mut HuffWorkspace::default(),
            huf_flags(),
            sampled,
        )
        .unwrap();
        assert_eq!(zstd::bulk::decompress(&out, src.len()).unwrap(), src);
        out
    }

    #[test]
    fn sampled_tables_cost_little_and_fall_back_where_the_sample_misleads() {
        // a stationary plane: the sampled tables are within 0.5% of exact ones
        let plain = exponents(1 << 20, 3);
        let (fast, exact) = (coded(&plain, true).len(), coded(&plain, false).len());
        assert!(fast <= exact + exact / 200, "{fast} vs {exact}");
        // a run of a value the sample never sees (between two of its slices):
        // its long phantom code would cost ~6 KiB, so the block is redone exactly
        let mut run = plain.clone();
        let start = BLOCK / SAMPLE_PIECES + 2048;
        run[start..start + 6144].fill(117);
        let (fast, exact) = (coded(&run, true).len(), coded(&run, false).len());
        assert!(fast <= exact + exact / 200, "{fast} vs {exact}");
        // values far outside the sample's range (zeros in an exponent plane)
        // would need many phantom codes: those blocks take the exact histogram
        let mut zeros = plain.clone();
        for i in (0..zeros.len()).step_by(977) {
            zeros[i] = 0;
        }
        assert_eq!(coded(&zeros, true), coded(&zeros, false));
        // one value only: an RLE block either way
        assert_eq!(
            coded(&vec![9u8; 3 * BLOCK], true),
            coded(&vec![9u8; 3 * BLOCK], false)
        );
    }

    #[test]
    fn a_sampled_table_that_overflows_falls_back_instead_of_storing_raw() {
        // Skewed values where the sample looks; elsewhere ten others it never
        // sees (long phantom codes): the sampled coding overflows the block.
        let piece = BLOCK / (SAMPLE_SHARE * SAMPLE_PIECES);
        let stride = BLOCK / SAMPLE_PIECES;
        let mut sampled = vec![false; BLOCK];
        for k in 0..SAMPLE_PIECES {
            let at = k * stride + (k % SAMPLE_SHARE) * piece;
            sampled[at..at + piece].fill(true);
        }
        let fill = exponents(BLOCK, 99);
        let src: Vec<u8> = (0..BLOCK)
            .map(|i| match (sampled[i], i % 4000 == 1) {
                (true, true) => 30,
                (true, false) => fill[i] - 108, // 10..=19
                (false, _) => 20 + fill[i] % 10,
            })
            .collect();
        let (fast, exact) = (coded(&src, true), coded(&src, false));
        assert!(exact.len() < BLOCK * 6 / 10);
        assert_eq!(fast.len(), exact.len());
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    #[test]
    #[ignore = "timing; run with --release --ignored --nocapture"]
    fn huffman_vs_zstd_on_an_exponent_plane() {
        // top bytes of normal(0, 0.02) float32 values
        let mut x = 42u64;
        let mut plane = Vec::with_capacity(8 << 20);
        for _ in 0..(8 << 20) {
            x = x.wrapping_add(0x9E3779B97F4A7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            let u1 = ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let u2 = ((z.rotate_left(17) >> 11) as f64) / (1u64 << 53) as f64;
            let v = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * 0.02;
            plane.push(((v as f32).to_bits() >> 24) as u8);
        }
        let mut out = Vec::new();
        let mut ws = HuffWorkspace::default();
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            compress(&plane, &[], &mut out, &mut ws).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        let mut zbest = f64::MAX;
        let mut z = Vec::new();
        for _ in 0..3 {
            let t = std::time::Instant::now();
            z = zstd::bulk::compress(&plane, 1).unwrap();
            zbest = zbest.min(t.elapsed().as_secs_f64());
        }
        let mut dbest = f64::MAX;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let back = zstd::bulk::decompress(&out, plane.len()).unwrap();
            dbest = dbest.min(t.elapsed().as_secs_f64());
            assert_eq!(back.len(), plane.len());
        }
        // the four-stream coders alone, with the first block's table (the
        // pair tables are loaded for every block, as in a save)
        let max_symbol = exact_table(&plane[..BLOCK], &mut ws);
        let mut dst: Vec<u8> = Vec::with_capacity(PairCoder::bound(BLOCK) + BLOCK);
        let (mut zk, mut pk) = (f64::MAX, f64::MAX);
        for _ in 0..5 {
            let t = std::time::Instant::now();
            for block in plane.chunks_exact(BLOCK) {
                // SAFETY: `dst` has room for any coding of a block.
                let n = unsafe {
                    HUF_compress4X_usingCTable(
                        dst.as_mut_ptr().cast(),
                        dst.capacity(),
                        block.as_ptr().cast(),
                        BLOCK,
                        ws.table.as_ptr(),
                        huf_flags(),
                    )
                };
                assert!(n > 0);
            }
            zk = zk.min(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            for block in plane.chunks_exact(BLOCK) {
                assert!(ws.pairs.load(&ws.table, max_symbol as usize));
                assert!(ws.pairs.encode(block, &mut dst, 0) > 0);
            }
            pk = pk.min(t.elapsed().as_secs_f64());
        }
        let gb = plane.len() as f64 / 1e9;
        println!(
            "four-stream coder alone: zstd's {:.2} GB/s, pairs {:.2} GB/s (with a table load per block)",
            gb / zk,
            gb / pk
        );
        println!(
            "huffman: ratio {:.3}, {:.2} GB/s (decode {:.2} GB/s); zstd-1: ratio {:.3}, {:.2} GB/s",
            out.len() as f64 / plane.len() as f64,
            gb / best,
            gb / dbest,
            z.len() as f64 / plane.len() as f64,
            gb / zbest
        );
    }
}

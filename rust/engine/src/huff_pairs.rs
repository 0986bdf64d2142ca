//! A four-stream Huffman encoder that writes exactly the bytes of zstd's
//! `HUF_compress4X_usingCTable` for the same table, two symbols at a time.
//!
//! zstd's coder appends one code per byte to a bit container, so each byte
//! waits on the previous one's shift and OR. This one looks up the code of
//! each *pair* of bytes (the two codes joined, at most 22 bits) and codes
//! two of the four streams in the same loop, so that two chains of
//! dependent instructions overlap (four in one loop run out of registers and
//! were slower). The pair table is filled only for the byte values the
//! block's table codes (16-23 in 197 of MiniLM's 202 exponent-plane blocks,
//! 8-31 in all), so loading it costs a few microseconds per 128 KiB block.
//! On this machine's Xeon it codes an exponent plane at 1.3-1.45x the speed
//! of zstd's coder (`cargo test --release -p ckpt-engine huffman_vs_zstd --
//! --ignored --nocapture`).
//!
//! The output format is zstd's (RFC 8878, Huffman-coded streams): a 6-byte
//! jump table with the sizes of the first three streams, then the streams.
//! Each stream holds the codes of its segment from the last byte to the
//! first, least significant bit first, then a 1 bit that marks its end; the
//! decoder reads it backwards. A test compares every byte with zstd's coder.

/// Most byte values a table may code for the pair coder to take it: the
/// pair table gets one entry per ordered pair of them (4,096 at most).
pub const MAX_SYMBOLS: usize = 64;
/// Longest code the pair coder takes (zstd's default table log). A stream's
/// room is sized for it, so no entry, even one left by an earlier table,
/// can write past its stream's room.
pub const MAX_CODE_BITS: u32 = 11;
/// zstd's limit on a stream: the jump table holds 16-bit sizes.
const MAX_STREAM: usize = 65_535;
const LEN_SHIFT: u32 = 24;
const CODE_MASK: u32 = (1 << LEN_SHIFT) - 1;

/// The codes of one table, by byte and by pair of bytes (one per worker
/// thread; 321 KiB, of which one table touches a few KiB).
pub struct PairCoder {
    /// Indexed by two input bytes read as a little-endian u16: the code of
    /// the second byte then the first's (the order a stream appends them).
    /// The lengths are a table of their own, so coding a pair takes three
    /// ALU instructions (shift, or, add) and no unpacking.
    pair_codes: Vec<u32>,
    /// The total length of each pair's codes.
    pair_lens: Vec<u8>,
    /// Code of each byte, length in the top 8 bits.
    single: [u32; 256],
}

impl Default for PairCoder {
    fn default() -> Self {
        PairCoder {
            pair_codes: vec![0; 1 << 16],
            pair_lens: vec![0; 1 << 16],
            single: [0; 256],
        }
    }
}

/// One stream's bit writer: `bits` pending bits in the low end of `acc`.
struct Stream {
    acc: u64,
    bits: u32,
    start: *mut u8,
    ptr: *mut u8,
}

impl Stream {
    #[inline(always)]
    fn put_pair(&mut self, (code, len): (u32, u8)) {
        self.acc |= u64::from(code) << self.bits;
        self.bits += u32::from(len);
    }

    #[inline(always)]
    fn put(&mut self, entry: u32) {
        self.acc |= u64::from(entry & CODE_MASK) << self.bits;
        self.bits += entry >> LEN_SHIFT;
    }

    /// Writes the whole bytes pending and keeps the rest (under 8 bits).
    ///
    /// # Safety
    /// 8 bytes at `ptr` must be writable; at most 56 bits may be pending.
    #[inline(always)]
    unsafe fn flush(&mut self) {
        std::ptr::write_unaligned(self.ptr.cast::<u64>(), self.acc.to_le());
        let bytes = self.bits >> 3;
        self.ptr = self.ptr.add(bytes as usize);
        self.acc >>= bytes * 8;
        self.bits &= 7;
    }

    /// Appends the end mark and returns the stream's size in bytes.
    ///
    /// # Safety
    /// As [`Stream::flush`].
    unsafe fn close(mut self) -> usize {
        self.put(1 | (1 << LEN_SHIFT));
        self.flush();
        self.ptr.offset_from(self.start) as usize + usize::from(self.bits > 0)
    }
}

impl PairCoder {
    /// Loads the codes of a table built by zstd's `HUF_buildCTable_wksp`
    /// (`ctable[0]` is its header, `ctable[1 + s]` the code of byte `s`).
    /// Returns false, leaving the table to zstd's coder, where it codes more
    /// than [`MAX_SYMBOLS`] byte values or has a code over
    /// [`MAX_CODE_BITS`].
    ///
    /// Entries for byte values the table does not code keep what an earlier
    /// table put there: the caller codes only blocks whose every byte has a
    /// code, as zstd's coder requires too.
    pub fn load(&mut self, ctable: &[usize], max_symbol: usize) -> bool {
        let codes = &ctable[1..=max_symbol + 1];
        let mut symbols = [0u8; 256];
        let mut n = 0;
        for (s, &elt) in codes.iter().enumerate() {
            // zstd's HUF_CElt: the length in the low 8 bits, the code in the
            // top `len` bits.
            let len = (elt & 0xFF) as u32;
            if len == 0 {
                continue;
            }
            if len > MAX_CODE_BITS || n == MAX_SYMBOLS {
                return false;
            }
            let code = (elt >> (usize::BITS - len)) as u32;
            self.single[s] = code | (len << LEN_SHIFT);
            symbols[n] = s as u8;
            n += 1;
        }
        for &second in &symbols[..n] {
            let b = self.single[second as usize];
            let b_len = b >> LEN_SHIFT;
            let row = usize::from(second) << 8;
            for &first in &symbols[..n] {
                let a = self.single[first as usize];
                let at = row | usize::from(first);
                self.pair_codes[at] = (b & CODE_MASK) | ((a & CODE_MASK) << b_len);
                self.pair_lens[at] = (b_len + (a >> LEN_SHIFT)) as u8;
            }
        }
        n > 0
    }

    /// Spare capacity [`PairCoder::encode`] needs for `len` input bytes.
    pub fn bound(len: usize) -> usize {
        6 + 4 * stream_room(len.div_ceil(4))
    }

    /// Codes `src` as four streams into the spare capacity of `out` from
    /// offset `at` (which must be at least `out.len()`; the length is left
    /// as it is) and returns the number of bytes, or 0 where zstd's coder
    /// returns 0: fewer than 12 bytes, or a stream over 65,535 bytes.
    ///
    /// Every byte of `src` must have a code in the loaded table for the
    /// output to be right (memory safety does not depend on it).
    ///
    /// # Panics
    /// If `out` has less than [`PairCoder::bound`] of capacity after `at`.
    pub fn encode(&self, src: &[u8], out: &mut Vec<u8>, at: usize) -> usize {
        self.encode_with(src, out, at, false)
    }

    /// [`PairCoder::encode`], with the loops compiled without BMI2 where
    /// `portable` (tests run that build on a CPU that has it).
    pub(crate) fn encode_with(
        &self,
        src: &[u8],
        out: &mut Vec<u8>,
        at: usize,
        portable: bool,
    ) -> usize {
        let len = src.len();
        if len < 12 {
            return 0;
        }
        assert!(
            at >= out.len()
                && out
                    .capacity()
                    .checked_sub(at)
                    .is_some_and(|room| room >= Self::bound(len)),
            "the pair coder needs {} bytes of capacity after offset {at}",
            Self::bound(len)
        );
        let seg = len.div_ceil(4);
        let room = stream_room(seg);
        let parts = [
            &src[..seg],
            &src[seg..2 * seg],
            &src[2 * seg..3 * seg],
            &src[3 * seg..],
        ];
        // SAFETY: the four regions of `room` bytes after the jump table lie in
        // the capacity asserted above, and a stream writes at most its room:
        // every entry of the tables is at most 2 * MAX_CODE_BITS bits for two
        // bytes (`stream_room`).
        unsafe {
            let base = out.as_mut_ptr().add(at);
            let region = |k: usize| base.add(6 + k * room);
            let [n0, n1] = self.encode_n([parts[0], parts[1]], [region(0), region(1)], portable);
            let [n2, n3] = self.encode_n([parts[2], parts[3]], [region(2), region(3)], portable);
            let sizes = [n0, n1, n2, n3];
            if sizes.iter().any(|&n| n > MAX_STREAM) {
                return 0;
            }
            // the jump table, then the streams moved together
            let mut to = 6;
            for (k, &n) in sizes.iter().enumerate() {
                if k < 3 {
                    std::ptr::copy_nonoverlapping(
                        (n as u16).to_le_bytes().as_ptr(),
                        base.add(2 * k),
                        2,
                    );
                }
                if k > 0 {
                    std::ptr::copy(region(k), base.add(to), n);
                }
                to += n;
            }
            to
        }
    }

    /// Codes `N` segments as `N` streams, in one loop, into `dst`: with
    /// BMI2's shifts where the CPU has them (a shift by a register amount is
    /// then one instruction instead of three).
    ///
    /// # Safety
    /// Each `dst[k]` must have [`stream_room`] writable bytes for its
    /// segment (bytes without a code give wrong output, never a write
    /// outside that room).
    unsafe fn encode_n<const N: usize>(
        &self,
        src: [&[u8]; N],
        dst: [*mut u8; N],
        portable: bool,
    ) -> [usize; N] {
        #[cfg(not(target_arch = "x86_64"))]
        let _ = portable;
        #[cfg(target_arch = "x86_64")]
        if !portable {
            static BMI2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            if *BMI2.get_or_init(|| std::is_x86_feature_detected!("bmi2")) {
                // SAFETY: the CPU has BMI2; the rest is the caller's promise.
                return unsafe { self.encode_n_bmi2(src, dst) };
            }
        }
        // SAFETY: the caller's promise.
        unsafe { self.encode_n_body(src, dst) }
    }

    /// [`PairCoder::encode_n`] compiled for BMI2.
    ///
    /// # Safety
    /// As [`PairCoder::encode_n`], on a CPU with BMI2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "bmi2")]
    unsafe fn encode_n_bmi2<const N: usize>(
        &self,
        src: [&[u8]; N],
        dst: [*mut u8; N],
    ) -> [usize; N] {
        // SAFETY: the caller's promise.
        unsafe { self.encode_n_body(src, dst) }
    }

    /// # Safety
    /// As [`PairCoder::encode_n`].
    #[inline(always)]
    unsafe fn encode_n_body<const N: usize>(
        &self,
        src: [&[u8]; N],
        dst: [*mut u8; N],
    ) -> [usize; N] {
        let (codes, lens) = (self.pair_codes.as_ptr(), self.pair_lens.as_ptr());
        let pair_at = |src: *const u8, i: usize| -> (u32, u8) {
            // SAFETY: the callers read pairs inside their segment; the pair
            // tables have an entry for every u16.
            unsafe {
                let v = usize::from(u16::from_le(std::ptr::read_unaligned(
                    src.add(i).cast::<u16>(),
                )));
                (*codes.add(v), *lens.add(v))
            }
        };
        let mut streams = dst.map(|d| Stream {
            acc: 0,
            bits: 0,
            start: d,
            ptr: d,
        });
        // Codes go in from each segment's last byte to its first: an odd
        // last byte alone, then pairs. `ends[k]`: what is left of segment k.
        let mut ends = src.map(|s| s.len());
        for k in 0..N {
            if ends[k] % 2 == 1 {
                ends[k] -= 1;
                streams[k].put(self.single[usize::from(src[k][ends[k]])]);
            }
            streams[k].flush();
        }
        // All streams in one loop, two pairs each between flushes (at most
        // 7 + 2 * 22 bits pending), back from where the shortest has pairs.
        let ptrs = src.map(|s| s.as_ptr());
        let steps = ends.iter().min().copied().unwrap_or(0) / 4;
        let tops = std::array::from_fn::<_, N, _>(|k| ptrs[k].add(ends[k]));
        for i in 0..steps {
            let back = 4 * i + 4;
            for k in 0..N {
                streams[k].put_pair(pair_at(tops[k].sub(back), 2));
            }
            for k in 0..N {
                streams[k].put_pair(pair_at(tops[k].sub(back), 0));
            }
            for s in streams.iter_mut() {
                s.flush();
            }
        }
        for k in 0..N {
            let mut e = ends[k] - 4 * steps;
            while e >= 2 {
                e -= 2;
                streams[k].put_pair(pair_at(ptrs[k], e));
                streams[k].flush();
            }
        }
        streams.map(|s| s.close())
    }
}

/// Bytes one stream of `len` input bytes may write: its codes (at most
/// [`MAX_CODE_BITS`] per byte) and end mark, and the 8 bytes a flush stores.
fn stream_room(len: usize) -> usize {
    (len * MAX_CODE_BITS as usize + 1).div_ceil(8) + 8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zstd-format code table (`HUF_CElt`: the length in the low 8 bits,
    /// the code in the top bits) giving `len`-bit codes to `symbols`.
    fn table(symbols: impl Iterator<Item = u8>, len: u32) -> Vec<usize> {
        let mut t = vec![0usize; 257];
        for (k, s) in symbols.enumerate() {
            let code = k & ((1 << len) - 1);
            t[1 + s as usize] = len as usize | (code << (usize::BITS - len));
        }
        t
    }

    #[test]
    fn no_input_writes_past_the_bound_even_bytes_without_a_code() {
        let mut coder = PairCoder::default();
        // A: 64 values with 11-bit codes (the longest), over a whole block
        assert!(coder.load(&table(0..64, MAX_CODE_BITS), 255));
        let src: Vec<u8> = (0..131_075u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 26) as u8)
            .collect();
        // B: other values, 2-bit codes; A's values keep their stale entries
        assert!(coder.load(&table(200..204, 2), 255));
        for (n, at) in [(src.len(), 5), (131_072, 0), (12, 3), (13, 0), (4099, 1)] {
            let cap = at + PairCoder::bound(n);
            for portable in [false, true] {
                // exactly the capacity the bound asks for, then sentinels
                let mut out: Vec<u8> = Vec::with_capacity(cap + 64);
                out.resize(cap + 64, 0xEE);
                out.truncate(at);
                let mut tight: Vec<u8> = Vec::with_capacity(cap);
                tight.extend_from_slice(&out);
                let m = coder.encode_with(&src[..n], &mut out, at, portable);
                assert!(m <= PairCoder::bound(n), "{n}: {m}");
                // SAFETY: the sentinels were written by `resize` above.
                let tail = unsafe { std::slice::from_raw_parts(out.as_ptr().add(cap), 64) };
                assert!(
                    tail.iter().all(|&b| b == 0xEE),
                    "wrote past the bound for {n}"
                );
                // and with no slack at all, it runs within the capacity
                if tight.capacity() == cap {
                    coder.encode_with(&src[..n], &mut tight, at, portable);
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "the pair coder needs")]
    fn too_little_capacity_is_a_panic_not_a_write() {
        let mut coder = PairCoder::default();
        assert!(coder.load(&table(0..4, 2), 3));
        let mut out = Vec::with_capacity(100);
        coder.encode(&[1u8; 1000], &mut out, usize::MAX - 10);
    }
}

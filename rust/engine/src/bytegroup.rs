//! The `bytegroup(n)` filter: split `n`-byte items into `n` byte planes (all
//! first bytes, then all second bytes, ...) and merge them back. Exponent
//! bytes of floats end up side by side, where zstd finds them compressible.
//!
//! Both directions make one pass over the items; the common widths 2, 4 and
//! 8 run SSE2 kernels on 16 items at a time, with the one-bit rotation of
//! format 3 chunks folded into the same pass.

/// Splits `raw` (a multiple of `n` bytes) into `n` planes written back to
/// back into `out` (same length as `raw`).
pub fn split_into(raw: &[u8], n: usize, out: &mut [u8]) {
    debug_assert!(n >= 1 && raw.len() % n == 0 && out.len() == raw.len());
    split_part(raw, n, false, out, raw.len() / n, 0);
}

/// Splits `raw` (whole `n`-byte items, rotated left by one bit first when
/// `rot`; rotation is defined for `n` of 2, 4 and 8) into part of the planes
/// of `out`: plane `j` starts at byte `j * stride` of `out`, and the items of
/// `raw` land at offset `at` of each plane. Splitting a chunk block by block
/// this way, each block while it is still in cache from hashing, gives the
/// same planes as one [`split_into`] of the chunk.
///
/// Panics when a plane's part would end past `stride` or `out`.
pub fn split_part(raw: &[u8], n: usize, rot: bool, out: &mut [u8], stride: usize, at: usize) {
    let count = raw.len() / n;
    assert!(
        n >= 1 && at + count <= stride && out.len() >= (n - 1) * stride + at + count,
        "split_part: {count} items at {at} do not fit planes of {stride} bytes in {}",
        out.len()
    );
    match (n, rot) {
        (2, false) => split_fixed::<2, false>(raw, out, stride, at),
        (4, false) => split_fixed::<4, false>(raw, out, stride, at),
        (8, false) => split_fixed::<8, false>(raw, out, stride, at),
        (2, true) => split_fixed::<2, true>(raw, out, stride, at),
        (4, true) => split_fixed::<4, true>(raw, out, stride, at),
        (8, true) => split_fixed::<8, true>(raw, out, stride, at),
        (_, true) => unreachable!("rotation is defined for widths 2, 4 and 8"),
        _ => {
            for (i, item) in raw.chunks_exact(n).enumerate() {
                for (j, &b) in item.iter().enumerate() {
                    out[j * stride + at + i] = b;
                }
            }
        }
    }
}

/// Splits items of width 2, 4 or 8 (rotated left by one bit first when
/// `ROT`): whole 16-item groups with the SIMD kernels, the rest here.
fn split_fixed<const N: usize, const ROT: bool>(
    raw: &[u8],
    out: &mut [u8],
    stride: usize,
    at: usize,
) {
    #[cfg(target_arch = "x86_64")]
    let done = simd::split::<N, ROT>(raw, out, stride, at);
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    split_scalar::<N, ROT>(raw, out, stride, at, done);
}

/// Splits items `done..` of `raw` one at a time.
fn split_scalar<const N: usize, const ROT: bool>(
    raw: &[u8],
    out: &mut [u8],
    stride: usize,
    at: usize,
    done: usize,
) {
    let count = raw.len() / N;
    for i in done..count {
        // One little-endian load per item; byte j is `(v >> 8j) as u8`.
        let mut word = [0u8; 8];
        word[..N].copy_from_slice(&raw[i * N..(i + 1) * N]);
        let mut v = u64::from_le_bytes(word);
        if ROT {
            v = (v << 1) | (v >> (8 * N - 1));
        }
        for j in 0..N {
            out[j * stride + at + i] = (v >> (8 * j)) as u8;
        }
    }
}

/// Merges `n` planes (each `out.len() / n` bytes) into `out`.
pub fn merge_from(planes: &[&[u8]], out: &mut [u8]) {
    let n = planes.len();
    debug_assert!(n >= 1 && out.len() % n == 0);
    debug_assert!(planes.iter().all(|p| p.len() == out.len() / n));
    match n {
        2 => merge_fixed::<2, false>(planes, out),
        4 => merge_fixed::<4, false>(planes, out),
        8 => merge_fixed::<8, false>(planes, out),
        _ => {
            for (i, item) in out.chunks_exact_mut(n).enumerate() {
                for (j, b) in item.iter_mut().enumerate() {
                    *b = planes[j][i];
                }
            }
        }
    }
}

/// Merges planes of rotated items (width 2, 4 or 8) and rotates every item
/// right by one bit: the inverse of [`split_rot_into`], in one pass.
pub fn merge_rot_from(planes: &[&[u8]], out: &mut [u8]) {
    debug_assert!(planes.iter().all(|p| p.len() == out.len() / planes.len()));
    match planes.len() {
        2 => merge_fixed::<2, true>(planes, out),
        4 => merge_fixed::<4, true>(planes, out),
        8 => merge_fixed::<8, true>(planes, out),
        _ => unreachable!("rotation is defined for widths 2, 4 and 8"),
    }
}

/// Merges items of width 2, 4 or 8 (rotating them right by one bit when
/// `ROT`): whole 16-item groups with the SIMD kernels, the rest here.
fn merge_fixed<const N: usize, const ROT: bool>(planes: &[&[u8]], out: &mut [u8]) {
    let src: [&[u8]; N] = std::array::from_fn(|j| planes[j]);
    #[cfg(target_arch = "x86_64")]
    let done = simd::merge::<N, ROT>(src, out);
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    let count = out.len() / N;
    for i in done..count {
        let mut v = 0u64;
        for (j, plane) in src.iter().enumerate() {
            v |= (plane[i] as u64) << (8 * j);
        }
        if ROT {
            v = (v >> 1) | ((v & 1) << (8 * N - 1));
        }
        out[i * N..(i + 1) * N].copy_from_slice(&v.to_le_bytes()[..N]);
    }
}

/// SSE2 kernels (part of every x86_64 CPU, so no runtime detection): 16
/// items per step. Splitting narrows lanes with saturating packs of values
/// that fit (masked or sign-extended first), merging widens them with
/// unpacks; the one-bit rotation is two shifts and an or per lane.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    type V = __m128i;

    /// Rotates each `BITS`-bit lane left (`LEFT`) or right by one bit.
    #[inline(always)]
    unsafe fn rot<const BITS: u32, const LEFT: bool>(x: V) -> V {
        match (BITS, LEFT) {
            (16, true) => _mm_or_si128(_mm_slli_epi16(x, 1), _mm_srli_epi16(x, 15)),
            (16, false) => _mm_or_si128(_mm_srli_epi16(x, 1), _mm_slli_epi16(x, 15)),
            (32, true) => _mm_or_si128(_mm_slli_epi32(x, 1), _mm_srli_epi32(x, 31)),
            (32, false) => _mm_or_si128(_mm_srli_epi32(x, 1), _mm_slli_epi32(x, 31)),
            (64, true) => _mm_or_si128(_mm_slli_epi64(x, 1), _mm_srli_epi64(x, 63)),
            _ => _mm_or_si128(_mm_srli_epi64(x, 1), _mm_slli_epi64(x, 63)),
        }
    }

    /// Bytes 0 and 1 of sixteen 16-bit lanes (`a` then `b`).
    #[inline(always)]
    unsafe fn split16(a: V, b: V) -> (V, V) {
        let m = _mm_set1_epi16(0x00FF);
        (
            _mm_packus_epi16(_mm_and_si128(a, m), _mm_and_si128(b, m)),
            _mm_packus_epi16(_mm_srli_epi16(a, 8), _mm_srli_epi16(b, 8)),
        )
    }

    /// Bytes 0..4 of sixteen 32-bit lanes (`x[0]` to `x[3]`).
    #[inline(always)]
    unsafe fn split32(x: [V; 4]) -> [V; 4] {
        // 16-bit halves, sign-extended so that the signed pack keeps them.
        let lo = |v: V| _mm_srai_epi32(_mm_slli_epi32(v, 16), 16);
        let hi = |v: V| _mm_srai_epi32(v, 16);
        let (p0, p1) = split16(
            _mm_packs_epi32(lo(x[0]), lo(x[1])),
            _mm_packs_epi32(lo(x[2]), lo(x[3])),
        );
        let (p2, p3) = split16(
            _mm_packs_epi32(hi(x[0]), hi(x[1])),
            _mm_packs_epi32(hi(x[2]), hi(x[3])),
        );
        [p0, p1, p2, p3]
    }

    /// Sixteen 32-bit lanes from four byte planes (inverse of `split32`).
    #[inline(always)]
    unsafe fn merge32(p: [V; 4]) -> [V; 4] {
        let ab_lo = _mm_unpacklo_epi8(p[0], p[1]);
        let ab_hi = _mm_unpackhi_epi8(p[0], p[1]);
        let cd_lo = _mm_unpacklo_epi8(p[2], p[3]);
        let cd_hi = _mm_unpackhi_epi8(p[2], p[3]);
        [
            _mm_unpacklo_epi16(ab_lo, cd_lo),
            _mm_unpackhi_epi16(ab_lo, cd_lo),
            _mm_unpacklo_epi16(ab_hi, cd_hi),
            _mm_unpackhi_epi16(ab_hi, cd_hi),
        ]
    }

    #[inline(always)]
    unsafe fn load(p: *const u8) -> V {
        _mm_loadu_si128(p as *const V)
    }

    #[inline(always)]
    unsafe fn store(p: *mut u8, v: V) {
        _mm_storeu_si128(p as *mut V, v)
    }

    /// Splits whole 16-item groups of `N`-byte items of `raw` into the `N`
    /// planes of `out` (rotating each item left by one bit first when
    /// `ROT`); returns the items done.
    pub fn split<const N: usize, const ROT: bool>(
        raw: &[u8],
        out: &mut [u8],
        stride: usize,
        at: usize,
    ) -> usize {
        let count = raw.len() / N;
        assert!(at + count <= stride && out.len() >= (N - 1) * stride + at + count);
        let groups = count / 16;
        let src = raw.as_ptr();
        let dst = out.as_mut_ptr();
        for g in 0..groups {
            // SAFETY: SSE2 is baseline on x86_64. The loads read bytes
            // [16Ng, 16N(g+1)) of `raw`; the stores write bytes
            // [j*stride + at + 16g, j*stride + at + 16g + 16) of `out` for
            // j < N; all in bounds by the assert above since 16(g+1) <= count.
            unsafe {
                let s = src.add(16 * N * g);
                let d = |j: usize| dst.add(j * stride + at + 16 * g);
                match N {
                    2 => {
                        let mut a = load(s);
                        let mut b = load(s.add(16));
                        if ROT {
                            a = rot::<16, true>(a);
                            b = rot::<16, true>(b);
                        }
                        let (p0, p1) = split16(a, b);
                        store(d(0), p0);
                        store(d(1), p1);
                    }
                    4 => {
                        let mut x: [V; 4] = std::array::from_fn(|k| load(s.add(16 * k)));
                        if ROT {
                            x = x.map(|v| rot::<32, true>(v));
                        }
                        for (j, p) in split32(x).into_iter().enumerate() {
                            store(d(j), p);
                        }
                    }
                    _ => {
                        let mut x: [V; 8] = std::array::from_fn(|k| load(s.add(16 * k)));
                        if ROT {
                            x = x.map(|v| rot::<64, true>(v));
                        }
                        // [lo(a), lo(b), hi(a), hi(b)] per register, then the
                        // low and the high 32-bit words of items 4k..4k+4.
                        let y = x.map(|v| _mm_shuffle_epi32(v, 0xD8));
                        let lo: [V; 4] =
                            std::array::from_fn(|k| _mm_unpacklo_epi64(y[2 * k], y[2 * k + 1]));
                        let hi: [V; 4] =
                            std::array::from_fn(|k| _mm_unpackhi_epi64(y[2 * k], y[2 * k + 1]));
                        for (j, p) in split32(lo).into_iter().enumerate() {
                            store(d(j), p);
                        }
                        for (j, p) in split32(hi).into_iter().enumerate() {
                            store(d(4 + j), p);
                        }
                    }
                }
            }
        }
        groups * 16
    }

    /// Merges whole 16-item groups of `N` planes into `out` (rotating each
    /// item right by one bit when `ROT`); returns the items done.
    pub fn merge<const N: usize, const ROT: bool>(p: [&[u8]; N], out: &mut [u8]) -> usize {
        let count = out.len() / N;
        assert!(p.iter().all(|x| x.len() >= count));
        let groups = count / 16;
        for g in 0..groups {
            // SAFETY: as in `split`: 16 bytes of each plane at 16g and 16N
            // bytes of `out` at 16Ng, in bounds by the assert above.
            unsafe {
                let o = out.as_mut_ptr().add(16 * N * g);
                let src = |j: usize| load(p[j].as_ptr().add(16 * g));
                match N {
                    2 => {
                        let (a, b) = (src(0), src(1));
                        let mut lo = _mm_unpacklo_epi8(a, b);
                        let mut hi = _mm_unpackhi_epi8(a, b);
                        if ROT {
                            lo = rot::<16, false>(lo);
                            hi = rot::<16, false>(hi);
                        }
                        store(o, lo);
                        store(o.add(16), hi);
                    }
                    4 => {
                        let mut x = merge32([src(0), src(1), src(2), src(3)]);
                        if ROT {
                            x = x.map(|v| rot::<32, false>(v));
                        }
                        for (k, v) in x.into_iter().enumerate() {
                            store(o.add(16 * k), v);
                        }
                    }
                    _ => {
                        let lo = merge32([src(0), src(1), src(2), src(3)]);
                        let hi = merge32([src(4), src(5), src(6), src(7)]);
                        for k in 0..4 {
                            let mut a = _mm_unpacklo_epi32(lo[k], hi[k]);
                            let mut b = _mm_unpackhi_epi32(lo[k], hi[k]);
                            if ROT {
                                a = rot::<64, false>(a);
                                b = rot::<64, false>(b);
                            }
                            store(o.add(32 * k), a);
                            store(o.add(32 * k + 16), b);
                        }
                    }
                }
            }
        }
        groups * 16
    }
}

/// Splits `n`-byte items (`n` of 2, 4 or 8) into planes after rotating
/// each little-endian item left by one bit, in one pass: the sign bit of a
/// float moves to the bottom, so the top byte holds exactly the 8 exponent
/// bits of a bfloat16 or float32.
pub fn split_rot_into(raw: &[u8], n: usize, out: &mut [u8]) {
    split_part(raw, n, true, out, raw.len() / n, 0);
}

/// Splits `raw` into `n` owned planes (convenience for tests and small inputs).
pub fn split(raw: &[u8], n: usize) -> Vec<Vec<u8>> {
    let mut flat = vec![0u8; raw.len()];
    split_into(raw, n, &mut flat);
    let count = raw.len() / n;
    (0..n)
        .map(|j| flat[j * count..(j + 1) * count].to_vec())
        .collect()
}

/// Merges `n` planes stored back to back in `planes` into `out` (same length).
pub fn merge(planes: &[u8], n: usize, out: &mut [u8]) {
    let count = out.len() / n;
    let slices: Vec<&[u8]> = (0..n)
        .map(|j| &planes[j * count..(j + 1) * count])
        .collect();
    merge_from(&slices, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rotates every `n`-byte little-endian item of `items` left by one bit
    /// (`n` of 2, 4 or 8): the sign bit of a float moves to the bottom, so the
    /// top byte holds exactly the 8 exponent bits of a bfloat16 or float32.
    fn rotl1_items(items: &mut [u8], n: usize) {
        match n {
            2 => rot_fixed::<2>(items, true),
            4 => rot_fixed::<4>(items, true),
            8 => rot_fixed::<8>(items, true),
            _ => unreachable!("rotation is defined for widths 2, 4 and 8"),
        }
    }

    /// Undoes [`rotl1_items`].
    fn rotr1_items(items: &mut [u8], n: usize) {
        match n {
            2 => rot_fixed::<2>(items, false),
            4 => rot_fixed::<4>(items, false),
            8 => rot_fixed::<8>(items, false),
            _ => unreachable!("rotation is defined for widths 2, 4 and 8"),
        }
    }

    fn rot_fixed<const N: usize>(items: &mut [u8], left: bool) {
        let bits = 8 * N as u32;
        let mask = if N == 8 { u64::MAX } else { (1u64 << bits) - 1 };
        for item in items.chunks_exact_mut(N) {
            let mut word = [0u8; 8];
            word[..N].copy_from_slice(item);
            let v = u64::from_le_bytes(word);
            let r = if left {
                ((v << 1) | (v >> (bits - 1))) & mask
            } else {
                ((v >> 1) | (v << (bits - 1))) & mask
            };
            item.copy_from_slice(&r.to_le_bytes()[..N]);
        }
    }

    #[test]
    fn split_then_merge_is_identity_for_every_width() {
        for n in 1..=16usize {
            for items in [0usize, 1, 3, 1000, 8197] {
                let raw: Vec<u8> = (0..n * items).map(|i| (i * 131 % 256) as u8).collect();
                let planes = split(&raw, n);
                assert_eq!(planes.len(), n);
                for (j, plane) in planes.iter().enumerate() {
                    assert_eq!(plane.len(), items);
                    if items > 0 {
                        assert_eq!(plane[0], raw[j]);
                        assert_eq!(plane[items - 1], raw[(items - 1) * n + j]);
                    }
                }
                let flat: Vec<u8> = planes.concat();
                let mut out = vec![0u8; raw.len()];
                merge(&flat, n, &mut out);
                assert_eq!(out, raw, "width {n}, {items} items");
            }
        }
    }

    /// The byte-at-a-time definition of split (with rotation) and merge.
    fn reference_split(raw: &[u8], n: usize, rot: bool) -> Vec<u8> {
        let count = raw.len() / n;
        let mut out = vec![0u8; raw.len()];
        for i in 0..count {
            let mut item = raw[i * n..(i + 1) * n].to_vec();
            if rot {
                let top = item[n - 1] >> 7;
                for j in (0..n).rev() {
                    let carry = if j == 0 { top } else { item[j - 1] >> 7 };
                    item[j] = (item[j] << 1) | carry;
                }
            }
            for j in 0..n {
                out[j * count + i] = item[j];
            }
        }
        out
    }

    /// `n` xorshift bytes from `seed`.
    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn splitting_block_by_block_gives_the_planes_of_one_split() {
        let raw = noise(0x9E3779B97F4A7C15, 8 * 1000);
        for (n, rot) in [
            (2, false),
            (4, false),
            (8, false),
            (2, true),
            (4, true),
            (8, true),
            (3, false),
        ] {
            let raw = &raw[..raw.len() / n * n];
            let count = raw.len() / n;
            for items_per_block in [1usize, 7, 16, 17, 250, count] {
                let mut out = vec![0u8; raw.len()];
                for (k, block) in raw.chunks(items_per_block * n).enumerate() {
                    split_part(block, n, rot, &mut out, count, k * items_per_block);
                }
                assert_eq!(
                    out,
                    reference_split(raw, n, rot),
                    "n={n} rot={rot} {items_per_block}"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "do not fit")]
    fn a_block_past_the_planes_panics() {
        let mut out = vec![0u8; 64];
        split_part(&[0u8; 32], 4, false, &mut out, 16, 9);
    }

    #[test]
    fn kernels_match_the_bytewise_definition_at_every_length() {
        let raw = noise(0x2545F4914F6CDD1D, 8 * 300);
        for n in [2usize, 4, 8] {
            for items in (0..70).chain([255, 256, 257, 300]) {
                let raw = &raw[..n * items];
                for rot in [false, true] {
                    let want = reference_split(raw, n, rot);
                    let mut got = vec![0xAAu8; raw.len()];
                    if rot {
                        split_rot_into(raw, n, &mut got);
                    } else {
                        split_into(raw, n, &mut got);
                    }
                    assert_eq!(got, want, "split: width {n}, {items} items, rot {rot}");
                    let planes: Vec<&[u8]> = want.chunks(items.max(1)).take(n).collect();
                    let planes: Vec<&[u8]> = if items == 0 { vec![&[][..]; n] } else { planes };
                    let mut back = vec![0x55u8; raw.len()];
                    if rot {
                        merge_rot_from(&planes, &mut back);
                    } else {
                        merge_from(&planes, &mut back);
                    }
                    assert_eq!(back, raw, "merge: width {n}, {items} items, rot {rot}");
                }
            }
        }
    }

    #[test]
    fn rotation_moves_the_top_bit_down_and_back() {
        for n in [2usize, 4, 8] {
            let raw: Vec<u8> = (0..n * 3000).map(|i| (i * 151 % 256) as u8).collect();
            let mut items = raw.clone();
            rotl1_items(&mut items, n);
            for (a, b) in raw.chunks_exact(n).zip(items.chunks_exact(n)) {
                assert_eq!(b[0], (a[0] << 1) | (a[n - 1] >> 7));
                assert_eq!(b[n - 1], (a[n - 1] << 1) | (a[n - 2] >> 7));
            }
            let mut split = vec![0u8; raw.len()];
            split_rot_into(&raw, n, &mut split);
            let mut plain = vec![0u8; raw.len()];
            split_into(&items, n, &mut plain);
            assert_eq!(split, plain, "width {n}");
            rotr1_items(&mut items, n);
            assert_eq!(items, raw);
        }
    }

    #[test]
    #[ignore = "timing; run with --ignored --nocapture in release"]
    fn throughput() {
        let raw: Vec<u8> = (0..(64usize << 20)).map(|i| (i * 7 % 251) as u8).collect();
        let mut out = vec![0u8; raw.len()];
        for (n, rot) in [2usize, 4, 8]
            .into_iter()
            .flat_map(|n| [(n, false), (n, true)])
        {
            let mut back = vec![0u8; raw.len()];
            let (mut s, mut m) = (f64::MAX, f64::MAX);
            let count = raw.len() / n;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                if rot {
                    split_rot_into(&raw, n, &mut out);
                } else {
                    split_into(&raw, n, &mut out);
                }
                s = s.min(t.elapsed().as_secs_f64());
                let planes: Vec<&[u8]> = out.chunks(count).collect();
                let t = std::time::Instant::now();
                if rot {
                    merge_rot_from(&planes, &mut back);
                } else {
                    merge_from(&planes, &mut back);
                }
                m = m.min(t.elapsed().as_secs_f64());
            }
            assert_eq!(back, raw);
            println!(
                "n={n} rot={rot}: split {:.2} GB/s, merge {:.2} GB/s (best of 5)",
                0.067 / s,
                0.067 / m
            );
        }
    }
}

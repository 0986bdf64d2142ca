//! The `bytegroup(n)` filter: split `n`-byte items into `n` byte planes (all
//! first bytes, then all second bytes, ...) and merge them back. Exponent
//! bytes of floats end up side by side, where zstd finds them compressible.
//!
//! Both directions make one pass over the items (the common widths 2, 4 and 8
//! have loops the compiler unrolls), working in blocks so that the item
//! stream and the `n` plane streams stay in cache together.

const BLOCK: usize = 8192;

/// Splits `raw` (a multiple of `n` bytes) into `n` planes written back to
/// back into `out` (same length as `raw`).
pub fn split_into(raw: &[u8], n: usize, out: &mut [u8]) {
    debug_assert!(n >= 1 && raw.len() % n == 0 && out.len() == raw.len());
    match n {
        2 => split_fixed::<2>(raw, out),
        4 => split_fixed::<4>(raw, out),
        8 => split_fixed::<8>(raw, out),
        _ => {
            let count = raw.len() / n;
            for (i, item) in raw.chunks_exact(n).enumerate() {
                for (j, &b) in item.iter().enumerate() {
                    out[j * count + i] = b;
                }
            }
        }
    }
}

fn split_fixed<const N: usize>(raw: &[u8], out: &mut [u8]) {
    split_fixed_rot::<N, false>(raw, out)
}

fn split_fixed_rot<const N: usize, const ROT: bool>(raw: &[u8], out: &mut [u8]) {
    let count = raw.len() / N;
    let mut planes: Vec<&mut [u8]> = out.chunks_exact_mut(count.max(1)).take(N).collect();
    if count == 0 {
        return;
    }
    let mut start = 0;
    while start < count {
        let end = (start + BLOCK).min(count);
        let items = &raw[start * N..end * N];
        let mut dst: [&mut [u8]; N] = std::array::from_fn(|_| &mut [][..]);
        for (j, plane) in planes.iter_mut().enumerate() {
            dst[j] = &mut plane[start..end];
        }
        for (i, item) in items.chunks_exact(N).enumerate() {
            // One little-endian load per item; byte j is `(v >> 8j) as u8`.
            let mut word = [0u8; 8];
            word[..N].copy_from_slice(item);
            let mut v = u64::from_le_bytes(word);
            if ROT {
                v = (v << 1) | (v >> (8 * N - 1));
            }
            for (j, d) in dst.iter_mut().enumerate() {
                d[i] = (v >> (8 * j)) as u8;
            }
        }
        start = end;
    }
}

/// Merges `n` planes (each `out.len() / n` bytes) into `out`.
pub fn merge_from(planes: &[&[u8]], out: &mut [u8]) {
    let n = planes.len();
    debug_assert!(n >= 1 && out.len() % n == 0);
    debug_assert!(planes.iter().all(|p| p.len() == out.len() / n));
    match n {
        #[cfg(target_arch = "x86_64")]
        2 => {
            let done = simd::merge2(planes[0], planes[1], out);
            merge_tail::<2>(planes, out, done);
        }
        #[cfg(target_arch = "x86_64")]
        4 => {
            let done = simd::merge4([planes[0], planes[1], planes[2], planes[3]], out);
            merge_tail::<4>(planes, out, done);
        }
        #[cfg(not(target_arch = "x86_64"))]
        2 => merge_fixed::<2>(planes, out),
        #[cfg(not(target_arch = "x86_64"))]
        4 => merge_fixed::<4>(planes, out),
        8 => merge_fixed::<8>(planes, out),
        _ => {
            for (i, item) in out.chunks_exact_mut(n).enumerate() {
                for (j, b) in item.iter_mut().enumerate() {
                    *b = planes[j][i];
                }
            }
        }
    }
}

/// Merges items `done..` (the ones a SIMD kernel left) of `N` planes.
#[cfg(target_arch = "x86_64")]
fn merge_tail<const N: usize>(planes: &[&[u8]], out: &mut [u8], done: usize) {
    let count = out.len() / N;
    for i in done..count {
        for (j, plane) in planes.iter().enumerate() {
            out[i * N + j] = plane[i];
        }
    }
}

/// SSE2 kernels (part of every x86_64 CPU, so no runtime detection): 16
/// items per plane per step, interleaved with unpack instructions.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// Merges whole 16-item groups of two planes; returns the items done.
    pub fn merge2(a: &[u8], b: &[u8], out: &mut [u8]) -> usize {
        let count = out.len() / 2;
        assert!(a.len() >= count && b.len() >= count);
        let groups = count / 16;
        for g in 0..groups {
            // SAFETY: SSE2 is baseline on x86_64; the loads read bytes
            // [16g, 16g+16) of each plane and the stores write
            // [32g, 32g+32) of `out`, all in bounds by the assert above.
            unsafe {
                let x = _mm_loadu_si128(a.as_ptr().add(16 * g) as *const __m128i);
                let y = _mm_loadu_si128(b.as_ptr().add(16 * g) as *const __m128i);
                let o = out.as_mut_ptr().add(32 * g) as *mut __m128i;
                _mm_storeu_si128(o, _mm_unpacklo_epi8(x, y));
                _mm_storeu_si128(o.add(1), _mm_unpackhi_epi8(x, y));
            }
        }
        groups * 16
    }

    /// Merges whole 16-item groups of four planes; returns the items done.
    pub fn merge4(p: [&[u8]; 4], out: &mut [u8]) -> usize {
        let count = out.len() / 4;
        assert!(p.iter().all(|x| x.len() >= count));
        let groups = count / 16;
        for g in 0..groups {
            // SAFETY: as in `merge2`: 16 bytes of each plane at 16g and 64
            // bytes of `out` at 64g, in bounds by the assert above.
            unsafe {
                let a = _mm_loadu_si128(p[0].as_ptr().add(16 * g) as *const __m128i);
                let b = _mm_loadu_si128(p[1].as_ptr().add(16 * g) as *const __m128i);
                let c = _mm_loadu_si128(p[2].as_ptr().add(16 * g) as *const __m128i);
                let d = _mm_loadu_si128(p[3].as_ptr().add(16 * g) as *const __m128i);
                let ab_lo = _mm_unpacklo_epi8(a, b);
                let ab_hi = _mm_unpackhi_epi8(a, b);
                let cd_lo = _mm_unpacklo_epi8(c, d);
                let cd_hi = _mm_unpackhi_epi8(c, d);
                let o = out.as_mut_ptr().add(64 * g) as *mut __m128i;
                _mm_storeu_si128(o, _mm_unpacklo_epi16(ab_lo, cd_lo));
                _mm_storeu_si128(o.add(1), _mm_unpackhi_epi16(ab_lo, cd_lo));
                _mm_storeu_si128(o.add(2), _mm_unpacklo_epi16(ab_hi, cd_hi));
                _mm_storeu_si128(o.add(3), _mm_unpackhi_epi16(ab_hi, cd_hi));
            }
        }
        groups * 16
    }
}

#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn merge_fixed<const N: usize>(planes: &[&[u8]], out: &mut [u8]) {
    let count = out.len() / N;
    let mut start = 0;
    while start < count {
        let end = (start + BLOCK).min(count);
        let src: [&[u8]; N] = std::array::from_fn(|j| &planes[j][start..end]);
        for (i, item) in out[start * N..end * N].chunks_exact_mut(N).enumerate() {
            let mut v = 0u64;
            for (j, plane) in src.iter().enumerate() {
                v |= (plane[i] as u64) << (8 * j);
            }
            item.copy_from_slice(&v.to_le_bytes()[..N]);
        }
        start = end;
    }
}

/// Rotates every `n`-byte little-endian item of `items` left by one bit
/// (`n` of 2, 4 or 8): the sign bit of a float moves to the bottom, so the
/// top byte holds exactly the 8 exponent bits of a bfloat16 or float32.
pub fn rotl1_items(items: &mut [u8], n: usize) {
    match n {
        2 => rot_fixed::<2>(items, true),
        4 => rot_fixed::<4>(items, true),
        8 => rot_fixed::<8>(items, true),
        _ => unreachable!("rotation is defined for widths 2, 4 and 8"),
    }
}

/// Undoes [`rotl1_items`].
pub fn rotr1_items(items: &mut [u8], n: usize) {
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

/// Splits `n`-byte items (`n` of 2, 4 or 8) into planes after rotating
/// each left by one bit (see [`rotl1_items`]), in one pass.
pub fn split_rot_into(raw: &[u8], n: usize, out: &mut [u8]) {
    match n {
        2 => split_fixed_rot::<2, true>(raw, out),
        4 => split_fixed_rot::<4, true>(raw, out),
        8 => split_fixed_rot::<8, true>(raw, out),
        _ => unreachable!("rotation is defined for widths 2, 4 and 8"),
    }
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

    #[test]
    fn split_then_merge_is_identity_for_every_width() {
        for n in 1..=16usize {
            for items in [0usize, 1, 3, 1000, BLOCK + 5] {
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
        for n in [2usize, 4, 8] {
            let mut back = vec![0u8; raw.len()];
            let (mut s, mut m) = (f64::MAX, f64::MAX);
            for _ in 0..5 {
                let t = std::time::Instant::now();
                split_into(&raw, n, &mut out);
                s = s.min(t.elapsed().as_secs_f64());
                let t = std::time::Instant::now();
                merge(&out, n, &mut back);
                m = m.min(t.elapsed().as_secs_f64());
            }
            assert_eq!(back, raw);
            println!(
                "n={n}: split {:.2} GB/s, merge {:.2} GB/s (best of 5)",
                0.067 / s,
                0.067 / m
            );
        }
    }
}

//! The `bytegroup(n)` filter: split `n`-byte items into `n` byte planes (all
//! first bytes, then all second bytes, ...) and merge them back. Exponent
//! bytes of floats end up side by side, where zstd finds them compressible.

/// Splits `raw` (a multiple of `n` bytes) into `n` planes.
pub fn split(raw: &[u8], n: usize) -> Vec<Vec<u8>> {
    debug_assert!(n >= 1 && raw.len() % n == 0);
    let count = raw.len() / n;
    let mut planes: Vec<Vec<u8>> = (0..n).map(|_| Vec::with_capacity(count)).collect();
    match n {
        2 => split_fixed::<2>(raw, &mut planes),
        4 => split_fixed::<4>(raw, &mut planes),
        8 => split_fixed::<8>(raw, &mut planes),
        _ => {
            for item in raw.chunks_exact(n) {
                for (plane, &b) in planes.iter_mut().zip(item) {
                    plane.push(b);
                }
            }
        }
    }
    planes
}

fn split_fixed<const N: usize>(raw: &[u8], planes: &mut [Vec<u8>]) {
    let count = raw.len() / N;
    for (j, plane) in planes.iter_mut().enumerate() {
        plane.resize(count, 0);
        for (dst, item) in plane.iter_mut().zip(raw.chunks_exact(N)) {
            *dst = item[j];
        }
    }
}

/// Merges `n` planes stored back to back in `planes` into `out` (same length).
pub fn merge(planes: &[u8], n: usize, out: &mut [u8]) {
    debug_assert_eq!(planes.len(), out.len());
    let count = out.len() / n;
    match n {
        2 => merge_fixed::<2>(planes, out),
        4 => merge_fixed::<4>(planes, out),
        8 => merge_fixed::<8>(planes, out),
        _ => {
            for (i, item) in out.chunks_exact_mut(n).enumerate() {
                for (j, b) in item.iter_mut().enumerate() {
                    *b = planes[j * count + i];
                }
            }
        }
    }
}

fn merge_fixed<const N: usize>(planes: &[u8], out: &mut [u8]) {
    let count = out.len() / N;
    // Blocks keep the N source streams and the output in cache together.
    const BLOCK: usize = 4096;
    let mut start = 0;
    while start < count {
        let end = (start + BLOCK).min(count);
        for j in 0..N {
            let src = &planes[j * count + start..j * count + end];
            for (item, &b) in out[start * N..end * N].chunks_exact_mut(N).zip(src) {
                item[j] = b;
            }
        }
        start = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_is_identity_for_every_width() {
        for n in 1..=16usize {
            let raw: Vec<u8> = (0..n * 1000 + n * 3)
                .map(|i| (i * 131 % 256) as u8)
                .collect();
            let planes = split(&raw, n);
            assert_eq!(planes.len(), n);
            for (j, plane) in planes.iter().enumerate() {
                assert_eq!(plane[0], raw[j]);
            }
            let flat: Vec<u8> = planes.concat();
            let mut out = vec![0u8; raw.len()];
            merge(&flat, n, &mut out);
            assert_eq!(out, raw, "width {n}");
        }
    }
}

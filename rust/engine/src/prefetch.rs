//! Software prefetch for passes that read memory just once.

/// Prefetches the cache lines of `raw` from `*ahead` up to `until` (at most
/// `raw.len()`) and moves `*ahead` there. A hint only: it changes no value,
/// and does nothing off x86-64.
#[inline]
pub(crate) fn until(raw: &[u8], ahead: &mut usize, until: usize) {
    #[cfg(target_arch = "x86_64")]
    while *ahead < until {
        // SAFETY: a prefetch never faults, and `*ahead` is within `raw`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                raw.as_ptr().add(*ahead).cast(),
            )
        };
        *ahead += 64;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (raw, ahead, until);
}

//! Hints to the CPU about memory about to be used: they change no value, only when a cache
//! line arrives.

/// Asks the CPU to fetch the cache line holding `t`, in a state to write it; a no-op where
/// there is no such instruction.
pub fn prefetch_to_write<T: ?Sized>(t: &T) {
    // SAFETY: a prefetch reads and writes nothing and cannot fault, whatever the address;
    // x86_64 CPUs without PREFETCHW run it as a no-op.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::asm!(
            "prefetchw [{}]",
            in(reg) std::ptr::from_ref(t).cast::<u8>(),
            options(nostack, preserves_flags, readonly)
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = t;
}

/// Asks the CPU to fetch the cache line holding `t`; a no-op where there is no such
/// instruction.
pub fn prefetch<T: ?Sized>(t: &T) {
    // SAFETY: a prefetch reads nothing and cannot fault, whatever the address; SSE, which
    // has it, is in every x86_64.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(std::ptr::from_ref(t).cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = t;
}

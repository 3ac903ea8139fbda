//! What the engine asks of the memory the binaries run on (mimalloc's, the kernel's): keep
//! freed pages a while before handing them back to the kernel, and take memory from the
//! kernel in small pages, not huge ones. Both binaries call [`configure`] first in `main`.
//!
//! mimalloc returns a free page to the kernel 1 s after it was freed (`purge_delay`). The
//! engine frees memory in bursts and takes as much again soon after: a packet's claims list
//! (about 58 KiB for 1,000 shares) is freed when the packet leaves the closed cache, and the
//! next packets' lists, a fresh wallet table after a doubling, take it again. Memory that went
//! back to the kernel comes back as a page fault and a zeroed page each (2 MiB at a time where
//! the kernel gives huge pages), on a set thread, in the middle of a batch. In an HTTP festival
//! at half rate the server took 0.09–0.12 minor faults a claim with the default and
//! 0.03–0.07 with a 10 s delay, and the claim p99 at half rate was lower in five of six pairs
//! of rounds run as `scripts/bench` runs them, though not at a third of the rate
//! (BENCHMARKS.md, 2026-12-04, twelfth session). Never purging faulted least, but left
//! 1,000,000 resident packets at 1,252 MiB instead of 908; 10 s leaves them at 926–947 MiB.

use std::os::raw::c_long;

/// Applies [`keep_freed_pages`] and [`no_huge_pages`]. Returns what could not be applied, one
/// line each, for `main` to warn about (the process runs either way). Call it at the start of
/// `main`, before other threads.
pub fn configure() -> Vec<String> {
    let mut warnings = Vec::new();
    if keep_freed_pages().is_none() {
        warnings.push(
            "mimalloc numbers its options otherwise than expected; its purge delay stays at its default"
                .into(),
        );
    }
    if let Err(e) = no_huge_pages() {
        warnings.push(format!("transparent huge pages stay on for this process: {e}"));
    }
    warnings
}

/// How long mimalloc keeps a freed page before it goes back to the kernel.
pub const PURGE_DELAY_MS: c_long = 10_000;

/// `mi_option_purge_delay` in mimalloc 3.3 (libmimalloc-sys 0.1.49, pinned in Cargo.toml): the
/// binding does not name it. [`keep_freed_pages`] checks mimalloc's documented default for it
/// before it sets anything, and a test checks it, so a mimalloc whose options are numbered
/// otherwise is left as it is rather than misconfigured.
const PURGE_DELAY_OPTION: libmimalloc_sys::mi_option_t = 15;

/// mimalloc's own default for [`PURGE_DELAY_OPTION`], in ms.
const MIMALLOC_PURGE_DELAY_DEFAULT_MS: c_long = 1_000;

/// The environment variable with which an operator sets the delay (mimalloc reads it).
const PURGE_DELAY_ENV: &str = "MIMALLOC_PURGE_DELAY";

/// Sets mimalloc's purge delay to [`PURGE_DELAY_MS`], unless `MIMALLOC_PURGE_DELAY` set it.
/// Returns the delay in effect, or `None` when this mimalloc does not number its options as
/// expected (nothing is changed then). Call it at the start of `main`, before other threads.
pub fn keep_freed_pages() -> Option<c_long> {
    // SAFETY: reading an option is a lookup in mimalloc's option table, valid for any index
    // (it returns 0 outside the table).
    let current = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY_OPTION) };
    if std::env::var_os(PURGE_DELAY_ENV).is_some() {
        return Some(current);
    }
    match current {
        PURGE_DELAY_MS => return Some(current),
        MIMALLOC_PURGE_DELAY_DEFAULT_MS => {}
        _ => return None,
    }
    // SAFETY: not thread-safe per mimalloc's docs: called from `main` before other threads;
    // `set_default` leaves an option that was set explicitly (or from the environment) alone.
    unsafe { libmimalloc_sys::mi_option_set_default(PURGE_DELAY_OPTION, PURGE_DELAY_MS) };
    // SAFETY: as above.
    Some(unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY_OPTION) })
}

/// The environment variable with which an operator lets mimalloc (and the kernel) use
/// transparent huge pages, or not; mimalloc reads it at its start.
const ALLOW_THP_ENV: &str = "MIMALLOC_ALLOW_THP";

/// Asks the kernel for no transparent huge pages in this process (`PR_SET_THP_DISABLE`),
/// unless `MIMALLOC_ALLOW_THP` says otherwise (mimalloc then did what it says at its start).
///
/// mimalloc asks for huge pages (`MADV_HUGEPAGE`) on the memory it maps, so where the kernel
/// gives them, a first touch faults in and zeroes 2 MiB at once, about half a millisecond here,
/// on whichever thread touched it: a set thread in the middle of a batch, with every claim in
/// it waiting, or a worker. Small pages fault more often and each costs microseconds. In nine
/// pairs of rounds run as `scripts/bench` runs them, the server's own claim p99 at half rate
/// was lower with small pages in eight (2.1–4.3 ms against 3.4–6.1), its first second's in
/// all nine (2.4–7.3 against 7.0–17.2 ms); the full-rate festival was 2 % lower on the means,
/// within this host's noise, and the in-process festivals and the resident memory of
/// 1,000,000 packets did not move beyond it (BENCHMARKS.md, 2026-12-04, thirteenth session).
pub fn no_huge_pages() -> std::io::Result<()> {
    if std::env::var_os(ALLOW_THP_ENV).is_some() {
        return Ok(());
    }
    // SAFETY: PR_SET_THP_DISABLE takes an integer and changes a flag of this process's memory
    // map; no pointer is passed.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After `no_huge_pages` the kernel says this process takes no transparent huge pages.
    #[test]
    fn no_huge_pages_is_what_the_kernel_says() {
        if std::env::var_os(ALLOW_THP_ENV).is_some() {
            panic!("unset {ALLOW_THP_ENV} to run this test: it checks what the process asks for itself");
        }
        no_huge_pages().expect("prctl");
        // SAFETY: PR_GET_THP_DISABLE reads a flag of this process; no pointer is passed.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) }, 1);
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        assert!(status.lines().any(|l| l.split_whitespace().eq(["THP_enabled:", "0"])), "{status}");
    }

    /// The option number still names the purge delay: its default is mimalloc's documented
    /// one, and setting it takes.
    #[test]
    fn the_purge_delay_is_the_option_it_is_numbered() {
        if std::env::var_os(PURGE_DELAY_ENV).is_some() {
            panic!("unset {PURGE_DELAY_ENV} to run this test: it checks mimalloc's own default");
        }
        // SAFETY: see `keep_freed_pages`; this test is the only one touching the option.
        let default = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY_OPTION) };
        assert_eq!(default, MIMALLOC_PURGE_DELAY_DEFAULT_MS);
        assert_eq!(keep_freed_pages(), Some(PURGE_DELAY_MS));
        assert_eq!(keep_freed_pages(), Some(PURGE_DELAY_MS), "a second call changes nothing");
    }
}

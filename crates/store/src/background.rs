//! The priority of the store's background threads: the journal's fold and SQLite's checkpoint.
//!
//! Both do work that can wait (applying journaled batches to SQLite, copying the WAL into the
//! database file), beside set threads and HTTP workers that somebody is waiting on. They run
//! at nice 19, so under load they get a small share of the CPU, and with the shortest slice
//! the kernel allows (Linux ≥ 6.12, `sched_setattr`), so a set thread or worker that wakes
//! while one of them holds a core gets it within a tenth of a millisecond instead of after
//! the rest of a slice of milliseconds.
//!
//! Not `SCHED_IDLE`: it preempts at once too, but a `SCHED_IDLE` fold gets next to nothing while
//! anything else keeps the cores busy (another process on the machine, or the tests beside
//! it), and a query that waits for the fold to read its own writes then waits out its bound.
//!
//! Nice 19 is not enough on its own under a load that takes every core: the fold still ran in
//! the gaps and cost the claims a quarter of their rate. So the fold also measures whether the
//! claims want the CPU (this process's CPU time, [`process_cpu_us`]) and gives way for a
//! bounded lag (`journal.rs`, `Yield`).

/// The slice asked for: the kernel's minimum.
const SLICE_NS: u64 = 100_000;

/// The nice value of a background thread.
const NICE: i32 = 19;

/// `struct sched_attr` (`include/uapi/linux/sched/types.h`, first version: 56 bytes).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// Lowers the calling thread to nice 19 with the shortest slice. Best effort: where the slice
/// cannot be set (a kernel before 6.12 ignores or refuses it) the thread is at nice 19 alone,
/// and where even that is refused it competes with the others as an equal.
pub(crate) fn lower_priority(thread: &str) {
    // On Linux, PRIO_PROCESS with who = 0 names the calling thread, not the whole process.
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) } != 0 {
        let error = std::io::Error::last_os_error();
        tracing::debug!(thread, %error, "cannot lower the thread's priority");
        return;
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        nice: NICE,
        runtime: SLICE_NS,
        ..SchedAttr::default()
    };
    // SAFETY: pid 0 names the calling thread; `attr` is a valid sched_attr of the size it
    // declares and outlives the call, which only reads it.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if r != 0 {
        let error = std::io::Error::last_os_error();
        tracing::debug!(thread, %error, "cannot shorten the thread's slice");
    }
}

/// The CPU time this process has used so far, every thread's, user and system, in µs; `None`
/// where the system cannot say.
pub(crate) fn process_cpu_us() -> Option<u64> {
    cpu_us(libc::RUSAGE_SELF)
}

/// The calling thread's own CPU time so far, user and system, in µs; `None` where the system
/// cannot say. From the same accounting as [`process_cpu_us`], so the one can be taken out of
/// the other.
pub(crate) fn thread_cpu_us() -> Option<u64> {
    cpu_us(libc::RUSAGE_THREAD)
}

/// `getrusage(who)`'s user and system time, in µs.
fn cpu_us(who: libc::c_int) -> Option<u64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one `rusage` to the pointer it is given, which is valid for it.
    if unsafe { libc::getrusage(who, usage.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: getrusage succeeded, so it filled the struct (and it was zeroed before).
    let usage = unsafe { usage.assume_init() };
    let us = |t: libc::timeval| {
        u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_usec).unwrap_or(0)
    };
    Some(us(usage.ru_utime) + us(usage.ru_stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sched_getattr` of the calling thread.
    fn attr() -> SchedAttr {
        let mut attr = SchedAttr::default();
        let size = std::mem::size_of::<SchedAttr>() as u32;
        // SAFETY: pid 0 names the calling thread; the kernel writes at most `size` bytes.
        let r = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr as *mut SchedAttr, size, 0) };
        assert_eq!(r, 0, "sched_getattr: {}", std::io::Error::last_os_error());
        attr
    }

    /// Whether the running kernel's release is at least `major.minor`.
    fn kernel_at_least(major: u32, minor: u32) -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("kernel release");
        let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
        let (got_major, got_minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        (got_major, got_minor) >= (major, minor)
    }

    #[test]
    fn the_process_cpu_time_counts_a_busy_thread() {
        let before = process_cpu_us().expect("getrusage");
        // Spin until the thread's own clock says it ran 50 ms, however loaded the machine.
        std::thread::spawn(|| {
            let started = std::time::Instant::now();
            let mut x = 0u64;
            while thread_cpu_us().expect("the thread's CPU clock") < 50_000
                && started.elapsed() < std::time::Duration::from_secs(30)
            {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        })
        .join()
        .expect("thread");
        let after = process_cpu_us().expect("getrusage");
        assert!(after >= before + 50_000, "before {before} µs, after {after} µs");
    }

    #[test]
    fn a_lowered_thread_runs_at_nice_19_with_a_short_slice() {
        let own_nice = attr().nice;
        let lowered = std::thread::spawn(|| {
            lower_priority("test");
            attr()
        })
        .join()
        .expect("thread");
        assert_eq!((lowered.policy, lowered.nice), (libc::SCHED_OTHER as u32, NICE));
        // A thread's own slice came with Linux 6.12; before it there is none to report.
        if kernel_at_least(6, 12) {
            assert_eq!(lowered.runtime, SLICE_NS);
        }
        // The test's own thread was left alone.
        assert_eq!(attr().nice, own_nice);
    }
}

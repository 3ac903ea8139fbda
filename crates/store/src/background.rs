//! The priority of the store's background threads: the journal's fold and SQLite's checkpoint.
//!
//! Both do work that can wait (applying journaled batches to SQLite, copying the WAL into the
//! database file), beside set threads and HTTP workers that somebody is waiting on. Under
//! Linux's `SCHED_IDLE` such a thread runs on what the others leave, and a waking set thread or
//! worker takes its core at once. At nice 19 it ran out the slice it had started, and a claim
//! woken behind it waited: the HTTP storm handled 4–8 % fewer requests (BENCHMARKS.md,
//! 2026-12-03). Its work is not lost: a fold that trails far enough makes commits wait
//! (`journal.rs`), and the cores go to it then.

/// Moves the calling thread to `SCHED_IDLE`, or where that is refused, to nice 19. Best
/// effort: a thread that can be lowered neither way competes with the others as an equal.
pub(crate) fn lower_priority(thread: &str) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread; `param` is a valid sched_param that outlives
    // the call. An unprivileged thread may always move itself to SCHED_IDLE (sched(7)).
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
        return;
    }
    let idle_refused = std::io::Error::last_os_error();
    // On Linux, PRIO_PROCESS with who = 0 names the calling thread, not the whole process.
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } != 0 {
        let nice_refused = std::io::Error::last_os_error();
        tracing::debug!(thread, %idle_refused, %nice_refused, "cannot lower the thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lowered_thread_runs_under_sched_idle() {
        let policy = std::thread::spawn(|| {
            lower_priority("test");
            // SAFETY: pid 0 names the calling thread.
            unsafe { libc::sched_getscheduler(0) }
        })
        .join()
        .expect("thread");
        assert_eq!(policy, libc::SCHED_IDLE);
        // SAFETY: as above; the test's own thread was left alone.
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
    }
}

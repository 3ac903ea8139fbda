//! Prometheus metrics: request rates and latencies by route and status, and the engine's own
//! figures (queue depths here; batch sizes and commit times recorded by the sets).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use hongbao_engine::threads;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::AppState;

/// How often the recorder's histograms are drained into their summaries. The recorder keeps
/// every sample recorded since the last drain, and only a scrape of `/metrics` drains it
/// otherwise: a server nobody scrapes grew by every request's latency sample, forever
/// (measured: about 20 bytes a request, 2.5 GiB a day at 1,500 requests/s).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The name of the thread that drains the histograms.
const UPKEEP_THREAD: &str = "hongbao-metrics";

/// The process-wide recorder, installed once however many routers are built (tests build many),
/// with a thread of its own that drains its histograms every [`UPKEEP_EVERY`]. A thread, not a
/// task: routers are built inside and outside runtimes.
pub fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .install_recorder()
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle());
            let upkeep = handle.clone();
            let started = std::thread::Builder::new().name(UPKEEP_THREAD.into()).spawn(move || loop {
                std::thread::sleep(UPKEEP_EVERY);
                upkeep.run_upkeep();
            });
            if let Err(e) = started {
                tracing::error!(error = %e, "cannot start the metrics upkeep thread; histograms grow until scraped");
            }
            handle
        })
        .clone()
}

/// One request being timed, from before its handler runs to its response.
pub struct RequestTimer {
    started: Instant,
    route: Option<MatchedPath>,
    method: &'static str,
}

impl RequestTimer {
    pub fn start(req: &Request) -> RequestTimer {
        RequestTimer {
            started: Instant::now(),
            route: req.extensions().get::<MatchedPath>().cloned(),
            method: method_label(req.method()),
        }
    }

    /// Counts the request and records its time under its route, method and status; returns
    /// that time.
    pub fn finish(self, res: &Response) -> Duration {
        let route = self.route.as_ref().map_or("unmatched", MatchedPath::as_str);
        let took = self.started.elapsed();
        let seconds = took.as_secs_f64();
        let status = res.status().as_u16();
        HANDLES.with_borrow_mut(|by_route| {
            // One lookup per request; the route's name is copied only the first time.
            if let Some(known) = by_route.get_mut(route) {
                return record(known, route, self.method, status, seconds);
            }
            let mut known = Vec::new();
            record(&mut known, route, self.method, status, seconds);
            by_route.insert(route.to_string(), known);
        });
        took
    }
}

/// Counts one request in `known`, its route's handles, adding the handles of its method and
/// status the first time they are seen.
fn record(known: &mut Vec<RouteHandles>, route: &str, method: &'static str, status: u16, seconds: f64) {
    let handles = match known.iter().position(|h| h.method == method && h.status == status) {
        Some(at) => &known[at],
        None => {
            known.push(RouteHandles::new(route, method, status));
            known.last().expect("pushed above")
        }
    };
    handles.requests.increment(1);
    handles.duration.record(seconds);
}

/// The `method` label: the method, or `OTHER` for one outside RFC 9110's list, so a client
/// making up methods cannot make up metric series.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "OTHER",
    }
}

/// The counter and histogram of one route, method and status.
struct RouteHandles {
    method: &'static str,
    status: u16,
    requests: Counter,
    duration: Histogram,
}

impl RouteHandles {
    fn new(route: &str, method: &'static str, status: u16) -> RouteHandles {
        let labels =
            [("route", route.to_string()), ("method", method.to_string()), ("status", status.to_string())];
        RouteHandles {
            method,
            status,
            requests: metrics::counter!("http_requests_total", &labels),
            duration: metrics::histogram!("http_request_duration_seconds", &labels),
        }
    }
}

thread_local! {
    /// Each worker thread's handles by route, looked up in the recorder once per route,
    /// method and status instead of once per request (that lookup hashes three labels and
    /// allocates their values). Bounded: routes are the router's patterns or `unmatched`,
    /// methods the nine known or `OTHER`, statuses those the handlers answer with.
    static HANDLES: RefCell<HashMap<String, Vec<RouteHandles>>> = RefCell::new(HashMap::new());
}

pub async fn render(State(s): State<AppState>) -> impl IntoResponse {
    for set in s.engine.status() {
        let label = [("set", set.set.to_string())];
        metrics::gauge!("hongbao_set_queue_depth", &label).set(set.queue_depth as f64);
        metrics::gauge!("hongbao_set_ready", &label).set(if set.ready { 1.0 } else { 0.0 });
        if let Some(n) = set.unapplied_commits {
            metrics::gauge!("hongbao_store_unapplied_commits", &label).set(n as f64);
        }
        if let Some(giving_way) = set.fold_giving_way {
            metrics::gauge!("hongbao_store_fold_giving_way", &label).set(if giving_way { 1.0 } else { 0.0 });
        }
    }
    metrics::counter!("hongbao_closed_refusals_total").absolute(s.engine.closed_refusals());
    let mut text = s.metrics.render();
    if let Some(cpu) = cpu_by_threads() {
        cpu.render(&mut text);
    }
    ([("content-type", "text/plain; version=0.0.4")], text)
}

/// What the server's threads do, by the start of the names they give themselves: the label
/// of `hongbao_cpu_seconds_total`, in the order it is written.
const THREAD_KINDS: [(&str, &str); 5] = [
    // HTTP handlers (and what else tokio runs).
    ("tokio", "tokio-"),
    // tokio's blocking threads name themselves so once they have run a query.
    ("query", threads::QUERY_THREAD),
    ("set", threads::SET_THREAD),
    ("fold", threads::FOLD_THREAD),
    ("checkpoint", threads::CHECKPOINT_THREAD),
];

/// The kernel keeps the first 15 bytes of a thread's name (`comm`).
const THREAD_NAME_BYTES_MAX: usize = 15;

/// CPU seconds (user and system) the process has used, by what its threads do: the kinds of
/// [`THREAD_KINDS`], then `other` (everything else, and threads that have exited).
#[derive(Debug, Clone, PartialEq)]
struct CpuByThreads {
    seconds: Vec<(&'static str, f64)>,
}

impl CpuByThreads {
    /// Appends the counter family, in Prometheus text.
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        out.push_str(
            "# HELP hongbao_cpu_seconds_total CPU time the server's threads used, by what they do\n\
             # TYPE hongbao_cpu_seconds_total counter\n",
        );
        for (kind, seconds) in &self.seconds {
            let _ = writeln!(out, "hongbao_cpu_seconds_total{{threads=\"{kind}\"}} {seconds:.2}");
        }
    }
}

/// One thread as a read of `/proc/self/task` saw it: its kind (an index into
/// [`THREAD_KINDS`], `None` for `other`) and the clock ticks it has used.
type ThreadTicks = (Option<usize>, u64);

/// What the reads before this one saw, so that every kind's counter only grows. A sum over the
/// live threads alone goes back when a thread exits (tokio lets an idle blocking thread go
/// after 10 s), or when it names itself anew (a blocking thread becomes a query thread once it
/// has run a query); and `other`, the process's total less the named threads, goes back when
/// the threads used more between the read of the total and the read of theirs. A scrape that
/// saw a counter go back by a tick failed the bench's check that the kinds add up to the whole.
#[derive(Debug, Default)]
struct Ledger {
    /// Each live thread by id: its kind, its ticks, and the ticks it had when it took that
    /// kind (counted under the kind it had before).
    threads: HashMap<u64, (Option<usize>, u64, u64)>,
    /// Ticks of threads no longer of each kind (exited, or renamed).
    left: [u64; THREAD_KINDS.len()],
    /// The last `other` reported.
    other: u64,
}

impl Ledger {
    /// Takes in one read: the process's total ticks, then each live thread's. Returns the
    /// ticks of each kind of [`THREAD_KINDS`], then `other`: each at least what it was before.
    fn account(&mut self, total: u64, now: HashMap<u64, ThreadTicks>) -> [u64; THREAD_KINDS.len() + 1] {
        let mut threads = HashMap::with_capacity(now.len());
        for (tid, (kind, ticks)) in now {
            let base = match self.threads.remove(&tid) {
                Some((was, before, base)) if ticks >= before => {
                    if was == kind {
                        base
                    } else {
                        // Renamed: what it used so far stays with the kind it had.
                        self.leave(was, before - base);
                        before
                    }
                }
                // Fewer ticks than before: the id names a new thread.
                Some((was, before, base)) => {
                    self.leave(was, before - base);
                    0
                }
                None => 0,
            };
            threads.insert(tid, (kind, ticks, base));
        }
        for (_, (was, before, base)) in std::mem::replace(&mut self.threads, threads) {
            self.leave(was, before - base);
        }
        let mut out = [0u64; THREAD_KINDS.len() + 1];
        out[..THREAD_KINDS.len()].copy_from_slice(&self.left);
        for (kind, ticks, base) in self.threads.values() {
            if let Some(k) = kind {
                out[*k] += ticks - base;
            }
        }
        let named: u64 = out[..THREAD_KINDS.len()].iter().sum();
        self.other = self.other.max(total.saturating_sub(named));
        out[THREAD_KINDS.len()] = self.other;
        out
    }

    fn leave(&mut self, kind: Option<usize>, ticks: u64) {
        if let Some(k) = kind {
            self.left[k] += ticks;
        }
    }
}

/// Reads this process's CPU time by thread kind from `/proc/self` (Linux). `None` elsewhere, or
/// where `/proc` cannot be read: the metric is then left out, not reported as zero.
fn cpu_by_threads() -> Option<CpuByThreads> {
    static LEDGER: OnceLock<Mutex<Ledger>> = OnceLock::new();
    let ticks_per_s = ticks_per_s()?;
    // The process's own figure counts its exited threads too.
    let total = cpu_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    let mut now = HashMap::new();
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<u64>().ok()) else { continue };
        // A thread can exit between the listing and the read: the ledger keeps its ticks.
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let Some(name) = thread_name(&stat) else { continue };
        let kind = THREAD_KINDS.iter().position(|(_, prefix)| {
            name.as_bytes().starts_with(&prefix.as_bytes()[..prefix.len().min(THREAD_NAME_BYTES_MAX)])
        });
        now.insert(tid, (kind, cpu_ticks(&stat).unwrap_or(0)));
    }
    let ticks =
        LEDGER.get_or_init(Mutex::default).lock().unwrap_or_else(|p| p.into_inner()).account(total, now);
    let seconds = |ticks: u64| ticks as f64 / ticks_per_s as f64;
    let kinds = THREAD_KINDS.iter().map(|(kind, _)| *kind).chain(["other"]);
    Some(CpuByThreads { seconds: kinds.zip(ticks).map(|(kind, t)| (kind, seconds(t))).collect() })
}

/// The kernel's clock ticks per second, the unit of `/proc`'s CPU times.
fn ticks_per_s() -> Option<u64> {
    // SAFETY: sysconf reads a constant of the C library and touches no memory of ours.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok().filter(|&t| t > 0)
}

/// The thread's name (`comm`) from its `/proc/.../stat` line: between the first `(` and the
/// last `)`, since the name itself may hold either.
fn thread_name(stat: &str) -> Option<&str> {
    stat.get(stat.find('(')? + 1..stat.rfind(')')?)
}

/// utime + stime, in clock ticks, from a `/proc/.../stat` line (proc(5): fields 14 and 15).
/// The command name in parentheses may hold spaces and parentheses: fields are counted after
/// its last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    // After the name: state is field 3, so utime (14) is the 12th and stime the 13th.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of this process's threads, as the kernel knows them.
    fn thread_names() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .expect("Linux lists a process's threads under /proc/self/task")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_string())
            .collect()
    }

    #[test]
    fn cpu_ticks_are_read_after_the_name_whatever_it_holds() {
        let stat = "4242 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 1200 34 0 0 20 0 9 0 100 0 0";
        assert_eq!(cpu_ticks(stat), Some(1234));
        assert_eq!(thread_name(stat), Some("a (b) c"));
        assert_eq!(cpu_ticks("4242 (cut short) S 1 2"), None);
        assert_eq!(cpu_ticks("no name at all"), None);
    }

    /// A read of the ledger from (thread id, kind, ticks) triples.
    fn read(ledger: &mut Ledger, total: u64, threads: &[(u64, Option<usize>, u64)]) -> Vec<u64> {
        ledger
            .account(total, threads.iter().map(|&(tid, kind, ticks)| (tid, (kind, ticks))).collect())
            .to_vec()
    }

    #[test]
    fn no_kind_goes_back_when_threads_exit_rename_or_outrun_the_total() {
        let (tokio, query, set) = (Some(0), Some(1), Some(2));
        let mut ledger = Ledger::default();
        // tokio, query, set, fold, checkpoint, other.
        let first = read(&mut ledger, 100, &[(1, tokio, 40), (2, tokio, 10), (3, set, 30), (4, None, 5)]);
        assert_eq!(first, [50, 0, 30, 0, 0, 20]);
        // Thread 2 ran a query and named itself so: its 10 ticks stay with tokio, and only
        // what it used after counts as a query's.
        let renamed = read(&mut ledger, 130, &[(1, tokio, 50), (2, query, 25), (3, set, 35), (4, None, 5)]);
        assert_eq!(renamed, [60, 15, 35, 0, 0, 20]);
        // Thread 2 exits: the query counter keeps what it used. The total was read before
        // the threads used 10 more ticks between them: `other` stays where it was.
        let exited = read(&mut ledger, 140, &[(1, tokio, 60), (3, set, 45), (4, None, 5)]);
        assert_eq!(exited, [70, 15, 45, 0, 0, 20]);
        // Id 3 now names a new set thread, with fewer ticks than the old one had.
        let reused = read(&mut ledger, 160, &[(1, tokio, 60), (3, set, 4), (4, None, 5)]);
        assert_eq!(reused, [70, 15, 49, 0, 0, 26]);
        for (before, after) in [&first, &renamed, &exited, &reused].windows(2).map(|w| (w[0], w[1])) {
            assert!(before.iter().zip(after).all(|(b, a)| a >= b), "{before:?} then {after:?}");
        }
    }

    #[test]
    fn cpu_by_threads_names_every_kind_and_counts_a_busy_thread() {
        let before = cpu_by_threads().expect("Linux has /proc/self");
        let kinds: Vec<&str> = before.seconds.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, ["tokio", "query", "set", "fold", "checkpoint", "other"]);
        // Half a second of CPU on a thread of no known kind shows under `other`. The thread
        // spins until the kernel has counted that much for it, however busy the machine is.
        let ticks_per_s = ticks_per_s().expect("clock ticks");
        std::thread::spawn(move || {
            let own = || cpu_ticks(&std::fs::read_to_string("/proc/thread-self/stat").expect("own stat"));
            let mut x = 0u64;
            while own().expect("own ticks") < ticks_per_s / 2 {
                for _ in 0..100_000 {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
        })
        .join()
        .expect("busy thread");
        let after = cpu_by_threads().expect("Linux has /proc/self");
        let other = |c: &CpuByThreads| c.seconds.last().expect("other").1;
        assert!(other(&after) - other(&before) >= 0.45, "{before:?} then {after:?}");
        let mut text = String::new();
        after.render(&mut text);
        assert!(text.contains("# TYPE hongbao_cpu_seconds_total counter\n"), "{text}");
        assert!(text.contains("hongbao_cpu_seconds_total{threads=\"other\"} "), "{text}");
    }

    /// Regression: with no upkeep, a server that nobody scraped kept every latency sample.
    #[test]
    fn the_recorder_drains_its_histograms_without_a_scrape() {
        let _ = recorder();
        let _ = recorder();
        // A new thread names itself once it runs: look for a while.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut names = thread_names();
        while !names.iter().any(|n| n == UPKEEP_THREAD) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            names = thread_names();
        }
        assert_eq!(
            names.iter().filter(|n| *n == UPKEEP_THREAD).count(),
            1,
            "one upkeep thread however many recorders are asked for: {names:?}"
        );
    }
}

//! Prometheus metrics: request rates and latencies by route and status, and the engine's own
//! figures (queue depths here; batch sizes and commit times recorded by the sets).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;
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

/// Reads this process's CPU time by thread kind from `/proc/self` (Linux). `None` elsewhere, or
/// where `/proc` cannot be read: the metric is then left out, not reported as zero.
fn cpu_by_threads() -> Option<CpuByThreads> {
    let ticks_per_s = ticks_per_s()?;
    // The process's own figure counts its exited threads too, so `other` never goes back.
    let total = cpu_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    let mut by_kind = [0u64; THREAD_KINDS.len()];
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        // A thread can exit between the listing and the read: it then counts under `other`.
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let Some(name) = thread_name(&stat) else { continue };
        let kind = THREAD_KINDS.iter().position(|(_, prefix)| {
            name.as_bytes().starts_with(&prefix.as_bytes()[..prefix.len().min(THREAD_NAME_BYTES_MAX)])
        });
        if let Some(kind) = kind {
            by_kind[kind] += cpu_ticks(&stat).unwrap_or(0);
        }
    }
    let seconds = |ticks: u64| ticks as f64 / ticks_per_s as f64;
    let named: u64 = by_kind.iter().sum();
    let mut out: Vec<(&'static str, f64)> =
        THREAD_KINDS.iter().zip(by_kind).map(|((kind, _), ticks)| (*kind, seconds(ticks))).collect();
    out.push(("other", seconds(total.saturating_sub(named))));
    Some(CpuByThreads { seconds: out })
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

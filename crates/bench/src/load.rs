//! The load scenarios: `storm`, `festival` and `ceiling`, over HTTP or in process.
//!
//! A small control runtime does setup, progress and the audit; `--threads` load threads, each
//! with a single-threaded runtime of its own, run the claimers and record into thread-local
//! histograms (see `record`). Every task connects first, and over HTTP asks for `/healthz` once
//! (unless `--no-warm-up`); the clock starts when all of them are ready, so neither connecting
//! nor a connection's first exchange is measured. Opened together, 256 connections' first
//! requests took the half-rate festival's first second from a p99 of about 2.8 ms to about
//! 5 ms (BENCHMARKS.md, thirty-sixth session): a cost of the load generator opening every
//! connection in the same few milliseconds, where a service's clients keep theirs open.
//!
//! Closed loop by default (each task sends its next request when its last one is answered, so
//! `--concurrency` is the number in flight); `--rate` makes it an open loop whose latencies
//! count from when each request was due.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use hongbao_core::{PacketId, SystemClock, UserId};
use hongbao_engine::{Engine, EngineConfig};
use hongbao_store::{NullReader, NullStore, Reader, Store};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};

use crate::client::{Answer, Client, Target};
use crate::http::Endpoint;
use crate::machine::{self, CpuSample, CpuUse, Machine};
use crate::record::{self, Op, Recorder};
use crate::report::{self, BenchResult, RunConfig, StormFigures};
use crate::zipf::Zipf;
use crate::{BenchArgs, Scenario};

/// Average share in fen: every packet holds 1 yuan per share.
pub(crate) const SHARE_AVERAGE_FEN: i64 = 100;
/// Packets live an hour: far longer than any run, so none expires under the load.
pub(crate) const PACKET_EXPIRES_IN_S: i64 = 3600;
/// Festival senders, each funded once for every packet it may send during the run.
const FESTIVAL_SENDERS: usize = 64;
/// What each festival sender is given: 10^11 fen covers a million 1,000-share packets.
const FESTIVAL_SENDER_FUND_FEN: i64 = 100_000_000_000;
/// Tasks that re-send emptied festival packets, one send in flight each. Sends are rare
/// beside claims (one per `--shares` claims), but each waits for its set's commit like a claim:
/// in process a send took 10–25 ms, so 4 tasks re-sent at most a few hundred packets a second
/// against the 300–950 that emptied. Hot slots then stood empty, and claimers spent their time
/// drawing again (BENCHMARKS.md, 2026-12-04). Idle ones cost nothing but a connection each.
const FESTIVAL_SENDER_TASKS: usize = 32;
/// Draws a claimer makes for a slot that holds a live packet before it yields. With a spare
/// packet sent ahead for every slot, a slot is empty only while its re-sends fall behind.
const PICK_TRIES: usize = 16;
/// Connections (or tasks) used to create packets and fund senders before the load.
pub(crate) const SETUP_CONCURRENCY: usize = 32;
/// How often the progress bar is redrawn, and how often a plain line is printed when stderr
/// is not a terminal.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
const PROGRESS_LINE_EVERY: Duration = Duration::from_secs(5);
/// Pause before retrying a setup request the service refused as overloaded.
const SETUP_RETRY_PAUSE: Duration = Duration::from_millis(5);

pub fn run(args: &BenchArgs) -> anyhow::Result<BenchResult> {
    let scenario = args.scenario;
    if scenario == Scenario::Ceiling && args.in_process {
        bail!("ceiling measures the HTTP layer: it has no in-process mode");
    }
    let threads = args.threads.unwrap_or(if args.in_process { 1 } else { 2 }).max(1);
    let concurrency = args.concurrency();
    let shares = args.shares.unwrap_or(if scenario == Scenario::Storm { 100_000 } else { 1_000 });
    let packets = match scenario {
        Scenario::Storm => 1,
        Scenario::Festival => args.packets.unwrap_or(500).max(1),
        _ => 0,
    };
    let started_at_unix_s =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let nonce = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let mut notes = Vec::new();
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("hongbao-bench-control")
        .enable_all()
        .build()
        .context("cannot start the control runtime")?;

    let started = start_target(args, &control, &mut notes)?;
    let target = started.target.clone();

    // Setup: fund senders, create packets.
    let plan = control.block_on(async {
        match scenario {
            Scenario::Storm => {
                let sender = format!("b{nonce}s0");
                let total_fen = i64::from(shares) * SHARE_AVERAGE_FEN;
                fund(&target, std::slice::from_ref(&sender), total_fen, &nonce).await?;
                let ids = create_packets(&target, &[sender], 1, shares, total_fen, &nonce, 1, None).await?;
                Ok::<Plan, anyhow::Error>(Plan::Storm {
                    packet: ids[0],
                    shares: u64::from(shares),
                    total_fen,
                    paid: AtomicU64::new(0),
                    emptied_us: AtomicU64::new(0),
                    prefix: format!("b{nonce}u"),
                })
            }
            Scenario::Festival => {
                let senders: Vec<String> = (0..FESTIVAL_SENDERS).map(|i| format!("f{nonce}s{i}")).collect();
                let total_fen = i64::from(shares) * SHARE_AVERAGE_FEN;
                fund(&target, &senders, FESTIVAL_SENDER_FUND_FEN, &nonce).await?;
                // Every slot gets its live packet and a spare sent ahead (see `Slot`).
                let pb = setup_bar(args.quiet, 2 * u64::from(packets), "creating packets");
                let mut ids = create_packets(
                    &target,
                    &senders,
                    2 * packets as usize,
                    shares,
                    total_fen,
                    &nonce,
                    SETUP_CONCURRENCY,
                    Some(&pb),
                )
                .await?;
                pb.finish_and_clear();
                let (refill, refill_rx) = mpsc::unbounded_channel();
                let (asks, asks_rx) = mpsc::unbounded_channel();
                let spares = ids.split_off(packets as usize);
                Ok(Plan::Festival {
                    slots: ids.into_iter().zip(spares).map(|(live, spare)| Slot::new(live, spare)).collect(),
                    zipf: Zipf::new(packets as usize, args.zipf_s),
                    refill,
                    refill_rx: tokio::sync::Mutex::new(refill_rx),
                    sends: AtomicU64::new(0),
                    history_per_mille: args.history_per_mille.min(1000),
                    asks,
                    asks_rx: tokio::sync::Mutex::new(asks_rx),
                    senders,
                    total_fen,
                    shares,
                    nonce: nonce.clone(),
                    prefix: format!("f{nonce}u"),
                })
            }
            _ => Ok(Plan::Ceiling),
        }
    })?;
    let plan = Arc::new(plan);

    // Load: `threads` OS threads, each with its own single-threaded runtime and its share of
    // the tasks (as wrk runs one event loop per thread). A task and its connection stay on one
    // thread: no work stealing, no cross-thread wake-ups per request.
    let (go_tx, go_rx) = watch::channel(None::<Go>);
    let refillers = if matches!(*plan, Plan::Festival { .. }) { FESTIVAL_SENDER_TASKS } else { 0 };
    // Festival, one call per claim: history queries on connections of their own, as many as
    // the claims'. A query can wait for the store (on SQLite, for the fold: up to half a
    // second); on a claimer's own connection it held up the claims behind it, and the claims'
    // latency was then the queries'. At 1 % of 30,000 claims/s and 500 ms a query, 150 wait at
    // once (one asker for two claim connections was too few: the queries queued in the
    // client). Batched calls run their queries in a task beside each claimer instead.
    let askers = match &*plan {
        Plan::Festival { history_per_mille, .. } if *history_per_mille > 0 && args.batch <= 1 => concurrency,
        _ => 0,
    };
    let tasks = concurrency + refillers + askers;
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(tasks);
    let mut per_thread: Vec<Vec<LoadFuture>> = (0..threads).map(|_| Vec::new()).collect();
    let warm_up = !args.in_process && !args.no_warm_up;
    let task = || Task {
        target: target.clone(),
        plan: plan.clone(),
        ready: ready_tx.clone(),
        go: go_rx.clone(),
        warm_up,
    };
    for w in 0..concurrency {
        let t = task();
        if args.batch > 1 {
            per_thread[w % threads].push(Box::pin(batch_claimer(t, w, args.batch)));
        } else {
            per_thread[w % threads].push(Box::pin(claimer(t, w)));
        }
    }
    for r in 0..refillers {
        per_thread[r % threads].push(Box::pin(refiller(task(), r)));
    }
    for a in 0..askers {
        per_thread[a % threads].push(Box::pin(asker(task())));
    }
    drop(ready_tx);
    let mut load_threads = Vec::with_capacity(threads);
    // In process, one call per claim: an answer per claim comes from the engine's threads.
    let woken_from_outside = args.in_process && args.batch <= 1;
    for (i, futures) in per_thread.into_iter().enumerate() {
        let handle = std::thread::Builder::new()
            .name(format!("hongbao-bench-load-{i}"))
            .spawn(move || load_thread(futures, woken_from_outside))
            .context("cannot start a load thread")?;
        load_threads.push(handle);
    }
    let pace = match args.rate {
        Some(0) => bail!("--rate must be at least 1"),
        Some(r) => Some(Duration::from_secs_f64(concurrency as f64 / r as f64)),
        None => None,
    };
    let main_op = if scenario == Scenario::Ceiling { Op::Health } else { Op::Claim };
    let (recorder, ends, cpu, server_cpu_before, server_cpu_at_end) = control.block_on(async {
        for _ in 0..tasks {
            match ready_rx.recv().await {
                Some(Ok(())) => {}
                Some(Err(e)) => bail!("a load task could not start: {e}"),
                None => bail!("the load tasks stopped before starting"),
            }
        }
        // After the setup (deposits, the first packets), so only the load is counted.
        let server_cpu_before = server_cpu(&started).await;
        let loadavg_before = machine::loadavg_1m();
        let cpu_before = CpuSample::now();
        let start = Instant::now();
        let recorder = Recorder::new(start);
        let deadline = start + Duration::from_secs(args.duration_s);
        go_tx.send_replace(Some(Go { recorder: recorder.clone(), start, deadline, pace, concurrency }));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let label = format!("{} ({})", scenario.name(), if args.in_process { "in process" } else { "http" });
        let ticker = tokio::spawn(progress(recorder.clone(), deadline, args.quiet, label, main_op, stop_rx));
        let ends = tokio::task::spawn_blocking(move || {
            let mut ends = Vec::new();
            for t in load_threads {
                ends.extend(t.join().map_err(|_| anyhow!("a load thread panicked"))??);
            }
            Ok::<Vec<TaskEnd>, anyhow::Error>(ends)
        })
        .await
        .map_err(|e| anyhow!("joining the load threads: {e}"))??;
        let cpu = CpuUse::between(cpu_before, CpuSample::now(), loadavg_before);
        // Before the audit, which waits for the fold the load put off.
        let server_cpu_at_end = server_cpu(&started).await;
        let _ = stop_tx.send(());
        let _ = ticker.await;
        Ok((recorder, ends, cpu, server_cpu_before, server_cpu_at_end))
    })?;

    let start = recorder.start;
    let last = ends.iter().filter_map(|e| e.last).max().unwrap_or(start);
    let elapsed_s = last.saturating_duration_since(start).as_secs_f64().max(1e-3);
    let counted: u64 = ends.iter().map(|e| e.requests).sum();
    let total = recorder.total();
    if total.requests() != counted {
        notes.push(format!(
            "the timeline holds {} answers but the tasks counted {counted}: figures may be low",
            total.requests()
        ));
    }
    let seconds = recorder.seconds();
    let (ops, claims, timeline) = report::figures(&total, &seconds, main_op, elapsed_s);
    let storm = match &*plan {
        Plan::Storm { packet, shares, total_fen, emptied_us, .. } => {
            let emptied = emptied_us.load(Ordering::Relaxed);
            let emptied_after_s = (emptied > 0).then(|| emptied as f64 / 1e6);
            let paid = claims.as_ref().map_or(0, |c| c.paid);
            let paid_fen = claims.as_ref().map_or(0, |c| c.paid_fen);
            let away = claims.as_ref().map_or(0, |c| c.turned_away);
            // Every share is paid before the first claimer is turned away, so what was turned
            // away came after the packet emptied.
            let turned_away_per_s_after_empty =
                emptied_after_s.filter(|t| elapsed_s - t > 0.1).map(|t| report::rate(away, elapsed_s - t));
            Some(StormFigures {
                packet_id: packet.to_string(),
                shares: *shares as u32,
                total_fen: *total_fen,
                emptied_after_s,
                paid_per_s_until_empty: emptied_after_s.map(|t| report::rate(*shares, t)),
                turned_away_per_s_after_empty,
                paid_fen_matches_total: paid == *shares && paid_fen == *total_fen,
            })
        }
        _ => None,
    };
    if let Plan::Festival { sends, asks_rx, slots, refill_rx, .. } = &*plan {
        let sent = sends.load(Ordering::Relaxed);
        let queued = control.block_on(refill_rx.lock()).len();
        let empty = slots.iter().filter(|s| s.live() == 0).count();
        notes.push(format!(
            "{sent} emptied packets were re-sent during the run; at the deadline {queued} re-sends \
             were still queued and {empty} of {} slots had no live packet",
            slots.len()
        ));
        if askers > 0 {
            let unasked = control.block_on(asks_rx.lock()).len();
            notes.push(format!(
                "history queries ran on {askers} {} of their own beside the {} claiming ones; {unasked} owed at the deadline were not asked",
                if args.in_process { "tasks" } else { "connections" },
                concurrency
            ));
        }
    }

    // Audit. On SQLite it reads the store after the fold has applied the journal, so how long
    // it takes says how far the fold trailed the acknowledged claims.
    let audit_started = Instant::now();
    let (audit, audit_ok) = control.block_on(audit(&started, &mut notes));
    if audit.is_some() {
        notes.push(format!(
            "the audit answered {:.1} s after the load ended (on SQLite it waits for the fold to apply every acknowledged batch)",
            audit_started.elapsed().as_secs_f64()
        ));
    }
    let server_cpu_after = control.block_on(server_cpu(&started));
    let requests = total.requests();
    let before = server_cpu_before.unwrap_or_else(|e| {
        notes.push(format!("cannot read the server's CPU from its /metrics before the load: {e:#}"));
        None
    });
    let mut per_request = |after: anyhow::Result<Option<BTreeMap<String, f64>>>| match (&before, after) {
        (Some(before), Ok(Some(after))) => report::cpu_per_request_us(before, &after, requests),
        (_, Err(e)) => {
            notes.push(format!("cannot read the server's CPU from its /metrics: {e:#}"));
            None
        }
        _ => None,
    };
    let server_cpu_us_per_request_during_load = per_request(server_cpu_at_end);
    let server_cpu_us_per_request = per_request(server_cpu_after);
    let store = started.store.clone();
    control.block_on(started.stop());

    Ok(BenchResult {
        scenario: scenario.name().to_string(),
        mode: if args.in_process { "in_process" } else { "http" }.to_string(),
        store,
        url: (!args.in_process).then(|| args.url.clone()),
        started_at_unix_s,
        config: RunConfig {
            duration_s: args.duration_s,
            concurrency,
            batch: args.batch,
            threads,
            sets: args.sets,
            shares: if scenario == Scenario::Ceiling { 0 } else { shares },
            packets,
            rate_per_s: args.rate,
            zipf_s: args.zipf_s,
            history_per_mille: if scenario == Scenario::Festival { args.history_per_mille } else { 0 },
            warmed_up: warm_up,
        },
        elapsed_s: (elapsed_s * 1000.0).round() / 1000.0,
        requests,
        requests_per_s: report::rate(requests, elapsed_s),
        claims,
        ops,
        storm,
        resident: None,
        cpu: Some(cpu),
        server_cpu_us_per_request,
        server_cpu_us_per_request_during_load,
        timeline,
        audit,
        audit_ok,
        errors_sample: recorder.errors(),
        notes,
        machine: Machine::here(),
    })
}

type LoadFuture = std::pin::Pin<Box<dyn std::future::Future<Output = TaskEnd> + Send>>;

/// One load thread: runs its tasks to the end, then hands its last second of counts to the
/// timeline.
///
/// `woken_from_outside`: the tasks' answers come from threads outside the runtime, one per
/// claim (in process, the engine's set threads complete each call's oneshot). A current-thread
/// runtime wakes its driver with an `eventfd` write for every such answer, busy or not: a fifth
/// of a set thread's time in the in-process festival went to those writes. A multi-thread
/// runtime of one worker wakes its worker only when it is parked (in-process festival, one call
/// per claim: 243–291k against 311–359k claims paid/s in four pairs). Over HTTP every wake-up
/// comes from the runtime's own I/O driver, and batched calls get one answer per thousand
/// claims: there the current-thread runtime is the leaner one (batched, durable: 566k and 604k
/// against 533k and 491k).
fn load_thread(futures: Vec<LoadFuture>, woken_from_outside: bool) -> anyhow::Result<Vec<TaskEnd>> {
    let rt = if woken_from_outside {
        // The tasks run on the worker, so its thread-local counts are flushed as it stops.
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hongbao-bench-load")
            .on_thread_stop(record::flush_thread)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    }
    .context("cannot start a load thread's runtime")?;
    let ends = rt.block_on(async {
        let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
        let mut ends = Vec::with_capacity(handles.len());
        for h in handles {
            ends.push(h.await.map_err(|e| anyhow!("a load task panicked: {e}"))?);
        }
        Ok::<Vec<TaskEnd>, anyhow::Error>(ends)
    });
    record::flush_thread();
    // A multi-thread runtime's worker flushes as it stops, which dropping the runtime waits for.
    drop(rt);
    ends
}

/// The target under load and what must be stopped afterwards.
pub(crate) struct Started {
    pub target: Target,
    pub store: String,
    engine: Option<Engine>,
    store_off: bool,
    /// Removed when dropped, after the engine has stopped.
    _dir: Option<tempfile::TempDir>,
}

impl Started {
    pub async fn stop(self) {
        if let Some(engine) = &self.engine {
            engine.shutdown().await;
        }
    }
}

pub(crate) fn start_target(
    args: &BenchArgs,
    control: &tokio::runtime::Runtime,
    notes: &mut Vec<String>,
) -> anyhow::Result<Started> {
    if !args.in_process {
        let api_key =
            args.api_key.as_deref().ok_or_else(|| anyhow!("--api-key (or HONGBAO_API_KEY) is needed"))?;
        let admin_key = args
            .admin_key
            .as_deref()
            .ok_or_else(|| anyhow!("--admin-key (or HONGBAO_ADMIN_KEY) is needed"))?;
        let endpoint = control.block_on(Endpoint::new(&args.url, api_key, admin_key))?;
        return Ok(Started {
            target: Target::Http(endpoint),
            store: "server".to_string(),
            engine: None,
            store_off: false,
            _dir: None,
        });
    }
    let (engine, dir) = start_engine(args)?;
    if args.store_off {
        notes.push(
            "memory only: every set runs on a store that keeps nothing (NullStore), so nothing is durable"
                .to_string(),
        );
    } else {
        notes.push(
            "durable: SQLite per set behind its journal, one fdatasync'd record per batch, replies after it"
                .to_string(),
        );
    }
    Ok(Started {
        target: Target::Engine(engine.clone()),
        store: if args.store_off { "none" } else { "sqlite" }.to_string(),
        engine: Some(engine),
        store_off: args.store_off,
        _dir: dir,
    })
}

/// Starts the engine in this process: SQLite files in the data dir, or no store at all.
pub(crate) fn start_engine(args: &BenchArgs) -> anyhow::Result<(Engine, Option<tempfile::TempDir>)> {
    let (path, dir) = match &args.data {
        Some(path) => (path.clone(), None),
        None => {
            let dir = tempfile::Builder::new()
                .prefix("hongbao-bench.")
                .tempdir()
                .context("cannot make a temp dir")?;
            (dir.path().to_path_buf(), Some(dir))
        }
    };
    let mut config = EngineConfig::new(path);
    config.sets = args.sets;
    let engine = if args.store_off {
        let stores: Vec<(Box<dyn Store>, Arc<dyn Reader>)> = (0..args.sets)
            .map(|_| (Box::new(NullStore) as Box<dyn Store>, Arc::new(NullReader) as Arc<dyn Reader>))
            .collect();
        Engine::start_with(config, stores, Arc::new(SystemClock))
    } else {
        Engine::start(config, Arc::new(SystemClock))
    }
    .map_err(|e| anyhow!("cannot start the engine: {e}"))?;
    Ok((engine, dir))
}

/// The server's CPU seconds by thread kind (`/metrics`), over HTTP; `Ok(None)` in process, or
/// from a server that does not report them.
async fn server_cpu(started: &Started) -> anyhow::Result<Option<BTreeMap<String, f64>>> {
    let Target::Http(_) = &started.target else { return Ok(None) };
    let Client::Http(mut c) = started.target.client().await? else { unreachable!("an HTTP target") };
    c.cpu_seconds().await
}

async fn audit(started: &Started, notes: &mut Vec<String>) -> (Option<serde_json::Value>, Option<bool>) {
    if started.store_off {
        notes.push(
            "audit skipped: it compares each set's memory with its store, and this store keeps nothing"
                .into(),
        );
        return (None, None);
    }
    match &started.target {
        Target::Http(_) => {
            let answer = async {
                let Client::Http(mut c) = started.target.client().await? else {
                    unreachable!("an HTTP target")
                };
                c.audit().await
            }
            .await;
            match answer {
                Ok(v) => {
                    let ok = v.get("ok").and_then(|ok| ok.as_bool());
                    (Some(v), ok)
                }
                Err(e) => {
                    notes.push(format!("audit failed to run: {e:#}"));
                    (None, Some(false))
                }
            }
        }
        Target::Engine(engine) => match engine.audit().await {
            Ok(r) => {
                let v = serde_json::json!({
                    "ok": r.ok, "deposits": r.deposits_fen, "withdrawals": r.withdrawals_fen,
                    "balances": r.balances_fen, "escrow": r.escrow_fen, "in_flight": r.in_flight_fen,
                    "problems": r.problems,
                });
                (Some(v), Some(r.ok))
            }
            Err(e) => {
                notes.push(format!("audit failed to run: {e}"));
                (None, Some(false))
            }
        },
    }
}

/// What each scenario's tasks share. One per run, behind an `Arc`: the variants' sizes do not
/// matter.
#[allow(clippy::large_enum_variant)]
enum Plan {
    Storm {
        packet: u64,
        shares: u64,
        total_fen: i64,
        /// Shares paid so far, to time the moment the packet empties.
        paid: AtomicU64,
        /// Microseconds from the start to the last share; 0 until then.
        emptied_us: AtomicU64,
        prefix: String,
    },
    Festival {
        /// By popularity rank: the packet claimers draw, and its spare.
        slots: Vec<Slot>,
        zipf: Zipf,
        /// Slots whose packet emptied: the refillers send a new packet into each.
        refill: mpsc::UnboundedSender<usize>,
        /// Shared by the refillers; held across `.await` by design (one waits at a time).
        refill_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<usize>>,
        sends: AtomicU64,
        history_per_mille: u32,
        /// History queries owed by the claimers, with when they were owed (`Some(user)`: a
        /// recent claimer's received page; `None`: a sender's sent page), taken by the
        /// history tasks.
        asks: mpsc::UnboundedSender<(Instant, Option<String>)>,
        /// Shared by the history tasks; held across `.await` by design (one waits at a time).
        asks_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<(Instant, Option<String>)>>,
        senders: Vec<String>,
        total_fen: i64,
        shares: u32,
        nonce: String,
        prefix: String,
    },
    Ceiling,
}

impl Plan {
    /// Storm: counts a paid share, and times the moment the last one is paid.
    fn storm_paid(&self, start: Instant) {
        if let Plan::Storm { shares, paid, .. } = self {
            if paid.fetch_add(1, Ordering::Relaxed) + 1 == *shares {
                self.storm_emptied(start);
            }
        }
    }

    /// Storm: the packet was empty by now, seen from the last paid share or from the first
    /// claim turned away, whichever this client saw first. A client busy with refusals answered
    /// at once (a closed packet is turned away without its set) may see the last paid reply
    /// late; the first refusal tells when the server had emptied the packet.
    fn storm_emptied(&self, start: Instant) {
        if let Plan::Storm { emptied_us, .. } = self {
            let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
            let _ = emptied_us.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |seen| {
                (seen == 0 || us < seen).then_some(us)
            });
        }
    }

    /// Festival: a claim on `packet` was turned away. The first claimer to see it empty puts
    /// the slot's spare in its place and asks for a new packet.
    fn festival_emptied(&self, slot: usize, packet: u64) {
        if let Plan::Festival { slots, refill, .. } = self {
            if slots[slot].emptied(packet) {
                let _ = refill.send(slot);
            }
        }
    }
}

/// A festival slot: the packet its claimers draw, and a spare sent ahead. When the live packet
/// empties, the spare takes its place at once, as a crowd moves to the next packet in the
/// chat, and a refiller sends the slot a new spare. Without the spare, a hot slot stood empty
/// from the moment its packet emptied until the re-send came back, and its claimers drew
/// again and again meanwhile: in the batched in-process runs, drawing was about half of the
/// load generator's time.
struct Slot {
    /// The live packet id, read on every draw; 0 while both it and the spare are owed.
    live: AtomicU64,
    /// The spare; 0 while its re-send is owed. Changes (rare: one per `--shares` claims)
    /// take this lock, so a slot's live packet and spare move together.
    spare: std::sync::Mutex<u64>,
}

impl Slot {
    fn new(live: u64, spare: u64) -> Slot {
        Slot { live: AtomicU64::new(live), spare: std::sync::Mutex::new(spare) }
    }

    fn live(&self) -> u64 {
        self.live.load(Ordering::Acquire)
    }

    /// `packet` was seen empty: the spare (or nothing, when it is owed) becomes the live
    /// packet. True for the first to report it, who owes the slot a re-send.
    fn emptied(&self, packet: u64) -> bool {
        let mut spare = self.spare.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.live.load(Ordering::Acquire) != packet {
            return false;
        }
        self.live.store(std::mem::take(&mut *spare), Ordering::Release);
        true
    }

    /// A re-send arrived: it fills the live place if that is owed, else the spare's. Every
    /// re-send answers one `emptied`, so there is always a place owed.
    fn resent(&self, id: u64) {
        let mut spare = self.spare.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.live.load(Ordering::Acquire) == 0 {
            self.live.store(id, Ordering::Release);
        } else {
            debug_assert_eq!(*spare, 0, "a re-send for a slot that owed none");
            *spare = id;
        }
    }
}

/// The start signal: the clock, the deadline and the pace.
#[derive(Clone)]
struct Go {
    recorder: Arc<Recorder>,
    start: Instant,
    deadline: Instant,
    /// Open loop: each task sends one request per this interval.
    pace: Option<Duration>,
    concurrency: usize,
}

struct Task {
    target: Target,
    plan: Arc<Plan>,
    ready: mpsc::Sender<Result<(), String>>,
    go: watch::Receiver<Option<Go>>,
    /// Over HTTP: one `/healthz` on the new connection before reporting ready.
    warm_up: bool,
}

/// What a task counted itself, to check the timeline against.
struct TaskEnd {
    requests: u64,
    last: Option<Instant>,
}

impl TaskEnd {
    /// Adds what a helper task of this one counted.
    fn absorb(&mut self, other: TaskEnd) {
        self.requests += other.requests;
        self.last = self.last.max(other.last);
    }
}

impl Task {
    /// Connects (and warms the connection up, if asked), reports ready and waits for the start.
    async fn start(&mut self) -> Option<(Client, Go)> {
        let client = match self.connect().await {
            Ok(c) => c,
            Err(e) => {
                let _ = self.ready.send(Err(e)).await;
                return None;
            }
        };
        let _ = self.ready.send(Ok(())).await;
        let go = self.go.wait_for(|g| g.is_some()).await.ok()?.clone()?;
        Some((client, go))
    }

    /// A client for the target, its connection warmed up if asked.
    async fn connect(&self) -> Result<Client, String> {
        let mut client = self.target.client().await.map_err(|e| format!("{e:#}"))?;
        if self.warm_up {
            match client.healthz().await {
                Answer::Done => {}
                other => return Err(format!("warming a connection up: GET /healthz: {other:?}")),
            }
        }
        Ok(client)
    }
}

/// When each request is due, for the open loop.
struct Pacer {
    interval: Option<Duration>,
    next: Instant,
}

impl Pacer {
    fn new(go: &Go, task: usize) -> Pacer {
        // Tasks start spread over one interval, so the open loop does not begin with a burst.
        let offset = go.pace.map_or(Duration::ZERO, |p| p.mul_f64(task as f64 / go.concurrency as f64));
        Pacer { interval: go.pace, next: go.start + offset }
    }

    /// Waits for the next request's turn and returns the instant its latency counts from,
    /// or `None` once the deadline has passed. A task that is on time sleeps and counts from
    /// when it woke (the timer's lateness is the client's, not the server's); a task that is
    /// behind counts from when the request was due, so waiting for a slow answer is measured
    /// (no coordinated omission).
    async fn next(&mut self, deadline: Instant) -> Option<Instant> {
        let now = Instant::now();
        let Some(interval) = self.interval else {
            return (now < deadline).then_some(now);
        };
        if self.next >= deadline {
            return None;
        }
        let origin = if self.next > now {
            tokio::time::sleep_until(self.next.into()).await;
            Instant::now()
        } else {
            self.next
        };
        self.next += interval;
        Some(origin)
    }
}

async fn claimer(mut task: Task, w: usize) -> TaskEnd {
    let mut end = TaskEnd { requests: 0, last: None };
    let Some((mut client, go)) = task.start().await else { return end };
    let plan = task.plan.clone();
    let recorder = go.recorder.clone();
    let mut pacer = Pacer::new(&go, w);
    let mut rng = SmallRng::seed_from_u64(rand::random::<u64>() ^ w as u64);
    // Request ids and user names are formatted into reused strings.
    let mut user = String::with_capacity(48);
    let mut last_paid = String::with_capacity(48);
    let mut seq: u64 = 0;
    while let Some(origin) = pacer.next(go.deadline).await {
        let (op, answer) = match &*plan {
            Plan::Ceiling => (Op::Health, client.healthz().await),
            Plan::Storm { packet, prefix, .. } => {
                seq += 1;
                claimer_name(&mut user, prefix, w, seq);
                let answer = client.claim(*packet, &user).await;
                match answer {
                    Answer::Paid(_) => plan.storm_paid(go.start),
                    Answer::Away => plan.storm_emptied(go.start),
                    _ => {}
                }
                (Op::Claim, answer)
            }
            Plan::Festival { slots, zipf, history_per_mille, asks, prefix, .. } => {
                let Some((slot, packet)) = pick(slots, zipf, &mut rng) else {
                    // Every slot drawn is waiting for its re-send: let the refillers run.
                    tokio::task::yield_now().await;
                    continue;
                };
                seq += 1;
                claimer_name(&mut user, prefix, w, seq);
                let answer = client.claim(packet, &user).await;
                match &answer {
                    Answer::Paid(_) => std::mem::swap(&mut user, &mut last_paid),
                    Answer::Away => plan.festival_emptied(slot, packet),
                    _ => {}
                }
                // A claim owes a history query with the chance `history_per_mille` says, drawn
                // (a count per task would make every task owe its first one at the same
                // moment), asked on the askers' connections: half a recent claimer's received
                // page, half a sender's sent.
                if *history_per_mille > 0 && rng.random_range(0..1000) < *history_per_mille {
                    let received = !last_paid.is_empty() && rng.random_bool(0.5);
                    let _ = asks.send((Instant::now(), received.then(|| last_paid.clone())));
                }
                (Op::Claim, answer)
            }
        };
        let now = Instant::now();
        recorder.record(op, answer.outcome(), now.saturating_duration_since(origin), answer.paid_fen(), now);
        recorder.record_server(op, client.server_time(), now);
        if let Answer::Error(e) = &answer {
            recorder.error_sample(e);
        }
        end.requests += 1;
        end.last = Some(now);
    }
    end
}

/// `--batch`: each call claims `batch` shares at once (`Engine::claim_many`), and every claim
/// is recorded with its call's latency. Festival history queries keep their share of requests
/// (`history_per_mille` for every thousand claims) but run in a task beside the claimer, one
/// run at a time, so a query waiting for the store never holds back a thousand claims.
async fn batch_claimer(mut task: Task, w: usize, batch: usize) -> TaskEnd {
    let mut end = TaskEnd { requests: 0, last: None };
    let Some((mut client, go)) = task.start().await else { return end };
    let plan = task.plan.clone();
    let recorder = go.recorder.clone();
    let mut rng = SmallRng::seed_from_u64(rand::random::<u64>() ^ w as u64);
    let mut user = String::with_capacity(48);
    // The seq of the last claimer paid: their name is written again only when a query asks
    // for it, not kept (a reference-counted clone a claim, on the engine's users).
    let mut last_paid: Option<u64> = None;
    let mut history_due = 0u64;
    let mut history: Option<tokio::task::JoinHandle<TaskEnd>> = None;
    let mut seq: u64 = 0;
    // The slot, packet and claimer seq each claim of the call was drawn with.
    let mut drawn: Vec<(usize, u64, u64)> = Vec::with_capacity(batch);
    while Instant::now() < go.deadline {
        let mut claims = Vec::with_capacity(batch);
        drawn.clear();
        for _ in 0..batch {
            let (slot, packet, prefix) = match &*plan {
                Plan::Storm { packet, prefix, .. } => (0, *packet, prefix),
                Plan::Festival { slots, zipf, prefix, .. } => match pick(slots, zipf, &mut rng) {
                    Some((slot, packet)) => (slot, packet, prefix),
                    None => continue,
                },
                Plan::Ceiling => unreachable!("ceiling has no claims"),
            };
            seq += 1;
            claimer_name(&mut user, prefix, w, seq);
            let (Ok(id), Ok(u)) = (PacketId::from_raw(packet), UserId::parse(&user)) else {
                recorder.error_sample(&format!("bad packet {packet} or user {user}"));
                continue;
            };
            claims.push((id, u));
            drawn.push((slot, packet, seq));
        }
        if claims.is_empty() {
            // Every slot drawn is waiting for its re-send: let the refillers run.
            tokio::task::yield_now().await;
            continue;
        }
        let origin = Instant::now();
        let answers = client.claim_many(claims).await;
        let now = Instant::now();
        recorder.record_many(Op::Claim, &answers, now.saturating_duration_since(origin), now);
        for (answer, &(slot, packet, seq)) in answers.iter().zip(&drawn) {
            match (answer, &*plan) {
                (Answer::Paid(_), Plan::Storm { .. }) => plan.storm_paid(go.start),
                (Answer::Away, Plan::Storm { .. }) => plan.storm_emptied(go.start),
                (Answer::Paid(_), Plan::Festival { .. }) => last_paid = Some(seq),
                (Answer::Away, Plan::Festival { .. }) => plan.festival_emptied(slot, packet),
                (Answer::Error(e), _) => recorder.error_sample(e),
                _ => {}
            }
        }
        end.requests += answers.len() as u64;
        end.last = Some(now);
        let Plan::Festival { history_per_mille, senders, prefix, .. } = &*plan else { continue };
        history_due += answers.len() as u64 * u64::from(*history_per_mille);
        // Queries come due while the last run is still going: they wait for the next call.
        if history_due < 1000 || history.as_ref().is_some_and(|h| !h.is_finished()) {
            continue;
        }
        if let Some(h) = history.take() {
            end.absorb(h.await.unwrap_or(TaskEnd { requests: 0, last: None }));
        }
        let asks: Vec<(String, bool)> = (0..history_due / 1000)
            .map(|_| match last_paid {
                Some(paid) if rng.random_bool(0.5) => {
                    claimer_name(&mut user, prefix, w, paid);
                    (user.clone(), false)
                }
                _ => (senders[rng.random_range(0..senders.len())].clone(), true),
            })
            .collect();
        history_due %= 1000;
        let Ok(mut asker) = task.target.client().await else { continue };
        let recorder = recorder.clone();
        let deadline = go.deadline;
        history = Some(tokio::spawn(async move {
            let mut end = TaskEnd { requests: 0, last: None };
            for (who, sent) in asks {
                let origin = Instant::now();
                if origin >= deadline {
                    break;
                }
                let answer = asker.history(&who, sent).await;
                let now = Instant::now();
                recorder.record(Op::History, answer.outcome(), now.saturating_duration_since(origin), 0, now);
                end.requests += 1;
                end.last = Some(now);
            }
            end
        }));
    }
    if let Some(h) = history {
        end.absorb(h.await.unwrap_or(TaskEnd { requests: 0, last: None }));
    }
    end
}

/// Writes the name of task `w`'s claimer number `seq` into `user`: `{prefix}{w}x{seq}`, a new
/// user each claim. Written with `itoa`, not `write!`: in the memory-only festival `core::fmt`
/// was 4 % of the process's time, a claim at a time.
fn claimer_name(user: &mut String, prefix: &str, w: usize, seq: u64) {
    user.clear();
    user.push_str(prefix);
    user.push_str(itoa::Buffer::new().format(w));
    user.push('x');
    user.push_str(itoa::Buffer::new().format(seq));
}

fn pick(slots: &[Slot], zipf: &Zipf, rng: &mut SmallRng) -> Option<(usize, u64)> {
    (0..PICK_TRIES).find_map(|_| {
        let k = zipf.sample(rng);
        let id = slots[k].live();
        (id != 0).then_some((k, id))
    })
}

/// Festival: asks the history queries the claimers owe, on a connection of its own, one at a
/// time, until the deadline; a query's latency counts from when it was owed, so askers that
/// fall behind show in it. Queries still owed at the deadline are not asked.
async fn asker(mut task: Task) -> TaskEnd {
    let mut end = TaskEnd { requests: 0, last: None };
    let Some((mut client, go)) = task.start().await else { return end };
    let plan = task.plan.clone();
    let Plan::Festival { asks_rx, senders, .. } = &*plan else { return end };
    let recorder = go.recorder.clone();
    let mut rng = SmallRng::seed_from_u64(rand::random::<u64>());
    loop {
        let Some((origin, received)) = next_before(asks_rx, go.deadline).await else { break };
        if Instant::now() >= go.deadline {
            break;
        }
        let answer = match &received {
            Some(user) => client.history(user, false).await,
            None => client.history(&senders[rng.random_range(0..senders.len())], true).await,
        };
        let now = Instant::now();
        recorder.record(Op::History, answer.outcome(), now.saturating_duration_since(origin), 0, now);
        recorder.record_server(Op::History, client.server_time(), now);
        if let Answer::Error(e) = &answer {
            recorder.error_sample(e);
        }
        end.requests += 1;
        end.last = Some(now);
    }
    end
}

/// The next item of a queue that several tasks take from, or `None` at the deadline.
async fn next_before<T>(rx: &tokio::sync::Mutex<mpsc::UnboundedReceiver<T>>, deadline: Instant) -> Option<T> {
    let mut rx = rx.lock().await;
    tokio::select! {
        item = rx.recv() => item,
        _ = tokio::time::sleep_until(deadline.into()) => None,
    }
}

/// Festival: sends each slot whose packet emptied a new packet (its spare, or its live one
/// when the spare was already taken).
async fn refiller(mut task: Task, r: usize) -> TaskEnd {
    let mut end = TaskEnd { requests: 0, last: None };
    let Some((mut client, go)) = task.start().await else { return end };
    let plan = task.plan.clone();
    let Plan::Festival { slots, refill, refill_rx, sends, senders, total_fen, shares, nonce, .. } = &*plan
    else {
        return end;
    };
    let recorder = go.recorder.clone();
    let mut request_id = String::with_capacity(48);
    loop {
        let Some(slot) = next_before(refill_rx, go.deadline).await else { break };
        let origin = Instant::now();
        if origin >= go.deadline {
            break;
        }
        let n = sends.fetch_add(1, Ordering::Relaxed);
        let sender = &senders[n as usize % senders.len()];
        request_id.clear();
        let _ = write!(request_id, "{nonce}-r{r}-{n}");
        let (answer, id) = client.send(sender, *total_fen, *shares, PACKET_EXPIRES_IN_S, &request_id).await;
        let now = Instant::now();
        recorder.record(Op::Send, answer.outcome(), now.saturating_duration_since(origin), 0, now);
        recorder.record_server(Op::Send, client.server_time(), now);
        end.requests += 1;
        end.last = Some(now);
        match id {
            Some(id) => slots[slot].resent(id),
            None => {
                if let Answer::Error(e) = &answer {
                    recorder.error_sample(e);
                }
                // Try again later: the slot stays empty meanwhile.
                tokio::time::sleep(SETUP_RETRY_PAUSE).await;
                let _ = refill.send(slot);
            }
        }
    }
    end
}

async fn progress(
    recorder: Arc<Recorder>,
    deadline: Instant,
    quiet: bool,
    label: String,
    main: Op,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    if quiet {
        let _ = stop.await;
        return;
    }
    let length_ms = deadline.saturating_duration_since(recorder.start).as_millis() as u64;
    let pb = ProgressBar::new(length_ms);
    pb.set_style(
        ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {elapsed:>4} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(label.clone());
    let mut every = tokio::time::interval(PROGRESS_EVERY);
    let mut last_line = Instant::now();
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = &mut stop => break,
        }
        let (total, last) = recorder.counts();
        let ok = total.count(main, record::Outcome::Ok);
        let away = total.count(main, record::Outcome::Away);
        let refused = total.count(main, record::Outcome::Overloaded);
        // The main kind's errors; the other kinds (a festival's sends and history queries)
        // are counted apart, with their errors. Counted together, as "other/errors", a
        // festival without a single error read as tens of thousands of them.
        let errors = total.count(main, record::Outcome::Error);
        let others = total.requests() - total.op_total(main);
        let others_failed: u64 = record::ALL_OPS
            .into_iter()
            .filter(|&op| op != main)
            .map(|op| total.count(op, record::Outcome::Error))
            .sum();
        let rate =
            last.map_or(0, |s| s.count(main, record::Outcome::Ok) + s.count(main, record::Outcome::Away));
        let msg = format!(
            "ok {} away {} refused {} errors {} | other requests {} (errors {}) | {}/s",
            report::thousands(ok as f64),
            report::thousands(away as f64),
            report::thousands(refused as f64),
            report::thousands(errors as f64),
            report::thousands(others as f64),
            report::thousands(others_failed as f64),
            report::thousands(rate as f64)
        );
        pb.set_position(recorder.start.elapsed().as_millis().min(u128::from(length_ms)) as u64);
        if pb.is_hidden() && last_line.elapsed() >= PROGRESS_LINE_EVERY {
            eprintln!("{label} {:>3} s: {msg}", recorder.start.elapsed().as_secs());
            last_line = Instant::now();
        }
        pb.set_message(msg);
    }
    pb.finish_and_clear();
}

pub(crate) fn setup_bar(quiet: bool, len: u64, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// Deposits `amount_fen` into each sender's wallet.
pub(crate) async fn fund(
    target: &Target,
    senders: &[String],
    amount_fen: i64,
    nonce: &str,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let senders: Arc<[String]> = senders.into();
    let mut tasks = Vec::new();
    for _ in 0..SETUP_CONCURRENCY.min(senders.len()) {
        let (target, next, senders, nonce) =
            (target.clone(), next.clone(), senders.clone(), nonce.to_string());
        tasks.push(tokio::spawn(async move {
            let mut client = target.client().await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(sender) = senders.get(i) else { return Ok::<(), anyhow::Error>(()) };
                let request_id = format!("{nonce}-d{i}");
                loop {
                    match client.deposit(sender, amount_fen, &request_id).await {
                        Answer::Done | Answer::Paid(_) => break,
                        Answer::Overloaded => tokio::time::sleep(SETUP_RETRY_PAUSE).await,
                        Answer::Away => bail!("deposit for {sender} was turned away"),
                        Answer::Error(e) => bail!("deposit for {sender}: {e}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| anyhow!("a setup task panicked: {e}"))??;
    }
    Ok(())
}

/// Sends `count` lucky packets for anyone, round-robin over the senders; returns their ids in
/// order.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn create_packets(
    target: &Target,
    senders: &[String],
    count: usize,
    shares: u32,
    total_fen: i64,
    nonce: &str,
    concurrency: usize,
    progress: Option<&ProgressBar>,
) -> anyhow::Result<Vec<u64>> {
    let ids: Arc<Vec<AtomicU64>> = Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let senders: Arc<[String]> = senders.into();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.clamp(1, count.max(1)) {
        let (target, ids, next, senders) = (target.clone(), ids.clone(), next.clone(), senders.clone());
        let (nonce, pb) = (nonce.to_string(), progress.cloned());
        tasks.push(tokio::spawn(async move {
            let mut client = target.client().await?;
            let mut request_id = String::with_capacity(48);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ids.len() {
                    return Ok::<(), anyhow::Error>(());
                }
                let sender = &senders[i % senders.len()];
                request_id.clear();
                let _ = write!(request_id, "{nonce}-p{i}");
                loop {
                    match client.send(sender, total_fen, shares, PACKET_EXPIRES_IN_S, &request_id).await {
                        (_, Some(id)) => {
                            ids[i].store(id, Ordering::Relaxed);
                            break;
                        }
                        (Answer::Overloaded, None) => tokio::time::sleep(SETUP_RETRY_PAUSE).await,
                        (Answer::Error(e), None) => bail!("send by {sender}: {e}"),
                        (other, None) => bail!("send by {sender}: {other:?}"),
                    }
                }
                if let Some(pb) = &pb {
                    pb.inc(1);
                }
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| anyhow!("a setup task panicked: {e}"))??;
    }
    Ok(ids.iter().map(|id| id.load(Ordering::Relaxed)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimer_name_is_the_prefix_the_task_and_the_claim_and_a_valid_user() {
        let mut user = String::from("left over");
        for (w, seq) in [(0, 1), (7, 42), (4095, u64::MAX)] {
            claimer_name(&mut user, "fa1b2c3u", w, seq);
            assert_eq!(user, format!("fa1b2c3u{w}x{seq}"));
            assert!(UserId::parse(&user).is_ok(), "{user}");
        }
    }

    #[test]
    fn an_emptied_packet_gives_way_to_its_spare_and_re_sends_fill_what_is_owed() {
        let slot = Slot::new(1, 2);
        assert!(slot.emptied(1), "the first to see packet 1 empty owes a re-send");
        assert!(!slot.emptied(1), "a second report of the same packet owes none");
        assert_eq!(slot.live(), 2, "the spare is live at once");

        // The spare empties before the first re-send is back: the slot is empty meanwhile.
        assert!(slot.emptied(2));
        assert_eq!(slot.live(), 0);
        slot.resent(3);
        assert_eq!(slot.live(), 3, "a re-send fills the live place first");
        slot.resent(4);
        assert_eq!(slot.live(), 3, "then the spare's");
        assert!(slot.emptied(3));
        assert_eq!(slot.live(), 4);
        // A report about a packet the slot no longer holds changes nothing.
        assert!(!slot.emptied(2));
        assert_eq!(slot.live(), 4);
    }
}

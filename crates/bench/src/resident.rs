//! The `resident` scenario: N active packets in one engine in this process, the memory they
//! hold, and how long a restart on the same data dir takes before it is ready.
//!
//! The restart runs in a fresh process (this program again, told by an environment variable
//! to start the engine on the data dir, measure and exit), so its time and memory are those of
//! a real restart and not of a process whose allocator still holds the first engine's pages.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use hongbao_core::SystemClock;
use hongbao_engine::{Engine, EngineConfig};

use crate::client::Target;
use crate::load::{self, SHARE_AVERAGE_FEN};
use crate::machine::{rss_kib, Machine};
use crate::report::{self, BenchResult, ResidentFigures, RunConfig};
use crate::BenchArgs;

/// Set in the restart child's environment to the data dir it must start on.
pub const RESTART_CHILD_ENV: &str = "HONGBAO_BENCH_RESTART_DIR";
/// Senders of the resident packets: enough that no wallet is hot, few enough to fund quickly.
const RESIDENT_SENDERS: usize = 1_000;

pub fn run(args: &BenchArgs) -> anyhow::Result<BenchResult> {
    if args.store_off {
        bail!("resident measures a restart from the store: it cannot run with --store-off");
    }
    let packets = args.packets.unwrap_or(1_000_000).max(1);
    let shares = args.shares.unwrap_or(10).max(1);
    let total_fen = i64::from(shares) * SHARE_AVERAGE_FEN;
    let threads = args.threads.unwrap_or(1).max(1);
    let started_at_unix_s =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut notes = vec![
        "resident runs in process whatever the mode: it reads this process's memory (VmRSS)".to_string(),
        "durable: SQLite per set behind its journal, one fdatasync'd record per batch, replies after it"
            .to_string(),
    ];
    let nonce = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("hongbao-bench")
        .enable_all()
        .build()
        .context("cannot start the runtime")?;

    let (rss_kib_before, _) = rss_kib();
    let (engine, tempdir) = load::start_engine(args)?;
    let dir = match (&args.data, &tempdir) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => unreachable!("start_engine makes a temp dir when no data dir is given"),
    };
    let target = Target::Engine(engine.clone());
    let senders: Vec<String> =
        (0..RESIDENT_SENDERS.min(packets as usize)).map(|i| format!("r{nonce}s{i}")).collect();
    let per_sender = (packets as usize).div_ceil(senders.len()) as i64;
    let t0 = Instant::now();
    let audit = rt.block_on(async {
        load::fund(&target, &senders, per_sender * total_fen, &nonce).await?;
        let pb = load::setup_bar(args.quiet, u64::from(packets), "creating packets");
        load::create_packets(
            &target,
            &senders,
            packets as usize,
            shares,
            total_fen,
            &nonce,
            args.concurrency(),
            Some(&pb),
        )
        .await?;
        pb.finish_and_clear();
        let audit = engine.audit().await.map_err(|e| anyhow!("audit: {e}"))?;
        Ok::<_, anyhow::Error>(audit)
    })?;
    let create_s = t0.elapsed().as_secs_f64();
    let (rss_kib_after_create, rss_kib_peak) = rss_kib();
    // After the memory was read: the closed packets' claims the engine caches are not the
    // active packets' memory.
    let mut stored_claims = 0;
    if args.stored_claims > 0 {
        let t = Instant::now();
        let paid = rt.block_on(store_claims(&target, args, &nonce))?;
        stored_claims = paid;
        notes.push(format!(
            "{paid} claims stored before the restart, on {} packets of {STORED_SHARES} shares claimed to the last share, in {:.1} s",
            args.stored_claims.div_ceil(u64::from(STORED_SHARES)),
            t.elapsed().as_secs_f64()
        ));
    }
    let t = Instant::now();
    rt.block_on(engine.shutdown());
    notes.push(format!(
        "shutdown took {:.1} s (it folds what the journal holds into SQLite first)",
        t.elapsed().as_secs_f64()
    ));
    drop(target);
    drop(engine);

    let expected_escrow_fen = i64::from(packets) * total_fen;
    if audit.escrow_fen != expected_escrow_fen {
        notes
            .push(format!("escrow after create is {} fen, expected {expected_escrow_fen}", audit.escrow_fen));
    }
    let restart = restart_in_child(&dir);
    let (restart_ready_s, restart_rss_kib, restart_escrow_matches) = match &restart {
        Ok(v) => (
            v.get("ready_s").and_then(|x| x.as_f64()),
            v.get("rss_kib").and_then(|x| x.as_u64()),
            v.get("escrow_fen").and_then(|x| x.as_i64()).map(|e| e == expected_escrow_fen),
        ),
        Err(e) => {
            notes.push(format!("restart could not be measured: {e:#}"));
            (None, None, None)
        }
    };
    if let Ok(v) = &restart {
        if v.get("audit_ok").and_then(|x| x.as_bool()) != Some(true) {
            notes.push(format!("the restarted engine's audit was not ok: {v}"));
        }
    }
    drop(tempdir);

    let audit_json = serde_json::json!({
        "ok": audit.ok, "deposits": audit.deposits_fen, "withdrawals": audit.withdrawals_fen,
        "balances": audit.balances_fen, "escrow": audit.escrow_fen, "in_flight": audit.in_flight_fen,
        "problems": audit.problems,
    });
    Ok(BenchResult {
        scenario: "resident".to_string(),
        mode: "in_process".to_string(),
        store: "sqlite".to_string(),
        url: None,
        started_at_unix_s,
        config: RunConfig {
            duration_s: 0,
            concurrency: args.concurrency(),
            batch: args.batch,
            threads,
            sets: args.sets,
            shares,
            packets,
            rate_per_s: None,
            zipf_s: 0.0,
            history_per_mille: 0,
            warmed_up: false,
        },
        elapsed_s: (create_s * 1000.0).round() / 1000.0,
        requests: u64::from(packets),
        requests_per_s: report::rate(u64::from(packets), create_s),
        claims: None,
        ops: Default::default(),
        storm: None,
        resident: Some(ResidentFigures {
            packets,
            shares_per_packet: shares,
            senders: senders.len() as u32,
            create_s: (create_s * 1000.0).round() / 1000.0,
            packets_per_s: report::rate(u64::from(packets), create_s),
            rss_kib_before,
            rss_kib_after_create,
            rss_kib_peak,
            stored_claims,
            restart_ready_s,
            restart_rss_kib,
            restart_escrow_matches,
        }),
        cpu: None,
        server_cpu_us_per_request: None,
        server_cpu_us_per_request_during_load: None,
        timeline: Vec::new(),
        audit_ok: Some(audit.ok),
        audit: Some(audit_json),
        errors_sample: Vec::new(),
        notes,
        machine: Machine::here(),
    })
}

/// Shares of each packet `--stored-claims` claims.
const STORED_SHARES: u32 = 1_000;
/// `claim_many` calls in flight while storing claims, and claims per call.
const STORED_CALLS: usize = 16;

/// Sends packets of [`STORED_SHARES`] and claims every share with `claim_many`, until
/// `--stored-claims` claims are paid; returns how many were.
async fn store_claims(target: &Target, args: &BenchArgs, nonce: &str) -> anyhow::Result<u64> {
    let Target::Engine(engine) = target else { bail!("stored claims are made in process") };
    let packets = args.stored_claims.div_ceil(u64::from(STORED_SHARES)) as usize;
    let total_fen = i64::from(STORED_SHARES) * SHARE_AVERAGE_FEN;
    let senders: Vec<String> = (0..RESIDENT_SENDERS.min(packets)).map(|i| format!("r{nonce}c{i}")).collect();
    let per_sender = packets.div_ceil(senders.len()) as i64;
    let setup = format!("{nonce}c");
    load::fund(target, &senders, per_sender * total_fen, &setup).await?;
    let pb = load::setup_bar(args.quiet, packets as u64, "sending packets to claim");
    let ids =
        load::create_packets(target, &senders, packets, STORED_SHARES, total_fen, &setup, 32, Some(&pb))
            .await?;
    pb.finish_and_clear();
    let pb = load::setup_bar(args.quiet, args.stored_claims, "storing claims");
    let mut calls = tokio::task::JoinSet::new();
    let mut paid = 0u64;
    for (p, id) in ids.into_iter().enumerate() {
        let id = hongbao_core::PacketId::from_raw(id).map_err(|e| anyhow!("packet id: {e}"))?;
        let claims = (0..STORED_SHARES)
            .map(|k| hongbao_core::UserId::parse(&format!("r{nonce}p{p}x{k}")).map(|u| (id, u)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!("user id: {e}"))?;
        let engine = engine.clone();
        calls.spawn(async move { engine.claim_many(claims).await });
        if calls.len() >= STORED_CALLS {
            paid += count_paid(calls.join_next().await, &pb)?;
        }
    }
    while !calls.is_empty() {
        paid += count_paid(calls.join_next().await, &pb)?;
    }
    pb.finish_and_clear();
    Ok(paid)
}

type ClaimsAnswer = Vec<Result<hongbao_engine::ClaimReply, hongbao_engine::EngineError>>;

/// Counts one `claim_many` call's paid claims; every claim of a fresh packet must be paid.
fn count_paid(
    joined: Option<Result<ClaimsAnswer, tokio::task::JoinError>>,
    pb: &indicatif::ProgressBar,
) -> anyhow::Result<u64> {
    let answers = joined.ok_or_else(|| anyhow!("no call to wait for"))?.context("a claim call panicked")?;
    for a in &answers {
        if let Err(e) = a {
            bail!("a stored claim was refused: {e}");
        }
    }
    pb.inc(answers.len() as u64);
    Ok(answers.len() as u64)
}

/// Runs this program again with the same arguments and [`RESTART_CHILD_ENV`] set; reads the
/// JSON line it prints last.
fn restart_in_child(dir: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let exe = std::env::current_exe().context("cannot find this program to restart it")?;
    let out = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(RESTART_CHILD_ENV, dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run the restart child")?;
    if !out.status.success() {
        bail!("the restart child failed: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line =
        text.lines().rev().find(|l| l.starts_with('{')).ok_or_else(|| anyhow!("no answer from the child"))?;
    serde_json::from_str(line).context("the restart child's answer is not JSON")
}

/// The child's side: start the engine on `dir`, time it, measure memory, audit, print one JSON
/// line, stop.
pub fn restart_child(args: &BenchArgs, dir: PathBuf) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut config = EngineConfig::new(dir);
    config.sets = args.sets;
    let engine = Engine::start(config, Arc::new(SystemClock)).map_err(|e| anyhow!("restart: {e}"))?;
    let ready_s = t0.elapsed().as_secs_f64();
    let (rss, peak) = rss_kib();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let audit = rt.block_on(engine.audit()).map_err(|e| anyhow!("audit after restart: {e}"))?;
    rt.block_on(engine.shutdown());
    println!(
        "{}",
        serde_json::json!({
            "ready_s": (ready_s * 1000.0).round() / 1000.0,
            "rss_kib": rss,
            "peak_rss_kib": peak,
            "escrow_fen": audit.escrow_fen,
            "audit_ok": audit.ok,
        })
    );
    Ok(())
}

//! What only PostgreSQL does, through the real binary: `hongbao archive --before DATE` moves
//! old days of claims and entries to CSV files and history says so; `--replica` serves queries
//! from a streaming standby. Each test starts its own throwaway cluster, whatever
//! `HONGBAO_TEST_STORE` says, and fails loudly if it cannot.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hongbao_core::{Amount, Audience, Kind, Limits, ManualClock, RequestId, SendRequest, UserId};
use hongbao_engine::{Engine, EngineConfig};
use hongbao_testkit::PgCluster;
use serde_json::Value;
use support::*;

const DAY_MS: i64 = 86_400_000;
const SETS: u32 = 2;

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn today() -> i64 {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    now_ms.div_euclid(DAY_MS)
}

/// `YYYY-MM-DD` of a day counted from 1970-01-01.
fn date(day: i64) -> String {
    chrono::DateTime::from_timestamp_millis(day * DAY_MS).unwrap().format("%Y-%m-%d").to_string()
}

/// RFC 3339 as the API writes it.
fn stamp(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Runs `hongbao archive` with `args` and a clean environment; returns its stdout.
fn archive(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hongbao"))
        .arg("archive")
        .args(args)
        .env_remove("HONGBAO_STORE")
        .env_remove("HONGBAO_SETS")
        .env_remove("HONGBAO_CONFIG")
        .env_remove("HONGBAO_ARCHIVE_OUT")
        .output()
        .expect("cannot run hongbao archive");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "hongbao archive {args:?} failed: {}\n{stdout}\n{stderr}", out.status);
    stdout.into_owned()
}

/// Data lines of every CSV file under `dir` whose name starts with `table`.
fn csv_lines(dir: &std::path::Path, table: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for set_dir in std::fs::read_dir(dir).unwrap() {
        for f in std::fs::read_dir(set_dir.unwrap().path()).unwrap() {
            let path = f.unwrap().path();
            if path.file_name().unwrap().to_string_lossy().starts_with(table) {
                let text = std::fs::read_to_string(&path).unwrap();
                lines.extend(text.lines().skip(1).map(str::to_owned));
            }
        }
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_days_leave_for_files_and_history_says_so() {
    // Arrange: ten days ago (an engine on a clock set back), alice sent bob and carol an equal
    // packet of 2 shares, and both claimed: a closed packet whose day may leave the database.
    let pg = PgCluster::start();
    let url = pg.url();
    let old_day = today() - 10;
    let old_noon_ms = old_day * DAY_MS + 12 * 3_600_000;
    let scratch = tempfile::tempdir().unwrap();
    let packet = {
        let mut config = EngineConfig::new(scratch.path().to_path_buf());
        config.sets = SETS;
        config.store_url = Some(url.clone());
        let clock = ManualClock::new(old_noon_ms);
        let engine = tokio::task::spawn_blocking(move || Engine::start(config, Arc::new(clock)))
            .await
            .unwrap()
            .expect("engine on PostgreSQL");
        // The sets make partitions around today only; an old day gets its own here, as a
        // backfill would, so its rows do not land in the DEFAULT partition.
        let (u, d) = (url.clone(), old_day);
        tokio::task::spawn_blocking(move || hongbao_store::make_postgres_day_partitions(&u, SETS, d..=d))
            .await
            .unwrap()
            .expect("old day partitions");
        engine
            .deposit(user("alice"), Amount::new(1_000).unwrap(), RequestId::parse("d1").unwrap())
            .await
            .unwrap();
        let send = Limits::default()
            .validate_send(SendRequest {
                sender: user("alice"),
                kind: Kind::Equal,
                total_fen: 600,
                count: 2,
                audience: Audience::users([user("bob"), user("carol")]),
                greeting: None,
                expires_in_s: None,
                request_id: RequestId::parse("s1").unwrap(),
            })
            .unwrap();
        let id = engine.send(send).await.unwrap().id;
        for who in ["bob", "carol"] {
            assert_eq!(engine.claim(id, user(who)).await.unwrap().amount_fen, 300);
        }
        let started = Instant::now();
        while engine.audit().await.unwrap().in_flight_fen != 0 {
            assert!(started.elapsed() < Duration::from_secs(30), "credits between sets never arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        engine.shutdown().await;
        id.to_string()
    };

    // Act: archive every day before the day before yesterday.
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().to_str().unwrap();
    let report = archive(&["--before", &date(today() - 2), "--store", &url, "--sets", "2", "--out", out]);

    // Assert: the old day's claims and entries are in files, and gone from the database.
    let old = date(old_day);
    assert!(report.contains(&format!("claims {old}")), "claims of {old} archived: {report}");
    assert!(report.contains(&format!("entries {old}")), "entries of {old} archived: {report}");
    let claims = csv_lines(out_dir.path(), "claims");
    assert_eq!(claims.len(), 2, "both claims are in the files: {claims:?}");
    assert!(claims.iter().any(|l| l.contains("bob")) && claims.iter().any(|l| l.contains("carol")));
    // alice: deposit and send; bob and carol: a claim each.
    assert_eq!(csv_lines(out_dir.path(), "entries").len(), 4);
    for set in 0..SETS {
        let live = pg.psql(&format!(
            "SELECT (SELECT count(*) FROM hongbao_set_{set}.claims) + (SELECT count(*) FROM hongbao_set_{set}.entries)"
        ));
        assert_eq!(live, "0", "set {set} still holds archived rows");
    }
    // A second run finds nothing more to do.
    let again = archive(&["--before", &date(today() - 2), "--store", &url, "--sets", "2", "--out", out]);
    assert!(again.contains("archive: 0 days"), "{again}");

    // The service answers for archived days, and says they are archived.
    let server = TestServer::start_on_postgres(Opts::sets(SETS), pg).await;
    let archived_before = stamp((old_day + 1) * DAY_MS);
    let details = server.packet_full(&packet).await;
    assert_eq!(details["status"], "exhausted", "{details}");
    assert_eq!(details["remaining_amount"], 0, "{details}");
    assert_eq!(details["archived_before"], archived_before.as_str(), "{details}");
    assert_eq!(details["claims"].as_array().map(Vec::len), Some(0), "claims moved to the archive: {details}");
    let (status, received) = server.received("bob", "").await;
    assert_eq!(status, 200, "{received}");
    assert_eq!(received["archived_before"], archived_before.as_str(), "{received}");
    assert_eq!(received["count"], 0, "history holds what is live only: {received}");
    // Balances are not history: they stay, and the books still balance.
    assert_eq!(server.balance("bob").await, 300);
    assert_eq!(server.balance("alice").await, 400);
    let audit = server.settle().await;
    assert_eq!(money(&audit), [1_000, 0, 1_000, 0, 0], "{audit}");

    // Today's history is live as ever.
    let id = server.send_ok("alice", "equal", 200, 1, users(&["bob"])).await;
    assert_eq!(server.claim_ok(&id, "bob").await, 200);
    let started = Instant::now();
    loop {
        let (_, received) = server.received("bob", "").await;
        if received["count"] == 1 {
            assert_eq!(received["items"][0]["packet_id"], id.as_str(), "{received}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "today's claim never showed: {received}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fresh = server.packet_full(&id).await;
    assert_eq!(fresh["archived_before"], Value::Null, "a packet of today is whole: {fresh}");
}

/// Read connections the sets hold on a server.
fn readers_on(pg: &PgCluster) -> i64 {
    pg.psql_in(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'hongbao-set-%-reader'",
    )
    .parse()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_replica_queries_read_from_the_standby() {
    // Arrange: a primary and a synchronous standby; the server writes to one, reads the other.
    let (primary, standbys) = PgCluster::start_primary_with_standbys(1);
    let opts = Opts { args: vec!["--replica".into(), standbys[0].url()], ..Opts::sets(SETS) };
    let server = TestServer::start_on_postgres(opts, primary).await;

    // Act: money moves through the primary.
    server.deposit_ok("alice", 1_000).await;
    let id = server.send_ok("alice", "lucky", 500, 2, users(&["bob", "carol"])).await;
    let bob = server.claim_ok(&id, "bob").await;

    // Assert: queries show it once the standby replayed it (milliseconds), and every read
    // connection is on the standby, none on the primary.
    let started = Instant::now();
    loop {
        let details = server.packet_full(&id).await;
        if details["remaining_count"] == 1 && server.balance("bob").await == bob {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the standby never showed the claim: {details}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(readers_on(&standbys[0]) >= 1, "queries read from the standby");
    assert_eq!(readers_on(server.pg().unwrap()), 0, "no query reads from the primary");
    let audit = server.settle().await;
    assert_eq!(money(&audit), [1_000, 0, 1_000 - (500 - bob), 500 - bob, 0], "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_and_replica_refuse_sqlite_with_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_hongbao"))
        .args(["archive", "--before", "2026-01-01", "--store", "sqlite"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("archive needs a postgres:// store"));
    let out = Command::new(env!("CARGO_BIN_EXE_hongbao"))
        .args(["archive", "--before", "last tuesday", "--store", "postgres://nobody@127.0.0.1:1/x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--before must be a date"));
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hongbao"))
        .args(["serve", "--listen", "127.0.0.1:0", "--replica", "postgres://nobody@127.0.0.1:1/x", "--data"])
        .arg(data.path())
        .env_remove("HONGBAO_STORE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("replica needs a postgres:// store"));
}

//! Failover on PostgreSQL, the seeds' N = 3, W = 2, R = 1: a primary and two standbys with
//! `synchronous_standby_names = 'ANY 1 (s1, s2)'`, the sets writing to the primary and their
//! queries reading from standby s1. Under a claim storm the primary is killed with `kill -9`;
//! queries keep answering from the standby; the engine shuts down although its store is gone;
//! the standby that received the most WAL is promoted and a new engine starts on it. Every
//! claim that was acknowledged is there with the same amount, nobody holds two shares of a
//! packet, and the audit balances.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hongbao_core::{Amount, Audience, Kind, PacketId, RequestId, SendRequest, SystemClock, UserId};
use hongbao_engine::{Engine, EngineConfig, EngineError};
use hongbao_testkit::PgCluster;

const SETS: u32 = 2;
const PACKETS: usize = 8;
const SHARES: i64 = 5_000;
const TASKS: usize = 24;
/// Claims acknowledged before the primary is killed.
const ACKED_BEFORE_KILL: usize = 4_000;
/// How long the storm goes on against the dead primary before it is stopped.
const STORM_AFTER_KILL: Duration = Duration::from_millis(500);
/// Longer than this, shutdown hangs.
const SHUTDOWN_WAIT_MAX: Duration = Duration::from_secs(30);

fn start(url: &str, replica: Option<&str>) -> Engine {
    let mut config = EngineConfig::new(std::env::temp_dir());
    config.sets = SETS;
    config.store_url = Some(url.to_string());
    config.replica_url = replica.map(str::to_string);
    Engine::start(config, Arc::new(SystemClock)).expect("engine starts on PostgreSQL")
}

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
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

/// Every claim of a packet, paged through the engine's queries: user → amount.
async fn claims_of(engine: &Engine, packet: PacketId) -> BTreeMap<String, i64> {
    let mut claims = BTreeMap::new();
    let mut cursor = None;
    loop {
        let page = engine.packet(packet, cursor, 500).await.expect("packet details");
        for c in &page.claims {
            let dup = claims.insert(c.user.as_str().to_owned(), c.amount_fen);
            assert!(dup.is_none(), "{} holds two shares of {packet}", c.user);
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return claims,
        }
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted.get((sorted.len().saturating_sub(1)) * p / 100).copied().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoting_the_synchronous_standby_loses_no_acknowledged_claim() {
    // Arrange: N = 3 (primary + 2 standbys), W = 2 (ANY 1 standby flushes before a commit
    // returns), R = 1 (queries read from s1).
    let (mut primary, mut standbys) = PgCluster::start_primary_with_standbys(2);
    let engine = start(&primary.url(), Some(&standbys[0].url()));
    let mut packets = Vec::new();
    for s in 0..PACKETS {
        let sender = user(&format!("sender{s}"));
        let rid = |p: &str| RequestId::parse(&format!("{p}{s}")).unwrap();
        engine.deposit(sender.clone(), Amount::new(SHARES * 100).unwrap(), rid("d")).await.unwrap();
        let send = engine
            .limits()
            .validate_send(SendRequest {
                sender,
                kind: Kind::Lucky,
                total_fen: SHARES * 100,
                count: SHARES,
                audience: Audience::Anyone,
                greeting: None,
                expires_in_s: None,
                request_id: rid("p"),
            })
            .unwrap();
        packets.push(engine.send(send).await.unwrap().id);
    }
    // Queries come from the standby: it shows the packets (once replayed), the primary has no
    // read connection at all.
    let first_read = Instant::now();
    while engine.packet(packets[PACKETS - 1], None, 1).await.is_err() {
        assert!(first_read.elapsed() < Duration::from_secs(10), "the standby never showed the packets");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(readers_on(&standbys[0]) >= 1, "queries read from the standby");
    assert_eq!(readers_on(&primary), 0, "no query reads from the primary");

    // Act: a claim storm; kill -9 the primary once enough claims were acknowledged.
    let acked: Arc<Mutex<BTreeMap<(PacketId, String), i64>>> = Arc::default();
    let acked_of_first = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (engine, acked, stop, packets) = (engine.clone(), acked.clone(), stop.clone(), packets.clone());
        let acked_of_first = acked_of_first.clone();
        tasks.push(tokio::spawn(async move {
            let mut refused: BTreeMap<String, u64> = BTreeMap::new();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let packet = packets[(t + i) % packets.len()];
                let name = format!("t{t}-{i}");
                match engine.claim(packet, user(&name)).await {
                    Ok(c) => {
                        acked.lock().unwrap().insert((packet, name), c.amount_fen);
                        if packet == packets[0] {
                            acked_of_first.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(e) => {
                        let kind = match e {
                            EngineError::Unavailable => "unavailable".to_owned(),
                            EngineError::Overloaded => "overloaded".to_owned(),
                            other => other.to_string(),
                        };
                        *refused.entry(kind).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            refused
        }));
    }
    // Beside the storm: how long until a claim acknowledged by the primary shows in a query
    // on the standby (the first packet's opened count reaches what was acknowledged).
    let killed = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (engine, killed, acked_of_first, first) =
            (engine.clone(), killed.clone(), acked_of_first.clone(), packets[0]);
        tokio::spawn(async move {
            let mut lags = Vec::new();
            'sample: while !killed.load(Ordering::SeqCst) {
                let (target, asked) = (acked_of_first.load(Ordering::SeqCst) as u32, Instant::now());
                loop {
                    if killed.load(Ordering::SeqCst) {
                        break 'sample;
                    }
                    if let Ok(p) = engine.packet(first, None, 1).await {
                        if p.summary.count - p.remaining_count >= target {
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                lags.push(asked.elapsed());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            lags
        })
    };
    let started = Instant::now();
    while acked.lock().unwrap().len() < ACKED_BEFORE_KILL {
        assert!(started.elapsed() < Duration::from_secs(60), "the storm made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let storm_s = started.elapsed().as_secs_f64();
    primary.kill9();
    killed.store(true, Ordering::SeqCst);
    let acked_at_kill = acked.lock().unwrap().len();
    tokio::time::sleep(STORM_AFTER_KILL).await;
    stop.store(true, Ordering::SeqCst);
    let mut refused: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        for (kind, n) in t.await.unwrap() {
            *refused.entry(kind).or_default() += n;
        }
    }
    let mut lags = sampler.await.unwrap();
    lags.sort();

    // R = 1 survives the primary: queries still answer from the standby.
    let on_standby = engine.packet(packets[0], None, 1).await.expect("queries answer with the primary dead");
    let opened_on_standby = on_standby.summary.count - on_standby.remaining_count;

    // The engine shuts down although its store is gone: sets that were reloading from the
    // dead primary give up when the engine stops.
    let shutdown_started = Instant::now();
    tokio::time::timeout(SHUTDOWN_WAIT_MAX, engine.shutdown())
        .await
        .expect("the engine shuts down although its primary is gone");
    let shutdown_took = shutdown_started.elapsed();
    let acked = std::mem::take(&mut *acked.lock().unwrap());

    // Promote the standby that received the most WAL: with ANY 1, each acknowledged commit
    // was flushed by at least one standby, so the one furthest ahead has all of them.
    let lsn = |s: &PgCluster, f: &str| {
        s.psql_in("postgres", &format!("SELECT pg_wal_lsn_diff({f}(), '0/0')::bigint"))
            .trim()
            .parse::<i64>()
            .unwrap()
    };
    let positions: Vec<String> = standbys
        .iter()
        .map(|s| {
            format!(
                "{} received {} replayed {}",
                s.name(),
                lsn(s, "pg_last_wal_receive_lsn"),
                lsn(s, "pg_last_wal_replay_lsn")
            )
        })
        .collect();
    standbys.sort_by_key(|s| std::cmp::Reverse(lsn(s, "pg_last_wal_receive_lsn")));
    let promoted = &mut standbys[0];
    let promote_started = Instant::now();
    promoted.promote();
    let promote_took = promote_started.elapsed();
    let restart_started = Instant::now();
    let engine = start(&promoted.url(), None);
    let restart_took = restart_started.elapsed();

    // Assert: every acknowledged claim is there with its amount, read before anyone claims
    // again (a lost lucky share claimed again by the same user could come out the same).
    let mut found = BTreeMap::new();
    for packet in &packets {
        for (name, amount) in claims_of(&engine, *packet).await {
            found.insert((*packet, name), amount);
        }
    }
    for (key, amount) in &acked {
        assert_eq!(
            found.get(key),
            Some(amount),
            "acknowledged claim of {} on {} changed or was lost",
            key.1,
            key.0
        );
    }
    let unacknowledged = found.len() - acked.len();
    for ((packet, name), amount) in &acked {
        let again = engine.claim(*packet, user(name)).await.expect("claim after failover");
        assert_eq!(again.amount_fen, *amount, "asked again, {name} gets the same share of {packet}");
    }
    let mut settled = false;
    for _ in 0..500 {
        let a = engine.audit().await.unwrap();
        assert!(a.ok, "{:?}", a.problems);
        if a.in_flight_fen == 0 {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(settled, "credits between sets settle on the promoted standby");
    engine.shutdown().await;

    println!(
        "failover: {} claims acknowledged ({acked_at_kill} at the kill, {:.0}/s over {storm_s:.1} s of storm), \
         all {} found on {} after promotion, with {unacknowledged} more committed but never acknowledged; \
         refused after the kill: {refused:?}",
        acked.len(),
        acked_at_kill as f64 / storm_s,
        acked.len(),
        promoted.name(),
    );
    println!("failover: WAL at the kill: {}", positions.join("; "));
    println!(
        "failover: standby reads during the storm: {} samples, acknowledged → visible p50 {:?} p99 {:?} max {:?}; \
         after the kill the standby still answered ({opened_on_standby} shares of the first packet opened, \
         {} acknowledged)",
        lags.len(),
        percentile(&lags, 50),
        percentile(&lags, 99),
        lags.last().copied().unwrap_or_default(),
        acked_of_first.load(Ordering::SeqCst)
    );
    println!(
        "failover: shutdown with the primary dead {shutdown_took:?}, promotion {promote_took:?}, \
         new engine loaded in {restart_took:?}"
    );
}

//! The PostgreSQL store through its public traits, on a throwaway cluster per test: what a
//! batch writes, a reopen reads back exactly; a failed batch leaves nothing behind; the readers
//! page and total correctly; claims and entries land in day partitions made ahead of time; a
//! lost connection comes back. The cases in `common` run here as on SQLite; the rest are
//! PostgreSQL's own. These need PostgreSQL's server binaries and fail, never skip, without them.

mod common;

use common::{claim, entry, header, outbox, page, span, user, world, world_at, Y2026_MS};

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hongbao_core::{Audience, Kind, PacketId, PacketIdGen, PacketStatus};
use hongbao_store::{
    open_postgres, Batch, ClaimRow, EntryKind, PacketUpdate, PgReader, PgStore, Reader, Store, StoreError,
    Totals,
};
use hongbao_testkit::PgCluster;

/// 2100-01-01T00:00:00Z.
const Y2100_MS: i64 = 4_102_444_800_000;
const DAY_MS: i64 = 86_400_000;

fn open(pg: &PgCluster) -> (PgStore, PgReader) {
    open_postgres(&pg.url(), 0, 1).unwrap()
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// The partition a row of set 0 went to.
fn partition_of(pg: &PgCluster, table: &str, condition: &str) -> String {
    pg.psql(&format!("SELECT tableoid::regclass::text FROM hongbao_set_0.{table} WHERE {condition}"))
}

/// `claims_d20261124` for the day `ms` falls on.
fn day_partition(table: &str, ms: i64) -> String {
    let day = ms.div_euclid(DAY_MS);
    // 1970-01-01 plus `day` days, through the civil-from-days algorithm, checked below by
    // PostgreSQL itself in the partitions test.
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("hongbao_set_0.{table}_d{y:04}{m:02}{d:02}")
}

#[test]
fn reopen_loads_exactly_what_was_committed() {
    let pg = PgCluster::start();
    common::reopen_loads_exactly_what_was_committed(|| open(&pg));
}

#[test]
fn credits_add_to_the_stored_balance() {
    let pg = PgCluster::start();
    common::credits_add_to_the_stored_balance(|| open(&pg));
}

#[test]
fn load_prunes_idempotency_records_past_retention() {
    let pg = PgCluster::start();
    common::load_prunes_idempotency_records_past_retention(|| open(&pg));
}

#[test]
fn sums_see_balances_escrow_and_the_outbox() {
    let pg = PgCluster::start();
    common::sums_see_balances_escrow_and_the_outbox(|| open(&pg));
}

#[test]
fn acknowledged_outbox_rows_are_deleted_but_their_seq_is_remembered() {
    let pg = PgCluster::start();
    common::acknowledged_outbox_rows_are_deleted_but_their_seq_is_remembered(|| open(&pg));
}

#[test]
fn another_set_count_or_set_index_is_incompatible() {
    let pg = PgCluster::start();
    drop(open_postgres(&pg.url(), 0, 2).unwrap());

    match open_postgres(&pg.url(), 0, 4) {
        Err(StoreError::Incompatible(msg)) => assert!(msg.contains("made with 2 sets"), "{msg}"),
        other => panic!("expected Incompatible, got {other:?}"),
    }
    // A schema that holds another set (as if renamed) is refused too.
    pg.psql("UPDATE hongbao_set_0.meta SET value = 1 WHERE key = 'set'");
    match open_postgres(&pg.url(), 0, 2) {
        Err(StoreError::Incompatible(msg)) => assert!(msg.contains("holds set 1, not set 0"), "{msg}"),
        other => panic!("expected Incompatible, got {other:?}"),
    }
    assert!(matches!(open_postgres(&pg.url(), 2, 2), Err(StoreError::Incompatible(_))));
}

#[test]
fn a_newer_schema_is_incompatible() {
    let pg = PgCluster::start();
    drop(open(&pg));
    pg.psql("INSERT INTO hongbao_set_0.schema_version (version) VALUES (999)");
    match open_postgres(&pg.url(), 0, 1) {
        Err(StoreError::Incompatible(msg)) => assert!(msg.contains("999"), "{msg}"),
        other => panic!("expected Incompatible, got {other:?}"),
    }
}

#[test]
fn migrations_are_versioned_and_run_once() {
    let pg = PgCluster::start();
    drop(open(&pg));
    drop(open(&pg));
    assert_eq!(
        pg.psql("SELECT string_agg(version::text, ',' ORDER BY version) FROM hongbao_set_0.schema_version"),
        "1,2"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM hongbao_set_0.totals"), "1");
}

#[test]
fn a_failed_commit_leaves_nothing_and_the_next_commit_works() {
    let pg = PgCluster::start();
    let w = world();
    let (mut store, reader) = open(&pg);
    store.commit(&w.batch).unwrap();

    let bad = Batch {
        wallets: vec![(user("gina"), 10), (user("alice"), -1)],
        entries: vec![entry("gina", EntryKind::Deposit, 10, None, Y2026_MS + 20)],
        outbox_acked: vec![(1, 1)],
        totals: Some(Totals { deposits_fen: 1_010, withdrawals_fen: 0 }),
        ..Batch::default()
    };
    match store.commit(&bad) {
        Err(StoreError::Io(msg)) => {
            assert!(msg.contains("balance_fen"), "the server's reason is kept: {msg}")
        }
        other => panic!("expected Io, got {other:?}"),
    }
    assert_eq!(reader.balance(&user("gina")).unwrap(), None);
    assert_eq!(reader.entries(&user("gina"), None, 10).unwrap(), vec![]);

    // The engine's recovery path: load again on the same object.
    let loaded = store.load(0).unwrap();
    assert!(!loaded.wallets.iter().any(|(u, _)| u.as_str() == "gina"));
    assert_eq!(loaded.totals.deposits_fen, 1_000);
    assert_eq!(loaded.outbox_pending.len(), 1, "the ack in the failed batch did not delete");

    let good = Batch {
        wallets: vec![(user("gina"), 10)],
        entries: vec![entry("gina", EntryKind::Deposit, 10, None, Y2026_MS + 20)],
        totals: Some(Totals { deposits_fen: 1_010, withdrawals_fen: 0 }),
        ..Batch::default()
    };
    store.commit(&good).unwrap();
    assert_eq!(reader.balance(&user("gina")).unwrap(), Some(10));
    assert_eq!(store.sums().unwrap().totals.deposits_fen, 1_010);
}

#[test]
fn an_update_of_a_missing_packet_or_a_best_luck_too_early_fails_the_batch() {
    let pg = PgCluster::start();
    let w = world();
    let (mut store, reader) = open(&pg);
    store.commit(&w.batch).unwrap();
    let ghost = PacketIdGen::new(0, Some(w.exhausted)).next(Y2026_MS);
    let update = |id, status, best| PacketUpdate {
        id,
        status,
        opened_count: 1,
        opened_fen: 120,
        refunded_fen: 0,
        best,
    };
    let missing = Batch {
        wallets: vec![(user("gina"), 10)],
        packet_updates: vec![
            update(w.active, PacketStatus::Active, None),
            update(ghost, PacketStatus::Active, None),
        ],
        ..Batch::default()
    };
    match store.commit(&missing) {
        Err(StoreError::Io(msg)) => assert!(msg.contains(&ghost.to_string()), "{msg}"),
        other => panic!("expected Io, got {other:?}"),
    }
    let early = Batch {
        wallets: vec![(user("gina"), 10)],
        packet_updates: vec![update(w.active, PacketStatus::Active, Some((user("bob"), 120)))],
        ..Batch::default()
    };
    assert!(matches!(store.commit(&early), Err(StoreError::Io(_))));
    assert_eq!(reader.balance(&user("gina")).unwrap(), None);
}

#[test]
fn repeated_keys_in_one_batch_keep_the_last_value() {
    let pg = PgCluster::start();
    let w = world();
    let (mut store, reader) = open(&pg);
    store.commit(&w.batch).unwrap();
    let twice = Batch {
        wallets: vec![(user("gina"), 10), (user("hank"), 1), (user("gina"), 30)],
        watermarks: vec![(1, 5), (1, 6)],
        outbox_new: vec![outbox(3, 2, "erin", 5, w.active), outbox(3, 1, "erin", 6, w.active)],
        ..Batch::default()
    };
    store.commit(&twice).unwrap();
    assert_eq!(reader.balance(&user("gina")).unwrap(), Some(30));
    let loaded = store.load(0).unwrap();
    assert_eq!(loaded.watermarks, vec![(1, 6)]);
    assert_eq!(loaded.outbox_last_seq, vec![(1, 1), (3, 2)]);
}

#[test]
fn a_second_share_for_the_same_user_is_refused() {
    let pg = PgCluster::start();
    common::a_second_share_for_the_same_user_is_refused(|| open(&pg));
}

#[test]
fn rows_that_disagree_are_corrupt_not_a_panic() {
    let pg = PgCluster::start();
    let w = world();
    {
        let (mut store, _reader) = open(&pg);
        store.commit(&w.batch).unwrap();
    }
    // The packet row says nothing was opened, its claims say bob opened 120.
    pg.psql(&format!(
        "UPDATE hongbao_set_0.packets SET opened_count = 0, opened_fen = 0 WHERE id = {}",
        w.active.as_i64()
    ));
    let (mut store, _reader) = open(&pg);
    assert!(matches!(store.load(0), Err(StoreError::Corrupt(_))));
    assert!(matches!(store.packet(w.active), Err(StoreError::Corrupt(_))));

    pg.psql(&format!(
        "UPDATE hongbao_set_0.packets SET opened_count = 1, opened_fen = 120 WHERE id = {}",
        w.active.as_i64()
    ));
    // Only with the CHECK constraint dropped can a negative balance get in.
    pg.psql(
        "ALTER TABLE hongbao_set_0.wallets DROP CONSTRAINT wallets_balance_fen_check; \
         UPDATE hongbao_set_0.wallets SET balance_fen = -5 WHERE user_id = 'carol'",
    );
    match store.load(0) {
        Err(StoreError::Corrupt(msg)) => assert!(msg.contains("carol"), "{msg}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn reader_pages_entries_newest_first_with_an_exclusive_cursor() {
    let pg = PgCluster::start();
    common::reader_pages_entries_newest_first_with_an_exclusive_cursor(|| open(&pg));
}

#[test]
fn reader_packet_and_claims_in_opening_order() {
    let pg = PgCluster::start();
    common::reader_packet_and_claims_in_opening_order(|| open(&pg));
}

#[test]
fn reader_sent_received_and_best_luck_by_year() {
    let pg = PgCluster::start();
    common::reader_sent_received_and_best_luck_by_year(|| open(&pg));
}

#[test]
fn the_reader_is_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync::<PgReader>();

    let pg = PgCluster::start();
    let _reader = common::the_reader_is_shared_across_threads(|| open(&pg));
    let connections =
        pg.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'hongbao-set-0-reader'");
    assert!(connections.parse::<u32>().unwrap() <= 4, "{connections} read connections");
}

#[test]
fn sets_live_in_schemas_of_their_own() {
    let pg = PgCluster::start();
    let (mut s0, r0) = open_postgres(&pg.url(), 0, 2).unwrap();
    let (mut s1, r1) = open_postgres(&pg.url(), 1, 2).unwrap();
    let w0 = world_at(0, Y2026_MS);
    let mut w1 = world_at(1, Y2026_MS);
    w1.batch.wallets = vec![(user("alice"), 7)];
    s0.commit(&w0.batch).unwrap();
    s1.commit(&w1.batch).unwrap();

    assert_eq!(r0.balance(&user("alice")).unwrap(), Some(500));
    assert_eq!(r1.balance(&user("alice")).unwrap(), Some(7));
    assert_eq!(s1.load(0).unwrap().max_packet_id, Some(w1.exhausted));
    assert!(r0.packet(w1.active).unwrap().is_none());
    assert_eq!(
        pg.psql("SELECT string_agg(nspname, ',' ORDER BY nspname) FROM pg_namespace WHERE nspname LIKE 'hongbao%'"),
        "hongbao_set_0,hongbao_set_1"
    );
}

#[test]
fn day_partitions_exist_ahead_and_other_days_go_to_the_default_partition() {
    let pg = PgCluster::start();
    let (mut store, reader) = open(&pg);
    let now = now_ms();
    // The day may turn during the test; the window is what open made.
    let made = pg.psql(
        "SELECT string_agg(c.relname, ',' ORDER BY c.relname) FROM pg_inherits i \
         JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'hongbao_set_0.claims'::regclass",
    );
    for offset in -1..=7 {
        let name = day_partition("claims", now + offset * DAY_MS);
        let name = name.trim_start_matches("hongbao_set_0.");
        assert!(made.contains(name), "{name} missing from {made}");
    }
    assert!(made.contains("claims_default"), "{made}");
    assert_eq!(made.split(',').count(), 10, "{made}");
    let entries_made =
        pg.psql("SELECT count(*) FROM pg_inherits i WHERE i.inhparent = 'hongbao_set_0.entries'::regclass");
    assert_eq!(entries_made, "10");

    // A packet of today, one of long ago and one of the far future, each opened at its time.
    let mut ids = PacketIdGen::new(0, None);
    let past_ms = now - 400 * DAY_MS;
    let past = ids.next(past_ms);
    let today = ids.next(now);
    let future = ids.next(Y2100_MS);
    let mut batch = Batch::default();
    for (id, at) in [(past, past_ms), (today, now), (future, Y2100_MS)] {
        batch.new_packets.push(header(id, "alice", Kind::Equal, 10, 1, Audience::Anyone, at));
        batch.claims.push(ClaimRow { packet_id: id, claim: claim("bob", 10, 0, at + 1) });
        batch.entries.push(entry("bob", EntryKind::Claim, 10, Some(id), at + 1));
        batch.packet_updates.push(PacketUpdate {
            id,
            status: PacketStatus::Exhausted,
            opened_count: 1,
            opened_fen: 10,
            refunded_fen: 0,
            best: Some((user("bob"), 10)),
        });
    }
    store.commit(&batch).unwrap();

    let claim_in = |id: PacketId| partition_of(&pg, "claims", &format!("packet_id = {}", id.as_i64()));
    assert_eq!(claim_in(today), day_partition("claims", now));
    assert_eq!(claim_in(past), "hongbao_set_0.claims_default");
    assert_eq!(claim_in(future), "hongbao_set_0.claims_default");
    let entry_in = |at: i64| partition_of(&pg, "entries", &format!("at_ms = {}", at + 1));
    assert_eq!(entry_in(now), day_partition("entries", now));
    assert_eq!(entry_in(past_ms), "hongbao_set_0.entries_default");
    assert_eq!(entry_in(Y2100_MS), "hongbao_set_0.entries_default");

    // Wherever they live, the rows read back the same.
    for id in [past, today, future] {
        assert_eq!(reader.claim_of(id, &user("bob")).unwrap().map(|c| c.amount_fen), Some(10));
        assert_eq!(store.packet(id).unwrap().unwrap().opened_fen(), 10);
    }
    assert_eq!(reader.received(&user("bob"), span(0, i64::MAX), page(None, 10)).unwrap().count, 3);
}

#[test]
fn a_day_partition_made_late_takes_its_rows_out_of_the_default_partition() {
    let pg = PgCluster::start();
    let now = now_ms();
    let late_ms = now + 5 * DAY_MS;
    {
        let (mut store, _reader) = open(&pg);
        // As if the partitions of that day had not been made in time.
        pg.psql(&format!(
            "DROP TABLE {}; DROP TABLE {}",
            day_partition("claims", late_ms),
            day_partition("entries", late_ms)
        ));
        let id = PacketIdGen::new(0, None).next(late_ms);
        let batch = Batch {
            new_packets: vec![header(id, "alice", Kind::Equal, 20, 2, Audience::Anyone, late_ms)],
            claims: vec![ClaimRow { packet_id: id, claim: claim("bob", 10, 0, late_ms) }],
            entries: vec![entry("bob", EntryKind::Claim, 10, Some(id), late_ms)],
            packet_updates: vec![PacketUpdate {
                id,
                status: PacketStatus::Active,
                opened_count: 1,
                opened_fen: 10,
                refunded_fen: 0,
                best: None,
            }],
            ..Batch::default()
        };
        store.commit(&batch).unwrap();
        assert_eq!(partition_of(&pg, "claims", "true"), "hongbao_set_0.claims_default");
        assert_eq!(partition_of(&pg, "entries", "true"), "hongbao_set_0.entries_default");
    }
    // The next open makes the missing days again, and the rows move in with them.
    let (mut store, reader) = open(&pg);
    assert_eq!(partition_of(&pg, "claims", "true"), day_partition("claims", late_ms));
    assert_eq!(partition_of(&pg, "entries", "true"), day_partition("entries", late_ms));
    let loaded = store.load(0).unwrap();
    assert_eq!(loaded.active_packets.len(), 1);
    assert_eq!(loaded.active_packets[0].opened_fen(), 10);
    assert_eq!(reader.entries(&user("bob"), None, 10).unwrap().len(), 1);
}

#[test]
fn ten_thousand_claims_commit_in_one_transaction() {
    const CLAIMS: u32 = 10_000;
    let pg = PgCluster::start();
    let (mut store, reader) = open(&pg);
    let now = now_ms();
    let id = PacketIdGen::new(0, None).next(now);
    let total_fen = i64::from(CLAIMS) * 100;
    let mut batch = Batch {
        new_packets: vec![header(id, "alice", Kind::Equal, total_fen, CLAIMS, Audience::Anyone, now)],
        packet_updates: vec![PacketUpdate {
            id,
            status: PacketStatus::Exhausted,
            opened_count: CLAIMS,
            opened_fen: total_fen,
            refunded_fen: 0,
            best: Some((user("u0"), 100)),
        }],
        ..Batch::default()
    };
    for i in 0..CLAIMS {
        let who = format!("u{i}");
        let at = now + i64::from(i);
        batch.claims.push(ClaimRow { packet_id: id, claim: claim(&who, 100, i, at) });
        batch.entries.push(entry(&who, EntryKind::Claim, 100, Some(id), at));
        batch.wallets.push((user(&who), 100));
    }

    let started = Instant::now();
    store.commit(&batch).unwrap();
    let took = started.elapsed();
    println!(
        "one batch of {CLAIMS} claims, {CLAIMS} entries and {CLAIMS} wallets committed in {:.1} ms",
        took.as_secs_f64() * 1e3
    );

    // One transaction: every row carries the same creating transaction id.
    let xids = pg.psql(
        "SELECT count(DISTINCT x) FROM (SELECT xmin::text AS x FROM hongbao_set_0.claims \
         UNION ALL SELECT xmin::text FROM hongbao_set_0.entries \
         UNION ALL SELECT xmin::text FROM hongbao_set_0.wallets) AS t",
    );
    assert_eq!(xids, "1");
    assert_eq!(pg.psql("SELECT count(*) FROM hongbao_set_0.claims"), CLAIMS.to_string());
    // Entry ids follow the batch's order (here, time order): history pages by id.
    let out_of_order = pg.psql(
        "SELECT count(*) FROM (SELECT at_ms, lag(at_ms) OVER (ORDER BY id) AS prev \
         FROM hongbao_set_0.entries) AS t WHERE prev > at_ms",
    );
    assert_eq!(out_of_order, "0");
    assert_eq!(reader.claims(id, Some(CLAIMS - 2), 10).unwrap().len(), 1);
    assert_eq!(reader.claim_of(id, &user("u9999")).unwrap().map(|c| c.index), Some(9_999));

    let started = Instant::now();
    let loaded = store.packet(id).unwrap().unwrap();
    println!("read back a packet of {CLAIMS} claims in {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    assert_eq!(loaded.opened_count(), CLAIMS);
}

#[test]
fn a_lost_connection_fails_the_commit_and_load_connects_again() {
    let mut pg = PgCluster::start();
    let w = world();
    let (mut store, reader) = open(&pg);
    store.commit(&w.batch).unwrap();

    let killed = pg.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = 'hongbao-set-0-writer'",
    );
    assert_eq!(killed, "1");
    let deposit = |fen: i64| Batch {
        wallets: vec![(user("gina"), fen)],
        entries: vec![entry("gina", EntryKind::Deposit, fen, None, Y2026_MS + 20)],
        ..Batch::default()
    };
    assert!(matches!(store.commit(&deposit(10)), Err(StoreError::Io(_))));
    store.load(0).unwrap();
    store.commit(&deposit(10)).unwrap();
    assert_eq!(reader.balance(&user("gina")).unwrap(), Some(10));

    // The server itself dies: everything fails with Io until it is back, then carries on.
    pg.kill9();
    assert!(matches!(store.commit(&deposit(20)), Err(StoreError::Io(_))));
    assert!(matches!(store.load(0), Err(StoreError::Io(_))));
    assert!(matches!(reader.balance(&user("gina")), Err(StoreError::Io(_))));
    pg.restart();
    let loaded = store.load(0).unwrap();
    assert!(loaded.wallets.contains(&(user("gina"), 10)), "the committed deposit survived kill -9");
    store.commit(&deposit(20)).unwrap();
    assert_eq!(reader.balance(&user("gina")).unwrap(), Some(20));
}

#[test]
fn a_failed_call_drops_its_connection_and_the_next_call_connects_again() {
    let pg = PgCluster::start();
    let w = world();
    let (mut store, reader) = open(&pg);
    store.commit(&w.batch).unwrap();
    let writer =
        || pg.psql("SELECT pid FROM pg_stat_activity WHERE application_name = 'hongbao-set-0-writer'");
    let before = writer();
    // The server refuses the batch; the connection itself is fine.
    let ghost = PacketIdGen::new(0, Some(w.exhausted)).next(Y2026_MS);
    let missing = Batch {
        packet_updates: vec![PacketUpdate {
            id: ghost,
            status: PacketStatus::Active,
            opened_count: 1,
            opened_fen: 120,
            refunded_fen: 0,
            best: None,
        }],
        ..Batch::default()
    };
    assert!(store.commit(&missing).is_err());
    let loaded = store.load(0).unwrap();
    assert!(loaded.wallets.iter().any(|(u, _)| u.as_str() == "alice"), "load reads the committed world");
    // The dropped connection's backend exits on its own time: wait until it is gone.
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let mut after = writer();
    while after.lines().count() != 1 && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        after = writer();
    }
    assert_eq!(after.lines().count(), 1, "one writer connection: {after}");
    assert_ne!(before, after, "the failed call's connection was used again");
    assert!(reader.balance(&user("alice")).unwrap().is_some());
}

#[test]
fn opens_reads_and_drops_inside_a_tokio_runtime() {
    let pg = PgCluster::start();
    let w = world();
    let url = pg.url();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        // As the binary does: open from async code, query from blocking threads, and drop
        // both sides on a runtime thread.
        let (mut store, reader) = open_postgres(&url, 0, 1).unwrap();
        let store = tokio::task::spawn_blocking(move || {
            store.commit(&w.batch).unwrap();
            store
        })
        .await
        .unwrap();
        let r = reader.clone();
        let balance = tokio::task::spawn_blocking(move || r.balance(&user("bob")).unwrap()).await.unwrap();
        assert_eq!(balance, Some(220));
        drop(store);
        drop(reader);
    });
}

#[test]
fn a_packet_is_read_from_the_one_partition_its_id_names() {
    let pg = PgCluster::start();
    drop(open(&pg));
    let id = PacketIdGen::new(0, None).next(now_ms());
    for sql in [
        format!("SELECT idx FROM hongbao_set_0.claims WHERE packet_id = {} ORDER BY idx", id.as_i64()),
        format!("SELECT idx FROM hongbao_set_0.claims WHERE packet_id = {} AND user_id = 'bob'", id.as_i64()),
    ] {
        let plan = pg.psql(&format!("SET enable_seqscan = off; EXPLAIN (COSTS OFF) {sql}"));
        let mut days: Vec<&str> = plan.match_indices("claims_d").map(|(i, _)| &plan[i..i + 16]).collect();
        days.dedup();
        let today = day_partition("claims", now_ms());
        assert_eq!(days, vec![today.trim_start_matches("hongbao_set_0.")], "{sql}\n{plan}");
        assert!(!plan.contains("claims_default"), "{plan}");
    }
}

/// A writer killed mid-COMMIT leaves the COMMIT to its server process, which finishes it
/// whatever became of the client. A new writer must not load the set before that session has
/// ended: it would miss what the COMMIT writes, and its memory and the store would part (the
/// crash loop's audit found claims and credits in the store its sets never made).
#[test]
fn a_new_writer_loads_only_after_the_last_writer_session_has_ended() {
    let pg = PgCluster::start();
    let (store, _reader) = open(&pg);
    drop(store);
    // The last writer, as a killed one leaves it: holding the set's writer lock ("Hbwr", set
    // 0), its last transaction not yet committed.
    let mut last = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    last.batch_execute(
        "SET search_path TO hongbao_set_0; SELECT pg_advisory_lock(1214412658, 0); BEGIN; \
         INSERT INTO wallets (user_id, balance_fen) VALUES ('gina', 10)",
    )
    .unwrap();
    let url = pg.url();
    let (tx, rx) = std::sync::mpsc::channel();
    let next = std::thread::spawn(move || {
        let (mut store, _reader) = open_postgres(&url, 0, 1).unwrap();
        tx.send(store.load(0).unwrap().wallets).unwrap();
        store
    });
    assert!(
        rx.recv_timeout(std::time::Duration::from_millis(500)).is_err(),
        "the new writer waits while the last writer's session lives"
    );
    last.batch_execute("COMMIT").unwrap();
    drop(last);
    let wallets =
        rx.recv_timeout(std::time::Duration::from_secs(30)).expect("the new writer loads once it ended");
    assert!(wallets.contains(&(user("gina"), 10)), "the load has what the last COMMIT wrote: {wallets:?}");
    drop(next.join().unwrap());
}

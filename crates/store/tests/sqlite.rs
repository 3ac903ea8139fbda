//! The SQLite store through its public traits: what a batch writes, a reopen reads back
//! exactly; a failed batch leaves nothing behind; the readers page and total correctly.
//! The cases in `common` run here as on PostgreSQL; the rest are SQLite's own.

mod common;

use std::path::Path;

use common::{entry, user, world, Y2026_MS};
use hongbao_store::{
    open_journaled_sqlite, open_sqlite, Batch, EntryKind, Reader, SqliteReader, SqliteStore, Store,
    StoreError, Totals,
};

fn open(dir: &Path) -> (SqliteStore, SqliteReader) {
    open_sqlite(dir, 0, 1).unwrap()
}

/// A batch of one deposit of `amount_fen` into `who`'s wallet, leaving it at `balance_fen` and
/// the store's deposits at `deposits_fen`.
fn deposit(who: &str, balance_fen: i64, amount_fen: i64, at_ms: i64, deposits_fen: i64) -> Batch {
    Batch {
        wallets: vec![(user(who), balance_fen)],
        entries: vec![entry(who, EntryKind::Deposit, amount_fen, None, at_ms)],
        totals: Some(Totals { deposits_fen, withdrawals_fen: 0 }),
        ..Batch::default()
    }
}

#[test]
fn reopen_loads_exactly_what_was_committed() {
    let dir = tempfile::tempdir().unwrap();
    common::reopen_loads_exactly_what_was_committed(|| open(dir.path()));
}

#[test]
fn credits_add_to_the_stored_balance() {
    let dir = tempfile::tempdir().unwrap();
    common::credits_add_to_the_stored_balance(|| open(dir.path()));
}

/// The same through the journal: the set's read and a query add the records not folded yet.
#[test]
fn credits_add_to_the_stored_balance_through_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    common::credits_add_to_the_stored_balance(|| open_journaled_sqlite(dir.path(), 0, 1).unwrap());
}

#[test]
fn load_prunes_idempotency_records_past_retention() {
    let dir = tempfile::tempdir().unwrap();
    common::load_prunes_idempotency_records_past_retention(|| open(dir.path()));
}

#[test]
fn sums_see_balances_escrow_and_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    common::sums_see_balances_escrow_and_the_outbox(|| open(dir.path()));
}

#[test]
fn acknowledged_outbox_rows_are_deleted_but_their_seq_is_remembered() {
    let dir = tempfile::tempdir().unwrap();
    common::acknowledged_outbox_rows_are_deleted_but_their_seq_is_remembered(|| open(dir.path()));
}

#[test]
fn another_set_count_or_set_index_is_incompatible() {
    let dir = tempfile::tempdir().unwrap();
    drop(open_sqlite(dir.path(), 0, 2).unwrap());

    match open_sqlite(dir.path(), 0, 4) {
        Err(StoreError::Incompatible(msg)) => assert!(msg.contains("made with 2 sets"), "{msg}"),
        other => panic!("expected Incompatible, got {other:?}"),
    }
    // A file that holds another set (as if renamed) is refused too. Edited through SQLite
    // rather than renamed: a rename under a connection still closing would race its WAL.
    let conn = rusqlite::Connection::open(dir.path().join("set-0.sqlite")).unwrap();
    conn.execute("UPDATE meta SET value = 1 WHERE key = 'set'", []).unwrap();
    drop(conn);
    match open_sqlite(dir.path(), 0, 2) {
        Err(StoreError::Incompatible(msg)) => assert!(msg.contains("holds set 1, not set 0"), "{msg}"),
        other => panic!("expected Incompatible, got {other:?}"),
    }
    assert!(matches!(open_sqlite(dir.path(), 2, 2), Err(StoreError::Incompatible(_))));
}

#[test]
fn a_newer_schema_is_incompatible() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let conn = rusqlite::Connection::open(dir.path().join("set-0.sqlite")).unwrap();
    conn.pragma_update(None, "user_version", 999).unwrap();
    drop(conn);
    match open_sqlite(dir.path(), 0, 1) {
        Err(StoreError::Incompatible(msg)) => assert!(msg.contains("999"), "{msg}"),
        other => panic!("expected Incompatible, got {other:?}"),
    }
}

#[test]
fn a_failed_commit_leaves_nothing_and_the_next_commit_works() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    let (mut store, reader) = open(dir.path());
    store.commit(&w.batch).unwrap();

    let bad = Batch {
        wallets: vec![(user("gina"), 10), (user("alice"), -1)],
        entries: vec![entry("gina", EntryKind::Deposit, 10, None, Y2026_MS + 20)],
        outbox_acked: vec![(1, 1)],
        totals: Some(Totals { deposits_fen: 1_010, withdrawals_fen: 0 }),
        ..Batch::default()
    };
    assert!(matches!(store.commit(&bad), Err(StoreError::Io(_))));
    assert_eq!(reader.balance(&user("gina")).unwrap(), None);
    assert_eq!(reader.entries(&user("gina"), None, 10).unwrap(), vec![]);

    // The engine's recovery path: load again on the same object.
    let loaded = store.load(0).unwrap();
    assert!(!loaded.wallets.iter().any(|(u, _)| u.as_str() == "gina"));
    assert_eq!(loaded.totals.deposits_fen, 1_000);
    assert_eq!(loaded.outbox_pending.len(), 1, "the ack in the failed batch did not delete");

    let good = deposit("gina", 10, 10, Y2026_MS + 20, 1_010);
    store.commit(&good).unwrap();
    assert_eq!(reader.balance(&user("gina")).unwrap(), Some(10));
    assert_eq!(store.sums().unwrap().totals.deposits_fen, 1_010);
}

/// The store writes a batch's rows in key order; the ids still follow the order the entries
/// were made in, across users, and a wallet listed twice keeps the later balance.
#[test]
fn entry_ids_follow_the_order_entries_were_made_whatever_order_they_are_written_in() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, reader) = open(dir.path());
    let t = Y2026_MS;
    let batch = Batch {
        wallets: vec![(user("zed"), 5), (user("amy"), 2), (user("zed"), 7)],
        entries: vec![
            entry("zed", EntryKind::Deposit, 3, None, t),
            entry("amy", EntryKind::Deposit, 2, None, t + 1),
            entry("zed", EntryKind::Deposit, 4, None, t + 2),
        ],
        totals: Some(Totals { deposits_fen: 9, withdrawals_fen: 0 }),
        ..Batch::default()
    };
    store.commit(&batch).unwrap();
    let ids = |who: &str| -> Vec<(i64, i64)> {
        reader.entries(&user(who), None, 10).unwrap().iter().map(|e| (e.id, e.amount_fen)).collect()
    };
    let zed = ids("zed");
    let first = zed[1].0;
    assert_eq!(zed, vec![(first + 2, 4), (first, 3)], "newest first");
    assert_eq!(ids("amy"), vec![(first + 1, 2)]);
    assert_eq!(reader.balance(&user("zed")).unwrap(), Some(7));

    // The next batch continues after the last id issued, not after the last row written.
    let more = deposit("amy", 3, 1, t + 3, 10);
    store.commit(&more).unwrap();
    assert_eq!(ids("amy"), vec![(first + 3, 1), (first + 1, 2)]);
}

#[test]
fn a_second_share_for_the_same_user_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    common::a_second_share_for_the_same_user_is_refused(|| open(dir.path()));
}

#[test]
fn rows_that_disagree_are_corrupt_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    {
        let (mut store, _reader) = open(dir.path());
        store.commit(&w.batch).unwrap();
    }
    let conn = rusqlite::Connection::open(dir.path().join("set-0.sqlite")).unwrap();
    // The packet row says nothing was opened, its claims say bob opened 120.
    conn.execute("UPDATE packets SET opened_count = 0, opened_fen = 0 WHERE id = ?1", [w.active.as_i64()])
        .unwrap();
    drop(conn);
    let (mut store, _reader) = open(dir.path());
    assert!(matches!(store.load(0), Err(StoreError::Corrupt(_))));
    assert!(matches!(store.packet(w.active), Err(StoreError::Corrupt(_))));

    let conn = rusqlite::Connection::open(dir.path().join("set-0.sqlite")).unwrap();
    conn.execute("UPDATE packets SET opened_count = 1, opened_fen = 120 WHERE id = ?1", [w.active.as_i64()])
        .unwrap();
    // Only with the CHECK constraints switched off can a negative balance get in.
    conn.pragma_update(None, "ignore_check_constraints", true).unwrap();
    conn.execute("UPDATE wallets SET balance_fen = -5 WHERE user = 'carol'", []).unwrap();
    drop(conn);
    match store.load(0) {
        Err(StoreError::Corrupt(msg)) => assert!(msg.contains("carol"), "{msg}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn reader_pages_entries_newest_first_with_an_exclusive_cursor() {
    let dir = tempfile::tempdir().unwrap();
    common::reader_pages_entries_newest_first_with_an_exclusive_cursor(|| open(dir.path()));
}

#[test]
fn reader_packet_and_claims_in_opening_order() {
    let dir = tempfile::tempdir().unwrap();
    common::reader_packet_and_claims_in_opening_order(|| open(dir.path()));
}

#[test]
fn reader_sent_received_and_best_luck_by_year() {
    let dir = tempfile::tempdir().unwrap();
    common::reader_sent_received_and_best_luck_by_year(|| open(dir.path()));
}

#[test]
fn the_reader_is_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync::<SqliteReader>();

    let dir = tempfile::tempdir().unwrap();
    common::the_reader_is_shared_across_threads(|| open(dir.path()));
}

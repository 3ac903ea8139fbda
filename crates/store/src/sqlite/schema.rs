//! The schema and its migrations, and the check that a file belongs to this set layout.
//!
//! `PRAGMA user_version` counts the migrations applied. Migrations are only ever appended:
//! an applied one must never be edited, because files in the field already ran it. A file
//! whose version is newer than this build knows is refused, never "fixed" downwards.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::{Result, StoreError};

/// Every migration, in order; `MIGRATIONS[i]` takes a file from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[V1, V2, V3];

/// Names carry their unit last (`_fen`, `_ms`). Every query the store and the reader run has
/// an index; the comments say which query each one serves.
const V1: &str = "
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE wallets (
    user        TEXT PRIMARY KEY,
    balance_fen INTEGER NOT NULL CHECK (balance_fen >= 0)
) WITHOUT ROWID;

-- AUTOINCREMENT: entry ids are history cursors and must never be reused.
CREATE TABLE entries (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    user       TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('deposit', 'withdraw', 'send', 'claim', 'refund')),
    amount_fen INTEGER NOT NULL CHECK (amount_fen > 0),
    packet_id  INTEGER,
    at_ms      INTEGER NOT NULL
);
-- A wallet's history, newest first; `received` filters the same range (one user's entries
-- are few). One index only: each index is a random B-tree insert per claim at commit.
CREATE INDEX entries_user_id ON entries (user, id);

CREATE TABLE packets (
    id              INTEGER PRIMARY KEY CHECK (id > 0),
    sender          TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('lucky', 'equal')),
    total_fen       INTEGER NOT NULL CHECK (total_fen > 0),
    count           INTEGER NOT NULL CHECK (count > 0),
    audience_anyone INTEGER NOT NULL CHECK (audience_anyone IN (0, 1)),
    greeting        TEXT NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    expires_at_ms   INTEGER NOT NULL,
    -- The u64 seed bit-cast to i64.
    seed            INTEGER NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('active', 'exhausted', 'expired')),
    opened_count    INTEGER NOT NULL CHECK (opened_count BETWEEN 0 AND count),
    opened_fen      INTEGER NOT NULL CHECK (opened_fen BETWEEN 0 AND total_fen),
    refunded_fen    INTEGER NOT NULL
                    CHECK (refunded_fen >= 0 AND opened_fen + refunded_fen <= total_fen),
    best_user       TEXT,
    best_fen        INTEGER CHECK (best_fen > 0),
    CHECK ((best_user IS NULL) = (best_fen IS NULL))
);
-- `sent` pages, newest first.
CREATE INDEX packets_sender_id ON packets (sender, id);
-- `sent` count and total over a year without touching the table.
CREATE INDEX packets_sender_created ON packets (sender, created_at_ms, total_fen);
-- `load` reads only active packets: a small slice of a table that keeps every packet.
CREATE INDEX packets_active ON packets (status) WHERE status = 'active';
-- `best_luck_count`; only exhausted packets have a best luck.
CREATE INDEX packets_best ON packets (best_user, created_at_ms) WHERE best_user IS NOT NULL;

CREATE TABLE audience (
    packet_id INTEGER NOT NULL,
    user      TEXT NOT NULL,
    PRIMARY KEY (packet_id, user)
) WITHOUT ROWID;

-- One share per user per packet (DESIGN.md §2.5), enforced here a second time.
CREATE TABLE claims (
    packet_id  INTEGER NOT NULL,
    idx        INTEGER NOT NULL CHECK (idx >= 0),
    user       TEXT NOT NULL,
    amount_fen INTEGER NOT NULL CHECK (amount_fen > 0),
    at_ms      INTEGER NOT NULL,
    PRIMARY KEY (packet_id, idx),
    UNIQUE (packet_id, user)
) WITHOUT ROWID;

CREATE TABLE outbox (
    target_set INTEGER NOT NULL CHECK (target_set >= 0),
    seq        INTEGER NOT NULL CHECK (seq > 0),
    user       TEXT NOT NULL,
    amount_fen INTEGER NOT NULL CHECK (amount_fen > 0),
    packet_id  INTEGER NOT NULL,
    at_ms      INTEGER NOT NULL,
    PRIMARY KEY (target_set, seq)
) WITHOUT ROWID;

-- The last seq ever issued per target: acknowledged outbox rows are deleted, their seqs are
-- never issued again.
CREATE TABLE outbox_seq (
    target_set INTEGER PRIMARY KEY CHECK (target_set >= 0),
    last_seq   INTEGER NOT NULL CHECK (last_seq > 0)
);

-- The last credit applied from each source set: the inbox that makes a credit apply once.
CREATE TABLE watermarks (
    source_set INTEGER PRIMARY KEY CHECK (source_set >= 0),
    seq        INTEGER NOT NULL CHECK (seq >= 0)
);

CREATE TABLE idempotency (
    user        TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    -- The u64 fingerprint bit-cast to i64.
    fingerprint INTEGER NOT NULL,
    op          TEXT NOT NULL CHECK (op IN ('deposit', 'withdraw', 'send')),
    result      INTEGER NOT NULL,
    at_ms       INTEGER NOT NULL,
    PRIMARY KEY (user, request_id)
) WITHOUT ROWID;
-- Pruning past the retention window at `load`.
CREATE INDEX idempotency_at ON idempotency (at_ms);

CREATE TABLE totals (
    id              INTEGER PRIMARY KEY CHECK (id = 0),
    deposits_fen    INTEGER NOT NULL CHECK (deposits_fen >= 0),
    withdrawals_fen INTEGER NOT NULL CHECK (withdrawals_fen >= 0)
);
INSERT INTO totals (id, deposits_fen, withdrawals_fen) VALUES (0, 0, 0);
";

/// Each packet records the amount rule that draws its lucky shares (`hongbao_core::AmountRule`):
/// packets sent before the column existed were drawn by rule 1 and keep it.
const V2: &str = "
ALTER TABLE packets ADD COLUMN amount_rule INTEGER NOT NULL DEFAULT 1 CHECK (amount_rule IN (1, 2));
";

/// The entries table again, cheaper to write: the fold writes one entry per claim, and in V1
/// that cost 3.4 µs of CPU, a third of the fold's time per claim.
/// - `kind` is checked with `=` and `OR`, not `IN (...)`: SQLite builds the list of an `IN`
///   afresh for every row it checks, which made the check cost as much as the insert.
/// - The table is its own `(user, id)` index (`WITHOUT ROWID`): every query reads one user's
///   entries, and V1 wrote each entry twice, as a row and in the index on `(user, id)`.
///
/// Ids stay history cursors that are never reused: the last one issued lives in `meta`
/// (`last_entry_id`), taken over from AUTOINCREMENT's counter.
const V3: &str = "
CREATE TABLE entries_by_user (
    user       TEXT NOT NULL,
    id         INTEGER NOT NULL CHECK (id > 0),
    kind       TEXT NOT NULL CHECK (kind = 'deposit' OR kind = 'withdraw' OR kind = 'send'
                                    OR kind = 'claim' OR kind = 'refund'),
    amount_fen INTEGER NOT NULL CHECK (amount_fen > 0),
    packet_id  INTEGER,
    at_ms      INTEGER NOT NULL,
    PRIMARY KEY (user, id)
) WITHOUT ROWID;
INSERT INTO entries_by_user (user, id, kind, amount_fen, packet_id, at_ms)
    SELECT user, id, kind, amount_fen, packet_id, at_ms FROM entries ORDER BY user, id;
INSERT INTO meta (key, value) VALUES ('last_entry_id', MAX(
    COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'entries'), 0),
    COALESCE((SELECT MAX(id) FROM entries), 0)));
DROP TABLE entries;
ALTER TABLE entries_by_user RENAME TO entries;
";

/// Brings the file up to the newest schema and checks (or, in a new file, records) which set
/// of how many it holds. All in one transaction: a crash half-way leaves the old version.
pub(super) fn migrate(conn: &mut Connection, path: &Path, set: u32, sets: u32) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len();
    let applied = usize::try_from(version)
        .map_err(|_| StoreError::Corrupt(format!("{} has schema version {version}", path.display())))?;
    if applied > known {
        return Err(StoreError::Incompatible(format!(
            "{} has schema version {applied}, newer than the {known} this build knows: run a newer hongbao",
            path.display()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.execute_batch(sql)
            .map_err(|e| StoreError::Io(format!("migration to version {} failed: {e}", i + 1)))?;
    }
    if applied < known {
        tx.pragma_update(None, "user_version", known as i64)?;
        tracing::info!(path = %path.display(), from = applied, to = known, "store schema migrated");
    }
    check_layout(&tx, path, set, sets)?;
    tx.commit()?;
    Ok(())
}

/// Users are hashed to sets, so a file is only meaningful under the set count that made it.
fn check_layout(tx: &Transaction<'_>, path: &Path, set: u32, sets: u32) -> Result<()> {
    let stored = |key: &str| -> Result<Option<i64>> {
        let v = tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()?;
        Ok(v)
    };
    match (stored("sets")?, stored("set")?) {
        (None, None) => {
            let mut insert = tx.prepare("INSERT INTO meta (key, value) VALUES (?1, ?2)")?;
            insert.execute(("sets", i64::from(sets)))?;
            insert.execute(("set", i64::from(set)))?;
            Ok(())
        }
        (Some(stored_sets), Some(stored_set)) => {
            if stored_sets != i64::from(sets) {
                return Err(StoreError::Incompatible(format!(
                    "data dir {} was made with {stored_sets} sets and cannot be opened with {sets}",
                    path.parent().unwrap_or(path).display()
                )));
            }
            if stored_set != i64::from(set) {
                return Err(StoreError::Incompatible(format!(
                    "{} holds set {stored_set}, not set {set}",
                    path.display()
                )));
            }
            Ok(())
        }
        _ => Err(StoreError::Corrupt(format!("{} has half of its set layout in meta", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_to_an_empty_database() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, Path::new("mem"), 0, 1).unwrap();
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        // A second open is a no-op, not a second run of the scripts.
        migrate(&mut conn, Path::new("mem"), 0, 1).unwrap();
    }

    #[test]
    fn entries_from_before_v3_keep_their_ids_and_no_id_is_issued_twice() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(V1).unwrap();
        conn.execute_batch(V2).unwrap();
        conn.pragma_update(None, "user_version", 2).unwrap();
        for (user, fen) in [("bob", 5), ("alice", 7), ("bob", 9), ("carol", 11)] {
            conn.execute(
                "INSERT INTO entries (user, kind, amount_fen, packet_id, at_ms) VALUES (?1, 'claim', ?2, 1, 0)",
                (user, fen),
            )
            .unwrap();
        }
        // Id 4 was issued and its row is gone: AUTOINCREMENT would never issue it again.
        conn.execute("DELETE FROM entries WHERE id = 4", []).unwrap();
        migrate(&mut conn, Path::new("mem"), 0, 1).unwrap();

        let rows: Vec<(String, i64, i64)> = conn
            .prepare("SELECT user, id, amount_fen FROM entries ORDER BY user, id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let want =
            [("alice", 2, 7), ("bob", 1, 5), ("bob", 3, 9)].map(|(u, id, fen)| (u.to_string(), id, fen));
        assert_eq!(rows, want);
        let last: i64 =
            conn.query_row("SELECT value FROM meta WHERE key = 'last_entry_id'", [], |r| r.get(0)).unwrap();
        assert_eq!(last, 4);
        // The cheaper check still refuses what the old one did.
        let bad = conn.execute(
            "INSERT INTO entries (user, id, kind, amount_fen, packet_id, at_ms) VALUES ('bob', 5, 'gift', 1, 1, 0)",
            [],
        );
        assert!(bad.is_err(), "an unknown kind was stored");
    }

    #[test]
    fn packets_from_before_the_rule_column_keep_rule_1() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(V1).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO packets (id, sender, kind, total_fen, count, audience_anyone, greeting, \
             created_at_ms, expires_at_ms, seed, status, opened_count, opened_fen, refunded_fen) \
             VALUES (1, 'alice', 'lucky', 100, 10, 1, '', 0, 1000, 7, 'active', 0, 0, 0)",
            [],
        )
        .unwrap();
        migrate(&mut conn, Path::new("mem"), 0, 1).unwrap();
        let rule: i64 =
            conn.query_row("SELECT amount_rule FROM packets WHERE id = 1", [], |r| r.get(0)).unwrap();
        assert_eq!(rule, hongbao_core::AmountRule::V1.code());
    }
}

//! The schema of one set and its migrations, and the check that a schema belongs to this set
//! layout.
//!
//! `schema_version` holds one row per migration applied. Migrations are only ever appended: an
//! applied one must never be edited, because databases in the field already ran it. A schema
//! whose version is newer than this build knows is refused, never "fixed" downwards. Opening
//! runs in one transaction under an advisory lock per set, so two processes opening the same
//! set at once apply each migration once, and a crash half-way leaves the old version.

use postgres::Transaction;

use super::{schema_name, PgConn};
use crate::{Result, StoreError};

/// Every migration, in order; `MIGRATIONS[i]` takes a schema from version `i` to `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[V1, V2];

/// First key of the advisory lock a set's migrations hold ("Hong"); the second is the set.
const MIGRATION_LOCK_CLASS: i32 = 0x486f_6e67;

/// Names carry their unit last (`_fen`, `_ms`); `user` is reserved in SQL, hence `user_id`.
/// Integers are `bigint` throughout: every value is an `i64` in Rust, so nothing narrows.
/// Every query the store and the reader run has an index; the comments say which query each
/// one serves. `claims` and `entries` are partitioned by day; `partitions` creates the days.
const V1: &str = "
CREATE TABLE meta (
    key   text PRIMARY KEY,
    value bigint NOT NULL
);

CREATE TABLE wallets (
    user_id     text PRIMARY KEY,
    balance_fen bigint NOT NULL CHECK (balance_fen >= 0)
);

-- Entry ids are history cursors and are never reused: they come from a sequence, and a
-- sequence never hands a value out twice, rolled back transactions included.
CREATE SEQUENCE entries_id_seq AS bigint;
-- Partitioned by the day of at_ms. No primary key: ids are unique by construction, and a
-- unique index on a partitioned table must include at_ms, so it would cost an index on the
-- hottest table and prove nothing the sequence does not.
CREATE TABLE entries (
    id         bigint NOT NULL DEFAULT nextval('entries_id_seq'),
    user_id    text NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('deposit', 'withdraw', 'send', 'claim', 'refund')),
    amount_fen bigint NOT NULL CHECK (amount_fen > 0),
    packet_id  bigint,
    at_ms      bigint NOT NULL
) PARTITION BY RANGE (at_ms);
ALTER SEQUENCE entries_id_seq OWNED BY entries.id;
-- Rows of days without a partition of their own: a write never fails for lack of one.
CREATE TABLE entries_default PARTITION OF entries DEFAULT;
-- A wallet's history, newest first; `received` filters the same range (one user's entries
-- are few). One index only: each index is a random B-tree insert per claim at commit.
CREATE INDEX entries_user_id ON entries (user_id, id);

-- Updated by most batches (opened counts): room on each page keeps those updates HOT.
CREATE TABLE packets (
    id              bigint PRIMARY KEY CHECK (id > 0),
    sender          text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('lucky', 'equal')),
    total_fen       bigint NOT NULL CHECK (total_fen > 0),
    count           bigint NOT NULL CHECK (count > 0),
    audience_anyone boolean NOT NULL,
    greeting        text NOT NULL,
    created_at_ms   bigint NOT NULL,
    expires_at_ms   bigint NOT NULL,
    -- The u64 seed bit-cast to i64.
    seed            bigint NOT NULL,
    status          text NOT NULL CHECK (status IN ('active', 'exhausted', 'expired')),
    opened_count    bigint NOT NULL CHECK (opened_count BETWEEN 0 AND count),
    opened_fen      bigint NOT NULL CHECK (opened_fen BETWEEN 0 AND total_fen),
    refunded_fen    bigint NOT NULL
                    CHECK (refunded_fen >= 0 AND opened_fen + refunded_fen <= total_fen),
    best_user       text,
    best_fen        bigint CHECK (best_fen > 0),
    CHECK ((best_user IS NULL) = (best_fen IS NULL))
) WITH (fillfactor = 80);
-- `sent` pages, newest first.
CREATE INDEX packets_sender_id ON packets (sender, id);
-- `sent` count and total over a year without touching the table.
CREATE INDEX packets_sender_created ON packets (sender, created_at_ms) INCLUDE (total_fen);
-- `load` reads only active packets: a small slice of a table that keeps every packet.
CREATE INDEX packets_active ON packets (id) WHERE status = 'active';
-- `best_luck_count`; only exhausted packets have a best luck.
CREATE INDEX packets_best ON packets (best_user, created_at_ms) WHERE best_user IS NOT NULL;

CREATE TABLE audience (
    packet_id bigint NOT NULL,
    user_id   text NOT NULL,
    PRIMARY KEY (packet_id, user_id)
);

-- Partitioned by the creation day of the packet, which its id carries in its high bits: a
-- packet's claims all live in one partition, found from the id alone. One share per user per
-- packet (DESIGN.md §2.5) is enforced here a second time.
CREATE TABLE claims (
    packet_id  bigint NOT NULL,
    idx        bigint NOT NULL CHECK (idx >= 0),
    user_id    text NOT NULL,
    amount_fen bigint NOT NULL CHECK (amount_fen > 0),
    at_ms      bigint NOT NULL,
    PRIMARY KEY (packet_id, idx),
    UNIQUE (packet_id, user_id)
) PARTITION BY RANGE (packet_id);
CREATE TABLE claims_default PARTITION OF claims DEFAULT;

CREATE TABLE outbox (
    target_set bigint NOT NULL CHECK (target_set >= 0),
    seq        bigint NOT NULL CHECK (seq > 0),
    user_id    text NOT NULL,
    amount_fen bigint NOT NULL CHECK (amount_fen > 0),
    packet_id  bigint NOT NULL,
    at_ms      bigint NOT NULL,
    PRIMARY KEY (target_set, seq)
);

-- The last seq ever issued per target: acknowledged outbox rows are deleted, their seqs are
-- never issued again.
CREATE TABLE outbox_seq (
    target_set bigint PRIMARY KEY CHECK (target_set >= 0),
    last_seq   bigint NOT NULL CHECK (last_seq > 0)
);

-- The last credit applied from each source set: the inbox that makes a credit apply once.
CREATE TABLE watermarks (
    source_set bigint PRIMARY KEY CHECK (source_set >= 0),
    seq        bigint NOT NULL CHECK (seq >= 0)
);

CREATE TABLE idempotency (
    user_id     text NOT NULL,
    request_id  text NOT NULL,
    -- The u64 fingerprint bit-cast to i64.
    fingerprint bigint NOT NULL,
    op          text NOT NULL CHECK (op IN ('deposit', 'withdraw', 'send')),
    result      bigint NOT NULL,
    at_ms       bigint NOT NULL,
    PRIMARY KEY (user_id, request_id)
);
-- Pruning past the retention window at `load`.
CREATE INDEX idempotency_at ON idempotency (at_ms);

CREATE TABLE totals (
    id              integer PRIMARY KEY CHECK (id = 0),
    deposits_fen    bigint NOT NULL CHECK (deposits_fen >= 0),
    withdrawals_fen bigint NOT NULL CHECK (withdrawals_fen >= 0)
);
INSERT INTO totals (id, deposits_fen, withdrawals_fen) VALUES (0, 0, 0);
";

/// Each packet records the amount rule that draws its lucky shares (`hongbao_core::AmountRule`):
/// packets sent before the column existed were drawn by rule 1 and keep it.
const V2: &str = "
ALTER TABLE packets ADD COLUMN amount_rule smallint NOT NULL DEFAULT 1 CHECK (amount_rule IN (1, 2));
";

/// Creates the set's schema when missing, brings it up to the newest version, and checks (or,
/// in a new schema, records) which set of how many it holds.
pub(super) fn migrate(conn: &mut PgConn, set: u32, sets: u32) -> Result<()> {
    let schema = schema_name(set);
    let mut tx = conn.client().transaction()?;
    // Released at commit or rollback; other sets take other keys and never wait.
    tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&MIGRATION_LOCK_CLASS, &(set as i32)])?;
    // The session's search_path names this schema already; it takes effect once it exists.
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS schema_version (
             version    integer PRIMARY KEY CHECK (version > 0),
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))?;
    let applied: i32 = tx.query_one("SELECT COALESCE(max(version), 0) FROM schema_version", &[])?.get(0);
    let known = MIGRATIONS.len();
    let applied = usize::try_from(applied)
        .map_err(|_| StoreError::Corrupt(format!("schema {schema} has version {applied}")))?;
    if applied > known {
        return Err(StoreError::Incompatible(format!(
            "schema {schema} has version {applied}, newer than the {known} this build knows: run a newer hongbao"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let version = i as i32 + 1;
        tx.batch_execute(sql).map_err(|e| {
            StoreError::Io(format!(
                "migration of {schema} to version {version} failed: {}",
                super::error_text(&e)
            ))
        })?;
        tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&version])?;
    }
    if applied < known {
        tracing::info!(schema = %schema, from = applied, to = known, "store schema migrated");
    }
    check_layout(&mut tx, &schema, set, sets)?;
    tx.commit()?;
    Ok(())
}

/// Users are hashed to sets, so a schema is only meaningful under the set count that made it.
fn check_layout(tx: &mut Transaction<'_>, schema: &str, set: u32, sets: u32) -> Result<()> {
    let mut stored = |key: &str| -> Result<Option<i64>> {
        let row = tx.query_opt("SELECT value FROM meta WHERE key = $1", &[&key])?;
        Ok(row.map(|r| r.get(0)))
    };
    match (stored("sets")?, stored("set")?) {
        (None, None) => {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('sets', $1), ('set', $2)",
                &[&i64::from(sets), &i64::from(set)],
            )?;
            Ok(())
        }
        (Some(stored_sets), Some(stored_set)) => {
            if stored_sets != i64::from(sets) {
                return Err(StoreError::Incompatible(format!(
                    "schema {schema} was made with {stored_sets} sets and cannot be opened with {sets}"
                )));
            }
            if stored_set != i64::from(set) {
                return Err(StoreError::Incompatible(format!(
                    "schema {schema} holds set {stored_set}, not set {set}"
                )));
            }
            Ok(())
        }
        _ => Err(StoreError::Corrupt(format!("schema {schema} has half of its set layout in meta"))),
    }
}

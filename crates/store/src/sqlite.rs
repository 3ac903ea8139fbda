//! The SQLite store: one database file per set, `set-{set}.sqlite` in the data dir, written
//! by that set's engine thread alone and read by queries through a small pool of connections.
//!
//! Every batch is one `BEGIN IMMEDIATE` transaction in WAL mode with `synchronous=FULL`, so a
//! commit that returned `Ok` survives `kill -9` and power loss. This module must never decide
//! anything about money, never write outside a transaction, never leave a failed transaction
//! open (after a failed commit the engine calls `load` again on the same object), never panic
//! on an I/O error, and never open a data dir made for another set count.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hongbao_core::ids::SETS_MAX;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags};
use scheduled_thread_pool::ScheduledThreadPool;

use crate::{Result, StoreError};

/// The packet columns in the order [`rows::packet_row`] decodes them. A macro, not a const,
/// so that `concat!` builds each query as a `&'static str` the statement cache can key on.
macro_rules! packet_columns {
    () => {
        "id, sender, kind, total_fen, count, audience_anyone, greeting, created_at_ms, \
         expires_at_ms, seed, status, opened_count, opened_fen, refunded_fen, best_user, best_fen, \
         amount_rule"
    };
}

mod read;
mod rows;
mod schema;
mod write;

pub use read::SqliteReader;
pub(crate) use read::{
    balance_in, best_luck_count_in, entries_in, packet_state_in, page_limit, received_in, sent_in, Folded,
};
pub use write::SqliteStore;

/// What the checkpoint thread is called.
pub const CHECKPOINT_THREAD: &str = "hongbao-checkpoint";

/// How long a connection waits for a lock before it gives up. In WAL mode readers never wait
/// for the writer; this covers the rare moments SQLite itself holds a lock (WAL recovery after
/// a crash, a checkpoint restarting the log) and a second process touching the file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Query connections per set. Queries run beside the engine threads on a 2-core machine; more
/// connections than cores only queue inside SQLite, and each one holds its own page cache.
const READ_CONNECTIONS_MAX: u32 = 4;

/// How long a query waits for a free read connection before it fails, so a flood of history
/// queries turns into errors instead of an unbounded queue of blocked threads.
const READ_WAIT_MAX: Duration = Duration::from_secs(5);

/// Prepared statements kept per connection: every statement the store and the reader use
/// (about twenty) fits, so a batch never re-parses SQL.
const STATEMENT_CACHE_CAPACITY: usize = 64;

/// Page cache of the write connection, in KiB. It holds the hot upper levels of the wallet,
/// packet and claim b-trees; a start-up `load` streams far more than this and needs no more.
const WRITE_CACHE_KIB: i64 = 32 * 1024;

/// Page cache of each read connection, in KiB: queries touch a few pages each.
const READ_CACHE_KIB: i64 = 8 * 1024;

/// Threads r2d2 uses to open and reap pooled connections, shared by every set's pool: by
/// default each pool starts three of its own, which is thousands at a large set count.
const POOL_HELPER_THREADS: usize = 1;

/// How often the checkpoint thread copies the WAL into the database file. A checkpoint copies
/// each page the WAL holds once, however many folds rewrote it since the last: at 1 s instead
/// of 100 ms the checkpoints' CPU per claim in the HTTP festival fell from 1.1–1.4 µs to
/// 0.3 µs (3 to 0.5 µs at half rate), with the claim p99 unchanged (BENCHMARKS.md,
/// 2026-12-03, third session). The WAL it leaves behind is a second of folds, tens of MB.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// WAL pages (4 KiB) after which the writer checkpoints by itself: 64 MiB bounds the WAL if the
/// checkpoint thread falls behind, above what the folds write in one round.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 16_384;

/// Opens (creating when missing) the store of set `set` of `sets` under `dir`, applies pending
/// migrations, and returns its write side and its read side.
///
/// A file made for another set count or another set index is refused with
/// [`StoreError::Incompatible`]: users are hashed to sets, so reading it would put wallets in
/// the wrong place.
pub fn open_sqlite(dir: &Path, set: u32, sets: u32) -> Result<(SqliteStore, SqliteReader)> {
    open_sqlite_with(dir, set, sets, Leftovers::FoldAndRemove)
}

/// What opening does with a journal a run with the journal on left beside the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leftovers {
    /// Fold it and remove it: this run commits to SQLite directly.
    FoldAndRemove,
    /// Fold it and keep a segment file as the spare: this run journals.
    FoldKeepingSpare,
}

pub(crate) fn open_sqlite_with(
    dir: &Path,
    set: u32,
    sets: u32,
    leftovers: Leftovers,
) -> Result<(SqliteStore, SqliteReader)> {
    if sets == 0 || sets > SETS_MAX || set >= sets {
        return Err(StoreError::Incompatible(format!(
            "set {set} of {sets} sets is out of range (1 to {SETS_MAX} sets)"
        )));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| StoreError::Io(format!("cannot create data dir {}: {e}", dir.display())))?;
    let path = file_path(dir, set);

    let mut conn = Connection::open(&path)
        .map_err(|e| StoreError::Io(format!("cannot open {}: {e}", path.display())))?;
    configure_writer(&conn)?;
    schema::migrate(&mut conn, &path, set, sets)?;

    let reader = SqliteReader::new(open_read_pool(&path, READ_CONNECTIONS_MAX)?);
    let checkpointer = Checkpointer::start(&path)?;
    let mut store = SqliteStore::new(conn, set, checkpointer);
    // A journal left by a run with the journal on: what it holds is acknowledged, so it is
    // folded in before anything reads the file, whether or not this run journals.
    crate::journal::fold_leftovers(
        &crate::journal::journal_dir(dir, set),
        &mut store,
        leftovers == Leftovers::FoldKeepingSpare,
    )?;
    Ok((store, reader))
}

fn file_path(dir: &Path, set: u32) -> PathBuf {
    dir.join(format!("set-{set}.sqlite"))
}

/// A reader of set `set`'s file with one connection of its own, for the set's thread: its
/// reads never wait for a connection a query holds.
pub(crate) fn own_reader(dir: &Path, set: u32) -> Result<SqliteReader> {
    Ok(SqliteReader::new(open_read_pool(&file_path(dir, set), 1)?))
}

/// Copies the WAL back into the database file from a thread of its own, so the engine's
/// commits only ever append to the WAL. The writer checkpoints by itself only if the WAL
/// grows past [`WAL_AUTOCHECKPOINT_PAGES`] (the checkpointer fell behind).
#[derive(Debug)]
pub(crate) struct Checkpointer {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Checkpointer> {
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Io(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name(CHECKPOINT_THREAD.into())
            .spawn(move || {
                crate::background::lower_priority("checkpoint");
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(CHECKPOINT_EVERY);
                    // PASSIVE never waits for readers or the writer; a busy or failed pass is
                    // simply tried again on the next round.
                    let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                }
            })
            .map_err(|e| StoreError::Io(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Checkpointer { stop })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn configure_writer(conn: &Connection) -> Result<()> {
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Io(format!("cannot switch to WAL mode (got {mode})")));
    }
    // FULL fsyncs the WAL at every commit: DESIGN.md §2.6, acknowledged means durable.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -WRITE_CACHE_KIB)?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    Ok(())
}

fn open_read_pool(path: &Path, connections: u32) -> Result<r2d2::Pool<SqliteConnectionManager>> {
    // Read-write flags with `query_only` rather than SQLITE_OPEN_READ_ONLY: a read-only
    // connection cannot create the WAL index (-shm) and fails to open whenever the writer has
    // just closed and removed it, while `query_only` refuses every write all the same.
    // No CREATE flag: the writer made the file, and a missing one is an error, not a new store.
    let flags =
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let manager = SqliteConnectionManager::file(path).with_flags(flags).with_init(|c| {
        c.busy_timeout(BUSY_TIMEOUT)?;
        c.pragma_update(None, "query_only", true)?;
        c.pragma_update(None, "cache_size", -READ_CACHE_KIB)?;
        c.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        Ok(())
    });
    r2d2::Pool::builder()
        .max_size(connections)
        .min_idle(Some(1))
        .connection_timeout(READ_WAIT_MAX)
        // A local file does not go stale like a network connection: skip the test query.
        .test_on_check_out(false)
        .thread_pool(pool_helper())
        .build(manager)
        .map_err(|e| StoreError::Io(format!("cannot open read connections to {}: {e}", path.display())))
}

fn pool_helper() -> Arc<ScheduledThreadPool> {
    static HELPER: OnceLock<Arc<ScheduledThreadPool>> = OnceLock::new();
    HELPER
        .get_or_init(|| {
            let pool = ScheduledThreadPool::builder()
                .num_threads(POOL_HELPER_THREADS)
                .thread_name_pattern("hongbao-sqlite-pool-{}")
                .build();
            Arc::new(pool)
        })
        .clone()
}

/// Values that cannot be what was written are corrupt data; everything else SQLite reports
/// (full disk, I/O error, constraint broken by a write) means the store failed at its job.
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        match e {
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::InvalidColumnType(..) => StoreError::Corrupt(e.to_string()),
            e => StoreError::Io(e.to_string()),
        }
    }
}

impl From<r2d2::Error> for StoreError {
    fn from(e: r2d2::Error) -> StoreError {
        StoreError::Io(format!("no read connection: {e}"))
    }
}

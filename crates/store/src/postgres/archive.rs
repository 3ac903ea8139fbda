//! Hot/cold separation: whole days of `claims` and `entries` leave the database for CSV files
//! (`hongbao archive --before DATE`), and each day that left is recorded in the set's
//! `archived_days` table, so queries can say that history before it is in the archive.
//!
//! A day partition of a set is archived when the whole day lies before the cut, when the sets
//! no longer write it (it is older than the window of days the writer keeps partitions for,
//! see `partitions`), and, for `claims`, when no packet created that day is still active: a
//! set reloads the claims of its active packets on start, so those must never leave. Each day
//! goes through three steps, and a crash after any of them loses nothing:
//!
//! 1. detach the partition and rename it `archiving_{partition}`, in one short transaction;
//! 2. export it with `COPY … TO STDOUT (FORMAT csv, HEADER)` to `set-{n}/{table}-{date}.csv`
//!    under the output dir, written under a temporary name, fsynced, then renamed;
//! 3. record the day in `archived_days` and drop the detached table, in one transaction.
//!
//! A run first finishes whatever `archiving_` tables a crashed run left behind.
//!
//! Why not `DETACH PARTITION … CONCURRENTLY`: PostgreSQL refuses it on a table that has a
//! DEFAULT partition, and both tables have one, so that no write ever fails for lack of a
//! partition. A plain DETACH holds an ACCESS EXCLUSIVE lock on the parent table for a catalog
//! change only (no rows are read or moved), but to get it, it waits for the transactions using
//! the table, and commits queue behind it meanwhile. `lock_timeout` bounds that wait: a commit
//! is held up by at most [`DETACH_LOCK_WAIT_MAX_MS`] per attempt, and a detach that cannot get
//! the lock gives up, pauses and tries again. Exporting and dropping touch only the detached
//! table, which no query or commit uses any more.
//!
//! Rows in a DEFAULT partition are never archived: they are counted in the report and stay.
//! This module must never archive a day the sets may still write, never drop a table whose
//! rows are not in a file on disk, and never wait for a hot table's lock for longer than
//! [`DETACH_LOCK_WAIT_MAX_MS`] at a time.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hongbao_core::Millis;
use postgres::error::SqlState;
use postgres::{Client, Config, NoTls};

use super::partitions::{self, civil_from_days, day_of_ms, Table, DAYS_BEHIND, DAY_MS};
use super::replica::{check_layout, Layout};
use super::{check_set, client_config, error_text, on_plain_thread, schema_name};
use crate::{Result, StoreError};

/// One day of one table of one set that left the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedDay {
    pub set: u32,
    /// `claims` (by the creation day of their packet) or `entries` (by their own day).
    pub table: String,
    /// Days since 1970-01-01, UTC.
    pub day: i64,
    /// The same day as `YYYY-MM-DD`.
    pub date: String,
    /// Where the rows were written, as the archiving process saw the path.
    pub file: String,
    pub rows: u64,
}

/// A day before the cut that stays in the database, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedDay {
    pub set: u32,
    pub table: String,
    pub day: i64,
    pub date: String,
    pub reason: String,
}

/// What an archive run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveReport {
    pub archived: Vec<ArchivedDay>,
    pub skipped: Vec<SkippedDay>,
    /// Rows of days before the cut that sit in the DEFAULT partitions: they stay live.
    pub default_rows_kept: u64,
    /// The longest one try to detach held up its table (waiting for the lock, in vain or
    /// not, then changing the catalog), in ms: about the most a commit waited behind this run.
    pub detach_ms_max: u64,
}

/// The longest one detach waits for its table's lock, while commits queue behind it: a
/// commit normally takes a few ms, so this is tens of batches' worth, and a history query
/// holding the table longer makes the detach give up instead of stalling the sets.
pub const DETACH_LOCK_WAIT_MAX_MS: u64 = 200;

/// Tries per day before the day is skipped for this run.
const DETACH_ATTEMPTS: u32 = 20;

/// Pause between tries: the sets catch up on what queued behind the last one.
const DETACH_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Days [`make_postgres_day_partitions`] makes in one call: ten years.
const MAKE_DAYS_MAX: i64 = 3_660;

/// First key of the advisory lock an archive of a set holds ("Arcv"); the second is the set.
/// Two runs at once would race on the same detached tables.
const ARCHIVE_LOCK_CLASS: i32 = 0x4172_6376;

/// Detached tables on their way to a file are renamed with this prefix: a crashed run's are
/// found by it, and the day's partition name is free again.
const ARCHIVING_PREFIX: &str = "archiving_";

/// Made by the first archive of a set, not by a migration: a set that never archives has no
/// use for it, and readers treat a missing table as nothing archived.
const CREATE_ARCHIVED_DAYS: &str = "CREATE TABLE IF NOT EXISTS archived_days (
    table_name  text NOT NULL CHECK (table_name IN ('claims', 'entries')),
    day         date NOT NULL,
    file        text NOT NULL,
    rows        bigint NOT NULL CHECK (rows >= 0),
    archived_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, day, file)
)";

/// Archives, in every set of the database at `url` (made with `sets` sets), each day
/// partition of `claims` and `entries` that ends at or before `before_ms` (pass midnight UTC
/// of the first day to keep), into CSV files under `out_dir`. See the module doc for which
/// days stay and why, and for what the hot path sees meanwhile. Safe to run while the sets
/// serve, and again after a crash; safe to call from inside a tokio runtime.
pub fn archive_postgres(url: &str, sets: u32, before_ms: Millis, out_dir: &Path) -> Result<ArchiveReport> {
    check_set(0, sets)?;
    let config = client_config(url)?;
    on_plain_thread("archiving", || {
        let mut client = connect(&config)?;
        let mut report = ArchiveReport::default();
        for set in 0..sets {
            archive_set(&mut client, set, sets, before_ms, out_dir, &mut report)?;
        }
        Ok(report)
    })
}

/// Makes the day partitions of `claims` and `entries` for every day in `days` (days since
/// 1970-01-01, UTC) in every set, moving rows of those days out of the DEFAULT partitions: for
/// loading or backfilling old days, and for tests. The sets make the days around today
/// themselves. At most ten years of days per call.
pub fn make_postgres_day_partitions(url: &str, sets: u32, days: RangeInclusive<i64>) -> Result<()> {
    check_set(0, sets)?;
    let count = days.end().saturating_sub(*days.start()).saturating_add(1);
    if count > MAKE_DAYS_MAX {
        return Err(StoreError::Io(format!("{count} days asked, at most {MAKE_DAYS_MAX} at a time")));
    }
    let config = client_config(url)?;
    on_plain_thread("making day partitions", || {
        let mut client = connect(&config)?;
        for set in 0..sets {
            use_set(&mut client, set, sets)?;
            for day in days.clone() {
                for table in Table::ALL {
                    partitions::make_day(&mut client, table, day)?;
                }
            }
        }
        Ok(())
    })
}

/// `YYYY-MM-DD` of a day counted from 1970-01-01.
pub(super) fn date_text(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

fn connect(config: &Config) -> Result<Client> {
    let mut config = config.clone();
    config.application_name("hongbao-archive");
    config
        .connect(NoTls)
        .map_err(|e| StoreError::Io(format!("cannot connect to PostgreSQL: {}", error_text(&e))))
}

/// Points unqualified names at the set's schema, after checking it is the set's.
fn use_set(client: &mut Client, set: u32, sets: u32) -> Result<()> {
    match check_layout(client, set, sets)? {
        Layout::Ready => {}
        Layout::Missing(what) => {
            return Err(StoreError::Incompatible(format!("{what}: is this the database of {sets} sets?")))
        }
    }
    client.batch_execute(&format!("SET search_path TO {}", schema_name(set)))?;
    Ok(())
}

fn archive_set(
    client: &mut Client,
    set: u32,
    sets: u32,
    before_ms: Millis,
    out_dir: &Path,
    report: &mut ArchiveReport,
) -> Result<()> {
    use_set(client, set, sets)?;
    if !super::try_set_lock(client, ARCHIVE_LOCK_CLASS, set)? {
        return Err(StoreError::Io(format!("another archive of set {set} is running")));
    }
    let done = archive_set_locked(client, set, before_ms, out_dir, report);
    // A lost connection released the lock with the session.
    let _ = client.execute("SELECT pg_advisory_unlock($1, $2)", &[&ARCHIVE_LOCK_CLASS, &(set as i32)]);
    done
}

fn archive_set_locked(
    client: &mut Client,
    set: u32,
    before_ms: Millis,
    out_dir: &Path,
    report: &mut ArchiveReport,
) -> Result<()> {
    client.batch_execute(CREATE_ARCHIVED_DAYS)?;
    let schema = schema_name(set);

    // What a crashed run detached but did not finish.
    let orphans = client.query(
        "SELECT relname::text FROM pg_class WHERE relnamespace = $1::text::regnamespace AND relkind = 'r' \
         AND starts_with(relname::text, $2) ORDER BY relname",
        &[&schema, &ARCHIVING_PREFIX],
    )?;
    for row in orphans {
        let name: String = row.try_get(0)?;
        let partition = &name[ARCHIVING_PREFIX.len()..];
        let found = Table::ALL.into_iter().find_map(|t| t.day_of(partition).map(|day| (t, day)));
        let Some((table, day)) = found else { continue };
        tracing::warn!(set, table = %name, "finishing the archive of a day a crashed run detached");
        report.archived.push(finish(client, set, table, day, out_dir)?);
    }

    // Only whole days before the cut, and none the writer may still make or fill.
    let cut_day = day_of_ms(before_ms);
    let hot_from = partitions::today() - DAYS_BEHIND;
    for table in Table::ALL {
        let mut days: Vec<i64> = client
            .query(
                "SELECT c.relname::text FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid \
                 WHERE i.inhparent = to_regclass($1)",
                &[&table.name()],
            )?
            .iter()
            .filter_map(|r| r.try_get::<_, String>(0).ok())
            .filter_map(|name| table.day_of(&name))
            .filter(|&day| day < cut_day)
            .collect();
        days.sort_unstable();
        for day in days {
            let skip = |reason: String| SkippedDay {
                set,
                table: table.name().to_owned(),
                day,
                date: date_text(day),
                reason,
            };
            if day >= hot_from {
                report.skipped.push(skip("the sets may still write this day".to_owned()));
                continue;
            }
            if table == Table::Claims {
                let active = active_packets(client, day)?;
                if active > 0 {
                    report.skipped.push(skip(format!("{active} packets created this day are still active")));
                    continue;
                }
            }
            if !detach(client, set, table, day, &mut report.detach_ms_max)? {
                report.skipped.push(skip(format!(
                    "the table's lock was busy {DETACH_ATTEMPTS} times for {DETACH_LOCK_WAIT_MAX_MS} ms"
                )));
                continue;
            }
            report.archived.push(finish(client, set, table, day, out_dir)?);
        }
    }
    report.default_rows_kept += default_rows_before(client, cut_day)?;
    Ok(())
}

/// Packets created on `day` (by their id) that are not closed yet.
fn active_packets(client: &mut Client, day: i64) -> Result<i64> {
    let Some((from, to)) = Table::Claims.bounds(day) else { return Ok(0) };
    Ok(client
        .query_one(
            "SELECT count(*) FROM packets WHERE id >= $1 AND id < $2 AND status = 'active'",
            &[&from, &to],
        )?
        .try_get(0)?)
}

/// Rows before `cut_day` in the DEFAULT partitions.
fn default_rows_before(client: &mut Client, cut_day: i64) -> Result<u64> {
    let entries: i64 = client
        .query_one("SELECT count(*) FROM entries_default WHERE at_ms < $1", &[&(cut_day * DAY_MS)])?
        .try_get(0)?;
    let claims: i64 = match Table::Claims.bounds(cut_day) {
        Some((first_id, _)) => client
            .query_one("SELECT count(*) FROM claims_default WHERE packet_id < $1", &[&first_id])?
            .try_get(0)?,
        None => 0,
    };
    Ok((entries + claims).max(0) as u64)
}

/// Step 1: detaches the day's partition and renames it, under a bounded lock wait, retrying
/// while the lock is busy; false when every try found it busy. Raises `slowest_ms` to the
/// longest try.
fn detach(client: &mut Client, set: u32, table: Table, day: i64, slowest_ms: &mut u64) -> Result<bool> {
    let (name, partition) = (table.name(), table.partition(day));
    // Only names made here from a fixed table name and a date: nothing to quote.
    let sql = format!(
        "SET LOCAL lock_timeout = {DETACH_LOCK_WAIT_MAX_MS};
         ALTER TABLE {name} DETACH PARTITION {partition};
         ALTER TABLE {partition} RENAME TO {ARCHIVING_PREFIX}{partition};"
    );
    for attempt in 1..=DETACH_ATTEMPTS {
        let started = Instant::now();
        let mut tx = client.transaction()?;
        let done = tx.batch_execute(&sql).and_then(|()| tx.commit());
        *slowest_ms = (*slowest_ms).max(started.elapsed().as_millis() as u64);
        match done {
            Ok(()) => return Ok(true),
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                tracing::info!(set, partition = %partition, attempt, "table busy; detaching again shortly");
                std::thread::sleep(DETACH_RETRY_PAUSE);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(false)
}

/// Steps 2 and 3: the detached day to a file, then recorded and dropped.
fn finish(client: &mut Client, set: u32, table: Table, day: i64, out_dir: &Path) -> Result<ArchivedDay> {
    let detached = format!("{ARCHIVING_PREFIX}{}", table.partition(day));
    let date = date_text(day);
    let day_i32 = i32::try_from(day).map_err(|_| StoreError::Corrupt(format!("day {day} out of range")))?;
    let dir = out_dir.join(format!("set-{set}"));
    std::fs::create_dir_all(&dir).map_err(|e| io_error("create", &dir, e))?;
    let dir = std::fs::canonicalize(&dir).map_err(|e| io_error("resolve", &dir, e))?;

    // A day archived before (made again and filled later) gets a file of its own; a crashed
    // run's file for this day was never recorded, so it is rewritten under the same name.
    let earlier: i64 = client
        .query_one(
            "SELECT count(*) FROM archived_days WHERE table_name = $1 AND day = DATE '1970-01-01' + $2::int4",
            &[&table.name(), &day_i32],
        )?
        .try_get(0)?;
    let file = match earlier {
        0 => dir.join(format!("{}-{date}.csv", table.name())),
        n => dir.join(format!("{}-{date}-{}.csv", table.name(), n + 1)),
    };

    let rows: i64 = client.query_one(&format!("SELECT count(*) FROM {detached}"), &[])?.try_get(0)?;
    let order = match table {
        Table::Claims => "packet_id, idx",
        Table::Entries => "id",
    };
    let lines = export(
        client,
        &format!("COPY (SELECT * FROM {detached} ORDER BY {order}) TO STDOUT (FORMAT csv, HEADER)"),
        &file,
    )?;
    // No value in these tables can hold a line break (ids, numbers, user ids of [A-Za-z0-9_.-]),
    // so the file has one line per row after the header.
    if lines != rows as u64 + 1 {
        return Err(StoreError::Io(format!(
            "{} holds {lines} lines for {rows} rows of {detached}: kept the table",
            file.display()
        )));
    }

    let file_text = file.display().to_string();
    let mut tx = client.transaction()?;
    tx.execute(
        "INSERT INTO archived_days (table_name, day, file, rows) VALUES ($1, DATE '1970-01-01' + $2::int4, $3, $4)",
        &[&table.name(), &day_i32, &file_text, &rows],
    )?;
    tx.batch_execute(&format!("DROP TABLE {detached}"))?;
    tx.commit()?;
    tracing::info!(set, table = table.name(), date = %date, rows, file = %file_text, "day archived");
    Ok(ArchivedDay { set, table: table.name().to_owned(), day, date, file: file_text, rows: rows as u64 })
}

/// Runs a `COPY … TO STDOUT` into `file`, durably: a temporary file, fsynced, renamed over
/// `file`, and the directory fsynced. Returns the lines written.
fn export(client: &mut Client, copy: &str, file: &Path) -> Result<u64> {
    let partial: PathBuf = file.with_extension("csv.partial");
    let out = File::create(&partial).map_err(|e| io_error("create", &partial, e))?;
    let mut out = LineCount { inner: BufWriter::new(out), lines: 0 };
    {
        let mut reader = client.copy_out(copy)?;
        std::io::copy(&mut reader, &mut out).map_err(|e| io_error("write", &partial, e))?;
    }
    let lines = out.lines;
    let out = out.inner.into_inner().map_err(|e| io_error("write", &partial, e.into_error()))?;
    out.sync_all().map_err(|e| io_error("fsync", &partial, e))?;
    drop(out);
    std::fs::rename(&partial, file).map_err(|e| io_error("rename", &partial, e))?;
    if let Some(dir) = file.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error("fsync", dir, e))?;
    }
    Ok(lines)
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("cannot {what} {}: {e}", path.display()))
}

/// Counts line breaks on their way to the file.
struct LineCount<W> {
    inner: W,
    lines: u64,
}

impl<W: Write> Write for LineCount<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

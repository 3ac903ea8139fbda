//! The read side: history and detail queries on pooled `query_only` connections.
//!
//! It never writes and never goes through the engine. A query that returns totals with a
//! page reads both in one transaction, so the totals and the items agree.

use std::ops::Deref;

use hongbao_core::{Claim, Millis, PacketId, PacketStatus, UserId};
use r2d2::{Pool, PooledConnection};
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::Connection;

use super::rows::{self, to_u64, Columns, Users};
use super::write::{read_group, read_packet_row};
use crate::{EntryRow, PacketRow, Paging, Reader, ReceivedPage, Result, SentPage, Span};

/// Most rows one page returns, whatever the caller asks: a query never materializes more
/// than this, so one client cannot make a read connection stream a whole history.
const PAGE_ROWS_MAX: u32 = 1_000;

// The queries. A page's size is bound as `LIMIT +?N`, not `LIMIT ?N`: SQLite (3.53 here) plans
// with the value of a bare LIMIT parameter, so it marks the statement to be compiled again
// whenever that parameter is bound, which is every time a cached statement runs. The unary
// plus hides the value from the planner and leaves the plan as it was (`EXPLAIN QUERY PLAN`);
// a received page cost 7.1 µs instead of 2.3 µs on a small file, and in the HTTP festival
// compiling again was a quarter of the query threads' CPU. `a_cached_query_is_not_compiled_again`
// holds every query here to it.
const SELECT_BALANCE: &str = "SELECT balance_fen FROM wallets WHERE user = ?1";
const SELECT_ENTRIES: &str = "SELECT id, kind, amount_fen, packet_id, at_ms FROM entries \
     WHERE user = ?1 AND id < ?2 ORDER BY id DESC LIMIT +?3";
const SELECT_CLAIMS: &str = "SELECT idx, user, amount_fen, at_ms FROM claims \
     WHERE packet_id = ?1 AND idx > ?2 ORDER BY idx LIMIT +?3";
const SELECT_SENT_TOTALS: &str = "SELECT COUNT(*), COALESCE(SUM(total_fen), 0) FROM packets \
     WHERE sender = ?1 AND created_at_ms >= ?2 AND created_at_ms < ?3";
const SELECT_SENT_PAGE: &str = concat!(
    "SELECT ",
    packet_columns!(),
    " FROM packets WHERE sender = ?1 AND created_at_ms >= ?2 AND created_at_ms < ?3 \
     AND id < ?4 ORDER BY id DESC LIMIT +?5"
);
const SELECT_RECEIVED_TOTALS: &str = "SELECT COUNT(*), COALESCE(SUM(amount_fen), 0) FROM entries \
     WHERE user = ?1 AND kind = 'claim' AND at_ms >= ?2 AND at_ms < ?3";
const SELECT_RECEIVED_PAGE: &str = "SELECT id, kind, amount_fen, packet_id, at_ms FROM entries \
     WHERE user = ?1 AND kind = 'claim' AND at_ms >= ?2 AND at_ms < ?3 AND id < ?4 \
     ORDER BY id DESC LIMIT +?5";
const SELECT_CLAIM_OF: &str =
    "SELECT idx, user, amount_fen, at_ms FROM claims WHERE packet_id = ?1 AND user = ?2";
const SELECT_BEST_LUCK_COUNT: &str = "SELECT COUNT(*) FROM packets WHERE best_user = ?1 \
     AND status = 'exhausted' AND created_at_ms >= ?2 AND created_at_ms < ?3";
const SELECT_PACKET_STATE: &str = "SELECT status, created_at_ms FROM packets WHERE id = ?1";
const SELECT_FOLDED: &str = "SELECT (SELECT value FROM meta WHERE key = 'journal_seq'), \
     (SELECT value FROM meta WHERE key = 'last_entry_id')";

/// The read side of one set's SQLite file: cheap to clone, `Send + Sync`.
#[derive(Debug, Clone)]
pub struct SqliteReader {
    pool: Pool<SqliteConnectionManager>,
}

impl SqliteReader {
    pub(super) fn new(pool: Pool<SqliteConnectionManager>) -> SqliteReader {
        SqliteReader { pool }
    }

    fn conn(&self) -> Result<PooledConnection<SqliteConnectionManager>> {
        Ok(self.pool.get()?)
    }
}

/// A read transaction whose `BEGIN` and `COMMIT` run from the statement cache. rusqlite's
/// `Transaction` runs them with `execute_batch`, which compiles each one again: two compiles
/// a transaction, and a received page takes three (its set's page, and each set's best-luck
/// count). In the HTTP festival that was 7 % of the query threads' samples (BENCHMARKS.md,
/// thirtieth session). Rolled back when dropped uncommitted, as on an error.
struct ReadTx<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> ReadTx<'c> {
    fn begin(conn: &'c Connection) -> Result<ReadTx<'c>> {
        conn.prepare_cached("BEGIN")?.execute([])?;
        Ok(ReadTx { conn, open: true })
    }

    fn commit(mut self) -> Result<()> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        self.open = false;
        Ok(())
    }
}

impl Deref for ReadTx<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for ReadTx<'_> {
    fn drop(&mut self) {
        if self.open {
            // A read transaction has nothing to undo: this only ends it, so the pooled
            // connection's next user starts its own snapshot. It fails only if none is open.
            let _ = self.conn.prepare_cached("ROLLBACK").and_then(|mut s| s.execute([]));
        }
    }
}

pub(crate) fn page_limit(limit: u32) -> u32 {
    limit.min(PAGE_ROWS_MAX)
}

/// An exclusive "before" cursor; none means from the newest.
fn before_or_newest(before: Option<i64>) -> i64 {
    before.unwrap_or(i64::MAX)
}

impl Reader for SqliteReader {
    fn balance(&self, user: &UserId) -> Result<Option<i64>> {
        balance_in(&*self.conn()?, user)
    }

    fn entries(&self, user: &UserId, before_id: Option<i64>, limit: u32) -> Result<Vec<EntryRow>> {
        entries_in(&*self.conn()?, user, before_id, limit)
    }

    fn packet(&self, id: PacketId) -> Result<Option<PacketRow>> {
        self.in_read_tx(|tx| read_packet_row(tx, id, &mut Users::parsing()))
    }

    fn claims(&self, id: PacketId, after_index: Option<u32>, limit: u32) -> Result<Vec<Claim>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(SELECT_CLAIMS)?;
        let after = after_index.map_or(-1, i64::from);
        let mut q = stmt.query((id.as_i64(), after, page_limit(limit)))?;
        let mut users = Users::parsing();
        let mut out = Vec::new();
        while let Some(r) = q.next()? {
            out.push(rows::claim(r, 0, &mut users)?);
        }
        Ok(out)
    }

    fn sent(&self, user: &UserId, span: Span, page: Paging<PacketId>) -> Result<SentPage> {
        self.in_read_tx(|tx| sent_in(tx, user, span, page))
    }

    fn received(&self, user: &UserId, span: Span, page: Paging<i64>) -> Result<ReceivedPage> {
        self.in_read_tx(|tx| received_in(tx, user, span, page))
    }

    /// One lookup on the (packet, user) unique index instead of paging through the claims.
    fn claim_of(&self, id: PacketId, user: &UserId) -> Result<Option<Claim>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(SELECT_CLAIM_OF)?;
        let mut q = stmt.query((id.as_i64(), user.as_str()))?;
        match q.next()? {
            Some(r) => Ok(Some(rows::claim(r, 0, &mut Users::parsing())?)),
            None => Ok(None),
        }
    }

    fn best_luck_count(&self, user: &UserId, span: Span) -> Result<u64> {
        best_luck_count_in(&*self.conn()?, user, span)
    }
}

/// Where a read transaction's snapshot stands in the journal that feeds the file: the last
/// record folded into it, and the last entry id issued (the next entries get the ids after it,
/// in the order the journal holds them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Folded {
    pub seq: u64,
    pub last_entry_id: i64,
}

impl SqliteReader {
    /// Runs `f` in one read transaction on a pooled connection: what it reads is of one state
    /// of the file.
    fn in_read_tx<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.conn()?;
        let tx = ReadTx::begin(&conn)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Runs `f` in one read transaction, with where its snapshot stands in the journal: what
    /// `f` reads, and `Folded`, are of one state of the file.
    pub(crate) fn in_snapshot<T>(&self, f: impl FnOnce(&Connection, Folded) -> Result<T>) -> Result<T> {
        self.in_read_tx(|tx| {
            // The first read fixes the snapshot the rest of the transaction sees.
            let (seq, last_entry_id): (Option<i64>, Option<i64>) =
                tx.prepare_cached(SELECT_FOLDED)?.query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            let folded = Folded {
                seq: to_u64(seq.unwrap_or(0), "journal_seq")?,
                last_entry_id: last_entry_id.unwrap_or(0),
            };
            f(tx, folded)
        })
    }
}

pub(crate) fn balance_in(conn: &Connection, user: &UserId) -> Result<Option<i64>> {
    let mut stmt = conn.prepare_cached(SELECT_BALANCE)?;
    let mut q = stmt.query([user.as_str()])?;
    match q.next()? {
        Some(r) => Ok(Some(rows::balance(r.get(0)?, user)?)),
        None => Ok(None),
    }
}

pub(crate) fn entries_in(
    conn: &Connection,
    user: &UserId,
    before_id: Option<i64>,
    limit: u32,
) -> Result<Vec<EntryRow>> {
    let mut stmt = conn.prepare_cached(SELECT_ENTRIES)?;
    let mut q = stmt.query((user.as_str(), before_or_newest(before_id), page_limit(limit)))?;
    let mut out = Vec::new();
    while let Some(r) = q.next()? {
        out.push(rows::entry_row(r)?);
    }
    Ok(out)
}

/// A page's totals over the year, `COUNT(*)` and a sum of fen, from `sql` bound to the user and
/// the span.
fn totals_in(conn: &Connection, sql: &str, user: &UserId, span: Span, what: &str) -> Result<(u64, i64)> {
    let (count, total_fen): (i64, i64) = conn
        .prepare_cached(sql)?
        .query_row((user.as_str(), span.from_ms, span.to_ms), |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok((to_u64(count, what)?, total_fen))
}

/// `Reader::sent`, in the caller's transaction (the totals and the page must agree).
pub(crate) fn sent_in(
    conn: &Connection,
    user: &UserId,
    span: Span,
    page: Paging<PacketId>,
) -> Result<SentPage> {
    let (count, total_fen) = totals_in(conn, SELECT_SENT_TOTALS, user, span, "sent count")?;
    let mut users = Users::parsing();
    let mut items = Vec::new();
    {
        let mut stmt = conn.prepare_cached(SELECT_SENT_PAGE)?;
        let before = before_or_newest(page.before.map(PacketId::as_i64));
        let mut q = stmt.query((user.as_str(), span.from_ms, span.to_ms, before, page_limit(page.limit)))?;
        while let Some(r) = q.next()? {
            items.push(rows::packet_row(r, &mut users)?);
        }
    }
    for row in &mut items {
        let group = read_group(conn, row, &mut users)?;
        rows::set_audience(row, group)?;
    }
    Ok(SentPage { count, total_fen, items })
}

/// `Reader::received`, in the caller's transaction (the totals and the page must agree).
pub(crate) fn received_in(
    conn: &Connection,
    user: &UserId,
    span: Span,
    page: Paging<i64>,
) -> Result<ReceivedPage> {
    let (count, total_fen) = totals_in(conn, SELECT_RECEIVED_TOTALS, user, span, "received count")?;
    let mut items = Vec::new();
    {
        let mut stmt = conn.prepare_cached(SELECT_RECEIVED_PAGE)?;
        let (before, limit) = (before_or_newest(page.before), page_limit(page.limit));
        let mut q = stmt.query((user.as_str(), span.from_ms, span.to_ms, before, limit))?;
        while let Some(r) = q.next()? {
            items.push(rows::entry_row(r)?);
        }
    }
    Ok(ReceivedPage { count, total_fen, items })
}

pub(crate) fn best_luck_count_in(conn: &Connection, user: &UserId, span: Span) -> Result<u64> {
    let count: i64 = conn
        .prepare_cached(SELECT_BEST_LUCK_COUNT)?
        .query_row((user.as_str(), span.from_ms, span.to_ms), |r| r.get(0))?;
    to_u64(count, "best luck count")
}

/// A packet's status and creation time, if the file holds it.
pub(crate) fn packet_state_in(conn: &Connection, id: PacketId) -> Result<Option<(PacketStatus, Millis)>> {
    let mut stmt = conn.prepare_cached(SELECT_PACKET_STATE)?;
    let mut q = stmt.query([id.as_i64()])?;
    let Some(r) = q.next()? else { return Ok(None) };
    let status_s = r.text(0)?;
    let status = PacketStatus::parse(status_s)
        .ok_or_else(|| rows::corrupt(format!("packet {id} has status {status_s:?}")))?;
    Ok(Some((status, r.get(1)?)))
}

#[cfg(test)]
mod tests {
    use rusqlite::{Connection, StatementStatus};

    use super::*;
    use crate::sqlite::schema::migrate;
    use crate::sqlite::write::SELECT_PACKET;

    /// A read transaction ends when it is committed, and when it is dropped uncommitted (an
    /// error on the way): the pooled connection's next user starts a snapshot of its own.
    #[test]
    fn a_read_transaction_ends_committed_or_dropped() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, std::path::Path::new("mem"), 0, 1).unwrap();
        for _ in 0..2 {
            let tx = ReadTx::begin(&conn).unwrap();
            assert!(!conn.is_autocommit());
            tx.commit().unwrap();
            assert!(conn.is_autocommit());
            let tx = ReadTx::begin(&conn).unwrap();
            assert!(!conn.is_autocommit());
            drop(tx);
            assert!(conn.is_autocommit());
        }
    }

    /// Each query runs from the statement cache as it was compiled, whatever is bound: none is
    /// compiled again because a bound value may change its plan (see the note on the queries).
    /// The audience query the reads share with the writer (`write::read_group`) takes no page
    /// size and is not listed.
    #[test]
    fn a_cached_query_is_not_compiled_again() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, std::path::Path::new("mem"), 0, 1).unwrap();
        for sql in [
            SELECT_BALANCE,
            SELECT_ENTRIES,
            SELECT_PACKET,
            SELECT_CLAIMS,
            SELECT_SENT_TOTALS,
            SELECT_SENT_PAGE,
            SELECT_RECEIVED_TOTALS,
            SELECT_RECEIVED_PAGE,
            SELECT_CLAIM_OF,
            SELECT_BEST_LUCK_COUNT,
            SELECT_PACKET_STATE,
            SELECT_FOLDED,
        ] {
            for run in 0..3_i64 {
                let mut stmt = conn.prepare_cached(sql).unwrap();
                for i in 1..=stmt.parameter_count() {
                    // Every run binds other values, a page's size among them.
                    stmt.raw_bind_parameter(i, 20 + run * 7 + i as i64).unwrap();
                }
                let mut rows = stmt.raw_query();
                while rows.next().unwrap().is_some() {}
                drop(rows);
                assert_eq!(
                    stmt.get_status(StatementStatus::RePrepare),
                    0,
                    "compiled again on run {run}: {sql}"
                );
            }
        }
    }
}

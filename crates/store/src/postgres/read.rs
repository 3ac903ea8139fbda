//! The read side: history and detail queries on pooled read-only connections.
//!
//! It never writes and never goes through the engine. A query that returns totals with a
//! page reads both in one repeatable-read transaction, so the totals and the items agree.
//! Called from tokio's blocking threads, where the blocking client may run its own runtime.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hongbao_core::{Audience, Claim, Millis, PacketId, UserId};
use postgres::{Client, IsolationLevel, Transaction};
use r2d2::{Pool, PooledConnection};

use super::archive::{date_text, ArchivedDay};
use super::partitions::DAY_MS;
use super::rows::{self, get, to_u64, Columns, Users};
use super::write::read_packet_row;
use super::{Manager, Statements};
use crate::{EntryRow, PacketRow, Paging, Reader, ReceivedPage, Result, SentPage, Span};

/// Most rows one page returns, whatever the caller asks: a query never materializes more
/// than this, so one client cannot make a read connection stream a whole history.
const PAGE_ROWS_MAX: u32 = 1_000;

const SELECT_BALANCE: &str = "SELECT balance_fen FROM wallets WHERE user_id = $1";
const SELECT_ENTRIES: &str = "SELECT id, kind, amount_fen, packet_id, at_ms FROM entries \
     WHERE user_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3";
const SELECT_CLAIMS_PAGE: &str = "SELECT idx, user_id, amount_fen, at_ms FROM claims \
     WHERE packet_id = $1 AND idx > $2 ORDER BY idx LIMIT $3";
const SELECT_SENT_TOTALS: &str = "SELECT count(*), COALESCE(sum(total_fen), 0)::int8 FROM packets \
     WHERE sender = $1 AND created_at_ms >= $2 AND created_at_ms < $3";
const SELECT_SENT_PAGE: &str = concat!(
    "SELECT ",
    pg_packet_columns!(),
    " FROM packets WHERE sender = $1 AND created_at_ms >= $2 AND created_at_ms < $3 \
     AND id < $4 ORDER BY id DESC LIMIT $5"
);
const SELECT_AUDIENCES: &str =
    "SELECT packet_id, user_id FROM audience WHERE packet_id = ANY($1) ORDER BY packet_id, user_id";
const SELECT_RECEIVED_TOTALS: &str = "SELECT count(*), COALESCE(sum(amount_fen), 0)::int8 FROM entries \
     WHERE user_id = $1 AND kind = 'claim' AND at_ms >= $2 AND at_ms < $3";
const SELECT_RECEIVED_PAGE: &str = "SELECT id, kind, amount_fen, packet_id, at_ms FROM entries \
     WHERE user_id = $1 AND kind = 'claim' AND at_ms >= $2 AND at_ms < $3 AND id < $4 \
     ORDER BY id DESC LIMIT $5";
const SELECT_CLAIM_OF: &str =
    "SELECT idx, user_id, amount_fen, at_ms FROM claims WHERE packet_id = $1 AND user_id = $2";
const SELECT_BEST_LUCK: &str = "SELECT count(*) FROM packets WHERE best_user = $1 AND status = 'exhausted' \
     AND created_at_ms >= $2 AND created_at_ms < $3";

/// How long [`Reader::archived_before`] answers from what it read last: history queries ask
/// it on every request, and the days archived change once a day at most. An archive run shows
/// in answers at most this much later; until then a page just lacks the archived rows.
const ARCHIVED_CACHE_MAX: Duration = Duration::from_secs(10);

/// `archived_days` exists once the first archive of the set ran (see `archive`).
const ARCHIVED_DAYS_EXIST: &str = "SELECT to_regclass('archived_days') IS NOT NULL";
const SELECT_ARCHIVED_DAYS: &str = "SELECT table_name, (day - DATE '1970-01-01')::int8, file, rows \
     FROM archived_days ORDER BY day, table_name, file";

/// The archived days of a set, and when they were read.
type ArchivedRead = (Instant, Vec<ArchivedDay>);

/// The read side of one set's schema: cheap to clone, `Send + Sync`.
#[derive(Debug, Clone)]
pub struct PgReader {
    pool: Pool<Manager>,
    set: u32,
    /// The archived days last read and when, shared by clones. A std mutex: held only to copy
    /// the value in or out, never across a query.
    archived: Arc<Mutex<Option<ArchivedRead>>>,
}

impl PgReader {
    pub(super) fn new(pool: Pool<Manager>, set: u32) -> PgReader {
        PgReader { pool, set, archived: Arc::default() }
    }

    fn conn(&self) -> Result<PooledConnection<Manager>> {
        Ok(self.pool.get()?)
    }

    /// Every day of this set's `claims` and `entries` that `hongbao archive` moved to files,
    /// oldest first, read now (not cached). Their rows are no longer in the database: history
    /// queries answer from what is live, and [`Reader::archived_before`] tells callers where
    /// that stops being the whole story. Claims are archived by the creation day of their
    /// packet, entries by their own day.
    pub fn archived_days(&self) -> Result<Vec<ArchivedDay>> {
        let mut conn = self.conn()?;
        let client = conn.client();
        let exists: bool = get(&client.query_one(ARCHIVED_DAYS_EXIST, &[])?, 0)?;
        if !exists {
            return Ok(Vec::new());
        }
        let mut days = Vec::new();
        for r in client.query(SELECT_ARCHIVED_DAYS, &[])? {
            let day: i64 = get(&r, 1)?;
            days.push(ArchivedDay {
                set: self.set,
                table: get::<String>(&r, 0)?,
                day,
                date: date_text(day),
                file: get(&r, 2)?,
                rows: to_u64(get(&r, 3)?, "archived rows")?,
            });
        }
        Ok(days)
    }
}

fn page_limit(limit: u32) -> i64 {
    i64::from(limit.min(PAGE_ROWS_MAX))
}

/// An exclusive "before" cursor; none means from the newest.
fn before_or_newest(before: Option<i64>) -> i64 {
    before.unwrap_or(i64::MAX)
}

/// The balance of `user` on `client` (`None`: no wallet).
pub(super) fn balance_in(client: &mut Client, st: &mut Statements, user: &UserId) -> Result<Option<i64>> {
    let s = st.get(client, SELECT_BALANCE)?;
    match client.query_opt(&s, &[&user.as_str()])? {
        Some(r) => Ok(Some(rows::balance(get(&r, 0)?, user)?)),
        None => Ok(None),
    }
}

/// Totals and a page from one snapshot.
fn snapshot(client: &mut Client) -> Result<Transaction<'_>> {
    Ok(client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start()?)
}

impl Reader for PgReader {
    fn balance(&self, user: &UserId) -> Result<Option<i64>> {
        let mut conn = self.conn()?;
        let (client, st) = conn.split();
        balance_in(client, st, user)
    }

    fn entries(&self, user: &UserId, before_id: Option<i64>, limit: u32) -> Result<Vec<EntryRow>> {
        let mut conn = self.conn()?;
        let (client, st) = conn.split();
        let s = st.get(client, SELECT_ENTRIES)?;
        let found = client.query(&s, &[&user.as_str(), &before_or_newest(before_id), &page_limit(limit)])?;
        found.iter().map(rows::entry_row).collect()
    }

    fn packet(&self, id: PacketId) -> Result<Option<PacketRow>> {
        let mut conn = self.conn()?;
        let (client, st) = conn.split();
        let mut tx = snapshot(client)?;
        let row = read_packet_row(&mut tx, st, id, &mut Users::parsing())?;
        tx.commit()?;
        Ok(row)
    }

    fn claims(&self, id: PacketId, after_index: Option<u32>, limit: u32) -> Result<Vec<Claim>> {
        let mut conn = self.conn()?;
        let (client, st) = conn.split();
        let s = st.get(client, SELECT_CLAIMS_PAGE)?;
        let after = after_index.map_or(-1, i64::from);
        let found = client.query(&s, &[&id.as_i64(), &after, &page_limit(limit)])?;
        let mut users = Users::parsing();
        found.iter().map(|r| rows::claim(r, 0, &mut users)).collect()
    }

    fn sent(&self, user: &UserId, span: Span, page: Paging<PacketId>) -> Result<SentPage> {
        let mut conn = self.conn()?;
        let (client, st) = conn.split();
        let mut tx = snapshot(client)?;
        let s = st.get(&mut tx, SELECT_SENT_TOTALS)?;
        let totals = tx.query_one(&s, &[&user.as_str(), &span.from_ms, &span.to_ms])?;
        let (count, total_fen): (i64, i64) = (get(&totals, 0)?, get(&totals, 1)?);

        let mut users = Users::parsing();
        let s = st.get(&mut tx, SELECT_SENT_PAGE)?;
        let (before, limit) = (before_or_newest(page.before.map(PacketId::as_i64)), page_limit(page.limit));
        let found = tx.query(&s, &[&user.as_str(), &span.from_ms, &span.to_ms, &before, &limit])?;
        let mut items = found.iter().map(|r| rows::packet_row(r, &mut users)).collect::<Result<Vec<_>>>()?;

        // Every group packet's audience in one query, not one per packet.
        let groups: Vec<i64> = items
            .iter()
            .filter(|p| p.header.audience != Audience::Anyone)
            .map(|p| p.header.id.as_i64())
            .collect();
        let mut members: HashMap<i64, Vec<UserId>> = HashMap::new();
        if !groups.is_empty() {
            let s = st.get(&mut tx, SELECT_AUDIENCES)?;
            for r in tx.query(&s, &[&groups])? {
                members.entry(get(&r, 0)?).or_default().push(users.get(r.text(1)?)?);
            }
        }
        tx.commit()?;
        for row in &mut items {
            let group = members.remove(&row.header.id.as_i64()).unwrap_or_default();
            rows::set_audience(row, group)?;
        }
        Ok(SentPage { count: to_u64(count, "sent count")?, total_fen, items })
    }

    fn received(&self, user: &UserId, span: Span, page: Paging<i64>) -> Result<ReceivedPage> {
        let mut conn = self.conn()?;
        let (client, st) = conn.split();
        let mut tx = snapshot(client)?;
        let s = st.get(&mut tx, SELECT_RECEIVED_TOTALS)?;
        let totals = tx.query_one(&s, &[&user.as_str(), &span.from_ms, &span.to_ms])?;
        let (count, total_fen): (i64, i64) = (get(&totals, 0)?, get(&totals, 1)?);
        let s = st.get(&mut tx, SELECT_RECEIVED_PAGE)?;
        let (before, limit) = (before_or_newest(page.before), page_limit(page.limit));
        let found = tx.query(&s, &[&user.as_str(), &span.from_ms, &span.to_ms, &before, &limit])?;
        tx.commit()?;
        let items = found.iter().map(rows::entry_row).collect::<Result<Vec<_>>>()?;
        Ok(ReceivedPage { count: to_u64(count, "received count")?, total_fen, items })
    }

    /// One lookup on the (packet, user) unique index instead of paging through the claims.
    fn claim_of(&self, id: PacketId, user: &UserId) -> Result<Option<Claim>> {
        let mut conn = self.conn()?;
        let (client, st) = conn.split();
        let s = st.get(client, SELECT_CLAIM_OF)?;
        match client.query_opt(&s, &[&id.as_i64(), &user.as_str()])? {
            Some(r) => Ok(Some(rows::claim(&r, 0, &mut Users::parsing())?)),
            None => Ok(None),
        }
    }

    /// The end of the newest archived day, from [`PgReader::archived_days`] read at most
    /// [`ARCHIVED_CACHE_MAX`] ago.
    fn archived_before(&self) -> Result<Option<Millis>> {
        let cached = self.archived.lock().expect("archived cache lock").clone();
        let days = match cached {
            Some((at, days)) if at.elapsed() < ARCHIVED_CACHE_MAX => days,
            _ => {
                let days = self.archived_days()?;
                *self.archived.lock().expect("archived cache lock") = Some((Instant::now(), days.clone()));
                days
            }
        };
        Ok(days.iter().map(|d| (d.day + 1) * DAY_MS).max())
    }

    fn best_luck_count(&self, user: &UserId, span: Span) -> Result<u64> {
        let mut conn = self.conn()?;
        let (client, st) = conn.split();
        let s = st.get(client, SELECT_BEST_LUCK)?;
        let r = client.query_one(&s, &[&user.as_str(), &span.from_ms, &span.to_ms])?;
        to_u64(get(&r, 0)?, "best luck count")
    }
}

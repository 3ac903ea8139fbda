//! Queries: balances, history and packet details, read from the stores on read connections.
//!
//! They never pass through a set's queue, so a flood of history requests cannot slow claims.
//! They see committed state only; credits between sets appear once delivered (usually
//! within milliseconds).
//!
//! A wallet and a user's history read their own writes without a catch-up: the stores answer
//! them with every commit made before the call (`Reader::balance`), the journal by adding the
//! records its fold has not applied yet. Only a packet's details await the catch-up, so a
//! stream of history queries does not keep the fold running through a peak of claims.

use std::sync::Arc;

use chrono::{NaiveDate, TimeZone, Utc};
use hongbao_core::{PacketId, UserId};
use hongbao_store::{Paging, Reader, Span, StoreError};

use crate::engine::{Engine, QUERY_WAIT_MAX};
use crate::reply::*;

/// Runs a blocking read on the blocking pool, within the engine's bound on running queries.
/// First, without a thread or a slot, it waits for the store to hold what was committed before
/// the query arrived (bounded; see `CatchUp::wait`).
async fn read<T: Send + 'static>(
    engine: &Engine,
    reader: Arc<dyn Reader>,
    f: impl FnOnce(&dyn Reader) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, EngineError> {
    if let Some(catch_up) = reader.catch_up() {
        catch_up.wait().await.map_err(EngineError::from)?;
    }
    read_now(engine, move || f(reader.as_ref())).await
}

/// Runs a blocking read that needs no catch-up (see the module's note). Whatever `f` reads (one
/// set's reader or all of them, owned by the closure), it takes one query slot and one trip to
/// the blocking pool; when no reader waits on I/O (`Reader::blocks`: the memory-only store),
/// it runs here instead, yielding as the trip would.
async fn read_now<T: Send + 'static>(
    engine: &Engine,
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, EngineError> {
    if !engine.reads_block() {
        tokio::task::consume_budget().await;
        return f().map_err(EngineError::from);
    }
    let permits = engine.query_permits();
    let permit = tokio::time::timeout(QUERY_WAIT_MAX, permits.acquire_owned())
        .await
        .map_err(|_| {
            metrics::counter!("hongbao_queries_refused_total").increment(1);
            EngineError::Overloaded
        })?
        .map_err(|_| EngineError::Unavailable)?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        name_query_thread();
        f()
    })
    .await
    .map_err(|e| EngineError::Store(format!("read task failed: {e}")))?
    .map_err(EngineError::from)
}

/// What a thread that has run a query calls itself (`/proc`'s `comm`, `top -H`): tokio gives
/// its blocking threads the workers' name, and an operator, or the CPU by thread kind in
/// `/metrics`, should tell the HTTP workers from the queries.
pub const QUERY_THREAD: &str = "hongbao-query";

/// Names the calling thread [`QUERY_THREAD`], once per thread (Linux; elsewhere nothing).
fn name_query_thread() {
    thread_local!(static NAMED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if NAMED.get() {
        return;
    }
    NAMED.set(true);
    #[cfg(target_os = "linux")]
    if let Ok(name) = std::ffi::CString::new(QUERY_THREAD) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string (the kernel keeps its first 15
        // bytes) and names only the calling thread.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) };
    }
}

/// `[from, to)` in Unix ms for a UTC calendar year; all time when `None`.
fn year_span(year: Option<i32>) -> Span {
    let start = |y: i32| {
        NaiveDate::from_ymd_opt(y, 1, 1)
            .map(|d| Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight")).timestamp_millis())
    };
    match year {
        None => Span::ALL,
        Some(y) => match (start(y), start(y + 1)) {
            (Some(from_ms), Some(to_ms)) => Span { from_ms, to_ms },
            _ => Span { from_ms: 0, to_ms: 0 },
        },
    }
}

impl Engine {
    pub async fn wallet(&self, user: UserId) -> Result<WalletReply, EngineError> {
        let reader = self.reader(self.user_set(&user));
        let u = user.clone();
        let balance_fen = read_now(self, move || reader.balance(&u)).await?.unwrap_or(0);
        Ok(WalletReply { user, balance_fen })
    }

    /// Newest first; `cursor` is the id of the last entry of the previous page.
    pub async fn entries(
        &self,
        user: UserId,
        cursor: Option<i64>,
        limit: u32,
    ) -> Result<EntriesPage, EngineError> {
        let reader = self.reader(self.user_set(&user));
        let (rows, archived_before_ms) = read_now(self, move || {
            Ok((reader.entries(&user, cursor, limit + 1)?, reader.archived_before()?))
        })
        .await?;
        let more = rows.len() > limit as usize;
        let entries: Vec<EntryView> = rows
            .into_iter()
            .take(limit as usize)
            .map(|e| EntryView {
                id: e.id,
                kind: e.kind,
                amount_fen: e.amount_fen,
                packet_id: e.packet_id,
                at_ms: e.at_ms,
            })
            .collect();
        let next_cursor = if more { entries.last().map(|e| e.id) } else { None };
        Ok(EntriesPage { entries, next_cursor, archived_before_ms })
    }

    /// A packet with a page of its claims in opening order.
    pub async fn packet(
        &self,
        id: PacketId,
        cursor: Option<u32>,
        limit: u32,
    ) -> Result<PacketDetails, EngineError> {
        self.details(id, None, cursor, limit).await
    }

    /// As `packet`, for `viewer`, who may see it only as its sender or one of its audience
    /// (anyone, for a packet for anyone). To every other user it is `NotFound`, exactly as a
    /// packet that does not exist, so ids cannot be used to probe other people's packets.
    pub async fn packet_seen_by(
        &self,
        id: PacketId,
        viewer: UserId,
        cursor: Option<u32>,
        limit: u32,
    ) -> Result<PacketDetails, EngineError> {
        self.details(id, Some(viewer), cursor, limit).await
    }

    async fn details(
        &self,
        id: PacketId,
        viewer: Option<UserId>,
        cursor: Option<u32>,
        limit: u32,
    ) -> Result<PacketDetails, EngineError> {
        if id.set() >= self.sets() {
            return Err(EngineError::NotFound);
        }
        let reader = self.reader(id.set());
        let (row, claims, best, archived_before_ms) = read(self, reader, move |r| {
            let Some(row) = r.packet(id)? else { return Ok(None) };
            if let Some(v) = &viewer {
                if row.header.sender != *v && !row.header.audience.admits(v) {
                    return Ok(None);
                }
            }
            let claims = r.claims(id, cursor, limit + 1)?;
            let best = match &row.best {
                Some((user, _)) => r.claim_of(id, user)?,
                None => None,
            };
            // Claims are archived by their packet's creation day.
            let archived = r.archived_before()?.filter(|&cut| row.header.created_at_ms < cut);
            Ok(Some((row, claims, best, archived)))
        })
        .await?
        .ok_or(EngineError::NotFound)?;
        let more = claims.len() > limit as usize;
        let claims: Vec<_> = claims.into_iter().take(limit as usize).collect();
        let next_cursor = if more { claims.last().map(|c| c.index) } else { None };
        Ok(PacketDetails {
            summary: PacketSummary::of(&row.header),
            remaining_fen: row.header.total_fen - row.opened_fen - row.refunded_fen,
            remaining_count: row.header.count - row.opened_count,
            status: row.status,
            best_luck: best.map(|c| ClaimView { user: c.user, amount_fen: c.amount_fen, at_ms: c.at_ms }),
            claims: claims
                .into_iter()
                .map(|c| ClaimView { user: c.user, amount_fen: c.amount_fen, at_ms: c.at_ms })
                .collect(),
            next_cursor,
            archived_before_ms,
        })
    }

    /// Packets a user sent, newest first; the totals cover the whole year.
    pub async fn sent(
        &self,
        user: UserId,
        year: Option<i32>,
        cursor: Option<PacketId>,
        limit: u32,
    ) -> Result<SentHistory, EngineError> {
        let (span, page) = (year_span(year), Paging { before: cursor, limit: limit + 1 });
        let reader = self.reader(self.user_set(&user));
        let page = read_now(self, move || reader.sent(&user, span, page)).await?;
        let more = page.items.len() > limit as usize;
        let items: Vec<SentItem> = page
            .items
            .iter()
            .take(limit as usize)
            .map(|row| SentItem {
                summary: PacketSummary::of(&row.header),
                status: row.status,
                remaining_fen: row.header.total_fen - row.opened_fen - row.refunded_fen,
                remaining_count: row.header.count - row.opened_count,
            })
            .collect();
        let next_cursor = if more { items.last().map(|i| i.summary.id) } else { None };
        Ok(SentHistory { count: page.count, total_fen: page.total_fen, items, next_cursor })
    }

    /// Shares a user received, newest first, with best-luck count over every set.
    pub async fn received(
        &self,
        user: UserId,
        year: Option<i32>,
        cursor: Option<i64>,
        limit: u32,
    ) -> Result<ReceivedHistory, EngineError> {
        let (span, page) = (year_span(year), Paging { before: cursor, limit: limit + 1 });
        // It reads every set (best lucks are counted where the packets live), all in one trip
        // to the blocking pool: a trip per set cost a thread's wake-up and sleep each. The
        // user's own set gives its page and its best lucks in one read.
        let mine = self.user_set(&user) as usize;
        let readers = self.readers().to_vec();
        let (page, archived_before_ms, best_luck_count) = read_now(self, move || {
            let r = &readers[mine];
            let (page, mut best_luck_count) = r.received_and_best_lucks(&user, span, page)?;
            let archived_before_ms = r.archived_before()?;
            for (set, other) in readers.iter().enumerate() {
                if set != mine {
                    best_luck_count += other.best_luck_count(&user, span)?;
                }
            }
            Ok((page, archived_before_ms, best_luck_count))
        })
        .await?;
        let more = page.items.len() > limit as usize;
        let items: Vec<ReceivedItem> = page
            .items
            .iter()
            .take(limit as usize)
            .filter_map(|e| e.packet_id.map(|p| (e, p)))
            .map(|(e, packet_id)| ReceivedItem { packet_id, amount_fen: e.amount_fen, at_ms: e.at_ms })
            .collect();
        let next_cursor = if more { page.items.get(limit as usize - 1).map(|e| e.id) } else { None };
        Ok(ReceivedHistory {
            count: page.count,
            total_fen: page.total_fen,
            best_luck_count,
            items,
            next_cursor,
            archived_before_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_that_runs_a_query_is_named_for_it() {
        let name = std::thread::spawn(|| {
            name_query_thread();
            name_query_thread();
            std::fs::read_to_string("/proc/thread-self/comm").expect("own name")
        })
        .join()
        .expect("thread");
        assert_eq!(name.trim(), QUERY_THREAD);
    }

    #[test]
    fn year_spans() {
        let y = year_span(Some(2026));
        assert_eq!(y.from_ms, 1_767_225_600_000);
        assert_eq!(y.to_ms - y.from_ms, 365 * 24 * 3600 * 1000);
        assert!(y.holds(y.from_ms) && !y.holds(y.to_ms));
        assert_eq!(year_span(None), Span::ALL);
    }
}

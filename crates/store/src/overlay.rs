//! What a journaled set's history queries read beside SQLite: the records the fold has not
//! applied yet, indexed by user and by packet.
//!
//! During a peak the fold gives way to the claims (`journal::Yield`) and the SQLite file trails
//! the journal by up to the fold's lag bounds. A history query that waited for the fold pulled
//! it back into the peak: in the HTTP festival, one query per hundred claims kept the fold
//! running, 5.8 µs of the 32.6 µs a claim cost the server (BENCHMARKS.md, eighteenth session).
//! Instead, a query reads SQLite in one transaction, which says the last record it holds
//! ([`Folded`]), and adds what the records after that one hold for the user or packets it asks
//! about. Those records are indexed here by the queries themselves, each record read back and
//! decoded once: with no queries, the index costs the claims nothing.
//!
//! Entry ids are the history's cursors. The fold issues them in journal order after the last
//! one issued, so a record's entries get the ids after those of every record before it: an
//! entry not yet folded already has the id it will have.

use std::collections::{HashMap, VecDeque};

use hongbao_core::packet::PacketHeader;
use hongbao_core::{Millis, PacketId, PacketStatus, UserId};

use crate::sqlite::Folded;
use crate::{Batch, EntryKind, EntryRow, PacketRow, PacketUpdate, Result, StoreError};

/// The records after `pruned_upto`, up to [`Overlay::indexed_seq`], by what queries look up.
/// Every per-key queue is in seq order; a record's keys say what to drop when it is pruned.
#[derive(Default)]
pub(crate) struct Overlay {
    /// No record up to this one is indexed (any more): every snapshot that may still use the
    /// overlay holds them.
    pruned_upto: u64,
    records: VecDeque<Indexed>,
    /// Entries in the records indexed since the overlay was last emptied: the number of the
    /// next record's first entry.
    entries_seen: u64,
    entries: HashMap<UserId, VecDeque<Pending>>,
    /// The newest balance a record wrote, and the record.
    wallets: HashMap<UserId, (u64, i64)>,
    /// New packets by sender.
    sent: HashMap<UserId, VecDeque<(u64, PacketHeader)>>,
    /// When the packets made in these records were created.
    created: HashMap<PacketId, (u64, Millis)>,
    /// The newest state a record wrote of each packet.
    updates: HashMap<PacketId, (u64, PacketUpdate)>,
    /// Packets that became exhausted in these records, by their best-luck user.
    best: HashMap<UserId, VecDeque<(u64, PacketId)>>,
}

/// One indexed record: its seq, the number of its first entry, and the keys it filed under.
struct Indexed {
    seq: u64,
    first_entry: u64,
    users: Vec<UserId>,
    senders: Vec<UserId>,
    packets: Vec<PacketId>,
    best: Vec<UserId>,
}

/// An entry not yet folded: `number` counts entries from the overlay's start.
struct Pending {
    seq: u64,
    number: u64,
    kind: EntryKind,
    amount_fen: i64,
    packet_id: Option<PacketId>,
    at_ms: Millis,
}

/// Drops the front of `map[key]` up to record `seq`, and the key once nothing is left.
fn drop_upto<K: std::hash::Hash + Eq, T>(
    map: &mut HashMap<K, VecDeque<T>>,
    key: &K,
    seq: u64,
    seq_of: impl Fn(&T) -> u64,
) {
    if let Some(q) = map.get_mut(key) {
        while q.front().is_some_and(|t| seq_of(t) <= seq) {
            q.pop_front();
        }
        if q.is_empty() {
            map.remove(key);
        }
    }
}

fn overflow(what: &str) -> StoreError {
    StoreError::Corrupt(format!("{what} overflows"))
}

impl Overlay {
    /// An empty overlay over a file that holds every record up to `folded_seq`.
    pub(crate) fn new(folded_seq: u64) -> Overlay {
        Overlay { pruned_upto: folded_seq, ..Overlay::default() }
    }

    /// The last record indexed (or pruned).
    pub(crate) fn indexed_seq(&self) -> u64 {
        self.pruned_upto + self.records.len() as u64
    }

    pub(crate) fn pruned_upto(&self) -> u64 {
        self.pruned_upto
    }

    /// Forgets every record: the next one to index is `seq + 1`.
    pub(crate) fn reset(&mut self, seq: u64) {
        *self = Overlay::new(seq);
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Files record `seq` (the one after [`Overlay::indexed_seq`]) under its keys.
    pub(crate) fn index(&mut self, seq: u64, batch: Batch) {
        debug_assert_eq!(seq, self.indexed_seq() + 1, "records are indexed in order");
        let first_entry = self.entries_seen;
        let mut rec = Indexed {
            seq,
            first_entry,
            users: Vec::with_capacity(batch.entries.len() + batch.wallets.len()),
            senders: Vec::new(),
            packets: Vec::with_capacity(batch.packet_updates.len()),
            best: Vec::new(),
        };
        self.entries_seen += batch.entries.len() as u64;
        for (i, e) in batch.entries.into_iter().enumerate() {
            let pending = Pending {
                seq,
                number: first_entry + i as u64,
                kind: e.kind,
                amount_fen: e.amount_fen,
                packet_id: e.packet_id,
                at_ms: e.at_ms,
            };
            self.entries.entry(e.user.clone()).or_default().push_back(pending);
            rec.users.push(e.user);
        }
        for (user, fen) in batch.wallets {
            self.wallets.insert(user.clone(), (seq, fen));
            rec.users.push(user);
        }
        for h in batch.new_packets {
            self.created.insert(h.id, (seq, h.created_at_ms));
            rec.packets.push(h.id);
            rec.senders.push(h.sender.clone());
            self.sent.entry(h.sender.clone()).or_default().push_back((seq, h));
        }
        for u in batch.packet_updates {
            if let (PacketStatus::Exhausted, Some((user, _))) = (u.status, &u.best) {
                self.best.entry(user.clone()).or_default().push_back((seq, u.id));
                rec.best.push(user.clone());
            }
            rec.packets.push(u.id);
            self.updates.insert(u.id, (seq, u));
        }
        self.records.push_back(rec);
    }

    /// Drops every record up to `seq`: a snapshot that holds them is about to read the rest.
    pub(crate) fn prune(&mut self, seq: u64) {
        while self.records.front().is_some_and(|r| r.seq <= seq) {
            let r = self.records.pop_front().expect("a front record");
            for user in &r.users {
                drop_upto(&mut self.entries, user, r.seq, |p| p.seq);
                if self.wallets.get(user).is_some_and(|&(s, _)| s <= r.seq) {
                    self.wallets.remove(user);
                }
            }
            for user in &r.senders {
                drop_upto(&mut self.sent, user, r.seq, |(s, _)| *s);
            }
            for user in &r.best {
                drop_upto(&mut self.best, user, r.seq, |(s, _)| *s);
            }
            for id in &r.packets {
                if self.updates.get(id).is_some_and(|(s, _)| *s <= r.seq) {
                    self.updates.remove(id);
                }
                if self.created.get(id).is_some_and(|(s, _)| *s <= r.seq) {
                    self.created.remove(id);
                }
            }
        }
        self.pruned_upto = self.pruned_upto.max(seq);
    }

    /// The id `p` has (or will have) in the file: after the last one the snapshot issued, in
    /// journal order. The overlay holds only records after the snapshot (it was pruned to it).
    fn entry_id(&self, p: &Pending, at: Folded) -> Result<i64> {
        let first = self.records.front().map_or(self.entries_seen, |r| r.first_entry);
        i64::try_from(p.number - first + 1)
            .ok()
            .and_then(|n| at.last_entry_id.checked_add(n))
            .ok_or_else(|| overflow("an entry id"))
    }

    /// The user's balance as the newest record not folded wrote it.
    pub(crate) fn balance(&self, user: &UserId) -> Option<i64> {
        self.wallets.get(user).map(|&(_, fen)| fen)
    }

    /// The user's entries not folded, newest first, those that `keep`, before entry id `before`.
    fn entries_where(
        &self,
        user: &UserId,
        at: Folded,
        before: Option<i64>,
        keep: impl Fn(&Pending) -> bool,
    ) -> Result<Vec<EntryRow>> {
        let Some(mine) = self.entries.get(user) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for p in mine.iter().rev().filter(|p| keep(p)) {
            let id = self.entry_id(p, at)?;
            if before.is_none_or(|b| id < b) {
                out.push(EntryRow {
                    id,
                    kind: p.kind,
                    amount_fen: p.amount_fen,
                    packet_id: p.packet_id,
                    at_ms: p.at_ms,
                });
            }
        }
        Ok(out)
    }

    /// The user's entries not folded, newest first, before entry id `before`.
    pub(crate) fn entries(&self, user: &UserId, at: Folded, before: Option<i64>) -> Result<Vec<EntryRow>> {
        self.entries_where(user, at, before, |_| true)
    }

    /// The user's claim credits not folded in `[from_ms, to_ms)`, newest first: every one (the
    /// totals count them all) and the ids before `before` apart.
    pub(crate) fn received(
        &self,
        user: &UserId,
        at: Folded,
        from_ms: Millis,
        to_ms: Millis,
    ) -> Result<Vec<EntryRow>> {
        self.entries_where(user, at, None, |p| {
            p.kind == EntryKind::Claim && from_ms <= p.at_ms && p.at_ms < to_ms
        })
    }

    /// Packets the user sent in records not folded, created in `[from_ms, to_ms)`, newest
    /// first, as rows in their newest state.
    pub(crate) fn sent(&self, user: &UserId, from_ms: Millis, to_ms: Millis) -> Vec<PacketRow> {
        let Some(mine) = self.sent.get(user) else { return Vec::new() };
        mine.iter()
            .rev()
            .filter(|(_, h)| from_ms <= h.created_at_ms && h.created_at_ms < to_ms)
            .map(|(_, h)| {
                let mut row = PacketRow {
                    header: h.clone(),
                    status: PacketStatus::Active,
                    opened_count: 0,
                    opened_fen: 0,
                    refunded_fen: 0,
                    best: None,
                };
                self.patch(&mut row);
                row
            })
            .collect()
    }

    /// Brings a packet row read from the file to the newest state a record not folded wrote.
    pub(crate) fn patch(&self, row: &mut PacketRow) {
        if let Some((_, u)) = self.updates.get(&row.header.id) {
            row.status = u.status;
            row.opened_count = u.opened_count;
            row.opened_fen = u.opened_fen;
            row.refunded_fen = u.refunded_fen;
            row.best = u.best.clone();
        }
    }

    /// Packets that became exhausted with `user` as best luck in records not folded, each once,
    /// with when they were created if these records made them.
    pub(crate) fn best_lucks(&self, user: &UserId) -> Vec<(PacketId, Option<Millis>)> {
        let Some(mine) = self.best.get(user) else { return Vec::new() };
        let mut out: Vec<(PacketId, Option<Millis>)> = Vec::new();
        for &(_, id) in mine {
            if !out.iter().any(|(p, _)| *p == id) {
                out.push((id, self.created.get(&id).map(|&(_, at)| at)));
            }
        }
        out
    }
}

/// A page newest first: the items not folded (all newer than any in the file) before the
/// file's, cut to `limit`.
pub(crate) fn newer_first<T>(pending: Vec<T>, stored: Vec<T>, limit: u32) -> Vec<T> {
    let mut out = pending;
    out.extend(stored);
    out.truncate(crate::sqlite::page_limit(limit) as usize);
    out
}

/// Adds the totals of items not folded to the file's.
pub(crate) fn add_totals(count: u64, total_fen: i64, more: u64, more_fen: i64) -> Result<(u64, i64)> {
    Ok((
        count.checked_add(more).ok_or_else(|| overflow("a history count"))?,
        total_fen.checked_add(more_fen).ok_or_else(|| overflow("a history total"))?,
    ))
}

//! What a journaled set's history queries read beside SQLite: the records the fold has not
//! applied yet, indexed by user and by packet.
//!
//! During a peak the fold gives way to the claims (`journal::Yield`) and the SQLite file trails
//! the journal by up to the fold's lag bounds. A history query that waited for the fold waited
//! its whole bound (500 ms) and then answered from the file, up to 30 s behind the claims
//! (BENCHMARKS.md, nineteenth session). Instead, a query reads SQLite in one transaction, which
//! says the last record it holds ([`Folded`]), and adds what the records after that one hold
//! for the user or packets it asks about. Those records are indexed here by the queries
//! themselves, each record read back and decoded once: with no queries, the index costs the
//! claims nothing; with them, it costs about half a microsecond of a query thread per claim
//! (the HTTP festival, BENCHMARKS.md, thirtieth session).
//!
//! Entry ids are the history's cursors. The fold issues them in journal order after the last
//! one issued, so a record's entries get the ids after those of every record before it: an
//! entry not yet folded already has the id it will have.

use std::collections::VecDeque;

use hongbao_core::ids::USER_ID_LEN_MAX;
use hongbao_core::packet::PacketHeader;
use hongbao_core::{FastHash, FastMap, Millis, PacketId, PacketStatus, UserId};
use serde::Deserialize;
use users::{NameAt, Names, Users};

use crate::sqlite::Folded;
#[cfg(doc)]
use crate::Batch;
use crate::{EntryKind, EntryRow, PacketRow, PacketUpdate, Result, Span, StoreError};

/// The records after `pruned_upto`, up to [`Overlay::indexed_seq`], by user and by packet.
///
/// A user's part of the records (an entry, a balance, a packet sent, a best luck) is an
/// [`Item`] in one queue of every user's items, in record order, each linked to the same
/// user's item before it and holding a copy of their name; the users table ([`Users`]) holds
/// where each user's newest item is. Indexing a record appends to the queue and looks each
/// user up once per item (in the festival every claimer is new: one insert, then one hit);
/// dropping a record pops its items off the front and forgets a user whose newest item went
/// with them. Nothing is allocated per user: a box per user and a queue per part cost the
/// query threads a third of their time in the HTTP festival, most of it memory fetched fresh
/// (BENCHMARKS.md, thirtieth session), and a table of ids a sixth (thirty-first session).
/// The table's places stay small so that its growth is cheap: with each user's part in the
/// slot (136 bytes) the index took 35–40 % longer (twenty-fourth session).
#[derive(Default)]
pub(crate) struct Overlay {
    /// No record up to this one is indexed (any more): every snapshot that may still use the
    /// overlay holds them.
    pruned_upto: u64,
    records: VecDeque<Indexed>,
    /// Entries in the records indexed since the overlay was last emptied: the number of the
    /// next record's first entry.
    entries_seen: u64,
    /// Every user's items, oldest first; the first is number `items_gone + 1`.
    items: Chunked<Item>,
    /// Items dropped since the overlay was last emptied: numbers up to this one are gone.
    items_gone: u64,
    users: Users,
    /// The name each item was filed under, in item order.
    names: Names,
    /// The hashes of the names in the record being indexed (kept for its allocation).
    hashes: Vec<u64>,
    packets: FastMap<PacketId, PacketPending>,
    /// Not kept while the records not folded are past the journal's bound for it.
    suspended: bool,
}

mod users;

/// One user's part of one record.
struct Item {
    /// The copy of the user's name this item was filed under.
    name: NameAt,
    /// The number of the same user's item before this one; none (0, or a number dropped) ends
    /// the user's items.
    older: u64,
    what: What,
}

/// Entries ahead of the one being filed whose place in the users table is fetched: far enough
/// for the fetch to arrive, near enough that the place is still cached when it is used.
const AHEAD: usize = 4;

enum What {
    Entry(Pending),
    /// The balance the record wrote.
    Wallet(i64),
    /// An amount the record added to the balance ([`Batch::credits`]).
    Credit(i64),
    /// A packet the user sent (boxed: a header is large, and few items are one).
    Sent(Box<PacketHeader>),
    /// A packet that became exhausted with the user as best luck.
    Best(PacketId),
}

/// What the records hold for one packet.
#[derive(Default)]
struct PacketPending {
    /// When it was created, if these records made it.
    created: Option<(u64, Millis)>,
    /// The newest state written.
    update: Option<(u64, PacketUpdate)>,
}

impl PacketPending {
    fn is_empty(&self) -> bool {
        self.created.is_none() && self.update.is_none()
    }
}

/// One indexed record: its seq, the numbers of its first entry and of its first item, and
/// the packets it filed under.
struct Indexed {
    seq: u64,
    first_entry: u64,
    first_item: u64,
    packets: Vec<PacketId>,
}

/// A queue kept in chunks of [`CHUNK`] items, so that it grows without moving what it holds:
/// a `VecDeque` that doubles copies every item into fresh memory and faults every page of it
/// in, which was a third of the query threads' time in the HTTP festival (BENCHMARKS.md,
/// thirtieth session). A chunk emptied at the front is kept to be the next one at the back.
/// Every chunk but the first and the last is full.
struct Chunked<T> {
    chunks: VecDeque<VecDeque<T>>,
    spare: Option<VecDeque<T>>,
    len: usize,
}

/// Items a chunk holds (256 KiB of them).
const CHUNK: usize = 4096;

impl<T> Default for Chunked<T> {
    fn default() -> Chunked<T> {
        Chunked { chunks: VecDeque::new(), spare: None, len: 0 }
    }
}

impl<T> Chunked<T> {
    fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push_back(&mut self, t: T) {
        if self.chunks.back().is_none_or(|c| c.len() == CHUNK) {
            let chunk = self.spare.take().unwrap_or_else(|| VecDeque::with_capacity(CHUNK));
            self.chunks.push_back(chunk);
        }
        self.chunks.back_mut().expect("a chunk at the back").push_back(t);
        self.len += 1;
    }

    fn pop_front(&mut self) -> Option<T> {
        let front = self.chunks.front_mut()?;
        let t = front.pop_front().expect("no chunk is kept empty");
        self.len -= 1;
        if front.is_empty() {
            self.spare = self.chunks.pop_front();
        }
        Some(t)
    }

    /// The `i`-th item from the front.
    fn get(&self, i: usize) -> Option<&T> {
        let first = self.chunks.front()?;
        match i.checked_sub(first.len()) {
            None => first.get(i),
            Some(rest) => self.chunks.get(1 + rest / CHUNK)?.get(rest % CHUNK),
        }
    }
}

/// An entry not yet folded: `number` counts entries from the overlay's start.
struct Pending {
    number: u64,
    kind: EntryKind,
    amount_fen: i64,
    packet_id: Option<PacketId>,
    at_ms: Millis,
}

/// What history reads of a journal record: a [`Batch`]'s first five fields, decoded from the
/// record as it encodes them (postcard writes the fields in order, without names or lengths,
/// so decoding stops after these and leaves claims, outbox and idempotency records unread),
/// with user ids borrowed from the record, not allocated. Its fields must stay `Batch`'s, in
/// `Batch`'s order: `a_history_view_decodes_what_a_batch_encodes` holds it to that.
#[derive(Deserialize)]
pub(crate) struct HistoryView<'a> {
    #[serde(borrow)]
    wallets: Vec<(&'a str, i64)>,
    #[serde(borrow)]
    credits: Vec<(&'a str, i64)>,
    #[serde(borrow)]
    entries: Vec<EntryView<'a>>,
    new_packets: Vec<PacketHeader>,
    packet_updates: Vec<PacketUpdate>,
}

/// An [`crate::Entry`] as the record holds it.
#[derive(Deserialize)]
struct EntryView<'a> {
    user: &'a str,
    kind: EntryKind,
    amount_fen: i64,
    packet_id: Option<PacketId>,
    at_ms: Millis,
}

/// Decodes the part of a record's payload history reads.
pub(crate) fn history_view(payload: &[u8]) -> Result<HistoryView<'_>> {
    postcard::from_bytes(payload)
        .map_err(|e| StoreError::Corrupt(format!("a journal record does not decode: {e}")))
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

    /// Forgets every record and is not kept until [`Overlay::reset`] or an index: the next
    /// record to index is `seq + 1`.
    pub(crate) fn suspend(&mut self, seq: u64) {
        *self = Overlay { suspended: true, ..Overlay::new(seq) };
    }

    pub(crate) fn suspended(&self) -> bool {
        self.suspended
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.records.is_empty() && self.items.is_empty() && self.users.len() == 0 && self.packets.is_empty()
    }

    /// The number the next item filed gets.
    fn next_item(&self) -> u64 {
        self.items_gone + self.items.len() as u64 + 1
    }

    /// Item `number`, live (not dropped).
    fn item(&self, number: u64) -> &Item {
        live(&self.items, self.items_gone, number)
    }

    /// The user's items, newest first.
    fn items_of(&self, user: &UserId) -> impl Iterator<Item = &Item> {
        let theirs = |newest| self.names.get(self.item(newest).name) == user.as_str().as_bytes();
        let mut next = self.users.newest(user.fast_hash(), theirs).unwrap_or(0);
        std::iter::from_fn(move || {
            if next <= self.items_gone {
                return None;
            }
            let item = self.item(next);
            next = item.older;
            Some(item)
        })
    }

    /// Appends `what` as the newest item of `name`, whose hash is `hash`.
    fn file(&mut self, name: &str, hash: u64, what: What) -> Result<()> {
        if name.is_empty() || name.len() > USER_ID_LEN_MAX {
            return Err(StoreError::Corrupt(format!("a journal record holds user {name:?}")));
        }
        let number = self.next_item();
        // The table is borrowed to change while the items and names are read.
        let Overlay { users, names, items, items_gone, .. } = self;
        let theirs = |newest| names.get(live(items, *items_gone, newest).name) == name.as_bytes();
        let older = users.file(hash, theirs, number);
        let name = self.names.push(name);
        self.items.push_back(Item { name, older, what });
        Ok(())
    }

    /// Files record `seq` (the one after [`Overlay::indexed_seq`]) under its keys.
    pub(crate) fn index(&mut self, seq: u64, batch: HistoryView<'_>) -> Result<()> {
        debug_assert_eq!(seq, self.indexed_seq() + 1, "records are indexed in order");
        self.suspended = false;
        let first_entry = self.entries_seen;
        let mut rec = Indexed {
            seq,
            first_entry,
            first_item: self.next_item(),
            packets: Vec::with_capacity(batch.packet_updates.len() + batch.new_packets.len()),
        };
        self.entries_seen += batch.entries.len() as u64;
        // Each entry's place in the users table is fetched a few entries ahead: in the
        // festival nearly every claimer is new, and their place a miss.
        let mut hashes = std::mem::take(&mut self.hashes);
        hashes.clear();
        hashes.extend(batch.entries.iter().map(|e| FastHash::of(e.user)));
        for &h in hashes.iter().take(AHEAD) {
            self.users.prefetch(h);
        }
        for (i, e) in batch.entries.into_iter().enumerate() {
            if let Some(&ahead) = hashes.get(i + AHEAD) {
                self.users.prefetch(ahead);
            }
            let pending = Pending {
                number: first_entry + i as u64,
                kind: e.kind,
                amount_fen: e.amount_fen,
                packet_id: e.packet_id,
                at_ms: e.at_ms,
            };
            self.file(e.user, hashes[i], What::Entry(pending))?;
        }
        self.hashes = hashes;
        // Credits before balances, as the store writes them: a balance counts them.
        for (name, fen) in batch.credits {
            self.file(name, FastHash::of(name), What::Credit(fen))?;
        }
        for (name, fen) in batch.wallets {
            self.file(name, FastHash::of(name), What::Wallet(fen))?;
        }
        for h in batch.new_packets {
            rec.packets.push(h.id);
            self.packets.entry(h.id).or_default().created = Some((seq, h.created_at_ms));
            let sender = h.sender.clone();
            self.file(sender.as_str(), sender.fast_hash(), What::Sent(Box::new(h)))?;
        }
        for u in batch.packet_updates {
            if let (PacketStatus::Exhausted, Some((user, _))) = (u.status, &u.best) {
                self.file(user.as_str(), user.fast_hash(), What::Best(u.id))?;
            }
            let id = u.id;
            rec.packets.push(id);
            self.packets.entry(id).or_default().update = Some((seq, u));
        }
        self.records.push_back(rec);
        Ok(())
    }

    /// Drops every record up to `seq`: a snapshot that holds them is about to read the rest.
    pub(crate) fn prune(&mut self, seq: u64) {
        while self.records.front().is_some_and(|r| r.seq <= seq) {
            let r = self.records.pop_front().expect("a front record");
            for id in &r.packets {
                let Some(p) = self.packets.get_mut(id) else { continue };
                if p.created.is_some_and(|(s, _)| s <= r.seq) {
                    p.created = None;
                }
                if p.update.as_ref().is_some_and(|(s, _)| *s <= r.seq) {
                    p.update = None;
                }
                if p.is_empty() {
                    self.packets.remove(id);
                }
            }
        }
        // The dropped records' items: every one before the first item of the first record left.
        let kept_from = self.records.front().map_or(self.next_item(), |r| r.first_item);
        while self.items_gone + 1 < kept_from {
            let item = self.items.pop_front().expect("an item of a dropped record");
            self.items_gone += 1;
            // The user goes when their newest item does: no later record filed them.
            let name = std::str::from_utf8(self.names.get(item.name)).expect("names are filed as text");
            self.users.forget(FastHash::of(name), self.items_gone);
        }
        match self.items.get(0) {
            Some(first) => self.names.drop_before(first.name),
            None => self.names.clear(),
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

    /// The user's balance with the records not folded applied to `stored`, the file's: the
    /// newest balance written, else the file's, plus every credit after it. `None`: no wallet
    /// in either.
    pub(crate) fn balance(&self, user: &UserId, stored: Option<i64>) -> Result<Option<i64>> {
        let mut credited: Option<i64> = None;
        let mut base = stored;
        for i in self.items_of(user) {
            match i.what {
                What::Wallet(fen) => {
                    base = Some(fen);
                    break;
                }
                What::Credit(fen) => {
                    credited =
                        Some(credited.unwrap_or(0).checked_add(fen).ok_or_else(|| overflow("a balance"))?)
                }
                _ => {}
            }
        }
        match (base, credited) {
            (base, None) => Ok(base),
            (base, Some(c)) => {
                base.unwrap_or(0).checked_add(c).map(Some).ok_or_else(|| overflow("a balance"))
            }
        }
    }

    /// The user's entries not folded, newest first, those that `keep`, before entry id `before`.
    fn entries_where(
        &self,
        user: &UserId,
        at: Folded,
        before: Option<i64>,
        keep: impl Fn(&Pending) -> bool,
    ) -> Result<Vec<EntryRow>> {
        let mut out = Vec::new();
        for i in self.items_of(user) {
            let What::Entry(p) = &i.what else { continue };
            if !keep(p) {
                continue;
            }
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

    /// The user's claim credits not folded in the span, newest first: every one, whatever the
    /// page (the totals count them all).
    pub(crate) fn received(&self, user: &UserId, at: Folded, span: Span) -> Result<Vec<EntryRow>> {
        self.entries_where(user, at, None, |p| p.kind == EntryKind::Claim && span.holds(p.at_ms))
    }

    /// Packets the user sent in records not folded, created in the span, newest first, as rows
    /// in their newest state.
    pub(crate) fn sent(&self, user: &UserId, span: Span) -> Vec<PacketRow> {
        self.items_of(user)
            .filter_map(|i| match &i.what {
                What::Sent(h) if span.holds(h.created_at_ms) => Some(h),
                _ => None,
            })
            .map(|h| {
                let mut row = PacketRow {
                    header: (**h).clone(),
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
        if let Some((_, u)) = self.packets.get(&row.header.id).and_then(|p| p.update.as_ref()) {
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
        let mut out: Vec<(PacketId, Option<Millis>)> = Vec::new();
        for i in self.items_of(user) {
            let What::Best(id) = i.what else { continue };
            if !out.iter().any(|(p, _)| *p == id) {
                out.push((id, self.packets.get(&id).and_then(|p| p.created).map(|(_, at)| at)));
            }
        }
        out
    }
}

/// Item `number` of `items`, whose first is number `gone + 1`: one not dropped.
fn live(items: &Chunked<Item>, gone: u64, number: u64) -> &Item {
    items.get((number - gone - 1) as usize).expect("a live item")
}

/// A page newest first: the items not folded (all newer than any in the file) before the
/// file's, cut to `limit`.
pub(crate) fn newer_first<T>(pending: Vec<T>, stored: Vec<T>, limit: u32) -> Vec<T> {
    let mut out = pending;
    out.extend(stored);
    out.truncate(crate::sqlite::page_limit(limit) as usize);
    out
}

/// The file's totals (a count and a sum of fen) with the items not folded added.
pub(crate) fn add_totals<T>(
    count: u64,
    total_fen: i64,
    pending: &[T],
    fen: impl Fn(&T) -> i64,
) -> Result<(u64, i64)> {
    let more_fen = pending
        .iter()
        .try_fold(0_i64, |sum, t| sum.checked_add(fen(t)))
        .ok_or_else(|| overflow("a history total"))?;
    Ok((
        count.checked_add(pending.len() as u64).ok_or_else(|| overflow("a history count"))?,
        total_fen.checked_add(more_fen).ok_or_else(|| overflow("a history total"))?,
    ))
}

#[cfg(test)]
mod tests {
    use hongbao_core::{AmountRule, Audience, Kind};
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The chunked queue holds what a `VecDeque` holds, in the same places, across chunk
        /// ends, whatever the runs of pushes and pops (each pop of more than it holds takes
        /// what there is).
        #[test]
        fn a_chunked_queue_holds_what_a_deque_holds(runs in prop::collection::vec((0..9_000usize, 0..9_000usize), 1..6)) {
            let (mut chunked, mut deque) = (Chunked::default(), VecDeque::new());
            let mut next = 0u64;
            for (pushes, pops) in runs {
                for _ in 0..pushes {
                    chunked.push_back(next);
                    deque.push_back(next);
                    next += 1;
                }
                for _ in 0..pops {
                    prop_assert_eq!(chunked.pop_front(), deque.pop_front());
                }
                prop_assert_eq!(chunked.len(), deque.len());
                prop_assert_eq!(chunked.is_empty(), deque.is_empty());
                for i in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, deque.len() / 2, deque.len().saturating_sub(1), deque.len()] {
                    prop_assert_eq!(chunked.get(i), deque.get(i), "item {}", i);
                }
            }
        }
    }
    use crate::{Batch, ClaimRow, Entry, IdemRecord, IdemResult, OutboxItem, Totals};

    /// The view reads a batch's first four fields exactly, whatever follows them in the record.
    #[test]
    fn a_history_view_decodes_what_a_batch_encodes() {
        let user = |s: &str| UserId::parse(s).unwrap();
        let id = PacketId::from_raw(1 << 40).unwrap();
        let header = PacketHeader {
            id,
            sender: user("alice"),
            kind: Kind::Lucky,
            total_fen: 300,
            count: 3,
            audience: Audience::users([user("bob"), user("carol")]),
            greeting: "恭喜发财".into(),
            created_at_ms: 1_767_225_600_000,
            expires_at_ms: 1_767_312_000_000,
            seed: u64::MAX - 3,
            amount_rule: AmountRule::CURRENT,
        };
        let update = PacketUpdate {
            id,
            status: PacketStatus::Exhausted,
            opened_count: 3,
            opened_fen: 300,
            refunded_fen: 0,
            best: Some((user("bob"), 150)),
        };
        let entry = Entry {
            user: user("bob"),
            kind: EntryKind::Claim,
            amount_fen: 150,
            packet_id: Some(id),
            at_ms: 9,
        };
        let batch = Batch {
            wallets: vec![(user("alice"), 700), (user("bob"), 150)],
            credits: vec![(user("carol"), 5)],
            entries: vec![entry.clone()],
            new_packets: vec![header.clone()],
            packet_updates: vec![update.clone()],
            claims: vec![ClaimRow {
                packet_id: id,
                claim: hongbao_core::Claim { user: user("bob"), amount_fen: 150, at_ms: 9, index: 0 },
            }],
            outbox_new: vec![OutboxItem {
                target_set: 1,
                seq: 4,
                user: user("dave"),
                amount_fen: 1,
                packet_id: id,
                at_ms: 9,
            }],
            outbox_acked: vec![(1, 3)],
            watermarks: vec![(1, 2)],
            idempotency: vec![IdemRecord {
                user: user("alice"),
                request_id: "r-1".into(),
                fingerprint: 77,
                result: IdemResult::Send { packet_id: id },
                at_ms: 8,
            }],
            totals: Some(Totals { deposits_fen: 1_000, withdrawals_fen: 0 }),
        };
        let bytes = postcard::to_allocvec(&batch).unwrap();
        let view = history_view(&bytes).unwrap();
        assert_eq!(view.wallets, vec![("alice", 700), ("bob", 150)]);
        assert_eq!(view.credits, vec![("carol", 5)]);
        assert_eq!(view.entries.len(), 1);
        let e = &view.entries[0];
        assert_eq!(
            (e.user, e.kind, e.amount_fen, e.packet_id, e.at_ms),
            (entry.user.as_str(), entry.kind, entry.amount_fen, entry.packet_id, entry.at_ms)
        );
        assert_eq!(view.new_packets, vec![header]);
        assert_eq!(view.packet_updates, vec![update]);
    }
}

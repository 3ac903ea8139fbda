//! hongbao-store: where a set's state is made durable, and where queries read it back.
//!
//! A set engine owns one [`Store`] (its write side) and commits each batch of effects in one
//! transaction through it. Queries (history, details, balances) go through a [`Reader`], on
//! connections of their own, never through the engine's queue. This crate never decides
//! anything about money: it writes what the engine computed and reads back what was written.

mod background;
mod journal;
mod null;
mod overlay;
mod postgres;
mod rows;
mod sqlite;
mod users;

pub use journal::{open_journaled_sqlite, CatchUp, JournalReader, JournalStore, FOLD_THREAD};
pub use null::{NullReader, NullStore};
pub use postgres::{
    archive_postgres, make_postgres_day_partitions, open_postgres, open_postgres_reader, ArchiveReport,
    ArchivedDay, PgReader, PgStore, SkippedDay,
};
pub use sqlite::{open_sqlite, SqliteReader, SqliteStore, CHECKPOINT_THREAD};

use hongbao_core::packet::PacketHeader;
use hongbao_core::{Claim, Millis, Packet, PacketId, PacketStatus, UserId};
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    /// The store could not do its job (disk full, I/O error, lost connection). The engine
    /// treats this as fail-stop for the set: nothing in the batch was acknowledged.
    #[error("store I/O failed: {0}")]
    Io(String),
    /// The data on disk is not what this build can use (newer schema, other set count).
    #[error("store is incompatible: {0}")]
    Incompatible(String),
    /// Rows that break an invariant were read back: a bug, or tampering.
    #[error("store holds corrupt data: {0}")]
    Corrupt(String),
    /// The store cannot answer this read now without keeping the set waiting long (on the
    /// journal, the fold trails what was committed). Nothing changed; the caller may retry.
    #[error("store busy: {0}")]
    Busy(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// What a failed batch commit is reported as, whatever failed inside it: logged once, and an
/// `Io` error for the set (fail-stop), with the cause's message.
pub(crate) fn commit_failed(set: u32, e: StoreError) -> StoreError {
    let msg = match e {
        StoreError::Io(m) | StoreError::Corrupt(m) | StoreError::Incompatible(m) | StoreError::Busy(m) => m,
    };
    tracing::error!(set, error = %msg, "batch commit failed");
    StoreError::Io(format!("commit failed: {msg}"))
}

/// What moved a wallet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    Deposit,
    Withdraw,
    /// Money left the wallet into a packet's escrow.
    Send,
    /// A share of someone's packet was credited.
    Claim,
    /// The unclaimed rest of an expired packet came back.
    Refund,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Deposit => "deposit",
            EntryKind::Withdraw => "withdraw",
            EntryKind::Send => "send",
            EntryKind::Claim => "claim",
            EntryKind::Refund => "refund",
        }
    }

    pub fn parse(s: &str) -> Option<EntryKind> {
        Some(match s {
            "deposit" => EntryKind::Deposit,
            "withdraw" => EntryKind::Withdraw,
            "send" => EntryKind::Send,
            "claim" => EntryKind::Claim,
            "refund" => EntryKind::Refund,
            _ => return None,
        })
    }
}

/// One line of a wallet's history. `amount_fen` is always positive; `kind` says the direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub user: UserId,
    pub kind: EntryKind,
    pub amount_fen: i64,
    pub packet_id: Option<PacketId>,
    pub at_ms: Millis,
}

/// An entry read back, with the id that orders a wallet's history (and pages it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRow {
    pub id: i64,
    pub kind: EntryKind,
    pub amount_fen: i64,
    pub packet_id: Option<PacketId>,
    pub at_ms: Millis,
}

/// The mutable part of a packet row, written whenever a batch changed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketUpdate {
    pub id: PacketId,
    pub status: PacketStatus,
    pub opened_count: u32,
    pub opened_fen: i64,
    pub refunded_fen: i64,
    /// Set once the packet is exhausted.
    pub best: Option<(UserId, i64)>,
}

/// A settled share to record under its packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRow {
    pub packet_id: PacketId,
    pub claim: Claim,
}

/// A credit owed to a wallet in another set. `seq` counts from 1 per (source set, target
/// set); the target applies each seq once, in order, and remembers the last one applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxItem {
    pub target_set: u32,
    pub seq: u64,
    pub user: UserId,
    pub amount_fen: i64,
    pub packet_id: PacketId,
    pub at_ms: Millis,
}

/// What an idempotent request returned the first time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdemResult {
    Deposit { balance_fen: i64 },
    Withdraw { balance_fen: i64 },
    Send { packet_id: PacketId },
}

/// An idempotency record: key (user, request_id), the fingerprint of the request body, and
/// the first result. Kept for the engine's retention window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdemRecord {
    pub user: UserId,
    pub request_id: String,
    pub fingerprint: u64,
    pub result: IdemResult,
    pub at_ms: Millis,
}

/// Running totals of money that entered and left through this set's wallets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub deposits_fen: i64,
    pub withdrawals_fen: i64,
}

/// Everything one engine batch changed, written in one transaction.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Batch {
    /// Final balances of the wallets the batch touched (upsert).
    pub wallets: Vec<(UserId, i64)>,
    /// Amounts added to wallets the set does not hold in memory: those of users it has not
    /// debited since it loaded, such as claimers. The store adds each to the balance it holds (a wallet
    /// it does not have starts at 0). Written before `wallets`: a balance there already counts
    /// the same user's credits here, as the set read them ([`Store::balance`]). Journal records
    /// put this field second, where history reads it (`overlay::HistoryView`).
    pub credits: Vec<(UserId, i64)>,
    pub entries: Vec<Entry>,
    /// New packets (with their audience) in their initial state.
    pub new_packets: Vec<PacketHeader>,
    pub packet_updates: Vec<PacketUpdate>,
    pub claims: Vec<ClaimRow>,
    pub outbox_new: Vec<OutboxItem>,
    /// (target set, seq): every outbox row to that target up to seq was applied there.
    pub outbox_acked: Vec<(u32, u64)>,
    /// (source set, seq): the last credit applied from that source.
    pub watermarks: Vec<(u32, u64)>,
    pub idempotency: Vec<IdemRecord>,
    /// The new running totals, when the batch moved them.
    pub totals: Option<Totals>,
}

impl Batch {
    /// Empties the batch and keeps its allocations, for the next one.
    pub fn clear(&mut self) {
        self.wallets.clear();
        self.credits.clear();
        self.entries.clear();
        self.new_packets.clear();
        self.packet_updates.clear();
        self.claims.clear();
        self.outbox_new.clear();
        self.outbox_acked.clear();
        self.watermarks.clear();
        self.idempotency.clear();
        self.totals = None;
    }

    pub fn is_empty(&self) -> bool {
        self.wallets.is_empty()
            && self.credits.is_empty()
            && self.entries.is_empty()
            && self.new_packets.is_empty()
            && self.packet_updates.is_empty()
            && self.claims.is_empty()
            && self.outbox_new.is_empty()
            && self.outbox_acked.is_empty()
            && self.watermarks.is_empty()
            && self.idempotency.is_empty()
            && self.totals.is_none()
    }
}

/// What a set reads on start to rebuild its memory.
#[derive(Debug, Default)]
pub struct Loaded {
    pub wallets: Vec<(UserId, i64)>,
    /// Packets still `active`, with their claims; boxed as the set keeps them, so a restart
    /// moves pointers instead of copying each packet out of a vector as large as all of them.
    pub active_packets: Vec<Box<Packet>>,
    /// The largest packet id this set has issued.
    pub max_packet_id: Option<PacketId>,
    /// Idempotency records at or after the retention cut-off given to `load`.
    pub idempotency: Vec<IdemRecord>,
    /// Credits not yet acknowledged by their target set, in seq order per target.
    pub outbox_pending: Vec<OutboxItem>,
    /// (target set, last seq issued), including acknowledged rows.
    pub outbox_last_seq: Vec<(u32, u64)>,
    /// (source set, last seq applied).
    pub watermarks: Vec<(u32, u64)>,
    pub totals: Totals,
    /// Sum of escrow of active packets, as the store computes it (checked against memory).
    pub escrow_fen: i64,
}

/// Sums the audit compares with the engine's own figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreSums {
    pub balances_fen: i64,
    pub escrow_fen: i64,
    pub totals: Totals,
    pub outbox_pending: Vec<OutboxItem>,
    pub watermarks: Vec<(u32, u64)>,
}

/// The write side of one set's store. Owned by the set's engine thread; never shared.
pub trait Store: Send + 'static {
    /// Reads the whole state the set needs in memory; idempotency records older than
    /// `idempotency_since_ms` are left out (and may be pruned).
    fn load(&mut self, idempotency_since_ms: Millis) -> Result<Loaded>;

    /// Writes one batch in one durable transaction: when this returns `Ok`, it survives
    /// `kill -9` and power loss. On `Err`, nothing of the batch is visible.
    fn commit(&mut self, batch: &Batch) -> Result<()>;

    /// Reads one packet (with claims) that is no longer in memory, e.g. closed long ago.
    fn packet(&mut self, id: PacketId) -> Result<Option<Packet>>;

    /// The balance of a wallet the set does not hold in memory, as every batch committed so
    /// far leaves it (`None`: no such wallet), read when the set first debits a user since it
    /// loaded. It must count every committed credit ([`Batch::credits`]): a balance read short
    /// would be written back short.
    fn balance(&mut self, user: &UserId) -> Result<Option<i64>>;

    /// Sums for the audit, read in one consistent snapshot.
    fn sums(&mut self) -> Result<StoreSums>;
}

/// A packet as queries see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketRow {
    pub header: PacketHeader,
    pub status: PacketStatus,
    pub opened_count: u32,
    pub opened_fen: i64,
    pub refunded_fen: i64,
    pub best: Option<(UserId, i64)>,
}

/// A page of `received` history: the totals cover the whole year, not just the page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceivedPage {
    pub count: u64,
    pub total_fen: i64,
    pub items: Vec<EntryRow>,
}

/// A page of `sent` history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SentPage {
    pub count: u64,
    pub total_fen: i64,
    pub items: Vec<PacketRow>,
}

/// The creation times a history covers, `[from_ms, to_ms)`: a year, or all time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub from_ms: Millis,
    pub to_ms: Millis,
}

impl Span {
    /// Every time there is.
    pub const ALL: Span = Span { from_ms: Millis::MIN, to_ms: Millis::MAX };

    pub fn holds(self, at_ms: Millis) -> bool {
        self.from_ms <= at_ms && at_ms < self.to_ms
    }
}

/// Which page of a history to read: up to `limit` items, newest first, older than the
/// exclusive cursor `before` (the id of the last item of the page before; none for the first
/// page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paging<C> {
    pub before: Option<C>,
    pub limit: u32,
}

impl<C: Copy + PartialOrd> Paging<C> {
    /// Whether an item with this id belongs after the cursor, on this page or a later one.
    pub fn after_cursor(self, id: C) -> bool {
        self.before.is_none_or(|b| id < b)
    }
}

/// The read side of one set's store: shareable, blocking, on its own connections.
/// Histories are read by [`Span`] and [`Paging`].
pub trait Reader: Send + Sync + 'static {
    /// For a store that applies commits in the background (the journal): what a query of a
    /// packet's details (`packet`, `claims`, `claim_of`) awaits before reading to see every
    /// commit made before it. `None` (the default): reads already see every commit. The other
    /// reads (a wallet, its entries, sent and received pages, best-luck counts) see every
    /// commit made before the call without it. (A reader on a PostgreSQL standby trails the
    /// primary by the standby's replay lag, for every read alike.)
    fn catch_up(&self) -> Option<CatchUp> {
        None
    }

    /// How many commits the reads do not see yet, for a store that applies them in the
    /// background (the journal's records not yet folded); `None` for a store whose reads see
    /// every commit.
    fn unapplied_commits(&self) -> Option<u64> {
        None
    }

    /// Whether the background apply gives way to the claims at the moment (the journal's fold,
    /// while the process is busy with a peak: it then applies commits only at its lag bounds);
    /// `None` for a store with no such apply.
    fn fold_giving_way(&self) -> Option<bool> {
        None
    }

    /// Whether a read may wait on I/O (a file, a server): the engine then runs it on the
    /// blocking pool. A reader that answers from memory alone says `false`, and its reads run
    /// on the caller's task: a trip to the pool is a thread woken and put back to sleep, which
    /// costs more than such a read.
    fn blocks(&self) -> bool {
        true
    }

    fn balance(&self, user: &UserId) -> Result<Option<i64>>;
    fn entries(&self, user: &UserId, before_id: Option<i64>, limit: u32) -> Result<Vec<EntryRow>>;
    fn packet(&self, id: PacketId) -> Result<Option<PacketRow>>;
    /// A packet's claims in opening order, from share index `after_index + 1`.
    fn claims(&self, id: PacketId, after_index: Option<u32>, limit: u32) -> Result<Vec<Claim>>;
    /// Packets sent by `user` created in the span, newest first, by packet id.
    fn sent(&self, user: &UserId, span: Span, page: Paging<PacketId>) -> Result<SentPage>;
    /// Claim credits to `user`'s wallet in the span, newest first, by entry id.
    fn received(&self, user: &UserId, span: Span, page: Paging<i64>) -> Result<ReceivedPage>;
    /// How many exhausted packets of this set created in the span have `user` as best luck.
    fn best_luck_count(&self, user: &UserId, span: Span) -> Result<u64>;
    /// [`Reader::received`] and [`Reader::best_luck_count`] for one user and span, which a
    /// received page asks of its user's own set. A store that can reads both in one snapshot
    /// (the journal: one read transaction and one look at its records not folded, not two).
    fn received_and_best_lucks(
        &self,
        user: &UserId,
        span: Span,
        page: Paging<i64>,
    ) -> Result<(ReceivedPage, u64)> {
        Ok((self.received(user, span, page)?, self.best_luck_count(user, span)?))
    }

    /// Where the store's history stops being complete: claims and entries of the days before
    /// this instant may have been moved out of the store to an archive (`hongbao archive`),
    /// so history before it answers from what is left, and a packet created before it may
    /// list fewer claims than it paid. `None` when nothing was archived (the default: stores
    /// that never archive). A store may answer from a cache a few seconds old.
    fn archived_before(&self) -> Result<Option<Millis>> {
        Ok(None)
    }

    /// One user's share of a packet. The default pages through the claims; a store with an
    /// index on (packet, user) answers it in one lookup.
    fn claim_of(&self, id: PacketId, user: &UserId) -> Result<Option<Claim>> {
        let mut after = None;
        loop {
            let page = self.claims(id, after, 1_000)?;
            if let Some(c) = page.iter().find(|c| &c.user == user) {
                return Ok(Some(c.clone()));
            }
            match page.last() {
                Some(last) if page.len() == 1_000 => after = Some(last.index),
                _ => return Ok(None),
            }
        }
    }
}

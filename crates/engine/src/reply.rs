//! What the engine answers. Plain data: the API turns these into JSON.

use hongbao_core::packet::PacketHeader;
use hongbao_core::{ClaimError, Kind, Millis, PacketId, PacketStatus, UserId};
use hongbao_store::{EntryKind, StoreError};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EngineError {
    #[error("not found")]
    NotFound,
    #[error("insufficient funds")]
    InsufficientFunds,
    #[error("the balance would exceed its limit")]
    BalanceLimit,
    #[error("this request_id was used with a different request")]
    IdempotencyConflict,
    #[error(transparent)]
    Claim(#[from] ClaimError),
    /// The set's queue is full: refused at once, the caller may retry shortly.
    #[error("overloaded")]
    Overloaded,
    /// The set is restarting after a store failure, or the engine is shutting down. Nothing
    /// of the request was acknowledged.
    #[error("unavailable")]
    Unavailable,
    /// A store read failed.
    #[error("store read failed: {0}")]
    Store(String),
}

/// A store that is only busy (it would have kept the caller waiting long) is overload, to
/// retry shortly; any other store failure is `Store`.
impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> EngineError {
        match e {
            StoreError::Busy(_) => EngineError::Overloaded,
            e => EngineError::Store(e.to_string()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletReply {
    pub user: UserId,
    pub balance_fen: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketSummary {
    pub id: PacketId,
    pub sender: UserId,
    pub kind: Kind,
    pub total_fen: i64,
    pub count: u32,
    pub greeting: String,
    pub created_at_ms: Millis,
    pub expires_at_ms: Millis,
}

impl PacketSummary {
    /// What a reply says about a packet: the parts that never change after the send.
    pub fn of(h: &PacketHeader) -> PacketSummary {
        PacketSummary {
            id: h.id,
            sender: h.sender.clone(),
            kind: h.kind,
            total_fen: h.total_fen,
            count: h.count,
            greeting: h.greeting.clone(),
            created_at_ms: h.created_at_ms,
            expires_at_ms: h.expires_at_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrabReply {
    Grabbed {
        hold_expires_at_ms: Millis,
    },
    /// The user had opened a share of this packet already.
    AlreadyOpened(ClaimReply),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimReply {
    pub packet_id: PacketId,
    pub user: UserId,
    pub amount_fen: i64,
    pub at_ms: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryView {
    pub id: i64,
    pub kind: EntryKind,
    pub amount_fen: i64,
    pub packet_id: Option<PacketId>,
    pub at_ms: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimView {
    pub user: UserId,
    pub amount_fen: i64,
    pub at_ms: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketDetails {
    pub summary: PacketSummary,
    pub remaining_fen: i64,
    pub remaining_count: u32,
    pub status: PacketStatus,
    pub best_luck: Option<ClaimView>,
    pub claims: Vec<ClaimView>,
    /// Share index of the last claim on this page, when more may follow.
    pub next_cursor: Option<u32>,
    /// Set when this packet's claims may have been moved to the archive (`hongbao archive`):
    /// it was created before this instant, so the list may lack claims it paid.
    pub archived_before_ms: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntriesPage {
    pub entries: Vec<EntryView>,
    pub next_cursor: Option<i64>,
    /// Entries before this instant may be in the archive, not in this history.
    pub archived_before_ms: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentItem {
    pub summary: PacketSummary,
    pub status: PacketStatus,
    pub remaining_fen: i64,
    pub remaining_count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentHistory {
    pub count: u64,
    pub total_fen: i64,
    pub items: Vec<SentItem>,
    pub next_cursor: Option<PacketId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedItem {
    pub packet_id: PacketId,
    pub amount_fen: i64,
    pub at_ms: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedHistory {
    pub count: u64,
    pub total_fen: i64,
    pub best_luck_count: u64,
    pub items: Vec<ReceivedItem>,
    pub next_cursor: Option<i64>,
    /// Shares received before this instant may be in the archive: the items, count and
    /// total cover what is live only.
    pub archived_before_ms: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    /// True when conservation holds and every set's memory matches its store.
    pub ok: bool,
    pub deposits_fen: i64,
    pub withdrawals_fen: i64,
    pub balances_fen: i64,
    pub escrow_fen: i64,
    pub in_flight_fen: i64,
    /// Why `ok` is false, for the log and the admin.
    pub problems: Vec<String>,
}

/// Live figures for `/metrics` and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetStatus {
    pub set: u32,
    pub queue_depth: usize,
    /// False while the set is restarting after a store failure.
    pub ready: bool,
    /// Commits its store's reads do not see yet (the journal's unfolded records); `None` when
    /// reads see every commit.
    pub unapplied_commits: Option<u64>,
    /// Its store's background apply gives way to the claims (see `Reader::fold_giving_way`).
    pub fold_giving_way: Option<bool>,
}

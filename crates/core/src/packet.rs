//! The packet state machine: send, grab (reserve with a hold), open (settle), claim (both),
//! hold timeout, expiry with a single refund, and best luck.
//!
//! Expected outcomes that turn a user away (not eligible, exhausted, expired, not grabbed) are
//! `ClaimError` values. A broken invariant (DESIGN.md §2 items 2–5) is a bug and panics.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::amount::{equal_share, AmountRule};
use crate::claims::Claims;
use crate::clock::Millis;
use crate::ids::{PacketId, UserId};
use crate::limits::ValidSend;
use crate::FastMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    Lucky,
    Equal,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Lucky => "lucky",
            Kind::Equal => "equal",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "lucky" => Some(Kind::Lucky),
            "equal" => Some(Kind::Equal),
            _ => None,
        }
    }
}

/// Who may claim: a group (sorted, without duplicates; one user is a 1:1 packet) or anyone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Audience {
    Users(Box<[UserId]>),
    Anyone,
}

impl Audience {
    pub fn users(users: impl IntoIterator<Item = UserId>) -> Audience {
        let mut v: Vec<UserId> = users.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        Audience::Users(v.into_boxed_slice())
    }

    pub fn admits(&self, user: &UserId) -> bool {
        match self {
            Audience::Anyone => true,
            Audience::Users(users) => users.binary_search(user).is_ok(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PacketStatus {
    /// Open for grabs until it is fully opened or expires.
    Active,
    /// Every share is opened.
    Exhausted,
    /// Closed by expiry; what was left went back to the sender.
    Expired,
}

impl PacketStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PacketStatus::Active => "active",
            PacketStatus::Exhausted => "exhausted",
            PacketStatus::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<PacketStatus> {
        match s {
            "active" => Some(PacketStatus::Active),
            "exhausted" => Some(PacketStatus::Exhausted),
            "expired" => Some(PacketStatus::Expired),
            _ => None,
        }
    }
}

/// A settled share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub user: UserId,
    pub amount_fen: i64,
    pub at_ms: Millis,
    /// Position among the packet's shares, from 0.
    pub index: u32,
}

pub type BestLuck = Claim;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ClaimError {
    #[error("not in this packet's audience")]
    NotEligible,
    #[error("every share of this packet is taken")]
    Exhausted,
    #[error("this packet has expired")]
    Expired,
    #[error("no live grab to open: grab first")]
    NotGrabbed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrabOutcome {
    /// A share is reserved for the user until the hold expires.
    Grabbed { hold_expires_at_ms: Millis },
    /// The user had opened a share already.
    AlreadyOpened(Claim),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOutcome {
    pub claim: Claim,
    /// False when the user asked again for a share settled earlier: no money moves.
    pub fresh: bool,
}

/// What never changes after a send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketHeader {
    pub id: PacketId,
    pub sender: UserId,
    pub kind: Kind,
    pub total_fen: i64,
    pub count: u32,
    pub audience: Audience,
    pub greeting: String,
    pub created_at_ms: Millis,
    pub expires_at_ms: Millis,
    /// Seed of the per-packet random source that decides lucky amounts.
    pub seed: u64,
    /// The rule that draws its lucky amounts from the seed: the current one at send.
    pub amount_rule: AmountRule,
}

#[derive(Debug, Clone)]
pub struct Packet {
    header: PacketHeader,
    status: PacketStatus,
    opened_count: u32,
    opened_fen: i64,
    refunded_fen: i64,
    /// Shared, so a closed packet's claims (which never change again) can be handed out
    /// without a copy; an open packet's are this packet's alone, so adding one never copies.
    claims: Arc<Claims>,
    /// Live reservations: user → when the hold lapses. Not stored: a restart drops holds, which
    /// moves no money and only puts the shares back in the pool.
    holds: FastMap<UserId, Millis>,
    best: Option<Claim>,
}

/// Claims a packet's list is made for at its first claim: all of its shares, up to this many.
/// Grown one doubling at a time instead, a 1,000-share packet's map was rehashed and
/// reallocated nine times, and that was a tenth of a set thread's time in the in-process
/// festival (BENCHMARKS.md, 2026-12-04). A packet of up to this many shares holds from its
/// first claim the list it holds when every share is claimed (40 bytes a claim and 8 bytes an
/// index bucket: 58 KiB for 1,000 shares); a packet without claims holds none.
const CLAIMS_PRESIZED_MAX: u32 = 1024;

/// One empty claims list for every packet without claims (a million resident packets would
/// otherwise hold a million empty allocations); the first share settled replaces it.
fn no_claims() -> Arc<Claims> {
    static EMPTY: std::sync::OnceLock<Arc<Claims>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(Arc::default).clone()
}

impl Packet {
    pub fn new(id: PacketId, send: &ValidSend, now_ms: Millis, seed: u64) -> Packet {
        let header = PacketHeader {
            id,
            sender: send.sender.clone(),
            kind: send.kind,
            total_fen: send.total.fen(),
            count: send.count,
            audience: send.audience.clone(),
            greeting: send.greeting.clone(),
            created_at_ms: now_ms,
            expires_at_ms: now_ms + send.expires_in_s * 1000,
            seed,
            amount_rule: AmountRule::CURRENT,
        };
        Packet::restore(header, PacketStatus::Active, 0, Vec::new())
    }

    /// Rebuilds a packet from what a store holds, checking that it adds up.
    pub fn restore(
        header: PacketHeader,
        status: PacketStatus,
        refunded_fen: i64,
        claims: Vec<Claim>,
    ) -> Packet {
        let mut p = Packet {
            header,
            status,
            opened_count: 0,
            opened_fen: 0,
            refunded_fen,
            claims: no_claims(),
            holds: FastMap::default(),
            best: None,
        };
        let mut by_user = Claims::with_capacity(claims.len());
        let mut claims = claims;
        claims.sort_by_key(|c| c.index);
        for c in claims {
            p.opened_count += 1;
            p.opened_fen = p.opened_fen.checked_add(c.amount_fen).expect("opened sum overflows");
            p.note_best(&c);
            let dup = by_user.insert(c);
            assert!(dup.is_ok(), "a user holds two shares of packet {}", p.header.id);
        }
        if !by_user.is_empty() {
            p.claims = Arc::new(by_user);
        }
        p.check_invariants();
        p
    }

    pub fn header(&self) -> &PacketHeader {
        &self.header
    }

    pub fn id(&self) -> PacketId {
        self.header.id
    }

    pub fn status(&self) -> PacketStatus {
        self.status
    }

    pub fn opened_count(&self) -> u32 {
        self.opened_count
    }

    pub fn opened_fen(&self) -> i64 {
        self.opened_fen
    }

    pub fn refunded_fen(&self) -> i64 {
        self.refunded_fen
    }

    pub fn remaining_fen(&self) -> i64 {
        self.header.total_fen - self.opened_fen
    }

    pub fn remaining_count(&self) -> u32 {
        self.header.count - self.opened_count
    }

    /// Money still held for this packet: neither paid out nor refunded.
    pub fn escrow_fen(&self) -> i64 {
        self.header.total_fen - self.opened_fen - self.refunded_fen
    }

    pub fn claim_of(&self, user: &UserId) -> Option<&Claim> {
        self.claims.get(user)
    }

    /// Every claim, in the order they were opened.
    pub fn claims(&self) -> impl Iterator<Item = &Claim> {
        self.claims.iter()
    }

    /// The claims, shared rather than copied: a closed packet's never change again.
    pub fn claims_shared(&self) -> Arc<Claims> {
        self.claims.clone()
    }

    /// The largest share once every share is opened; ties go to the earliest.
    pub fn best_luck(&self) -> Option<&Claim> {
        match self.status {
            PacketStatus::Exhausted => self.best.as_ref(),
            _ => None,
        }
    }

    pub fn is_due(&self, now_ms: Millis) -> bool {
        self.status == PacketStatus::Active && now_ms >= self.header.expires_at_ms
    }

    /// Closes a due packet and returns the refund owed to the sender, exactly once.
    pub fn expire(&mut self, now_ms: Millis) -> Option<i64> {
        if !self.is_due(now_ms) {
            return None;
        }
        let refund = self.remaining_fen();
        assert!(refund >= 1, "an active packet always has something left");
        self.status = PacketStatus::Expired;
        self.refunded_fen = refund;
        self.holds.clear();
        self.check_invariants();
        Some(refund)
    }

    /// Checks shared by grab, open and claim; `Ok(Some)` is a share the user already has.
    fn admit(&self, user: &UserId, now_ms: Millis) -> Result<Option<Claim>, ClaimError> {
        if let Some(c) = self.claims.get(user) {
            return Ok(Some(c.clone()));
        }
        if !self.header.audience.admits(user) {
            return Err(ClaimError::NotEligible);
        }
        if self.status == PacketStatus::Expired || now_ms >= self.header.expires_at_ms {
            return Err(ClaimError::Expired);
        }
        if self.status == PacketStatus::Exhausted {
            return Err(ClaimError::Exhausted);
        }
        Ok(None)
    }

    /// Whether a share is free for someone without a hold, dropping lapsed holds if needed.
    fn has_free_share(&mut self, now_ms: Millis) -> bool {
        let taken = |p: &Packet| p.opened_count as usize + p.holds.len();
        if taken(self) < self.header.count as usize {
            return true;
        }
        self.holds.retain(|_, until| *until > now_ms);
        taken(self) < self.header.count as usize
    }

    pub fn grab(&mut self, user: &UserId, now_ms: Millis, hold_ms: i64) -> Result<GrabOutcome, ClaimError> {
        if let Some(c) = self.admit(user, now_ms)? {
            return Ok(GrabOutcome::AlreadyOpened(c));
        }
        if let Some(until) = self.holds.get(user) {
            if *until > now_ms {
                return Ok(GrabOutcome::Grabbed { hold_expires_at_ms: *until });
            }
            self.holds.remove(user);
        }
        if !self.has_free_share(now_ms) {
            return Err(ClaimError::Exhausted);
        }
        let until = now_ms + hold_ms;
        self.holds.insert(user.clone(), until);
        Ok(GrabOutcome::Grabbed { hold_expires_at_ms: until })
    }

    pub fn open(&mut self, user: &UserId, now_ms: Millis) -> Result<OpenOutcome, ClaimError> {
        if let Some(claim) = self.admit(user, now_ms)? {
            return Ok(OpenOutcome { claim, fresh: false });
        }
        match self.holds.remove(user) {
            Some(until) if until > now_ms => {
                Ok(OpenOutcome { claim: self.settle(user, now_ms), fresh: true })
            }
            _ => Err(ClaimError::NotGrabbed),
        }
    }

    /// Asks the CPU to fetch where `user`'s claim is or would go in this packet, ahead of a
    /// claim or an open. Only a hint: nothing changes.
    pub fn prefetch_claim(&self, user: &UserId) {
        self.claims.prefetch(user);
    }

    pub fn claim(&mut self, user: &UserId, now_ms: Millis) -> Result<OpenOutcome, ClaimError> {
        if let Some(claim) = self.admit(user, now_ms)? {
            return Ok(OpenOutcome { claim, fresh: false });
        }
        // Most packets are claimed without a grab first: no holds, and no user to hash for them.
        let held = !self.holds.is_empty() && matches!(self.holds.remove(user), Some(until) if until > now_ms);
        if !held && !self.has_free_share(now_ms) {
            return Err(ClaimError::Exhausted);
        }
        Ok(OpenOutcome { claim: self.settle(user, now_ms), fresh: true })
    }

    fn settle(&mut self, user: &UserId, now_ms: Millis) -> Claim {
        assert_eq!(self.status, PacketStatus::Active);
        let rc = self.remaining_count();
        let ra = self.remaining_fen();
        assert!(rc >= 1, "settling a share of a packet with none left");
        let index = self.opened_count;
        let amount_fen = match self.header.kind {
            Kind::Equal => equal_share(self.header.total_fen, self.header.count),
            Kind::Lucky => self.header.amount_rule.lucky_share(self.header.seed, index, ra, rc),
        };
        // DESIGN.md §2.3 and §2.4: at least 1 fen, at most twice the remaining average unless last.
        assert!(amount_fen >= 1 && amount_fen <= ra, "share {amount_fen} out of [1, {ra}]");
        if self.header.kind == Kind::Lucky && rc > 1 {
            assert!(amount_fen <= ra * 2 / i64::from(rc), "double-average rule broken");
        }
        let claim = Claim { user: user.clone(), amount_fen, at_ms: now_ms, index };
        self.opened_count += 1;
        self.opened_fen += amount_fen;
        self.note_best(&claim);
        if self.claims.capacity() == 0 {
            let shares = self.header.count.min(CLAIMS_PRESIZED_MAX) as usize;
            self.claims = Arc::new(Claims::with_capacity(shares));
        }
        let fresh = Arc::make_mut(&mut self.claims).insert(claim.clone());
        assert!(fresh.is_ok(), "{user} settled a second share of packet {}", self.header.id);
        if self.opened_count == self.header.count {
            self.status = PacketStatus::Exhausted;
            self.holds.clear();
        }
        self.check_invariants();
        claim
    }

    fn note_best(&mut self, c: &Claim) {
        let better = match &self.best {
            None => true,
            Some(b) => c.amount_fen > b.amount_fen || (c.amount_fen == b.amount_fen && c.index < b.index),
        };
        if better {
            self.best = Some(c.clone());
        }
    }

    /// DESIGN.md §2 items 2 and 3 for this packet.
    fn check_invariants(&self) {
        let h = &self.header;
        assert!(self.opened_count <= h.count, "packet {} paid more shares than count", h.id);
        assert_eq!(self.opened_count as usize, self.claims.len());
        assert!(self.opened_fen <= h.total_fen, "packet {} paid more than its total", h.id);
        assert!(self.refunded_fen >= 0 && self.escrow_fen() >= 0);
        assert!(self.opened_fen >= i64::from(self.opened_count), "packet {} has a share under 1 fen", h.id);
        match self.status {
            PacketStatus::Active => {
                assert!(self.opened_count < h.count && self.refunded_fen == 0);
                assert!(self.remaining_fen() >= i64::from(self.remaining_count()));
            }
            PacketStatus::Exhausted => {
                assert_eq!(self.opened_count, h.count);
                assert_eq!(self.opened_fen, h.total_fen, "packet {} shares do not sum to its total", h.id);
                assert_eq!(self.refunded_fen, 0);
            }
            PacketStatus::Expired => {
                assert_eq!(self.escrow_fen(), 0, "packet {} expired with money in escrow", h.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Amount, RequestId};

    fn packet(count: u32) -> Packet {
        let send = ValidSend {
            sender: UserId::parse("sender").unwrap(),
            kind: Kind::Lucky,
            total: Amount::new(i64::from(count) * 100).unwrap(),
            count,
            audience: Audience::Anyone,
            greeting: String::new(),
            expires_in_s: 60,
            request_id: RequestId::parse("r").unwrap(),
        };
        Packet::new(PacketId::from_raw(1 << 30).unwrap(), &send, 1_000, 7)
    }

    fn user(i: u32) -> UserId {
        UserId::parse(&format!("u{i}")).unwrap()
    }

    #[test]
    fn the_first_claim_makes_the_claims_list_for_every_share_up_to_the_bound() {
        for (count, made_for) in [(1, 1), (10, 10), (1_000, 1_000), (5_000, CLAIMS_PRESIZED_MAX as usize)] {
            let mut p = packet(count);
            assert_eq!(p.claims.capacity(), 0, "a packet without claims holds no list of its own");
            p.claim(&user(0), 2_000).unwrap();
            let capacity = p.claims.capacity();
            assert!(capacity >= made_for, "{count} shares: made for {capacity} claims, not {made_for}");
            for i in 1..count.min(CLAIMS_PRESIZED_MAX) {
                p.claim(&user(i), 2_000).unwrap();
            }
            assert_eq!(p.claims.capacity(), capacity, "{count} shares: the list grew before the bound");
        }
        assert_eq!(no_claims().capacity(), 0, "the shared empty list stays empty");
    }
}

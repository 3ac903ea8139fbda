//! Property tests of the packet state machine, the amount rule and send validation: DESIGN.md
//! §2 items 2–5 and the audience half of item 8, checked after every step against a model kept
//! here.
//!
//! The model shares no code with `Packet`: plain ordered maps of claims and holds, from which
//! the outcome of every call is worked out before the call is made and then compared with what
//! the packet answered. The only thing borrowed from the crate is `lucky_share` itself, and only
//! to check that a share's amount depends on nothing but the seed, its position and what is
//! left (its bounds are checked from first principles).

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use hongbao_core::money::AMOUNT_MAX_FEN;
use hongbao_core::{
    lucky_share, Audience, Claim, ClaimError, GrabOutcome, Kind, Limits, OpenOutcome, Packet, PacketIdGen,
    PacketStatus, RequestId, SendError, SendRequest, UserId,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// 2026-01-01T00:00:00Z: packets are sent at this instant and the clock only moves forward.
const T0_MS: i64 = 1_767_225_600_000;
/// Most shares in a random packet: large enough that a packet outlives many holds and rushes,
/// small enough that a debug build runs hundreds of cases in seconds.
const COUNT_MAX: u32 = 2_000;
/// Most users in a random group audience.
const GROUP_MAX: u32 = 300;
/// Largest average share of a random packet, in fen.
const SHARE_AVERAGE_MAX_FEN: i64 = 10_000;

// ---------------------------------------------------------------------------------------------
// Random packets and random operations.

#[derive(Debug, Clone)]
struct Spec {
    kind: Kind,
    count: u32,
    total_fen: i64,
    /// `None` is `anyone`; `Some(n)` is the group of users `m0` … `m{n-1}`.
    group: Option<u32>,
    seed: u64,
    hold_ms: i64,
    expires_in_s: i64,
}

fn spec() -> impl Strategy<Value = Spec> {
    let audience = prop_oneof![Just(None), (1..=GROUP_MAX).prop_map(Some)];
    (audience, any::<bool>())
        .prop_flat_map(|(group, lucky)| {
            // Small packets are where the edge cases live (the last share, a full group), so
            // they are drawn far more often than a uniform count would draw them.
            let most = group.unwrap_or(COUNT_MAX);
            let count = prop_oneof![1..=most.min(4), 1..=most.min(40), 1..=most, Just(most)];
            (Just(group), Just(lucky), count)
        })
        .prop_flat_map(|(group, lucky, count)| {
            let c = i64::from(count);
            // Tight totals (a fen or two per share) exercise the cap that keeps 1 fen for
            // every later share; loose ones the double-average bound.
            let total = if lucky {
                prop_oneof![c..=c + 3, c..=c * 3, c..=c * SHARE_AVERAGE_MAX_FEN].boxed()
            } else {
                prop_oneof![1i64..=3, 1..=SHARE_AVERAGE_MAX_FEN].prop_map(move |per| per * c).boxed()
            };
            (Just(group), Just(lucky), Just(count), total, any::<u64>(), 1i64..=60_000, 1i64..=3_600)
        })
        .prop_map(|(group, lucky, count, total_fen, seed, hold_ms, expires_in_s)| Spec {
            kind: if lucky { Kind::Lucky } else { Kind::Equal },
            count,
            total_fen,
            group,
            seed,
            hold_ms,
            expires_in_s,
        })
}

/// Who makes a call. Indexes wrap around whatever list they pick from.
#[derive(Debug, Clone, Copy)]
enum Who {
    /// A member of the audience (any name at all for `anyone`).
    Member(u16),
    /// Someone outside a group: either an unrelated name or one that sorts among the members.
    /// For `anyone` there are no outsiders and this is just another user.
    Outsider(u16),
    /// Someone who called before: repeats.
    Seen(u16),
    /// Someone holding a share, live or lapsed.
    Holder(u16),
    /// A member who never called.
    Fresh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Grab,
    Open,
    Claim,
}

#[derive(Debug, Clone, Copy)]
enum Wait {
    /// Less than a hold: holds granted since stay live.
    UnderHold(u16),
    /// A hold, give or take a millisecond: a hold lapses exactly at `until`.
    Hold(i8),
    /// Several holds: every hold lapses.
    PastHold(u8),
    /// To the expiry instant, give or take a millisecond.
    ToExpiry(i8),
}

#[derive(Debug, Clone)]
enum Op {
    Act(Call, Who),
    /// Many fresh members grab or claim one after the other, as when a packet lands in a group.
    Rush(Call, u16),
    /// Everyone holding a share opens it.
    OpenHolders,
    Wait(Wait),
    Expire,
    /// Compare every claim of the packet with the model.
    Audit,
}

fn who() -> impl Strategy<Value = Who> {
    prop_oneof![
        3 => any::<u16>().prop_map(Who::Member),
        1 => any::<u16>().prop_map(Who::Outsider),
        2 => any::<u16>().prop_map(Who::Seen),
        3 => any::<u16>().prop_map(Who::Holder),
        3 => Just(Who::Fresh),
    ]
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![3 => Just(Call::Grab), 3 => Just(Call::Open), 4 => Just(Call::Claim)]
}

fn wait(to_expiry: bool) -> BoxedStrategy<Wait> {
    let within = prop_oneof![
        3 => any::<u16>().prop_map(Wait::UnderHold),
        2 => (-1i8..=1).prop_map(Wait::Hold),
        2 => (2u8..=10).prop_map(Wait::PastHold),
    ];
    if to_expiry {
        prop_oneof![7 => within, 1 => (-1i8..=1).prop_map(Wait::ToExpiry)].boxed()
    } else {
        within.boxed()
    }
}

/// `to_expiry`: whether the clock may jump to the packet's expiry.
fn op(to_expiry: bool) -> impl Strategy<Value = Op> {
    let rush_call = prop_oneof![Just(Call::Grab), Just(Call::Claim)];
    prop_oneof![
        12 => (call(), who()).prop_map(|(c, w)| Op::Act(c, w)),
        2 => (rush_call, prop_oneof![1u16..=5, 1u16..=2_000]).prop_map(|(c, n)| Op::Rush(c, n)),
        1 => Just(Op::OpenHolders),
        4 => wait(to_expiry).prop_map(Op::Wait),
        1 => Just(Op::Expire),
        1 => Just(Op::Audit),
    ]
}

fn ops(to_expiry: bool) -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(to_expiry), 1..=150)
}

fn name(prefix: &str, i: u32) -> UserId {
    UserId::parse(&format!("{prefix}{i}")).unwrap()
}

fn make_packet(spec: &Spec) -> Packet {
    let audience = match spec.group {
        None => Audience::Anyone,
        Some(n) => Audience::users((0..n).map(|i| name("m", i))),
    };
    let send = Limits::default()
        .validate_send(SendRequest {
            sender: name("sender", 0),
            kind: spec.kind,
            total_fen: spec.total_fen,
            count: i64::from(spec.count),
            audience,
            greeting: None,
            expires_in_s: Some(spec.expires_in_s),
            request_id: RequestId::parse("r").unwrap(),
        })
        .expect("the random packet is a valid send");
    Packet::new(PacketIdGen::new(0, None).next(T0_MS), &send, T0_MS, spec.seed)
}

// ---------------------------------------------------------------------------------------------
// The model.

/// How often each outcome came up, to show the random runs reach every branch.
#[derive(Debug, Default)]
struct Stats {
    grabbed: u64,
    grabbed_again_same_hold: u64,
    grab_already_opened: u64,
    opened_fresh: u64,
    claimed_fresh: u64,
    repeats: u64,
    repeats_after_expiry: u64,
    not_eligible: u64,
    expired: u64,
    exhausted: u64,
    not_grabbed: u64,
    /// Open by a user whose hold had lapsed.
    not_grabbed_lapsed: u64,
    /// A share granted only because a lapsed hold gave its place up.
    lapsed_hold_taken_over: u64,
    refunds: u64,
    second_expire_none: u64,
    exhausted_packets: u64,
    lucky_last_shares: u64,
}

/// What an open or a claim should answer.
#[derive(Debug)]
enum Expect {
    Err(ClaimError),
    Repeat(Claim),
    Fresh,
}

struct Model {
    spec: Spec,
    group: Option<BTreeSet<UserId>>,
    expires_at_ms: i64,
    now_ms: i64,
    status: PacketStatus,
    claims: BTreeMap<UserId, Claim>,
    /// Amounts by position.
    amounts: Vec<i64>,
    paid_fen: i64,
    refund_fen: Option<i64>,
    /// User → the instant the hold lapses; lapsed holds stay until something removes them.
    holds: BTreeMap<UserId, i64>,
    /// The live holds by the instant they lapse, pruned as the clock passes: counting live
    /// holds stays cheap when two thousand users hold shares.
    live: BTreeSet<(i64, UserId)>,
    /// (amount, position) of the largest share so far; ties keep the earliest.
    best: Option<(i64, u32)>,
    /// Users in the order of their first call.
    seen: Vec<UserId>,
    seen_set: BTreeSet<UserId>,
    next_fresh: u32,
}

impl Model {
    fn new(spec: &Spec) -> Model {
        Model {
            spec: spec.clone(),
            group: spec.group.map(|n| (0..n).map(|i| name("m", i)).collect()),
            expires_at_ms: T0_MS + spec.expires_in_s * 1000,
            now_ms: T0_MS,
            status: PacketStatus::Active,
            claims: BTreeMap::new(),
            amounts: Vec::new(),
            paid_fen: 0,
            refund_fen: None,
            holds: BTreeMap::new(),
            live: BTreeSet::new(),
            best: None,
            seen: Vec::new(),
            seen_set: BTreeSet::new(),
            next_fresh: 0,
        }
    }

    fn count(&self) -> usize {
        self.spec.count as usize
    }

    fn is_member(&self, u: &UserId) -> bool {
        self.group.as_ref().is_none_or(|g| g.contains(u))
    }

    fn resolve(&mut self, who: Who) -> UserId {
        let u = match who {
            Who::Member(i) => match self.spec.group {
                Some(n) => name("m", u32::from(i) % n),
                None => name("m", u32::from(i)),
            },
            Who::Outsider(i) => match self.spec.group {
                Some(n) if i % 2 == 1 => name("m", n + u32::from(i)),
                _ => name("x", u32::from(i)),
            },
            Who::Seen(i) if !self.seen.is_empty() => self.seen[usize::from(i) % self.seen.len()].clone(),
            Who::Seen(_) => return self.resolve(Who::Fresh),
            Who::Holder(i) if !self.holds.is_empty() => {
                self.holds.keys().nth(usize::from(i) % self.holds.len()).unwrap().clone()
            }
            Who::Holder(i) => return self.resolve(Who::Seen(i)),
            Who::Fresh => self.fresh(),
        };
        if self.seen_set.insert(u.clone()) {
            self.seen.push(u.clone());
        }
        u
    }

    fn fresh(&mut self) -> UserId {
        match self.spec.group {
            Some(n) => {
                while self.next_fresh < n && self.seen_set.contains(&name("m", self.next_fresh)) {
                    self.next_fresh += 1;
                }
                // A group whose every member has called has no fresh member: repeat the first.
                name("m", if self.next_fresh < n { self.next_fresh } else { 0 })
            }
            None => loop {
                let u = name("f", self.next_fresh);
                self.next_fresh += 1;
                if !self.seen_set.contains(&u) {
                    return u;
                }
            },
        }
    }

    /// Holds other than `u`'s; `live_only` leaves out the lapsed ones.
    fn holding(&mut self, u: &UserId, live_only: bool) -> usize {
        let own = self.holds.get(u).copied();
        if !live_only {
            return self.holds.len() - usize::from(own.is_some());
        }
        while self.live.first().is_some_and(|(until, _)| *until <= self.now_ms) {
            self.live.pop_first();
        }
        self.live.len() - usize::from(own.is_some_and(|until| until > self.now_ms))
    }

    fn hold(&mut self, u: &UserId, until: i64) {
        self.hold_drop(u);
        self.holds.insert(u.clone(), until);
        self.live.insert((until, u.clone()));
    }

    fn hold_drop(&mut self, u: &UserId) -> Option<i64> {
        let until = self.holds.remove(u)?;
        self.live.remove(&(until, u.clone()));
        Some(until)
    }

    fn holds_clear(&mut self) {
        self.holds.clear();
        self.live.clear();
    }

    /// Checks common to grab, open and claim, in the order the contract gives them: a share the
    /// user has is always theirs to see; then the audience; then expiry; then exhaustion.
    fn admit(&self, u: &UserId) -> Result<Option<Claim>, ClaimError> {
        if let Some(c) = self.claims.get(u) {
            return Ok(Some(c.clone()));
        }
        if !self.is_member(u) {
            return Err(ClaimError::NotEligible);
        }
        if self.status == PacketStatus::Expired || self.now_ms >= self.expires_at_ms {
            return Err(ClaimError::Expired);
        }
        if self.status == PacketStatus::Exhausted {
            return Err(ClaimError::Exhausted);
        }
        Ok(None)
    }

    /// Whether a share is free for `u` (whose own hold is already dropped), noting when only a
    /// lapsed hold made room.
    fn free_share(&mut self, u: &UserId, stats: &mut Stats) -> bool {
        let free = self.amounts.len() + self.holding(u, true) < self.count();
        if free && self.amounts.len() + self.holding(u, false) >= self.count() {
            stats.lapsed_hold_taken_over += 1;
        }
        free
    }

    fn act(
        &mut self,
        p: &mut Packet,
        call: Call,
        u: &UserId,
        stats: &mut Stats,
    ) -> Result<(), TestCaseError> {
        match call {
            Call::Grab => self.grab(p, u, stats)?,
            // The answer is checked inside; only the restore test needs it back.
            Call::Open => drop(self.open(p, u, stats)?),
            Call::Claim => drop(self.claim(p, u, stats)?),
        }
        prop_assert_eq!(p.claim_of(u), self.claims.get(u), "claim_of({})", u);
        Ok(())
    }

    fn grab(&mut self, p: &mut Packet, u: &UserId, stats: &mut Stats) -> Result<(), TestCaseError> {
        let now = self.now_ms;
        let expected = match self.admit(u) {
            Err(e) => Err(e),
            Ok(Some(c)) => Ok(GrabOutcome::AlreadyOpened(c)),
            Ok(None) => match self.holds.get(u) {
                Some(&until) if until > now => {
                    stats.grabbed_again_same_hold += 1;
                    Ok(GrabOutcome::Grabbed { hold_expires_at_ms: until })
                }
                _ => {
                    self.hold_drop(u);
                    if self.free_share(u, stats) {
                        let until = now + self.spec.hold_ms;
                        self.hold(u, until);
                        Ok(GrabOutcome::Grabbed { hold_expires_at_ms: until })
                    } else {
                        Err(ClaimError::Exhausted)
                    }
                }
            },
        };
        let got = p.grab(u, now, self.spec.hold_ms);
        prop_assert_eq!(&got, &expected, "grab by {} at T0+{} ms", u, now - T0_MS);
        match got {
            Ok(GrabOutcome::Grabbed { .. }) => stats.grabbed += 1,
            Ok(GrabOutcome::AlreadyOpened(_)) => stats.grab_already_opened += 1,
            Err(e) => note_error(stats, e),
        }
        Ok(())
    }

    fn open(
        &mut self,
        p: &mut Packet,
        u: &UserId,
        stats: &mut Stats,
    ) -> Result<Result<OpenOutcome, ClaimError>, TestCaseError> {
        let now = self.now_ms;
        let expect = match self.admit(u) {
            Err(e) => Expect::Err(e),
            Ok(Some(c)) => Expect::Repeat(c),
            Ok(None) => match self.hold_drop(u) {
                Some(until) if until > now => Expect::Fresh,
                Some(_) => {
                    stats.not_grabbed_lapsed += 1;
                    Expect::Err(ClaimError::NotGrabbed)
                }
                None => Expect::Err(ClaimError::NotGrabbed),
            },
        };
        let got = p.open(u, now);
        self.settled(Call::Open, u, expect, &got, stats)?;
        Ok(got)
    }

    fn claim(
        &mut self,
        p: &mut Packet,
        u: &UserId,
        stats: &mut Stats,
    ) -> Result<Result<OpenOutcome, ClaimError>, TestCaseError> {
        let now = self.now_ms;
        let expect = match self.admit(u) {
            Err(e) => Expect::Err(e),
            Ok(Some(c)) => Expect::Repeat(c),
            Ok(None) => {
                let held = matches!(self.hold_drop(u), Some(until) if until > now);
                if held || self.free_share(u, stats) {
                    Expect::Fresh
                } else {
                    Expect::Err(ClaimError::Exhausted)
                }
            }
        };
        let got = p.claim(u, now);
        self.settled(Call::Claim, u, expect, &got, stats)?;
        Ok(got)
    }

    /// Compares an open's or a claim's answer with the model's and records a fresh share.
    fn settled(
        &mut self,
        call: Call,
        u: &UserId,
        expect: Expect,
        got: &Result<OpenOutcome, ClaimError>,
        stats: &mut Stats,
    ) -> Result<(), TestCaseError> {
        let at = self.now_ms - T0_MS;
        match expect {
            Expect::Err(e) => {
                prop_assert_eq!(got, &Err(e), "{:?} by {} at T0+{} ms", call, u, at);
                note_error(stats, e);
            }
            Expect::Repeat(claim) => {
                // §2.5: asked again, the same share, and no money moves.
                prop_assert_eq!(got, &Ok(OpenOutcome { claim, fresh: false }), "{:?} again by {}", call, u);
                stats.repeats += 1;
                if self.now_ms >= self.expires_at_ms {
                    stats.repeats_after_expiry += 1;
                }
            }
            Expect::Fresh => match got {
                Ok(OpenOutcome { claim, fresh: true }) => {
                    self.check_share(u, claim, stats)?;
                    self.record(claim.clone(), stats);
                    match call {
                        Call::Open => stats.opened_fresh += 1,
                        _ => stats.claimed_fresh += 1,
                    }
                }
                _ => prop_assert!(
                    false,
                    "{:?} by {} at T0+{} ms: want a fresh share, got {:?}",
                    call,
                    u,
                    at,
                    got
                ),
            },
        }
        Ok(())
    }

    /// §2.3 and §2.4 for a share just opened, against the state just before it.
    fn check_share(&self, u: &UserId, claim: &Claim, stats: &mut Stats) -> Result<(), TestCaseError> {
        let total = self.spec.total_fen;
        let index = self.amounts.len() as u32;
        let rc = self.spec.count - index;
        let ra = total - self.paid_fen;
        let a = claim.amount_fen;
        prop_assert!(self.is_member(u), "§2.8: outsider {} was paid", u);
        prop_assert!(!self.claims.contains_key(u), "§2.5: {} paid a second share", u);
        prop_assert!(rc >= 1, "§2.2: share {} of a {}-share packet", index, self.spec.count);
        prop_assert_eq!(&claim.user, u);
        prop_assert_eq!(claim.index, index, "shares are numbered in opening order");
        prop_assert_eq!(claim.at_ms, self.now_ms);
        prop_assert!(a >= 1, "§2.3: share {} is {} fen", index, a);
        prop_assert!(
            a <= ra - i64::from(rc - 1),
            "share {} of {} leaves under 1 fen for the {} after it",
            a,
            ra,
            rc - 1
        );
        if rc == 1 {
            prop_assert_eq!(a, ra, "§2.4: the last share takes the remainder");
        }
        match self.spec.kind {
            Kind::Equal => prop_assert_eq!(a, total / i64::from(self.spec.count), "equal share"),
            Kind::Lucky => {
                if rc > 1 {
                    // At most twice the average that remains, ra / rc, exactly: a·rc ≤ 2·ra.
                    prop_assert!(
                        i128::from(a) * i128::from(rc) <= 2 * i128::from(ra),
                        "§2.4: share {} > 2 × {} / {}",
                        a,
                        ra,
                        rc
                    );
                } else {
                    stats.lucky_last_shares += 1;
                }
                // Determinism: the amount depends on the seed, the position and what is left only.
                prop_assert_eq!(
                    a,
                    lucky_share(self.spec.seed, index, ra, rc),
                    "share {} is not reproducible",
                    index
                );
            }
        }
        Ok(())
    }

    fn record(&mut self, claim: Claim, stats: &mut Stats) {
        let a = claim.amount_fen;
        if self.best.is_none_or(|(best, _)| a > best) {
            self.best = Some((a, claim.index));
        }
        self.amounts.push(a);
        self.paid_fen += a;
        self.claims.insert(claim.user.clone(), claim);
        if self.amounts.len() == self.count() {
            self.status = PacketStatus::Exhausted;
            self.holds_clear();
            stats.exhausted_packets += 1;
        }
    }

    fn expire(&mut self, p: &mut Packet, stats: &mut Stats) -> Result<(), TestCaseError> {
        let due = self.status == PacketStatus::Active && self.now_ms >= self.expires_at_ms;
        let expected = due.then(|| self.spec.total_fen - self.paid_fen);
        let got = p.expire(self.now_ms);
        prop_assert_eq!(got, expected, "expire at T0+{} ms", self.now_ms - T0_MS);
        if let Some(refund) = got {
            prop_assert!(self.refund_fen.is_none(), "refunded twice");
            self.refund_fen = Some(refund);
            self.status = PacketStatus::Expired;
            self.holds_clear();
            stats.refunds += 1;
        } else if self.refund_fen.is_some() {
            stats.second_expire_none += 1;
        }
        Ok(())
    }

    fn wait(&mut self, w: Wait) {
        let hold = self.spec.hold_ms;
        let ms = match w {
            Wait::UnderHold(x) => i64::from(x) % hold,
            Wait::Hold(d) => hold + i64::from(d),
            Wait::PastHold(k) => hold * i64::from(k) + 1,
            Wait::ToExpiry(d) => (self.expires_at_ms + i64::from(d) - self.now_ms).max(0),
        };
        self.now_ms += ms;
    }

    /// §2.2, §2.3, conservation within the packet, expiry and best luck, after every step.
    fn check(&self, p: &Packet) -> Result<(), TestCaseError> {
        let total = self.spec.total_fen;
        let count = self.count();
        let refund = self.refund_fen.unwrap_or(0);
        let escrow = total - self.paid_fen - refund;
        prop_assert_eq!(p.status(), self.status);
        prop_assert!(self.amounts.len() <= count, "§2.2: {} shares paid of {}", self.amounts.len(), count);
        prop_assert!(self.paid_fen <= total, "§2.2: {} paid of {}", self.paid_fen, total);
        prop_assert_eq!(p.opened_count() as usize, self.amounts.len());
        prop_assert_eq!(p.opened_fen(), self.paid_fen);
        prop_assert_eq!(p.remaining_count() as usize, count - self.amounts.len());
        prop_assert_eq!(p.remaining_fen(), total - self.paid_fen);
        prop_assert_eq!(p.refunded_fen(), refund);
        prop_assert!(escrow >= 0);
        prop_assert_eq!(p.escrow_fen(), escrow);
        prop_assert_eq!(self.paid_fen + p.refunded_fen() + p.escrow_fen(), total, "conservation");
        match self.status {
            PacketStatus::Active => {
                prop_assert!(
                    p.remaining_fen() >= i64::from(p.remaining_count()),
                    "1 fen left for every share"
                )
            }
            PacketStatus::Exhausted => {
                prop_assert_eq!(self.amounts.len(), count);
                prop_assert_eq!(self.paid_fen, total, "§2.3: a fully opened packet sums to its total");
            }
            PacketStatus::Expired => prop_assert_eq!(escrow, 0, "expiry refunds everything unpaid"),
        }
        match (self.status, p.best_luck()) {
            (PacketStatus::Exhausted, Some(best)) => {
                let (amount, index) = self.best.unwrap();
                prop_assert_eq!(best.amount_fen, amount, "best luck is the largest share");
                prop_assert_eq!(best.index, index, "best luck ties go to the earliest");
                prop_assert_eq!(self.claims.get(&best.user), Some(best));
            }
            (PacketStatus::Exhausted, None) => prop_assert!(false, "an exhausted packet has a best luck"),
            (_, best) => prop_assert!(best.is_none(), "best luck before the last share: {:?}", best),
        }
        Ok(())
    }

    /// Every claim of the packet, compared with the model.
    fn audit(&self, p: &Packet) -> Result<(), TestCaseError> {
        let claims: BTreeMap<UserId, Claim> = p.claims().map(|c| (c.user.clone(), c.clone())).collect();
        prop_assert_eq!(claims.len(), p.claims().count(), "one claim per user");
        prop_assert_eq!(&claims, &self.claims);
        let mut by_index: Vec<(u32, i64)> = claims.values().map(|c| (c.index, c.amount_fen)).collect();
        by_index.sort_unstable();
        let want: Vec<(u32, i64)> = self.amounts.iter().enumerate().map(|(i, a)| (i as u32, *a)).collect();
        prop_assert_eq!(by_index, want);
        Ok(())
    }

    fn apply(&mut self, p: &mut Packet, op: &Op, stats: &mut Stats) -> Result<(), TestCaseError> {
        match *op {
            Op::Act(call, who) => {
                let u = self.resolve(who);
                self.act(p, call, &u, stats)?;
                self.check(p)?;
            }
            Op::Rush(call, n) => {
                // A little past the shares left, to meet the exhausted packet too; a closed
                // packet turns everyone away alike, so a few calls show it.
                let open = self.status == PacketStatus::Active && self.now_ms < self.expires_at_ms;
                let left = if open { self.count() - self.amounts.len() } else { 0 };
                let n = usize::from(n).min(left + 2);
                for _ in 0..n {
                    let u = self.resolve(Who::Fresh);
                    self.act(p, call, &u, stats)?;
                    self.check(p)?;
                }
            }
            Op::OpenHolders => {
                let holders: Vec<UserId> = self.holds.keys().cloned().collect();
                for u in holders {
                    self.act(p, Call::Open, &u, stats)?;
                    self.check(p)?;
                }
            }
            Op::Wait(w) => self.wait(w),
            Op::Expire => {
                self.expire(p, stats)?;
                self.check(p)?;
            }
            Op::Audit => self.audit(p)?,
        }
        Ok(())
    }
}

fn note_error(stats: &mut Stats, e: ClaimError) {
    match e {
        ClaimError::NotEligible => stats.not_eligible += 1,
        ClaimError::Expired => stats.expired += 1,
        ClaimError::Exhausted => stats.exhausted += 1,
        ClaimError::NotGrabbed => stats.not_grabbed += 1,
    }
}

/// Runs `ops` on a fresh packet, checking the model after every step; hands back both.
fn run(spec: &Spec, ops: &[Op], stats: &mut Stats) -> Result<(Model, Packet), TestCaseError> {
    let mut p = make_packet(spec);
    let mut model = Model::new(spec);
    prop_assert_eq!(p.header().expires_at_ms, model.expires_at_ms);
    model.check(&p)?;
    for op in ops {
        model.apply(&mut p, op, stats)?;
    }
    model.audit(&p)?;
    Ok((model, p))
}

/// Everything a store keeps about a packet, compared between two packets. The claims one by
/// one only when `claims` is set: comparing them after every step of a 2,000-share packet would
/// make the test quadratic.
fn same_state(a: &Packet, b: &Packet, claims: bool) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.status(), b.status());
    prop_assert_eq!(a.opened_count(), b.opened_count());
    prop_assert_eq!(a.opened_fen(), b.opened_fen());
    prop_assert_eq!(a.remaining_count(), b.remaining_count());
    prop_assert_eq!(a.remaining_fen(), b.remaining_fen());
    prop_assert_eq!(a.refunded_fen(), b.refunded_fen());
    prop_assert_eq!(a.escrow_fen(), b.escrow_fen());
    prop_assert_eq!(a.best_luck(), b.best_luck());
    if claims {
        prop_assert_eq!(a.header(), b.header());
        let all = |p: &Packet| p.claims().map(|c| (c.index, c.clone())).collect::<BTreeMap<_, _>>();
        prop_assert_eq!(all(a), all(b));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The state machine.

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// §2 items 2–5 and the audience, after every step of a random run.
    #[test]
    fn every_step_keeps_the_invariants(spec in spec(), ops in ops(true)) {
        run(&spec, &ops, &mut Stats::default())?;
    }
}

proptest! {
    // Fewer: a packet that never expires lives through every operation, so a case costs more.
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A packet rebuilt from its stored claims (holds are not stored) is the same packet and
    /// goes on paying the same amounts: share k depends only on the seed, k and what is left.
    #[test]
    fn restore_mid_way_continues_identically(
        spec in spec().prop_map(|s| Spec { expires_in_s: 7 * 24 * 3600, ..s }),
        ops in ops(false),
        expire_first in proptest::bool::weighted(0.2),
        reverse in any::<bool>(),
        past_the_end in 0u32..=3,
    ) {
        let mut stats = Stats::default();
        let (mut model, mut a) = run(&spec, &ops, &mut stats)?;
        if expire_first {
            model.now_ms = model.now_ms.max(model.expires_at_ms);
            model.expire(&mut a, &mut stats)?;
        }
        // The store hands claims back in no particular order.
        let mut claims: Vec<Claim> = a.claims().cloned().collect();
        if reverse {
            claims.sort_by_key(|c| Reverse(c.index));
        }
        let mut b = Packet::restore(a.header().clone(), a.status(), a.refunded_fen(), claims);
        same_state(&a, &b, true)?;
        // Let the original's holds lapse, so both packets see the same free shares.
        model.now_ms += spec.hold_ms;
        for _ in 0..a.remaining_count() + past_the_end {
            let u = model.resolve(Who::Fresh);
            let got_a = model.claim(&mut a, &u, &mut stats)?;
            model.check(&a)?;
            let got_b = b.claim(&u, model.now_ms);
            prop_assert_eq!(got_b, got_a, "claim by {} after restore", u);
            same_state(&a, &b, false)?;
        }
        same_state(&a, &b, true)?;
        for u in model.claims.keys() {
            prop_assert_eq!(b.claim(u, model.now_ms), a.claim(u, model.now_ms));
        }
    }

    /// A share whose hold lapses goes back to the pool: the next member takes it, and the
    /// late holder can no longer open.
    #[test]
    fn a_lapsed_hold_lets_another_user_take_the_share(
        count in 1u32..=50,
        group in any::<bool>(),
        lucky in any::<bool>(),
        seed in any::<u64>(),
        hold_ms in 1i64..=60_000,
        late_ms in 0i64..=2,
    ) {
        let spec = Spec {
            kind: if lucky { Kind::Lucky } else { Kind::Equal },
            count,
            total_fen: 100 * i64::from(count),
            group: group.then_some(count + 1),
            seed,
            hold_ms,
            expires_in_s: 3_600,
        };
        let mut p = make_packet(&spec);
        let holders: Vec<UserId> = (0..count).map(|i| name("m", i)).collect();
        let late = name("m", count);
        for u in &holders {
            prop_assert_eq!(p.grab(u, T0_MS, hold_ms), Ok(GrabOutcome::Grabbed { hold_expires_at_ms: T0_MS + hold_ms }));
        }
        let just_before = T0_MS + hold_ms - 1;
        prop_assert_eq!(p.grab(&late, just_before, hold_ms), Err(ClaimError::Exhausted), "every share is held");
        prop_assert_eq!(p.claim(&late, just_before), Err(ClaimError::Exhausted));
        prop_assert_eq!(p.open(&late, just_before), Err(ClaimError::NotGrabbed));
        let first = p.open(&holders[0], just_before).unwrap();
        prop_assert!(first.fresh);
        // A hold lapses at its instant: `until` itself is too late.
        let after = T0_MS + hold_ms + late_ms;
        if count == 1 {
            prop_assert_eq!(p.claim(&late, after), Err(ClaimError::Exhausted));
            prop_assert!(p.best_luck().is_some());
        } else {
            let taken = p.claim(&late, after).unwrap();
            prop_assert!(taken.fresh && taken.claim.user == late && taken.claim.index == 1);
            // A lapsed hold opens nothing (and a packet with no share left says so first).
            let lapsed = if count > 2 { ClaimError::NotGrabbed } else { ClaimError::Exhausted };
            prop_assert_eq!(p.open(&holders[1], after), Err(lapsed));
            // The late holder may grab again while shares are left.
            let again = p.grab(&holders[1], after, hold_ms);
            if count > 2 {
                prop_assert_eq!(again, Ok(GrabOutcome::Grabbed { hold_expires_at_ms: after + hold_ms }));
            } else {
                prop_assert_eq!(again, Err(ClaimError::Exhausted));
            }
        }
        prop_assert_eq!(
            p.open(&holders[0], after),
            Ok(OpenOutcome { claim: first.claim, fresh: false }),
            "the first share stays the first holder's"
        );
    }
}

/// The random runs are only worth something if they reach every outcome: one fixed-seed batch
/// of the same generator, with the tally printed and every outcome required.
#[test]
fn the_random_runs_reach_every_outcome() {
    let stats = RefCell::new(Stats::default());
    let config = Config { cases: 128, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    runner
        .run(&(spec(), ops(true)), |(spec, ops)| run(&spec, &ops, &mut stats.borrow_mut()).map(|_| ()))
        .unwrap();
    let s = stats.into_inner();
    println!("{s:#?}");
    let tally = [
        ("grabbed", s.grabbed),
        ("grabbed_again_same_hold", s.grabbed_again_same_hold),
        ("grab_already_opened", s.grab_already_opened),
        ("opened_fresh", s.opened_fresh),
        ("claimed_fresh", s.claimed_fresh),
        ("repeats", s.repeats),
        ("repeats_after_expiry", s.repeats_after_expiry),
        ("not_eligible", s.not_eligible),
        ("expired", s.expired),
        ("exhausted", s.exhausted),
        ("not_grabbed", s.not_grabbed),
        ("not_grabbed_lapsed", s.not_grabbed_lapsed),
        ("lapsed_hold_taken_over", s.lapsed_hold_taken_over),
        ("refunds", s.refunds),
        ("second_expire_none", s.second_expire_none),
        ("exhausted_packets", s.exhausted_packets),
        ("lucky_last_shares", s.lucky_last_shares),
    ];
    for (outcome, n) in tally {
        assert!(n > 0, "no random run reached {outcome}");
    }
}

// ---------------------------------------------------------------------------------------------
// The amount rule on its own.

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    /// In [1, 2 × remaining average] (exactly: share · rc ≤ 2 · ra), leaving 1 fen for every
    /// later share; the last share is the remainder; the same inputs give the same share.
    #[test]
    fn lucky_share_is_in_range(
        seed in any::<u64>(),
        index in any::<u32>(),
        rc in prop_oneof![1u32..=3, 1u32..=100, 1u32..=100_000],
        extra in prop_oneof![0i64..=3, 0i64..=10_000_000, 0i64..=AMOUNT_MAX_FEN - 100_000],
    ) {
        let ra = i64::from(rc) + extra;
        let s = lucky_share(seed, index, ra, rc);
        prop_assert!(s >= 1);
        prop_assert!(ra - s >= i64::from(rc) - 1, "leaves 1 fen for every later share");
        if rc == 1 {
            prop_assert_eq!(s, ra, "the last share takes the remainder");
        } else {
            prop_assert!(i128::from(s) * i128::from(rc) <= 2 * i128::from(ra), "double average: {} of {} / {}", s, ra, rc);
        }
        prop_assert_eq!(s, lucky_share(seed, index, ra, rc), "the same inputs give the same share");
    }

    /// Drawing every share of a packet in turn pays exactly the total, at least 1 fen each.
    #[test]
    fn lucky_shares_of_a_whole_packet_sum_to_the_total(
        seed in any::<u64>(),
        count in prop_oneof![1u32..=5, 1u32..=COUNT_MAX],
        extra_per_share in prop_oneof![0i64..=2, 0i64..=SHARE_AVERAGE_MAX_FEN],
    ) {
        let total = i64::from(count) * (1 + extra_per_share);
        let mut remaining = total;
        for index in 0..count {
            let s = lucky_share(seed, index, remaining, count - index);
            prop_assert!(s >= 1);
            remaining -= s;
        }
        prop_assert_eq!(remaining, 0);
    }
}

/// The draw uses the room the rule gives it: over many seeds the amounts drawn are every
/// amount from 1 up to a top that lies between ⌈2·ra / rc⌉ − 1 and ⌊2·ra / rc⌋ (or the cap that
/// keeps 1 fen for each later share, when that is lower). A draw stuck near the average, or
/// never reaching the top of its range, fails here.
#[test]
fn lucky_share_spans_the_double_average_range() {
    for (ra, rc) in [(2i64, 2u32), (3, 2), (5, 3), (10, 3), (20, 10), (100, 10), (7, 7), (8, 7), (41, 2)] {
        let rc64 = i64::from(rc);
        let cap = ra - rc64 + 1;
        let top_max = (2 * ra / rc64).min(cap);
        let top_min = ((2 * ra + rc64 - 1) / rc64 - 1).min(cap);
        let seen: BTreeSet<i64> = (0..4_000u64).map(|seed| lucky_share(seed, 0, ra, rc)).collect();
        let top = *seen.last().unwrap();
        assert_eq!(seen, (1..=top).collect(), "{ra} fen over {rc} shares: every amount up to the top");
        assert!((top_min..=top_max).contains(&top), "{ra} fen over {rc} shares: top {top}");
    }
}

// ---------------------------------------------------------------------------------------------
// Send validation.

fn send(kind: Kind, total_fen: i64, count: i64, audience: Audience) -> SendRequest {
    SendRequest {
        sender: name("sender", 0),
        kind,
        total_fen,
        count,
        audience,
        greeting: None,
        expires_in_s: None,
        request_id: RequestId::parse("r").unwrap(),
    }
}

fn group(n: u32) -> Audience {
    Audience::users((0..n).map(|i| name("g", i)))
}

/// Boundaries of every default limit, each side.
#[test]
fn validate_send_table_at_the_default_limits() {
    use Kind::{Equal, Lucky};
    let l = Limits::default();
    let with = |mut r: SendRequest, f: &dyn Fn(&mut SendRequest)| {
        f(&mut r);
        r
    };
    let anyone = Audience::Anyone;
    let twice = Audience::users(["a", "a", "b"].iter().map(|s| UserId::parse(s).unwrap()));
    let cases: Vec<(&str, SendRequest, Result<(), SendError>)> = vec![
        ("one fen, one share", send(Lucky, 1, 1, anyone.clone()), Ok(())),
        ("one fen a share", send(Lucky, 100_000, 100_000, anyone.clone()), Ok(())),
        ("count 0", send(Lucky, 100, 0, anyone.clone()), Err(SendError::CountOutOfRange(100_000))),
        ("count negative", send(Lucky, 100, -1, anyone.clone()), Err(SendError::CountOutOfRange(100_000))),
        (
            "count_max + 1",
            send(Lucky, 200_000, 100_001, anyone.clone()),
            Err(SendError::CountOutOfRange(100_000)),
        ),
        (
            "count past u32",
            send(Lucky, 100, i64::from(u32::MAX) + 2, anyone.clone()),
            Err(SendError::CountOutOfRange(100_000)),
        ),
        ("total 0", send(Lucky, 0, 1, anyone.clone()), Err(SendError::TotalOutOfRange(l.total_max_fen))),
        ("total_max", send(Lucky, 10_000_000_000, 1_000, anyone.clone()), Ok(())),
        (
            "total_max + 1",
            send(Lucky, 10_000_000_001, 100_000, anyone.clone()),
            Err(SendError::TotalOutOfRange(l.total_max_fen)),
        ),
        (
            "i64::MAX",
            send(Lucky, i64::MAX, 1, anyone.clone()),
            Err(SendError::TotalOutOfRange(l.total_max_fen)),
        ),
        ("a fen short", send(Lucky, 4, 5, anyone.clone()), Err(SendError::TotalBelowCount)),
        ("equal divides", send(Equal, 300, 3, anyone.clone()), Ok(())),
        ("equal does not divide", send(Equal, 301, 3, anyone.clone()), Err(SendError::NotDivisible)),
        ("lucky need not divide", send(Lucky, 301, 3, anyone.clone()), Ok(())),
        ("average at the max", send(Lucky, 10_000_000, 1, anyone.clone()), Ok(())),
        (
            "average a fen over",
            send(Lucky, 10_000_001, 1, anyone.clone()),
            Err(SendError::ShareTooLarge(l.share_average_max_fen)),
        ),
        // The average is integer fen, total / count rounded down.
        ("average 10,000,000.5", send(Lucky, 20_000_001, 2, anyone.clone()), Ok(())),
        ("group as large as count", send(Equal, 300, 3, group(3)), Ok(())),
        ("group smaller than count", send(Lucky, 300, 4, group(3)), Err(SendError::CountAboveAudience)),
        ("a repeated member counts once", send(Lucky, 300, 3, twice), Err(SendError::CountAboveAudience)),
        ("empty group", send(Lucky, 300, 1, group(0)), Err(SendError::EmptyAudience)),
        ("group of audience_max", send(Lucky, 300, 1, group(10_000)), Ok(())),
        (
            "group past audience_max",
            send(Lucky, 300, 1, group(10_001)),
            Err(SendError::AudienceTooLarge(10_000)),
        ),
        ("expiry min", with(send(Lucky, 10, 1, anyone.clone()), &|r| r.expires_in_s = Some(1)), Ok(())),
        (
            "expiry under min",
            with(send(Lucky, 10, 1, anyone.clone()), &|r| r.expires_in_s = Some(0)),
            Err(SendError::ExpiryOutOfRange(1, 604_800)),
        ),
        ("expiry max", with(send(Lucky, 10, 1, anyone.clone()), &|r| r.expires_in_s = Some(604_800)), Ok(())),
        (
            "expiry over max",
            with(send(Lucky, 10, 1, anyone.clone()), &|r| r.expires_in_s = Some(604_801)),
            Err(SendError::ExpiryOutOfRange(1, 604_800)),
        ),
        (
            "256 wide characters",
            with(send(Lucky, 10, 1, anyone.clone()), &|r| r.greeting = Some("红".repeat(256))),
            Ok(()),
        ),
        (
            "257 characters",
            with(send(Lucky, 10, 1, anyone.clone()), &|r| r.greeting = Some("a".repeat(257))),
            Err(SendError::GreetingTooLong(256)),
        ),
    ];
    for (what, req, want) in cases {
        let got = l.validate_send(req.clone()).map(|v| {
            assert_eq!(v.total.fen(), req.total_fen, "{what}");
            assert_eq!(i64::from(v.count), req.count, "{what}");
            assert_eq!(v.expires_in_s, req.expires_in_s.unwrap_or(24 * 3600), "{what}");
            assert_eq!(v.greeting, req.greeting.clone().unwrap_or_default(), "{what}");
        });
        assert_eq!(got, want, "{what}");
    }
}

#[derive(Debug, Clone)]
struct SendCase {
    limits: Limits,
    kind: Kind,
    total_fen: i64,
    count: i64,
    /// `None` is `anyone`; `Some((n, repeats))` lists `n` users, the first `repeats` twice.
    group: Option<(u32, u32)>,
    expires_in_s: Option<i64>,
    greeting: Option<String>,
}

impl SendCase {
    fn request(&self) -> SendRequest {
        let audience = match self.group {
            None => Audience::Anyone,
            Some((n, repeats)) => Audience::users((0..n).chain(0..repeats.min(n)).map(|i| name("g", i))),
        };
        SendRequest {
            greeting: self.greeting.clone(),
            expires_in_s: self.expires_in_s,
            ..send(self.kind, self.total_fen, self.count, audience)
        }
    }

    /// Every limit the request breaks, worked out here from the limits' documented meaning.
    /// Rules about total and count together only apply once both are in range.
    fn broken(&self) -> Vec<SendError> {
        let l = &self.limits;
        let mut broken = Vec::new();
        let count_ok = (1..=i64::from(l.count_max)).contains(&self.count);
        let total_ok = (1..=l.total_max_fen.min(AMOUNT_MAX_FEN)).contains(&self.total_fen);
        if !count_ok {
            broken.push(SendError::CountOutOfRange(l.count_max));
        }
        if !total_ok {
            broken.push(SendError::TotalOutOfRange(l.total_max_fen));
        }
        if count_ok && total_ok {
            if self.total_fen < self.count {
                broken.push(SendError::TotalBelowCount);
            }
            if self.kind == Kind::Equal && self.total_fen % self.count != 0 {
                broken.push(SendError::NotDivisible);
            }
            if self.total_fen / self.count > l.share_average_max_fen {
                broken.push(SendError::ShareTooLarge(l.share_average_max_fen));
            }
        }
        if let Some((n, _)) = self.group {
            if n == 0 {
                broken.push(SendError::EmptyAudience);
            }
            if n > l.audience_max {
                broken.push(SendError::AudienceTooLarge(l.audience_max));
            }
            if count_ok && self.count > i64::from(n) {
                broken.push(SendError::CountAboveAudience);
            }
        }
        let expires = self.expires_in_s.unwrap_or(l.expires_in_s_default);
        if !(l.expires_in_s_min..=l.expires_in_s_max).contains(&expires) {
            broken.push(SendError::ExpiryOutOfRange(l.expires_in_s_min, l.expires_in_s_max));
        }
        if self.greeting.as_ref().is_some_and(|g| g.chars().count() > l.greeting_chars_max) {
            broken.push(SendError::GreetingTooLong(l.greeting_chars_max));
        }
        broken
    }
}

fn limits() -> impl Strategy<Value = Limits> {
    let custom = (
        1u32..=200_000,
        prop_oneof![1i64..=1_000_000, 1i64..=2 * AMOUNT_MAX_FEN],
        1i64..=20_000_000,
        0u32..=300,
        // Minimum, maximum, default, and whether the default lies in between (mostly).
        (0i64..=100, 0i64..=1_000_000, 0i64..=1_000_000, proptest::bool::weighted(0.8)),
        0usize..=300,
    )
        .prop_map(
            |(count_max, total_max_fen, share_average_max_fen, audience_max, expiry, greeting_chars_max)| {
                Limits {
                    count_max,
                    total_max_fen,
                    share_average_max_fen,
                    audience_max,
                    expires_in_s_min: expiry.0,
                    expires_in_s_max: expiry.1,
                    expires_in_s_default: if expiry.3 {
                        expiry.2.clamp(expiry.0, expiry.1.max(expiry.0))
                    } else {
                        expiry.2
                    },
                    greeting_chars_max,
                    ..Limits::default()
                }
            },
        );
    prop_oneof![1 => Just(Limits::default()), 3 => custom]
}

/// Requests drawn around the limits' edges, where a wrong comparison would show.
fn send_case() -> impl Strategy<Value = SendCase> {
    limits()
        .prop_flat_map(|l| {
            let cm = i64::from(l.count_max);
            let count = prop_oneof![
                1 => -2i64..=0,
                3 => 1i64..=3,
                2 => cm - 1..=cm + 1,
                4 => 1..=cm,
                4 => 1i64..=600,
                1 => Just(i64::MIN),
                1 => Just(i64::from(u32::MAX) + 2),
            ];
            (Just(l), count, any::<bool>())
        })
        .prop_flat_map(|(l, count, equal)| {
            let c = count.max(1);
            let at_average = c.saturating_mul(l.share_average_max_fen);
            let tm = l.total_max_fen;
            let total = prop_oneof![
                1 => -1i64..=2,
                3 => c - 1..=c.saturating_add(1),
                4 => (1i64..=50).prop_map(move |k| c.saturating_mul(k)),
                2 => at_average - 1..=at_average.saturating_add(1),
                2 => tm - 1..=tm + 1,
                1 => AMOUNT_MAX_FEN - 1..=AMOUNT_MAX_FEN + 1,
                1 => Just(i64::MAX),
            ];
            let near_count = c.min(600) as u32;
            let group = prop_oneof![
                3 => Just(None),
                2 => (0u32..=600, 0u32..=3).prop_map(Some),
                3 => (near_count - 1..=near_count + 1, 0u32..=3).prop_map(Some),
                1 => (l.audience_max..=l.audience_max + 1, 0u32..=1).prop_map(Some),
            ];
            let (emin, emax) = (l.expires_in_s_min, l.expires_in_s_max);
            let expires = prop_oneof![
                4 => Just(None),
                1 => (emin - 1..=emin + 1).prop_map(Some),
                1 => (emax - 1..=emax + 1).prop_map(Some),
                1 => (-5i64..=2_000_000).prop_map(Some),
            ];
            let gmax = l.greeting_chars_max;
            let greeting = prop_oneof![
                2 => Just(None),
                1 => (0..=gmax + 2, any::<bool>())
                    .prop_map(|(n, wide)| Some(if wide { "红" } else { "a" }.repeat(n))),
            ];
            (Just(l), Just(count), Just(equal), total, group, expires, greeting)
        })
        .prop_map(|(limits, count, equal, total_fen, group, expires_in_s, greeting)| SendCase {
            limits,
            kind: if equal { Kind::Equal } else { Kind::Lucky },
            total_fen,
            count,
            group,
            expires_in_s,
            greeting,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    /// `validate_send` accepts exactly the requests that break no limit, carries them through
    /// unchanged, and turns every other one away naming a limit it breaks.
    #[test]
    fn validate_send_accepts_exactly_what_it_should(case in send_case()) {
        let l = &case.limits;
        let broken = case.broken();
        match l.validate_send(case.request()) {
            Ok(v) => {
                prop_assert!(broken.is_empty(), "accepted although it breaks {:?}", broken);
                let count = i64::from(v.count);
                prop_assert!(v.count >= 1 && v.count <= l.count_max);
                prop_assert!(v.total.fen() >= count, "total ≥ count");
                prop_assert!(v.total.fen() <= l.total_max_fen);
                prop_assert!(v.kind != Kind::Equal || v.total.fen() % count == 0, "equal divides");
                prop_assert!(v.total.fen() / count <= l.share_average_max_fen);
                if let Audience::Users(users) = &v.audience {
                    prop_assert!(!users.is_empty() && users.len() as u32 <= l.audience_max);
                    prop_assert!(v.count as usize <= users.len());
                }
                prop_assert_eq!(v.total.fen(), case.total_fen);
                prop_assert_eq!(count, case.count);
                prop_assert_eq!(v.kind, case.kind);
                prop_assert_eq!(&v.audience, &case.request().audience);
                prop_assert_eq!(v.expires_in_s, case.expires_in_s.unwrap_or(l.expires_in_s_default));
                prop_assert_eq!(v.greeting, case.greeting.clone().unwrap_or_default());
            }
            Err(e) => prop_assert!(broken.contains(&e), "refused with {:?}, but it breaks only {:?}", e, broken),
        }
    }
}

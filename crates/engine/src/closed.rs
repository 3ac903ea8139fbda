//! Closed packets as the request path sees them. Once a packet is exhausted or expired, and
//! that is committed, nothing about it changes again, so the crowd still grabbing it is turned
//! away where it asks, with the answer its set would give, without a queue slot, a wake and a
//! reply per request. Its claimers still go to the set, which answers with their share.
//!
//! A set publishes a packet here only after the batch that closed it committed (or when it
//! reads a closed packet back from its store), and forgets it when it leaves the set's closed
//! cache or the set reloads. Leaving one out is always safe: the set answers.

use std::sync::{Arc, PoisonError, RwLock};

use hongbao_core::{Audience, ClaimError, Claims, FastMap, Millis, Packet, PacketId, PacketStatus, UserId};

/// Claims at or above which a closed packet is published with a filter of its claimers
/// ([`Claimers`]). A packet of 100,000 shares has an index of 2 MiB over 512 pages, and in the
/// HTTP storm each request turned away paid a miss and a page walk into it: `Claims::get` took
/// the workers 0.33 µs a request, and a throwaway build that skipped the lookup turned away 6 %
/// more a second. Its filter is 128 KiB over 32 pages: one miss, about 0.16 µs a request
/// (BENCHMARKS.md, thirty-fifth session). Building it takes the set thread 0.5–1 ms, once. A
/// packet of a few thousand shares has an index small enough as it is.
const FILTER_CLAIMS_MIN: usize = 8192;

/// Bits of filter a claimer, at least (the blocks are a power of two). Each user sets eight bits
/// in one 512-bit block: at ten bits a claimer, about one user in a hundred who holds no claim
/// passes the filter and is looked up in the index (at thirteen, 0.3 %: the test's packet).
const FILTER_BITS_PER_CLAIM: usize = 10;

/// What a grab, open or claim of a closed packet needs to be answered without its set.
struct Closed {
    /// The packet's own claims, shared: they never change once it is closed.
    claims: Arc<Claims>,
    /// For a packet of at least [`FILTER_CLAIMS_MIN`] claims.
    claimers: Option<Claimers>,
    audience: Audience,
    expires_at_ms: Millis,
    status: PacketStatus,
}

impl Closed {
    fn of(p: &Packet) -> Closed {
        let claims = p.claims_shared();
        Closed {
            claimers: (claims.len() >= FILTER_CLAIMS_MIN).then(|| Claimers::of(&claims)),
            claims,
            audience: p.header().audience.clone(),
            expires_at_ms: p.header().expires_at_ms,
            status: p.status(),
        }
    }

    /// The set's answer to anyone but a claimer: `Packet::admit`'s checks, in its order.
    fn refusal(&self, user: &UserId, now_ms: Millis) -> Option<ClaimError> {
        if self.claimers.as_ref().is_none_or(|c| c.may_hold(user)) && self.claims.contains(user) {
            return None;
        }
        if !self.audience.admits(user) {
            return Some(ClaimError::NotEligible);
        }
        if self.status == PacketStatus::Expired || now_ms >= self.expires_at_ms {
            return Some(ClaimError::Expired);
        }
        (self.status == PacketStatus::Exhausted).then_some(ClaimError::Exhausted)
    }
}

/// Which users certainly hold no claim of a closed packet: a blocked Bloom filter over the
/// claimers' `UserId::fast_hash`, each claimer's eight bits in one cache line, so a user who
/// holds none is told so by one line of a small table instead of a probe into the packet's
/// large index. Written here rather than taken from a Bloom filter crate: those hash each item
/// again, and this one reuses the hash every `UserId` carries.
struct Claimers {
    blocks: Box<[Block]>,
}

/// 512 bits, one cache line.
#[repr(align(64))]
#[derive(Clone, Copy, Default)]
struct Block([u64; 8]);

impl Claimers {
    fn of(claims: &Claims) -> Claimers {
        let blocks = (claims.len() * FILTER_BITS_PER_CLAIM).div_ceil(512).next_power_of_two();
        let mut filter = Claimers { blocks: vec![Block::default(); blocks].into() };
        for claim in claims.iter() {
            let (at, bits) = filter.place(claim.user.fast_hash());
            for (word, bit) in filter.blocks[at].0.iter_mut().zip(bits) {
                *word |= bit;
            }
        }
        filter
    }

    /// The block a hash falls in, and the bit it sets in each of the block's words. The block
    /// comes from the hash's low half (a packet's index places by its high half); the bits from
    /// the high 48 bits of the hash multiplied again, six for each word.
    fn place(&self, hash: u64) -> (usize, [u64; 8]) {
        let at = hash as usize & (self.blocks.len() - 1);
        let mixed = hash.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (at, std::array::from_fn(|i| 1 << ((mixed >> (16 + 6 * i)) & 63)))
    }

    /// False only when `user` holds no claim; true when they may.
    fn may_hold(&self, user: &UserId) -> bool {
        let (at, bits) = self.place(user.fast_hash());
        self.blocks[at].0.iter().zip(bits).all(|(word, bit)| word & bit != 0)
    }
}

/// One set's published closed packets. Written by the set thread, read by every request.
#[derive(Default)]
pub(crate) struct ClosedPackets {
    packets: RwLock<FastMap<PacketId, Arc<Closed>>>,
}

impl ClosedPackets {
    /// Publishes a packet whose closing is durable; an active one is ignored.
    pub(crate) fn publish(&self, p: &Packet) {
        if p.status() == PacketStatus::Active {
            return;
        }
        let closed = Arc::new(Closed::of(p));
        self.packets.write().unwrap_or_else(PoisonError::into_inner).insert(p.id(), closed);
    }

    pub(crate) fn forget(&self, id: PacketId) {
        self.packets.write().unwrap_or_else(PoisonError::into_inner).remove(&id);
    }

    pub(crate) fn clear(&self) {
        self.packets.write().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// The refusal the set would answer `user` with at `now_ms`, when the packet is published
    /// and `user` is not one of its claimers; `None` sends the request to the set.
    pub(crate) fn refusal(&self, id: PacketId, user: &UserId, now_ms: Millis) -> Option<ClaimError> {
        // The read lock is held for two map lookups and a few comparisons: shorter than
        // cloning the Arc out and dropping it, two more writes to a line every worker shares.
        self.packets.read().unwrap_or_else(PoisonError::into_inner).get(&id)?.refusal(user, now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hongbao_core::{Amount, Kind, RequestId, ValidSend};

    fn user(i: usize) -> UserId {
        UserId::parse(&format!("u{i}")).unwrap()
    }

    fn packet(count: u32, audience: Audience) -> Packet {
        let send = ValidSend {
            sender: UserId::parse("sender").unwrap(),
            kind: Kind::Lucky,
            total: Amount::new(i64::from(count) * 100).unwrap(),
            count,
            audience,
            greeting: String::new(),
            expires_in_s: 60,
            request_id: RequestId::parse("r").unwrap(),
        };
        Packet::new(PacketId::from_raw(1 << 30).unwrap(), &send, 1_000, 7)
    }

    /// For every user and time, a published packet answers as the packet itself would.
    fn check_against_the_packet(p: &Packet, users: &[UserId]) {
        let published = ClosedPackets::default();
        published.publish(p);
        for now_ms in [1_000, 60_999, 61_000, 90_000] {
            for u in users {
                let set_answer = p.clone().claim(u, now_ms).err();
                match published.refusal(p.id(), u, now_ms) {
                    Some(e) => assert_eq!(Some(e), set_answer, "{u} at {now_ms}"),
                    None => {
                        assert!(p.claim_of(u).is_some(), "{u} at {now_ms} went to the set but holds no share")
                    }
                }
                assert_eq!(p.clone().grab(u, now_ms, 1_000).err().is_some(), p.claim_of(u).is_none());
            }
        }
    }

    #[test]
    fn an_exhausted_packet_turns_away_everyone_but_its_claimers_as_the_set_would() {
        let users: Vec<UserId> = (0..12).map(user).collect();
        let mut anyone = packet(5, Audience::Anyone);
        for u in &users[..5] {
            anyone.claim(u, 2_000).unwrap();
        }
        assert_eq!(anyone.status(), PacketStatus::Exhausted);
        check_against_the_packet(&anyone, &users);

        let mut group_packet = packet(3, Audience::users(users[..8].to_vec()));
        for u in &users[2..5] {
            group_packet.claim(u, 2_000).unwrap();
        }
        check_against_the_packet(&group_packet, &users);
    }

    #[test]
    fn an_expired_packet_turns_away_everyone_but_its_claimers_as_the_set_would() {
        let users: Vec<UserId> = (0..6).map(user).collect();
        let mut p = packet(5, Audience::Anyone);
        p.claim(&users[0], 2_000).unwrap();
        assert!(p.expire(61_000).is_some());
        check_against_the_packet(&p, &users);
    }

    /// A packet of `count` shares, every one claimed, and its claimers (named apart from
    /// `user`'s).
    fn claimed_by_all(count: u32) -> (Packet, Vec<UserId>) {
        let claimers: Vec<UserId> = (0..count).map(|i| UserId::parse(&format!("c{i}")).unwrap()).collect();
        let mut p = packet(count, Audience::Anyone);
        for u in &claimers {
            p.claim(u, 2_000).unwrap();
        }
        assert_eq!(p.status(), PacketStatus::Exhausted);
        (p, claimers)
    }

    #[test]
    fn a_claimers_filter_passes_every_claimer_and_few_others() {
        let (p, claimers) = claimed_by_all(20_000);
        let filter = Claimers::of(&p.claims_shared());
        assert!(claimers.iter().all(|u| filter.may_hold(u)), "a claimer was filtered out");
        let passed = (0..100_000).filter(|&i| filter.may_hold(&user(i))).count();
        assert!(passed < 1_500, "{passed} of 100,000 users without a claim passed the filter");
    }

    #[test]
    fn a_large_exhausted_packet_answers_its_claimers_and_turns_away_the_rest() {
        let (p, claimers) = claimed_by_all(FILTER_CLAIMS_MIN as u32 + 1);
        let published = ClosedPackets::default();
        published.publish(&p);
        for u in &claimers {
            assert_eq!(published.refusal(p.id(), u, 2_000), None, "{u} holds a share");
        }
        for i in 0..20_000 {
            assert_eq!(published.refusal(p.id(), &user(i), 2_000), Some(ClaimError::Exhausted));
        }
    }

    #[test]
    fn active_packets_are_not_published_and_forgotten_ones_go_to_the_set() {
        let published = ClosedPackets::default();
        let mut p = packet(2, Audience::Anyone);
        published.publish(&p);
        assert_eq!(published.refusal(p.id(), &user(9), 2_000), None, "an active packet is the set's");
        p.claim(&user(0), 2_000).unwrap();
        p.claim(&user(1), 2_000).unwrap();
        published.publish(&p);
        assert_eq!(published.refusal(p.id(), &user(9), 2_000), Some(ClaimError::Exhausted));
        published.forget(p.id());
        assert_eq!(published.refusal(p.id(), &user(9), 2_000), None);
        published.publish(&p);
        published.clear();
        assert_eq!(published.refusal(p.id(), &user(9), 2_000), None);
    }
}

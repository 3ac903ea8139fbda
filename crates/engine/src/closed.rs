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

/// What a grab, open or claim of a closed packet needs to be answered without its set.
struct Closed {
    /// The packet's own claims, shared: they never change once it is closed.
    claims: Arc<Claims>,
    audience: Audience,
    expires_at_ms: Millis,
    status: PacketStatus,
}

impl Closed {
    fn of(p: &Packet) -> Closed {
        Closed {
            claims: p.claims_shared(),
            audience: p.header().audience.clone(),
            expires_at_ms: p.header().expires_at_ms,
            status: p.status(),
        }
    }

    /// The set's answer to anyone but a claimer: `Packet::admit`'s checks, in its order.
    fn refusal(&self, user: &UserId, now_ms: Millis) -> Option<ClaimError> {
        if self.claims.contains(user) {
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

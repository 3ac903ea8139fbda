//! A packet's claims: a list in opening order, and a small index that finds a user's claim.
//!
//! A map from user to claim kept each claim in a bucket of its own, 56 bytes with the user
//! twice, in a table made for all of the packet's shares: 117 KiB for 1,000 shares, so each new
//! claim wrote to a bucket far from the last, a cache miss that the next atomic (the claim's
//! user being cloned) then waited for. Here a claim is appended to a list, next to the one
//! before, and the index holds 8 bytes a place (the claim's position and its user's hash): a
//! 1,000-share packet's index is 16 KiB, small enough to stay in cache while the packet is
//! hot, and a packet's claims take half the memory. The index keeps the hash, so it grows
//! without reading any user's name again (a 100,000-share packet grows past its first size).
//!
//! The index is open-addressed, probed linearly from `hash & mask`, rather than a hashbrown
//! table, whose control bytes sit apart from its slots: a claim to a packet not in cache was
//! two misses there (the control bytes read, the slot written), and where they are cannot be
//! known ahead. Here it is one place, which a set asks for a few claims before it settles the
//! claim ([`Claims::prefetch`]; BENCHMARKS.md, 2026-12-06, twenty-seventh session).

use crate::packet::Claim;
use crate::UserId;

/// How many places past the last claim the list asks the CPU to fetch, to write (the list is
/// fresh memory, and a claim written to a line not in cache held up the set at its next
/// locked instruction), and how many claims ahead a dropped list asks for a claim's user.
const AHEAD: usize = 3;
/// The index has at least twice as many places as claims, so a probe for a user without a
/// claim ends within a place or two.
const PLACES_PER_CLAIM: usize = 2;
/// The fewest places an index with any claim has.
const MIN_PLACES: usize = 8;

/// A packet's claims, at most one per user, in the order they were opened.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    list: Vec<Claim>,
    /// Open-addressed (linear probing from `hash & mask`), a power of two of places or none.
    index: Box<[Slot]>,
}

/// A place in the index: free (`at` 0) or where a claim stands in the list, plus one, with the
/// upper half of its user's hash.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    at: u32,
    hash: u32,
}

/// The upper half of a user's hash (`UserId::fast_hash`): what a slot keeps.
fn half(hash: u64) -> u32 {
    (hash >> 32) as u32
}

fn places_for(claims: usize) -> usize {
    if claims == 0 {
        0
    } else {
        (claims * PLACES_PER_CLAIM).next_power_of_two().max(MIN_PLACES)
    }
}

impl Claims {
    /// Room for `claims` without growing.
    pub fn with_capacity(claims: usize) -> Claims {
        Claims { list: Vec::with_capacity(claims), index: vec![Slot::default(); places_for(claims)].into() }
    }

    /// The claim `user` holds.
    pub fn get(&self, user: &UserId) -> Option<&Claim> {
        match self.probe(user) {
            Some((at, true)) => Some(&self.list[self.index[at].at as usize - 1]),
            _ => None,
        }
    }

    /// Where in the index `user` has a claim (true), or the free place where theirs would go
    /// (false); `None` when the index has no places.
    fn probe(&self, user: &UserId) -> Option<(usize, bool)> {
        let mask = self.index.len().checked_sub(1)?;
        let h = half(user.fast_hash());
        let mut at = h as usize & mask;
        loop {
            let slot = self.index[at];
            if slot.at == 0 {
                return Some((at, false));
            }
            // The halves first, so another user's name is read only when they are equal.
            if slot.hash == h && self.list[slot.at as usize - 1].user == *user {
                return Some((at, true));
            }
            at = (at + 1) & mask;
        }
    }

    /// Asks the CPU to fetch the place in the index where `user`'s claim is or would go, so a
    /// claim settled a little later finds it in cache. Only a hint: nothing changes.
    pub fn prefetch(&self, user: &UserId) {
        if let Some(mask) = self.index.len().checked_sub(1) {
            crate::hint::prefetch(&self.index[half(user.fast_hash()) as usize & mask]);
        }
    }

    pub fn contains(&self, user: &UserId) -> bool {
        self.get(user).is_some()
    }

    /// Adds `claim` after the others, unless its user holds one already: then nothing changes
    /// and it is handed back.
    pub fn insert(&mut self, claim: Claim) -> Result<(), Claim> {
        // One probe finds the user's slot or the place for theirs; a second only after the
        // index grew.
        let place = match self.probe(&claim.user) {
            Some((_, true)) => return Err(claim),
            Some((at, false)) if (self.list.len() + 1) * PLACES_PER_CLAIM <= self.index.len() => at,
            _ => {
                self.grow();
                self.probe(&claim.user).expect("grown").0
            }
        };
        let at = u32::try_from(self.list.len() + 1).expect("a packet holds fewer than 2^32 claims");
        self.index[place] = Slot { at, hash: half(claim.user.fast_hash()) };
        self.list.push(claim);
        if let Some(ahead) = self.list.spare_capacity_mut().get(AHEAD) {
            crate::hint::prefetch_to_write(ahead);
        }
        Ok(())
    }

    /// Doubles the index (or makes its first), placing each slot by the hash it keeps: no
    /// user's name is read again.
    fn grow(&mut self) {
        let places = places_for(self.list.len() + 1).max(self.index.len() * 2);
        let old = std::mem::replace(&mut self.index, vec![Slot::default(); places].into());
        let mask = places - 1;
        for slot in old.iter().filter(|s| s.at != 0) {
            let mut at = slot.hash as usize & mask;
            while self.index[at].at != 0 {
                at = (at + 1) & mask;
            }
            self.index[at] = *slot;
        }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Claims it holds room for without growing.
    pub fn capacity(&self) -> usize {
        self.list.capacity().min(self.index.len() / PLACES_PER_CLAIM)
    }

    /// Every claim, in the order they were opened.
    pub fn iter(&self) -> std::slice::Iter<'_, Claim> {
        self.list.iter()
    }
}

/// A packet's claims are dropped long after they were made (a closed packet stays in memory
/// until a million newer claims have closed), and dropping one writes its user's count, a
/// line out of cache by then: each is asked for `AHEAD` claims before it is dropped, so the
/// misses overlap instead of following one another.
impl Drop for Claims {
    fn drop(&mut self) {
        let mut rest = std::mem::take(&mut self.list).into_iter();
        loop {
            if let Some(ahead) = rest.as_slice().get(AHEAD) {
                crate::hint::prefetch_to_write(ahead.user.as_str());
            }
            if rest.next().is_none() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    fn claim(name: &str, index: u32) -> Claim {
        Claim { user: user(name), amount_fen: i64::from(index) + 1, at_ms: 5, index }
    }

    #[test]
    fn each_user_holds_one_claim_found_by_name_and_listed_in_opening_order() {
        let mut c = Claims::default();
        assert!(c.is_empty());
        assert_eq!(c.get(&user("alice")), None);
        assert_eq!(c.insert(claim("alice", 0)), Ok(()));
        assert_eq!(c.insert(claim("bob", 1)), Ok(()));
        assert_eq!(c.insert(claim("alice", 2)), Err(claim("alice", 2)), "a second claim is refused");
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&user("alice")), Some(&claim("alice", 0)));
        assert_eq!(c.get(&user("bob")).map(|c| c.index), Some(1));
        assert!(c.contains(&user("bob")) && !c.contains(&user("carol")));
        assert_eq!(c.iter().map(|c| c.user.as_str()).collect::<Vec<_>>(), ["alice", "bob"]);
    }

    #[test]
    fn a_list_that_grows_past_its_room_finds_every_claim_again() {
        let mut c = Claims::with_capacity(16);
        assert!(c.capacity() >= 16);
        let n = 50_000;
        for i in 0..n {
            assert_eq!(c.insert(claim(&format!("u{i}"), i)), Ok(()));
        }
        for i in (0..n).step_by(97) {
            assert!(c.insert(claim(&format!("u{i}"), n + i)).is_err(), "u{i} again");
        }
        assert_eq!(c.len(), n as usize);
        for i in 0..n {
            assert_eq!(c.get(&user(&format!("u{i}"))).map(|c| c.index), Some(i), "u{i}");
        }
        assert!(c.iter().map(|c| c.index).eq(0..n), "in opening order");
        assert_eq!(c.get(&user("u-none")), None);
    }
}

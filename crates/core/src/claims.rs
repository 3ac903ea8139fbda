//! A packet's claims: a list in opening order, and a small index that finds a user's claim.
//!
//! A map from user to claim kept each claim in a bucket of its own, 56 bytes with the user
//! twice, in a table made for all of the packet's shares: 117 KiB for 1,000 shares, so each new
//! claim wrote to a bucket far from the last, a cache miss that the next atomic (the claim's
//! user being cloned) then waited for. Here a claim is appended to a list, next to the one
//! before, and the index holds 8 bytes a bucket (the claim's position and its user's hash): a
//! 1,000-share packet's index is 18 KiB, small enough to stay in cache while the packet is
//! hot, and a packet's claims take half the memory. The index keeps the hash, so it grows
//! without reading any user's name again (a 100,000-share packet grows past its first size).

use std::hash::BuildHasher;

use hashbrown::hash_table::Entry;
use hashbrown::HashTable;

use crate::packet::Claim;
use crate::FastHash;

/// How many places past the last claim the list asks the CPU to fetch, to write: the list is
/// fresh memory, and a claim written to a line not in cache held up the set at its next
/// locked instruction.
const AHEAD: usize = 3;

/// A packet's claims, at most one per user, in the order they were opened.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    list: Vec<Claim>,
    by_user: HashTable<Slot>,
}

/// Where a user's claim stands in the list, with the upper half of the user's hash.
#[derive(Debug, Clone, Copy)]
struct Slot {
    at: u32,
    hash: u32,
}

/// The upper half of the user's hash: what a slot keeps.
fn hash(user: &str) -> u32 {
    (FastHash.hash_one(user) >> 32) as u32
}

/// The table's hash, made from a slot's half: its low bits pick the bucket and its top seven
/// the tag, both from the half kept, so the table grows from the slots alone.
fn table_hash(half: u32) -> u64 {
    (u64::from(half) << 32) | u64::from(half)
}

/// Whether a slot is `user`'s, whose hash's upper half is `h`: the halves first, so another
/// user's name is read only when they are equal.
fn is<'a>(list: &'a [Claim], h: u32, user: &'a str) -> impl Fn(&Slot) -> bool + 'a {
    move |s| s.hash == h && list[s.at as usize].user.as_str() == user
}

impl Claims {
    /// Room for `claims` without growing.
    pub fn with_capacity(claims: usize) -> Claims {
        Claims { list: Vec::with_capacity(claims), by_user: HashTable::with_capacity(claims) }
    }

    /// The claim `user` holds.
    pub fn get(&self, user: &str) -> Option<&Claim> {
        let slot = self.slot(hash(user), user)?;
        Some(&self.list[slot.at as usize])
    }

    fn slot(&self, h: u32, user: &str) -> Option<&Slot> {
        self.by_user.find(table_hash(h), is(&self.list, h, user))
    }

    pub fn contains(&self, user: &str) -> bool {
        self.get(user).is_some()
    }

    /// Adds `claim` after the others, unless its user holds one already: then nothing changes
    /// and it is handed back.
    pub fn insert(&mut self, claim: Claim) -> Result<(), Claim> {
        let h = hash(claim.user.as_str());
        let Claims { list, by_user } = self;
        // One probe finds the user's slot or the place for it.
        let user = claim.user.as_str();
        let entry = by_user.entry(table_hash(h), is(list, h, user), |s| table_hash(s.hash));
        let Entry::Vacant(place) = entry else {
            return Err(claim);
        };
        let at = u32::try_from(list.len()).expect("a packet holds fewer than 2^32 claims");
        place.insert(Slot { at, hash: h });
        list.push(claim);
        if let Some(ahead) = list.spare_capacity_mut().get(AHEAD) {
            crate::hint::prefetch_to_write(ahead);
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Claims it holds room for without growing.
    pub fn capacity(&self) -> usize {
        self.list.capacity().min(self.by_user.capacity())
    }

    /// Every claim, in the order they were opened.
    pub fn iter(&self) -> std::slice::Iter<'_, Claim> {
        self.list.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::UserId;

    fn claim(user: &str, index: u32) -> Claim {
        Claim { user: UserId::parse(user).unwrap(), amount_fen: i64::from(index) + 1, at_ms: 5, index }
    }

    #[test]
    fn each_user_holds_one_claim_found_by_name_and_listed_in_opening_order() {
        let mut c = Claims::default();
        assert!(c.is_empty());
        assert_eq!(c.get("alice"), None);
        assert_eq!(c.insert(claim("alice", 0)), Ok(()));
        assert_eq!(c.insert(claim("bob", 1)), Ok(()));
        assert_eq!(c.insert(claim("alice", 2)), Err(claim("alice", 2)), "a second claim is refused");
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("alice"), Some(&claim("alice", 0)));
        assert_eq!(c.get("bob").map(|c| c.index), Some(1));
        assert!(c.contains("bob") && !c.contains("carol"));
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
            assert_eq!(c.get(&format!("u{i}")).map(|c| c.index), Some(i), "u{i}");
        }
        assert!(c.iter().map(|c| c.index).eq(0..n), "in opening order");
        assert_eq!(c.get("u-none"), None);
    }
}

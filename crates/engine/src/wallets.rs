//! A set's wallet balances: a hash map split into [`SHARDS`] tables by the user's hash.
//!
//! One table of millions of wallets grows by doubling: every doubling moves each wallet into a
//! fresh table that is faulted in page by page, all within one batch. In the in-process
//! festival (every claimer a new user) that was a fifth of a set thread's time, and each
//! doubling held every claim of its set for as long as it took (BENCHMARKS.md, 2026-12-04,
//! tenth session). Split, each table is a sixty-fourth of the whole: it doubles in cache, the
//! table it leaves is small enough for the allocator to hand out again, and a doubling holds a
//! batch a sixty-fourth as long. Each user's hash is computed once and picks both the table and
//! the place in it; it is kept beside the wallet, so a doubling moves wallets without reading a
//! user's name again (a cache miss a wallet, in memory the set touches nowhere else: two
//! fifths of the doubling's time in the in-process festival, BENCHMARKS.md, eleventh session).

use std::hash::BuildHasher;

use hashbrown::hash_table::Entry;
use hashbrown::HashTable;
use hongbao_core::{FastHash, UserId};

/// Tables; a power of two.
const SHARDS: usize = 64;
/// The hash bits that pick a table: above the bits a table uses for a place (the low ones, as
/// many as it has places in powers of two) and below its tag (the top seven).
const SHARD_SHIFT: u32 = 40;

#[derive(Debug)]
pub(crate) struct Wallets {
    shards: Box<[HashTable<Wallet>]>,
}

/// One wallet, with its user's hash.
#[derive(Debug)]
struct Wallet {
    hash: u64,
    user: UserId,
    fen: i64,
}

impl Wallet {
    /// Whether this is `user`'s wallet (`hash` being theirs): the hashes first, so another
    /// user's name is read only when the two hashes are equal.
    fn is(&self, hash: u64, user: &str) -> bool {
        self.hash == hash && self.user.as_str() == user
    }
}

impl Default for Wallets {
    fn default() -> Wallets {
        Wallets::with_capacity(0)
    }
}

fn hash(user: &str) -> u64 {
    FastHash.hash_one(user)
}

fn shard(hash: u64) -> usize {
    (hash >> SHARD_SHIFT) as usize & (SHARDS - 1)
}

impl Wallets {
    /// Room for `wallets` spread evenly, so a start with a million wallets does not double
    /// its tables on the way.
    pub(crate) fn with_capacity(wallets: usize) -> Wallets {
        let each = wallets.div_ceil(SHARDS);
        Wallets { shards: (0..SHARDS).map(|_| HashTable::with_capacity(each)).collect() }
    }

    /// Wallets held; counted table by table (it is read once, when the set starts).
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(HashTable::len).sum()
    }

    /// The balance of `user`; `None` when the set holds no wallet for them.
    pub(crate) fn get(&self, user: &str) -> Option<i64> {
        let h = hash(user);
        self.shards[shard(h)].find(h, |w| w.is(h, user)).map(|w| w.fen)
    }

    /// The balance of `user`, found or made at 0 in one lookup, and whether it was made. The
    /// user is cloned only for a new wallet.
    fn slot(&mut self, user: &UserId) -> (&mut i64, bool) {
        let h = hash(user.as_str());
        match self.shards[shard(h)].entry(h, |w| w.is(h, user.as_str()), |w| w.hash) {
            Entry::Occupied(e) => (&mut e.into_mut().fen, false),
            Entry::Vacant(e) => {
                (&mut e.insert(Wallet { hash: h, user: user.clone(), fen: 0 }).into_mut().fen, true)
            }
        }
    }

    /// Sets the balance of `user` and returns the one before (`None`: a new wallet).
    pub(crate) fn set(&mut self, user: &UserId, fen: i64) -> Option<i64> {
        let (balance, made) = self.slot(user);
        let old = std::mem::replace(balance, fen);
        (!made).then_some(old)
    }

    /// Adds `fen` to the balance of `user`, making the wallet if there is none, and returns
    /// the balance now. Panics if the balance would overflow: the limits keep every balance
    /// far below it, so that is a bug.
    pub(crate) fn credit(&mut self, user: &UserId, fen: i64) -> i64 {
        let (balance, _) = self.slot(user);
        *balance = balance.checked_add(fen).expect("credit overflows a balance");
        *balance
    }

    /// Every wallet as (user, balance), in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&UserId, i64)> + '_ {
        self.shards.iter().flat_map(|t| t.iter().map(|w| (&w.user, w.fen)))
    }

    /// Every balance, in no particular order.
    pub(crate) fn balances(&self) -> impl Iterator<Item = i64> + '_ {
        self.shards.iter().flat_map(|t| t.iter().map(|w| w.fen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn a_balance_set_is_the_balance_read_and_each_user_is_one_wallet() {
        let mut w = Wallets::default();
        assert_eq!(w.get("alice"), None);
        assert_eq!(w.set(&user("alice"), 100), None);
        assert_eq!(w.set(&user("bob"), 5), None);
        assert_eq!(w.set(&user("alice"), 70), Some(100));
        assert_eq!(w.credit(&user("bob"), 3), 8);
        assert_eq!(w.credit(&user("dave"), 2), 2);
        assert_eq!(w.set(&user("dave"), 0), Some(2));
        assert_eq!(w.get("alice"), Some(70));
        assert_eq!(w.get("bob"), Some(8));
        assert_eq!(w.get("carol"), None);
        assert_eq!(w.get("dave"), Some(0));
        assert_eq!(w.len(), 3);
        assert_eq!(w.balances().sum::<i64>(), 78);
    }

    #[test]
    fn many_wallets_spread_over_every_table_and_each_is_found_again() {
        let mut w = Wallets::with_capacity(1_000);
        let n = 50_000;
        for i in 0..n {
            assert_eq!(w.set(&user(&format!("u{i}")), i), None);
        }
        for i in (0..n).step_by(7) {
            assert_eq!(w.set(&user(&format!("u{i}")), i + 1), Some(i));
        }
        assert_eq!(w.len(), n as usize);
        for i in 0..n {
            let want = if i % 7 == 0 { i + 1 } else { i };
            assert_eq!(w.get(&format!("u{i}")), Some(want), "u{i}");
        }
        assert_eq!(w.balances().count(), n as usize);
        // Evenly spread: no table holds twice its share, none is empty.
        let share = n as usize / SHARDS;
        for t in w.shards.iter() {
            assert!(
                t.len() > share / 2 && t.len() < share * 2,
                "{} wallets against a share of {share}",
                t.len()
            );
        }
    }
}

//! A set's wallet balances: [`SHARDS`] open-addressed tables, picked by the user's hash.
//!
//! One table of millions of wallets grows by doubling: every doubling moves each wallet into a
//! fresh table that is faulted in page by page, all within one batch. In the in-process
//! festival (every claimer a new user) that was a fifth of a set thread's time, and each
//! doubling held every claim of its set for as long as it took (BENCHMARKS.md, 2026-12-04,
//! tenth session). Split, each table is about a sixty-fourth of the whole: it doubles in cache,
//! the table it leaves is small enough for the allocator to hand out again, and a doubling
//! holds a batch a sixty-fourth as long. The tables' shares differ (up to twice the smallest),
//! so they do not all double in the same few batches. Each user's hash picks both the table
//! and the place in it; it is the one their id carries ([`UserId::fast_hash`]), so a doubling
//! moves wallets without reading a user's name again (a cache miss a wallet, in memory the set
//! touches nowhere else: two fifths of the doubling's time in the in-process festival,
//! BENCHMARKS.md, eleventh session).
//!
//! A table is an array of whole wallets, probed linearly from the place the hash picks, not a
//! hashbrown table: hashbrown keeps its control bytes apart from its slots, so a new user's
//! wallet cost two misses to memory (the control bytes, then the slot written), and the place
//! it would look at cannot be known ahead. Here the place is `hash & mask`, one cache line
//! that a batch asks for a few claims ahead ([`Wallets::prefetch`]), so the miss is paid
//! while the set settles the claims before it (BENCHMARKS.md, 2026-12-06, twenty-seventh
//! session).

use hashbrown::hash_table::{Entry, HashTable};
use hongbao_core::UserId;

/// Tables.
const SHARDS: usize = 64;
/// The hash bits that pick a table: the top 24, above the bits a table uses for a place (the
/// low ones, as many as it has places in powers of two).
const SHARD_SHIFT: u32 = 40;
/// Table `i` takes `SHARD_WEIGHT_MIN + i` parts of every `PICKS` new wallets: 64 parts for the
/// first, 127 for the last. With even shares every table reached the point where it doubles
/// within a few batches of the others, so all of a set's wallets moved at once: in the
/// in-process festival at 12.6 million wallets a set, a second in which the set paid as few as
/// a twentieth of its claims (BENCHMARKS.md, twenty-ninth session). With shares spread over a
/// factor of two, the tables' doubling points spread over the whole span between one doubling
/// of the wallets and the next, and a batch seldom meets more than one.
const SHARD_WEIGHT_MIN: usize = SHARDS;
/// The parts all tables' weights add up to.
const PICKS: usize = {
    let (mut sum, mut shard) = (0, 0);
    while shard < SHARDS {
        sum += weight(shard);
        shard += 1;
    }
    sum
};
/// Which table each of the `PICKS` parts belongs to, in order.
static SHARD_OF: [u8; PICKS] = shard_of();

const fn shard_of() -> [u8; PICKS] {
    let mut of = [0u8; PICKS];
    let (mut shard, mut at) = (0, 0);
    while shard < SHARDS {
        let mut part = 0;
        while part < weight(shard) {
            of[at] = shard as u8;
            at += 1;
            part += 1;
        }
        shard += 1;
    }
    of
}

/// A table doubles before it would be fuller than this many eighths, so a probe for a user it
/// does not hold ends within a few places.
const LOAD_EIGHTHS: usize = 6;
/// The fewest places a table has.
const MIN_PLACES: usize = 8;

#[derive(Debug)]
pub(crate) struct Wallets {
    shards: Box<[Table]>,
}

/// One table, open-addressed: a wallet sits at the place its hash picks or the first free one
/// after it (linear probing). Wallets are never removed, so a free place ends every probe.
#[derive(Debug)]
struct Table {
    /// A power of two of them, never fuller than `LOAD_EIGHTHS`.
    places: Box<[Place]>,
    len: usize,
}

/// A place: free (no user) or one wallet, its user's id carrying their hash and, mostly,
/// their name. A cache line, aligned to one, so a place never straddles two. A set holds the
/// wallets of the users it has debited since it loaded, not of every claimer it credited (see
/// `SetState::credit_wallet`), so the tables stay small while a festival runs.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Place {
    user: Option<UserId>,
    fen: i64,
}

const _: () = assert!(std::mem::size_of::<Place>() == 64, "a place fills a cache line");

impl Default for Wallets {
    fn default() -> Wallets {
        Wallets::with_capacity(0)
    }
}

/// The table that holds `user`'s wallet: their hash's top bits, scaled to `PICKS` parts.
fn shard(user: &UserId) -> usize {
    let part = ((user.fast_hash() >> SHARD_SHIFT) * PICKS as u64) >> (64 - SHARD_SHIFT);
    SHARD_OF[part as usize] as usize
}

/// The share of new wallets that table `shard` takes, in parts of `PICKS`.
const fn weight(shard: usize) -> usize {
    SHARD_WEIGHT_MIN + shard
}

fn free_places(n: usize) -> Box<[Place]> {
    std::iter::repeat_with(Place::default).take(n).collect()
}

impl Table {
    /// Room for `wallets` without doubling.
    fn with_capacity(wallets: usize) -> Table {
        let places = (wallets * 8).div_ceil(LOAD_EIGHTHS).next_power_of_two().max(MIN_PLACES);
        Table { places: free_places(places), len: 0 }
    }

    fn mask(&self) -> usize {
        self.places.len() - 1
    }

    /// The place `user`'s hash picks: where their probe starts.
    fn home(&self, user: &UserId) -> usize {
        user.fast_hash() as usize & self.mask()
    }

    /// Where `user`'s wallet is (true), or the free place where it would go (false). Ids
    /// compare their hashes first, so another user's name is read only when those are equal.
    fn probe(&self, user: &UserId) -> (usize, bool) {
        let mask = self.mask();
        let mut at = self.home(user);
        loop {
            let place = &self.places[at];
            match &place.user {
                None => return (at, false),
                Some(u) if u == user => return (at, true),
                Some(_) => at = (at + 1) & mask,
            }
        }
    }

    /// Moves every wallet into twice the places, by the hash each user's id carries: no user's
    /// name is read.
    fn double(&mut self) {
        let doubled = free_places(self.places.len() * 2);
        let old = std::mem::replace(&mut self.places, doubled);
        let mask = self.mask();
        for place in old.into_vec().into_iter() {
            let Some(user) = &place.user else { continue };
            let mut at = self.home(user);
            while self.places[at].user.is_some() {
                at = (at + 1) & mask;
            }
            self.places[at] = place;
        }
    }
}

impl Wallets {
    /// Room for `wallets` spread by each table's share. A set starts empty (`Default`): it
    /// holds no wallet until it debits its user, so nothing is known to size the tables for.
    fn with_capacity(wallets: usize) -> Wallets {
        let each = |shard| (wallets * weight(shard)).div_ceil(PICKS);
        Wallets { shards: (0..SHARDS).map(|shard| Table::with_capacity(each(shard))).collect() }
    }

    /// Wallets held.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|t| t.len).sum()
    }

    /// The balance of `user`; `None` when the set holds no wallet for them.
    pub(crate) fn get(&self, user: &UserId) -> Option<i64> {
        let t = &self.shards[shard(user)];
        match t.probe(user) {
            (at, true) => Some(t.places[at].fen),
            (_, false) => None,
        }
    }

    /// Asks the CPU to start loading the place where `user`'s wallet is or would go, so that
    /// a lookup a few claims later finds it in cache. Only a hint: nothing changes.
    pub(crate) fn prefetch(&self, user: &UserId) {
        let t = &self.shards[shard(user)];
        hongbao_core::hint::prefetch(&t.places[t.home(user)]);
    }

    /// The balance of `user`, found or made at 0 in one probe, and whether it was made. The
    /// user is cloned only for a new wallet.
    fn slot(&mut self, user: &UserId) -> (&mut i64, bool) {
        let t = &mut self.shards[shard(user)];
        let (mut at, found) = t.probe(user);
        if !found {
            if (t.len + 1) * 8 > t.places.len() * LOAD_EIGHTHS {
                t.double();
                at = t.probe(user).0;
            }
            t.places[at] = Place { user: Some(user.clone()), fen: 0 };
            t.len += 1;
        }
        (&mut t.places[at].fen, !found)
    }

    /// Sets the balance of `user` and returns the one before (`None`: a new wallet).
    pub(crate) fn set(&mut self, user: &UserId, fen: i64) -> Option<i64> {
        let (balance, made) = self.slot(user);
        let old = std::mem::replace(balance, fen);
        (!made).then_some(old)
    }

    /// Adds `fen` to the balance of `user` and returns the balance now, in one probe; `None`,
    /// changing nothing, when the set holds no wallet for them. Panics if the balance would
    /// overflow: the limits keep every balance far below it, so that is a bug.
    pub(crate) fn credit(&mut self, user: &UserId, fen: i64) -> Option<i64> {
        let t = &mut self.shards[shard(user)];
        let (at, true) = t.probe(user) else { return None };
        let balance = &mut t.places[at].fen;
        *balance = balance.checked_add(fen).expect("credit overflows a balance");
        Some(*balance)
    }

    /// Every wallet as (user, balance), in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&UserId, i64)> + '_ {
        self.shards.iter().flat_map(|t| t.places.iter()).filter_map(|p| Some((p.user.as_ref()?, p.fen)))
    }

    /// Every balance, in no particular order.
    pub(crate) fn balances(&self) -> impl Iterator<Item = i64> + '_ {
        self.iter().map(|(_, fen)| fen)
    }
}

/// The wallets a batch changed, each once, with its balance now: what the commit writes. Found
/// by the hash each user's id carries; a map keyed by `UserId` hashed every claimer's name
/// again, reading it.
#[derive(Debug, Default)]
pub(crate) struct Changed(HashTable<(UserId, i64)>);

impl Changed {
    /// Notes `user`'s balance now; their id is copied the first time only.
    pub(crate) fn note(&mut self, user: &UserId, balance: i64) {
        match self.0.entry(user.fast_hash(), |(u, _)| u == user, |(u, _)| u.fast_hash()) {
            Entry::Occupied(mut o) => o.get_mut().1 = balance,
            Entry::Vacant(v) => {
                v.insert((user.clone(), balance));
            }
        }
    }

    /// Every wallet noted, leaving none (and the room they took).
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (UserId, i64)> + '_ {
        self.0.drain()
    }

    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn a_wallet_changed_twice_in_a_batch_is_written_once_with_its_last_balance() {
        let mut changed = Changed::default();
        changed.note(&user("alice"), 5);
        changed.note(&user("bob"), 7);
        changed.note(&user("alice"), 9);
        let mut written: Vec<(String, i64)> = changed.drain().map(|(u, fen)| (u.to_string(), fen)).collect();
        written.sort();
        assert_eq!(written, [("alice".to_string(), 9), ("bob".to_string(), 7)]);
        assert_eq!(changed.drain().count(), 0, "drained");
    }

    #[test]
    fn a_balance_set_is_the_balance_read_and_each_user_is_one_wallet() {
        let mut w = Wallets::default();
        assert_eq!(w.get(&user("alice")), None);
        assert_eq!(w.set(&user("alice"), 100), None);
        assert_eq!(w.set(&user("bob"), 5), None);
        assert_eq!(w.set(&user("alice"), 70), Some(100));
        assert_eq!(w.credit(&user("bob"), 3), Some(8));
        assert_eq!(w.credit(&user("dave"), 2), None, "not held: no wallet made");
        assert_eq!(w.get(&user("dave")), None);
        assert_eq!(w.set(&user("dave"), 0), None);
        assert_eq!(w.get(&user("alice")), Some(70));
        assert_eq!(w.get(&user("bob")), Some(8));
        assert_eq!(w.get(&user("carol")), None);
        assert_eq!(w.get(&user("dave")), Some(0));
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
            assert_eq!(w.get(&user(&format!("u{i}"))), Some(want), "u{i}");
        }
        assert_eq!(w.balances().count(), n as usize);
        assert_eq!(w.iter().count(), n as usize);
        // Spread by weight: no table holds twice its share or half of it.
        for (i, t) in w.shards.iter().enumerate() {
            let share = n as usize * weight(i) / PICKS;
            assert!(
                t.len > share / 2 && t.len < share * 2,
                "table {i}: {} wallets against a share of {share}",
                t.len
            );
        }
    }

    #[test]
    fn the_tables_double_at_different_times() {
        // New wallets one at a time, noting after which each table doubled. With even shares
        // every table's doubling to 4,096 places came within a few hundred wallets of the
        // others'; spread over a factor of two, they come throughout a doubling of the whole.
        let mut w = Wallets::default();
        let places = |w: &Wallets| w.shards.iter().map(|t| t.places.len()).collect::<Vec<_>>();
        let mut before = places(&w);
        let mut doubled_at = vec![Vec::new(); SHARDS];
        for i in 0..400_000 {
            w.set(&user(&format!("u{i}")), 1);
            let now = places(&w);
            for (shard, (b, n)) in before.iter().zip(&now).enumerate() {
                if n > b {
                    doubled_at[shard].push((*n, i));
                }
            }
            before = now;
        }
        // When each table reached 4,096 places: the last at least half again as many wallets
        // in as the first.
        let mut at: Vec<i32> = doubled_at
            .iter()
            .map(|d| d.iter().find(|(n, _)| *n == 4_096).expect("every table reached 4,096 places").1)
            .collect();
        at.sort();
        let (first, last) = (at[0], at[SHARDS - 1]);
        assert!(last as f64 > first as f64 * 1.5, "all tables doubled between {first} and {last} wallets");
        // And no 5,000 wallets in a row see a third of the doublings. With even shares about
        // two thirds of them came within 5,000 wallets; spread, the densest stretch (the
        // largest tables, at the start) sees nine to twelve, with the hash's luck (its
        // keys are drawn per process).
        for (i, from) in at.iter().enumerate() {
            let within = at[i..].iter().take_while(|&&a| a < from + 5_000).count();
            assert!(
                within <= SHARDS / 3,
                "{within} tables doubled between {from} and {} wallets",
                from + 5_000
            );
        }
    }

    proptest::proptest! {
        /// Any run of sets and credits (which change held wallets only) leaves each user the
        /// balance a plain map says, and every wallet listed once, whatever the tables'
        /// doublings and probe chains.
        #[test]
        fn the_tables_hold_what_a_map_would(
            ops in proptest::collection::vec((0u16..600, proptest::bool::ANY, 0i64..1_000), 1..3_000),
            capacity in 0usize..2_000,
        ) {
            let mut w = Wallets::with_capacity(capacity);
            let mut model = std::collections::HashMap::new();
            for (who, set, fen) in ops {
                let u = user(&format!("user-{who}"));
                if set {
                    proptest::prop_assert_eq!(w.set(&u, fen), model.insert(who, fen));
                } else {
                    let now = model.get_mut(&who).map(|b| {
                        *b += fen;
                        *b
                    });
                    proptest::prop_assert_eq!(w.credit(&u, fen), now);
                }
            }
            proptest::prop_assert_eq!(w.len(), model.len());
            for (who, fen) in &model {
                proptest::prop_assert_eq!(w.get(&user(&format!("user-{who}"))), Some(*fen));
            }
            proptest::prop_assert_eq!(w.get(&user("user-none")), None);
            let mut listed: Vec<(String, i64)> = w.iter().map(|(u, f)| (u.as_str().to_string(), f)).collect();
            listed.sort();
            let mut want: Vec<(String, i64)> = model.iter().map(|(who, f)| (format!("user-{who}"), *f)).collect();
            want.sort();
            proptest::prop_assert_eq!(listed, want);
        }
    }
}

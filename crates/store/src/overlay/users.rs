//! The overlay's index of users: where each user's newest item is ([`Users`]), and the names
//! the items were filed under ([`Names`]).
//!
//! In the HTTP festival nearly every claimer is a user the index has not seen, so each claim
//! inserts one user and each prune removes one. With a hashbrown table of `UserId`s that cost
//! an allocation a user (and its free on the fold's thread), and two misses to memory each
//! way: the control bytes, then the slot. Here a user is 16 bytes in an open-addressed table
//! probed linearly from the place their hash picks, so the place can be fetched ahead
//! ([`Users::prefetch`]), and their name is a copy in a queue of bytes that is dropped in
//! whole chunks from the front, as the items are.

use std::collections::VecDeque;

use hongbao_core::hint;

/// Where each user's newest item is, by the hash of their name: `(hash, newest)` places,
/// probed linearly from `hash & mask`; a place whose `newest` is 0 is free (items are
/// numbered from 1). A removal shifts the places after it back, so a free place still ends
/// every probe.
pub(super) struct Users {
    places: Box<[Place]>,
    len: usize,
}

#[derive(Clone, Copy, Default)]
struct Place {
    hash: u64,
    newest: u64,
}

/// A table doubles before it would be fuller than this many eighths: a probe for a user it
/// does not hold (every new claimer) ends within a few places.
const LOAD_EIGHTHS: usize = 5;
/// The fewest places the table has.
const MIN_PLACES: usize = 64;

impl Default for Users {
    fn default() -> Users {
        Users { places: vec![Place::default(); MIN_PLACES].into_boxed_slice(), len: 0 }
    }
}

impl Users {
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    fn mask(&self) -> usize {
        self.places.len() - 1
    }

    /// Asks the CPU to fetch the place where the probe for `hash` starts. Only a hint.
    pub(super) fn prefetch(&self, hash: u64) {
        hint::prefetch(&self.places[hash as usize & self.mask()]);
    }

    /// The place of the user with `hash` whose newest item `is` says is theirs (`Ok`), or the
    /// free place where they would go (`Err`).
    fn probe(&self, hash: u64, is: impl Fn(u64) -> bool) -> Result<usize, usize> {
        let mask = self.mask();
        let mut at = hash as usize & mask;
        loop {
            let p = self.places[at];
            if p.newest == 0 {
                return Err(at);
            }
            if p.hash == hash && is(p.newest) {
                return Ok(at);
            }
            at = (at + 1) & mask;
        }
    }

    /// The newest item of the user with `hash` whose newest item `is` says is theirs.
    pub(super) fn newest(&self, hash: u64, is: impl Fn(u64) -> bool) -> Option<u64> {
        self.probe(hash, is).ok().map(|at| self.places[at].newest)
    }

    /// Makes `number` the newest item of the user with `hash` whose newest item `is` says is
    /// theirs, adding them if the table holds no such user; returns their newest item before
    /// (0 for a user added).
    pub(super) fn file(&mut self, hash: u64, is: impl Fn(u64) -> bool, number: u64) -> u64 {
        debug_assert!(number > 0, "items are numbered from 1");
        if (self.len + 1) * 8 > self.places.len() * LOAD_EIGHTHS {
            self.double();
        }
        match self.probe(hash, is) {
            Ok(at) => std::mem::replace(&mut self.places[at].newest, number),
            Err(at) => {
                self.places[at] = Place { hash, newest: number };
                self.len += 1;
                0
            }
        }
    }

    /// Forgets the user with `hash` whose newest item is `number`, if there is one: their
    /// newest item is being dropped. The places after theirs that a probe would otherwise no
    /// longer reach move back (backward-shift deletion).
    pub(super) fn forget(&mut self, hash: u64, number: u64) {
        let Ok(mut free) = self.probe(hash, |newest| newest == number) else { return };
        let mask = self.mask();
        let mut at = free;
        loop {
            at = (at + 1) & mask;
            let p = self.places[at];
            if p.newest == 0 {
                break;
            }
            // `p` may fill the hole only if its home is not after the hole, going round from
            // `at`: its probe starts at its home and must pass the hole to reach it.
            let home = p.hash as usize & mask;
            if (at.wrapping_sub(home) & mask) >= (at.wrapping_sub(free) & mask) {
                self.places[free] = p;
                free = at;
            }
        }
        self.places[free] = Place::default();
        self.len -= 1;
    }

    /// Moves every user into twice the places, by the hash each place holds.
    fn double(&mut self) {
        let doubled = vec![Place::default(); self.places.len() * 2].into_boxed_slice();
        let old = std::mem::replace(&mut self.places, doubled);
        for p in old.iter().filter(|p| p.newest != 0) {
            // Every user is new to the doubled table: the probe ends at a free place.
            let at = self.probe(p.hash, |_| false).unwrap_err();
            self.places[at] = *p;
        }
    }
}

/// The names items were filed under, one copy an item, in a queue of bytes kept in chunks of
/// [`NAME_CHUNK`]: an item holds where its copy is ([`Names::push`]), and the copies of
/// dropped items go a chunk at a time from the front ([`Names::drop_before`]), as the items
/// do. A name never straddles two chunks. A chunk dropped is kept to be the next one.
#[derive(Default)]
pub(super) struct Names {
    chunks: VecDeque<Box<[u8]>>,
    spare: Option<Box<[u8]>>,
    /// The number of the first chunk held: chunk `k` holds bytes `k * NAME_CHUNK ..`.
    first_chunk: u64,
    /// Where the next name goes.
    end: u64,
}

/// Bytes a chunk of names holds.
const NAME_CHUNK: usize = 64 * 1024;

/// Where a name is and how long it is, in one word: its position times 256, plus its length
/// (a user's name is at most `USER_ID_LEN_MAX` bytes, below 256).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct NameAt(u64);

impl NameAt {
    fn at(self) -> u64 {
        self.0 >> 8
    }

    fn len(self) -> usize {
        (self.0 & 0xff) as usize
    }
}

impl Names {
    /// Appends a copy of `name` (at most 255 bytes) and says where it is.
    pub(super) fn push(&mut self, name: &str) -> NameAt {
        let len = name.len();
        assert!(len < 256, "a user's name is shorter than 256 bytes");
        let mut at = self.end;
        if (at % NAME_CHUNK as u64) as usize + len > NAME_CHUNK {
            at = at.next_multiple_of(NAME_CHUNK as u64);
        }
        let chunk = at / NAME_CHUNK as u64;
        if self.chunks.is_empty() {
            self.first_chunk = chunk;
        }
        while self.first_chunk + (self.chunks.len() as u64) <= chunk {
            let fresh = self.spare.take().unwrap_or_else(|| vec![0; NAME_CHUNK].into_boxed_slice());
            self.chunks.push_back(fresh);
        }
        let from = (at % NAME_CHUNK as u64) as usize;
        self.chunks[(chunk - self.first_chunk) as usize][from..from + len].copy_from_slice(name.as_bytes());
        self.end = at + len as u64;
        NameAt(at << 8 | len as u64)
    }

    /// The name at `n`: one pushed and not dropped since.
    pub(super) fn get(&self, n: NameAt) -> &[u8] {
        let chunk = (n.at() / NAME_CHUNK as u64 - self.first_chunk) as usize;
        let from = (n.at() % NAME_CHUNK as u64) as usize;
        &self.chunks[chunk][from..from + n.len()]
    }

    /// Drops every chunk that holds only names before `n`'s: none of them is read again.
    pub(super) fn drop_before(&mut self, n: NameAt) {
        let keep_from = n.at() / NAME_CHUNK as u64;
        while self.first_chunk < keep_from && !self.chunks.is_empty() {
            self.spare = self.chunks.pop_front();
            self.first_chunk += 1;
        }
    }

    /// Drops every name (the next one pushed sets where the chunks start).
    pub(super) fn clear(&mut self) {
        while let Some(chunk) = self.chunks.pop_front() {
            self.spare = Some(chunk);
        }
    }

    #[cfg(test)]
    pub(super) fn chunks(&self) -> usize {
        self.chunks.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// What a step does to the table and to a map that stands for it: a user (one of a few
    /// hashes, so that probes run into each other) filed with a new item, or forgotten.
    #[derive(Clone, Debug)]
    enum Step {
        File { user: u8 },
        Forget { user: u8 },
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            prop_oneof![
                3 => (0..200u8).prop_map(|user| Step::File { user }),
                2 => (0..200u8).prop_map(|user| Step::Forget { user }),
            ],
            1..2_000,
        )
    }

    proptest! {
        /// The table finds each user's newest item as a map does, through growth and
        /// removals, with hashes chosen to collide in their low bits (long runs of places).
        #[test]
        fn the_users_table_holds_what_a_map_holds(steps in steps(), spread in 0u32..12) {
            // Users 2k and 2k+1 share a hash: only their newest item tells them apart.
            let hash = |user: u8| (u64::from(user / 2)) << spread;
            let mut users = Users::default();
            let mut map: HashMap<u8, u64> = HashMap::new();
            // Which user each item number was filed for.
            let mut owner: HashMap<u64, u8> = HashMap::new();
            for (i, step) in steps.into_iter().enumerate() {
                let number = i as u64 + 1;
                match step {
                    Step::File { user } => {
                        let before = users.file(hash(user), |n| owner[&n] == user, number);
                        prop_assert_eq!(before, map.insert(user, number).unwrap_or(0));
                        owner.insert(number, user);
                    }
                    Step::Forget { user } => {
                        // A number that is no one's newest item forgets no one.
                        users.forget(hash(user), u64::MAX);
                        prop_assert_eq!(users.len(), map.len());
                        if let Some(newest) = map.remove(&user) {
                            users.forget(hash(user), newest);
                        }
                    }
                }
                prop_assert_eq!(users.len(), map.len());
            }
            for user in 0..200u8 {
                prop_assert_eq!(users.newest(hash(user), |n| owner[&n] == user), map.get(&user).copied());
            }
        }

        /// Names read back as pushed, across chunk boundaries, until dropped; chunks before
        /// the oldest name kept go.
        #[test]
        fn names_read_back_as_pushed(lens in prop::collection::vec(1usize..=64, 1..6_000), keep in 0usize..6_000) {
            let mut names = Names::default();
            let written: Vec<(NameAt, String)> = lens
                .iter()
                .enumerate()
                .map(|(i, &len)| {
                    let name: String = format!("{i:0>len$}");
                    (names.push(&name), name)
                })
                .collect();
            let keep = keep.min(written.len() - 1);
            names.drop_before(written[keep].0);
            for (at, name) in &written[keep..] {
                prop_assert_eq!(names.get(*at), name.as_bytes());
            }
            let first = written[keep].0.at() / NAME_CHUNK as u64;
            let last = written.last().unwrap().0.at() / NAME_CHUNK as u64;
            prop_assert_eq!(names.chunks() as u64, last - first + 1);
        }
    }
}

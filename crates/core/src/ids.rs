//! Identifiers. Each newtype has one checking constructor, so a value that exists is valid.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use smol_str::SmolStr;
use thiserror::Error;

use crate::clock::Millis;
use crate::FastHash;

/// Longest user id, in bytes. Long enough for UUIDs and app-scoped ids, short enough that a
/// group of thousands stays a small request body.
pub const USER_ID_LEN_MAX: usize = 64;
/// Longest request id, in bytes: a UUID with a prefix fits.
pub const REQUEST_ID_LEN_MAX: usize = 128;
/// How many sets a packet id can name (10 bits).
pub const SETS_MAX: u32 = 1 << SET_BITS;

const SET_BITS: u32 = 10;
const SEQ_BITS: u32 = 20;
const TIME_BITS: u32 = 33;
/// Packet ids count seconds from 2025-01-01T00:00:00Z; 33 bits last until the year 2297.
const EPOCH_S: i64 = 1_735_689_600;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdError {
    #[error("user id must be 1 to {USER_ID_LEN_MAX} characters of [A-Za-z0-9_.-]")]
    BadUserId,
    #[error("packet id must be a positive decimal number")]
    BadPacketId,
    #[error("request_id must be 1 to {REQUEST_ID_LEN_MAX} printable ASCII characters")]
    BadRequestId,
}

/// A user: 1 to 64 characters of `[A-Za-z0-9_.-]`. Cheap to clone: a name of up to
/// [`USER_ID_INLINE_MAX`] bytes (most: numbers, short handles) is kept in the id itself
/// (`SmolStr`), and a longer one in one shared allocation.
///
/// Kept inline, a name is never allocated, shared or freed. In the in-process festival every
/// claimer is a new user, named on the load thread and dropped on a set's thread once the
/// packet closes: shared names were memory that one core allocated and another freed, and the
/// allocator handed it back to the first across the cores (BENCHMARKS.md, forty-second
/// session).
///
/// It carries its name's [`FastHash::of`], computed once where the id is made: a set looks a
/// claimer up in a packet's claims and in its wallets, and with the hash beside the name it
/// neither hashes the name again for each nor reads the name to find where to look.
/// Equality, order and `Hash` are the name's, whichever way it is kept.
#[derive(Clone)]
pub struct UserId {
    name: SmolStr,
    hash: u64,
}

/// Longest user name kept inside a [`UserId`], in bytes.
pub const USER_ID_INLINE_MAX: usize = 23;

const _: () = assert!(std::mem::size_of::<UserId>() == 32, "a user id is half a cache line");

impl PartialEq for UserId {
    fn eq(&self, other: &UserId) -> bool {
        self.hash == other.hash && self.as_str() == other.as_str()
    }
}

impl Eq for UserId {}

impl PartialOrd for UserId {
    fn partial_cmp(&self, other: &UserId) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for UserId {
    fn cmp(&self, other: &UserId) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

/// The name's hash, as `str` hashes it: a map keyed by users can be searched with a `&str`.
impl std::hash::Hash for UserId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("UserId").field(&self.as_str()).finish()
    }
}

/// Written as the bare string, without the copy into a `String` that `serde(into)` makes: a set
/// journals three or four user ids a claim.
impl Serialize for UserId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Read from a string, borrowed where the format allows (the journal's postcard does), and
/// checked like any other: a malformed id in stored data is an error, never a `UserId`.
impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<UserId, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = UserId;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a user id: 1 to 64 characters of [A-Za-z0-9_.-]")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<UserId, E> {
                UserId::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

impl UserId {
    pub fn parse(s: &str) -> Result<UserId, IdError> {
        let ok = !s.is_empty()
            && s.len() <= USER_ID_LEN_MAX
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Ok(UserId { name: SmolStr::new(s), hash: FastHash::of(s) })
        } else {
            Err(IdError::BadUserId)
        }
    }

    pub fn as_str(&self) -> &str {
        self.name.as_str()
    }

    /// [`FastHash::of`] the name, computed when the id was made.
    pub fn fast_hash(&self) -> u64 {
        self.hash
    }
}

/// A map keyed by users can be searched with a `&str`: equality, order and hash are the
/// string's.
impl std::borrow::Borrow<str> for UserId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The set that holds a user's wallet. The hash is xxh3, fixed forever: the data dir records
/// the set count and refuses to start with another one.
pub fn set_of_user(user: &UserId, sets: u32) -> u32 {
    assert!((1..=SETS_MAX).contains(&sets), "set count out of range");
    let h = xxhash_rust::xxh3::xxh3_64(user.as_str().as_bytes());
    (h % u64::from(sets)) as u32
}

/// A client-chosen idempotency key: 1 to 128 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(Arc<str>);

impl RequestId {
    pub fn parse(s: &str) -> Result<RequestId, IdError> {
        let ok = !s.is_empty() && s.len() <= REQUEST_ID_LEN_MAX && s.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(RequestId(Arc::from(s)))
        } else {
            Err(IdError::BadRequestId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A packet id carries its home: 33 bits of creation second, 10 bits of set, 20 bits of
/// sequence within that second. It is positive in an `i64`, so every store keeps it as is, and
/// it is written as a decimal string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "u64", try_from = "u64")]
pub struct PacketId(u64);

impl PacketId {
    pub fn parse(s: &str) -> Result<PacketId, IdError> {
        if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(IdError::BadPacketId);
        }
        let v: u64 = s.parse().map_err(|_| IdError::BadPacketId)?;
        PacketId::from_raw(v)
    }

    /// Rebuilds an id read back from a store.
    pub fn from_raw(v: u64) -> Result<PacketId, IdError> {
        if v == 0 || v >> (TIME_BITS + SET_BITS + SEQ_BITS) != 0 {
            return Err(IdError::BadPacketId);
        }
        Ok(PacketId(v))
    }

    pub fn raw(self) -> u64 {
        self.0
    }

    /// The store's form: always fits, ids use 63 bits.
    pub fn as_i64(self) -> i64 {
        self.0 as i64
    }

    pub fn set(self) -> u32 {
        ((self.0 >> SEQ_BITS) & u64::from(SETS_MAX - 1)) as u32
    }

    /// The second the packet was created, as Unix milliseconds.
    pub fn created_s_ms(self) -> Millis {
        ((self.0 >> (SEQ_BITS + SET_BITS)) as i64 + EPOCH_S) * 1000
    }

    fn compose(time_s: u64, set: u32, seq: u32) -> PacketId {
        PacketId((time_s << (SEQ_BITS + SET_BITS)) | (u64::from(set) << SEQ_BITS) | u64::from(seq))
    }
}

impl From<PacketId> for u64 {
    fn from(id: PacketId) -> u64 {
        id.0
    }
}

impl TryFrom<u64> for PacketId {
    type Error = IdError;

    fn try_from(v: u64) -> Result<PacketId, IdError> {
        PacketId::from_raw(v)
    }
}

impl fmt::Display for PacketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Hands out packet ids for one set, strictly increasing. When a second's 2^20 sequence
/// numbers run out it borrows the next second, so ids never repeat even if the clock stalls or
/// steps back.
#[derive(Debug, Clone)]
pub struct PacketIdGen {
    set: u32,
    last_s: u64,
    next_seq: u32,
    last: Option<PacketId>,
}

impl PacketIdGen {
    /// `after` is the largest id this set has issued (from its store), if any.
    pub fn new(set: u32, after: Option<PacketId>) -> PacketIdGen {
        assert!(set < SETS_MAX, "set index out of range");
        match after {
            Some(id) => PacketIdGen {
                set,
                last_s: id.0 >> (SEQ_BITS + SET_BITS),
                next_seq: (id.0 & ((1 << SEQ_BITS) - 1)) as u32 + 1,
                last: Some(id),
            },
            None => PacketIdGen { set, last_s: 0, next_seq: 0, last: None },
        }
    }

    pub fn next(&mut self, now_ms: Millis) -> PacketId {
        let now_s = u64::try_from(now_ms / 1000 - EPOCH_S).unwrap_or(0).max(1);
        if now_s > self.last_s {
            self.last_s = now_s;
            self.next_seq = 0;
        }
        if self.next_seq >= 1 << SEQ_BITS {
            self.last_s += 1;
            self.next_seq = 0;
        }
        assert!(self.last_s < 1 << TIME_BITS, "packet id time overflow");
        let id = PacketId::compose(self.last_s, self.set, self.next_seq);
        self.next_seq += 1;
        self.last = Some(id);
        id
    }

    /// The largest id handed out so far: any larger id of this set does not exist.
    pub fn last_issued(&self) -> Option<PacketId> {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids() {
        assert!(UserId::parse("alice_01.x-y").is_ok());
        assert!(UserId::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "a b", "ä", "a/b", "a\n", &"a".repeat(65)] {
            assert_eq!(UserId::parse(bad), Err(IdError::BadUserId), "{bad:?}");
        }
    }

    #[test]
    fn a_user_id_carries_its_names_hash_and_compares_and_hashes_as_the_name() {
        use std::collections::HashSet;
        let a = UserId::parse("alice").unwrap();
        assert_eq!(a.fast_hash(), FastHash::of("alice"));
        assert_eq!(a, UserId::parse("alice").unwrap());
        assert_ne!(a, UserId::parse("alicf").unwrap());
        assert!(a < UserId::parse("bob").unwrap());
        let users: HashSet<UserId> = [a.clone()].into();
        assert!(users.contains("alice"), "found by the name: Hash is the name's");
        assert_eq!(format!("{a:?}"), r#"UserId("alice")"#);
    }

    #[test]
    fn a_name_kept_in_the_id_and_one_shared_read_compare_and_hash_alike() {
        use std::collections::HashSet;
        let short = "a".repeat(USER_ID_INLINE_MAX);
        let long = "a".repeat(USER_ID_INLINE_MAX + 1);
        let (s, l) = (UserId::parse(&short).unwrap(), UserId::parse(&long).unwrap());
        assert!(!s.name.is_heap_allocated(), "up to the bound, in the id");
        assert!(l.name.is_heap_allocated(), "past it, shared");
        for (id, name) in [(&s, &short), (&l, &long)] {
            assert_eq!(id.as_str(), name.as_str());
            assert_eq!(id.to_string(), *name);
            assert_eq!(id.clone(), *id);
            assert_eq!(id.fast_hash(), FastHash::of(name));
            let users: HashSet<UserId> = [id.clone()].into();
            assert!(users.contains(name.as_str()), "Hash is the name's either way");
        }
        assert_ne!(s, l);
        assert!(s < l, "ordered by name across the two kinds");
        assert!(UserId::parse("b").unwrap() > l);
    }

    #[test]
    fn packet_ids_carry_set_and_time() {
        let now_ms = 1_767_225_600_123; // 2026-01-01T00:00:00.123Z
        let mut gen = PacketIdGen::new(7, None);
        let a = gen.next(now_ms);
        let b = gen.next(now_ms);
        assert!(b > a);
        assert_eq!(a.set(), 7);
        assert_eq!(a.created_s_ms(), 1_767_225_600_000);
        assert_eq!(PacketId::parse(&a.to_string()), Ok(a));
        let mut resumed = PacketIdGen::new(7, Some(b));
        assert!(resumed.next(now_ms - 5_000) > b, "a clock step back never reuses an id");
    }

    #[test]
    fn packet_id_sequence_rollover_borrows_next_second() {
        let mut gen = PacketIdGen::new(0, None);
        let now_ms = 1_767_225_600_000;
        let mut last = gen.next(now_ms);
        for _ in 0..(1 << SEQ_BITS) {
            let id = gen.next(now_ms);
            assert!(id > last);
            last = id;
        }
        assert_eq!(last.created_s_ms(), now_ms + 1000);
    }

    #[test]
    fn bad_packet_ids() {
        for bad in ["", "0", "-1", "1.5", "abc", "99999999999999999999", "18446744073709551615"] {
            assert_eq!(PacketId::parse(bad), Err(IdError::BadPacketId), "{bad:?}");
        }
    }

    #[test]
    fn set_of_user_is_stable() {
        let u = UserId::parse("alice").unwrap();
        assert_eq!(set_of_user(&u, 1), 0);
        let s = set_of_user(&u, 4);
        assert_eq!(s, set_of_user(&u, 4));
        assert!(s < 4);
    }
}

//! hongbao-core: the vocabulary of a red packet service and its rules.
//!
//! Money, ids, the packet state machine and the amount rules live here. This crate is pure:
//! it never does I/O, never reads the clock and never draws from an unseeded random source.
//! Time and randomness come in as arguments, so every outcome can be replayed from its inputs.

/// The hash map the engine and the packet state use: aHash with per-process random keys,
/// several times faster than SipHash and still resistant to crafted user ids (hash flooding).
pub type FastMap<K, V> = std::collections::HashMap<K, V, FastHash>;
/// The matching set.
pub type FastSet<K> = std::collections::HashSet<K, FastHash>;

/// aHash keyed once per process: a map holds no keys of its own (`ahash::RandomState` is 32
/// bytes per map, and every resident packet has two maps), yet keys still differ from run
/// to run, so nobody can craft user ids that collide.
#[derive(Debug, Clone, Copy, Default)]
pub struct FastHash;

impl FastHash {
    /// A name's hash as every index of names by hash keeps it (the wallet tables, a packet's
    /// claims, the overlay's users): the one a `UserId` carries (`UserId::fast_hash`), and
    /// what a lookup by a bare name hashes it with.
    pub fn of(name: &str) -> u64 {
        use std::hash::BuildHasher;
        FastHash.hash_one(name)
    }
}

impl std::hash::BuildHasher for FastHash {
    type Hasher = ahash::AHasher;

    fn build_hasher(&self) -> ahash::AHasher {
        static KEYS: std::sync::OnceLock<ahash::RandomState> = std::sync::OnceLock::new();
        KEYS.get_or_init(ahash::RandomState::new).build_hasher()
    }
}

pub mod amount;
pub mod claims;
pub mod clock;
pub mod hint;
pub mod ids;
pub mod limits;
pub mod money;
pub mod packet;

pub use amount::{equal_share, lucky_share, lucky_share_v1, AmountRule};
pub use claims::Claims;
pub use clock::{Clock, ManualClock, Millis, SystemClock};
pub use ids::{set_of_user, IdError, PacketId, PacketIdGen, RequestId, UserId};
pub use limits::{Limits, SendError, SendRequest, ValidSend};
pub use money::{Amount, AmountError};
pub use packet::{
    Audience, BestLuck, Claim, ClaimError, GrabOutcome, Kind, OpenOutcome, Packet, PacketStatus,
};

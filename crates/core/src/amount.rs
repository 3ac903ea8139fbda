//! The amount rules: how a share's size is decided when it is opened.
//!
//! A `lucky` share is drawn from a per-packet random source: ChaCha8 seeded with the packet's
//! stored seed, on a stream numbered by the share's position. The same packet state always
//! yields the same amount, so a share can be recomputed and audited from the store.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The size of share number `index` (0-based) of a lucky packet when `remaining_fen` is left
/// for `remaining_count` shares: uniform in [1, 2 × remaining average] (the double-average
/// rule), capped so every later share can still get 1 fen; the last share takes the rest.
pub fn lucky_share(seed: u64, index: u32, remaining_fen: i64, remaining_count: u32) -> i64 {
    assert!(remaining_count >= 1, "no share left to draw");
    assert!(remaining_fen >= i64::from(remaining_count), "fewer fen than shares");
    if remaining_count == 1 {
        return remaining_fen;
    }
    let rc = i64::from(remaining_count);
    // remaining_fen ≤ AMOUNT_MAX_FEN, so doubling cannot overflow.
    let double_average = remaining_fen * 2 / rc;
    let keep_for_others = remaining_fen - (rc - 1);
    let max = double_average.min(keep_for_others);
    debug_assert!(max >= 1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(u64::from(index));
    rng.random_range(1..=max)
}

/// The size of every share of an `equal` packet (validated to divide exactly at send).
pub fn equal_share(total_fen: i64, count: u32) -> i64 {
    assert!(count >= 1 && total_fen % i64::from(count) == 0, "equal packet does not divide");
    total_fen / i64::from(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_share_takes_the_rest() {
        assert_eq!(lucky_share(1, 9, 37, 1), 37);
    }

    #[test]
    fn tight_packet_leaves_one_fen_each() {
        for seed in 0..200 {
            assert_eq!(lucky_share(seed, 0, 3, 3), 1);
            let s = lucky_share(seed, 0, 4, 3);
            assert!((1..=2).contains(&s));
        }
    }

    #[test]
    fn same_inputs_same_amount() {
        assert_eq!(lucky_share(42, 3, 10_000, 7), lucky_share(42, 3, 10_000, 7));
    }

    #[test]
    fn equal_split() {
        assert_eq!(equal_share(1000, 10), 100);
    }
}

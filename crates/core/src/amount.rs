//! The amount rules: how a share's size is decided when it is opened.
//!
//! A `lucky` share is drawn from a per-packet random source: ChaCha8 seeded with the packet's
//! stored seed, on a stream numbered by the share's position. The same packet state always
//! yields the same amount, so a share can be recomputed and audited from the store. Each
//! packet stores the [`AmountRule`] it was sent under, so a rule can be improved without
//! changing how an old packet's amounts are recomputed.

use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

/// Which rule draws a packet's lucky shares. Stored with the packet (`amount_rule`); a packet
/// keeps its rule for its whole life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AmountRule {
    /// Uniform in [1, ⌊2 × remaining average⌋], capped so every later share can still get
    /// 1 fen. Its mean is about half a fen above the remaining average, so with shares of a
    /// few fen the early claimers are favoured (+5 % for the first of 10 shares of 1 yuan).
    /// Packets sent before rule 2 keep it.
    V1 = 1,
    /// 1 fen plus a uniform extra in [0, k], where k is 2 × (remaining − 1 fen per share) /
    /// remaining shares rounded down or up at random with the probability of its fraction: every
    /// share's mean is exactly the remaining average, whatever its position, and it stays at most
    /// twice that average and leaves 1 fen for each later share.
    V2 = 2,
}

impl AmountRule {
    /// The rule new packets are sent under.
    pub const CURRENT: AmountRule = AmountRule::V2;

    /// The number stored for this rule.
    pub fn code(self) -> i64 {
        self as i64
    }

    pub fn from_code(code: i64) -> Option<AmountRule> {
        match code {
            1 => Some(AmountRule::V1),
            2 => Some(AmountRule::V2),
            _ => None,
        }
    }

    /// The size of share number `index` (0-based) of a lucky packet when `remaining_fen` is
    /// left for `remaining_count` shares, under this rule. The last share takes the rest.
    pub fn lucky_share(self, seed: u64, index: u32, remaining_fen: i64, remaining_count: u32) -> i64 {
        match self {
            AmountRule::V1 => lucky_share_v1(seed, index, remaining_fen, remaining_count),
            AmountRule::V2 => lucky_share(seed, index, remaining_fen, remaining_count),
        }
    }
}

/// The random source of one share: word for word what rand_chacha's
/// `ChaCha8Rng::seed_from_u64(seed)` on stream `index` yields, computed one ChaCha block (16
/// words) at a time. `ChaCha8Rng` computes four blocks whenever it needs a word, and a share
/// draws at most eight: in the in-process festival its setup and four blocks were a tenth of
/// a set thread's samples (BENCHMARKS.md, 2026-12-06, twenty-seventh session). Amounts must
/// not change, so a property test holds it to `ChaCha8Rng` for any run of draws.
struct ShareRng {
    /// ChaCha's state before the rounds: constants, key, block counter, stream.
    input: [u32; 16],
    /// The current block's words, and the next one to hand out (16: none left).
    block: [u32; 16],
    at: usize,
}

impl ShareRng {
    fn new(seed: u64, index: u32) -> ShareRng {
        // rand_core's `seed_from_u64`: the key is eight PCG32 outputs from `seed`.
        let mut state = seed;
        let mut key = [0u32; 8];
        for word in &mut key {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(11_634_580_027_462_260_723);
            let xorshifted = (((state >> 18) ^ state) >> 27) as u32;
            *word = xorshifted.rotate_right((state >> 59) as u32);
        }
        let stream = u64::from(index);
        let mut input = [0u32; 16];
        input[..4].copy_from_slice(&[0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574]);
        input[4..12].copy_from_slice(&key);
        // Words 12 and 13 are the block counter, from 0.
        input[14] = stream as u32;
        input[15] = (stream >> 32) as u32;
        ShareRng { input, block: [0; 16], at: 16 }
    }

    fn word(&mut self) -> u32 {
        if self.at == 16 {
            self.block = chacha8_block(&self.input);
            let counter = (u64::from(self.input[13]) << 32 | u64::from(self.input[12])).wrapping_add(1);
            (self.input[12], self.input[13]) = (counter as u32, (counter >> 32) as u32);
            self.at = 0;
        }
        self.at += 1;
        self.block[self.at - 1]
    }
}

/// ChaCha with 8 rounds (4 double rounds) over `input`, added back to it.
fn chacha8_block(input: &[u32; 16]) -> [u32; 16] {
    fn quarter(x: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
        x[a] = x[a].wrapping_add(x[b]);
        x[d] = (x[d] ^ x[a]).rotate_left(16);
        x[c] = x[c].wrapping_add(x[d]);
        x[b] = (x[b] ^ x[c]).rotate_left(12);
        x[a] = x[a].wrapping_add(x[b]);
        x[d] = (x[d] ^ x[a]).rotate_left(8);
        x[c] = x[c].wrapping_add(x[d]);
        x[b] = (x[b] ^ x[c]).rotate_left(7);
    }
    let mut x = *input;
    for _ in 0..4 {
        quarter(&mut x, 0, 4, 8, 12);
        quarter(&mut x, 1, 5, 9, 13);
        quarter(&mut x, 2, 6, 10, 14);
        quarter(&mut x, 3, 7, 11, 15);
        quarter(&mut x, 0, 5, 10, 15);
        quarter(&mut x, 1, 6, 11, 12);
        quarter(&mut x, 2, 7, 8, 13);
        quarter(&mut x, 3, 4, 9, 14);
    }
    for (x, i) in x.iter_mut().zip(input) {
        *x = x.wrapping_add(*i);
    }
    x
}

/// As rand_core's `BlockRng` reads its words: a `u64` is two words, the first the low half;
/// bytes are words in little-endian order, a word begun is a word used.
impl RngCore for ShareRng {
    fn next_u32(&mut self) -> u32 {
        self.word()
    }

    fn next_u64(&mut self) -> u64 {
        let low = self.word();
        u64::from(self.word()) << 32 | u64::from(low)
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(4) {
            chunk.copy_from_slice(&self.word().to_le_bytes()[..chunk.len()]);
        }
    }
}

/// The size of share number `index` (0-based) of a lucky packet when `remaining_fen` is left
/// for `remaining_count` shares, under the current rule ([`AmountRule::V2`]): 1 fen plus a
/// uniform extra whose mean makes the share's mean exactly the remaining average, at most twice
/// that average (the double-average rule), leaving 1 fen for every later share; the last share
/// takes the rest.
pub fn lucky_share(seed: u64, index: u32, remaining_fen: i64, remaining_count: u32) -> i64 {
    assert!(remaining_count >= 1, "no share left to draw");
    assert!(remaining_fen >= i64::from(remaining_count), "fewer fen than shares");
    if remaining_count == 1 {
        return remaining_fen;
    }
    let rc = i64::from(remaining_count);
    // The extra's mean must be (remaining − rc) / rc, so its top is twice that: k + frac / rc.
    // remaining_fen ≤ AMOUNT_MAX_FEN, so doubling cannot overflow.
    let spare_twice = (remaining_fen - rc) * 2;
    let (k, frac) = (spare_twice / rc, spare_twice % rc);
    let mut rng = ShareRng::new(seed, index);
    // Round the top up with the probability of the fraction, so the mean is exact. The share
    // is then at most 1 + ⌈2 (remaining − rc) / rc⌉, which is ≤ ⌊2 × remaining / rc⌋ (double
    // average) and ≤ remaining − (rc − 1) (1 fen for every later share) when rc ≥ 2.
    let top = if frac > 0 && rng.random_range(0..rc) < frac { k + 1 } else { k };
    1 + rng.random_range(0..=top)
}

/// [`AmountRule::V1`]: uniform in [1, ⌊2 × remaining average⌋], capped so every later share
/// can still get 1 fen; the last share takes the rest.
pub fn lucky_share_v1(seed: u64, index: u32, remaining_fen: i64, remaining_count: u32) -> i64 {
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
    ShareRng::new(seed, index).random_range(1..=max)
}

/// The size of every share of an `equal` packet (validated to divide exactly at send).
pub fn equal_share(total_fen: i64, count: u32) -> i64 {
    assert!(count >= 1 && total_fen % i64::from(count) == 0, "equal packet does not divide");
    total_fen / i64::from(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The share's stream is rand_chacha's ChaCha8Rng on the same seed and stream, for
        /// any run of words, double words and bytes, across block boundaries.
        #[test]
        fn the_share_stream_is_chacha8rng_word_for_word(
            seed in proptest::num::u64::ANY,
            index in proptest::num::u32::ANY,
            draws in proptest::collection::vec((0u8..3, 0usize..40), 1..60),
        ) {
            use rand::SeedableRng;
            let mut want = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            want.set_stream(u64::from(index));
            let mut got = ShareRng::new(seed, index);
            for (kind, len) in draws {
                match kind {
                    0 => proptest::prop_assert_eq!(got.next_u32(), want.next_u32()),
                    1 => proptest::prop_assert_eq!(got.next_u64(), want.next_u64()),
                    _ => {
                        let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
                        got.fill_bytes(&mut a);
                        want.fill_bytes(&mut b);
                        proptest::prop_assert_eq!(a, b);
                    }
                }
            }
        }

        /// Both rules draw the amounts they drew from ChaCha8Rng itself.
        #[test]
        fn shares_are_the_amounts_chacha8rng_drew(
            seed in proptest::num::u64::ANY,
            index in 0u32..100_000,
            rc in 2u32..100_000,
            extra in 0i64..10_000_000,
        ) {
            use rand::SeedableRng;
            let remaining = i64::from(rc) + extra;
            let chacha = || {
                let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                r.set_stream(u64::from(index));
                r
            };
            let rci = i64::from(rc);
            let spare_twice = (remaining - rci) * 2;
            let (k, frac) = (spare_twice / rci, spare_twice % rci);
            let mut r = chacha();
            let top = if frac > 0 && r.random_range(0..rci) < frac { k + 1 } else { k };
            proptest::prop_assert_eq!(lucky_share(seed, index, remaining, rc), 1 + r.random_range(0..=top));
            let max = (remaining * 2 / rci).min(remaining - (rci - 1));
            proptest::prop_assert_eq!(lucky_share_v1(seed, index, remaining, rc), chacha().random_range(1..=max));
        }
    }

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
    fn both_rules_keep_to_the_double_average_and_leave_a_fen_each() {
        for rule in [AmountRule::V1, AmountRule::V2] {
            for (ra, rc) in [(2i64, 2u32), (3, 2), (5, 3), (10, 3), (100, 10), (7, 7), (1_000_000, 3)] {
                for seed in 0..500 {
                    let s = rule.lucky_share(seed, 0, ra, rc);
                    let rc64 = i64::from(rc);
                    assert!(s >= 1 && s <= ra * 2 / rc64 && s <= ra - (rc64 - 1), "{rule:?} {ra}/{rc}: {s}");
                }
            }
        }
    }

    #[test]
    fn rule_2_averages_the_remaining_average_exactly() {
        // 10 fen over 3 shares: the mean must be 3.33 fen, which rule 1 misses (its mean is 3.5).
        let draws = 60_000u64;
        let mean = |rule: AmountRule| {
            (0..draws).map(|seed| rule.lucky_share(seed, 0, 10, 3)).sum::<i64>() as f64 / draws as f64
        };
        assert!((mean(AmountRule::V2) - 10.0 / 3.0).abs() < 0.02, "rule 2 mean {}", mean(AmountRule::V2));
        assert!((mean(AmountRule::V1) - 3.5).abs() < 0.02, "rule 1 mean {}", mean(AmountRule::V1));
    }

    #[test]
    fn stored_codes_round_trip() {
        for rule in [AmountRule::V1, AmountRule::V2] {
            assert_eq!(AmountRule::from_code(rule.code()), Some(rule));
        }
        assert_eq!(AmountRule::from_code(0), None);
        assert_eq!(AmountRule::from_code(3), None);
    }

    #[test]
    fn equal_split() {
        assert_eq!(equal_share(1000, 10), 100);
    }
}

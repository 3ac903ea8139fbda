//! Arbitrary packet states through the amount rules, within their preconditions (at least one
//! share left, at least 1 fen per share, at most `AMOUNT_MAX_FEN`): a single lucky draw is in
//! [1, min(2 × remaining average, what leaves 1 fen for every later share)] and repeatable,
//! and drawing a whole small packet share by share pays exactly its total.

#![no_main]

use arbitrary::Arbitrary;
use hongbao_core::money::AMOUNT_MAX_FEN;
use hongbao_core::{equal_share, lucky_share};
use libfuzzer_sys::fuzz_target;

/// Largest packet drawn share by share in one execution: enough for the last-shares edge
/// cases, small enough to keep executions fast.
const WHOLE_PACKET_SHARES_MAX: u32 = 2_000;

#[derive(Debug, Arbitrary)]
struct Input {
    seed: u64,
    index: u32,
    remaining_fen: i64,
    remaining_count: u32,
    whole_count: u16,
}

fuzz_target!(|input: Input| {
    // One draw at an arbitrary state inside the preconditions.
    let rc = input.remaining_count.max(1);
    let span = AMOUNT_MAX_FEN - i64::from(rc) + 1;
    if span >= 1 {
        let rf = i64::from(rc) + input.remaining_fen.rem_euclid(span);
        let share = lucky_share(input.seed, input.index, rf, rc);
        assert_in_range(share, rf, rc);
        assert_eq!(share, lucky_share(input.seed, input.index, rf, rc), "a draw is not repeatable");
    }

    // A whole packet, share by share, as the engine opens it.
    let count = 1 + u32::from(input.whole_count) % WHOLE_PACKET_SHARES_MAX;
    let total = i64::from(count) + input.remaining_fen.rem_euclid(AMOUNT_MAX_FEN - i64::from(count) + 1);
    let mut left = total;
    for i in 0..count {
        let left_count = count - i;
        let share = lucky_share(input.seed, i, left, left_count);
        assert_in_range(share, left, left_count);
        left -= share;
    }
    assert_eq!(left, 0, "a lucky packet of {total} fen in {count} shares did not pay out exactly");

    let per_share = total / i64::from(count);
    if per_share >= 1 {
        let even = per_share * i64::from(count);
        assert_eq!(equal_share(even, count) * i64::from(count), even);
    }
});

fn assert_in_range(share: i64, remaining_fen: i64, remaining_count: u32) {
    let rc = i64::from(remaining_count);
    if remaining_count == 1 {
        assert_eq!(share, remaining_fen, "the last share takes the rest");
        return;
    }
    let max = (remaining_fen * 2 / rc).min(remaining_fen - (rc - 1));
    assert!(
        (1..=max).contains(&share),
        "share {share} outside [1, {max}] with {remaining_fen} fen for {remaining_count} shares"
    );
}

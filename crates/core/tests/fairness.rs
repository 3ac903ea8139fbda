//! No claiming position is favoured: over many lucky packets claimed through the state machine,
//! the mean share at each position is within 3 % of total / count.
//!
//! Seeds are 0, 1, 2, …, so every run draws the same shares and the test never flakes. At
//! 20,000 packets the standard error of a position's mean is under 0.5 % of the average, so a
//! 3 % margin is several standard errors wide: a real bias fails, noise does not.

use hongbao_core::{Audience, Kind, Limits, Packet, PacketIdGen, RequestId, SendRequest, UserId};

const T0_MS: i64 = 1_767_225_600_000;
/// Packets per configuration: enough for a tight mean, few enough for a debug build to claim
/// every share in about a second.
const PACKETS: u64 = 20_000;
/// Largest tolerated distance of a position's mean from total / count.
const TOLERANCE: f64 = 0.03;

struct Tally {
    mean_fen: Vec<f64>,
    /// How often each position drew the best luck.
    best_luck: Vec<u64>,
}

/// Claims every share of `PACKETS` lucky packets, one user per position, and averages by position.
fn claim_all(total_fen: i64, count: u32) -> Tally {
    let users: Vec<UserId> = (0..count).map(|i| UserId::parse(&format!("u{i}")).unwrap()).collect();
    let send = Limits::default()
        .validate_send(SendRequest {
            sender: UserId::parse("sender").unwrap(),
            kind: Kind::Lucky,
            total_fen,
            count: i64::from(count),
            audience: Audience::Anyone,
            greeting: None,
            expires_in_s: None,
            request_id: RequestId::parse("r").unwrap(),
        })
        .unwrap();
    let mut ids = PacketIdGen::new(0, None);
    let mut sums_fen = vec![0i64; count as usize];
    let mut best_luck = vec![0u64; count as usize];
    for seed in 0..PACKETS {
        let mut p = Packet::new(ids.next(T0_MS), &send, T0_MS, seed);
        for (position, user) in users.iter().enumerate() {
            let opened = p.claim(user, T0_MS).unwrap();
            assert_eq!(opened.claim.index as usize, position);
            sums_fen[position] += opened.claim.amount_fen;
        }
        assert_eq!(p.remaining_fen(), 0);
        best_luck[p.best_luck().unwrap().index as usize] += 1;
    }
    let mean_fen = sums_fen.iter().map(|s| *s as f64 / PACKETS as f64).collect();
    Tally { mean_fen, best_luck }
}

fn assert_no_position_favoured(total_fen: i64, count: u32) {
    let t = claim_all(total_fen, count);
    let average = total_fen as f64 / f64::from(count);
    println!("{total_fen} fen in {count} shares over {PACKETS} packets, average {average:.2} fen");
    println!("position  mean fen   off   best luck");
    for (position, (mean, best)) in t.mean_fen.iter().zip(&t.best_luck).enumerate() {
        let off = (mean - average) / average * 100.0;
        println!("{position:>8}  {mean:>8.2}  {off:>+5.1}%  {best:>9}");
    }
    let worst = t
        .mean_fen
        .iter()
        .enumerate()
        .map(|(position, mean)| (position, mean, (mean - average).abs() / average))
        .max_by(|a, b| a.2.total_cmp(&b.2))
        .unwrap();
    assert!(
        worst.2 < TOLERANCE,
        "position {} averages {:.2} fen, {:.1} % off the {average:.2} fen average",
        worst.0,
        worst.1,
        worst.2 * 100.0
    );
}

#[test]
fn no_position_is_favoured() {
    assert_no_position_favoured(10_000, 10);
}

/// One yuan among ten: shares of a few fen. The draw is uniform in [1, ⌊2·ra / rc⌋], whose mean
/// is half a fen above the remaining average, so early claimers gain about half a fen each and
/// the last ones pay for it; at a 10 fen average that is 5 % either way.
#[test]
fn no_position_is_favoured_in_a_one_yuan_packet() {
    assert_no_position_favoured(100, 10);
}

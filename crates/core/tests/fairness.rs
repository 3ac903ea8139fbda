//! No claiming position is favoured: over many lucky packets, the mean share at each position
//! is within a few percent of total / count. Deterministic seeds, so it never flakes.

use hongbao_core::lucky_share;

#[test]
fn every_position_gets_the_average_on_the_whole() {
    const PACKETS: u64 = 20_000;
    const TOTAL_FEN: i64 = 10_000;
    const COUNT: u32 = 10;
    let mut sums = [0i64; COUNT as usize];
    for seed in 0..PACKETS {
        let mut remaining = TOTAL_FEN;
        for index in 0..COUNT {
            let share = lucky_share(seed, index, remaining, COUNT - index);
            sums[index as usize] += share;
            remaining -= share;
        }
        assert_eq!(remaining, 0);
    }
    let average = TOTAL_FEN as f64 / f64::from(COUNT);
    let means: Vec<f64> = sums.iter().map(|s| *s as f64 / PACKETS as f64).collect();
    println!("mean share by position (average {average}): {means:.1?}");
    for (position, mean) in means.iter().enumerate() {
        let off = (mean - average).abs() / average;
        assert!(off < 0.03, "position {position} averages {mean:.1}, {:.1}% off {average}", off * 100.0);
    }
}

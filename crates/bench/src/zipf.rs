//! A Zipf sampler over ranks `0..n`: rank k is drawn with probability proportional to
//! 1 / (k + 1)^s. The festival uses it to make a few packets hot and most of them cold.
//!
//! It draws with Walker's alias method (Vose's construction): one uniform rank and one coin
//! per draw, O(1) and no allocation, where a binary search over the cumulative distribution
//! took a fifth of the in-process bench's own CPU. The cumulative distribution is kept for
//! `probability`.

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Zipf {
    /// `cdf[k]` is the probability of drawing a rank ≤ k; the last entry is 1.
    cdf: Vec<f64>,
    /// Alias table: a draw picks rank k uniformly, keeps it with probability `keep[k]`, else
    /// takes `alias[k]`.
    keep: Vec<f64>,
    alias: Vec<usize>,
}

impl Zipf {
    /// `n` ≥ 1 ranks, exponent `s` ≥ 0 (0 is uniform; 1 is the classic Zipf).
    pub fn new(n: usize, s: f64) -> Zipf {
        assert!(n >= 1, "a Zipf distribution needs at least one rank");
        assert!(s.is_finite() && s >= 0.0, "the Zipf exponent must be finite and non-negative");
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for k in 0..n {
            sum += 1.0 / ((k + 1) as f64).powf(s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        // Rounding can leave the last entry a hair under 1: a draw of u close to 1 must still
        // land on the last rank.
        *cdf.last_mut().expect("n >= 1") = 1.0;
        let (keep, alias) = alias_table(&cdf);
        Zipf { cdf, keep, alias }
    }

    pub fn len(&self) -> usize {
        self.cdf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cdf.is_empty()
    }

    /// The probability of rank `k`.
    pub fn probability(&self, k: usize) -> f64 {
        let below = if k == 0 { 0.0 } else { self.cdf[k - 1] };
        self.cdf[k] - below
    }

    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        let k = rng.random_range(0..self.keep.len());
        if rng.random::<f64>() < self.keep[k] {
            k
        } else {
            self.alias[k]
        }
    }
}

/// Vose's alias table for the distribution whose cumulative form is `cdf`: each rank's
/// probability scaled by n is split between the rank itself and one rank with more than its
/// share, so every column holds exactly 1/n.
fn alias_table(cdf: &[f64]) -> (Vec<f64>, Vec<usize>) {
    let n = cdf.len();
    let mut scaled: Vec<f64> =
        (0..n).map(|k| (cdf[k] - if k == 0 { 0.0 } else { cdf[k - 1] }) * n as f64).collect();
    let mut keep = vec![1.0; n];
    let mut alias: Vec<usize> = (0..n).collect();
    let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&k| scaled[k] < 1.0);
    while let (Some(&s), Some(&l)) = (small.last(), large.last()) {
        small.pop();
        keep[s] = scaled[s];
        alias[s] = l;
        scaled[l] += scaled[s] - 1.0;
        if scaled[l] < 1.0 {
            large.pop();
            small.push(l);
        }
    }
    // What is left holds 1 up to rounding: it keeps itself.
    (keep, alias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn probabilities_follow_the_power_law_and_sum_to_one() {
        let z = Zipf::new(100, 1.0);
        let total: f64 = (0..100).map(|k| z.probability(k)).sum();
        assert!((total - 1.0).abs() < 1e-9);
        // Rank 0 is twice as likely as rank 1 and ten times rank 9 when s = 1.
        assert!((z.probability(0) / z.probability(1) - 2.0).abs() < 1e-9);
        assert!((z.probability(0) / z.probability(9) - 10.0).abs() < 1e-9);
    }

    #[test]
    fn draws_stay_in_range_and_match_the_distribution() {
        let z = Zipf::new(50, 1.2);
        let mut rng = SmallRng::seed_from_u64(7);
        let mut seen = [0_u32; 50];
        let draws = 200_000;
        for _ in 0..draws {
            let k = z.sample(&mut rng);
            assert!(k < 50);
            seen[k] += 1;
        }
        for (k, &got) in seen.iter().enumerate() {
            let want = z.probability(k) * f64::from(draws);
            let got = f64::from(got);
            assert!((got - want).abs() < 5.0 * want.sqrt() + 5.0, "rank {k}: {got} drawn, {want} expected");
        }
    }

    #[test]
    fn exponent_zero_is_uniform_and_one_rank_always_draws_it() {
        let z = Zipf::new(4, 0.0);
        for k in 0..4 {
            assert!((z.probability(k) - 0.25).abs() < 1e-12);
        }
        let one = Zipf::new(1, 1.0);
        let mut rng = SmallRng::seed_from_u64(1);
        assert!((0..100).all(|_| one.sample(&mut rng) == 0));
    }
}

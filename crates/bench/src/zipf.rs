//! A Zipf sampler over ranks `0..n`: rank k is drawn with probability proportional to
//! 1 / (k + 1)^s. The festival uses it to make a few packets hot and most of them cold.
//!
//! It keeps the cumulative distribution (one `f64` per rank) and draws by binary search, so a
//! draw costs O(log n) and allocates nothing.

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Zipf {
    /// `cdf[k]` is the probability of drawing a rank ≤ k; the last entry is 1.
    cdf: Vec<f64>,
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
        Zipf { cdf }
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
        let u: f64 = rng.random();
        self.cdf.partition_point(|&c| c <= u).min(self.cdf.len() - 1)
    }
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
        for k in [0, 1, 5, 49] {
            let want = z.probability(k) * f64::from(draws);
            let got = f64::from(seen[k]);
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

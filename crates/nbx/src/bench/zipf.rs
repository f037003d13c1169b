//! A Zipf sampler and the access trace of the hit-ratio figure.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::workload::scramble;

/// Zipf distribution over ranks `0..n`: rank `r` is drawn with probability
/// proportional to `1 / (r + 1)^s`.
///
/// Sampling inverts the cumulative distribution by binary search over a
/// precomputed table: exact, and fast enough for a few million draws.
pub(crate) struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// A Zipf distribution over `n` ranks with exponent `s`.
    pub(crate) fn new(n: usize, s: f64) -> Result<Self, String> {
        if n == 0 || !s.is_finite() || s <= 0.0 {
            return Err(format!("invalid Zipf parameters: n = {n}, s = {s}"));
        }
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for rank in 1..=n {
            sum += (rank as f64).powf(-s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        if let Some(last) = cdf.last_mut() {
            *last = 1.0;
        }
        Ok(Self { cdf })
    }

    /// Draws a rank in `0..n` (0 is the most popular).
    pub(crate) fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        let u: f64 = rng.gen();
        self.cdf.partition_point(|&c| c <= u).min(self.cdf.len() - 1)
    }
}

/// `len` accesses drawn from Zipf(`s`) over `keys` keys, with a fixed seed.
/// Ranks are mapped to scattered `u64` keys, so popular keys are not
/// neighbours.
pub(crate) fn trace(keys: usize, s: f64, len: usize, seed: u64) -> Result<Vec<u64>, String> {
    let zipf = Zipf::new(keys, s)?;
    let mut rng = StdRng::seed_from_u64(seed);
    Ok((0..len).map(|_| scramble(zipf.sample(&mut rng) as u64)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_parameters() {
        assert!(Zipf::new(0, 1.0).is_err());
        assert!(Zipf::new(10, 0.0).is_err());
        assert!(Zipf::new(10, f64::NAN).is_err());
    }

    #[test]
    fn frequencies_follow_the_law() {
        let (n, s, draws) = (1_000, 0.99, 200_000);
        let zipf = Zipf::new(n, s).expect("valid parameters");
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = vec![0usize; n];
        for _ in 0..draws {
            counts[zipf.sample(&mut rng)] += 1;
        }
        let norm: f64 = (1..=n).map(|r| (r as f64).powf(-s)).sum();
        for (rank, &count) in counts.iter().enumerate().take(5) {
            let expected = draws as f64 * ((rank + 1) as f64).powf(-s) / norm;
            let error = (count as f64 - expected).abs() / expected;
            assert!(error < 0.05, "rank {rank}: {count} vs {expected:.0}");
        }
    }

    #[test]
    fn trace_is_reproducible() {
        let a = trace(1_000, 0.99, 1_000, 1).expect("valid parameters");
        let b = trace(1_000, 0.99, 1_000, 1).expect("valid parameters");
        assert_eq!(a, b);
    }
}

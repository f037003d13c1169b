//! The shared workload (one set of distinct keys for every cache) and small
//! timing helpers.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Seed of every random choice in the benchmark, so runs are comparable.
pub(crate) const SEED: u64 = 0x6e65_6275_6c65_7821;

/// The keys every throughput figure uses: `count` distinct `u64`s, in the
/// order they are inserted and, separately, in a shuffled order for lookups
/// (so no cache profits from lookups following insertion order).
pub(crate) struct Keys {
    /// Insertion order.
    pub(crate) insert: Vec<u64>,
    /// The same keys, shuffled, for lookups.
    pub(crate) lookup: Vec<u64>,
}

impl Keys {
    /// `count` distinct keys spread over the whole `u64` range.
    pub(crate) fn new(count: usize) -> Self {
        let insert: Vec<u64> = (0..count as u64).map(scramble).collect();
        let mut lookup = insert.clone();
        lookup.shuffle(&mut StdRng::seed_from_u64(SEED));
        Self { insert, lookup }
    }

    /// Number of keys.
    pub(crate) fn len(&self) -> usize {
        self.insert.len()
    }
}

/// A bijection on `u64` (the splitmix64 finalizer): distinct inputs give
/// distinct keys, with no structure a hash table could profit from.
pub(crate) fn scramble(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Runs `f` and returns how long it took.
pub(crate) fn time(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

/// Operations per second for `ops` operations in `elapsed`.
pub(crate) fn rate(ops: usize, elapsed: Duration) -> f64 {
    ops as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
}

/// The median of `values` (the mean of the two middle ones for an even
/// count); 0 for none.
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_distinct() {
        let keys = Keys::new(10_000);
        let mut sorted = keys.insert.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 10_000);
        let mut lookup = keys.lookup.clone();
        lookup.sort_unstable();
        assert_eq!(lookup, sorted);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}

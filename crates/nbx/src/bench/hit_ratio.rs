//! Hit ratio of the eviction policy: a read-through workload on a skewed
//! (Zipf) trace, nebulex against moka, both bounded to the same capacity.

use super::workload::SEED;
use super::{new_cache, zipf, BenchResult, Config};

/// Keys the trace draws from.
const TRACE_KEYS: usize = 1_000_000;
/// Zipf exponent: the usual "web cache" skew.
const ZIPF_S: f64 = 0.99;
/// Capacity of both caches: 1 % of the keys.
const CAPACITY: usize = 10_000;

/// Fraction of accesses that hit, on the same trace.
pub(crate) struct HitRatio {
    /// nebulex (`max_entries` = [`CAPACITY`]).
    pub(crate) ours: f64,
    /// moka (`max_capacity` = [`CAPACITY`]).
    pub(crate) moka: f64,
}

/// Replays `config.zipf_accesses` Zipf(0.99) accesses over 1M keys on each
/// cache: `get`, and on a miss `put` (read-through). Every access counts,
/// warm-up included, for both caches alike.
pub(crate) fn measure(config: &Config) -> BenchResult<HitRatio> {
    let trace = zipf::trace(TRACE_KEYS, ZIPF_S, config.zipf_accesses, SEED)?;

    let cache = new_cache(CAPACITY)?;
    let ours = replay(&trace, |k| cache.get(k).is_some(), |k| cache.put(k, k));
    if cache.len() > CAPACITY {
        return Err(format!("nebulex: {} entries over max_entries {CAPACITY}", cache.len()).into());
    }
    drop(cache);

    let moka = moka::sync::Cache::new(CAPACITY as u64);
    let moka_ratio = replay(&trace, |k| moka.get(k).is_some(), |k| moka.insert(k, k));

    Ok(HitRatio { ours, moka: moka_ratio })
}

/// Read-through replay of `trace`: the fraction of `get`s that hit.
fn replay(trace: &[u64], get: impl Fn(&u64) -> bool, put: impl Fn(u64)) -> f64 {
    let mut hits = 0usize;
    for &k in trace {
        if get(&k) {
            hits += 1;
        } else {
            put(k);
        }
    }
    hits as f64 / trace.len().max(1) as f64
}

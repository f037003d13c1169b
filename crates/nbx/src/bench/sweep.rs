//! Removing what came due: a cache of 1 M keys (100 k in a quick run) with
//! an hour to live, of which every [`DUE_EVERY`]th is written again with a
//! millisecond to live (what comes due each second in a cache whose entries
//! live an hour), then swept once those are due: nebulex's `sweep_expired`
//! against moka's `run_pending_tasks`, with the same times to live (through
//! its `Expiry`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::throughput::TTL;
use super::workload::{median, time, Keys};
use super::{cache_builder, BenchResult, Config};

/// One key in this many is given [`SHORT`] to live.
pub(crate) const DUE_EVERY: usize = 3_600;
/// The time to live of the keys that come due.
const SHORT: Duration = Duration::from_millis(1);
/// How long the run waits for the short-lived entries to be due, ours...
const WAIT: Duration = Duration::from_millis(5);
/// ...and moka's, whose timer wheel expires entries by the second (its
/// finest buckets span 2^30 ns).
const MOKA_WAIT: Duration = Duration::from_millis(1_500);
/// Tries of a moka round whose due entries were not all removed by the
/// timed call (some expired before it, while its writes were applied).
const MOKA_TRIES: usize = 3;

/// The time one sweep took, each the median over the repetitions.
pub(crate) struct Sweep {
    /// How many entries the caches held.
    pub(crate) entries: usize,
    /// How many of them came due.
    pub(crate) due: usize,
    /// `Cache::sweep_expired`.
    pub(crate) ours: Duration,
    /// `moka::sync::Cache::run_pending_tasks`.
    pub(crate) moka: Duration,
}

/// moka's times to live: [`SHORT`] for the values [`SHORT_VALUE`], [`TTL`]
/// for the others.
struct Lifetimes;

impl Lifetimes {
    fn of(value: u64) -> Option<Duration> {
        Some(if value == SHORT_VALUE { SHORT } else { TTL })
    }
}

impl moka::Expiry<u64, u64> for Lifetimes {
    fn expire_after_create(&self, _: &u64, value: &u64, _: Instant) -> Option<Duration> {
        Self::of(*value)
    }

    fn expire_after_update(&self, _: &u64, value: &u64, _: Instant, _: Option<Duration>) -> Option<Duration> {
        Self::of(*value)
    }
}

/// The value the short-lived entries are written again with.
const SHORT_VALUE: u64 = u64::MAX;

fn due_keys(keys: &[u64]) -> impl Iterator<Item = u64> + '_ {
    keys.iter().copied().step_by(DUE_EVERY)
}

pub(crate) fn measure(config: &Config, keys: &Keys) -> BenchResult<Sweep> {
    let keys = &keys.insert[..config.sweep_keys.min(keys.insert.len())];
    let due = due_keys(keys).count();
    let (mut ours, mut moka) = (Vec::new(), Vec::new());
    for _ in 0..config.sweep_reps {
        ours.push(nebulex_sweep(config, keys, due)?);
        moka.push(moka_sweep(config, keys, due)?);
    }
    Ok(Sweep { entries: keys.len(), due, ours: median_duration(&ours), moka: median_duration(&moka) })
}

fn median_duration(times: &[Duration]) -> Duration {
    Duration::from_secs_f64(median(&times.iter().map(Duration::as_secs_f64).collect::<Vec<_>>()))
}

fn nebulex_sweep(config: &Config, keys: &[u64], due: usize) -> BenchResult<Duration> {
    // The background sweep would not come in an hour: only the timed one runs.
    let cache = cache_builder(config.capacity).default_ttl(TTL).sweep_interval(Duration::from_secs(3600)).build()?;
    for &k in keys {
        cache.put(k, k);
    }
    for k in due_keys(keys) {
        cache.put_with_ttl(k, SHORT_VALUE, SHORT);
    }
    std::thread::sleep(WAIT);
    let mut swept = 0;
    let took = time(|| swept = cache.sweep_expired());
    if swept != due {
        return Err(format!("nebulex swept {swept} entries, not the {due} due").into());
    }
    Ok(took)
}

fn moka_sweep(config: &Config, keys: &[u64], due: usize) -> BenchResult<Duration> {
    for _ in 0..MOKA_TRIES {
        let expired = Arc::new(AtomicUsize::new(0));
        let counter = expired.clone();
        let cache = moka::sync::Cache::builder()
            .max_capacity(config.capacity as u64)
            .expire_after(Lifetimes)
            .eviction_listener(move |_, _, cause| {
                if cause == moka::notification::RemovalCause::Expired {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        for &k in keys {
            cache.insert(k, k);
        }
        cache.run_pending_tasks();
        for k in due_keys(keys) {
            cache.insert(k, SHORT_VALUE);
        }
        // Applies the writes (untimed), before the short-lived entries are due.
        cache.run_pending_tasks();
        let before = expired.load(Ordering::Relaxed);
        std::thread::sleep(MOKA_WAIT);
        let took = time(|| cache.run_pending_tasks());
        if before == 0 && expired.load(Ordering::Relaxed) == due {
            return Ok(took);
        }
    }
    Err(format!("moka's timed call did not remove the {due} entries due in {MOKA_TRIES} tries").into())
}

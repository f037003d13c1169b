//! Heap bytes held per entry, counted by the binary's allocator.

use crate::alloc;

use super::throughput::check_len;
use super::workload::Keys;
use super::{new_cache, BenchResult, Config};

/// Heap bytes per entry of a cache holding every key (`u64 -> u64`).
pub(crate) struct Memory {
    /// nebulex.
    pub(crate) ours: f64,
    /// moka, after `run_pending_tasks()` so its deferred bookkeeping is done.
    pub(crate) moka: f64,
}

/// Builds and fills each cache inside an allocation-counting window and
/// divides the live bytes it then holds by the number of entries. Runs while
/// no other benchmark thread is alive, so only the cache is counted.
pub(crate) fn measure(config: &Config, keys: &Keys) -> BenchResult<Memory> {
    let entries = keys.len() as f64;

    let (cache, bytes) = alloc::measure(|| -> BenchResult<_> {
        let cache = new_cache(config.capacity)?;
        for &k in &keys.insert {
            cache.put(k, k);
        }
        Ok(cache)
    });
    let cache = cache?;
    check_len("nebulex", cache.len(), keys.len())?;
    drop(cache);
    let ours = bytes as f64 / entries;

    let (moka, bytes) = alloc::measure(|| {
        let cache = moka::sync::Cache::new(config.capacity as u64);
        for &k in &keys.insert {
            cache.insert(k, k);
        }
        cache.run_pending_tasks();
        cache
    });
    check_len("moka", usize::try_from(moka.entry_count())?, keys.len())?;
    drop(moka);

    Ok(Memory { ours, moka: bytes as f64 / entries })
}

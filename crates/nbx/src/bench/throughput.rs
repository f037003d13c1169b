//! Single-thread insert and lookup throughput: nebulex against moka and
//! quick_cache, every cache sized so that none evicts; and nebulex against
//! moka again with every entry given a time to live.

use std::hint::black_box;
use std::time::Duration;

use super::progress::note;
use super::workload::{median, rate, time, Keys};
use super::{cache_builder, new_cache, BenchResult, Config};

/// Operations per second, each the median over the repetitions.
pub(crate) struct Throughput {
    /// `Cache::put` of every key into an empty nebulex cache.
    pub(crate) put: f64,
    /// `moka::sync::Cache::insert` of every key into an empty moka cache.
    pub(crate) moka_insert: f64,
    /// `quick_cache::sync::Cache::insert` of every key into an empty cache.
    pub(crate) quick_cache_insert: f64,
    /// `Cache::get` of `config.lookups` keys (all hits) on the filled nebulex
    /// cache.
    pub(crate) get: f64,
    /// `moka::sync::Cache::get` of the same keys (all hits) on the filled
    /// moka cache.
    pub(crate) moka_get: f64,
    /// The same puts and gets, nebulex with a [`TTL`] default time to live.
    pub(crate) ttl: PutGet,
    /// The same inserts and gets, moka with a [`TTL`] time to live.
    pub(crate) moka_ttl: PutGet,
}

/// Put (or insert) and get rates of one configuration.
pub(crate) struct PutGet {
    pub(crate) put: f64,
    pub(crate) get: f64,
}

/// The time to live of the entries of the TTL figures: long enough that
/// none expires during a run, so that every lookup still hits.
pub(crate) const TTL: Duration = Duration::from_secs(3600);

/// Measures every cache `config.reps` times, interleaved (ours, moka,
/// quick_cache, ours, ...) so that a noisy moment hits all of them alike.
pub(crate) fn measure(config: &Config, keys: &Keys) -> BenchResult<Throughput> {
    let (mut put, mut get) = (Vec::new(), Vec::new());
    let (mut moka_insert, mut moka_get) = (Vec::new(), Vec::new());
    let mut quick_cache_insert = Vec::new();
    let (mut put_ttl, mut get_ttl) = (Vec::new(), Vec::new());
    let (mut moka_ttl_insert, mut moka_ttl_get) = (Vec::new(), Vec::new());
    let looked_up = lookups(config, keys).len();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for rep in 1..=config.reps {
        let (put_time, get_time) = nebulex_run(config, keys, None)?;
        put.push(rate(keys.len(), put_time));
        get.push(rate(looked_up, get_time));

        let (moka_put_time, moka_get_time) = moka_run(config, keys, None)?;
        moka_insert.push(rate(keys.len(), moka_put_time));
        moka_get.push(rate(looked_up, moka_get_time));

        let quick_cache_time = quick_cache_run(config, keys)?;
        quick_cache_insert.push(rate(keys.len(), quick_cache_time));

        let (ttl_put_time, ttl_get_time) = nebulex_run(config, keys, Some(TTL))?;
        put_ttl.push(rate(keys.len(), ttl_put_time));
        get_ttl.push(rate(looked_up, ttl_get_time));

        let (moka_ttl_put_time, moka_ttl_get_time) = moka_run(config, keys, Some(TTL))?;
        moka_ttl_insert.push(rate(keys.len(), moka_ttl_put_time));
        moka_ttl_get.push(rate(looked_up, moka_ttl_get_time));
        note(format!(
            "run {rep}: put/get ms: nebulex {:.0}/{:.0}, moka {:.0}/{:.0}, quick_cache {:.0}/-; \
             with a TTL: nebulex {:.0}/{:.0}, moka {:.0}/{:.0}",
            ms(put_time),
            ms(get_time),
            ms(moka_put_time),
            ms(moka_get_time),
            ms(quick_cache_time),
            ms(ttl_put_time),
            ms(ttl_get_time),
            ms(moka_ttl_put_time),
            ms(moka_ttl_get_time),
        ));
    }
    Ok(Throughput {
        put: median(&put),
        moka_insert: median(&moka_insert),
        quick_cache_insert: median(&quick_cache_insert),
        get: median(&get),
        moka_get: median(&moka_get),
        ttl: PutGet { put: median(&put_ttl), get: median(&get_ttl) },
        moka_ttl: PutGet { put: median(&moka_ttl_insert), get: median(&moka_ttl_get) },
    })
}

/// Fills a fresh nebulex cache (with `ttl` as its default time to live),
/// then times the lookups: (fill, lookups).
fn nebulex_run(config: &Config, keys: &Keys, ttl: Option<Duration>) -> BenchResult<(Duration, Duration)> {
    let cache = match ttl {
        None => new_cache(config.capacity)?,
        Some(ttl) => cache_builder(config.capacity).default_ttl(ttl).build()?,
    };
    let fill = time(|| {
        for &k in &keys.insert {
            cache.put(k, k);
        }
    });
    check_len("nebulex", cache.len(), keys.len())?;
    let lookup = timed_hits("nebulex", lookups(config, keys), |k| cache.get(k))?;
    Ok((fill, lookup))
}

/// Fills a fresh moka cache (with `ttl` as its time to live), then times
/// the lookups: (fill, lookups).
fn moka_run(config: &Config, keys: &Keys, ttl: Option<Duration>) -> BenchResult<(Duration, Duration)> {
    let (cache, fill) = moka_filled(config, keys, ttl)?;
    let lookup = timed_hits("moka", lookups(config, keys), |k| cache.get(k))?;
    Ok((fill, lookup))
}

/// A moka cache (with `ttl` as its time to live) filled with every key, and
/// the time the inserts took.
pub(crate) fn moka_filled(
    config: &Config,
    keys: &Keys,
    ttl: Option<Duration>,
) -> BenchResult<(moka::sync::Cache<u64, u64>, Duration)> {
    let builder = moka::sync::Cache::builder().max_capacity(config.capacity as u64);
    let cache = match ttl {
        None => builder.build(),
        Some(ttl) => builder.time_to_live(ttl).build(),
    };
    let fill = time(|| {
        for &k in &keys.insert {
            cache.insert(k, k);
        }
    });
    // Settle moka's deferred bookkeeping (untimed) so the count is exact.
    cache.run_pending_tasks();
    check_len("moka", usize::try_from(cache.entry_count())?, keys.len())?;
    Ok((cache, fill))
}

/// Fills a fresh quick_cache cache: the fill time.
fn quick_cache_run(config: &Config, keys: &Keys) -> BenchResult<Duration> {
    let cache = quick_cache::sync::Cache::new(config.capacity);
    let fill = time(|| {
        for &k in &keys.insert {
            cache.insert(k, k);
        }
    });
    check_len("quick_cache", cache.len(), keys.len())?;
    Ok(fill)
}

/// The keys the lookup figures look up: the first `config.lookups` of the
/// shuffled order, all present in the filled caches.
fn lookups<'k>(config: &Config, keys: &'k Keys) -> &'k [u64] {
    &keys.lookup[..config.lookups.min(keys.len())]
}

/// Times `get` over `keys`, and checks that every lookup hit.
fn timed_hits(name: &str, keys: &[u64], get: impl Fn(&u64) -> Option<u64>) -> BenchResult<Duration> {
    let mut hits = 0usize;
    let elapsed = time(|| {
        for k in keys {
            if black_box(get(black_box(k))).is_some() {
                hits += 1;
            }
        }
    });
    if hits != keys.len() {
        return Err(format!("{name}: {hits} hits out of {} lookups on a full cache", keys.len()).into());
    }
    Ok(elapsed)
}

/// Checks that a cache kept every key (the figures assume no eviction).
pub(crate) fn check_len(name: &str, len: usize, expected: usize) -> BenchResult<()> {
    if len == expected {
        Ok(())
    } else {
        Err(format!("{name}: holds {len} entries after inserting {expected} distinct keys").into())
    }
}

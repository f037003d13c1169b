//! Building a cache: every option, its default, and what it refuses.

use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::time::Duration;

use crate::cache::Cache;
use crate::clock::{Clock, ManualClock};
use crate::error::Error;
use crate::event::NodeId;

/// The default name of a cache.
pub const DEFAULT_NAME: &str = "nebulex";
/// The default period of the expiry sweep.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// The most shards a cache uses by default.
const MAX_SHARDS: usize = 64;
/// The most shards a cache can be asked for: each is a lock and a table.
pub const MAX_SHARDS_OPTION: usize = 4096;
/// The shortest [`sweep_interval`](CacheBuilder::sweep_interval) allowed: a
/// shorter one would keep the shared sweeper thread busy for good.
pub const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(1);
/// A bounded shard keeps at least this many entries, so that small caches use
/// fewer shards and eviction still has entries to choose from.
const MIN_SHARD_CAPACITY: usize = 64;

/// Options of a [`Cache`]; made by [`Cache::builder`].
///
/// | option | default | refused |
/// |---|---|---|
/// | [`name`](Self::name) | `"nebulex"` | empty |
/// | [`max_entries`](Self::max_entries) | unbounded | `0` |
/// | [`default_ttl`](Self::default_ttl) | none (entries never expire) | zero |
/// | [`sweep_interval`](Self::sweep_interval) | 1 s | below [`MIN_SWEEP_INTERVAL`] (1 ms) |
/// | [`node_id`](Self::node_id) | random | — |
/// | [`shards`](Self::shards) | up to 64, by core count and `max_entries` | `0`, not a power of two, above [`MAX_SHARDS_OPTION`], above `max_entries` |
/// | [`clock`](Self::clock) | the system's monotonic clock | — |
///
/// ```
/// use std::time::Duration;
/// use nebulex::Cache;
///
/// let cache: Cache<String, u64> = Cache::builder()
///     .name("users")
///     .max_entries(100_000)
///     .default_ttl(Duration::from_secs(300))
///     .sweep_interval(Duration::from_secs(1))
///     .build()?;
/// assert_eq!(&*cache.name(), "users");
///
/// let err = Cache::<String, u64>::builder().max_entries(0).build().unwrap_err();
/// assert!(matches!(err, nebulex::Error::InvalidOption { option: "max_entries", .. }));
/// # Ok::<(), nebulex::Error>(())
/// ```
pub struct CacheBuilder<K, V> {
    name: String,
    max_entries: Option<usize>,
    default_ttl: Option<Duration>,
    sweep_interval: Duration,
    node_id: Option<NodeId>,
    shards: Option<usize>,
    clock: Option<ManualClock>,
    _types: PhantomData<fn(K, V)>,
}

impl<K, V> Default for CacheBuilder<K, V> {
    fn default() -> Self {
        CacheBuilder {
            name: DEFAULT_NAME.to_string(),
            max_entries: None,
            default_ttl: None,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            node_id: None,
            shards: None,
            clock: None,
            _types: PhantomData,
        }
    }
}

impl<K, V> fmt::Debug for CacheBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("name", &self.name)
            .field("max_entries", &self.max_entries)
            .field("default_ttl", &self.default_ttl)
            .field("sweep_interval", &self.sweep_interval)
            .field("node_id", &self.node_id)
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

impl<K, V> CacheBuilder<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// A label for the cache: streams name their channels after it and
    /// telemetry reports it. Not a registry key: several caches may share it
    /// (that is how one process simulates several nodes of a cluster).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The most entries the cache holds: `len()` never exceeds it. The bound
    /// is kept per shard (each holds `max / shards` entries), so a write
    /// into a full shard evicts one of its entries (with an
    /// [`Evicted`](crate::EventType::Evicted) event) even while the cache as
    /// a whole holds a little less than `max`.
    pub fn max_entries(mut self, max: usize) -> Self {
        self.max_entries = Some(max);
        self
    }

    /// The time to live of entries written without one (`put_with_ttl` sets
    /// its own).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = Some(ttl);
        self
    }

    /// How often expired entries are removed in the background (each with an
    /// [`Expired`](crate::EventType::Expired) event). Reads never return an
    /// expired entry either way.
    ///
    /// A sweep holds one shard's lock at a time, and looks only at the
    /// entries whose deadlines have passed: each shard keeps its entries'
    /// deadlines in order (16 bytes for each entry with a time to live).
    pub fn sweep_interval(mut self, every: Duration) -> Self {
        self.sweep_interval = every;
        self
    }

    /// This cache's identity in a cluster; random by default.
    pub fn node_id(mut self, id: NodeId) -> Self {
        self.node_id = Some(id);
        self
    }

    /// How many shards (independent locks) the store uses: a power of two,
    /// at most [`MAX_SHARDS_OPTION`] and, in a bounded cache, at most
    /// `max_entries`. The default suits most uses.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards);
        self
    }

    /// Judge expiry by this clock instead of the system's, for tests.
    pub fn clock(mut self, clock: ManualClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Builds the cache, or says which option is wrong.
    pub fn build(self) -> Result<Cache<K, V>, Error> {
        let invalid = |option, reason: &str| Err(Error::InvalidOption { option, reason: reason.to_string() });
        if self.name.is_empty() {
            return invalid("name", "must not be empty");
        }
        if self.max_entries == Some(0) {
            return invalid("max_entries", "must be at least 1");
        }
        if self.default_ttl == Some(Duration::ZERO) {
            return invalid("default_ttl", "must be longer than zero");
        }
        if self.sweep_interval < MIN_SWEEP_INTERVAL {
            return invalid("sweep_interval", "must be at least 1 ms");
        }
        let shards = match self.shards {
            Some(n) if n == 0 || !n.is_power_of_two() => {
                return Err(Error::InvalidOption {
                    option: "shards",
                    reason: format!("must be a power of two, got {n}"),
                })
            }
            Some(n) if n > MAX_SHARDS_OPTION => {
                return Err(Error::InvalidOption {
                    option: "shards",
                    reason: format!("must be at most {MAX_SHARDS_OPTION}, got {n}"),
                })
            }
            Some(n) => n,
            None => default_shards(self.max_entries),
        };
        if let Some(max) = self.max_entries {
            if shards > max {
                return Err(Error::InvalidOption {
                    option: "shards",
                    reason: format!("{shards} shards cannot share max_entries = {max}"),
                });
            }
        }
        Ok(Cache::from_config(Config {
            name: self.name,
            max_entries: self.max_entries,
            default_ttl: self.default_ttl,
            sweep_interval: self.sweep_interval,
            node: self.node_id.unwrap_or_else(NodeId::random),
            shards,
            clock: match self.clock {
                Some(m) => Clock::Manual(m),
                None => Clock::system(),
            },
        }))
    }
}

/// Enough shards for the cores to rarely meet on one lock, but not so many that
/// a small bounded cache's shards hold too few entries to evict well.
fn default_shards(max_entries: Option<usize>) -> usize {
    let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
    let mut shards = (cores * 16).next_power_of_two().min(MAX_SHARDS);
    if let Some(max) = max_entries {
        while shards > 1 && max / shards < MIN_SHARD_CAPACITY {
            shards /= 2;
        }
    }
    shards
}

pub(crate) struct Config {
    pub(crate) name: String,
    pub(crate) max_entries: Option<usize>,
    pub(crate) default_ttl: Option<Duration>,
    pub(crate) sweep_interval: Duration,
    pub(crate) node: NodeId,
    pub(crate) shards: usize,
    pub(crate) clock: Clock,
}

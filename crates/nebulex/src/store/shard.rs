//! One shard: entries, a version counter, and the sampled-LFU eviction.
//!
//! # Eviction
//!
//! When a bounded shard grows past its share of `max_entries`, it samples
//! [`SAMPLES`] entries at random (random buckets of its table) and evicts the one used least often (each
//! entry keeps a small saturating use counter, incremented on every hit and
//! every overwrite). All counters are halved every `AGING_FACTOR × capacity`
//! uses, so entries that were popular long ago make room for what is popular
//! now. This approximates LFU with aging, like Redis's `allkeys-lfu`, in O(1)
//! per write, with no per-entry links or global lists.

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::Arc;

use crate::listener::Listeners;
use crate::store::load::{Load, Loads};
use crate::store::map::EntryMap;

/// How many entries an eviction compares.
pub(crate) const SAMPLES: usize = 24;
/// Counters halve after this many uses per unit of capacity.
const AGING_FACTOR: usize = 16;

pub(crate) type MapHasher = foldhash::fast::FixedState;

/// An entry's value and bookkeeping.
pub(crate) struct Slot<V> {
    pub(crate) value: V,
    /// Clock nanoseconds at which the entry expires; 0 = never.
    pub(crate) expires_at: u64,
    /// The time to live the entry was written with, in nanoseconds; 0 = none.
    pub(crate) ttl: u64,
    /// Saturating use counter for eviction.
    pub(crate) uses: u8,
}

impl<V> Slot<V> {
    pub(crate) fn new(value: V, ttl: u64, now: impl FnOnce() -> u64) -> Self {
        let mut slot = Slot { value, expires_at: 0, ttl: 0, uses: 0 };
        let _ = slot.set_ttl(ttl, now);
        slot
    }

    /// Whether the entry is expired at `now()`; the clock is read only for
    /// entries that can expire.
    #[inline]
    pub(crate) fn is_expired(&self, now: impl FnOnce() -> u64) -> bool {
        self.expires_at != 0 && now() >= self.expires_at
    }

    /// Sets the time to live (0 = none), counted from `now()`; returns the
    /// new `expires_at`, which the shard's [`Shard::expires`] must learn.
    #[inline]
    #[must_use = "the shard's next expiry must learn the entry's new deadline (`Shard::expires`)"]
    pub(crate) fn set_ttl(&mut self, ttl: u64, now: impl FnOnce() -> u64) -> u64 {
        self.ttl = ttl;
        self.expires_at = if ttl == 0 { 0 } else { now().saturating_add(ttl) };
        self.expires_at
    }

    #[inline]
    pub(crate) fn used(&mut self) {
        self.uses = self.uses.saturating_add(1);
    }
}

pub(crate) struct Shard<K, V> {
    pub(crate) map: EntryMap<K, V>,
    /// This shard's share of `max_entries` (`usize::MAX` when unbounded).
    pub(crate) cap: usize,
    /// The last version given to a write in this shard.
    pub(crate) version: u64,
    /// The cache's listeners, copied into every shard so that a write reads
    /// them under the lock it already holds.
    pub(crate) listeners: Listeners<K>,
    /// Loads in flight (`get_or_insert_with`), by key.
    pub(crate) loads: Loads<K, V>,
    /// No entry of this shard expires before this clock reading (`u64::MAX`:
    /// none can expire): a sweep before it has nothing to look for.
    next_expiry: u64,
    rng: u64,
    uses_since_aging: usize,
}

impl<K: Hash + Eq, V: Clone> Shard<K, V> {
    pub(crate) fn new(cap: usize, listeners: Listeners<K>, seed: u64, hasher: MapHasher) -> Self {
        Shard {
            map: EntryMap::with_hasher(hasher),
            cap,
            version: 0,
            listeners,
            loads: Loads::default(),
            next_expiry: u64::MAX,
            rng: seed | 1,
            uses_since_aging: 0,
        }
    }

    /// Stores an entry for a key that has none; returns its index.
    #[inline]
    pub(crate) fn insert(&mut self, key: K, slot: Slot<V>) -> usize {
        self.expires(slot.expires_at);
        self.map.insert_new(key, slot)
    }

    /// Learns that an entry now expires at `expires_at` (0 = never).
    #[inline]
    pub(crate) fn expires(&mut self, expires_at: u64) {
        if expires_at != 0 && expires_at < self.next_expiry {
            self.next_expiry = expires_at;
        }
    }

    /// Removes every entry expired at `now()`, handing each key to
    /// `expired`; does not look at the entries at all when none can have
    /// expired yet (nor read the clock when none can expire).
    pub(crate) fn remove_expired_at(&mut self, now: impl FnOnce() -> u64, mut expired: impl FnMut(&K)) {
        if self.next_expiry == u64::MAX {
            return;
        }
        let now = now();
        if now < self.next_expiry {
            return;
        }
        let mut next = u64::MAX;
        self.map.retain(|k, slot| {
            if slot.is_expired(|| now) {
                expired(k);
                return false;
            }
            if slot.expires_at != 0 {
                next = next.min(slot.expires_at);
            }
            true
        });
        self.next_expiry = next;
    }

    #[inline]
    pub(crate) fn bounded(&self) -> bool {
        self.cap != usize::MAX
    }

    /// The next version for a write in this shard.
    #[inline]
    pub(crate) fn next_version(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    /// Counts a use of a bounded shard's entry, aging every counter now and then.
    #[inline]
    pub(crate) fn record_use(&mut self, index: usize) {
        if !self.bounded() {
            return;
        }
        if let Some((_, slot)) = self.map.get_index_mut(index) {
            slot.used();
        }
        self.age();
    }

    /// Counts one use towards the next halving of every counter.
    #[inline]
    pub(crate) fn age(&mut self) {
        if !self.bounded() {
            return;
        }
        self.uses_since_aging += 1;
        if self.uses_since_aging >= self.cap.saturating_mul(AGING_FACTOR).max(1024) {
            self.uses_since_aging = 0;
            for slot in self.map.slots_mut() {
                slot.uses >>= 1;
            }
        }
    }

    /// Tells a load in flight for `key` that a write or delete overtook it.
    #[inline]
    pub(crate) fn mark_load_stale<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if !self.loads.is_empty() {
            if let Some(load) = self.loads.get(key) {
                load.mark_stale();
            }
        }
    }

    /// Forgets the load in flight for `key` if it is `load`.
    pub(crate) fn forget_load(&mut self, key: &K, load: &Arc<Load<V>>) {
        if self.loads.get(key).is_some_and(|l| Arc::ptr_eq(l, load)) {
            self.loads.remove(key);
        }
    }

    /// Whether the shard holds more entries than its bound.
    #[inline]
    pub(crate) fn over_capacity(&self) -> bool {
        self.map.len() > self.cap
    }

    /// Removes the least used of a few sampled entries and returns its key.
    pub(crate) fn evict_one(&mut self) -> Option<K> {
        let buckets = self.map.buckets();
        let mut victim: Option<(usize, u8)> = None;
        for _ in 0..SAMPLES.min(self.map.len()) {
            let start = self.random_below(buckets);
            let Some(i) = self.map.occupied_from(start) else { break };
            let uses = self.map.get_index(i).map_or(u8::MAX, |(_, s)| s.uses);
            if victim.is_none_or(|(_, least)| uses < least) {
                victim = Some((i, uses));
            }
        }
        self.map.remove_index(victim?.0).map(|(k, _)| k)
    }

    /// A random number below `n` (xorshift64*, then a multiply-shift reduction).
    #[inline]
    fn random_below(&mut self, n: usize) -> usize {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((u128::from(r >> 32) * n as u128) >> 32) as usize
    }
}

/// The listeners every shard starts with: none.
pub(crate) fn no_listeners<K>() -> Listeners<K> {
    Arc::from(Vec::new())
}

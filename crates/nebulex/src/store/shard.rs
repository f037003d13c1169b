//! One shard: entries, a version counter, and the sampled-LFU eviction.
//!
//! # Eviction
//!
//! When a bounded shard grows past its share of `max_entries`, it samples
//! [`SAMPLES`] entries at random (random buckets of its table), leaving out
//! the entry a single-key write just stored (it has had no chance to be used:
//! a write is not its own victim), and evicts the one used least often (each entry keeps a small saturating use counter,
//! incremented by every `get` of it, overwrite of it by `put` or `update`,
//! and load that finds it; the bulk calls `get_all` and `put_all` do not
//! count). All counters are halved every `AGING_FACTOR × capacity` uses (at
//! least 1,024), so
//! entries that were popular long ago make room for what is popular
//! now. This approximates LFU with aging, like Redis's `allkeys-lfu`, in O(1)
//! per write, with no per-entry links or global lists.

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::Arc;

use crate::listener::Listeners;
use crate::store::expiries::Expiries;
use crate::store::load::{Load, Loads};
use crate::store::map::EntryMap;

/// How many entries an eviction compares.
pub(crate) const SAMPLES: usize = 24;
/// A table with more buckets than this many per entry is shrunk before an
/// eviction samples it.
const SPARSE_BUCKETS: usize = 8;
/// Counters halve after this many uses per unit of capacity.
const AGING_FACTOR: usize = 16;
/// The expiry index is rebuilt from the entries when it holds more than
/// twice as many records as there are entries, plus this many.
const EXPIRIES_SLACK: usize = 64;

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
    #[must_use = "the shard's expiry index must learn the entry's new deadline (`Shard::expires`)"]
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
    /// The deadlines of the shard's entries: every entry that can expire
    /// has a record here (its deadline, its key's hash). Records whose entry
    /// has since gone, or changed its deadline, stay until they come due and
    /// then find nothing; they are dropped when the index is rebuilt (see
    /// [`EXPIRIES_SLACK`]).
    expiries: Expiries,
    rng: u64,
    uses_since_aging: usize,
    /// Values the call holding the lock replaced or removed, dropped once it
    /// has released the lock (see [`bury`](Self::bury)).
    pub(crate) dead: Vec<V>,
}

impl<K: Hash + Eq, V: Clone> Shard<K, V> {
    pub(crate) fn new(cap: usize, listeners: Listeners<K>, seed: u64, hasher: MapHasher) -> Self {
        Shard {
            map: EntryMap::with_hasher(hasher),
            cap,
            version: 0,
            listeners,
            loads: Loads::default(),
            expiries: Expiries::default(),
            rng: seed | 1,
            uses_since_aging: 0,
            dead: Vec::new(),
        }
    }

    /// Keeps a value the call replaced or removed, to drop once the call has
    /// released the lock: its `Drop` is the application's, and may panic or
    /// call the cache, which must then find the change complete, its event
    /// told, and no lock held. (A value without drop glue goes at once.)
    #[inline]
    pub(crate) fn bury(&mut self, value: V) {
        bury(&mut self.dead, value);
    }

    /// Stores an entry for a key that has none, whose hash (`map.hash`) is
    /// `hash`; returns its index.
    #[inline]
    pub(crate) fn insert_hashed(&mut self, hash: u64, key: K, slot: Slot<V>) -> usize {
        let expires_at = slot.expires_at;
        // Into the table first: indexing may rebuild the index from the
        // table, which must then hold the new entry.
        let index = self.map.insert_hashed(hash, key, slot);
        self.expires_hashed(hash, expires_at);
        index
    }

    /// Learns that `key`'s entry now expires at `expires_at` (0 = never).
    #[inline]
    pub(crate) fn expires<Q>(&mut self, key: &Q, expires_at: u64)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if expires_at != 0 {
            self.expires_hashed(self.map.hash(key), expires_at);
        }
    }

    /// [`expires`](Self::expires) of a key whose hash (`map.hash`) is `hash`.
    #[inline]
    pub(crate) fn expires_hashed(&mut self, hash: u64, expires_at: u64) {
        if expires_at == 0 {
            return;
        }
        self.expiries.push(expires_at, hash);
        if self.expiries.len() > self.map.len().saturating_mul(2).saturating_add(EXPIRIES_SLACK) {
            self.rebuild_expiries();
        }
    }

    /// Indexes the deadlines of the entries as they are now, dropping every
    /// record that no longer has an entry.
    #[cold]
    fn rebuild_expiries(&mut self) {
        let map = &self.map;
        let records =
            map.iter().filter(|(_, slot)| slot.expires_at != 0).map(|(key, slot)| (slot.expires_at, map.hash(key)));
        self.expiries = Expiries::from_records(records);
    }

    /// Removes the entries expired at `now()`, handing each key to
    /// `expired`, until no record is due or `limit` records were taken;
    /// returns whether a record is still due. It looks only at the entries
    /// whose deadlines have come (and at records of entries since gone),
    /// and reads the clock only if some entry can expire.
    pub(crate) fn remove_expired_at(
        &mut self,
        now: impl FnOnce() -> u64,
        limit: usize,
        mut expired: impl FnMut(K),
    ) -> bool {
        if self.expiries.is_empty() {
            return false;
        }
        let now = now();
        let dead = &mut self.dead;
        for _ in 0..limit {
            let Some(hash) = self.expiries.pop_due(now) else { return false };
            self.map.remove_hashed_where(
                hash,
                |slot| slot.is_expired(|| now),
                |key, slot| {
                    bury(dead, slot.value);
                    expired(key);
                },
            );
        }
        self.expiries.has_due(now)
    }

    /// Removes every entry, its value [buried](Self::bury).
    pub(crate) fn clear(&mut self) {
        if std::mem::needs_drop::<V>() {
            self.dead.extend(self.map.drain().map(|(_, slot)| slot.value));
        }
        self.map.clear();
        self.expiries.clear();
    }

    /// Removes every entry `remove` selects, its value
    /// [buried](Self::bury); returns how many.
    pub(crate) fn remove_where(&mut self, mut remove: impl FnMut(&K, &mut Slot<V>) -> bool) -> usize {
        let dead = &mut self.dead;
        let mut removed = 0;
        for (_, slot) in self.map.extract_if(|k, slot| remove(k, slot)) {
            removed += 1;
            bury(dead, slot.value);
        }
        removed
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

    /// Tells a load in flight for `key` that a write or delete overtook it,
    /// and forgets it: a caller from now on does not wait for a value that
    /// the change made stale, but loads afresh.
    #[inline]
    pub(crate) fn mark_load_stale<Q>(&mut self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if !self.loads.is_empty() {
            if let Some(load) = self.loads.remove(key) {
                load.mark_stale();
            }
        }
    }

    /// [`mark_load_stale`](Self::mark_load_stale) for every load in flight.
    pub(crate) fn mark_loads_stale(&mut self) {
        self.loads.drain().for_each(|(_, load)| load.mark_stale());
    }

    /// [`mark_load_stale`](Self::mark_load_stale) for every load in flight
    /// whose key `pred` selects.
    pub(crate) fn mark_loads_stale_where(&mut self, pred: &mut impl FnMut(&K) -> bool) {
        self.loads.retain(|k, load| {
            let stale = pred(k);
            if stale {
                load.mark_stale();
            }
            !stale
        });
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

    /// Removes the least used of a few sampled entries (its value
    /// [buried](Self::bury)) and returns its key;
    /// never the entry at index `spare` (the one whose write made the shard
    /// overflow: it has had no chance to be used yet), unless it is alone.
    ///
    /// An expired entry met in the sample goes first, and is said to be
    /// expired (`true`): it is removed as expired, not evicted. The clock is
    /// read only if some entry can expire.
    pub(crate) fn evict_one(&mut self, now: impl FnOnce() -> u64, spare: Option<usize>) -> Option<(K, bool)> {
        let spare = spare.filter(|_| self.map.len() > 1);
        // A bulk write far past the bound leaves the table mostly empty as it
        // is trimmed: it is shrunk, so that a sample finds entries in a few
        // probes. Each shrink cuts the table more than threefold, so all the
        // shrinks of one trim cost about one pass over the grown table. A
        // single-key write (the one that spares an entry) overflows by one
        // entry: it is not shrunk for, as that would move the spared entry.
        if spare.is_none() && self.map.buckets() > SPARSE_BUCKETS * (self.map.len() + 1) {
            self.map.shrink_to(self.cap.min(self.map.len()));
        }
        let buckets = self.map.buckets();
        let now = (!self.expiries.is_empty()).then(now);
        let mut victim: Option<(usize, u8)> = None;
        for _ in 0..SAMPLES.min(self.map.len()) {
            let start = self.random_below(buckets);
            let Some(mut i) = self.map.occupied_from(start) else { break };
            if Some(i) == spare {
                // The next entry instead: there is one besides the spared.
                let Some(next) = self.map.occupied_from((i + 1) % buckets) else { break };
                i = next;
            }
            let Some((_, slot)) = self.map.get_index(i) else { continue };
            if now.is_some_and(|now| slot.is_expired(|| now)) {
                return self.remove_index(i).map(|k| (k, true));
            }
            if victim.is_none_or(|(_, least)| slot.uses < least) {
                victim = Some((i, slot.uses));
            }
        }
        self.remove_index(victim?.0).map(|k| (k, false))
    }

    /// Removes the entry at bucket index `index`, its value
    /// [buried](Self::bury); returns its key.
    #[inline]
    pub(crate) fn remove_index(&mut self, index: usize) -> Option<K> {
        let (key, slot) = self.map.remove_index(index)?;
        self.bury(slot.value);
        Some(key)
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

/// [`Shard::bury`] into `dead`, for a caller that holds the shard's other
/// fields borrowed.
#[inline]
fn bury<V>(dead: &mut Vec<V>, value: V) {
    if std::mem::needs_drop::<V>() {
        dead.push(value);
    }
}

/// The listeners every shard starts with: none.
pub(crate) fn no_listeners<K>() -> Listeners<K> {
    Arc::from(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard() -> Shard<u64, u64> {
        Shard::new(usize::MAX, no_listeners(), 1, MapHasher::with_seed(7))
    }

    /// An entry of `key` expiring at clock reading `at` (0: never).
    fn put(s: &mut Shard<u64, u64>, key: u64, at: u64) {
        s.insert_hashed(s.map.hash(&key), key, Slot::new(key, at, || 0));
    }

    fn sweep(s: &mut Shard<u64, u64>, now: u64) -> Vec<u64> {
        let mut expired = Vec::new();
        assert!(!s.remove_expired_at(|| now, usize::MAX, |k| expired.push(k)));
        expired.sort_unstable();
        expired
    }

    #[test]
    fn trimming_a_shard_far_past_its_bound_leaves_a_table_of_its_size() {
        let cap = 1_000;
        let mut s = Shard::new(cap, no_listeners(), 1, MapHasher::with_seed(7));
        for key in 0..50_000 {
            put(&mut s, key, 0);
        }
        let grown = s.map.buckets();
        while s.over_capacity() {
            assert!(s.evict_one(|| 0, None).is_some());
        }
        assert_eq!(s.map.len(), cap);
        let buckets = s.map.buckets();
        assert!(buckets <= SPARSE_BUCKETS * (cap + 2), "{buckets} buckets for {cap} entries (grown to {grown})");
        assert!((0..50_000).filter(|k| s.map.contains_key(k)).count() == cap, "every entry left is findable");
    }

    #[test]
    fn the_spared_entry_is_never_the_victim_unless_it_is_alone() {
        for cap in [1, 2, 64] {
            let mut s = Shard::new(cap, no_listeners(), 3, MapHasher::with_seed(7));
            for key in 0..cap as u64 {
                put(&mut s, key, 0);
                let (i, _, _) = s.map.get_full_mut(&key).unwrap();
                s.record_use(i); // every resident has been used: a new one is least used
            }
            for new in 1_000..1_500 {
                let index = s.insert_hashed(s.map.hash(&new), new, Slot::new(new, 0, || 0));
                let (evicted, _) = s.evict_one(|| 0, Some(index)).unwrap();
                assert_ne!(evicted, new, "cap {cap}: the write that overflowed the shard evicted its own entry");
                assert_eq!(s.map.len(), cap);
            }
        }
        let mut s = shard();
        let index = s.insert_hashed(s.map.hash(&7), 7, Slot::new(7, 0, || 0));
        assert_eq!(s.evict_one(|| 0, Some(index)), Some((7, false)), "alone, it goes");
    }

    #[test]
    fn the_spared_entry_is_spared_in_a_sparse_table_too() {
        for seed in 0..32 {
            let mut s = Shard::new(2, no_listeners(), seed, MapHasher::with_seed(seed));
            for key in 0..1_000 {
                put(&mut s, key, 0);
            }
            for key in 2..1_000 {
                assert!(s.map.remove(&key).is_some());
            }
            for key in 0..2 {
                let (i, _, _) = s.map.get_full_mut(&key).unwrap();
                s.record_use(i);
            }
            assert!(s.map.buckets() > SPARSE_BUCKETS * 4, "the table is sparse");
            let index = s.insert_hashed(s.map.hash(&7_000), 7_000, Slot::new(7_000, 0, || 0));
            let (evicted, _) = s.evict_one(|| 0, Some(index)).unwrap();
            assert_ne!(evicted, 7_000, "seed {seed}: the write that overflowed the shard evicted its own entry");
            assert_eq!(s.map.len(), 2);
        }
    }

    #[test]
    fn a_sweep_takes_only_the_records_that_came_due() {
        let mut s = shard();
        for key in 1..=10_000 {
            put(&mut s, key, key);
        }
        put(&mut s, 0, 0);
        assert_eq!(sweep(&mut s, 100), (1..=100).collect::<Vec<_>>());
        assert_eq!(s.expiries.len(), 9_900, "the records not yet due are left alone");
        assert_eq!(s.map.len(), 9_901);
        assert_eq!(sweep(&mut s, 100), [], "nothing is due twice");
    }

    #[test]
    fn a_record_whose_entry_went_or_moved_its_deadline_finds_nothing() {
        let mut s = shard();
        put(&mut s, 1, 10);
        put(&mut s, 2, 10);
        assert!(s.map.remove(&1).is_some());
        put(&mut s, 1, 50); // the same key again, later
        let moved = s.map.get_full_mut(&2).map(|(_, _, slot)| slot.set_ttl(60, || 0));
        s.expires(&2, moved.unwrap_or(0));
        assert_eq!(sweep(&mut s, 20), []);
        assert_eq!(sweep(&mut s, 50), [1]);
        assert_eq!(sweep(&mut s, 60), [2]);
        assert!(s.map.is_empty() && s.expiries.is_empty());
    }

    #[test]
    fn deadlines_moved_again_and_again_keep_the_index_small() {
        let mut s = shard();
        for key in 0..10 {
            put(&mut s, key, 1_000);
        }
        for at in 1_001..100_000 {
            let key = at % 10;
            let moved = s.map.get_full_mut(&key).map(|(_, _, slot)| slot.set_ttl(at, || 0));
            s.expires(&key, moved.unwrap_or(0));
            assert!(s.expiries.len() <= 2 * 10 + EXPIRIES_SLACK + 1, "{} records", s.expiries.len());
        }
        assert_eq!(sweep(&mut s, 99_989), [], "every entry's deadline is later");
        assert_eq!(sweep(&mut s, 100_000), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn a_shard_without_deadlines_does_not_read_the_clock() {
        let mut s = shard();
        put(&mut s, 1, 0);
        s.remove_expired_at(|| panic!("the clock was read"), usize::MAX, |_| {});
        s.clear();
        put(&mut s, 2, 5);
        s.clear();
        s.remove_expired_at(|| panic!("the clock was read after a clear"), usize::MAX, |_| {});
    }

    #[test]
    fn a_sweep_with_a_limit_takes_that_many_records_and_says_more_may_be_due() {
        let mut s = shard();
        for key in 1..=1_000 {
            put(&mut s, key, 10);
        }
        let mut expired = Vec::new();
        assert!(s.remove_expired_at(|| 10, 300, |k| expired.push(k)), "stopped at the limit");
        // A record may also take another expired entry met on its probe.
        assert!((300..1_000).contains(&expired.len()), "{} removed", expired.len());
        assert_eq!(s.expiries.len(), 700, "300 records taken");
        assert!(!s.remove_expired_at(|| 10, 700, |k| expired.push(k)), "took the rest: none is due");
        assert!(!s.remove_expired_at(|| 10, 700, |k| expired.push(k)), "nothing was due");
        expired.sort_unstable();
        assert_eq!(expired, (1..=1_000).collect::<Vec<_>>(), "each once");
    }

    #[test]
    fn an_entry_whose_insert_rebuilds_the_index_is_in_the_rebuilt_index() {
        let mut s = shard();
        // Records of entries since gone, up to the rebuild threshold.
        for key in 0..(EXPIRIES_SLACK as u64 + 2) {
            put(&mut s, key, 10);
            let i = s.map.get_full_mut(&key).map(|(i, _, _)| i).unwrap();
            s.map.remove_index(i);
        }
        put(&mut s, 1_000, 10); // one record too many: its insert rebuilds
        assert!(s.expiries.len() <= 1, "rebuilt: {} records", s.expiries.len());
        assert_eq!(sweep(&mut s, 10), [1_000], "the new entry kept its record");
    }
}

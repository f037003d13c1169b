//! The entries of a shard: one open-addressing table (`hashbrown`) holding
//! keys and values inline, addressed by bucket index.
//!
//! One allocation per shard and one probe per lookup keep the write path to a
//! single cache miss. Bucket indices stay valid until the next insertion (a
//! removal leaves the other entries where they are), which is all the shard
//! needs: it finds an entry, then acts on it under the same lock. Eviction
//! samples random buckets.

use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};

use hashbrown::HashTable;

use crate::store::shard::{MapHasher, Slot};

struct Entry<K, V> {
    key: K,
    slot: Slot<V>,
}

pub(crate) struct EntryMap<K, V> {
    table: HashTable<Entry<K, V>>,
    hasher: MapHasher,
}

impl<K: Hash + Eq, V> EntryMap<K, V> {
    pub(crate) fn with_hasher(hasher: MapHasher) -> Self {
        EntryMap { table: HashTable::new(), hasher }
    }

    #[inline]
    pub(crate) fn hash<Q: Hash + ?Sized>(&self, key: &Q) -> u64 {
        self.hasher.hash_one(key)
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The bucket index, key and slot of `key`'s entry.
    #[inline]
    pub(crate) fn get_full_mut<Q>(&mut self, key: &Q) -> Option<(usize, &K, &mut Slot<V>)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get_full_mut_hashed(self.hash(key), key)
    }

    /// [`get_full_mut`](Self::get_full_mut) of a key whose
    /// [`hash`](Self::hash) is `hash`.
    #[inline]
    pub(crate) fn get_full_mut_hashed<Q>(&mut self, hash: u64, key: &Q) -> Option<(usize, &K, &mut Slot<V>)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let index = self.table.find_bucket_index(hash, |e| e.key.borrow() == key)?;
        let e = self.table.get_bucket_mut(index)?;
        Some((index, &e.key, &mut e.slot))
    }

    #[inline]
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&Slot<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.table.find(self.hash(key), |e| e.key.borrow() == key).map(|e| &e.slot)
    }

    #[inline]
    pub(crate) fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    /// Inserts an entry for a key that has none, whose [`hash`](Self::hash)
    /// is `hash`; returns its bucket index.
    #[inline]
    pub(crate) fn insert_hashed(&mut self, hash: u64, key: K, slot: Slot<V>) -> usize {
        let hasher = &self.hasher;
        self.table.insert_unique(hash, Entry { key, slot }, |e| hasher.hash_one(&e.key)).bucket_index()
    }

    #[inline]
    pub(crate) fn get_index(&self, index: usize) -> Option<(&K, &Slot<V>)> {
        self.table.get_bucket(index).map(|e| (&e.key, &e.slot))
    }

    #[inline]
    pub(crate) fn get_index_mut(&mut self, index: usize) -> Option<(&K, &mut Slot<V>)> {
        self.table.get_bucket_mut(index).map(|e| (&e.key, &mut e.slot))
    }

    /// Removes the entry at a bucket index.
    #[inline]
    pub(crate) fn remove_index(&mut self, index: usize) -> Option<(K, Slot<V>)> {
        let (e, _) = self.table.get_bucket_entry(index).ok()?.remove();
        Some((e.key, e.slot))
    }

    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<(K, Slot<V>)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hash(key);
        let (e, _) = self.table.find_entry(hash, |e| e.key.borrow() == key).ok()?.remove();
        Some((e.key, e.slot))
    }

    /// Removes every entry whose key may have the hash `hash` (the table
    /// does not keep whole hashes: an entry of another hash can be among
    /// them) and whose slot `remove` picks, handing each to `removed`.
    pub(crate) fn remove_hashed_where(
        &mut self,
        hash: u64,
        mut remove: impl FnMut(&Slot<V>) -> bool,
        mut removed: impl FnMut(K, Slot<V>),
    ) {
        while let Ok(entry) = self.table.find_entry(hash, |e| remove(&e.slot)) {
            let (e, _) = entry.remove();
            removed(e.key, e.slot);
        }
    }

    /// Removes the entries `remove` selects, as the returned iterator is
    /// walked (the rest stay if it is dropped before its end).
    pub(crate) fn extract_if<'a>(
        &'a mut self,
        mut remove: impl FnMut(&K, &mut Slot<V>) -> bool + 'a,
    ) -> impl Iterator<Item = (K, Slot<V>)> + 'a {
        self.table.extract_if(move |e| remove(&e.key, &mut e.slot)).map(|e| (e.key, e.slot))
    }

    /// Removes every entry, as the returned iterator is walked (the rest go
    /// when it is dropped).
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (K, Slot<V>)> + '_ {
        self.table.drain().map(|e| (e.key, e.slot))
    }

    pub(crate) fn clear(&mut self) {
        self.table.clear();
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &Slot<V>)> {
        self.table.iter().map(|e| (&e.key, &e.slot))
    }

    pub(crate) fn slots_mut(&mut self) -> impl Iterator<Item = &mut Slot<V>> {
        self.table.iter_mut().map(|e| &mut e.slot)
    }

    /// The index of an occupied bucket at or after `start` (wrapping), if
    /// any: a random entry when `start` is random.
    #[inline]
    pub(crate) fn occupied_from(&self, start: usize) -> Option<usize> {
        let buckets = self.table.num_buckets();
        if self.table.is_empty() || buckets == 0 {
            return None;
        }
        (0..buckets).map(|i| (start + i) % buckets).find(|&i| self.table.get_bucket(i).is_some())
    }

    pub(crate) fn buckets(&self) -> usize {
        self.table.num_buckets()
    }

    /// Shrinks the table to the fewest buckets that hold its entries (and at
    /// least `min` entries); bucket indices change.
    pub(crate) fn shrink_to(&mut self, min: usize) {
        let hasher = &self.hasher;
        self.table.shrink_to(min, |e| hasher.hash_one(&e.key));
    }
}

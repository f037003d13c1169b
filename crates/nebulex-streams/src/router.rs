//! Routing: which partition carries an event.
//!
//! The default router sends every event of a key to partition
//! `stable_hash(key) % partitions`. The hash is [`StableHasher`]: the same for
//! a key on every process, platform and run (unlike `RandomState`), so the
//! nodes of a cluster agree on where a key's events go. An event naming
//! several keys is split into one event per partition; an event about
//! [`Target::All`](nebulex::Target::All) goes to every partition.
//!
//! A custom router ([`StreamsBuilder::hash`](crate::StreamsBuilder::hash)) sees
//! the whole event and returns a [`Route`].

use std::hash::{Hash, Hasher};

/// Where a custom router sends an event.
///
/// ```
/// use nebulex::{Cache, CacheEntryEvent, EventType};
/// use nebulex_streams::{Route, Streams, StreamsExt, SubscribeOptions};
///
/// let cache: Cache<String, u32> = Cache::builder().build()?;
/// let _streams = Streams::builder(&cache)
///     .partitions(2)
///     .hash(|e: &CacheEntryEvent<String>| match e.kind {
///         EventType::Deleted => Route::Partition(1),
///         EventType::Evicted => Route::Discard,
///         _ => Route::Partition(0),
///     })
///     .start()?;
/// let mut deletes = cache.subscribe(SubscribeOptions::new().partition(1))?;
/// cache.put("user:1".to_string(), 1);
/// cache.delete("user:1");
/// let event = deletes.try_recv().expect("the delete");
/// assert_eq!((event.kind, event.metadata.partition), (EventType::Deleted, Some(1)));
/// assert!(deletes.try_recv().is_err()); // the insert went to partition 0
/// # Ok::<(), nebulex_streams::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// To this partition. An out-of-range partition drops the event with a
    /// `Broadcast` error in telemetry; as it might have been any partition's,
    /// every partition's readers are told of a loss (`Lagged(0)` for this
    /// node's subscribers that want its type, a gap for the other nodes).
    Partition(u32),
    /// Nowhere: the event is dropped on purpose.
    Discard,
}

/// A hasher whose output depends only on what is hashed: not on the process,
/// the platform's endianness or word size, or a random seed.
///
/// Integers are fed as little-endian 64-bit words (`usize` as `u64`), bytes
/// 8 at a time, and the result goes through the MurmurHash3 finalizer.
///
/// ```
/// use std::hash::{Hash, Hasher};
/// use nebulex_streams::StableHasher;
///
/// let mut h = StableHasher::default();
/// "user:123".hash(&mut h);
/// assert_eq!(h.finish(), nebulex_streams::stable_hash("user:123"));
/// ```
#[derive(Clone, Debug)]
pub struct StableHasher {
    state: u64,
}

impl Default for StableHasher {
    fn default() -> Self {
        StableHasher { state: 0x243f_6a88_85a3_08d3 }
    }
}

impl StableHasher {
    #[inline]
    fn mix(&mut self, word: u64) {
        self.state = (self.state ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(31);
    }
}

impl Hasher for StableHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.mix(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.mix(u64::from(i));
    }

    fn write_u16(&mut self, i: u16) {
        self.mix(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.mix(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.mix(i);
    }

    fn write_u128(&mut self, i: u128) {
        self.mix(i as u64);
        self.mix((i >> 64) as u64);
    }

    fn write_usize(&mut self, i: usize) {
        self.mix(i as u64);
    }

    fn write_i8(&mut self, i: i8) {
        self.write_u8(i as u8);
    }

    fn write_i16(&mut self, i: i16) {
        self.write_u16(i as u16);
    }

    fn write_i32(&mut self, i: i32) {
        self.write_u32(i as u32);
    }

    fn write_i64(&mut self, i: i64) {
        self.write_u64(i as u64);
    }

    fn write_i128(&mut self, i: i128) {
        self.write_u128(i as u128);
    }

    fn write_isize(&mut self, i: isize) {
        self.write_usize(i as usize);
    }

    fn finish(&self) -> u64 {
        let mut h = self.state;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// The [`StableHasher`] hash of a value.
///
/// ```
/// use nebulex_streams::stable_hash;
///
/// // The same on every node: `str` and `String` hash alike, `u64` and `usize` too.
/// assert_eq!(stable_hash("user:123"), stable_hash(&"user:123".to_string()));
/// assert_eq!(stable_hash(&42u64), stable_hash(&42usize));
/// assert_ne!(stable_hash("user:123"), stable_hash("user:124"));
/// ```
pub fn stable_hash<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut h = StableHasher::default();
    value.hash(&mut h);
    h.finish()
}

/// The partition the default router gives `key`.
///
/// ```
/// use nebulex::Cache;
/// use nebulex_streams::{partition_of, stable_hash, Streams, StreamsExt, SubscribeOptions};
///
/// let p = partition_of("user:123", 4);
/// assert_eq!(u64::from(p), stable_hash("user:123") % 4);
///
/// let cache: Cache<String, u32> = Cache::builder().build()?;
/// let _streams = Streams::builder(&cache).partitions(4).start()?;
/// let mut sub = cache.subscribe(SubscribeOptions::new().partition(p))?;
/// cache.put("user:123".to_string(), 1);
/// assert_eq!(sub.try_recv().expect("routed here").metadata.partition, Some(p));
/// # Ok::<(), nebulex_streams::Error>(())
/// ```
#[inline]
pub fn partition_of<T: Hash + ?Sized>(key: &T, partitions: u32) -> u32 {
    (stable_hash(key) % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_hash_is_fixed_across_runs_and_platforms() {
        // Pinned values: a change here breaks routing between nodes of
        // different versions.
        assert_eq!(stable_hash(&42u64), stable_hash(&42usize));
        assert_eq!(stable_hash("user:123"), stable_hash(&"user:123".to_string()));
        let pinned = [stable_hash(&0u64), stable_hash("user:123"), stable_hash(&(1u32, "a"))];
        assert_eq!(pinned, [PINNED_0, PINNED_USER, PINNED_TUPLE], "{pinned:x?}");
    }

    const PINNED_0: u64 = 0x5ab7_f56e_7b12_884d;
    const PINNED_USER: u64 = 0x9146_cfe5_f789_21b9;
    const PINNED_TUPLE: u64 = 0xe042_f266_e4af_6f90;

    #[test]
    fn partitions_spread_keys_evenly() {
        let mut counts = [0u32; 8];
        for k in 0..80_000u64 {
            counts[partition_of(&k, 8) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
        let mut counts = [0u32; 4];
        for k in 0..40_000u64 {
            counts[partition_of(&format!("user:{k}"), 4) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }
}

//! The store behind a cache: shards of entries, their eviction, and the sweep
//! of expired entries.
//!
//! A cache is split into a power-of-two number of shards, each a mutex around
//! a hash table of entries and an index of their deadlines. Every write of a
//! key happens under its shard's lock, and the events it causes are emitted
//! before the lock is released: that is what makes per-key event order exact.

pub(crate) mod expiries;
pub(crate) mod load;
pub(crate) mod map;
pub(crate) mod shard;
pub(crate) mod sweeper;

//! Real-time event streams for [`nebulex`] caches.
//!
//! Subscribe to a cache's entry events — `inserted`, `updated`, `deleted`,
//! `expired`, `evicted` — as they happen: filtered by type, split into
//! partitions handled in parallel, from async or sync code, with exact
//! accounting of anything a slow subscriber missed.
//!
//! ```
//! use nebulex::{Cache, EventType, Target};
//! use nebulex_streams::{Streams, StreamsExt, SubscribeOptions};
//!
//! let cache: Cache<String, u32> = Cache::builder().name("users").build()?;
//! let _streams = Streams::builder(&cache).start()?;
//! let mut sub = cache.subscribe(SubscribeOptions::new())?;
//!
//! cache.put("user:123".to_string(), 30);
//! cache.put("user:123".to_string(), 31);
//! cache.delete("user:123");
//!
//! for expected in [EventType::Inserted, EventType::Updated, EventType::Deleted] {
//!     let event = sub.try_recv().expect("an event is waiting");
//!     assert_eq!(event.kind, expected);
//!     assert_eq!(event.target, Target::Key("user:123".to_string()));
//! }
//! # Ok::<(), nebulex_streams::Error>(())
//! ```
//!
//! * [`Streams`] and its [`StreamsBuilder`]: partitions, routing, buffers.
//! * [`Subscription`]: a `futures::Stream`, plus `recv`, `try_recv`,
//!   `recv_blocking`; the [lagging rules](subscription#lagging).
//! * [`router`]: the default key hash and custom routes.
//! * [`telemetry`]: the observer, `tracing` and `metrics` reports.
//!
//! # Guarantees
//!
//! 1. **Per-key order.** With the default router, every subscriber sees a
//!    key's events in the order the writes took effect, under concurrent
//!    writers too.
//! 2. **Almost no cost when nobody listens.** With no subscriber (and no
//!    cluster transport), the cache does not even build events.
//! 3. **Writers never wait on readers.** A full subscriber buffer drops the
//!    event for that subscriber and counts it; the subscriber then receives
//!    [`Lagged`] with the exact count.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod cluster;
mod error;
pub mod invalidator;
pub mod pubsub;
pub mod router;
mod streams;
pub mod subscription;
pub mod telemetry;
pub mod wire;

pub use cluster::{
    DEFAULT_BATCH_SIZE, DEFAULT_HEARTBEAT, DEFAULT_OUTBOUND_BUFFER, FORGOTTEN_ORIGINS, MAX_BACKOFF, MAX_BATCH_LINGER,
    MAX_ORIGINS_PER_PARTITION, MIN_HEARTBEAT, SILENT_HEARTBEATS, SILENT_NODE_HEARTBEATS,
};
pub use error::Error;
pub use invalidator::{DisconnectPolicy, Invalidator, InvalidatorBuilder};
pub use pubsub::{Backoff, MemoryBus, PubSub};
pub use router::{partition_of, stable_hash, Route, StableHasher};
pub use streams::{
    Streams, StreamsBuilder, StreamsExt, StreamsInfo, DEFAULT_BUFFER, DEFAULT_PREFIX, MAX_BUFFER, MAX_PARTITIONS,
};
pub use subscription::{
    EventScope, Item, Lagged, SubscribeOptions, Subscription, TryRecvError, MAX_BUSY_POLL, PREMAPPED_BYTES,
};
pub use telemetry::{BroadcastError, BroadcastStatus, InvalidatorEvent, Telemetry};

/// The README's Rust blocks, compiled and run as doc tests (its quick start
/// included), so that it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;

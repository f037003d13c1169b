//! A fast in-process cache whose every change emits an exact event.
//!
//! `nebulex` is the cache half of Nebulex for Rust: a sharded, concurrent
//! [`Cache<K, V>`] with time to live, a size bound, and a
//! [`CacheEntryEvent`] for every change — `inserted`, `updated`, `deleted`,
//! `expired`, `evicted` — in exact per-key order. Its companion crate
//! `nebulex-streams` turns those events into subscriptions, partitions and
//! cluster-wide streams.
//!
//! ```
//! use nebulex::{Cache, EventFilter, EventType, Target};
//! use std::sync::mpsc;
//!
//! let cache: Cache<String, u32> = Cache::builder().name("users").build()?;
//! let (tx, rx) = mpsc::channel();
//! cache.register_event_listener("demo", EventFilter::all(), move |e| {
//!     let _ = tx.send((e.kind, e.target.clone()));
//! })?;
//!
//! cache.put("user:123".to_string(), 30);
//! cache.put("user:123".to_string(), 31);
//! cache.delete("user:123");
//!
//! let seen: Vec<_> = rx.try_iter().collect();
//! assert_eq!(seen, [
//!     (EventType::Inserted, Target::Key("user:123".to_string())),
//!     (EventType::Updated, Target::Key("user:123".to_string())),
//!     (EventType::Deleted, Target::Key("user:123".to_string())),
//! ]);
//! # Ok::<(), nebulex::Error>(())
//! ```
//!
//! See [`Cache`] for every call and the event it emits.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod builder;
mod cache;
mod clock;
mod error;
mod event;
mod extensions;
mod listener;
mod query;
mod store;

pub use builder::{CacheBuilder, DEFAULT_NAME, DEFAULT_SWEEP_INTERVAL, MAX_SHARDS_OPTION, MIN_SWEEP_INTERVAL};
pub use cache::{Cache, WeakCache};
pub use clock::ManualClock;
pub use error::Error;
pub use event::{CacheEntryEvent, CacheName, Command, EventMetadata, EventType, Name, NodeId, Target};
pub use extensions::Extensions;
pub use listener::EventFilter;
pub use query::{Predicate, Query};

//! Telemetry: what a stream reports, in three layers.
//!
//! Every report reaches three places, so each user finds it where they look:
//!
//! 1. the typed observer given to
//!    [`StreamsBuilder::observer`](crate::StreamsBuilder::observer), called
//!    with a [`Telemetry`] value, inline (keep it fast);
//! 2. [`tracing`] events under the target `nebulex_streams`, with the same
//!    fields (`trace` for each broadcast, `debug` for lifecycle, `warn` for
//!    loss);
//! 3. [`metrics`](https://docs.rs/metrics) counters and histograms, through
//!    the `metrics` facade (feature `metrics`, on by default), so any exporter
//!    works. Install the recorder before starting the stream: handles are
//!    taken at start.
//!
//! | report | observer | metric |
//! |---|---|---|
//! | listener registered / unregistered | [`Telemetry::ListenerRegistered`], [`Telemetry::ListenerUnregistered`] | — |
//! | an event this node routed, taken by every receiver of its partition (the local subscribers that want it; the outbound buffer, with a transport) | [`Telemetry::Broadcast`] with [`BroadcastStatus::Ok`] | `nebulex_streams_events_total{cache, partition, kind}` |
//! | an event a subscriber's full buffer could not take | [`Telemetry::Broadcast`] with [`BroadcastError::SubscriberFull`] | `nebulex_streams_broadcast_errors_total{cache, reason="subscriber_full"}` (events) |
//! | an event the outbound buffer (full) could not take, with a transport | [`Telemetry::Broadcast`] with [`BroadcastError::Transport`] | `nebulex_streams_broadcast_errors_total{cache, reason="outbound_full"}` (events) |
//! | an event a custom router sent past the partitions, or panicked on | [`Telemetry::Broadcast`] with [`BroadcastError::PartitionOutOfRange`] or [`BroadcastError::RouterPanicked`] | `nebulex_streams_broadcast_errors_total{cache, reason="partition_out_of_range"}` or `…{reason="router_panicked"}` (events) |
//! | a subscriber learns it missed events | [`Telemetry::Lagged`] | `nebulex_streams_lagged_total{cache, partition}` (events) |
//! | a jump in a remote node's sequence | [`Telemetry::Gap`] | `nebulex_streams_gaps_total{cache, partition}` |
//! | a frame from the network refused | [`Telemetry::FrameRejected`] | `nebulex_streams_frames_rejected_total{cache, reason}` |
//! | frames that could not be published (or encoded) | [`Telemetry::PublishFailed`] | `nebulex_streams_broadcast_errors_total{cache, reason="transport"}` (frames) |
//! | the invalidator's work | [`Telemetry::Invalidator`] | `nebulex_streams_invalidations_total{cache}`, `nebulex_streams_propagation_seconds{cache}` |
//!
//! The names follow Nebulex Streams' `[:nebulex, :streams, …]` events.

use std::fmt;
use std::sync::Arc;

use nebulex::{CacheEntryEvent, CacheName, EventType, Name, NodeId};

use crate::wire::RejectReason;

/// One telemetry report of a stream.
///
/// An observer that counts delivered events and logs the failures:
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
/// use nebulex::Cache;
/// use nebulex_streams::{BroadcastStatus, Streams, StreamsExt, SubscribeOptions, Telemetry};
///
/// let cache: Cache<String, u32> = Cache::builder().name("users").build()?;
/// let delivered = Arc::new(AtomicUsize::new(0));
/// let count = delivered.clone();
/// let _streams = Streams::builder(&cache)
///     .buffer(1)
///     .observer(move |t: &Telemetry<String>| match t {
///         Telemetry::Broadcast { status: BroadcastStatus::Ok, .. } => {
///             count.fetch_add(1, Ordering::Relaxed);
///         }
///         Telemetry::Broadcast { reason: Some(reason), topic, .. } => eprintln!("{topic}: {reason}"),
///         _ => {}
///     })
///     .start()?;
/// let _sub = cache.subscribe(SubscribeOptions::new())?;
/// cache.put("user:1".to_string(), 1);
/// cache.put("user:2".to_string(), 2); // the subscriber's buffer of 1 is full: logged
/// assert_eq!(delivered.load(Ordering::Relaxed), 1);
/// # Ok::<(), nebulex_streams::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Telemetry<K> {
    /// The stream registered its listener on the cache (at start).
    ListenerRegistered {
        /// The cache.
        cache: CacheName,
    },
    /// The stream removed its listener (at stop).
    ListenerUnregistered {
        /// The cache.
        cache: CacheName,
    },
    /// An event was handed to a partition's subscribers, or could not be.
    Broadcast {
        /// Whether every interested subscriber took it.
        status: BroadcastStatus,
        /// Why not, on error.
        reason: Option<BroadcastError>,
        /// The partition's topic; the stream's own (`{prefix}:{cache}`) for
        /// an event a custom router sent to no partition
        /// ([`PartitionOutOfRange`](BroadcastError::PartitionOutOfRange),
        /// [`RouterPanicked`](BroadcastError::RouterPanicked)).
        topic: Name,
        /// The event.
        event: Arc<CacheEntryEvent<K>>,
    },
    /// A subscriber is told it missed `missed` events (`0`: an unknown number).
    Lagged {
        /// The cache.
        cache: CacheName,
        /// The subscriber's partition.
        partition: u32,
        /// How many events it missed.
        missed: u64,
    },
    /// A remote node's events jumped in sequence: events were lost on the way.
    Gap {
        /// The cache.
        cache: CacheName,
        /// The partition.
        partition: u32,
        /// The node whose events were lost (`None`: every node's, such as
        /// after a lost connection).
        origin: Option<NodeId>,
        /// How many (`0`: an unknown number, such as after a lost connection).
        missed: u64,
    },
    /// A frame from the network was refused.
    FrameRejected {
        /// The cache.
        cache: CacheName,
        /// Why.
        reason: RejectReason,
    },
    /// Frames of this node's events could not be published (the server is
    /// unreachable, or a key could not be encoded): receivers will see a gap.
    PublishFailed {
        /// The cache.
        cache: CacheName,
        /// How many frames.
        frames: usize,
    },
    /// What an invalidator did.
    Invalidator {
        /// The cache.
        cache: CacheName,
        /// The report.
        event: InvalidatorEvent,
    },
}

/// Whether a broadcast reached every interested subscriber.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use nebulex::Cache;
/// use nebulex_streams::{BroadcastStatus, Streams, StreamsExt, SubscribeOptions, Telemetry};
///
/// let cache: Cache<u32, u32> = Cache::builder().build()?;
/// let statuses = Arc::new(Mutex::new(Vec::new()));
/// let log = statuses.clone();
/// let _streams = Streams::builder(&cache)
///     .buffer(1)
///     .observer(move |t: &Telemetry<u32>| {
///         if let Telemetry::Broadcast { status, .. } = t {
///             log.lock().unwrap().push(*status);
///         }
///     })
///     .start()?;
/// let _sub = cache.subscribe(SubscribeOptions::new())?;
/// cache.put(1, 1);
/// cache.put(2, 2); // the subscriber's buffer of 1 is full
/// assert_eq!(*statuses.lock().unwrap(), [BroadcastStatus::Ok, BroadcastStatus::Error]);
/// # Ok::<(), nebulex_streams::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BroadcastStatus {
    /// Delivered.
    Ok,
    /// Not delivered to at least one subscriber, or not at all.
    Error,
}

/// Why a broadcast failed.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use nebulex::{Cache, CacheEntryEvent};
/// use nebulex_streams::{BroadcastError, Route, Streams, StreamsExt, SubscribeOptions, Telemetry};
///
/// let cache: Cache<u32, u32> = Cache::builder().build()?;
/// let errors = Arc::new(Mutex::new(Vec::new()));
/// let log = errors.clone();
/// let _streams = Streams::builder(&cache)
///     .partitions(2)
///     .hash(|_: &CacheEntryEvent<u32>| Route::Partition(5)) // a buggy router
///     .observer(move |t: &Telemetry<u32>| {
///         if let Telemetry::Broadcast { reason: Some(reason), .. } = t {
///             log.lock().unwrap().push(reason.clone());
///         }
///     })
///     .start()?;
/// let _sub = cache.subscribe(SubscribeOptions::new())?; // without one, no event is even built
/// cache.put(1, 1);
/// let errors = errors.lock().unwrap();
/// assert_eq!(errors[..], [BroadcastError::PartitionOutOfRange { partition: 5, partitions: 2 }]);
/// assert_eq!(errors[0].to_string(), "the router returned partition 5, but the stream has 2");
/// # Ok::<(), nebulex_streams::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BroadcastError {
    /// A subscriber's buffer was full: it will see `Lagged`.
    #[error("a subscriber's buffer of {capacity} events is full")]
    SubscriberFull {
        /// The buffer's capacity.
        capacity: usize,
    },
    /// A custom router returned a partition past the partition count.
    #[error("the router returned partition {partition}, but the stream has {partitions}")]
    PartitionOutOfRange {
        /// The router's answer.
        partition: u32,
        /// The partition count.
        partitions: u32,
    },
    /// The cluster transport could not take the event: its outbound buffer
    /// was full (metric label `outbound_full`).
    #[error("transport: {0}")]
    Transport(String),
    /// A custom router panicked on the event (with this message): the event
    /// went to no partition, and every partition's readers are told of a
    /// loss, as with an out-of-range partition.
    #[error("the router panicked: {0}")]
    RouterPanicked(String),
    /// The event's key's `Hash` or `Clone` panicked as the event was routed
    /// (with this message): the event went to no partition, and every
    /// partition's readers are told of a loss, as with a router that
    /// panicked (metric label `key_panicked`).
    #[error("a key's Hash or Clone panicked as the event was routed: {0}")]
    KeyPanicked(String),
}

/// What an invalidator reports.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use std::time::Duration;
/// use nebulex::Cache;
/// use nebulex_streams::{InvalidatorEvent, Invalidator, MemoryBus, Streams, Telemetry};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// let cache: Cache<String, u32> = Cache::builder().name("users").build()?;
/// let (bus, seen) = (MemoryBus::new(), Arc::new(Mutex::new(Vec::new())));
/// let log = seen.clone();
/// let streams = Streams::builder(&cache)
///     .pubsub(bus.clone().into())
///     .observer(move |t: &Telemetry<String>| {
///         if let Telemetry::Invalidator { event, .. } = t {
///             log.lock().unwrap().push(event.clone());
///         }
///     })
///     .start()?;
/// let invalidator = Invalidator::builder(&streams).start()?;
/// cache.put("user:1".to_string(), 1);
/// bus.cut(cache.node_id()); // a lost connection: the worker flushes its partition
/// tokio::time::timeout(Duration::from_secs(5), async {
///     while cache.contains_key("user:1") {
///         tokio::time::sleep(Duration::from_millis(1)).await;
///     }
/// })
/// .await?;
/// invalidator.stop();
/// assert_eq!(*seen.lock().unwrap(), [
///     InvalidatorEvent::Started,
///     InvalidatorEvent::Resync { partition: 0, count: 1 },
///     InvalidatorEvent::Stopped,
/// ]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidatorEvent {
    /// Its workers started.
    Started,
    /// It stopped.
    Stopped,
    /// It removed `count` local entries for an event.
    Invalidate {
        /// The partition.
        partition: u32,
        /// Entries removed.
        count: usize,
    },
    /// It received an event it does not act on: the `Inserted` of a load
    /// elsewhere, an `Expired` or an `Evicted`.
    Unhandled {
        /// The partition.
        partition: u32,
        /// The event's type.
        kind: EventType,
    },
    /// It flushed a partition after a loss, so that nothing stale survives.
    Resync {
        /// The partition.
        partition: u32,
        /// Entries removed.
        count: usize,
    },
}

pub(crate) type ObserverFn<K> = dyn Fn(&Telemetry<K>) + Send + Sync;

/// How often the same warning may be logged by a stream that keeps hitting
/// it (a server down while writes go on).
const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Counts what a repeated warning is about, and says when to log it: at
/// most once per [`WARN_EVERY`].
#[derive(Default)]
struct Throttle {
    /// Counted since the last warning.
    count: usize,
    /// When that was.
    warned: Option<std::time::Instant>,
}

impl Throttle {
    /// Adds `n`; if a warning is due, the count it should give (all since
    /// the last one).
    fn add(&mut self, n: usize, now: std::time::Instant) -> Option<usize> {
        self.count += n;
        if self.warned.is_some_and(|at| now.saturating_duration_since(at) < WARN_EVERY) {
            return None;
        }
        self.warned = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// Where a stream sends its reports.
pub(crate) struct Reporter<K> {
    pub(crate) cache: CacheName,
    observer: Option<Box<ObserverFn<K>>>,
    /// Frames not published: the `tracing` warning comes at most once a
    /// second (the observer and the metric hear of every failure).
    unpublished: parking_lot::Mutex<Throttle>,
    /// Frames dropped on the way in: reported at most once a second.
    dropped: parking_lot::Mutex<Throttle>,
    #[cfg(feature = "metrics")]
    metrics: Metrics,
}

#[cfg(feature = "metrics")]
struct Metrics {
    /// `events[partition][kind]`
    events: Vec<[metrics::Counter; 5]>,
    lagged: Vec<metrics::Counter>,
    gaps: Vec<metrics::Counter>,
    subscriber_full: metrics::Counter,
    bad_route: metrics::Counter,
    router_panicked: metrics::Counter,
    key_panicked: metrics::Counter,
    outbound_full: metrics::Counter,
    transport: metrics::Counter,
    invalidations: metrics::Counter,
    propagation: metrics::Histogram,
}

#[cfg(feature = "metrics")]
impl Metrics {
    fn new(cache: &CacheName, partitions: u32) -> Self {
        let c = cache.to_string();
        let per_partition = |name: &'static str| -> Vec<metrics::Counter> {
            (0..partitions)
                .map(|p| metrics::counter!(name, "cache" => c.clone(), "partition" => p.to_string()))
                .collect()
        };
        Metrics {
            events: (0..partitions)
                .map(|p| {
                    EventType::ALL.map(|kind| {
                        metrics::counter!("nebulex_streams_events_total",
                            "cache" => c.clone(), "partition" => p.to_string(), "kind" => kind.as_str())
                    })
                })
                .collect(),
            lagged: per_partition("nebulex_streams_lagged_total"),
            gaps: per_partition("nebulex_streams_gaps_total"),
            subscriber_full: metrics::counter!("nebulex_streams_broadcast_errors_total",
                "cache" => c.clone(), "reason" => "subscriber_full"),
            bad_route: metrics::counter!("nebulex_streams_broadcast_errors_total",
                "cache" => c.clone(), "reason" => "partition_out_of_range"),
            router_panicked: metrics::counter!("nebulex_streams_broadcast_errors_total",
                "cache" => c.clone(), "reason" => "router_panicked"),
            key_panicked: metrics::counter!("nebulex_streams_broadcast_errors_total",
                "cache" => c.clone(), "reason" => "key_panicked"),
            outbound_full: metrics::counter!("nebulex_streams_broadcast_errors_total",
                "cache" => c.clone(), "reason" => "outbound_full"),
            transport: metrics::counter!("nebulex_streams_broadcast_errors_total",
                "cache" => c.clone(), "reason" => "transport"),
            invalidations: metrics::counter!("nebulex_streams_invalidations_total", "cache" => c.clone()),
            propagation: metrics::histogram!("nebulex_streams_propagation_seconds", "cache" => c),
        }
    }
}

impl<K> Reporter<K> {
    pub(crate) fn new(cache: CacheName, partitions: u32, observer: Option<Box<ObserverFn<K>>>) -> Self {
        let _ = partitions; // for the metrics' labels
        Reporter {
            #[cfg(feature = "metrics")]
            metrics: Metrics::new(&cache, partitions),
            cache,
            observer,
            unpublished: parking_lot::Mutex::new(Throttle::default()),
            dropped: parking_lot::Mutex::new(Throttle::default()),
        }
    }

    /// Calls the observer, if any. A panic in it is caught and logged: it
    /// runs inside writes, the cluster's tasks and the invalidator, none of
    /// which may stop half way for it.
    #[inline]
    fn observe(&self, t: impl FnOnce() -> Telemetry<K>) {
        if let Some(observer) = &self.observer {
            let report = t();
            if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| observer(&report))) {
                tracing::error!(target: "nebulex_streams", cache = %self.cache,
                    panic = panic_message(panic.as_ref()), "the telemetry observer panicked; carrying on");
            }
        }
    }

    pub(crate) fn listener_registered(&self) {
        quietly(|| {
            tracing::debug!(target: "nebulex_streams", cache = %self.cache, "listener registered");
            self.observe(|| Telemetry::ListenerRegistered { cache: self.cache });
        });
    }

    pub(crate) fn listener_unregistered(&self) {
        quietly(|| {
            tracing::debug!(target: "nebulex_streams", cache = %self.cache, "listener unregistered");
            self.observe(|| Telemetry::ListenerUnregistered { cache: self.cache });
        });
    }

    /// Whether reports of single events need the event itself: an observer
    /// is set, or `trace` logging is on. (If not, writers hand events over
    /// without keeping a reference.)
    #[inline]
    pub(crate) fn wants_events(&self) -> bool {
        self.observer.is_some() || tracing::enabled!(target: "nebulex_streams", tracing::Level::TRACE)
    }

    /// An event of type `kind` delivered to partition `partition` (`event`:
    /// the event itself, if [`wants_events`](Self::wants_events)).
    #[inline]
    pub(crate) fn broadcast_ok(
        &self,
        partition: u32,
        topic: Name,
        kind: EventType,
        event: Option<&Arc<CacheEntryEvent<K>>>,
    ) {
        quietly(|| {
            #[cfg(feature = "metrics")]
            if let Some(c) = self.metrics.events.get(partition as usize) {
                c[kind as usize].increment(1);
            }
            let (_, _) = (partition, kind);
            let Some(event) = event else { return };
            tracing::trace!(target: "nebulex_streams", cache = %self.cache, topic = %topic,
                kind = %event.kind, command = %event.command, seq = event.metadata.seq, "broadcast");
            self.observe(|| Telemetry::Broadcast {
                status: BroadcastStatus::Ok,
                reason: None,
                topic,
                event: event.clone(),
            });
        });
    }

    /// An event that could not be delivered (`event`: the event itself, if
    /// [`wants_events`](Self::wants_events)).
    pub(crate) fn broadcast_error(&self, topic: Name, event: Option<&Arc<CacheEntryEvent<K>>>, reason: BroadcastError) {
        quietly(|| {
            #[cfg(feature = "metrics")]
            match reason {
                BroadcastError::PartitionOutOfRange { .. } => self.metrics.bad_route.increment(1),
                BroadcastError::RouterPanicked(_) => self.metrics.router_panicked.increment(1),
                BroadcastError::KeyPanicked(_) => self.metrics.key_panicked.increment(1),
                BroadcastError::Transport(_) => self.metrics.outbound_full.increment(1),
                BroadcastError::SubscriberFull { .. } => self.metrics.subscriber_full.increment(1),
            }
            let Some(event) = event else { return };
            tracing::trace!(target: "nebulex_streams", cache = %self.cache, topic = %topic,
                kind = %event.kind, %reason, "broadcast failed");
            self.observe(|| Telemetry::Broadcast {
                status: BroadcastStatus::Error,
                reason: Some(reason),
                topic,
                event: event.clone(),
            });
        });
    }

    pub(crate) fn lagged(&self, partition: u32, missed: u64) {
        quietly(|| {
            #[cfg(feature = "metrics")]
            if let Some(c) = self.metrics.lagged.get(partition as usize) {
                c.increment(missed);
            }
            tracing::warn!(target: "nebulex_streams", cache = %self.cache, partition, missed, "subscriber lagged");
            self.observe(|| Telemetry::Lagged { cache: self.cache, partition, missed });
        });
    }

    /// Frames were dropped on the way in (again): whether to report it now.
    pub(crate) fn drops_due(&self) -> bool {
        self.dropped.lock().add(1, std::time::Instant::now()).is_some()
    }

    pub(crate) fn gap(&self, partition: u32, origin: Option<NodeId>, missed: u64) {
        quietly(|| {
            #[cfg(feature = "metrics")]
            if let Some(c) = self.metrics.gaps.get(partition as usize) {
                c.increment(1);
            }
            tracing::warn!(target: "nebulex_streams", cache = %self.cache, partition, origin = ?origin, missed, "gap");
            self.observe(|| Telemetry::Gap { cache: self.cache, partition, origin, missed });
        });
    }

    pub(crate) fn frame_rejected(&self, reason: &RejectReason) {
        quietly(|| {
            #[cfg(feature = "metrics")]
            metrics::counter!("nebulex_streams_frames_rejected_total",
                "cache" => self.cache.to_string(), "reason" => reason.label())
            .increment(1);
            tracing::warn!(target: "nebulex_streams", cache = %self.cache, %reason, "frame rejected");
            self.observe(|| Telemetry::FrameRejected { cache: self.cache, reason: reason.clone() });
        });
    }

    /// `failed` of `sent` frames could not be handed to the transport.
    pub(crate) fn transport_error(&self, failed: usize, sent: usize) {
        quietly(|| {
            #[cfg(feature = "metrics")]
            self.metrics.transport.increment(failed as u64);
            let due = self.unpublished.lock().add(failed, std::time::Instant::now());
            match due {
                Some(failed) => tracing::warn!(target: "nebulex_streams", cache = %self.cache, failed,
                    "frames not published (since the last such warning)"),
                None => {
                    tracing::debug!(target: "nebulex_streams", cache = %self.cache, failed, sent, "frames not published")
                }
            }
            self.observe(|| Telemetry::PublishFailed { cache: self.cache, frames: failed });
        });
    }

    pub(crate) fn encode_error(&self, error: &str) {
        quietly(|| {
            #[cfg(feature = "metrics")]
            self.metrics.transport.increment(1);
            tracing::error!(target: "nebulex_streams", cache = %self.cache, error, "cannot encode a frame");
            self.observe(|| Telemetry::PublishFailed { cache: self.cache, frames: 1 });
        });
    }

    pub(crate) fn invalidator(&self, event: InvalidatorEvent) {
        quietly(|| {
            #[cfg(feature = "metrics")]
            if let InvalidatorEvent::Invalidate { count, .. } | InvalidatorEvent::Resync { count, .. } = event {
                self.metrics.invalidations.increment(count as u64);
            }
            tracing::debug!(target: "nebulex_streams", cache = %self.cache, ?event, "invalidator");
            self.observe(|| Telemetry::Invalidator { cache: self.cache, event });
        });
    }

    pub(crate) fn propagation(&self, seconds: f64) {
        quietly(|| {
            #[cfg(feature = "metrics")]
            self.metrics.propagation.record(seconds);
            let _ = seconds;
        });
    }
}

impl<K> fmt::Debug for Reporter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reporter").field("cache", &self.cache).field("observer", &self.observer.is_some()).finish()
    }
}

/// Runs `f`, a report through the application's logger, metrics recorder
/// and observer: a panic in any of them is caught (and logged, unless the
/// logger is what panics), for reports come from within writes, receives,
/// the cluster's tasks and the invalidator, none of which may stop half way
/// for it.
#[inline]
pub(crate) fn quietly(f: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tracing::error!(target: "nebulex_streams", panic = panic_message(panic.as_ref()),
                "reporting panicked (the logger, the metrics recorder or the observer); carrying on");
        }));
    }
}

/// What a caught panic said, when it said it with a string.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_warning_comes_at_most_once_per_period_with_all_it_counted() {
        let start = std::time::Instant::now();
        let mut t = Throttle::default();
        assert_eq!(t.add(2, start), Some(2), "the first one at once");
        assert_eq!(t.add(3, start + WARN_EVERY / 2), None);
        assert_eq!(t.add(4, start + WARN_EVERY / 2), None);
        assert_eq!(t.add(1, start + WARN_EVERY), Some(8), "then all since");
        assert_eq!(t.add(5, start + WARN_EVERY * 3 / 2), None);
        assert_eq!(t.add(0, start + WARN_EVERY * 3), Some(5));
    }
}

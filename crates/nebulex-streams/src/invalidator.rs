//! The Invalidator: a change on one node removes the stale copy on every
//! other node.
//!
//! An invalidator subscribes to every partition of a stream (one worker per
//! partition) and deletes from the local cache the target of every change in
//! its [scope](EventScope) — `Key`, `Keys` or `All` — **without emitting
//! events**, so nothing echoes back across the cluster. The next read of an
//! invalidated key goes to the system of record.
//!
//! A change is an `Inserted`, `Updated` or `Deleted` event, except the
//! `Inserted` of a load (`get_or_insert_with`, command `Load`): a load only
//! read the record, and removing other nodes' copies for it would make nodes
//! that read one key empty each other's copy on every miss. Expiry and
//! eviction elsewhere say nothing about the record either. These events are
//! reported as [`Unhandled`](InvalidatorEvent::Unhandled).
//!
//! # Fail safe
//!
//! A lost message must not leave a stale entry behind. When a worker learns
//! of a loss — a `Lagged` notice: its buffer overflowed, a gap in a node's
//! sequence numbers, or a lost connection — it deletes every local entry of
//! its partition (exact with the default router, which gives each key one
//! partition; with a custom router, the whole cache) and reports
//! [`Resync`](InvalidatorEvent::Resync).
//!
//! A lost connection is told twice: when it is lost, and when it is back
//! (what was published in between is gone). While it is down, what the node
//! reads from the record misses the other nodes' changes too, so the worker
//! flushes its partition again every heartbeat of the stream for as long as
//! the outage lasts — and likewise before the stream first connects, and
//! while another node is silent on the partition without having stopped
//! (for up to [`SILENT_NODE_HEARTBEATS`](crate::SILENT_NODE_HEARTBEATS)
//! heartbeats since it was last heard, or the
//! [`silent_node_window`](InvalidatorBuilder::silent_node_window)): it may
//! be alive and writing its record, cut off from the transport, its changes
//! unheard. The
//! [`DisconnectPolicy`] says when the flushing starts:
//! [`Flush`](DisconnectPolicy::Flush) at once (the default), or
//! [`ServeStale`](DisconnectPolicy::ServeStale) after at most `max` — for
//! near caches that prefer availability during a short outage.
//!
//! `ServeStale` applies to every loss of unknown size (`Lagged(0)`): this
//! node's connection lost or back, and another node fallen silent or
//! restarted without stopping its stream. A counted loss (a full buffer, a
//! gap in a node's sequence) is flushed at once under either policy, unless
//! the worker is told of it together with a loss of unknown size (one
//! `Lagged(0)` for both).
//!
//! A lost connection is known when the transport reports it. One that hangs
//! without closing is found out after
//! [`SILENT_HEARTBEATS`](crate::SILENT_HEARTBEATS) heartbeats: over Redis,
//! this node's own frames stop coming back, and the link makes its
//! connection again; the other nodes fall silent too.
//!
//! # The load race
//!
//! A `get_or_insert_with` load that started before an invalidation of its
//! key does not store its result (the cache takes care of it): the value
//! it read may be older than the change that was announced.
//!
//! ```no_run
//! # #[cfg(feature = "redis")]
//! # async fn run() -> Result<(), nebulex_streams::Error> {
//! use nebulex::Cache;
//! use nebulex_streams::{EventScope, Invalidator, PubSub, Streams};
//!
//! let cache: Cache<String, String> = Cache::builder().name("users").build()?;
//! let streams = Streams::builder(&cache).partitions(4).pubsub(PubSub::redis("redis://127.0.0.1:6379/")).start()?;
//! streams.ready().await?;
//! let invalidator = Invalidator::builder(&streams).scope(EventScope::Remote).start()?;
//! // ... every write on another node now removes this node's copy.
//! invalidator.stop();
//! # Ok(()) }
//! ```

use std::fmt;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use nebulex::{CacheEntryEvent, Command, EventType};
use tokio::sync::watch;

use crate::error::Error;
use crate::router::partition_of;
use crate::streams::{StreamShared, Streams};
use crate::subscription::{EventScope, Lagged, Subscription};
use crate::telemetry::InvalidatorEvent;

/// What an invalidator does when its node loses the cluster connection.
///
/// With [`ServeStale`](Self::ServeStale), entries outlive a lost connection
/// for at most `max`:
///
/// ```
/// use std::time::Duration;
/// use nebulex::Cache;
/// use nebulex_streams::{DisconnectPolicy, Invalidator, MemoryBus, Streams};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// let cache: Cache<String, u32> = Cache::builder().name("users").build()?;
/// let bus = MemoryBus::new();
/// let streams = Streams::builder(&cache).pubsub(bus.clone().into()).start()?;
/// let policy = DisconnectPolicy::ServeStale { max: Duration::from_millis(200) };
/// let _invalidator = Invalidator::builder(&streams).on_disconnect(policy).start()?;
/// cache.put("user:1".to_string(), 1);
///
/// bus.cut(cache.node_id());
/// tokio::time::sleep(Duration::from_millis(20)).await;
/// assert!(cache.contains_key("user:1")); // still served...
/// tokio::time::sleep(Duration::from_millis(700)).await;
/// assert!(!cache.contains_key("user:1")); // ...until `max` has passed
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum DisconnectPolicy {
    /// Delete the partition's local entries at once, again every heartbeat
    /// of the stream while the connection is down or another node is silent
    /// without having stopped (what is read meanwhile misses the other
    /// nodes' changes), and again when it is back: once a loss is known,
    /// nothing is served stale for longer than a heartbeat.
    #[default]
    Flush,
    /// Keep serving local entries for at most `max` after the loss, then
    /// delete them, and again every `max` while the connection is down (or
    /// another node silent): a
    /// bounded staleness window in exchange for availability. What is read
    /// just before the connection comes back is deleted by the next of
    /// these flushes, not at once.
    ServeStale {
        /// The longest a possibly stale entry is served (at least the
        /// stream's heartbeat, while the connection is down).
        max: Duration,
    },
}

/// Options of an invalidator; made by [`Invalidator::builder`].
///
/// | option | default |
/// |---|---|
/// | [`scope`](Self::scope) | [`EventScope::Remote`]: other nodes' changes |
/// | [`on_disconnect`](Self::on_disconnect) | [`DisconnectPolicy::Flush`] |
/// | [`silent_node_window`](Self::silent_node_window) | [`SILENT_NODE_HEARTBEATS`](crate::SILENT_NODE_HEARTBEATS) heartbeats |
///
/// ```
/// use std::time::Duration;
/// use nebulex::Cache;
/// use nebulex_streams::{DisconnectPolicy, Error, EventScope, Invalidator, Streams};
///
/// let cache: Cache<String, u32> = Cache::builder().build()?;
/// let streams = Streams::builder(&cache).partitions(4).start()?;
/// // Workers are tokio tasks: outside a runtime, `start` refuses.
/// assert_eq!(Invalidator::builder(&streams).start().unwrap_err(), Error::NoRuntime);
///
/// let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
/// let _in_runtime = rt.enter();
/// let invalidator = Invalidator::builder(&streams)
///     .scope(EventScope::Remote)
///     .on_disconnect(DisconnectPolicy::ServeStale { max: Duration::from_secs(5) })
///     .start()?;
/// assert!(!invalidator.is_stopped());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct InvalidatorBuilder<'a, K> {
    streams: &'a Streams<K>,
    scope: EventScope,
    policy: DisconnectPolicy,
    silent_node_window: Option<Duration>,
    /// Whether what the cache holds at the start stays.
    keep_cached: bool,
}

impl<K> fmt::Debug for InvalidatorBuilder<'_, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InvalidatorBuilder")
            .field("scope", &self.scope)
            .field("policy", &self.policy)
            .field("silent_node_window", &self.silent_node_window)
            .field("keep_cached", &self.keep_cached)
            .finish()
    }
}

/// A started invalidator. A cheap handle: it lives until
/// [`stop`](Self::stop), until its stream stops, or until the tokio runtime
/// it was started on shuts down (its workers run there; it then says it
/// stopped); dropping handles does not stop it. See the [module docs](self).
///
/// Two nodes of one cluster, on an in-process bus: a change on one removes
/// the other's copy.
///
/// ```
/// use std::time::Duration;
/// use nebulex::Cache;
/// use nebulex_streams::{Invalidator, PubSub, Streams};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// let bus = PubSub::memory();
/// let (a, b): (Cache<String, u32>, Cache<String, u32>) =
///     (Cache::builder().name("users").build()?, Cache::builder().name("users").build()?);
/// let _a_streams = Streams::builder(&a).pubsub(bus.clone()).start()?;
/// let b_streams = Streams::builder(&b).pubsub(bus.clone()).start()?;
/// let invalidator = Invalidator::builder(&b_streams).start()?;
///
/// b.put("user:1".to_string(), 30); // b's copy
/// a.put("user:1".to_string(), 31); // a change on node a...
/// tokio::time::timeout(Duration::from_secs(5), async {
///     while b.contains_key("user:1") {
///         tokio::time::sleep(Duration::from_millis(1)).await; // ...removes it on b
///     }
/// })
/// .await?;
/// invalidator.stop();
/// assert!(invalidator.is_stopped());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Invalidator {
    inner: Arc<Inner>,
}

struct Inner {
    stop: watch::Sender<bool>,
    stopped: AtomicBool,
    /// Reports `Stopped` once.
    on_stop: Box<dyn Fn() + Send + Sync>,
}

/// Held by a worker's task: when the task ends, however it ends (its
/// runtime may shut down under it), the invalidator has stopped: a worker
/// gone leaves its partition unguarded, which must not go unsaid.
struct Ended(Arc<Inner>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.finish();
    }
}

impl Inner {
    /// Stops the workers (if they still run) and reports it, once.
    fn finish(&self) {
        if !self.stopped.swap(true, Ordering::AcqRel) {
            self.stop.send_replace(true);
            (self.on_stop)();
        }
    }
}

impl fmt::Debug for Invalidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Invalidator").field("stopped", &self.is_stopped()).finish()
    }
}

impl Invalidator {
    /// Starts building an invalidator over `streams`' events.
    pub fn builder<K>(streams: &Streams<K>) -> InvalidatorBuilder<'_, K> {
        InvalidatorBuilder {
            streams,
            scope: EventScope::Remote,
            policy: DisconnectPolicy::Flush,
            silent_node_window: None,
            keep_cached: false,
        }
    }

    /// Stops every worker: once it returns, no further event is applied (a
    /// worker may still be finishing the one at hand). Stopping twice does
    /// nothing.
    pub fn stop(&self) {
        self.inner.finish();
    }

    /// Whether it was stopped, by [`stop`](Self::stop) or by its stream
    /// stopping (which ends its workers, and reports `Stopped` too). After
    /// the stream stops, this turns true once a worker has seen the end of
    /// its subscription: soon, in the runtime's tasks, not necessarily by
    /// the time `stop()` or `shutdown().await` returns.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::Acquire)
    }
}

impl<K> InvalidatorBuilder<'_, K>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
{
    /// Whose changes invalidate: other nodes' (the default), this node's own,
    /// or all.
    pub fn scope(mut self, scope: EventScope) -> Self {
        self.scope = scope;
        self
    }

    /// What to do when the cluster connection is lost.
    pub fn on_disconnect(mut self, policy: DisconnectPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// For how long, since it was last heard, another node that fell silent
    /// without stopping keeps this one flushing the partitions it was heard
    /// on, every heartbeat (or every `max` with
    /// [`ServeStale`](DisconnectPolicy::ServeStale)). By default
    /// [`SILENT_NODE_HEARTBEATS`](crate::SILENT_NODE_HEARTBEATS) heartbeats
    /// of the stream: 100 s with the default heartbeat.
    ///
    /// A silent node may be cut off from the transport and still writing its
    /// record: its changes go unheard until it is heard again (then its gap
    /// is flushed). A shorter window keeps more of the cache after a node
    /// crashes, and serves stale copies sooner in such a cut: past the
    /// window, what is read stays until the node is heard again. With
    /// `Duration::ZERO`, the partition is flushed once, when the node falls
    /// silent.
    ///
    /// ```
    /// use std::time::Duration;
    /// use nebulex::Cache;
    /// use nebulex_streams::{Invalidator, Streams};
    ///
    /// let cache: Cache<String, u32> = Cache::builder().build()?;
    /// let streams = Streams::builder(&cache).heartbeat(Duration::from_millis(500)).start()?;
    /// let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    /// let _in_runtime = rt.enter();
    /// // A node that crashed costs the others 10 s of flushes, not 50 s.
    /// let _invalidator = Invalidator::builder(&streams).silent_node_window(Duration::from_secs(10)).start()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn silent_node_window(mut self, window: Duration) -> Self {
        self.silent_node_window = Some(window);
        self
    }

    /// Keeps what the cache holds when the invalidator starts, instead of
    /// removing it: for a cache filled from the system of record just
    /// before, while no other node wrote (a change it made meanwhile would
    /// not be heard, and its stale copy would stay until the key's next
    /// change).
    ///
    /// ```
    /// use nebulex::Cache;
    /// use nebulex_streams::{Invalidator, Streams};
    ///
    /// let cache: Cache<String, u32> = Cache::builder().build()?;
    /// cache.put("user:1".to_string(), 30); // read from the system of record
    /// let streams = Streams::builder(&cache).start()?;
    /// let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    /// let _in_runtime = rt.enter();
    /// let _invalidator = Invalidator::builder(&streams).keep_cached().start()?;
    /// assert!(cache.contains_key("user:1"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn keep_cached(mut self) -> Self {
        self.keep_cached = true;
        self
    }

    /// Starts one worker per partition, as tasks on the ambient tokio runtime
    /// ([`Error::NoRuntime`] outside one; [`Error::StreamNotStarted`] if the
    /// stream was stopped).
    ///
    /// First it removes (without events) what the cache holds: it was stored
    /// before the invalidator could hear of other nodes' changes, so nothing
    /// vouches for it; and loads in flight will not store what they read.
    /// Each partition that held entries is reported as a `Resync`. (Unless
    /// [`keep_cached`](Self::keep_cached).)
    pub fn start(self) -> Result<Invalidator, Error> {
        let rt = crate::pubsub::runtime()?;
        let shared = self.streams.shared().clone();
        let subscriptions = (0..shared.count)
            .map(|p| shared.subscribe_partition(p, EventType::ALL.iter().fold(0, |m, t| m | t.bit()), self.scope))
            .collect::<Result<Vec<_>, _>>()?;
        let (stop, stopped) = watch::channel(false);
        let reporter = shared.clone();
        let inner = Arc::new(Inner {
            stop,
            stopped: AtomicBool::new(false),
            on_stop: Box::new(move || reporter.reporter.invalidator(InvalidatorEvent::Stopped)),
        });
        shared.reporter.invalidator(InvalidatorEvent::Started);
        for sub in subscriptions {
            let worker = Worker {
                shared: shared.clone(),
                policy: self.policy,
                silent_node_window: self.silent_node_window,
                remote: self.scope.remote(),
                inner: inner.clone(),
            };
            // What the cache holds was stored before this worker could hear
            // of changes: nothing vouches for it. (Nor for what loads in
            // flight read: they will not store it.)
            let partition = sub.partition();
            if !self.keep_cached {
                worker.guarded(partition, "flushing the partition", || worker.flush_unheard(partition));
            }
            // Not yet connected is an outage too: what is read meanwhile
            // misses the other nodes' changes.
            let flush_at = worker.outage_flush(partition);
            let ended = Ended(inner.clone());
            let stop = stopped.clone();
            rt.spawn(async move {
                worker.run(sub, stop, flush_at).await;
                drop(ended);
            });
        }
        Ok(Invalidator { inner })
    }
}

/// One partition's worker.
struct Worker<K> {
    shared: Arc<StreamShared<K>>,
    policy: DisconnectPolicy,
    /// How long a silent node keeps the partition flushing; `None`: the
    /// stream's default.
    silent_node_window: Option<Duration>,
    /// Whether it acts on other nodes' changes (which an outage hides).
    remote: bool,
    /// The invalidator: its stop signal, and where to say the stream ended.
    inner: Arc<Inner>,
}

impl<K> Worker<K>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
{
    /// Applies the partition's events until the invalidator or its stream
    /// stops. `flush_at`: the next flush, a loss's (deferred by
    /// `ServeStale`) or the next one of an outage.
    async fn run(
        self,
        mut sub: Subscription<K>,
        mut stop: watch::Receiver<bool>,
        mut flush_at: Option<tokio::time::Instant>,
    ) {
        let partition = sub.partition();
        loop {
            // A busy partition neither holds back a flush that is due nor
            // keeps its runtime thread from other tasks.
            tokio::task::coop::consume_budget().await;
            let item = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return,
                // Before the buffer: a flush that is due comes first.
                () = sleep_until(flush_at), if flush_at.is_some() => {
                    self.guarded(partition, "flushing the partition", || self.resync(partition));
                    // While the connection stays down, what was read since is
                    // missing changes too: flush it again, and again.
                    flush_at = self.outage_flush(partition);
                    continue;
                }
                // Receiving reports a loss to the application's logger and
                // recorder: a panic there is a loss of unknown size too.
                item = AssertUnwindSafe(sub.recv()).catch_unwind() => item.unwrap_or_else(|panic| {
                    self.panicked(partition, "receiving", panic.as_ref());
                    Some(Err(Lagged(0)))
                }),
            };
            if *stop.borrow() {
                return;
            }
            match item {
                // The stream stopped: so did the invalidator.
                None => return self.inner.finish(),
                Some(Ok(event)) => {
                    // A panic (in the key's `Hash`, `Eq` or `Drop`, say) may
                    // have left a stale copy: the partition is flushed instead.
                    let worker = &self;
                    let applied = move || {
                        worker.apply(partition, &event);
                        drop(event);
                    };
                    if !self.guarded(partition, "removing an event's keys", applied) {
                        self.guarded(partition, "flushing the partition", || self.resync(partition));
                    }
                }
                Some(Err(Lagged(0))) => match self.policy {
                    DisconnectPolicy::Flush => {
                        self.guarded(partition, "flushing the partition", || self.resync(partition));
                        flush_at = self.outage_flush(partition);
                    }
                    // A flush due sooner covers this loss too.
                    DisconnectPolicy::ServeStale { max } => {
                        let due = later(max);
                        flush_at = Some(flush_at.map_or(due, |at| at.min(due)));
                    }
                },
                Some(Err(Lagged(_))) => {
                    self.guarded(partition, "flushing the partition", || self.resync(partition));
                }
            }
        }
    }

    /// While the connection is down, or another node is silent on the
    /// partition without having stopped, when to flush the partition next:
    /// a heartbeat from now, or `max` if longer with `ServeStale`. (Never
    /// for an invalidator of this node's own changes alone.)
    fn outage_flush(&self, partition: u32) -> Option<tokio::time::Instant> {
        if !self.remote {
            return None;
        }
        let heartbeat = self.shared.outage().or_else(|| self.shared.silence(partition, self.silent_node_window))?;
        Some(later(match self.policy {
            DisconnectPolicy::Flush => heartbeat,
            DisconnectPolicy::ServeStale { max } => max.max(heartbeat),
        }))
    }

    /// Runs `f`, catching a panic so that the worker outlives it (a worker
    /// that died would leave stale copies for good); returns whether `f`
    /// returned.
    fn guarded(&self, partition: u32, what: &str, f: impl FnOnce()) -> bool {
        match std::panic::catch_unwind(AssertUnwindSafe(f)) {
            Ok(()) => true,
            Err(panic) => {
                self.panicked(partition, what, panic.as_ref());
                false
            }
        }
    }

    /// Logs a panic caught while `doing` something, unless the logger
    /// panics too.
    #[cold]
    fn panicked(&self, partition: u32, doing: &str, panic: &(dyn std::any::Any + Send)) {
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
            tracing::error!(target: "nebulex_streams", cache = %self.shared.reporter.cache, partition,
                panic = crate::telemetry::panic_message(panic), "the invalidator panicked {doing}");
        }));
    }

    /// Deletes an event's target from the local cache.
    fn apply(&self, partition: u32, event: &CacheEntryEvent<K>) {
        let reporter = &self.shared.reporter;
        match event.kind {
            // A load elsewhere read the record: nothing changed, and removing
            // copies for it would make nodes that read one hot key empty
            // each other's copy on every miss.
            EventType::Inserted if event.command == Command::Load => {
                reporter.invalidator(InvalidatorEvent::Unhandled { partition, kind: event.kind });
            }
            EventType::Inserted | EventType::Updated | EventType::Deleted => {
                let count = self.shared.cache.invalidate(&event.target);
                if let Ok(lag) = SystemTime::now().duration_since(event.metadata.timestamp) {
                    reporter.propagation(lag.as_secs_f64());
                }
                reporter.invalidator(InvalidatorEvent::Invalidate { partition, count });
            }
            // Expiry and eviction elsewhere say nothing about the data.
            kind @ (EventType::Expired | EventType::Evicted) => {
                reporter.invalidator(InvalidatorEvent::Unhandled { partition, kind });
            }
        }
    }

    /// Deletes every local entry of the partition, and reports it.
    fn resync(&self, partition: u32) {
        let removed = self.flush(partition);
        self.shared.reporter.invalidator(InvalidatorEvent::Resync { partition, count: removed });
    }

    /// Deletes every local entry of the partition, stored before the worker
    /// started; reported if there was any.
    fn flush_unheard(&self, partition: u32) {
        let removed = self.flush(partition);
        if removed > 0 {
            self.shared.reporter.invalidator(InvalidatorEvent::Resync { partition, count: removed });
        }
    }

    /// Deletes every local entry of the partition (all of them with a custom
    /// router, or an unpartitioned stream); loads in flight of those keys
    /// will not store what they read. Returns how many.
    fn flush(&self, partition: u32) -> usize {
        let count = self.shared.count;
        if self.shared.router.is_none() && count > 1 {
            self.shared.cache.invalidate_where(&mut |k| partition_of(k, count) == partition)
        } else {
            self.shared.cache.invalidate_where(&mut |_| true)
        }
    }
}

/// `after` from now, or (if no clock can hold that) so far ahead that it
/// never comes in practice.
fn later(after: Duration) -> tokio::time::Instant {
    const NEVER: Duration = Duration::from_secs(30 * 365 * 24 * 3_600);
    tokio::time::Instant::now() + after.min(NEVER)
}

/// Until `at` (at once if the clock has passed it), or for ever.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) if at <= tokio::time::Instant::now() => {}
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

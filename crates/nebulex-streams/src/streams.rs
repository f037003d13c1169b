//! Streams: a cache's events, routed to partitions and handed to subscribers.

use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nebulex::{Cache, CacheEntryEvent, CacheName, EventFilter, Name, NodeId, Target, WeakCache};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cluster::{self, Cluster, ClusterOptions, Transport};
use crate::error::Error;
use crate::pubsub::{Backoff, PubSub};
use crate::router::{partition_of, Route};
use crate::subscription::{
    ring, unix_nanos, EventScope, Handed, Origin, Premap, RingReader, RingWriter, Routed, SubscribeOptions,
    Subscription, MAX_BUSY_POLL, PREMAPPED_BYTES,
};
use crate::telemetry::{quietly, BroadcastError, ObserverFn, Reporter, Telemetry};

/// The default per-subscriber buffer, in events.
pub const DEFAULT_BUFFER: usize = 16_384;
/// The most partitions a stream can have.
pub const MAX_PARTITIONS: u32 = 4_096;
/// The most events a buffer (a subscriber's, or a partition's outbound one)
/// can hold.
pub const MAX_BUFFER: usize = 1 << 24;
/// The prefix of topic (channel) names: `{prefix}:{cache}:{partition}`.
pub const DEFAULT_PREFIX: &str = "nbx";

pub(crate) type RouterFn<K> = dyn Fn(&CacheEntryEvent<K>) -> Route + Send + Sync;

/// Options of a stream; made by [`Streams::builder`].
///
/// | option | default | refused |
/// |---|---|---|
/// | [`partitions`](Self::partitions) | none: one unpartitioned stream | `0`, more than [`MAX_PARTITIONS`] |
/// | [`hash`](Self::hash) | `stable_hash(key) % partitions` | — |
/// | [`buffer`](Self::buffer) | [`DEFAULT_BUFFER`] events per subscriber | `0`, more than [`MAX_BUFFER`] |
/// | [`broadcast_from`](Self::broadcast_from) | `false` | — |
/// | [`observer`](Self::observer) | none | — |
///
/// With a cluster transport ([`pubsub`](Self::pubsub)):
///
/// | option | default | refused |
/// |---|---|---|
/// | [`prefix`](Self::prefix) | `"nbx"`: channels `nbx:{cache}:{partition}` | empty, with spaces |
/// | [`signing_key`](Self::signing_key) | none: frames unsigned | empty |
/// | [`batch_size`](Self::batch_size) | 512 events per frame | `0` |
/// | [`batch_linger`](Self::batch_linger) | zero: send what is there | above [`MAX_BATCH_LINGER`](crate::MAX_BATCH_LINGER) (1 s) |
/// | [`outbound_buffer`](Self::outbound_buffer) | [`DEFAULT_OUTBOUND_BUFFER`](crate::DEFAULT_OUTBOUND_BUFFER) events per partition | `0`, more than [`MAX_BUFFER`] |
/// | [`max_frame_bytes`](Self::max_frame_bytes) | 1 MiB (NATS's default payload limit) | under 64, or too small for a heartbeat (52 bytes and the cache name, 32 more signed) |
/// | [`backoff`](Self::backoff) | 50 ms doubling up to 5 s | zero, `max < initial`, `max` above [`MAX_BACKOFF`](crate::MAX_BACKOFF) |
/// | [`heartbeat`](Self::heartbeat) | 1 s | below [`MIN_HEARTBEAT`](crate::MIN_HEARTBEAT) (10 ms) |
///
/// ```
/// use nebulex::Cache;
/// use nebulex_streams::{Error, Streams};
///
/// let cache: Cache<String, u32> = Cache::builder().name("users").build()?;
/// let err = Streams::builder(&cache).buffer(0).start().unwrap_err();
/// assert!(matches!(err, Error::InvalidOption(_)));
///
/// let streams = Streams::builder(&cache).partitions(8).buffer(1_024).start()?;
/// assert_eq!(streams.info().partitions, Some(8));
/// assert_eq!(Streams::builder(&cache).start().unwrap_err(), Error::AlreadyStarted);
/// # Ok::<(), nebulex_streams::Error>(())
/// ```
pub struct StreamsBuilder<'a, K, V> {
    cache: &'a Cache<K, V>,
    partitions: Option<u32>,
    router: Option<Box<RouterFn<K>>>,
    buffer: usize,
    broadcast_from: bool,
    observer: Option<Box<ObserverFn<K>>>,
    transport: Option<Transport<K>>,
    cluster: ClusterOptions,
}

impl<K, V> fmt::Debug for StreamsBuilder<'_, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamsBuilder")
            .field("partitions", &self.partitions)
            .field("custom_router", &self.router.is_some())
            .field("buffer", &self.buffer)
            .field("broadcast_from", &self.broadcast_from)
            .field("pubsub", &self.transport.as_ref().map(|t| t.pubsub.describe()))
            .finish_non_exhaustive()
    }
}

impl<'a, K, V> StreamsBuilder<'a, K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Splits the stream into this many partitions, each with its own
    /// subscribers, so events can be handled in parallel. By default every
    /// event of a key goes to the same partition (see [`router`](crate::router)).
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = Some(partitions);
        self
    }

    /// Routes events with this function instead of the key hash: it sees the
    /// whole event and returns a [`Route`] (a partition out of range, or a
    /// panic, is a loss told to every partition's readers). Runs on the
    /// writing thread for every event, while the cache holds the lock of the
    /// key's shard: keep it fast, and do not call the cache or stop the
    /// stream from it (either would wait for that lock for ever).
    ///
    /// ```
    /// use nebulex::{Cache, CacheEntryEvent, Target};
    /// use nebulex_streams::{Route, Streams};
    ///
    /// let cache: Cache<String, u32> = Cache::builder().build()?;
    /// let streams = Streams::builder(&cache)
    ///     .partitions(3)
    ///     .hash(|e: &CacheEntryEvent<String>| match &e.target {
    ///         Target::Key(k) if k.starts_with("user:") => Route::Partition(0),
    ///         Target::Key(k) if k.starts_with("session:") => Route::Partition(1),
    ///         Target::Key(k) if k.starts_with("temp:") => Route::Discard,
    ///         _ => Route::Partition(2),
    ///     })
    ///     .start()?;
    /// # let _ = streams;
    /// # Ok::<(), nebulex_streams::Error>(())
    /// ```
    pub fn hash(mut self, router: impl Fn(&CacheEntryEvent<K>) -> Route + Send + Sync + 'static) -> Self {
        self.router = Some(Box::new(router));
        self
    }

    /// How many events each subscriber's buffer holds before it lags.
    ///
    /// It takes 64 bytes per event for a `u64` or `String` key, mapped when
    /// the subscription is made while the stream's buffers stay within
    /// [`PREMAPPED_BYTES`](crate::PREMAPPED_BYTES) together, and as events
    /// first fill it beyond that.
    pub fn buffer(mut self, events: usize) -> Self {
        self.buffer = events;
        self
    }

    /// When `true`, this node's own subscribers do not receive this node's own
    /// events, only other nodes' (Nebulex's `:broadcast_from`).
    pub fn broadcast_from(mut self, yes: bool) -> Self {
        self.broadcast_from = yes;
        self
    }

    /// Calls `observer` with every [`Telemetry`] report, inline: keep it fast.
    /// The `Broadcast` reports come from within the cache's write, under the
    /// lock of the key's shard: do not call the cache or stop the stream from
    /// the observer (hand the report to another thread for that).
    /// A panic in it is caught and logged (`tracing`, level error), and the
    /// stream carries on.
    pub fn observer(mut self, observer: impl Fn(&Telemetry<K>) + Send + Sync + 'static) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }

    /// The prefix of channel names: `{prefix}:{cache}:{partition}`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.cluster.prefix = prefix.into();
        self
    }

    /// Signs every frame with HMAC-SHA256 under `key`, and refuses frames
    /// that are unsigned or badly signed. Every node must use the same key.
    /// (This node's own frames, which come back to it over Redis, are
    /// ignored before they are checked, and not counted.)
    pub fn signing_key(mut self, key: impl AsRef<[u8]>) -> Self {
        self.cluster.signing_key = Some(Arc::from(key.as_ref()));
        self
    }

    /// The most events in one frame.
    pub fn batch_size(mut self, events: usize) -> Self {
        self.cluster.batch_size = events;
        self
    }

    /// How long the sender waits for more events before sending a frame
    /// that is not full. Zero (the default) sends at once whatever has
    /// accumulated, so a lone event never waits; under load, frames fill
    /// while the previous one is being sent. (Timers have about 1 ms
    /// resolution.) At most [`MAX_BATCH_LINGER`](crate::MAX_BATCH_LINGER):
    /// a stopping stream sends what it holds within a few seconds.
    pub fn batch_linger(mut self, linger: Duration) -> Self {
        self.cluster.batch_linger = linger;
        self
    }

    /// How many events per partition may wait for the network before new
    /// ones are dropped (and counted: receivers see the gap). It takes 64
    /// bytes per event for a `u64` or `String` key, mapped when the stream
    /// starts while the stream's buffers stay within
    /// [`PREMAPPED_BYTES`](crate::PREMAPPED_BYTES) together, and as events
    /// first fill it beyond that.
    pub fn outbound_buffer(mut self, events: usize) -> Self {
        self.cluster.outbound_buffer = events;
        self
    }

    /// The largest frame sent (larger batches are split) and accepted from
    /// the network. Every node should use the same value; NATS servers refuse
    /// payloads over their `max_payload` (1 MiB by default). It must hold a
    /// heartbeat (a frame without events: about 52 bytes and the cache name,
    /// 32 more when signed), which tells the other nodes this one's numbering.
    pub fn max_frame_bytes(mut self, bytes: usize) -> Self {
        self.cluster.max_frame_bytes = bytes;
        self
    }

    /// How often an idle partition tells the other nodes its next sequence
    /// number, so that a lost last frame is seen as a gap within this time.
    ///
    /// An origin silent on a partition for
    /// [`SILENT_HEARTBEATS`](crate::SILENT_HEARTBEATS) of these, without
    /// having stopped, is taken for gone: its unsent events are reported lost
    /// (`Lagged(0)`). While this node's connection is down, an
    /// [`Invalidator`](crate::Invalidator) flushes again every heartbeat.
    /// The nodes of a stream should share this setting. At least
    /// [`MIN_HEARTBEAT`](crate::MIN_HEARTBEAT): a node that cannot keep to a
    /// shorter one, or a connection that cannot carry it, would be taken
    /// for silent, or lost, over and over.
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.cluster.heartbeat = every;
        self
    }

    /// Reconnection delays: `initial`, doubling up to `max` (at most
    /// [`MAX_BACKOFF`](crate::MAX_BACKOFF), an hour).
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.cluster.backoff = Backoff { initial, max };
        self
    }

    /// Starts the stream: from now on the cache's events reach subscribers
    /// (and, with a transport, the other nodes).
    ///
    /// Fails with [`Error::AlreadyStarted`] if the cache has a started stream,
    /// [`Error::InvalidOption`] for a bad option, [`Error::NoRuntime`] if a
    /// transport is set outside a tokio runtime, or [`Error::Transport`] for
    /// a bad URL. Connecting happens in the background: await
    /// [`Streams::ready`] to know the node is subscribed.
    pub fn start(self) -> Result<Streams<K>, Error> {
        let count = match self.partitions {
            Some(0) => return Err(Error::InvalidOption("partitions must be at least 1".into())),
            Some(n) if n > MAX_PARTITIONS => {
                return Err(Error::InvalidOption(format!("partitions must be at most {MAX_PARTITIONS}, got {n}")))
            }
            Some(n) => n,
            None => 1,
        };
        if self.buffer == 0 {
            return Err(Error::InvalidOption("buffer must hold at least 1 event".into()));
        }
        if self.buffer > MAX_BUFFER {
            return Err(Error::InvalidOption(format!(
                "buffer must be at most {MAX_BUFFER} events, got {}",
                self.buffer
            )));
        }
        self.cluster.validate(&self.cache.name())?;
        let cache_name = self.cache.name();
        let prefix = self.cluster.prefix.as_str();
        let topics: Vec<String> = (0..count)
            .map(|p| match self.partitions {
                Some(_) => format!("{prefix}:{cache_name}:{p}"),
                None => format!("{prefix}:{cache_name}"),
            })
            .collect();
        if self.transport.is_some() {
            crate::pubsub::runtime()?;
        }
        let premap = Premap::new(PREMAPPED_BYTES);
        // With a transport, each partition also feeds the cluster's sender.
        let (parts, outbound): (Vec<_>, Vec<_>) = (0..)
            .zip(&topics)
            .map(|(p, topic)| {
                let topic = Name::new(topic);
                let (writer, reader) = match self.transport {
                    Some(_) => {
                        let origin = Origin::new(cache_name, self.cache.node_id(), self.partitions, p, topic);
                        let (writer, reader) =
                            ring(self.cluster.outbound_buffer, u8::MAX, EventScope::Local, origin, &premap);
                        (Some(writer), Some(reader))
                    }
                    None => (None, None),
                };
                let state = PartitionState { seq: 0, subscribers: Vec::new(), outbound: writer };
                (Partition { topic, state: Mutex::new(state) }, reader)
            })
            .unzip();
        let prefix = prefix.to_string();
        let cluster = match self.transport {
            Some(transport) => {
                Some(Cluster::new(transport, self.cluster, topics, outbound.into_iter().flatten().collect()))
            }
            None => None,
        };
        let shared = Arc::new(StreamShared {
            reporter: Reporter::new(cache_name, count, self.observer),
            node: self.cache.node_id(),
            partitions: self.partitions,
            count,
            router: self.router,
            parts: parts.into(),
            buffer: self.buffer,
            premap,
            broadcast_from: self.broadcast_from,
            filter: EventFilter::none(),
            subscribers_lock: Mutex::new(()),
            next_partition: AtomicU32::new(0),
            registered: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            cache: Box::new(self.cache.downgrade()),
            cluster,
            prefix: Name::new(&prefix),
        });
        if self.cache.extensions().get::<StreamSlot<K>>().is_some() {
            return Err(Error::AlreadyStarted);
        }
        // The listener first (its filter lets nothing through yet), then the
        // slot: once the slot makes the stream visible to `lookup`, a `stop`
        // from another thread finds the listener registered and removes it.
        // (A start racing this one to the slot unregisters its listener.)
        let listener = shared.clone();
        self.cache
            .register_event_listener(shared.listener_id(), shared.filter.clone(), move |e| listener.dispatch(e))?;
        shared.registered.store(true, Ordering::Release);
        shared.reporter.listener_registered();
        if self.cache.extensions().try_insert(Arc::new(StreamSlot(shared.clone()))).is_err() {
            shared.cache.detach(&shared);
            return Err(Error::AlreadyStarted);
        }
        // The cache's previous stream may still be sending what it had
        // routed: this one sends once that is done, or the other nodes, who
        // would hear this one's epoch first, would refuse those frames.
        let senders = match self.cache.extensions().get::<cluster::LastSender>() {
            Some(senders) => senders,
            None => {
                let _ = self.cache.extensions().try_insert(Arc::new(cluster::LastSender::default()));
                self.cache.extensions().get::<cluster::LastSender>().unwrap_or_default()
            }
        };
        if let Err(e) = cluster::start_link(&shared, &senders) {
            shared.cache.detach(&shared);
            return Err(e);
        }
        {
            // Serialised with the subscriptions that `lookup` let in
            // meanwhile, which set the filter themselves: one computed
            // before theirs must not land after.
            let _serial = shared.subscribers_lock.lock();
            shared.refresh_filter();
        }
        Ok(Streams { shared })
    }
}

impl<K, V> StreamsBuilder<'_, K, V>
where
    K: Eq + Hash + Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Carries the stream to every node of a cluster through `pubsub`
    /// (Redis, NATS, or the in-process memory bus).
    ///
    /// Caches with the same name and partition count on every node form one
    /// stream: each node's subscribers get its own events directly and every
    /// other node's through the transport. Keys travel through serde, as
    /// MessagePack (see [`wire`](crate::wire)).
    pub fn pubsub(mut self, pubsub: PubSub) -> Self {
        self.transport = Some(Transport {
            pubsub,
            encode: |h, events, key| crate::wire::encode::<K>(h, events, key),
            decode: |bytes, limits| crate::wire::decode::<K>(bytes, limits),
        });
        self
    }
}

/// A started stream of a cache's events. A cheap handle: clone it freely.
///
/// The stream lives until [`stop`](Self::stop) or until the cache is dropped;
/// dropping handles does not stop it. Subscribe with
/// [`StreamsExt::subscribe`] on the cache or [`Streams::subscribe`].
///
/// ```
/// use nebulex::{Cache, EventType};
/// use nebulex_streams::{Streams, StreamsExt, SubscribeOptions};
///
/// let cache: Cache<String, u32> = Cache::builder().name("users").build()?;
/// let streams = Streams::builder(&cache).partitions(4).start()?;
/// let mut sub = cache.subscribe(SubscribeOptions::new().events([EventType::Deleted]).partition(0))?;
/// assert_eq!(streams.info().partitions, Some(4));
/// assert!(Streams::lookup(&cache).is_some());
/// streams.stop();
/// assert!(Streams::lookup(&cache).is_none());
/// assert!(sub.recv_blocking().is_none());
/// # Ok::<(), nebulex_streams::Error>(())
/// ```
pub struct Streams<K> {
    shared: Arc<StreamShared<K>>,
}

impl<K> Clone for Streams<K> {
    fn clone(&self) -> Self {
        Streams { shared: self.shared.clone() }
    }
}

impl<K> fmt::Debug for Streams<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Streams")
            .field("cache", &self.shared.reporter.cache)
            .field("partitions", &self.shared.partitions)
            .field("node", &self.shared.node)
            .field("stopped", &self.shared.stopped.load(Ordering::Relaxed))
            .finish()
    }
}

/// What a stream is: [`Streams::info`].
///
/// ```
/// use nebulex::Cache;
/// use nebulex_streams::Streams;
///
/// let cache: Cache<String, u32> = Cache::builder().name("users").build()?;
/// let info = Streams::builder(&cache).partitions(4).start()?.info();
/// assert_eq!(info.cache, "users");
/// assert_eq!(info.partitions, Some(4));
/// assert_eq!(info.pubsub, None); // no cluster transport
/// assert_eq!(info.connected, None);
/// assert_eq!(info.node, cache.node_id());
/// # Ok::<(), nebulex_streams::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamsInfo {
    /// The cache's name.
    pub cache: CacheName,
    /// The partition count, if partitioned.
    pub partitions: Option<u32>,
    /// The cluster transport, if any (its kind and address, no credentials).
    pub pubsub: Option<String>,
    /// With a cluster transport, whether its connection is up: `false`
    /// before it first is, and while it is lost (what other nodes write
    /// meanwhile is not heard, and an invalidator flushes). For a health
    /// check.
    pub connected: Option<bool>,
    /// This node's id.
    pub node: NodeId,
}

impl<K> Streams<K>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
{
    /// Starts building a stream over `cache`'s events.
    pub fn builder<V>(cache: &Cache<K, V>) -> StreamsBuilder<'_, K, V>
    where
        V: Clone + Send + Sync + 'static,
    {
        StreamsBuilder {
            cache,
            partitions: None,
            router: None,
            buffer: DEFAULT_BUFFER,
            broadcast_from: false,
            observer: None,
            transport: None,
            cluster: ClusterOptions::default(),
        }
    }

    /// The stream started on `cache`, if any.
    pub fn lookup<V>(cache: &Cache<K, V>) -> Option<Streams<K>>
    where
        V: Clone + Send + Sync + 'static,
    {
        cache.extensions().get::<StreamSlot<K>>().map(|slot| Streams { shared: slot.0.clone() })
    }

    /// Subscribes to this stream; see [`SubscribeOptions`].
    pub fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription<K>, Error> {
        self.shared.subscribe(options)
    }

    pub(crate) fn shared(&self) -> &Arc<StreamShared<K>> {
        &self.shared
    }

    /// The stream's metadata.
    pub fn info(&self) -> StreamsInfo {
        StreamsInfo {
            cache: self.shared.reporter.cache,
            partitions: self.shared.partitions,
            pubsub: cluster::describe(&self.shared.cluster),
            connected: self.shared.connected(),
            node: self.shared.node,
        }
    }

    /// Resolves once the stream is connected to its cluster transport and
    /// subscribed to every channel (at once without a transport). Fails with
    /// the transport's error if it cannot connect (the transport keeps
    /// retrying in the background), or [`Error::StreamNotStarted`] if the
    /// stream stops first.
    pub async fn ready(&self) -> Result<(), Error> {
        match &self.shared.cluster {
            Some(cluster) => cluster.ready().await,
            None => Ok(()),
        }
    }

    /// Whether the stream was stopped (or its cache dropped).
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire)
    }

    /// Stops the stream: unregisters its listener and ends every subscription
    /// (each yields `None` once drained). A new stream can then be started on
    /// the cache. Stopping twice does nothing.
    ///
    /// With a cluster transport, events already routed are still sent to the
    /// other nodes (within a few seconds, in the background); await
    /// [`shutdown`](Self::shutdown) instead to wait for that, e.g. before a
    /// process exits. A stream started again on the cache meanwhile sends
    /// once that is done, so the other nodes see the first end cleanly
    /// before the next begins.
    pub fn stop(&self) {
        self.shared.cache.detach(&self.shared);
        self.shared.close();
    }

    /// Stops the stream like [`stop`](Self::stop), then waits until the
    /// events it had routed are sent to the other nodes and its connection
    /// is closed (at most a few seconds, if the transport cannot take them:
    /// what is left is then reported as a transport error). At once without
    /// a cluster transport.
    ///
    /// ```
    /// use nebulex::Cache;
    /// use nebulex_streams::{MemoryBus, Streams};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let bus = MemoryBus::new();
    /// let cache: Cache<String, u32> = Cache::builder().name("users").build()?;
    /// let streams = Streams::builder(&cache).pubsub(bus.into()).start()?;
    /// cache.put("user:1".to_string(), 1);
    /// streams.shutdown().await; // user:1's event has been published
    /// assert!(streams.is_stopped());
    /// # Ok::<(), nebulex_streams::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn shutdown(&self) {
        self.stop();
        if let Some(cluster) = &self.shared.cluster {
            cluster.finished().await;
        }
    }
}

/// Adds [`subscribe`](StreamsExt::subscribe) to [`Cache`], like
/// `use Nebulex.Streams` does to a Nebulex cache.
///
/// ```
/// use nebulex::Cache;
/// use nebulex_streams::{Error, Streams, StreamsExt, SubscribeOptions};
///
/// let cache: Cache<String, u32> = Cache::builder().build()?;
/// assert!(cache.streams().is_none());
/// assert_eq!(cache.subscribe(SubscribeOptions::new()).unwrap_err(), Error::StreamNotStarted);
///
/// Streams::builder(&cache).start()?;
/// let mut sub = cache.subscribe(SubscribeOptions::new())?;
/// cache.put("user:1".to_string(), 1);
/// assert!(sub.try_recv().is_ok());
/// assert!(cache.streams().is_some_and(|s| !s.is_stopped()));
/// # Ok::<(), nebulex_streams::Error>(())
/// ```
pub trait StreamsExt<K> {
    /// Subscribes to the stream started on this cache.
    ///
    /// Fails with [`Error::StreamNotStarted`] if there is none,
    /// [`Error::EmptyEventFilter`], [`Error::NotPartitioned`],
    /// [`Error::PartitionOutOfRange`] or [`Error::InvalidOption`] (a
    /// [`busy_poll`](SubscribeOptions::busy_poll) above
    /// [`MAX_BUSY_POLL`](crate::MAX_BUSY_POLL)) for bad options.
    fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription<K>, Error>;

    /// The stream started on this cache, if any.
    fn streams(&self) -> Option<Streams<K>>;
}

impl<K, V> StreamsExt<K> for Cache<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription<K>, Error> {
        Streams::lookup(self).ok_or(Error::StreamNotStarted)?.subscribe(options)
    }

    fn streams(&self) -> Option<Streams<K>> {
        Streams::lookup(self)
    }
}

/// What the cache holds for its stream: dropping it (at `stop`, or with the
/// cache) closes the stream.
struct StreamSlot<K>(Arc<StreamShared<K>>);

impl<K> Drop for StreamSlot<K> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The stream's cache, without its value type, held weakly.
pub(crate) trait LocalCache<K>: Send + Sync {
    /// Removes the stream's slot and listener from the cache.
    fn detach(&self, shared: &Arc<StreamShared<K>>);
    /// Removes the target's entries without events; returns how many.
    fn invalidate(&self, target: &Target<K>) -> usize;
    /// Removes, without events, every entry whose key `pred` selects.
    fn invalidate_where(&self, pred: &mut dyn FnMut(&K) -> bool) -> usize;
}

impl<K, V> LocalCache<K> for WeakCache<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn detach(&self, shared: &Arc<StreamShared<K>>) {
        let Some(cache) = self.upgrade() else { return };
        if shared.registered.swap(false, Ordering::AcqRel) {
            cache.unregister_event_listener(&shared.listener_id());
            shared.reporter.listener_unregistered();
        }
        // Dropping the slot (outside the extensions' lock) closes the stream.
        drop(cache.extensions().remove_if::<StreamSlot<K>>(|slot| Arc::ptr_eq(&slot.0, shared)));
    }

    fn invalidate(&self, target: &Target<K>) -> usize {
        let Some(cache) = self.upgrade() else { return 0 };
        match target {
            Target::Key(k) => usize::from(cache.invalidate(k)),
            Target::Keys(ks) => ks.iter().filter(|k| cache.invalidate(*k)).count(),
            Target::All => cache.invalidate_where(|_| true),
        }
    }

    fn invalidate_where(&self, pred: &mut dyn FnMut(&K) -> bool) -> usize {
        self.upgrade().map_or(0, |cache| cache.invalidate_where(pred))
    }
}

pub(crate) struct Partition<K> {
    pub(crate) topic: Name,
    /// Numbering and subscribers. Writers number an event and hand it over
    /// under this lock, so every buffer receives the partition's events in
    /// sequence order.
    pub(crate) state: Mutex<PartitionState<K>>,
}

pub(crate) struct PartitionState<K> {
    /// The last sequence number given out.
    pub(crate) seq: u64,
    pub(crate) subscribers: Vec<RingWriter<K>>,
    /// Events waiting to be sent to the other nodes (with a transport).
    pub(crate) outbound: Option<RingWriter<K>>,
}

/// The state a stream's handles, listener and subscriptions share.
pub(crate) struct StreamShared<K> {
    pub(crate) reporter: Reporter<K>,
    pub(crate) node: NodeId,
    pub(crate) partitions: Option<u32>,
    pub(crate) count: u32,
    pub(crate) router: Option<Box<RouterFn<K>>>,
    pub(crate) parts: Box<[Partition<K>]>,
    pub(crate) buffer: usize,
    /// What is left of the memory its buffers may map when made.
    premap: Premap,
    broadcast_from: bool,
    /// The cache listener's filter: the union of what subscribers want.
    filter: EventFilter,
    subscribers_lock: Mutex<()>,
    next_partition: AtomicU32,
    registered: AtomicBool,
    pub(crate) stopped: AtomicBool,
    pub(crate) cache: Box<dyn LocalCache<K>>,
    pub(crate) cluster: Option<Cluster<K>>,
    /// The prefix of topic names.
    prefix: Name,
}

impl<K> StreamShared<K>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
{
    fn listener_id(self: &Arc<Self>) -> String {
        format!("nebulex_streams:{:p}", Arc::as_ptr(self))
    }

    /// The cache listener: routes one event to its partition(s). A key
    /// whose `Hash` or `Clone` panics as it is routed sends the event to no
    /// partition, as a router that panics does.
    fn dispatch(&self, event: &CacheEntryEvent<K>) {
        if self.broadcast_from && self.cluster.is_none() {
            return;
        }
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.route(event))) {
            let message = crate::telemetry::panic_message(panic.as_ref()).to_owned();
            self.misrouted(BroadcastError::KeyPanicked(message.clone()), event);
            quietly(|| {
                tracing::error!(target: "nebulex_streams", cache = %self.reporter.cache, panic = %message,
                    "a key's Hash or Clone panicked as its event was routed; the event goes to no partition");
            });
        }
    }

    /// Routes one event to its partition(s): [`dispatch`](Self::dispatch)
    /// without its guard.
    fn route(&self, event: &CacheEntryEvent<K>) {
        if let Some(router) = &self.router {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| router(event))) {
                Ok(Route::Discard) => {}
                Ok(Route::Partition(p)) if p < self.count => self.deliver(p, event, || event.target.clone()),
                Ok(Route::Partition(p)) => {
                    self.misrouted(BroadcastError::PartitionOutOfRange { partition: p, partitions: self.count }, event)
                }
                Err(panic) => {
                    let message = crate::telemetry::panic_message(panic.as_ref()).to_owned();
                    // The readers first: the logger may panic too.
                    self.misrouted(BroadcastError::RouterPanicked(message.clone()), event);
                    quietly(|| {
                        tracing::error!(target: "nebulex_streams", cache = %self.reporter.cache,
                            panic = %message, "the router panicked; the event goes to no partition");
                    });
                }
            }
            return;
        }
        if self.count == 1 {
            return self.deliver(0, event, || event.target.clone());
        }
        match &event.target {
            Target::Key(k) => self.deliver(partition_of(k, self.count), event, || Target::Key(k.clone())),
            Target::Keys(keys) => {
                let mut split: Vec<Vec<K>> = vec![Vec::new(); self.count as usize];
                for k in keys {
                    split[partition_of(k, self.count) as usize].push(k.clone());
                }
                for (p, keys) in split.into_iter().enumerate().filter(|(_, ks)| !ks.is_empty()) {
                    self.deliver(p as u32, event, || Target::Keys(keys));
                }
            }
            Target::All => (0..self.count).for_each(|p| self.deliver(p, event, || Target::All)),
        }
    }

    /// Hands an event to the subscribers of partition `p` that want it, and
    /// to the cluster's outbound buffer.
    #[inline]
    fn deliver(&self, p: u32, event: &CacheEntryEvent<K>, target: impl FnOnce() -> Target<K>) {
        let Some(part) = self.parts.get(p as usize) else { return };
        let kind = event.kind;
        let keep = self.reporter.wants_events();
        let (kept, outbound_full, subscribers_full) = {
            let mut state = part.state.lock();
            let state = &mut *state;
            let wanting =
                if self.broadcast_from { 0 } else { state.subscribers.iter().filter(|r| r.wants_local(kind)).count() };
            let receivers = wanting + usize::from(state.outbound.is_some());
            if receivers == 0 {
                return;
            }
            // (Before the number is taken: a key's `Clone` that panics here
            // is a loss told by the caller, on every partition.)
            let target = target();
            state.seq += 1;
            let routed = Routed {
                kind,
                command: event.command,
                target,
                version: event.version,
                seq: state.seq,
                timestamp: unix_nanos(event.metadata.timestamp),
            };
            // A sole receiver takes only what varies (its reader rebuilds the
            // event); several share one. The last one takes the writer's
            // reference: once handed over, the writer touches it no more.
            let (mut owned, mut shared, kept) = if receivers == 1 && !keep {
                (Some(routed), None, None)
            } else {
                let routed = Arc::new(routed.into_event(&self.origin(p, part)));
                (None, Some(routed.clone()), keep.then_some(routed))
            };
            let mut hand = |ring: &mut RingWriter<K>, left: &mut usize| {
                *left -= 1;
                let event = match owned.take() {
                    Some(event) => Some(Handed::Owned(event)),
                    None if *left == 0 => shared.take().map(Handed::Shared),
                    None => shared.clone().map(Handed::Shared),
                };
                event.is_some_and(|e| ring.push(e))
            };
            let mut left = receivers;
            let outbound_full = match state.outbound.as_mut() {
                Some(o) => (!hand(o, &mut left)).then(|| o.capacity()),
                None => None,
            };
            let subscribers_full = if wanting > 0 {
                let mut full = 0;
                for r in state.subscribers.iter_mut().filter(|r| r.wants_local(kind)) {
                    full += usize::from(!hand(r, &mut left));
                }
                full
            } else {
                0
            };
            (kept, outbound_full, subscribers_full)
        };
        if let Some(capacity) = outbound_full {
            let reason = BroadcastError::Transport(format!("outbound buffer of {capacity} events is full"));
            self.reporter.broadcast_error(part.topic, kept.as_ref(), reason);
        }
        for _ in 0..subscribers_full {
            let reason = BroadcastError::SubscriberFull { capacity: self.buffer };
            self.reporter.broadcast_error(part.topic, kept.as_ref(), reason);
        }
        // Every receiver took it: the local subscribers that want it, and
        // the cluster's outbound buffer.
        if outbound_full.is_none() && subscribers_full == 0 {
            self.reporter.broadcast_ok(p, part.topic, kind, kept.as_ref());
        }
    }

    /// An event went to no partition: a custom router answered one that
    /// does not exist, or panicked, or the key panicked as it was routed.
    /// The report's topic is the stream's own (`{prefix}:{cache}`): names
    /// are interned for good, and a router's bad answers are unbounded.
    #[cold]
    fn misrouted(&self, reason: BroadcastError, event: &CacheEntryEvent<K>) {
        // It reaches no partition, and might have been any one's: a loss of
        // unknown size for every reader that wants its type, and for the
        // other nodes a number no frame carries (a gap at the partition's
        // next frame or heartbeat).
        for part in self.parts.iter() {
            let mut state = part.state.lock();
            if state.outbound.is_some() {
                state.seq += 1;
            }
            if !self.broadcast_from {
                state.subscribers.iter().filter(|r| r.wants_local(event.kind)).for_each(|r| r.push_lost(0));
            }
        }
        let topic = Name::new(&format!("{}:{}", self.prefix, self.reporter.cache));
        let event = self.reporter.wants_events().then(|| Arc::new(event.clone()));
        self.reporter.broadcast_error(topic, event.as_ref(), reason);
    }

    /// What every event of partition `p` has in common.
    fn origin(&self, p: u32, part: &Partition<K>) -> Origin {
        Origin::new(self.reporter.cache, self.node, self.partitions, p, part.topic)
    }

    fn subscribe(self: &Arc<Self>, options: SubscribeOptions) -> Result<Subscription<K>, Error> {
        let busy_poll = match options.busy_poll {
            Some(budget) if budget > MAX_BUSY_POLL => {
                return Err(Error::InvalidOption(format!(
                    "busy_poll is at most {MAX_BUSY_POLL:?} (a receive holds its thread that long), got {budget:?}"
                )))
            }
            Some(budget) if budget.is_zero() => None,
            budget => budget,
        };
        let mask = match options.events {
            Some(0) => return Err(Error::EmptyEventFilter),
            Some(mask) => mask,
            None => EventFilter::all().mask(),
        };
        let partition = match (options.partition, self.partitions) {
            (Some(_), None) => return Err(Error::NotPartitioned),
            (Some(partition), Some(partitions)) if partition >= partitions => {
                return Err(Error::PartitionOutOfRange { partition, partitions })
            }
            (Some(p), Some(_)) => p,
            (None, _) => self.next_partition.fetch_add(1, Ordering::Relaxed) % self.count,
        };
        let sub = self.subscribe_partition(partition, mask, options.scope.unwrap_or(EventScope::All))?;
        Ok(sub.with_busy_poll(busy_poll))
    }

    /// Subscribes to partition `partition` (in range).
    pub(crate) fn subscribe_partition(
        self: &Arc<Self>,
        partition: u32,
        mask: u8,
        scope: EventScope,
    ) -> Result<Subscription<K>, Error> {
        let origin = self.origin(partition, &self.parts[partition as usize]);
        let (writer, reader) = ring(self.buffer, mask, scope, origin, &self.premap);
        {
            let _serial = self.subscribers_lock.lock();
            if self.stopped.load(Ordering::Acquire) {
                return Err(Error::StreamNotStarted);
            }
            self.parts[partition as usize].state.lock().subscribers.push(writer);
            self.refresh_filter();
        }
        Ok(Subscription::new(reader, partition, self.clone()))
    }
}

impl<K> StreamShared<K> {
    pub(crate) fn unsubscribe(&self, partition: u32, ring: &RingReader<K>) {
        let _serial = self.subscribers_lock.lock();
        if let Some(part) = self.parts.get(partition as usize) {
            part.state.lock().subscribers.retain(|w| !w.feeds(ring));
        }
        self.refresh_filter();
    }

    /// Tells the cache which event types anyone wants now. Called with
    /// `subscribers_lock` held, so that two calls cannot set their masks in
    /// the other order than they computed them.
    pub(crate) fn refresh_filter(&self) {
        let mask = if self.stopped.load(Ordering::Acquire) {
            0
        } else if self.cluster.is_some() {
            EventFilter::all().mask()
        } else if self.broadcast_from {
            0
        } else {
            self.parts
                .iter()
                .flat_map(|p| {
                    p.state.lock().subscribers.iter().filter(|r| r.scope.local()).map(|r| r.mask).collect::<Vec<_>>()
                })
                .fold(0, |m, r| m | r)
        };
        self.filter.set_mask(mask);
    }

    /// Ends every subscription; idempotent.
    fn close(&self) {
        let unregistered = {
            let _serial = self.subscribers_lock.lock();
            if self.stopped.swap(true, Ordering::AcqRel) {
                return;
            }
            self.filter.set_mask(0);
            if let Some(cluster) = &self.cluster {
                cluster.close();
            }
            for part in self.parts.iter() {
                for ring in part.state.lock().subscribers.iter() {
                    ring.close();
                }
            }
            // Closed with its cache (not by `detach`): the listener went with it.
            self.registered.swap(false, Ordering::AcqRel)
        };
        // Reported once no lock is held: the observer may subscribe, or drop
        // a subscription.
        if unregistered {
            self.reporter.listener_unregistered();
        }
    }
}

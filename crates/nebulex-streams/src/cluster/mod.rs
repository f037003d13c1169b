//! The cluster side of a stream: batching this node's events into frames for
//! the transport, and turning other nodes' frames back into events.
//!
//! # Outbound
//!
//! The cache listener pushes each routed event into its partition's outbound
//! buffer (bounded: a full one drops the event and counts it, so a writer
//! never waits for the network). One task per stream drains the buffers,
//! packs each partition's events into frames of at most `batch_size` events
//! and hands them to the transport. Events are numbered per (node, epoch,
//! partition) as the stream routes them (the same `seq` local subscribers
//! see), so events the buffer dropped, or frames the transport lost, leave
//! a jump in the numbers that receivers see. Batching is natural: whatever accumulated while the previous
//! batch was being sent goes in the next one, so a lone event waits for
//! nothing (unless `batch_linger` asks to wait for company).
//!
//! An idle partition sends a heartbeat — an empty frame carrying its next
//! sequence number — every `heartbeat` (1 s by default), and every
//! partition does at once when the stream starts or hears a node it did not
//! know: so the loss of a burst's last frame is still seen as a gap, within
//! one heartbeat, and a new node learns everyone's numbering at once.
//!
//! When the stream stops (or its cache is dropped), the sender first sends
//! what the buffers still hold, then a last heartbeat per partition, within
//! [`STOP_FLUSH_TIMEOUT`]; only then does it close the connection. A node
//! that dies without stopping loses what it had not sent yet.
//!
//! # Inbound
//!
//! Each frame is decoded and checked (size, version, signature, cache,
//! partition count, channel); a refused frame is counted with its reason
//! and dropped. Own frames are ignored. A jump in an origin's sequence
//! numbers is a gap: the partition's subscribers get `Lagged(n)` and `Gap`
//! telemetry fires. A lost connection is a gap of unknown size on every
//! partition (`Lagged(0)`), and each origin's next jump is still counted.
//!
//! Here: the cluster state of a started stream and its connection. The
//! sender task is in `outbound`; the checks a frame passes, gaps and
//! silences in `inbound`; where a receiver stands with each origin in
//! `origins`.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use nebulex::{CacheEntryEvent, NodeId};
use parking_lot::Mutex;
use tokio::sync::watch;

mod inbound;
mod origins;
mod outbound;

use origins::Origins;
pub use origins::{FORGOTTEN_ORIGINS, MAX_ORIGINS_PER_PARTITION};
use outbound::{send_loop, Sender};

use crate::error::Error;
use crate::pubsub::{Backoff, Hooks, Link, LinkConfig, PubSub};
use crate::streams::StreamShared;
use crate::subscription::RingReader;
use crate::wire::{unix_micros, DecodeLimits, Frame, FrameHeader, RejectReason, DEFAULT_MAX_FRAME_BYTES};

/// The default most events in one frame.
pub const DEFAULT_BATCH_SIZE: usize = 512;
/// The default period of heartbeats on idle partitions.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
/// The default outbound buffer per partition, in events.
pub const DEFAULT_OUTBOUND_BUFFER: usize = 16_384;

pub(crate) type EncodeFn<K> = fn(&FrameHeader, &[Arc<CacheEntryEvent<K>>], Option<&[u8]>) -> Result<Vec<u8>, String>;
pub(crate) type DecodeFn<K> = fn(&[u8], &DecodeLimits<'_>) -> Result<Frame<K>, RejectReason>;

/// A stream's cluster transport and the key type's frame codec.
pub(crate) struct Transport<K> {
    pub(crate) pubsub: PubSub,
    pub(crate) encode: EncodeFn<K>,
    pub(crate) decode: DecodeFn<K>,
}

/// The cluster options of a stream, as the builder collects them (whether
/// they come before or after the transport).
pub(crate) struct ClusterOptions {
    pub(crate) prefix: String,
    pub(crate) signing_key: Option<Arc<[u8]>>,
    pub(crate) batch_size: usize,
    pub(crate) batch_linger: Duration,
    pub(crate) outbound_buffer: usize,
    pub(crate) max_frame_bytes: usize,
    pub(crate) backoff: Backoff,
    pub(crate) heartbeat: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            prefix: crate::streams::DEFAULT_PREFIX.to_string(),
            signing_key: None,
            batch_size: DEFAULT_BATCH_SIZE,
            batch_linger: Duration::ZERO,
            outbound_buffer: DEFAULT_OUTBOUND_BUFFER,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            backoff: Backoff::default(),
            heartbeat: DEFAULT_HEARTBEAT,
        }
    }
}

impl ClusterOptions {
    /// Checks the options of a stream of cache `cache`.
    pub(crate) fn validate(&self, cache: &str) -> Result<(), Error> {
        let invalid = |m: String| Err(Error::InvalidOption(m));
        if self.batch_size == 0 {
            return invalid("batch_size must be at least 1".into());
        }
        if self.outbound_buffer == 0 {
            return invalid("outbound_buffer must hold at least 1 event".into());
        }
        if self.outbound_buffer > crate::streams::MAX_BUFFER {
            return invalid(format!(
                "outbound_buffer must be at most {} events, got {}",
                crate::streams::MAX_BUFFER,
                self.outbound_buffer
            ));
        }
        if self.max_frame_bytes < 64 {
            return invalid(format!("max_frame_bytes must be at least 64, got {}", self.max_frame_bytes));
        }
        // Receivers refuse what is larger: a heartbeat that is would leave
        // them deaf to this node's numbering, and so to its losses.
        let heartbeat = largest_heartbeat(cache, self.signing_key.as_deref());
        if self.max_frame_bytes < heartbeat {
            return invalid(format!(
                "max_frame_bytes must hold a heartbeat of cache `{cache}`'s stream ({heartbeat} bytes{}), got {}",
                if self.signing_key.is_some() { ", signed" } else { "" },
                self.max_frame_bytes
            ));
        }
        if self.prefix.is_empty() || self.prefix.contains(char::is_whitespace) {
            return invalid(format!("prefix must be non-empty without spaces, got `{}`", self.prefix));
        }
        if self.backoff.initial.is_zero() || self.backoff.max < self.backoff.initial {
            return invalid("backoff needs 0 < initial <= max".into());
        }
        if self.backoff.max > MAX_BACKOFF {
            return invalid(format!("backoff max must be at most {MAX_BACKOFF:?}, got {:?}", self.backoff.max));
        }
        if self.heartbeat < MIN_HEARTBEAT {
            return invalid(format!("heartbeat must be at least {MIN_HEARTBEAT:?}, got {:?}", self.heartbeat));
        }
        if self.batch_linger > MAX_BATCH_LINGER {
            return invalid(format!("batch_linger must be at most {MAX_BATCH_LINGER:?}, got {:?}", self.batch_linger));
        }
        if self.signing_key.as_ref().is_some_and(|k| k.is_empty()) {
            return invalid("signing_key must not be empty".into());
        }
        Ok(())
    }
}

/// The size of the largest heartbeat (a frame without events) of a stream
/// of cache `cache`: every number at its widest.
fn largest_heartbeat(cache: &str, signing_key: Option<&[u8]>) -> usize {
    let header = FrameHeader {
        origin: NodeId(u64::MAX),
        epoch: u64::MAX,
        cache: cache.to_owned(),
        partition: u32::MAX,
        partitions: u32::MAX,
        first_seq: u64::MAX,
        sent_at_us: u64::MAX,
        last: true,
    };
    let none: &[Arc<CacheEntryEvent<()>>] = &[];
    crate::wire::encode(&header, none, signing_key).map_or(usize::MAX, |frame| frame.len())
}

/// A started stream's cluster state.
pub(crate) struct Cluster<K> {
    pub(crate) describe: String,
    encode: EncodeFn<K>,
    decode: DecodeFn<K>,
    signing_key: Option<Arc<[u8]>>,
    max_frame_bytes: usize,
    batch_size: usize,
    batch_linger: Duration,
    /// This stream's epoch: it grows with each start (see [`new_epoch`]), so
    /// receivers tell a restarted node's numbering from the old one's, and
    /// refuse replays of older frames.
    epoch: u64,
    /// Per partition: the reading half of the events waiting to be sent,
    /// taken by the sender task when it starts.
    outbound: Mutex<Vec<RingReader<K>>>,
    link: OnceLock<Arc<dyn Link>>,
    ready: watch::Receiver<Option<Result<(), Error>>>,
    ready_tx: crate::pubsub::Ready,
    /// Where each origin's numbering stands.
    seen: Mutex<Origins>,
    /// Per partition: the send time (µs since the Unix epoch) of the last
    /// frame made. Each frame's is later, so that a receiver refuses a
    /// replayed heartbeat (whose sequence number is still current).
    sent_us: Box<[AtomicU64]>,
    link_up: AtomicBool,
    /// How often an idle partition sends a heartbeat.
    heartbeat: Duration,
    /// Wakes the sender to announce every partition to a new node.
    hello: Arc<tokio::sync::Notify>,
    /// Whether the link was ever up (its first `Up` is no recovery).
    ever_up: AtomicBool,
    /// The sender task ended by a panic: the link stays down for good,
    /// whatever the receiving side says.
    broken: AtomicBool,
    /// When the link first came up (or a frame first came): this node has
    /// listened since.
    first_up: OnceLock<Instant>,
    shutdown: watch::Sender<bool>,
    /// Ends (its sender dropped) once the sender task has finished: flushed
    /// and closed the link after a stop, or was dropped with its runtime.
    sender_done: OnceLock<watch::Receiver<()>>,
    /// The options kept for `start_link`.
    pubsub: PubSub,
    channels: Vec<String>,
    backoff: Backoff,
}

impl<K> Cluster<K> {
    pub(crate) fn new(
        transport: Transport<K>,
        options: ClusterOptions,
        channels: Vec<String>,
        outbound: Vec<RingReader<K>>,
    ) -> Self {
        let (ready_tx, ready) = watch::channel(None);
        Cluster {
            describe: transport.pubsub.describe(),
            encode: transport.encode,
            decode: transport.decode,
            signing_key: options.signing_key,
            max_frame_bytes: options.max_frame_bytes,
            batch_size: options.batch_size,
            batch_linger: options.batch_linger,
            epoch: new_epoch(),
            outbound: Mutex::new(outbound),
            link: OnceLock::new(),
            ready,
            ready_tx,
            seen: Mutex::new(Origins::default()),
            sent_us: channels.iter().map(|_| AtomicU64::new(0)).collect(),
            link_up: AtomicBool::new(false),
            heartbeat: options.heartbeat,
            hello: Arc::default(),
            ever_up: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            first_up: OnceLock::new(),
            shutdown: watch::channel(false).0,
            sender_done: OnceLock::new(),
            pubsub: transport.pubsub,
            channels,
            backoff: options.backoff,
        }
    }

    /// A send time for the next frame of partition `p`: now, in µs since the
    /// Unix epoch, or just after the partition's last one if the clock
    /// stepped back (or has not moved).
    fn send_time(&self, p: usize) -> u64 {
        let now = unix_micros(SystemTime::now());
        let Some(last) = self.sent_us.get(p) else { return now };
        let next = |l: u64| now.max(l.saturating_add(1));
        last.fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| Some(next(l))).map_or(now, next)
    }

    /// Resolves once the sender task has finished (after a stop: sent what
    /// was buffered and closed the connection); at once if it never ran.
    pub(crate) async fn finished(&self) {
        if let Some(done) = self.sender_done.get() {
            let mut done = done.clone();
            // Nothing is ever sent: this ends when the task drops its half.
            while done.changed().await.is_ok() {}
        }
    }

    /// Resolves once every channel is subscribed, or with the transport's error.
    pub(crate) async fn ready(&self) -> Result<(), Error> {
        let mut ready = self.ready.clone();
        let outcome = ready.wait_for(|r| r.is_some()).await.map_err(|_| Error::StreamNotStarted)?;
        outcome.clone().unwrap_or(Err(Error::StreamNotStarted))
    }

    /// Tells the sender task to send what is buffered and close the
    /// connection (see [`send_loop`]).
    pub(crate) fn close(&self) {
        self.shutdown.send_replace(true);
        self.ready_tx.send_if_modified(|r| {
            let unset = r.is_none();
            if unset {
                *r = Some(Err(Error::StreamNotStarted));
            }
            unset
        });
    }
}

/// An epoch for a stream starting now: milliseconds since the Unix epoch in
/// the high 48 bits (so a node's epochs grow across restarts), random low
/// bits; and above every epoch this process gave before, so that a stream
/// restarted within the same millisecond is not taken for a replay of the
/// last one.
fn new_epoch() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let millis = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let now = (millis << 16) | (NodeId::random().0 & 0xffff);
    let (Ok(last) | Err(last)) =
        LAST.fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| Some(now.max(last.wrapping_add(1))));
    now.max(last.wrapping_add(1))
}

/// Heartbeats (of this node's period: a stream's nodes should share it) an
/// origin may miss before the receiver takes it for gone without stopping,
/// and reports a possible loss on the partition.
pub const SILENT_HEARTBEATS: u32 = 5;

/// Heartbeats, from when a node that fell silent without stopping was last
/// heard, for which an [`Invalidator`](crate::Invalidator) goes on flushing
/// the partitions it was heard on, unless
/// [`silent_node_window`](crate::InvalidatorBuilder::silent_node_window)
/// says otherwise.
pub const SILENT_NODE_HEARTBEATS: u32 = 100;

/// Connects a started stream to its transport and starts its sender task.
pub(crate) fn start_link<K>(shared: &Arc<StreamShared<K>>, senders: &LastSender) -> Result<(), Error>
where
    K: Send + Sync + 'static,
{
    let Some(cluster) = shared.cluster.as_ref() else { return Ok(()) };
    let rt = crate::pubsub::runtime()?;
    let weak = Arc::downgrade(shared);
    let on_state = weak.clone();
    let hooks = Arc::new(Hooks {
        on_frame: Box::new(move |index, bytes| {
            if let Some(shared) = weak.upgrade() {
                // What was half done is a loss: the frame's partition says so.
                if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| shared.on_frame(index, bytes))) {
                    shared.panicked(index as u32, "handling a frame", panic.as_ref());
                }
            }
        }),
        on_state: Box::new(move |state| {
            if let Some(shared) = on_state.upgrade() {
                // (Every reader is told before the reports, which may panic:
                // the application's logger or recorder; NATS calls this from
                // its client's event task, which must outlive that.)
                let _ = std::panic::catch_unwind(AssertUnwindSafe(|| shared.on_link_state(state)));
            }
        }),
    });
    let link = cluster.pubsub.open(LinkConfig {
        node: shared.node,
        channels: cluster.channels.clone(),
        backoff: cluster.backoff,
        hooks,
        liveness: cluster.heartbeat.saturating_mul(SILENT_HEARTBEATS),
        ready: cluster.ready_tx.clone(),
    })?;
    let _ = cluster.link.set(link.clone());
    let (done, sender_done) = watch::channel(());
    let previous = senders.0.lock().replace(sender_done.clone());
    let _ = cluster.sender_done.set(sender_done);
    let sender = Sender { link: link.clone(), _done: done };
    let (guard, stop) = (shared.clone(), cluster.shutdown.subscribe());
    rt.spawn(async move {
        use futures::FutureExt;
        // Dropped unfinished, its runtime shut down: nothing is sent nor
        // heard any more (the receiving tasks went with it), and unless the
        // stream was stopping, no one else will say so.
        let abandoned = Abandoned(Some(guard.clone()));
        if let Some(mut previous) = previous {
            // (It ends within its flush timeout: nothing is ever sent on it.)
            let done = async { while previous.changed().await.is_ok() {} };
            let _ = tokio::time::timeout(STOP_FLUSH_TIMEOUT + Duration::from_secs(1), done).await;
        }
        let sent = AssertUnwindSafe(send_loop(guard.clone(), sender, stop)).catch_unwind().await;
        abandoned.defuse();
        // Nothing is sent any more (the link closed with the task): the
        // connection is down, for good.
        if let Err(panic) = sent {
            guard.sender_panicked(panic.as_ref());
        }
    });
    Ok(())
}

/// The sender of a cache's last clustered stream (a cache extension): the
/// next stream of the cache starts sending once it has ended.
#[derive(Default)]
pub(crate) struct LastSender(parking_lot::Mutex<Option<watch::Receiver<()>>>);

/// The sender task's stream while the task runs: if the task is dropped
/// before it ends (its runtime shut down), the link is down for good, unless
/// the stream was stopping.
struct Abandoned<K>(Option<Arc<StreamShared<K>>>);

impl<K> Abandoned<K> {
    /// The task ended: nothing to tell.
    fn defuse(mut self) {
        self.0 = None;
    }
}

impl<K> Drop for Abandoned<K> {
    fn drop(&mut self) {
        let Some(shared) = self.0.take() else { return };
        if shared.cluster.as_ref().is_some_and(|c| !*c.shutdown.borrow()) {
            shared.sender_gone("was dropped unfinished (its runtime shut down)");
        }
    }
}

/// The shortest heartbeat a stream may have: shorter ones cannot be kept to
/// on a busy machine, nor carried by every connection, and a node that
/// misses a few heartbeats is taken for silent.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(10);

/// The longest a sender may wait for more events before it sends a frame
/// (see `StreamsBuilder::batch_linger`).
pub const MAX_BATCH_LINGER: Duration = Duration::from_secs(1);

/// The longest delay between reconnection attempts [`Backoff`] may ask for.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3_600);

/// How long a stopping stream may take to send what its buffers hold.
pub(crate) const STOP_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether this stream has a cluster transport, for `info`.
pub(crate) fn describe<K>(cluster: &Option<Cluster<K>>) -> Option<String> {
    cluster.as_ref().map(|c| c.describe.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pubsub::LinkState;
    use crate::Streams;

    /// A sender task that panicked sends nothing: an "up" that a receiving
    /// task reports afterwards (it may be reconnecting while the link
    /// closes) does not make the connection up again.
    #[test]
    fn epochs_grow_with_each_start_even_within_a_millisecond() {
        let epochs: Vec<u64> = (0..10_000).map(|_| new_epoch()).collect();
        assert!(epochs.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[tokio::test]
    async fn a_link_whose_sender_panicked_is_never_up_again() {
        let cache: nebulex::Cache<u64, u64> = nebulex::Cache::builder().name("broken").build().unwrap();
        let streams = Streams::builder(&cache).pubsub(PubSub::memory()).start().unwrap();
        tokio::time::timeout(Duration::from_secs(10), streams.ready()).await.expect("ready in time").unwrap();
        let shared = streams.shared();
        assert_eq!(shared.connected(), Some(true));

        shared.sender_panicked(&"boom");
        assert_eq!(shared.connected(), Some(false), "down once the sender is gone");
        shared.on_link_state(LinkState::Up);
        assert_eq!(shared.connected(), Some(false), "up again with no sender");
    }
}

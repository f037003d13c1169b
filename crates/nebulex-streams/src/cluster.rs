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

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use nebulex::{CacheEntryEvent, NodeId};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::error::Error;
use crate::pubsub::{Backoff, Hooks, Link, LinkConfig, LinkState, PubSub};
use crate::streams::StreamShared;
use crate::subscription::{Handed, RingReader};
use crate::telemetry::panic_message;
use crate::wire::{clip, unix_micros, DecodeLimits, Frame, FrameHeader, RejectReason, DEFAULT_MAX_FRAME_BYTES};

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
    pub(crate) fn validate(&self) -> Result<(), Error> {
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
        if self.prefix.is_empty() || self.prefix.contains(char::is_whitespace) {
            return invalid(format!("prefix must be non-empty without spaces, got `{}`", self.prefix));
        }
        if self.backoff.initial.is_zero() || self.backoff.max < self.backoff.initial {
            return invalid("backoff needs 0 < initial <= max".into());
        }
        if self.backoff.max > MAX_BACKOFF {
            return invalid(format!("backoff max must be at most {MAX_BACKOFF:?}, got {:?}", self.backoff.max));
        }
        if self.heartbeat.is_zero() {
            return invalid("heartbeat must be longer than zero".into());
        }
        if self.signing_key.as_ref().is_some_and(|k| k.is_empty()) {
            return invalid("signing_key must not be empty".into());
        }
        Ok(())
    }
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
/// the high 48 bits (so a node's epochs grow across restarts), random low bits.
fn new_epoch() -> u64 {
    let millis = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    (millis << 16) | (NodeId::random().0 & 0xffff)
}

/// Earlier epochs of an origin that a receiver remembers besides its
/// current one, with where each one's numbering stood when it was left:
/// frames of those stay refused as replays, even after the origin came back
/// with a lower epoch (its clock was set back), unless one of them goes on
/// from where it stood (then the lower epoch was a replay: see `resume`).
const EARLIER_EPOCHS: usize = 4;

/// An epoch an origin left, and where it stood then.
#[derive(Clone, Copy)]
struct Left {
    epoch: u64,
    /// The next sequence number it expected.
    next: u64,
    /// The send time of its last frame taken.
    sent_us: u64,
    /// It had not ended cleanly: it may go on.
    open: bool,
}

/// Where an origin's numbering on a partition stands, for a receiver.
#[derive(Clone, Copy)]
struct Seen {
    epoch: u64,
    /// The epochs it left, latest first (the current one, closed, until it
    /// restarts).
    earlier: [Left; EARLIER_EPOCHS],
    /// The next sequence number expected.
    next: u64,
    /// Its last frame said the origin's stream stopped cleanly (`last`).
    ended: bool,
    /// When a frame of it last arrived.
    heard: Instant,
    /// The send time of the last frame taken (0: none had one): a frame sent
    /// no later is a replay.
    sent_us: u64,
    /// Silent too long, and reported as a possible loss already.
    silent: bool,
}

impl Seen {
    fn new(epoch: u64, next: u64, now: Instant) -> Self {
        Seen {
            epoch,
            earlier: [Left { epoch, next, sent_us: 0, open: false }; EARLIER_EPOCHS],
            next,
            ended: false,
            heard: now,
            silent: false,
            sent_us: 0,
        }
    }

    /// Whether the origin's stream is gone: it stopped cleanly, or fell silent.
    fn gone(&self) -> bool {
        self.ended || self.silent
    }

    /// The current epoch, as it is left.
    fn leaving(&self) -> Left {
        Left { epoch: self.epoch, next: self.next, sent_us: self.sent_us, open: !self.ended }
    }

    /// The origin's stream started again in `epoch`, numbered from 1.
    fn restart(&mut self, epoch: u64, now: Instant) {
        let mut earlier = self.earlier;
        earlier.rotate_right(1);
        earlier[0] = self.leaving();
        *self = Seen { earlier, ..Seen::new(epoch, 1, now) };
    }

    /// Whether a frame of `h` goes on with the epoch left at `earlier[i]`: a
    /// later epoch than the current one, not ended, from where its numbering
    /// stood, sent after its last frame taken (not a replay of it).
    fn goes_on(&self, i: usize, h: &FrameHeader) -> bool {
        let left = self.earlier[i];
        left.open
            && h.epoch > self.epoch
            && h.first_seq >= left.next
            && (left.sent_us == 0 || h.sent_at_us > left.sent_us)
    }

    /// The epoch it left at `earlier[i]` goes on: back to it, from where its
    /// numbering stood (what was sent meanwhile is then a gap of known
    /// size), leaving the current one.
    fn resume(&mut self, i: usize, now: Instant) {
        let left = self.earlier[i];
        let mut earlier = self.earlier;
        earlier[i] = self.leaving();
        *self = Seen { earlier, sent_us: left.sent_us, ..Seen::new(left.epoch, left.next, now) };
    }

    /// Where the epoch it left, if it did, is among those kept.
    fn left(&self, epoch: u64) -> Option<usize> {
        self.earlier.iter().position(|l| l.epoch == epoch)
    }
}

/// An origin on one partition.
type OriginKey = (NodeId, u32);

/// Where a receiver stands with the origins it heard.
#[derive(Default)]
struct Origins {
    /// Per (origin, partition): where its numbering stands.
    heard: HashMap<OriginKey, Seen>,
    /// The last [`FORGOTTEN_ORIGINS`] forgotten, each with the number it was
    /// forgotten as (only the latest of a key counts in `order`). An origin
    /// heard again is judged from where it stood, so a frame of it captured
    /// earlier is still a replay once it is forgotten.
    forgotten: HashMap<OriginKey, (Seen, u64)>,
    /// The forgotten keys, oldest first, with their numbers.
    order: VecDeque<(OriginKey, u64)>,
    /// Numbers handed to the forgotten, in order.
    forgets: u64,
}

impl Origins {
    /// Where `key` stands, if it is heard or among the last forgotten (then
    /// heard again).
    fn recall(&mut self, key: OriginKey) -> Option<&mut Seen> {
        if let Some((seen, _)) = self.forgotten.remove(&key) {
            self.heard.insert(key, seen);
        }
        self.heard.get_mut(&key)
    }

    /// Forgets the origins that `keep` does not keep, remembering the last
    /// [`FORGOTTEN_ORIGINS`] of them.
    fn forget(&mut self, mut keep: impl FnMut(&Seen) -> bool) {
        let Origins { heard, forgotten, order, forgets } = self;
        heard.retain(|&key, seen| {
            if keep(seen) {
                return true;
            }
            *forgets += 1;
            forgotten.insert(key, (*seen, *forgets));
            order.push_back((key, *forgets));
            false
        });
        while forgotten.len() > FORGOTTEN_ORIGINS || order.len() > 2 * FORGOTTEN_ORIGINS {
            let Some((key, number)) = order.pop_front() else { break };
            if forgotten.get(&key).is_some_and(|&(_, n)| n == number) {
                forgotten.remove(&key);
            }
        }
    }
}

/// How many forgotten (origin, partition) pairs a receiver keeps on (about
/// 250 bytes each), the last forgotten: heard again, one of those is judged
/// from where it stood, so a frame of it captured earlier and replayed is
/// still refused. An origin forgotten before these is heard again as for
/// the first time.
pub const FORGOTTEN_ORIGINS: usize = 4096;

/// How many times a quarter heartbeat a sender greets new nodes at once
/// (heartbeats on every partition); more wait for the next quarter.
const HELLO_BURST: u32 = 4;

/// About how many frames a sender's pass publishes at most, shared between
/// the partitions.
const FRAMES_PER_PASS: usize = 64;

/// Heartbeats (of this node's period: a stream's nodes should share it) an
/// origin may miss before the receiver takes it for gone without stopping,
/// and reports a possible loss on the partition.
pub const SILENT_HEARTBEATS: u32 = 5;

/// Heartbeats after which an origin that stopped cleanly is forgotten (and
/// kept on among the last [`FORGOTTEN_ORIGINS`] forgotten).
const FORGET_HEARTBEATS: u32 = 100;

/// Heartbeats, from when a node that fell silent without stopping was last
/// heard, for which an [`Invalidator`](crate::Invalidator) goes on flushing
/// the partitions it was heard on, unless
/// [`silent_node_window`](crate::InvalidatorBuilder::silent_node_window)
/// says otherwise.
pub const SILENT_NODE_HEARTBEATS: u32 = 100;

/// How long an origin that fell silent without stopping is remembered (at
/// least [`FORGET_HEARTBEATS`] heartbeats): if it is heard again meanwhile,
/// with the same epoch, what it sent while unheard is a gap of known size.
/// (Forgetting it sooner would take its next frame for a first one.)
const FORGET_SILENT: Duration = Duration::from_secs(24 * 3600);

/// The milliseconds since the Unix epoch when the stream of `epoch` started.
fn started_ms(epoch: u64) -> u64 {
    epoch >> 16
}

impl<K> Cluster<K> {
    /// Whether this node has listened since the stream that sent a frame
    /// started. Judged by two durations, each on its own node's clock, so
    /// that clocks set apart do not matter: that stream has run for less
    /// (the frame's send time less its epoch's start, by the origin's clock)
    /// than this node has listened (by its own). A frame without a usable
    /// send time (0, or before its epoch's start) is judged by the two
    /// streams' start times instead.
    fn listened_since_start(&self, h: &FrameHeader, now: Instant) -> bool {
        let (started, sent) = (started_ms(h.epoch), h.sent_at_us / 1_000);
        if h.sent_at_us == 0 || sent < started {
            return started > started_ms(self.epoch);
        }
        let listened = now.saturating_duration_since(*self.first_up.get_or_init(|| now));
        Duration::from_millis(sent - started) < listened
    }
}

/// Connects a started stream to its transport and starts its sender task.
pub(crate) fn start_link<K>(shared: &Arc<StreamShared<K>>) -> Result<(), Error>
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
                shared.on_link_state(state);
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
    let _ = cluster.sender_done.set(sender_done);
    let sender = Sender { link: link.clone(), _done: done };
    let (guard, stop) = (shared.clone(), cluster.shutdown.subscribe());
    rt.spawn(async move {
        use futures::FutureExt;
        let sent = AssertUnwindSafe(send_loop(guard.clone(), sender, stop)).catch_unwind().await;
        // Nothing is sent any more (the link closed with the task): the
        // connection is down, for good.
        if let Err(panic) = sent {
            guard.sender_panicked(panic.as_ref());
        }
    });
    Ok(())
}

/// The longest delay between reconnection attempts [`Backoff`] may ask for.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3_600);

/// How long a stopping stream may take to send what its buffers hold.
pub(crate) const STOP_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The sender task's link: closed when the task ends, however it ends
/// (which also drops `_done`, telling [`Cluster::finished`]).
struct Sender {
    link: Arc<dyn Link>,
    _done: watch::Sender<()>,
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.link.close();
    }
}

/// Why the sender woke up.
enum Wake<K> {
    /// An outbound item of a partition.
    Item(usize, Result<Arc<CacheEntryEvent<K>>, crate::Lagged>),
    /// Time to check for idle partitions.
    Tick,
    /// A new node appeared: tell it where every partition stands.
    Hello,
}

/// Drains the outbound buffers into frames until the stream stops, and
/// keeps idle partitions' numbering known to the other nodes with
/// heartbeats (empty frames). On stop, sends what is left ([`flush`]), then
/// closes the link.
///
/// It holds the stream until then: a stream always stops (by `stop()`, or
/// when its cache is dropped), and what it buffered must still be sent.
async fn send_loop<K>(s: Arc<StreamShared<K>>, sender: Sender, mut stop: watch::Receiver<bool>)
where
    K: Send + Sync + 'static,
{
    let link = &sender.link;
    let Some(cluster) = s.cluster.as_ref() else { return };
    let mut outbound = std::mem::take(&mut *cluster.outbound.lock());
    let (heartbeat, hello) = (cluster.heartbeat, cluster.hello.clone());
    let count = outbound.len();
    // Announce every partition at once: nodes already running learn our numbering.
    let mut last_sent: Vec<Option<Instant>> = vec![None; count];
    let quarter = (heartbeat / 4).max(Duration::from_millis(1));
    let mut tick = tokio::time::interval(quarter);
    let mut checked = Instant::now();
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Each pass starts at the next partition and takes at most a share of
    // the frames from each: a busy partition does not starve the others.
    let share = (FRAMES_PER_PASS / count.max(1)).max(1);
    let mut start = 0;
    // New nodes are greeted at once, but at most `HELLO_BURST` times a
    // quarter heartbeat (then at the next quarter): frames of a stream of
    // made-up origins do not make this node heartbeat every partition for
    // each.
    let (mut hello_due, mut hellos, mut hello_window) = (false, 0, Instant::now());
    loop {
        start = (start + 1) % count.max(1);
        let wake = {
            let any = std::future::poll_fn(|cx| {
                for p in (start..count).chain(0..start) {
                    if let Poll::Ready(Some(item)) = outbound[p].poll_recv(cx) {
                        return Poll::Ready((p, item));
                    }
                }
                Poll::Pending
            });
            tokio::select! {
                biased;
                // (Not `changed`: a stop before this task subscribed counts too.)
                () = stopped(&mut stop) => return flush(&s, &mut outbound, link.as_ref()).await,
                (p, item) = any => Wake::Item(p, item),
                _ = hello.notified() => Wake::Hello,
                _ = tick.tick() => Wake::Tick,
            }
        };
        let mut frames = Vec::new();
        // (Not on ticks alone: a busy sender's ticks wait behind its items.)
        if checked.elapsed() >= quarter {
            checked = Instant::now();
            s.check_silence();
        }
        hello_due |= matches!(wake, Wake::Hello);
        if let Wake::Item(first_p, first) = wake {
            if !cluster.batch_linger.is_zero() {
                tokio::time::sleep(cluster.batch_linger).await;
            }
            let mut pending: Vec<Vec<Arc<CacheEntryEvent<K>>>> = vec![Vec::new(); count];
            s.accept(first_p, first, &mut pending[first_p], &mut frames);
            for p in (start..count).chain(0..start) {
                let before = frames.len();
                while frames.len() - before < share {
                    let Some(item) = outbound[p].try_next() else { break };
                    s.accept(p, item, &mut pending[p], &mut frames);
                }
            }
            for (p, events) in pending.iter_mut().enumerate() {
                frames.extend(s.seal(p, events));
            }
        }
        let now = Instant::now();
        // No heartbeats while the link is down: no node would hear them, and
        // every partition is announced again once it is up.
        let beat = cluster.link_up.load(Ordering::Acquire);
        // (Three quarters of one: this pass may run a little after its tick.)
        if now.duration_since(hello_window) >= quarter * 3 / 4 {
            (hellos, hello_window) = (0, now);
        }
        let hello = beat && hello_due && hellos < HELLO_BURST;
        if hello {
            (hello_due, hellos) = (false, hellos + 1);
        }
        for ((p, last), ring) in last_sent.iter_mut().enumerate().zip(&outbound) {
            if frames.iter().any(|(fp, _)| *fp == p) {
                *last = Some(now);
            } else if beat && (hello || last.is_none_or(|at| now.duration_since(at) >= heartbeat)) {
                if let Some(frame) = s.heartbeat(p, ring.has_stash(), false) {
                    frames.push(frame);
                    *last = Some(now);
                }
            }
        }
        publish(&s, link.as_ref(), frames).await;
    }
}

/// Until the stream stops (or its stop signal is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Publishes frames, reporting those the transport could not send.
async fn publish<K>(s: &StreamShared<K>, link: &dyn Link, frames: Vec<(usize, Arc<[u8]>)>) {
    if frames.is_empty() {
        return;
    }
    let sent = frames.len();
    let failed = link.publish(frames).await;
    if failed > 0 {
        s.reporter.transport_error(failed, sent);
    }
}

/// After a stop: sends every event the outbound buffers hold, then a
/// heartbeat per partition (so that receivers can tell whether the last
/// frame arrived), giving up after [`STOP_FLUSH_TIMEOUT`] (what is left is
/// reported as a transport error).
async fn flush<K>(s: &StreamShared<K>, outbound: &mut [RingReader<K>], link: &dyn Link)
where
    K: Send + Sync + 'static,
{
    let mut frames = Vec::new();
    for (p, ring) in outbound.iter_mut().enumerate() {
        let mut pending = Vec::new();
        while let Some(item) = ring.try_next() {
            s.accept(p, item, &mut pending, &mut frames);
        }
        frames.extend(s.seal(p, &mut pending));
    }
    // Marked last: receivers then know this numbering ended cleanly.
    frames.extend((0..outbound.len()).filter_map(|p| s.heartbeat(p, false, true)));
    let total = frames.len();
    let deadline = tokio::time::Instant::now() + STOP_FLUSH_TIMEOUT;
    let mut left = frames.into_iter().peekable();
    while left.peek().is_some() {
        let batch: Vec<_> = left.by_ref().take(FLUSH_BATCH).collect();
        let sent = batch.len();
        if tokio::time::timeout_at(deadline, publish(s, link, batch)).await.is_err() {
            let unsent = sent + left.count();
            tracing::warn!(target: "nebulex_streams", frames = unsent, "stopped before the last frames were sent");
            s.reporter.transport_error(unsent, total);
            return;
        }
    }
    // What the transport's client still holds would go with the connection.
    if tokio::time::timeout_at(deadline, link.flush()).await.is_err() {
        tracing::warn!(target: "nebulex_streams", frames = total, "stopped before the last frames were written");
    }
}

/// Frames per publish when flushing after a stop.
const FLUSH_BATCH: usize = 64;

impl<K> StreamShared<K> {
    /// While another node is silent on partition `p` without having stopped,
    /// for at most `window` since it was last heard (by default
    /// [`SILENT_NODE_HEARTBEATS`] heartbeats): it may be alive and writing,
    /// cut off from the transport, so what this node reads misses its
    /// changes. The heartbeat period, as for an outage.
    pub(crate) fn silence(&self, p: u32, window: Option<Duration>) -> Option<Duration> {
        let cluster = self.cluster.as_ref()?;
        let limit = window.unwrap_or(cluster.heartbeat.saturating_mul(SILENT_NODE_HEARTBEATS));
        let now = Instant::now();
        let silent = cluster.seen.lock().heard.iter().any(|(&(_, partition), e)| {
            partition == p && e.silent && !e.ended && now.saturating_duration_since(e.heard) < limit
        });
        silent.then_some(cluster.heartbeat)
    }

    /// While this node's cluster connection is down (or not yet up): the
    /// heartbeat period, within which what it misses should be acted on.
    pub(crate) fn outage(&self) -> Option<Duration> {
        let cluster = self.cluster.as_ref()?;
        (!cluster.link_up.load(Ordering::Acquire)).then_some(cluster.heartbeat)
    }

    /// Adds one outbound item of partition `p` to its pending frame. A frame
    /// holds consecutive sequence numbers: it is sealed when full, and before
    /// a jump (events the outbound buffer dropped), which receivers then see
    /// as a gap.
    fn accept(
        &self,
        p: usize,
        item: Result<Arc<CacheEntryEvent<K>>, crate::Lagged>,
        pending: &mut Vec<Arc<CacheEntryEvent<K>>>,
        frames: &mut Vec<(usize, Arc<[u8]>)>,
    ) {
        let batch_size = self.cluster.as_ref().map_or(1, |c| c.batch_size);
        match item {
            Ok(event) => {
                let follows = pending.last().is_none_or(|last| last.metadata.seq.wrapping_add(1) == event.metadata.seq);
                if !follows || pending.len() >= batch_size {
                    frames.extend(self.seal(p, pending));
                }
                pending.push(event);
            }
            Err(_) => frames.extend(self.seal(p, pending)),
        }
    }

    /// Hands a remote node's events to this node's subscribers of the partition.
    fn deliver_remote(&self, frame: Frame<K>) {
        let Some(part) = self.parts.get(frame.header.partition as usize) else { return };
        let events: Vec<Arc<CacheEntryEvent<K>>> =
            frame.into_events(self.reporter.cache, part.topic).into_iter().map(Arc::new).collect();
        let mut dropped = Vec::new();
        {
            let mut state = part.state.lock();
            for event in &events {
                for ring in state.subscribers.iter_mut().filter(|r| r.wants_remote(event.kind)) {
                    if !ring.push(Handed::Shared(event.clone())) {
                        dropped.push(event.clone());
                    }
                }
            }
        }
        for event in dropped {
            let reason = crate::telemetry::BroadcastError::SubscriberFull { capacity: self.buffer };
            self.reporter.broadcast_error(part.topic, Some(&event), reason);
        }
    }

    /// An empty frame carrying the next sequence number of an idle partition
    /// (none if events are waiting to be sent, in the buffer or set aside by
    /// the sender: their frame will tell).
    fn heartbeat(&self, p: usize, stashed: bool, last: bool) -> Option<(usize, Arc<[u8]>)> {
        let part = self.parts.get(p)?;
        let next = {
            // Writers number and enqueue under this lock: with the buffer
            // empty, every number up to `seq` was sent (or dropped).
            let state = part.state.lock();
            if stashed || !state.outbound.as_ref()?.is_empty() {
                return None;
            }
            state.seq + 1
        };
        self.encode(p, next, &[], last)
    }

    /// Encodes `events` of partition `p` (consecutive sequence numbers) as one frame.
    /// Frames larger than `max_frame_bytes` are split in halves, since
    /// receivers (and NATS) refuse them; an event too large on its own is lost
    /// (and reported), and receivers see the gap.
    fn seal(&self, p: usize, events: &mut Vec<Arc<CacheEntryEvent<K>>>) -> Vec<(usize, Arc<[u8]>)> {
        let mut frames = Vec::new();
        self.seal_within_limit(p, events, &mut frames);
        events.clear();
        frames
    }

    fn seal_within_limit(&self, p: usize, events: &[Arc<CacheEntryEvent<K>>], frames: &mut Vec<(usize, Arc<[u8]>)>) {
        let (Some(first), Some(cluster)) = (events.first(), self.cluster.as_ref()) else { return };
        let Some(frame) = self.encode(p, first.metadata.seq, events, false) else { return };
        if frame.1.len() <= cluster.max_frame_bytes {
            frames.push(frame);
        } else if events.len() > 1 {
            let (head, tail) = events.split_at(events.len() / 2);
            self.seal_within_limit(p, head, frames);
            self.seal_within_limit(p, tail, frames);
        } else {
            self.reporter.encode_error(&format!(
                "an event of {} bytes exceeds max_frame_bytes = {}",
                frame.1.len(),
                cluster.max_frame_bytes
            ));
        }
    }

    /// Encodes a frame of partition `p` starting at `first_seq`.
    fn encode(
        &self,
        p: usize,
        first_seq: u64,
        events: &[Arc<CacheEntryEvent<K>>],
        last: bool,
    ) -> Option<(usize, Arc<[u8]>)> {
        let cluster = self.cluster.as_ref()?;
        let header = FrameHeader {
            origin: self.node,
            epoch: cluster.epoch,
            cache: self.reporter.cache.to_string(),
            partition: p as u32,
            partitions: self.partitions.unwrap_or(0),
            first_seq,
            sent_at_us: cluster.send_time(p),
            last,
        };
        // A key's `Serialize` that panics must not end the sender task.
        let encoded = std::panic::catch_unwind(AssertUnwindSafe(|| {
            (cluster.encode)(&header, events, cluster.signing_key.as_deref())
        }))
        .unwrap_or_else(|panic| Err(format!("serializing a key panicked: {}", panic_message(panic.as_ref()))));
        match encoded {
            Ok(bytes) => Some((p, Arc::from(bytes))),
            Err(e) => {
                // A key that cannot be serialized: the frame is lost, and
                // receivers see the gap.
                self.reporter.encode_error(&e);
                None
            }
        }
    }

    /// A frame with this node's id, of stream `epoch`: our own, echoed back
    /// (or our earlier stream's), which local subscribers already had; or,
    /// from a stream started after ours, another node using our id (its
    /// events would pass for our echoes), which is reported.
    fn own_id_frame(&self, epoch: u64) {
        if self.cluster.as_ref().is_some_and(|c| epoch > c.epoch) {
            self.reporter.frame_rejected(&RejectReason::SameNodeId { epoch });
        }
    }

    /// A frame arrived on the channel of partition `index`.
    pub(crate) fn on_frame(&self, index: usize, bytes: &[u8]) {
        let Some(cluster) = self.cluster.as_ref() else { return };
        // Our own frames, echoed back, are dropped before any work. With a
        // signing key, a frame of our id and another epoch is checked first:
        // a forged one is refused as such, not taken for our earlier stream
        // nor for another node with our id.
        let own_epoch = crate::wire::peek_origin_epoch(bytes).filter(|(o, _)| *o == self.node).map(|(_, e)| e);
        if let Some(epoch) = own_epoch.filter(|e| *e == cluster.epoch || cluster.signing_key.is_none()) {
            return self.own_id_frame(epoch);
        }
        let limits = DecodeLimits {
            max_frame_bytes: if cluster.max_frame_bytes == 0 {
                DEFAULT_MAX_FRAME_BYTES
            } else {
                cluster.max_frame_bytes
            },
            signing_key: cluster.signing_key.as_deref(),
        };
        // A key's `Deserialize` that panics on what the network sent must
        // not end the task that receives.
        let decoded =
            std::panic::catch_unwind(AssertUnwindSafe(|| (cluster.decode)(bytes, &limits))).unwrap_or_else(|panic| {
                Err(RejectReason::Malformed(format!("deserializing a key panicked: {}", panic_message(panic.as_ref()))))
            });
        let frame = match decoded {
            Ok(frame) => frame,
            Err(reason) => return self.reporter.frame_rejected(&reason),
        };
        let h = &frame.header;
        if h.origin == self.node {
            return self.own_id_frame(h.epoch);
        }
        let expected = self.partitions.unwrap_or(0);
        let reason = if *h.cache != *self.reporter.cache {
            Some(RejectReason::ForeignCache { got: clip(&h.cache), expected: self.reporter.cache.to_string() })
        } else if h.partitions != expected {
            Some(RejectReason::PartitionCount { got: h.partitions, expected })
        } else if h.partition as usize != index {
            Some(RejectReason::WrongPartition { got: h.partition, expected: index as u32 })
        } else {
            None
        };
        if let Some(reason) = reason {
            return self.reporter.frame_rejected(&reason);
        }
        let (partition, origin) = (h.partition, h.origin);
        let frame_len = frame.events.len() as u64;
        let now = Instant::now();
        // Losses, told to the readers at once (before the frame's events),
        // reported once the state is updated and the frame delivered: the
        // reports go through the application's observer, logger and
        // recorder, and one that panics must not leave this origin's frames
        // taken for gaps, again and again.
        let mut gaps = Vec::new();
        {
            let mut seen = cluster.seen.lock();
            let key = (h.origin, partition);
            if !seen.heard.contains_key(&key) {
                // A node we have not heard from lately: tell it where we stand.
                cluster.hello.notify_one();
            }
            let entry = match seen.recall(key) {
                Some(entry) => entry,
                None => {
                    // If we have listened since its stream started, we heard
                    // from its first number (1): a later one means frames
                    // were lost.
                    let first = if cluster.listened_since_start(h, now) { 1 } else { h.first_seq };
                    seen.heard.entry(key).or_insert(Seen::new(h.epoch, first, now))
                }
            };
            if h.epoch != entry.epoch {
                // Epochs grow with each start of a node's stream (its start
                // time is in them): a lower one is from before its restart,
                // a replay. Unless the stream it would replace is gone and
                // the epoch was never seen: a node whose clock was set back
                // restarted, and refusing it would leave its writes unheard.
                // An epoch it already left stays a replay either way, unless
                // it is the later one and goes on from where it was left:
                // then its stream never stopped, and the lower epoch followed
                // since was a replay (of a frame never heard here, while
                // the origin was silent). Back to it: the frames it sent
                // meanwhile, refused, are a gap of known size.
                let left = entry.left(h.epoch);
                match left {
                    Some(i) if entry.goes_on(i, h) => entry.resume(i, now),
                    _ if left.is_some() || (h.epoch < entry.epoch && !entry.gone()) => {
                        let current = entry.epoch;
                        drop(seen);
                        return self.reporter.frame_rejected(&RejectReason::OldEpoch { epoch: h.epoch, current });
                    }
                    _ => {
                        // The origin restarted its stream: a new numbering.
                        // Unless the old one ended cleanly (or its loss was
                        // reported when it fell silent), its last events may
                        // be lost.
                        cluster.hello.notify_one();
                        if !entry.gone() {
                            self.notify_loss(partition, 0);
                            gaps.push(0);
                        }
                        entry.restart(h.epoch, now);
                    }
                }
            }
            let next = entry.next;
            // Sequence numbers catch a replayed frame of events; a replayed
            // heartbeat (whose number is still the next one) is caught by
            // its send time, which the origin makes later with each frame.
            if h.first_seq < next {
                drop(seen);
                return self.reporter.frame_rejected(&RejectReason::Replayed { seq: h.first_seq, expected: next });
            }
            if frame_len == 0 && h.sent_at_us != 0 && h.sent_at_us <= entry.sent_us {
                let last_us = entry.sent_us;
                drop(seen);
                return self.reporter.frame_rejected(&RejectReason::Resent { sent_at_us: h.sent_at_us, last_us });
            }
            if h.first_seq > next {
                // Also after this node's connection was lost: what the origin
                // published meanwhile was told as `Lagged(0)`, but the jump
                // may include more, lost since, so its count is told too.
                let missed = h.first_seq - next;
                self.notify_loss(partition, missed);
                gaps.push(missed);
            }
            entry.next = h.first_seq.wrapping_add(frame_len);
            entry.sent_us = entry.sent_us.max(h.sent_at_us);
            entry.heard = now;
            entry.silent = false;
            entry.ended = h.last;
        }
        self.deliver_remote(frame);
        for missed in gaps {
            self.reporter.gap(partition, Some(origin), missed);
        }
    }

    /// A panic while `doing` something for partition `partition` (in our
    /// code, or in the application's logger or recorder it calls): what was
    /// half done is a loss of unknown size on the partition.
    #[cold]
    fn panicked(&self, partition: u32, doing: &str, panic: &(dyn std::any::Any + Send)) {
        self.notify_loss(partition, 0);
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
            tracing::error!(target: "nebulex_streams", cache = %self.reporter.cache, partition,
                panic = panic_message(panic), "panicked {doing}: a loss of unknown size");
            self.reporter.gap(partition, None, 0);
        }));
    }

    /// The sender task ended by a panic: nothing is sent any more, so the
    /// connection is down for good (every partition has a gap, and an
    /// invalidator keeps flushing), rather than silently deaf and mute.
    #[cold]
    fn sender_panicked(&self, panic: &(dyn std::any::Any + Send)) {
        let message = panic_message(panic).to_owned();
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
            tracing::error!(target: "nebulex_streams", cache = %self.reporter.cache, panic = %message,
                "the cluster sender task panicked: the link is down for good");
        }));
        let down = LinkState::Down(format!("the sender task panicked: {message}"));
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| self.on_link_state(down)));
    }

    /// Reports a possible loss (`Lagged(0)`), once, on each partition whose
    /// origin has been silent for [`SILENT_HEARTBEATS`] heartbeats without
    /// having stopped cleanly: it died, or cannot reach the transport, and
    /// what it had not sent is lost. (Not while this node's own link is down:
    /// that loss is reported already.)
    fn check_silence(&self) {
        let Some(cluster) = self.cluster.as_ref() else { return };
        if !cluster.link_up.load(Ordering::Acquire) {
            return;
        }
        let limit = cluster.heartbeat.saturating_mul(SILENT_HEARTBEATS);
        let forget = cluster.heartbeat.saturating_mul(FORGET_HEARTBEATS);
        let forget_silent = forget.max(FORGET_SILENT);
        let now = Instant::now();
        let mut silent = Vec::new();
        let mut seen = cluster.seen.lock();
        for (&(origin, partition), e) in seen.heard.iter_mut() {
            if !e.gone() && now.saturating_duration_since(e.heard) >= limit {
                e.silent = true;
                silent.push((origin, partition));
            }
        }
        // Origins long gone are forgotten, so that nodes coming and going
        // with new ids do not grow the map.
        seen.forget(|e| {
            let quiet = now.saturating_duration_since(e.heard);
            (!e.ended || quiet < forget) && (!e.silent || quiet < forget_silent)
        });
        drop(seen);
        // Every reader first, then the reports.
        for &(_, partition) in &silent {
            self.notify_loss(partition, 0);
        }
        for (origin, partition) in silent {
            tracing::warn!(target: "nebulex_streams", cache = %self.reporter.cache, node = %origin, partition,
                "a node fell silent without stopping: its unsent events are lost");
            self.reporter.gap(partition, Some(origin), 0);
        }
    }

    /// Tells partition `p`'s subscribers of remote events about a loss.
    fn notify_loss(&self, partition: u32, missed: u64) {
        if let Some(part) = self.parts.get(partition as usize) {
            for ring in part.state.lock().subscribers.iter().filter(|r| r.scope.remote()) {
                ring.push_lost(missed);
            }
        }
    }

    /// The transport connected, or lost its connection.
    pub(crate) fn on_link_state(&self, state: LinkState) {
        let Some(cluster) = self.cluster.as_ref() else { return };
        match state {
            LinkState::Up => {
                cluster.first_up.get_or_init(Instant::now);
                let was_up = cluster.link_up.swap(true, Ordering::AcqRel);
                if !was_up {
                    // Nothing could be heard while the link was down: count
                    // every origin's silence from now.
                    let now = Instant::now();
                    cluster.seen.lock().heard.values_mut().for_each(|e| e.heard = now);
                    // And nothing was announced: every partition, at once.
                    cluster.hello.notify_one();
                }
                if !was_up && cluster.ever_up.swap(true, Ordering::AcqRel) {
                    // Back after a loss: whatever was published meanwhile is
                    // gone. Say so again, for readers that acted at the loss
                    // (an invalidator's flush) and have served since.
                    for p in 0..self.count {
                        self.notify_loss(p, 0);
                    }
                }
            }
            LinkState::Down(reason) => {
                if cluster.link_up.swap(false, Ordering::AcqRel) {
                    // What was published meanwhile is gone: an unknown loss
                    // now, and each origin's jump, counted, at its next frame.
                    // (Every reader first, then the reports, which go through
                    // the application's logger, observer and recorder.)
                    for p in 0..self.count {
                        self.notify_loss(p, 0);
                    }
                    tracing::warn!(target: "nebulex_streams", cache = %self.reporter.cache, %reason,
                        "cluster connection lost: every partition has a gap");
                    for p in 0..self.count {
                        self.reporter.gap(p, None, 0);
                    }
                }
            }
        }
    }
}

/// Whether this stream has a cluster transport, for `info`.
pub(crate) fn describe<K>(cluster: &Option<Cluster<K>>) -> Option<String> {
    cluster.as_ref().map(|c| c.describe.clone())
}

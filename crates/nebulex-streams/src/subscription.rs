//! Subscriptions: where events end, one bounded buffer per subscriber.
//!
//! # Lagging
//!
//! Each subscription has a buffer of [`StreamsBuilder::buffer`] events. Writers
//! never wait for a subscriber: when its buffer is full, the event is dropped
//! for that subscriber alone and counted. The subscriber's next receive past
//! the events it did get then yields `Err(Lagged(n))`, `n` being exactly the
//! number of events it missed, and receiving continues with the next event.
//! Nothing is lost silently: per subscriber, events received plus the sum of
//! `Lagged` counts equals the events published to it.
//!
//! Events of other nodes lost on the way are counted from that node's
//! sequence numbers, which number its events of every type: a subscriber
//! that filters by type is told the whole jump, at least what it missed.
//! A `Lagged(0)` means "an unknown number" (a lost cluster connection, or
//! more than 2^38 − 1 events missed between two receives): treat every
//! `Lagged` as loss.
//!
//! A notice comes where the loss happened, with a reader on another thread
//! too: after every event buffered before it, before any event after it.
//!
//! [`StreamsBuilder::buffer`]: crate::StreamsBuilder::buffer

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use futures::task::AtomicWaker;

use nebulex::{CacheEntryEvent, Command, EventMetadata, EventType, Name, NodeId, Target};
use sync_wrapper::SyncWrapper;

use crate::streams::StreamShared;

/// A subscriber missed this many events (`0`: an unknown number).
///
/// ```
/// use nebulex::Cache;
/// use nebulex_streams::{Lagged, Streams, StreamsExt, SubscribeOptions};
///
/// let cache: Cache<u32, u32> = Cache::builder().build()?;
/// let _streams = Streams::builder(&cache).buffer(1).start()?;
/// let mut sub = cache.subscribe(SubscribeOptions::new())?;
/// for i in 0..3 {
///     cache.put(i, i); // the buffer holds the first; the other two are dropped
/// }
/// assert!(sub.recv_blocking().is_some_and(|item| item.is_ok()));
/// assert_eq!(sub.recv_blocking().and_then(|item| item.err()), Some(Lagged(2)));
/// assert_eq!(Lagged(2).to_string(), "the subscriber lagged behind and missed 2 events");
/// # Ok::<(), nebulex_streams::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[error("the subscriber lagged behind and missed {0} events")]
pub struct Lagged(pub u64);

/// What [`Subscription::try_recv`] can say instead of an event.
///
/// ```
/// use nebulex::Cache;
/// use nebulex_streams::{Streams, StreamsExt, SubscribeOptions, TryRecvError};
///
/// let cache: Cache<&str, u32> = Cache::builder().build()?;
/// let streams = Streams::builder(&cache).buffer(1).start()?;
/// let mut sub = cache.subscribe(SubscribeOptions::new())?;
/// assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
/// cache.put("a", 1);
/// cache.put("b", 2); // the buffer is full: dropped
/// assert!(sub.try_recv().is_ok());
/// assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Lagged(1));
/// assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
/// streams.stop();
/// assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Closed);
/// # Ok::<(), nebulex_streams::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum TryRecvError {
    /// No event is waiting.
    #[error("no event is waiting")]
    Empty,
    /// The subscriber missed this many events (`0`: an unknown number).
    #[error("the subscriber lagged behind and missed {0} events")]
    Lagged(u64),
    /// The stream was stopped and every event was received.
    #[error("the stream is stopped")]
    Closed,
}

/// How many times `recv_blocking` looks again for an event before it sleeps.
const SPIN_ROUNDS: u32 = 16;
/// How long it pauses between looks, in spin-loop hints (a few µs), before it
/// yields the CPU: a busy writer leaves a batch meanwhile.
const SPIN_PAUSES: u32 = 256;
/// Spin-loop hints between two looks of a busy poll (a fraction of a µs).
const BUSY_POLL_PAUSES: u32 = 4;

/// One item of a subscription: an event, or how many were missed.
///
/// Per subscriber, events received plus the sum of `Lagged` counts equals the
/// events published to it (for other nodes' events lost on the way, at least
/// that: see [the module docs](crate::subscription)):
///
/// ```
/// use nebulex::Cache;
/// use nebulex_streams::{Item, Lagged, Streams, StreamsExt, SubscribeOptions};
///
/// let cache: Cache<u32, u32> = Cache::builder().build()?;
/// let streams = Streams::builder(&cache).buffer(4).start()?;
/// let mut sub = cache.subscribe(SubscribeOptions::new())?;
/// (0..10).for_each(|i| cache.put(i, i));
/// streams.stop();
///
/// let (mut received, mut missed) = (0, 0);
/// while let Some(item) = sub.recv_blocking() {
///     let item: Item<u32> = item;
///     match item {
///         Ok(_event) => received += 1,
///         Err(Lagged(n)) => missed += n,
///     }
/// }
/// assert_eq!((received, missed), (4, 6));
/// # Ok::<(), nebulex_streams::Error>(())
/// ```
pub type Item<K> = Result<Arc<CacheEntryEvent<K>>, Lagged>;

/// Whose events a subscription (or an invalidator) wants, by origin node.
///
/// Remote events are those that arrive through a cluster transport
/// ([`StreamsBuilder::pubsub`](crate::StreamsBuilder::pubsub)); a stream
/// without one has local events only.
///
/// ```
/// use nebulex::Cache;
/// use nebulex_streams::{EventScope, Streams, StreamsExt, SubscribeOptions, TryRecvError};
///
/// let cache: Cache<String, u32> = Cache::builder().build()?;
/// let _streams = Streams::builder(&cache).start()?;
/// let mut mine = cache.subscribe(SubscribeOptions::new().scope(EventScope::Local))?;
/// let mut theirs = cache.subscribe(SubscribeOptions::new().scope(EventScope::Remote))?;
/// cache.put("user:1".to_string(), 1);
/// assert!(mine.try_recv().is_ok());
/// assert_eq!(theirs.try_recv().unwrap_err(), TryRecvError::Empty);
/// assert_eq!(EventScope::default(), EventScope::Remote); // the invalidator's default
/// # Ok::<(), nebulex_streams::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum EventScope {
    /// Only other nodes' events (those that came through the cluster transport).
    #[default]
    Remote,
    /// Only this node's own events.
    Local,
    /// Every event.
    All,
}

impl EventScope {
    pub(crate) fn local(self) -> bool {
        matches!(self, EventScope::Local | EventScope::All)
    }

    pub(crate) fn remote(self) -> bool {
        matches!(self, EventScope::Remote | EventScope::All)
    }
}

/// Which events a new subscription wants, from which partition, and how its
/// receives wait.
///
/// ```
/// use nebulex::EventType;
/// use nebulex_streams::SubscribeOptions;
///
/// let all_of_partition_2 = SubscribeOptions::new().partition(2);
/// let inserts_and_deletes = SubscribeOptions::new().events([EventType::Inserted, EventType::Deleted]);
/// # let _ = (all_of_partition_2, inserts_and_deletes);
/// ```
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    pub(crate) events: Option<u8>,
    pub(crate) partition: Option<u32>,
    pub(crate) scope: Option<EventScope>,
    pub(crate) busy_poll: Option<Duration>,
}

/// The longest [`SubscribeOptions::busy_poll`] allowed: 10 ms.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

impl SubscribeOptions {
    /// Every event type, from the next partition in round-robin order.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only these event types (at least one, or `subscribe` fails with
    /// [`Error::EmptyEventFilter`](crate::Error::EmptyEventFilter)).
    pub fn events(mut self, types: impl IntoIterator<Item = EventType>) -> Self {
        self.events = Some(types.into_iter().fold(0, |m, t| m | t.bit()));
        self
    }

    /// From this partition of a partitioned stream (default: round-robin).
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Only events of this origin: this node's, other nodes', or both
    /// ([`EventScope::All`], what a subscription gets unless told; note that
    /// `EventScope::default()` is [`Remote`](EventScope::Remote), the
    /// invalidator's default).
    pub fn scope(mut self, scope: EventScope) -> Self {
        self.scope = Some(scope);
        self
    }

    /// When its buffer is empty, a receive looks for the next event for up
    /// to this long before it sleeps (default, or `Duration::ZERO`: an async
    /// receive sleeps at once, and [`Subscription::recv_blocking`] looks a
    /// few times first).
    ///
    /// A sleeping reader is woken by the writer through the operating
    /// system, which takes tens of microseconds on some machines (a virtual
    /// machine whose idle cores halt) and now and then far more. A reader
    /// that is looking when the event comes has it within about a
    /// microsecond, but holds its thread meanwhile: in async code, the
    /// runtime worker that polls it. Set it on a subscription whose events
    /// must arrive fast and that may keep a core busy for it: longer than
    /// the usual gap between its events, a few times longer on a busy
    /// machine (where a pause of the writer's core would otherwise put the
    /// reader to sleep).
    ///
    /// A receive looks once per wait: on the first poll of each `recv()`,
    /// and, as a `Stream`, on its first poll after each item. Meanwhile
    /// nothing else runs on that thread, so a receive under a timeout may
    /// end up to this much late, and a task that waits on several
    /// subscriptions at once (`select!`, merged streams) waits for each
    /// one's look in turn: give it to one subscription per task. On a
    /// single-threaded runtime that also runs the writes, the look only
    /// delays them.
    ///
    /// More than [`MAX_BUSY_POLL`] is refused by
    /// [`subscribe`](crate::StreamsExt::subscribe) with
    /// [`Error::InvalidOption`](crate::Error::InvalidOption).
    ///
    /// ```
    /// use std::time::Duration;
    /// use nebulex::Cache;
    /// use nebulex_streams::{Error, Streams, StreamsExt, SubscribeOptions};
    ///
    /// let cache: Cache<u64, u64> = Cache::builder().build()?;
    /// let _streams = Streams::builder(&cache).start()?;
    /// let mut sub = cache.subscribe(SubscribeOptions::new().busy_poll(Duration::from_micros(200)))?;
    /// cache.put(1, 1);
    /// assert!(sub.recv_blocking().is_some_and(|item| item.is_ok()));
    ///
    /// let too_long = cache.subscribe(SubscribeOptions::new().busy_poll(Duration::from_secs(1)));
    /// assert!(matches!(too_long, Err(Error::InvalidOption(_))));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn busy_poll(mut self, budget: Duration) -> Self {
        self.busy_poll = Some(budget);
        self
    }
}

/// A buffer's loss record: what was missed since the last report, and where
/// among the events pushed into the buffer it began, in one word, so that a
/// reader takes both at once. 0: no loss.
///
/// - bit 63 ([`UNKNOWN`]): some loss has an unknown size;
/// - bits `POS_BITS..63`: how many events were missed (past
///   [`COUNT_MAX`], an unknown number);
/// - bits `0..POS_BITS`: how many events had been pushed into the buffer
///   before the loss, modulo `2^POS_BITS` (a buffer holds fewer, so the
///   reader can tell whether it has read them all).
const UNKNOWN: u64 = 1 << 63;
const POS_BITS: u32 = 25;
const POS_MASK: u64 = (1 << POS_BITS) - 1;
const COUNT_MAX: u64 = (UNKNOWN - 1) >> POS_BITS;
const _: () = assert!(crate::MAX_BUFFER < 1 << POS_BITS);

/// The missed count of a loss record (`UNKNOWN` set if the size is unknown),
/// without its position.
fn missed_of(record: u64) -> u64 {
    (record & UNKNOWN) | ((record & !UNKNOWN) >> POS_BITS)
}

/// `record` with `missed` more events (`UNKNOWN` set: an unknown number) lost
/// after the first `pushed` events of the buffer; the position stays that of
/// the first loss not yet reported.
fn with_loss(record: u64, missed: u64, pushed: u64) -> u64 {
    let at = if record == 0 { pushed & POS_MASK } else { record & POS_MASK };
    let count = missed_of(record & !UNKNOWN).saturating_add(missed & !UNKNOWN);
    let unknown = (record | missed) & UNKNOWN | if count > COUNT_MAX { UNKNOWN } else { 0 };
    unknown | (count.min(COUNT_MAX) << POS_BITS) | at
}

/// The notice for a loss record: an unknown size reads as `Lagged(0)`.
fn lagged(record: u64) -> Lagged {
    Lagged(if record & UNKNOWN != 0 { 0 } else { missed_of(record) })
}

/// One slot of a buffer: an event, and the loss record of what was dropped
/// just before it when some were (boxed, so that the common slot stays
/// small: one cache line for a `u64` key).
enum Slot<K> {
    Event(Handed<K>),
    AfterLoss(Box<(u64, Handed<K>)>),
    /// Written once into every slot when the buffer is made, and read back
    /// at once: the memory is mapped then, not on the first lap of events.
    Blank,
}

/// An event as a writer hands it to one buffer.
pub(crate) enum Handed<K> {
    /// A local event with a sole receiver (and no telemetry keeping it):
    /// only what varies from one event to the next travels; the reader
    /// rebuilds the event and allocates its `Arc` on its own thread, so the
    /// writer allocates no `Arc` nor gets its memory back from another core,
    /// and the event crosses cores once, in a compact slot.
    Owned(Routed<K>),
    /// An event shared by several receivers, or received from another node.
    Shared(Arc<CacheEntryEvent<K>>),
}

/// What every event of one partition of one stream, written on this node,
/// has in common.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin {
    pub(crate) cache: Name,
    pub(crate) node: NodeId,
    pub(crate) partition: Option<u32>,
    pub(crate) partitions: Option<u32>,
    pub(crate) topic: Name,
}

impl Origin {
    /// Partition `p` of the stream of `cache` on `node` (`partitions`: `None`
    /// when the stream is not partitioned).
    pub(crate) fn new(cache: Name, node: NodeId, partitions: Option<u32>, p: u32, topic: Name) -> Self {
        Origin { cache, node, partition: partitions.map(|_| p), partitions, topic }
    }
}

/// What varies from one routed event of this node to the next.
///
/// The timestamp travels as nanoseconds since the Unix epoch: exact from
/// 1970 to 2554 (a clock set outside reads as the nearest end).
pub(crate) struct Routed<K> {
    pub(crate) kind: EventType,
    pub(crate) command: Command,
    pub(crate) target: Target<K>,
    pub(crate) version: u64,
    pub(crate) seq: u64,
    /// Nanoseconds since the Unix epoch.
    pub(crate) timestamp: u64,
}

/// `t` in nanoseconds since the Unix epoch (0 before it, `u64::MAX` after
/// the year 2554).
pub(crate) fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl<K> Routed<K> {
    /// The whole event, as subscribers see it.
    pub(crate) fn into_event(self, origin: &Origin) -> CacheEntryEvent<K> {
        CacheEntryEvent {
            cache: origin.cache,
            kind: self.kind,
            target: self.target,
            command: self.command,
            version: self.version,
            metadata: EventMetadata {
                node: origin.node,
                partition: origin.partition,
                partitions: origin.partitions,
                topic: Some(origin.topic),
                seq: self.seq,
                timestamp: SystemTime::UNIX_EPOCH + Duration::from_nanos(self.timestamp),
            },
        }
    }
}

impl<K> Handed<K> {
    fn into_arc(self, origin: &Origin) -> Arc<CacheEntryEvent<K>> {
        match self {
            Handed::Owned(routed) => Arc::new(routed.into_event(origin)),
            Handed::Shared(event) => event,
        }
    }
}

/// What the two halves of a buffer share.
struct RingState {
    /// The loss record of the events dropped since the last report (see
    /// [`UNKNOWN`]); only the writer adds to it, and only the reader or the
    /// writer's next push takes it.
    missed: AtomicU64,
    waker: AtomicWaker,
    /// The reader is (about to be) parked waiting for an event.
    sleeping: AtomicBool,
    closed: AtomicBool,
    /// The share of its stream's [`PREMAPPED_BYTES`] its memory took, if
    /// any: given back when both halves are gone.
    _premapped: Option<Premapped>,
}

impl RingState {
    /// Records `missed` events (`UNKNOWN`: an unknown number) lost after the
    /// first `pushed` events of the buffer.
    fn add_missed(&self, missed: u64, pushed: u64) {
        if missed == 0 {
            return;
        }
        let _ = self.missed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| Some(with_loss(r, missed, pushed)));
    }

    /// Wakes the reader if it is waiting.
    #[inline]
    fn wake(&self) {
        // Pairs with the fence in `poll_recv`: either the reader sees what
        // was just pushed, or this sees it sleeping.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::AcqRel) {
            self.waker.wake();
        }
    }
}

/// A bounded buffer between the writers and one reader: its two halves.
///
/// The writers' half lives in its partition's state and is used under that
/// partition's lock, so it has one writer at a time: a single-producer ring
/// (no compare-and-swap to claim a slot, and the reader never writes the
/// lines the writer fills). The reader's half is owned by one subscription
/// (or by the cluster's sender).
///
/// Its memory is mapped now if `premap` allows it (no page fault in the
/// event path then), else as its first lap of events fills it.
pub(crate) fn ring<K>(
    capacity: usize,
    mask: u8,
    scope: EventScope,
    origin: Origin,
    premap: &Premap,
) -> (RingWriter<K>, RingReader<K>) {
    let (mut producer, mut consumer) = rtrb::RingBuffer::new(capacity);
    let premapped = premap.take(capacity.saturating_mul(std::mem::size_of::<Slot<K>>()));
    if premapped.is_some() {
        while producer.push(Slot::Blank).is_ok() {}
        while consumer.pop().is_ok() {}
    }
    let state = Arc::new(RingState {
        missed: AtomicU64::new(0),
        waker: AtomicWaker::new(),
        sleeping: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        _premapped: premapped,
    });
    let writer = RingWriter { producer, pushed: 0, state: state.clone(), mask, scope };
    (writer, RingReader { consumer: SyncWrapper::new(consumer), popped: 0, state, origin, stash: None })
}

/// The most bytes of one stream's buffers (its subscribers' and its
/// outbound ones together) whose memory is mapped when they are made; the
/// rest is mapped as events first fill it.
///
/// Mapping a buffer up front keeps page faults out of the event path, but a
/// stream of thousands of partitions would map gigabytes at start (64 bytes
/// per event of each buffer), most of which its events may never reach.
pub const PREMAPPED_BYTES: usize = 256 << 20;

/// What is left of a stream's [`PREMAPPED_BYTES`]. A cheap handle: clones
/// share it.
#[derive(Clone)]
pub(crate) struct Premap(Arc<AtomicUsize>);

impl Premap {
    /// An allowance of `bytes`.
    pub(crate) fn new(bytes: usize) -> Self {
        Premap(Arc::new(AtomicUsize::new(bytes)))
    }

    /// Takes `bytes` of what is left, if that much is.
    fn take(&self, bytes: usize) -> Option<Premapped> {
        self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| left.checked_sub(bytes)).ok()?;
        Some(Premapped { premap: self.clone(), bytes })
    }

    #[cfg(test)]
    fn left(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// A share taken of a stream's [`PREMAPPED_BYTES`], given back when dropped.
struct Premapped {
    premap: Premap,
    bytes: usize,
}

impl Drop for Premapped {
    fn drop(&mut self) {
        self.premap.0.fetch_add(self.bytes, Ordering::AcqRel);
    }
}

/// The writers' half of a buffer.
pub(crate) struct RingWriter<K> {
    producer: rtrb::Producer<Slot<K>>,
    /// Events pushed so far (wrapping).
    pushed: u64,
    state: Arc<RingState>,
    /// The event types its reader wants.
    pub(crate) mask: u8,
    /// Whose events it wants.
    pub(crate) scope: EventScope,
}

impl<K> RingWriter<K> {
    /// Whether it wants this node's own events of this type.
    #[inline]
    pub(crate) fn wants_local(&self, kind: EventType) -> bool {
        self.mask & kind.bit() != 0 && self.scope.local()
    }

    /// Whether it wants other nodes' events of this type.
    #[inline]
    pub(crate) fn wants_remote(&self, kind: EventType) -> bool {
        self.mask & kind.bit() != 0 && self.scope.remote()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.producer.buffer().capacity()
    }

    /// Whether this is the writers' half of `reader`'s buffer.
    pub(crate) fn feeds(&self, reader: &RingReader<K>) -> bool {
        Arc::ptr_eq(&self.state, &reader.state)
    }

    /// Whether nothing is waiting: no event, no loss to report.
    pub(crate) fn is_empty(&self) -> bool {
        self.producer.slots() == self.capacity() && self.state.missed.load(Ordering::Acquire) == 0
    }

    /// Offers an event; returns `false` if the buffer was full (the event is
    /// then counted as missed). A closed buffer takes nothing more: its
    /// reader has ended, or will once it has read what it holds.
    #[inline]
    pub(crate) fn push(&mut self, event: Handed<K>) -> bool {
        let state = &*self.state;
        if state.closed.load(Ordering::Relaxed) {
            return true;
        }
        // The loss not yet reported goes with this event, right before it.
        let lost = if state.missed.load(Ordering::Relaxed) == 0 { 0 } else { state.missed.swap(0, Ordering::AcqRel) };
        let slot = if lost == 0 { Slot::Event(event) } else { Slot::AfterLoss(Box::new((lost, event))) };
        let pushed = match self.producer.push(slot) {
            Ok(()) => {
                self.pushed = self.pushed.wrapping_add(1);
                true
            }
            Err(rtrb::PushError::Full(_)) => {
                // The loss taken goes back where it began, this event after
                // it: in one step, or a reader could take the one before the
                // other is added (one loss told as two notices).
                let pushed = self.pushed;
                let _ = state.missed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |record| {
                    let record = if lost == 0 { record } else { with_loss(record, missed_of(lost), lost & POS_MASK) };
                    Some(with_loss(record, 1, pushed))
                });
                false
            }
        };
        state.wake();
        pushed
    }

    /// Records `missed` events lost before anything pushed from now on
    /// (`0`: an unknown number), and wakes the reader to learn it.
    pub(crate) fn push_lost(&self, missed: u64) {
        if self.state.closed.load(Ordering::Relaxed) {
            return;
        }
        self.state.add_missed(if missed == 0 { UNKNOWN } else { missed }, self.pushed);
        self.state.wake();
    }

    /// Ends the reader once it has read what is buffered.
    pub(crate) fn close(&self) {
        self.state.closed.store(true, Ordering::Release);
        self.state.sleeping.store(false, Ordering::Release);
        self.state.waker.wake();
    }
}

/// The reader's half of a buffer.
pub(crate) struct RingReader<K> {
    /// Only ever used through `&mut self`, so sharing the reader is safe.
    consumer: SyncWrapper<rtrb::Consumer<Slot<K>>>,
    /// Events read so far (wrapping).
    popped: u64,
    state: Arc<RingState>,
    /// What the events it reads have in common.
    origin: Origin,
    /// An event that came right after a `Lagged` notice, for the next read.
    stash: Option<Arc<CacheEntryEvent<K>>>,
}

impl<K> RingReader<K> {
    /// Whether the writers closed it (it may still hold events).
    pub(crate) fn is_closed(&self) -> bool {
        self.state.closed.load(Ordering::Acquire)
    }

    /// Whether an event is set aside for the next read.
    pub(crate) fn has_stash(&self) -> bool {
        self.stash.is_some()
    }

    /// The next item, if there is one, in the order of the writes: a loss
    /// is told where it happened, after the events buffered before it.
    pub(crate) fn try_next(&mut self) -> Option<Item<K>> {
        if let Some(event) = self.stash.take() {
            return Some(Ok(event));
        }
        if let Some(item) = self.pop() {
            return Some(item);
        }
        // A loss not yet told, that no event after it has carried.
        loop {
            let record = self.state.missed.load(Ordering::Acquire);
            if record == 0 {
                return None;
            }
            if record & POS_MASK != self.popped & POS_MASK {
                // Events pushed before the loss are still buffered (they
                // were pushed before it was recorded, so this thread sees
                // them now): they come first.
                if let Some(item) = self.pop() {
                    return Some(item);
                }
            }
            // Taken, unless the writer added to it (or took it) meanwhile.
            if self.state.missed.compare_exchange(record, 0, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return Some(Err(lagged(record)));
            }
        }
    }

    /// The next buffered slot's item, if there is one.
    fn pop(&mut self) -> Option<Item<K>> {
        let item = match self.consumer.get_mut().pop().ok()? {
            Slot::Event(event) => Ok(event.into_arc(&self.origin)),
            Slot::AfterLoss(after) => {
                let (missed, event) = *after;
                self.stash = Some(event.into_arc(&self.origin));
                Err(lagged(missed))
            }
            Slot::Blank => return None,
        };
        self.popped = self.popped.wrapping_add(1);
        Some(item)
    }

    /// Looks for the next item until one comes, the writers close the
    /// buffer, or `budget` has passed.
    fn busy_poll(&mut self, budget: Duration) -> Option<Item<K>> {
        // Looking, not sleeping: writers need not wake it meanwhile.
        self.state.sleeping.store(false, Ordering::Relaxed);
        let start = Instant::now();
        loop {
            if let Some(item) = self.try_next() {
                return Some(item);
            }
            if self.is_closed() || start.elapsed() >= budget {
                return None;
            }
            // A short pause between looks: the writer's line is left alone
            // while it fills it, and a sibling hyperthread gets the core.
            (0..BUSY_POLL_PAUSES).for_each(|_| std::hint::spin_loop());
        }
    }

    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item<K>>> {
        if let Some(item) = self.try_next() {
            return Poll::Ready(Some(item));
        }
        self.state.waker.register(cx.waker());
        self.state.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if let Some(item) = self.try_next() {
            self.state.sleeping.store(false, Ordering::Relaxed);
            return Poll::Ready(Some(item));
        }
        if self.is_closed() {
            // Writers may have raced the close: drain before ending.
            return Poll::Ready(self.try_next());
        }
        Poll::Pending
    }
}

/// A subscriber's view of a stream: a [`futures::Stream`] of events and
/// [`Lagged`] notices, also readable with [`recv`](Self::recv),
/// [`try_recv`](Self::try_recv) and [`recv_blocking`](Self::recv_blocking).
///
/// Made by [`StreamsExt::subscribe`](crate::StreamsExt::subscribe). It ends
/// (`None`) once the stream is stopped and its buffer is drained. Dropping it
/// unsubscribes.
///
/// ```
/// use futures::StreamExt;
/// use nebulex::{Cache, EventType};
/// use nebulex_streams::{Streams, StreamsExt, SubscribeOptions};
///
/// # futures::executor::block_on(async {
/// let cache: Cache<String, u32> = Cache::builder().build()?;
/// let streams = Streams::builder(&cache).start()?;
/// let mut sub = cache.subscribe(SubscribeOptions::new())?;
///
/// cache.put("user:123".to_string(), 1);
/// let event = sub.next().await.unwrap().unwrap();
/// assert_eq!(event.kind, EventType::Inserted);
///
/// streams.stop();
/// assert!(sub.next().await.is_none());
/// # Ok::<(), nebulex_streams::Error>(())
/// # }).unwrap();
/// ```
pub struct Subscription<K> {
    ring: RingReader<K>,
    partition: u32,
    stream: Arc<StreamShared<K>>,
    /// How long a receive looks for an event before it sleeps.
    busy_poll: Option<Duration>,
    /// Whether this wait has had its look (cleared by each item).
    looked: bool,
}

impl<K> Subscription<K> {
    pub(crate) fn new(ring: RingReader<K>, partition: u32, stream: Arc<StreamShared<K>>) -> Self {
        Subscription { ring, partition, stream, busy_poll: None, looked: false }
    }

    /// Looks for `busy_poll` before each sleep (`None`: sleeps at once).
    pub(crate) fn with_busy_poll(mut self, busy_poll: Option<Duration>) -> Self {
        self.busy_poll = busy_poll;
        self
    }

    /// The partition this subscription reads (0 for an unpartitioned stream).
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The next event or lag notice; `None` once the stream is stopped.
    pub async fn recv(&mut self) -> Option<Item<K>> {
        // A new wait (an earlier one may have been dropped after its look).
        self.looked = false;
        std::future::poll_fn(|cx| self.poll_item(cx)).await
    }

    /// Like [`recv`](Self::recv), blocking the thread. For sync code; do not
    /// call it on an async runtime's thread.
    ///
    /// A reader that keeps up would otherwise sleep after nearly every event,
    /// and waking it costs the writer a system call; and a reader that polls
    /// its buffer constantly steals the writer's cache lines. So when the
    /// buffer is empty it pauses a moment between looks (letting events
    /// accumulate, then taking them in a row) and yields the CPU (to a writer
    /// waiting for this core), a few times, before it sleeps. With
    /// [`SubscribeOptions::busy_poll`], it then looks for that long too.
    pub fn recv_blocking(&mut self) -> Option<Item<K>> {
        for round in 0..=SPIN_ROUNDS {
            if let Some(item) = self.ring.try_next() {
                return Some(self.report(item));
            }
            if self.ring.is_closed() || round == SPIN_ROUNDS {
                break;
            }
            // Pause, then let a writer waiting for this core run.
            (0..SPIN_PAUSES).for_each(|_| std::hint::spin_loop());
            std::thread::yield_now();
        }
        futures::executor::block_on(self.recv())
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Result<Arc<CacheEntryEvent<K>>, TryRecvError> {
        match self.ring.try_next() {
            Some(item) => self.report(item).map_err(|Lagged(n)| TryRecvError::Lagged(n)),
            None if self.ring.is_closed() => match self.ring.try_next() {
                Some(item) => self.report(item).map_err(|Lagged(n)| TryRecvError::Lagged(n)),
                None => Err(TryRecvError::Closed),
            },
            None => Err(TryRecvError::Empty),
        }
    }

    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item<K>>> {
        if let Some(budget) = self.busy_poll.filter(|_| !self.looked) {
            if let Some(item) = self.ring.busy_poll(budget) {
                return Poll::Ready(Some(self.report(item)));
            }
            self.looked = true;
        }
        match self.ring.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                self.looked = false;
                Poll::Ready(Some(self.report(item)))
            }
            other => other,
        }
    }

    /// Reports a lag notice to telemetry as the subscriber receives it.
    #[inline]
    fn report(&self, item: Item<K>) -> Item<K> {
        if let Err(Lagged(missed)) = item {
            self.stream.reporter.lagged(self.partition, missed);
        }
        item
    }
}

impl<K> futures::Stream for Subscription<K> {
    type Item = Item<K>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_item(cx)
    }
}

impl<K> Drop for Subscription<K> {
    fn drop(&mut self) {
        self.stream.unsubscribe(self.partition, &self.ring);
    }
}

impl<K> fmt::Debug for Subscription<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("cache", &self.stream.reporter.cache)
            .field("partition", &self.partition)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_of_a_u64_or_string_key_takes_one_cache_line_of_its_buffer() {
        assert!(std::mem::size_of::<Slot<u64>>() <= 64, "{} bytes", std::mem::size_of::<Slot<u64>>());
        assert!(std::mem::size_of::<Slot<String>>() <= 64, "{} bytes", std::mem::size_of::<Slot<String>>());
    }

    #[test]
    fn timestamps_cross_the_buffer_to_the_nanosecond() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_790_000_000, 123_456_789);
        assert_eq!(SystemTime::UNIX_EPOCH + Duration::from_nanos(unix_nanos(t)), t);
        assert_eq!(unix_nanos(SystemTime::UNIX_EPOCH - Duration::from_secs(1)), 0);
    }

    fn event(seq: u64) -> Handed<u64> {
        Handed::Owned(Routed {
            kind: EventType::Inserted,
            command: Command::Put,
            target: Target::Key(seq),
            version: seq,
            seq,
            timestamp: 0,
        })
    }

    #[test]
    fn buffers_are_mapped_when_made_within_their_streams_allowance_alone() {
        let name = Name::new("premapped");
        let ring = |premap: &Premap| {
            ring::<u64>(4, u8::MAX, EventScope::All, Origin::new(name, NodeId(1), None, 0, name), premap)
        };
        let bytes = 4 * std::mem::size_of::<Slot<u64>>();
        let premap = Premap::new(bytes + bytes / 2);
        let first = ring(&premap);
        assert!(first.0.state._premapped.is_some());
        assert_eq!(premap.left(), bytes / 2);
        // Too little is left: mapped as events come.
        let (mut writer, mut reader) = ring(&premap);
        assert!(writer.state._premapped.is_none());
        assert_eq!(premap.left(), bytes / 2);
        // It carries events as well, over its first lap and on.
        for seq in 1..=6 {
            writer.push(event(seq));
        }
        let mut read = || match reader.try_next() {
            Some(Ok(e)) => Ok(e.metadata.seq),
            Some(Err(Lagged(n))) => Err(n),
            None => Err(u64::MAX),
        };
        assert_eq!([read(), read(), read(), read(), read()], [Ok(1), Ok(2), Ok(3), Ok(4), Err(2)]);
        writer.push(event(7));
        assert_eq!([read(), read()], [Ok(7), Err(u64::MAX)]);
        // A buffer gone gives its share back, once both halves are.
        drop(first.0);
        assert_eq!(premap.left(), bytes / 2);
        drop(first.1);
        assert_eq!(premap.left(), bytes + bytes / 2);
        assert!(ring(&premap).0.state._premapped.is_some());
    }

    #[test]
    fn a_closed_buffer_takes_no_more_events_nor_losses() {
        let name = Name::new("closing");
        let origin = Origin::new(name, NodeId(1), None, 0, name);
        let (mut writer, mut reader) = ring::<u64>(4, u8::MAX, EventScope::All, origin, &Premap::new(0));
        assert!(writer.push(event(1)));
        writer.close();
        // A writer that got past the stream's filter before the close.
        assert!(writer.push(event(2)), "not reported as a full buffer");
        writer.push_lost(0);
        assert!(matches!(reader.try_next(), Some(Ok(e)) if e.metadata.seq == 1), "what was buffered before is read");
        assert!(reader.try_next().is_none(), "nothing after the close: not an event, not a loss");
        assert!(reader.is_closed());
    }

    #[test]
    fn missed_counts_add_up_keep_where_the_loss_began_and_an_unknown_count_stays_unknown() {
        let state = RingState {
            missed: AtomicU64::new(0),
            waker: AtomicWaker::new(),
            sleeping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            _premapped: None,
        };
        let record = || state.missed.load(Ordering::Relaxed);
        state.add_missed(3, 10);
        state.add_missed(4, 12);
        assert_eq!(lagged(record()), Lagged(7));
        assert_eq!(record() & POS_MASK, 10, "the loss began after the first 10 events");
        // Past the count's width (forged gaps, say), the size is unknown.
        state.add_missed(COUNT_MAX, 12);
        assert_eq!(lagged(record()), Lagged(0));
        state.missed.store(0, Ordering::Relaxed);
        state.add_missed(1 << 62, 5 + (1 << POS_BITS));
        assert_eq!(lagged(record()), Lagged(0));
        assert_eq!(record() & POS_MASK, 5, "positions wrap");
        state.missed.store(0, Ordering::Relaxed);
        state.add_missed(UNKNOWN, 0);
        assert_ne!(record(), 0, "an unknown loss at position 0 is still a loss");
        state.add_missed(2, 0);
        assert_eq!(lagged(record()), Lagged(0));
    }
}

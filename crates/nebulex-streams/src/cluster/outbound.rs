//! This node's events to the other nodes: the sender task, which drains the
//! outbound buffers into frames, heartbeats idle partitions, greets new
//! nodes, and sends what is left when the stream stops.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use nebulex::CacheEntryEvent;
use tokio::sync::watch;

use super::STOP_FLUSH_TIMEOUT;
use crate::pubsub::{Link, LinkState};
use crate::streams::StreamShared;
use crate::subscription::RingReader;
use crate::telemetry::panic_message;
use crate::wire::FrameHeader;

/// How many times a quarter heartbeat a sender greets new nodes at once
/// (heartbeats on every partition); more wait for the next quarter.
const HELLO_BURST: u32 = 4;

/// About how many frames a sender's pass publishes at most, shared between
/// the partitions.
const FRAMES_PER_PASS: usize = 64;

/// The sender task's link: closed when the task ends, however it ends
/// (which also drops `_done`, telling [`Cluster::finished`](super::Cluster::finished)).
pub(super) struct Sender {
    pub(super) link: Arc<dyn Link>,
    pub(super) _done: watch::Sender<()>,
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
pub(super) async fn send_loop<K>(s: Arc<StreamShared<K>>, sender: Sender, mut stop: watch::Receiver<bool>)
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
                // (Cut short by a stop: then what is buffered goes at once.)
                tokio::select! {
                    () = tokio::time::sleep(cluster.batch_linger) => {}
                    () = stopped(&mut stop) => {}
                }
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
        // A key's `Drop` that panics must not end the sender task: the
        // events are in their frames already.
        crate::telemetry::quietly(|| events.clear());
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

    /// The sender task ended by a panic: nothing is sent any more, so the
    /// connection is down for good (every partition has a gap, and an
    /// invalidator keeps flushing), rather than silently deaf and mute.
    #[cold]
    pub(super) fn sender_panicked(&self, panic: &(dyn std::any::Any + Send)) {
        self.sender_gone(&format!("panicked: {}", panic_message(panic)));
    }

    /// The sender task ended before the stream stopped (`why`: it panicked,
    /// or its runtime shut down): the connection is down for good, as after
    /// [`sender_panicked`](Self::sender_panicked).
    #[cold]
    pub(super) fn sender_gone(&self, why: &str) {
        if let Some(cluster) = self.cluster.as_ref() {
            cluster.broken.store(true, Ordering::Release);
        }
        let down = LinkState::Down(format!("the sender task {why}"));
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| self.on_link_state(down)));
        crate::telemetry::quietly(|| {
            tracing::error!(target: "nebulex_streams", cache = %self.reporter.cache,
                "the cluster sender task {why}: the link is down for good");
        });
    }
}

//! The other nodes' frames to this node's subscribers: the checks a frame
//! passes, gaps and replays by each origin's numbering, silent origins, and
//! this node's own connection going up and down.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nebulex::CacheEntryEvent;

use super::origins::{Seen, FORGET_HEARTBEATS, FORGET_SILENT, MAX_ORIGINS_PER_PARTITION};
use super::{Cluster, SILENT_HEARTBEATS, SILENT_NODE_HEARTBEATS};
use crate::pubsub::LinkState;
use crate::streams::StreamShared;
use crate::subscription::Handed;
use crate::telemetry::panic_message;
use crate::wire::{clip, DecodeLimits, Frame, FrameHeader, RejectReason, DEFAULT_MAX_FRAME_BYTES};

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
        let recent = |heard: Instant| now.saturating_duration_since(heard) < limit;
        let seen = cluster.seen.lock();
        let silent =
            seen.heard.iter().any(|(&(_, partition), e)| partition == p && e.silent && !e.ended && recent(e.heard))
                || seen.silenced(p).is_some_and(recent);
        silent.then_some(cluster.heartbeat)
    }

    /// While this node's cluster connection is down (or not yet up): the
    /// heartbeat period, within which what it misses should be acted on.
    pub(crate) fn outage(&self) -> Option<Duration> {
        let cluster = self.cluster.as_ref()?;
        (!cluster.link_up.load(Ordering::Acquire)).then_some(cluster.heartbeat)
    }

    /// With a cluster transport, whether this node's connection is up.
    pub(crate) fn connected(&self) -> Option<bool> {
        Some(self.cluster.as_ref()?.link_up.load(Ordering::Acquire))
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
        // A stopped stream's link is open only to send what it had routed:
        // what it hears is no one's (its readers have ended), and a frame of
        // this node's next stream is no other node with its id.
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
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
                if !seen.admit(key, MAX_ORIGINS_PER_PARTITION) {
                    drop(seen);
                    // What the refused origin writes is lost while it is.
                    self.notify_loss(partition, 0);
                    let limit = MAX_ORIGINS_PER_PARTITION;
                    return self.reporter.frame_rejected(&RejectReason::TooManyOrigins { limit });
                }
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
                    seen.follow(key, Seen::new(h.epoch, first, now))
                }
            };
            if h.epoch != entry.epoch {
                // Epochs grow with each start of a node's stream (its start
                // time is in them): a lower one is from before its restart,
                // a replay. Unless the stream it would replace is gone and
                // the epoch was never seen: a node whose clock was set back
                // restarted, and refusing it would leave its writes unheard.
                // An epoch it already left stays a replay either way, unless
                // it goes on from where it was left, and it is the later one
                // (then its stream never stopped, and the lower epoch
                // followed since was a replay of a frame never heard here,
                // while the origin was silent) or the one followed since is
                // gone (then that one may have been the replay). Back to it:
                // the frames it sent meanwhile, refused, are a gap of known
                // size.
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
    pub(super) fn panicked(&self, partition: u32, doing: &str, panic: &(dyn std::any::Any + Send)) {
        self.notify_loss(partition, 0);
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
            tracing::error!(target: "nebulex_streams", cache = %self.reporter.cache, partition,
                panic = panic_message(panic), "panicked {doing}: a loss of unknown size");
            self.reporter.gap(partition, None, 0);
        }));
    }

    /// Reports a possible loss (`Lagged(0)`), once, on each partition whose
    /// origin has been silent for [`SILENT_HEARTBEATS`] heartbeats without
    /// having stopped cleanly: it died, or cannot reach the transport, and
    /// what it had not sent is lost. (Not while this node's own link is down:
    /// that loss is reported already.)
    pub(super) fn check_silence(&self) {
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
        seen.forget(|_, e| {
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
            // A sender that panicked sends nothing: never up again.
            LinkState::Up if cluster.broken.load(Ordering::Acquire) => {}
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
            // (While down, the loss is told already.)
            LinkState::Dropped(reason) if cluster.link_up.load(Ordering::Acquire) => {
                // An unknown loss on every partition, told to the readers
                // each time; reported at most once a second (a client
                // overflowing may say so for every frame it drops).
                for p in 0..self.count {
                    self.notify_loss(p, 0);
                }
                if self.reporter.drops_due() {
                    tracing::warn!(target: "nebulex_streams", cache = %self.reporter.cache, %reason,
                        "frames dropped on the way in: every partition has a gap");
                    for p in 0..self.count {
                        self.reporter.gap(p, None, 0);
                    }
                }
            }
            LinkState::Dropped(_) => {}
        }
    }
}

//! Where a receiver stands with each origin (node) on each partition: the
//! next sequence number expected, the epochs it left, when it was last
//! heard; and the origins it forgot, kept on for a while so that a replay of
//! them is still refused.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use nebulex::NodeId;

use crate::wire::FrameHeader;

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
pub(super) struct Seen {
    pub(super) epoch: u64,
    /// The epochs it left, latest first (the current one, closed, until it
    /// restarts).
    earlier: [Left; EARLIER_EPOCHS],
    /// The next sequence number expected.
    pub(super) next: u64,
    /// Its last frame said the origin's stream stopped cleanly (`last`).
    pub(super) ended: bool,
    /// When a frame of it last arrived.
    pub(super) heard: Instant,
    /// The send time of the last frame taken (0: none had one): a frame sent
    /// no later is a replay.
    pub(super) sent_us: u64,
    /// Silent too long, and reported as a possible loss already.
    pub(super) silent: bool,
}

impl Seen {
    pub(super) fn new(epoch: u64, next: u64, now: Instant) -> Self {
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
    pub(super) fn gone(&self) -> bool {
        self.ended || self.silent
    }

    /// The current epoch, as it is left.
    fn leaving(&self) -> Left {
        Left { epoch: self.epoch, next: self.next, sent_us: self.sent_us, open: !self.ended }
    }

    /// The origin's stream started again in `epoch`, numbered from 1.
    pub(super) fn restart(&mut self, epoch: u64, now: Instant) {
        let mut earlier = self.earlier;
        earlier.rotate_right(1);
        earlier[0] = self.leaving();
        *self = Seen { earlier, ..Seen::new(epoch, 1, now) };
    }

    /// Whether a frame of `h` goes on with the epoch left at `earlier[i]`:
    /// not ended, from where its numbering stood, sent after its last frame
    /// taken (not a replay of it); and a later epoch than the current one,
    /// or the current one is gone (stopped, or silent: then the epoch left
    /// for it may have been the node's real stream all along, and refusing
    /// it would leave the node unheard for good).
    pub(super) fn goes_on(&self, i: usize, h: &FrameHeader) -> bool {
        let left = self.earlier[i];
        left.open
            && (h.epoch > self.epoch || self.gone())
            && h.first_seq >= left.next
            && (left.sent_us == 0 || h.sent_at_us > left.sent_us)
    }

    /// The epoch it left at `earlier[i]` goes on: back to it, from where its
    /// numbering stood (what was sent meanwhile is then a gap of known
    /// size), leaving the current one.
    pub(super) fn resume(&mut self, i: usize, now: Instant) {
        let left = self.earlier[i];
        let mut earlier = self.earlier;
        earlier[i] = self.leaving();
        *self = Seen { earlier, sent_us: left.sent_us, ..Seen::new(left.epoch, left.next, now) };
    }

    /// Where the epoch it left, if it did, is among those kept.
    pub(super) fn left(&self, epoch: u64) -> Option<usize> {
        self.earlier.iter().position(|l| l.epoch == epoch)
    }
}

/// An origin on one partition.
type OriginKey = (NodeId, u32);

/// Where a receiver stands with the origins it heard.
#[derive(Default)]
pub(super) struct Origins {
    /// Per (origin, partition): where its numbering stands. (Added to by
    /// [`follow`](Self::follow) and [`recall`](Self::recall) only, which
    /// keep `counts`.)
    pub(super) heard: HashMap<OriginKey, Seen>,
    /// How many origins `heard` holds, per partition.
    counts: HashMap<u32, usize>,
    /// The last [`FORGOTTEN_ORIGINS`] forgotten, each with the number it was
    /// forgotten as (only the latest of a key counts in `order`). An origin
    /// heard again is judged from where it stood, so a frame of it captured
    /// earlier is still a replay once it is forgotten.
    forgotten: HashMap<OriginKey, (Seen, u64)>,
    /// The forgotten keys, oldest first, with their numbers.
    order: VecDeque<(OriginKey, u64)>,
    /// Numbers handed to the forgotten, in order.
    forgets: u64,
    /// Per partition, when the last origin forgotten while silent without
    /// having stopped was last heard: for an invalidator, that partition
    /// still has a silent node (it may be writing, cut off) for as long as
    /// it would if the origin were still followed (even if it is heard again
    /// meanwhile: a flush too many, never one too few).
    silenced: HashMap<u32, Instant>,
    /// Partitions found full of live origins, until the next
    /// [`forget`](Self::forget) (at each silence check, when origins may have
    /// fallen silent): no room is looked for there meanwhile.
    full: HashSet<u32>,
}

impl Origins {
    /// Where `key` stands, if it is heard or among the last forgotten (then
    /// heard again).
    pub(super) fn recall(&mut self, key: OriginKey) -> Option<&mut Seen> {
        if let Some((seen, _)) = self.forgotten.remove(&key) {
            self.follow(key, seen);
        }
        self.heard.get_mut(&key)
    }

    /// Makes room for `key`, not followed (see [`make_room`](Self::make_room)),
    /// and follows it from where it stood if it is among the last forgotten:
    /// taken out of them first, so that the origins forgotten to make room
    /// cannot push it out. Whether there was room.
    pub(super) fn admit(&mut self, key: OriginKey, limit: usize) -> bool {
        let kept = self.forgotten.remove(&key);
        if !self.make_room(key.1, limit) {
            // Nothing was forgotten: it goes back as it was.
            if let Some(kept) = kept {
                self.forgotten.insert(key, kept);
            }
            return false;
        }
        if let Some((seen, _)) = kept {
            self.follow(key, seen);
        }
        true
    }

    /// Follows `key`, not heard yet, from `seen`.
    pub(super) fn follow(&mut self, key: OriginKey, seen: Seen) -> &mut Seen {
        match self.heard.entry(key) {
            Entry::Occupied(followed) => followed.into_mut(),
            Entry::Vacant(new) => {
                *self.counts.entry(key.1).or_default() += 1;
                new.insert(seen)
            }
        }
    }

    /// Makes room on `partition` for one more origin when `limit` are
    /// followed there: forgets the eighth of those gone (stopped cleanly, or
    /// silent) that were heard longest ago, at least one. Whether there is
    /// room: not if every origin of the partition is live.
    fn make_room(&mut self, partition: u32, limit: usize) -> bool {
        if self.counts.get(&partition).copied().unwrap_or(0) < limit {
            return true;
        }
        if self.full.contains(&partition) {
            return false;
        }
        let mut gone: Vec<(Instant, OriginKey)> =
            self.heard.iter().filter(|(k, s)| k.1 == partition && s.gone()).map(|(&k, s)| (s.heard, k)).collect();
        if gone.is_empty() {
            self.full.insert(partition);
            return false;
        }
        let n = (gone.len() / 8).max(1);
        gone.select_nth_unstable_by_key(n - 1, |&(heard, _)| heard);
        let oldest: HashSet<OriginKey> = gone[..n].iter().map(|&(_, k)| k).collect();
        self.forget(|k, _| !oldest.contains(k));
        true
    }

    /// When the last origin of `partition` forgotten while silent without
    /// having stopped was last heard, if one was.
    pub(super) fn silenced(&self, partition: u32) -> Option<Instant> {
        self.silenced.get(&partition).copied()
    }

    /// Forgets the origins that `keep` does not keep, remembering the last
    /// [`FORGOTTEN_ORIGINS`] of them.
    pub(super) fn forget(&mut self, mut keep: impl FnMut(&OriginKey, &Seen) -> bool) {
        let Origins { heard, counts, forgotten, order, forgets, silenced, full } = self;
        full.clear();
        heard.retain(|key, seen| {
            if keep(key, seen) {
                return true;
            }
            if let Some(count) = counts.get_mut(&key.1) {
                *count = count.saturating_sub(1);
            }
            if seen.silent && !seen.ended {
                let at = silenced.entry(key.1).or_insert(seen.heard);
                *at = (*at).max(seen.heard);
            }
            *forgets += 1;
            forgotten.insert(*key, (*seen, *forgets));
            order.push_back((*key, *forgets));
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

/// How many origins (nodes) a receiver follows at most on each partition.
/// When a new one would pass the limit, those gone (stopped, or silent)
/// longest are forgotten first (one forgotten while silent still keeps an
/// invalidator flushing the partition for its window, as if followed); if
/// every one is live, the new origin's frame is refused
/// (`RejectReason::TooManyOrigins`) and the partition's readers are told of
/// a loss of unknown size. This bounds what a stream of made-up origins can
/// make a receiver hold (without a signing key, anyone who can publish on
/// the channels is trusted).
pub const MAX_ORIGINS_PER_PARTITION: usize = 1024;

/// Heartbeats after which an origin that stopped cleanly is forgotten (and
/// kept on among the last [`FORGOTTEN_ORIGINS`] forgotten).
pub(super) const FORGET_HEARTBEATS: u32 = 100;

/// How long an origin that fell silent without stopping is remembered (at
/// least [`FORGET_HEARTBEATS`] heartbeats): if it is heard again meanwhile,
/// with the same epoch, what it sent while unheard is a gap of known size.
/// (Forgetting it sooner would take its next frame for a first one.)
pub(super) const FORGET_SILENT: Duration = Duration::from_secs(24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    /// Origins `from..from + n` on `partition`, heard `at`, silent or live.
    fn follow(origins: &mut Origins, partition: u32, from: u64, n: u64, at: Instant, silent: bool) {
        for id in from..from + n {
            let mut seen = Seen::new(1, 1, at);
            seen.silent = silent;
            origins.follow((NodeId(id), partition), seen);
        }
    }

    #[test]
    fn room_is_made_by_forgetting_the_gone_origins_heard_longest_ago_never_live_ones() {
        let start = Instant::now();
        let mut origins = Origins::default();
        follow(&mut origins, 0, 0, 16, start, false);
        assert!(origins.make_room(0, 17), "below the limit");
        assert!(!origins.make_room(0, 16), "every origin is live: no room");
        assert!(origins.make_room(1, 16), "the limit is each partition's");
        assert_eq!(origins.heard.len(), 16);

        // 16 silent ones, heard at 16 different times: the 2 oldest go.
        for i in 0..16 {
            follow(&mut origins, 0, 100 + i, 1, start + Duration::from_secs(i), true);
        }
        origins.forget(|_, _| true); // (a silence check: the partition may have room again)
        assert!(origins.make_room(0, 32));
        assert_eq!(origins.heard.len(), 30);
        assert!(!origins.heard.contains_key(&(NodeId(100), 0)) && !origins.heard.contains_key(&(NodeId(101), 0)));
        assert!((0..16).all(|id| origins.heard.contains_key(&(NodeId(id), 0))), "the live ones stay");
        // The partition still has a silent node, as when it was followed.
        assert_eq!(origins.silenced(0), Some(start + Duration::from_secs(1)));
        assert_eq!(origins.silenced(1), None);
        // Forgotten, not lost: heard again, it is judged from where it stood.
        assert!(origins.recall((NodeId(100), 0)).is_some_and(|s| s.silent));
        assert!(origins.make_room(0, 32), "the count follows: 31 of 32");

        // Heard at the same time (as after a reconnection): an eighth still.
        let mut tied = Origins::default();
        follow(&mut tied, 0, 0, 16, start, true);
        assert!(tied.make_room(0, 16));
        assert_eq!(tied.heard.len(), 14);
    }

    #[test]
    fn a_forgotten_origin_refused_for_want_of_room_is_still_recalled_later() {
        let start = Instant::now();
        let mut origins = Origins::default();
        follow(&mut origins, 0, 9, 1, start, true);
        origins.forget(|_, _| false);
        follow(&mut origins, 0, 0, 4, start, false);
        assert!(!origins.admit((NodeId(9), 0), 4), "every origin is live: no room");
        assert!(!origins.heard.contains_key(&(NodeId(9), 0)));
        origins.forget(|k, _| k.0 != NodeId(0)); // one falls silent and goes
        assert!(origins.admit((NodeId(9), 0), 4));
        assert!(origins.heard.get(&(NodeId(9), 0)).is_some_and(|s| s.silent), "followed from where it stood");
    }
}

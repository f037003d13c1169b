//! The deadlines of a shard's entries, nearest first: what a sweep looks at
//! instead of every entry.
//!
//! A record is an entry's deadline and its key's hash. A time to live that
//! is the same for every write (the default one, say) gives deadlines that
//! only grow: those join a queue at its back and leave it from its front,
//! both in cache lines just used. Only a deadline earlier than the last one
//! queued goes to a binary heap.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

#[derive(Default)]
pub(crate) struct Expiries {
    /// Records in the order of their deadlines.
    queue: VecDeque<(u64, u64)>,
    /// Records that came with a deadline earlier than the queue's last one.
    heap: BinaryHeap<Reverse<(u64, u64)>>,
}

impl Expiries {
    /// Records in any order.
    pub(crate) fn from_records(records: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut queue: Vec<_> = records.into_iter().collect();
        queue.sort_unstable();
        Expiries { queue: queue.into(), heap: BinaryHeap::new() }
    }

    #[inline]
    pub(crate) fn push(&mut self, at: u64, hash: u64) {
        match self.queue.back() {
            Some(&(last, _)) if at < last => self.heap.push(Reverse((at, hash))),
            _ => self.queue.push_back((at, hash)),
        }
    }

    /// Takes a record whose deadline is `now` or earlier; returns its hash.
    pub(crate) fn pop_due(&mut self, now: u64) -> Option<u64> {
        if self.queue.front().is_some_and(|&(at, _)| at <= now) {
            return self.queue.pop_front().map(|(_, hash)| hash);
        }
        if self.heap.peek().is_some_and(|&Reverse((at, _))| at <= now) {
            return self.heap.pop().map(|Reverse((_, hash))| hash);
        }
        None
    }

    /// Whether a record's deadline is `now` or earlier.
    pub(crate) fn has_due(&self, now: u64) -> bool {
        self.queue.front().is_some_and(|&(at, _)| at <= now)
            || self.heap.peek().is_some_and(|&Reverse((at, _))| at <= now)
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len() + self.heap.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.heap.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(e: &mut Expiries, now: u64) -> Vec<u64> {
        std::iter::from_fn(|| e.pop_due(now)).collect()
    }

    #[test]
    fn records_come_due_by_their_deadlines_in_any_order_of_arrival() {
        let mut e = Expiries::default();
        for (at, hash) in [(10, 1), (20, 2), (5, 3), (30, 4), (20, 5), (1, 6)] {
            e.push(at, hash);
        }
        assert_eq!(e.len(), 6);
        assert_eq!(e.heap.len(), 3, "three came earlier than the last one queued");
        let mut due = drain(&mut e, 10);
        due.sort_unstable();
        assert_eq!(due, [1, 3, 6]);
        let mut due = drain(&mut e, 20);
        due.sort_unstable();
        assert_eq!(due, [2, 5]);
        assert_eq!(drain(&mut e, 29), [] as [u64; 0]);
        assert_eq!(drain(&mut e, u64::MAX), [4]);
        assert!(e.is_empty());
    }

    #[test]
    fn records_given_at_once_are_queued_in_order() {
        let mut e = Expiries::from_records([(3, 30), (1, 10), (2, 20)]);
        assert!(e.heap.is_empty());
        assert_eq!(drain(&mut e, 2), [10, 20]);
        e.clear();
        assert!(e.is_empty() && e.pop_due(u64::MAX).is_none());
    }
}

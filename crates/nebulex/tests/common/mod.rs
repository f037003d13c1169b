//! Helpers shared by the integration tests: an event recorder, the replay of
//! an event stream into a key set, and the per-key version check.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use nebulex::{Cache, CacheEntryEvent, Command, EventFilter, EventType, Target};

/// An event without its metadata and version: what the tests compare.
pub type Brief<K> = (EventType, Target<K>, Command);

pub fn brief<K: Clone>(e: &CacheEntryEvent<K>) -> Brief<K> {
    (e.kind, e.target.clone(), e.command)
}

/// Collects every event a cache emits (clones pushed from the listener).
pub struct Recorder<K> {
    events: Arc<Mutex<Vec<CacheEntryEvent<K>>>>,
}

impl<K: Clone + Send + Sync + 'static> Recorder<K> {
    /// Registers a listener for every event type under the id `"recorder"`.
    pub fn attach<V>(cache: &Cache<K, V>) -> Self
    where
        K: Eq + Hash,
        V: Clone + Send + Sync + 'static,
    {
        Self::attach_with(cache, "recorder", EventFilter::all())
    }

    pub fn attach_with<V>(cache: &Cache<K, V>, id: &str, filter: EventFilter) -> Self
    where
        K: Eq + Hash,
        V: Clone + Send + Sync + 'static,
    {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        cache.register_event_listener(id, filter, move |e| lock(&sink).push(e.clone())).expect("listener id is free");
        Recorder { events }
    }

    /// Removes and returns the events recorded so far.
    pub fn take(&self) -> Vec<CacheEntryEvent<K>> {
        std::mem::take(&mut *lock(&self.events))
    }

    /// Removes and returns the events recorded so far, without metadata.
    pub fn take_brief(&self) -> Vec<Brief<K>> {
        self.take().iter().map(brief).collect()
    }

    /// A copy of the events recorded so far (they stay recorded).
    pub fn snapshot(&self) -> Vec<CacheEntryEvent<K>> {
        lock(&self.events).clone()
    }

    pub fn len(&self) -> usize {
        lock(&self.events).len()
    }
}

/// Locks a std mutex, ignoring poisoning (a failed assertion elsewhere must
/// not hide the first failure behind a `PoisonError`).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Replays events into the set of keys present: `Inserted`/`Updated` make a
/// key present, `Deleted`/`Expired`/`Evicted` absent, `Target::All` clears.
///
/// Also checks that the history is valid for every key: no `Inserted` while
/// present; no `Updated`, `Expired`, `Evicted` or `Deleted` from `take` while
/// absent (a `delete` / `delete_all` may name an absent key).
pub fn replay<K: Clone + Eq + Hash + Debug>(events: &[CacheEntryEvent<K>]) -> HashSet<K> {
    let mut present = HashSet::new();
    for (i, e) in events.iter().enumerate() {
        match (&e.target, e.kind) {
            (Target::All, EventType::Deleted) => present.clear(),
            (Target::All, kind) => panic!("event #{i}: target All with kind {kind}: {e:?}"),
            (target, kind) => {
                for k in target.keys() {
                    match kind {
                        EventType::Inserted => {
                            assert!(present.insert(k.clone()), "event #{i}: Inserted while {k:?} is present: {e:?}")
                        }
                        EventType::Updated => {
                            assert!(present.contains(k), "event #{i}: Updated while {k:?} is absent: {e:?}")
                        }
                        EventType::Expired | EventType::Evicted => {
                            assert!(present.remove(k), "event #{i}: {kind} while {k:?} is absent: {e:?}")
                        }
                        EventType::Deleted => {
                            let was = present.remove(k);
                            if e.command == Command::Take {
                                assert!(was, "event #{i}: Deleted by take while {k:?} is absent: {e:?}");
                            }
                        }
                    }
                }
            }
        }
    }
    present
}

/// Checks that for every key, each event naming it (or `Target::All`) has a
/// greater version than the key's previous event.
pub fn assert_versions_increase<K: Clone + Eq + Hash + Debug>(events: &[CacheEntryEvent<K>]) {
    let mut last: HashMap<K, u64> = HashMap::new();
    let mut last_all = 0u64;
    for (i, e) in events.iter().enumerate() {
        match &e.target {
            Target::All => {
                let max = last.values().copied().max().unwrap_or(0).max(last_all);
                assert!(e.version > max, "event #{i}: version {} of an All event not above {max}: {e:?}", e.version);
                last_all = e.version;
            }
            target => {
                // A key named twice by one event (`delete_all(Keys([k, k]))`) is one write.
                let mut keys: Vec<&K> = Vec::new();
                for k in target.keys() {
                    if !keys.contains(&k) {
                        keys.push(k);
                    }
                }
                for k in keys {
                    let prev = last.get(k).copied().unwrap_or(0).max(last_all);
                    assert!(e.version > prev, "event #{i}: version {} of {k:?} not above {prev}: {e:?}", e.version);
                    last.insert(k.clone(), e.version);
                }
            }
        }
    }
}

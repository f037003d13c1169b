//! A value's `Drop` runs once the call that replaced or removed it has
//! made its change, emitted its events and released its locks: one that
//! panics leaves the cache whole, and one that calls the cache finds no
//! lock held.
#![allow(clippy::unwrap_used)]

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use common::{replay, Recorder};
use nebulex::{Cache, EventType, ManualClock, Query, WeakCache};

const NO_SWEEP: Duration = Duration::from_secs(3600);

/// A value whose `Drop` panics once while its own fuse is armed. A clone has
/// a fuse of its own, unarmed.
#[derive(Debug)]
struct Bomb {
    id: u32,
    fuse: Arc<AtomicBool>,
}

impl Bomb {
    fn armed(id: u32) -> (Bomb, Arc<AtomicBool>) {
        let fuse = Arc::new(AtomicBool::new(true));
        (Bomb { id, fuse: fuse.clone() }, fuse)
    }
    fn safe(id: u32) -> Bomb {
        Bomb { id, fuse: Arc::new(AtomicBool::new(false)) }
    }
}

impl Clone for Bomb {
    fn clone(&self) -> Self {
        Bomb::safe(self.id)
    }
}

impl Drop for Bomb {
    fn drop(&mut self) {
        if self.fuse.swap(false, Ordering::SeqCst) {
            panic!("Drop of value {} panics", self.id);
        }
    }
}

fn disarm(fuses: &[Arc<AtomicBool>]) {
    fuses.iter().for_each(|f| f.store(false, Ordering::SeqCst));
}

/// `put_all` far past the bound evicts values whose `Drop` panics: the
/// trim still ends within the bound, and the panic reaches the caller.
#[test]
fn a_value_whose_drop_panics_as_a_bulk_write_evicts_leaves_the_shard_within_its_bound() {
    let cache: Cache<u32, Bomb> = Cache::builder().shards(1).max_entries(4).sweep_interval(NO_SWEEP).build().unwrap();
    let (entries, fuses): (Vec<_>, Vec<_>) = (0..10)
        .map(|i| {
            let (b, f) = Bomb::armed(i);
            ((i, b), f)
        })
        .unzip();
    let r = catch_unwind(AssertUnwindSafe(|| cache.put_all(entries)));
    disarm(&fuses);
    assert!(r.is_err(), "the drop panic reaches the caller");
    assert!(cache.len() <= 4, "len() = {} > max_entries 4 after the panic", cache.len());
}

/// A single-key write into a full shard evicts a value whose `Drop`
/// panics: the victim's `Evicted` event says it is gone.
#[test]
fn a_value_whose_drop_panics_as_it_is_evicted_leaves_with_its_evicted_event() {
    let cache: Cache<u32, Bomb> = Cache::builder().shards(1).max_entries(1).sweep_interval(NO_SWEEP).build().unwrap();
    let rec = Recorder::attach(&cache);
    let (b, fuse) = Bomb::armed(1);
    cache.put(1, b);
    let r = catch_unwind(AssertUnwindSafe(|| cache.put(2, Bomb::safe(2))));
    disarm(&[fuse]);
    assert!(r.is_err());
    let events = rec.take();
    let present = replay(&events);
    let kinds: Vec<_> = events.iter().map(|e| (e.kind, e.target.clone())).collect();
    assert_eq!(
        present.contains(&1),
        cache.contains_key(&1),
        "key 1 is gone from the cache but the events {kinds:?} never removed it"
    );
}

/// `put` over a live entry whose old value's `Drop` panics: the new value
/// is stored with its `Updated` event.
#[test]
fn a_value_whose_drop_panics_as_a_put_replaces_it_leaves_with_an_updated_event() {
    let cache: Cache<u32, Bomb> = Cache::builder().sweep_interval(NO_SWEEP).build().unwrap();
    let rec = Recorder::attach(&cache);
    let (b, fuse) = Bomb::armed(1);
    cache.put(1, b);
    let r = catch_unwind(AssertUnwindSafe(|| cache.put(1, Bomb::safe(2))));
    disarm(&[fuse]);
    assert!(r.is_err());
    let kinds: Vec<_> = rec.take().iter().map(|e| e.kind).collect();
    assert_eq!(cache.get(&1).map(|b| b.id), Some(2));
    assert_eq!(kinds, [EventType::Inserted, EventType::Updated]);
}

/// `delete` of an entry whose value's `Drop` panics: the entry is gone with
/// its `Deleted` event.
#[test]
fn a_value_whose_drop_panics_as_it_is_deleted_leaves_with_its_deleted_event() {
    let cache: Cache<u32, Bomb> = Cache::builder().sweep_interval(NO_SWEEP).build().unwrap();
    let rec = Recorder::attach(&cache);
    let (b, fuse) = Bomb::armed(1);
    cache.put(1, b);
    let r = catch_unwind(AssertUnwindSafe(|| cache.delete(&1)));
    disarm(&[fuse]);
    assert!(r.is_err());
    let kinds: Vec<_> = rec.take().iter().map(|e| e.kind).collect();
    assert!(!cache.contains_key(&1));
    assert_eq!(kinds, [EventType::Inserted, EventType::Deleted]);
}

/// A sweep that meets a value whose `Drop` panics: every entry it removed
/// has its `Expired` event.
#[test]
fn values_whose_drop_panics_in_a_sweep_leave_with_their_expired_events() {
    let clock = ManualClock::new();
    let cache: Cache<u32, Bomb> =
        Cache::builder().shards(1).sweep_interval(NO_SWEEP).clock(clock.clone()).build().unwrap();
    let rec = Recorder::attach(&cache);
    let mut fuses = Vec::new();
    for i in 0..8 {
        if i == 5 {
            let (b, f) = Bomb::armed(i);
            fuses.push(f);
            cache.put_with_ttl(i, b, Duration::from_secs(1));
        } else {
            cache.put_with_ttl(i, Bomb::safe(i), Duration::from_secs(1));
        }
    }
    clock.advance(Duration::from_secs(2));
    let r = catch_unwind(AssertUnwindSafe(|| cache.sweep_expired()));
    disarm(&fuses);
    assert!(r.is_err());
    let events = rec.take();
    let present = replay(&events);
    let held = cache.len();
    assert_eq!(
        present.len(),
        held,
        "the events leave {} keys present, the cache holds {held}: {} entries left with no event",
        present.len(),
        present.len() - held
    );
}

/// A value that, when dropped, removes its companion key `by` from the
/// cache it was stored in (a secondary index entry, say).
#[derive(Clone)]
struct Indexed {
    by: u32,
    home: Home,
}

/// Where an [`Indexed`] value lives: set once it is stored.
type Home = Arc<OnceLock<WeakCache<u32, Indexed>>>;

impl Drop for Indexed {
    fn drop(&mut self) {
        if let Some(cache) = self.home.get().and_then(WeakCache::upgrade) {
            cache.invalidate(&self.by);
        }
    }
}

/// Runs `call` on a thread of its own; fails if it has not returned after 5 s.
fn within_5s(what: &str, call: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        call();
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(5)).is_ok(),
        "{what} deadlocked: a value was dropped under its shard's lock"
    );
}

fn setup() -> (Cache<u32, Indexed>, Home) {
    let cache: Cache<u32, Indexed> =
        Cache::builder().shards(1).sweep_interval(Duration::from_secs(3600)).build().unwrap();
    let home = Arc::new(OnceLock::new());
    let _ = home.set(cache.downgrade());
    (cache, home)
}

#[test]
fn a_value_whose_drop_calls_the_cache_may_be_replaced_by_a_put() {
    let (cache, home) = setup();
    // Only the stored one cleans up: the clones it hands out do not.
    cache.put(1, Indexed { by: 100, home: home.clone() });
    let inert = Arc::new(OnceLock::new());
    within_5s("put over the entry", move || cache.put(1, Indexed { by: 0, home: inert }));
}

#[test]
fn a_value_whose_drop_calls_the_cache_may_be_deleted() {
    let (cache, home) = setup();
    cache.put(1, Indexed { by: 100, home });
    within_5s("delete", move || {
        cache.delete(&1);
    });
}

#[test]
fn a_value_whose_drop_calls_the_cache_may_be_deleted_with_all_the_others() {
    let (cache, home) = setup();
    cache.put(1, Indexed { by: 100, home });
    within_5s("delete_all(All)", move || {
        cache.delete_all(Query::All);
    });
}

#[test]
fn a_value_whose_drop_calls_the_cache_may_be_evicted() {
    let cache: Cache<u32, Indexed> =
        Cache::builder().shards(1).max_entries(1).sweep_interval(Duration::from_secs(3600)).build().unwrap();
    let home = Arc::new(OnceLock::new());
    let _ = home.set(cache.downgrade());
    cache.put(1, Indexed { by: 100, home });
    within_5s("a put that evicts it", move || {
        cache.put(2, Indexed { by: 0, home: Arc::new(OnceLock::new()) });
        assert!(!cache.contains_key(&1) && cache.contains_key(&2));
    });
}

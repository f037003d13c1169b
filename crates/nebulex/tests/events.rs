//! One test per row of the event table (`Cache` docs, DESIGN.md "Cache" and
//! "Events"): every call emits exactly the documented events, and returns
//! what the table says.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_versions_increase, replay, Recorder};
use nebulex::{Cache, Command, Error, EventFilter, EventType, ManualClock, NodeId, Query, Target, MIN_SWEEP_INTERVAL};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use Command as C;
use EventType::{Deleted, Evicted, Expired, Inserted, Updated};
use Target::{Key, Keys};

/// The background sweep never runs during these tests unless asked for.
const NO_SWEEP: Duration = Duration::from_secs(3600);

fn cache<V: Clone + Send + Sync + 'static>() -> Cache<u32, V> {
    Cache::builder().name("events").sweep_interval(NO_SWEEP).build().unwrap()
}

fn manual<V: Clone + Send + Sync + 'static>() -> (Cache<u32, V>, ManualClock) {
    let clock = ManualClock::new();
    let cache = Cache::builder().name("events").sweep_interval(NO_SWEEP).clock(clock.clone()).build().unwrap();
    (cache, clock)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ----- put / put_with_ttl ------------------------------------------------

#[test]
fn put_emits_inserted_for_a_new_key_and_updated_for_a_live_one() {
    let c = cache::<i32>();
    let r = Recorder::attach(&c);
    c.put(1, 10);
    c.put(1, 11);
    c.put(2, 20);
    assert_eq!(r.take_brief(), [(Inserted, Key(1), C::Put), (Updated, Key(1), C::Put), (Inserted, Key(2), C::Put)]);
    assert_eq!(c.get(&1), Some(11));
}

#[test]
fn put_after_delete_emits_inserted_not_updated() {
    let c = cache::<i32>();
    c.put(1, 10);
    c.delete(&1);
    let r = Recorder::attach(&c);
    c.put(1, 11);
    assert_eq!(r.take_brief(), [(Inserted, Key(1), C::Put)]);
}

#[test]
fn put_over_an_expired_entry_emits_expired_then_inserted() {
    let (c, clock) = manual::<i32>();
    let r = Recorder::attach(&c);
    c.put_with_ttl(1, 10, ms(10));
    clock.advance(ms(10));
    c.put(1, 11);
    assert_eq!(r.take_brief(), [(Inserted, Key(1), C::Put), (Expired, Key(1), C::Put), (Inserted, Key(1), C::Put)]);
    assert_eq!(c.get(&1), Some(11));
    assert_eq!(c.ttl(&1), Some(None), "a plain put without default_ttl never expires");
}

#[test]
fn put_with_ttl_emits_updated_over_a_live_entry_and_sets_the_new_ttl() {
    let (c, clock) = manual::<i32>();
    let r = Recorder::attach(&c);
    c.put(1, 10);
    c.put_with_ttl(1, 11, ms(50));
    assert_eq!(r.take_brief(), [(Inserted, Key(1), C::Put), (Updated, Key(1), C::Put)]);
    assert_eq!(c.ttl(&1), Some(Some(ms(50))));
    clock.advance(ms(49));
    assert_eq!(c.get(&1), Some(11));
    clock.advance(ms(1));
    assert_eq!(c.get(&1), None);
}

#[test]
fn default_ttl_applies_to_put_and_put_with_ttl_overrides_it() {
    let clock = ManualClock::new();
    let c: Cache<u32, i32> =
        Cache::builder().default_ttl(ms(100)).sweep_interval(NO_SWEEP).clock(clock.clone()).build().unwrap();
    c.put(1, 1);
    c.put_with_ttl(2, 2, ms(300));
    assert_eq!(c.ttl(&1), Some(Some(ms(100))));
    clock.advance(ms(100));
    assert_eq!(c.get(&1), None);
    assert_eq!(c.get(&2), Some(2));
}

// ----- put_new / replace -------------------------------------------------

#[test]
fn put_new_emits_inserted_only_when_it_wrote() {
    let (c, clock) = manual::<i32>();
    let r = Recorder::attach(&c);
    assert!(c.put_new(1, 10));
    assert!(!c.put_new(1, 11));
    assert_eq!(c.get(&1), Some(10));
    assert_eq!(r.take_brief(), [(Inserted, Key(1), C::PutNew)]);

    c.put_with_ttl(2, 20, ms(5));
    clock.advance(ms(5));
    r.take();
    assert!(c.put_new(2, 21), "an expired entry does not block put_new");
    assert_eq!(r.take_brief(), [(Expired, Key(2), C::PutNew), (Inserted, Key(2), C::PutNew)]);
}

#[test]
fn replace_emits_updated_only_when_it_wrote() {
    let (c, clock) = manual::<i32>();
    let r = Recorder::attach(&c);
    assert!(!c.replace(1, 10));
    assert_eq!(c.get(&1), None);
    assert_eq!(r.take_brief(), []);

    c.put(1, 10);
    assert!(c.replace(1, 11));
    assert_eq!(c.get(&1), Some(11));
    assert_eq!(r.take_brief(), [(Inserted, Key(1), C::Put), (Updated, Key(1), C::Replace)]);

    c.put_with_ttl(2, 20, ms(5));
    clock.advance(ms(5));
    r.take();
    assert!(!c.replace(2, 21), "an expired entry is not replaced");
    assert_eq!(c.get(&2), None);
    assert_eq!(r.take_brief(), [(Expired, Key(2), C::Replace)]);
}

// ----- put_all / put_new_all -----------------------------------------------

#[test]
fn put_all_names_new_keys_in_one_inserted_and_existing_keys_in_one_updated() {
    let c = cache::<i32>();
    c.put(1, 10);
    c.put(2, 20);
    let r = Recorder::attach(&c);
    c.put_all([(1, 11), (3, 30), (2, 21), (4, 40), (3, 31)]);
    assert_eq!(r.take_brief(), [(Inserted, Keys(vec![3, 4]), C::PutAll), (Updated, Keys(vec![1, 2]), C::PutAll)]);
    let all = c.get_all(&[1, 2, 3, 4]);
    assert_eq!(all, HashMap::from([(1, 11), (2, 21), (3, 31), (4, 40)]), "the last value of a repeated key wins");
}

#[test]
fn put_all_of_only_new_keys_emits_only_inserted_and_of_nothing_emits_nothing() {
    let c = cache::<i32>();
    let r = Recorder::attach(&c);
    c.put_all([(1, 1), (2, 2)]);
    assert_eq!(r.take_brief(), [(Inserted, Keys(vec![1, 2]), C::PutAll)]);
    c.put_all([(1, 3), (2, 4)]);
    assert_eq!(r.take_brief(), [(Updated, Keys(vec![1, 2]), C::PutAll)]);
    c.put_all(Vec::<(u32, i32)>::new());
    assert_eq!(r.take_brief(), []);
}

#[test]
fn put_new_all_is_all_or_nothing() {
    let c = cache::<i32>();
    c.put(2, 20);
    let r = Recorder::attach(&c);
    assert!(!c.put_new_all([(1, 10), (2, 21), (3, 30)]));
    assert_eq!(r.take_brief(), [], "a refused put_new_all emits nothing");
    assert_eq!(c.get(&1), None);
    assert_eq!(c.get(&2), Some(20));
    assert_eq!(c.get(&3), None);

    assert!(c.put_new_all([(1, 10), (3, 30)]));
    assert_eq!(r.take_brief(), [(Inserted, Keys(vec![1, 3]), C::PutNewAll)]);
    assert_eq!(c.get_all(&[1, 3]), HashMap::from([(1, 10), (3, 30)]));
}

#[test]
fn put_new_all_writes_over_expired_entries() {
    let (c, clock) = manual::<i32>();
    c.put_with_ttl(1, 10, ms(5));
    clock.advance(ms(5));
    let r = Recorder::attach(&c);
    assert!(c.put_new_all([(1, 11), (2, 21)]));
    assert_eq!(r.take_brief(), [(Expired, Key(1), C::PutNewAll), (Inserted, Keys(vec![1, 2]), C::PutNewAll)]);
}

// ----- delete / take -----------------------------------------------------------

#[test]
fn delete_of_absent_key_still_emits_deleted() {
    let c = cache::<i32>();
    let r = Recorder::attach(&c);
    assert!(!c.delete(&7));
    assert_eq!(r.take_brief(), [(Deleted, Key(7), C::Delete)]);
}

#[test]
fn delete_of_live_key_returns_true_and_emits_deleted() {
    let c = cache::<i32>();
    c.put(1, 10);
    let r = Recorder::attach(&c);
    assert!(c.delete(&1));
    assert_eq!(c.get(&1), None);
    assert!(!c.delete(&1), "the second delete finds nothing");
    assert_eq!(r.take_brief(), [(Deleted, Key(1), C::Delete), (Deleted, Key(1), C::Delete)]);
}

#[test]
fn delete_of_expired_key_returns_false_and_emits_expired_then_deleted() {
    let (c, clock) = manual::<i32>();
    c.put_with_ttl(1, 10, ms(5));
    clock.advance(ms(5));
    let r = Recorder::attach(&c);
    assert!(!c.delete(&1));
    assert_eq!(r.take_brief(), [(Expired, Key(1), C::Delete), (Deleted, Key(1), C::Delete)]);
    assert_eq!(c.len(), 0);
}

#[test]
fn take_emits_deleted_only_when_it_removed_a_live_entry() {
    let (c, clock) = manual::<i32>();
    let r = Recorder::attach(&c);
    assert_eq!(c.take(&1), None);
    assert_eq!(r.take_brief(), []);

    c.put(1, 10);
    r.take();
    assert_eq!(c.take(&1), Some(10));
    assert_eq!(c.get(&1), None);
    assert_eq!(r.take_brief(), [(Deleted, Key(1), C::Take)]);

    c.put_with_ttl(2, 20, ms(5));
    clock.advance(ms(5));
    r.take();
    assert_eq!(c.take(&2), None);
    assert_eq!(r.take_brief(), [(Expired, Key(2), C::Take)], "an expired entry is expired, not deleted");
}

// ----- delete_all ----------------------------------------------------------------

#[test]
fn delete_all_of_all_emits_deleted_target_all_even_on_an_empty_cache() {
    let c = cache::<i32>();
    let r = Recorder::attach(&c);
    assert_eq!(c.delete_all(Query::All), 0);
    assert_eq!(r.take_brief(), [(Deleted, Target::All, C::DeleteAll)]);

    c.put_all((0..5).map(|i| (i, 0)));
    r.take();
    assert_eq!(c.delete_all(Query::All), 5);
    assert_eq!(r.take_brief(), [(Deleted, Target::All, C::DeleteAll)]);
    assert!(c.is_empty());
}

#[test]
fn delete_all_of_all_counts_only_live_entries_and_expires_the_others() {
    let (c, clock) = manual::<i32>();
    c.put(1, 10);
    c.put_with_ttl(2, 20, ms(5));
    c.put(3, 30);
    clock.advance(ms(5));
    let r = Recorder::attach(&c);
    assert_eq!(c.delete_all(Query::All), 2);
    assert_eq!(r.take_brief(), [(Expired, Key(2), C::DeleteAll), (Deleted, Target::All, C::DeleteAll)]);
}

#[test]
fn delete_all_of_keys_emits_deleted_naming_every_asked_key_even_absent_ones() {
    let c = cache::<i32>();
    c.put(1, 10);
    c.put(2, 20);
    let r = Recorder::attach(&c);
    assert_eq!(c.delete_all(Query::Keys(vec![1, 9])), 1);
    assert_eq!(r.take_brief(), [(Deleted, Keys(vec![1, 9]), C::DeleteAll)]);
    assert_eq!(c.delete_all(Query::Keys(vec![9, 8])), 0);
    assert_eq!(r.take_brief(), [(Deleted, Keys(vec![9, 8]), C::DeleteAll)]);
    assert_eq!(c.get(&2), Some(20));
}

#[test]
fn delete_all_of_a_filter_names_only_the_removed_keys_and_emits_nothing_when_none() {
    let c = cache::<i32>();
    c.put_all((1..=6).map(|i| (i, i as i32 * 10)));
    let r = Recorder::attach(&c);
    assert_eq!(c.delete_all(Query::filter(|_, v| *v >= 40)), 3);
    let events = r.take();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!((events[0].kind, events[0].command), (Deleted, C::DeleteAll));
    let removed: HashSet<u32> = events[0].target.keys().iter().copied().collect();
    assert_eq!(removed, HashSet::from([4, 5, 6]));
    assert!(matches!(events[0].target, Keys(_)));

    assert_eq!(c.delete_all(Query::filter(|_, v| *v > 1000)), 0);
    assert_eq!(r.take_brief(), [], "a filter that removed nothing emits nothing");
    assert_eq!(c.count_all(Query::All), 3);
}

// ----- reads -----------------------------------------------------------------------

#[test]
fn reads_counts_and_len_of_live_entries_emit_nothing() {
    let c = cache::<i32>();
    c.put(1, 10);
    let r = Recorder::attach(&c);
    assert_eq!(c.get(&1), Some(10));
    assert_eq!(c.get(&2), None);
    assert_eq!(c.get_all(&[1, 2]), HashMap::from([(1, 10)]));
    assert!(c.contains_key(&1));
    assert!(!c.contains_key(&2));
    assert_eq!(c.ttl(&1), Some(None));
    assert_eq!(c.ttl(&2), None);
    assert_eq!(c.count_all(Query::All), 1);
    assert_eq!(c.count_all(Query::Keys(vec![1, 1, 2])), 1);
    assert_eq!(c.count_all(Query::filter(|_, v| *v == 10)), 1);
    assert_eq!(c.len(), 1);
    assert!(!c.is_empty());
    assert_eq!(r.take_brief(), []);
}

/// Each kind of read that finds an expired entry removes it with exactly one
/// `Expired` event; nothing later (another read, a sweep) emits a second one.
#[test]
fn each_read_of_an_expired_entry_emits_exactly_one_expired() {
    type Read = fn(&Cache<u32, i32>) -> bool;
    let reads: [(&str, Read); 5] = [
        ("get", |c| c.get(&1).is_some()),
        ("get_all", |c| !c.get_all(&[1]).is_empty()),
        ("contains_key", |c| c.contains_key(&1)),
        ("ttl", |c| c.ttl(&1).is_some()),
        ("count_all then get", |c| c.count_all(Query::All) > 0 || c.get(&1).is_some()),
    ];
    for (name, read) in reads {
        let (c, clock) = manual::<i32>();
        c.put_with_ttl(1, 10, ms(10));
        clock.advance(ms(10) - Duration::from_nanos(1));
        assert!(read(&c), "{name}: live one nanosecond before its expiry");
        clock.advance(Duration::from_nanos(1));
        let r = Recorder::attach(&c);
        assert!(!read(&c), "{name}: an expired entry is never returned");
        assert!(!read(&c), "{name}");
        assert_eq!(c.sweep_expired(), 0, "{name}: already removed");
        assert_eq!(c.get(&1), None);
        assert_eq!(r.take_brief(), [(Expired, Key(1), C::Get)], "{name}");
        assert_eq!(c.len(), 0, "{name}");
    }
}

/// A sweep skips a shard whose entries cannot have expired yet: every way a
/// deadline can come nearer after a sweep (a new entry, an overwrite, a bulk
/// overwrite, `expire`) must still be swept when it passes, with no read.
#[test]
fn deadlines_set_after_a_sweep_are_swept_when_they_pass() {
    let (c, clock) = manual::<i32>();
    for k in 0..4 {
        c.put_with_ttl(k, 0, Duration::from_secs(100));
    }
    assert_eq!(c.sweep_expired(), 0, "nothing due yet");
    c.put_with_ttl(10, 10, ms(10));
    c.put_with_ttl(0, 0, ms(10));
    c.expire(&1, ms(10));
    let bulk: Cache<u32, i32> = Cache::builder().default_ttl(ms(10)).clock(clock.clone()).build().unwrap();
    bulk.put_with_ttl(2, 2, Duration::from_secs(100));
    assert_eq!(bulk.sweep_expired(), 0, "nothing due yet");
    bulk.put_all([(2, 3), (5, 5)]);
    clock.advance(ms(10));
    assert_eq!(c.sweep_expired(), 3, "the new entry, the overwrite and the expire");
    assert_eq!(bulk.sweep_expired(), 2, "the bulk overwrite and the bulk insert");
    assert_eq!((c.len(), bulk.len()), (2, 0));
    clock.advance(Duration::from_secs(100));
    assert_eq!(c.sweep_expired(), 2, "the entries left, at their own deadline");
}

#[test]
fn sweep_expired_removes_each_expired_entry_with_one_expired_event_and_reads_then_emit_none() {
    let (c, clock) = manual::<i32>();
    c.put_with_ttl(1, 1, ms(10));
    c.put_with_ttl(2, 2, ms(10));
    c.put_with_ttl(3, 3, ms(20));
    c.put(4, 4);
    clock.advance(ms(10));
    assert_eq!(c.len(), 4, "len counts expired entries until they are removed");
    assert_eq!(c.count_all(Query::All), 2, "count_all counts live entries only");
    let r = Recorder::attach(&c);
    assert_eq!(c.sweep_expired(), 2);
    let events = r.take_brief();
    let keys: HashSet<u32> = events.iter().flat_map(|(_, t, _)| t.keys().to_vec()).collect();
    assert_eq!(keys, HashSet::from([1, 2]));
    assert!(events.iter().all(|(_, t, _)| matches!(t, Key(_))), "{events:?}");
    assert!(events.iter().all(|(k, _, c)| (*k, *c) == (Expired, C::Sweep)), "{events:?}");
    assert_eq!(events.len(), 2);
    assert_eq!(c.len(), 2);

    assert_eq!(c.get(&1), None);
    assert!(!c.contains_key(&2));
    assert_eq!(c.sweep_expired(), 0);
    assert_eq!(r.take_brief(), []);

    clock.advance(ms(10));
    assert_eq!(c.sweep_expired(), 1);
    assert_eq!(r.take_brief(), [(Expired, Key(3), C::Sweep)]);
    assert_eq!(c.get(&4), Some(4));
}

#[test]
fn a_sweep_of_many_entries_due_together_in_one_shard_removes_each_once() {
    // More than a sweep takes per hold of a shard's lock: it comes back for
    // the rest in the same call.
    let clock = ManualClock::new();
    let c: Cache<u32, i32> = Cache::builder().shards(1).sweep_interval(NO_SWEEP).clock(clock.clone()).build().unwrap();
    for k in 0..2_000 {
        c.put_with_ttl(k, 0, ms(10));
    }
    for k in 2_000..2_100 {
        c.put_with_ttl(k, 0, ms(20));
    }
    let r = Recorder::attach(&c);
    clock.advance(ms(10));
    assert_eq!(c.sweep_expired(), 2_000);
    let events = r.take_brief();
    assert!(events.iter().all(|(k, _, c)| (*k, *c) == (Expired, C::Sweep)), "only sweep expiries");
    let keys: Vec<u32> = events.iter().flat_map(|(_, t, _)| t.keys().to_vec()).collect();
    assert_eq!(keys.iter().copied().collect::<HashSet<u32>>(), (0..2_000).collect(), "each due entry");
    assert_eq!(keys.len(), 2_000, "once");
    assert_eq!((c.len(), c.sweep_expired()), (100, 0), "the later ones stay");
}

#[test]
fn a_sweep_removes_what_expired_by_the_time_of_the_call() {
    // Deadlines one millisecond apart; every removal moves the clock on by
    // one: a sweep that read the clock again between batches would go on.
    let clock = ManualClock::new();
    let c: Cache<u32, i32> = Cache::builder().shards(1).sweep_interval(NO_SWEEP).clock(clock.clone()).build().unwrap();
    for k in 0..600 {
        c.put_with_ttl(k, 0, ms(u64::from(k) + 1));
    }
    let ticking = clock.clone();
    c.register_event_listener("tick", EventFilter::all(), move |_| ticking.advance(ms(1))).unwrap();
    clock.advance(ms(300));
    assert_eq!(c.sweep_expired(), 300, "the entries due at the call");
    assert_eq!(c.len(), 300);
}

// ----- expire / touch --------------------------------------------------------------

#[test]
fn expire_and_touch_emit_updated_only_for_a_live_entry() {
    let (c, clock) = manual::<i32>();
    let r = Recorder::attach(&c);
    assert!(!c.expire(&1, ms(10)));
    assert!(!c.touch(&1));
    assert_eq!(r.take_brief(), []);

    c.put_with_ttl(1, 10, ms(100));
    assert!(c.expire(&1, ms(1000)));
    assert_eq!(c.ttl(&1), Some(Some(ms(1000))));
    clock.advance(ms(400));
    assert_eq!(c.ttl(&1), Some(Some(ms(600))));
    assert!(c.touch(&1), "touch restarts the last time to live");
    assert_eq!(c.ttl(&1), Some(Some(ms(1000))));
    assert_eq!(r.take_brief(), [(Inserted, Key(1), C::Put), (Updated, Key(1), C::Expire), (Updated, Key(1), C::Touch)]);

    c.put(2, 20);
    r.take();
    assert!(c.touch(&2));
    assert_eq!(c.ttl(&2), Some(None), "touching an entry without expiry keeps it without");
    assert!(c.expire(&2, ms(5)));
    assert_eq!(r.take_brief(), [(Updated, Key(2), C::Touch), (Updated, Key(2), C::Expire)]);
    clock.advance(ms(5));
    assert!(!c.touch(&2));
    assert!(!c.expire(&2, ms(5)));
    assert_eq!(r.take_brief(), [(Expired, Key(2), C::Touch)]);
}

// ----- update / incr / decr --------------------------------------------------------

#[test]
fn update_emits_inserted_then_updated() {
    let c = cache::<i32>();
    let r = Recorder::attach(&c);
    assert_eq!(c.update(1, 10, |v| v + 1), 10);
    assert_eq!(c.update(1, 10, |v| v + 1), 11);
    assert_eq!(c.get(&1), Some(11));
    assert_eq!(r.take_brief(), [(Inserted, Key(1), C::Update), (Updated, Key(1), C::Update)]);
}

#[test]
fn update_keeps_the_ttl_of_an_existing_entry() {
    let (c, clock) = manual::<i32>();
    c.put_with_ttl(1, 10, ms(10));
    clock.advance(ms(4));
    assert_eq!(c.update(1, 0, |v| v * 2), 20);
    assert_eq!(c.ttl(&1), Some(Some(ms(6))));
}

#[test]
fn incr_and_decr_emit_inserted_from_zero_then_updated() {
    let c = cache::<i64>();
    let r = Recorder::attach(&c);
    assert_eq!(c.incr(1, 5), 5);
    assert_eq!(c.incr(1, 5), 10);
    assert_eq!(c.decr(2, 4), -4);
    assert_eq!(c.decr(2, 1), -5);
    assert_eq!(c.decr(1, 3), 7);
    assert_eq!(c.incr(3, i64::MAX), i64::MAX);
    assert_eq!(c.incr(3, 1), i64::MIN, "wraps around on overflow");
    assert_eq!(
        r.take_brief(),
        [
            (Inserted, Key(1), C::Incr),
            (Updated, Key(1), C::Incr),
            (Inserted, Key(2), C::Decr),
            (Updated, Key(2), C::Decr),
            (Updated, Key(1), C::Decr),
            (Inserted, Key(3), C::Incr),
            (Updated, Key(3), C::Incr),
        ]
    );
}

// ----- get_or_insert_with -----------------------------------------------------------

#[test]
fn get_or_insert_with_emits_inserted_with_load_once() {
    let c = cache::<i32>();
    let r = Recorder::attach(&c);
    let calls = AtomicUsize::new(0);
    let load = || {
        calls.fetch_add(1, Ordering::SeqCst);
        42
    };
    assert_eq!(c.get_or_insert_with(1, load), 42);
    assert_eq!(c.get_or_insert_with(1, load), 42);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(r.take_brief(), [(Inserted, Key(1), C::Load)]);
    c.put(2, 7);
    assert_eq!(c.get_or_insert_with(2, load), 7, "a live entry is returned, not loaded");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn get_or_insert_with_reloads_an_expired_entry() {
    let (c, clock) = manual::<i32>();
    c.put_with_ttl(1, 10, ms(5));
    clock.advance(ms(5));
    let r = Recorder::attach(&c);
    assert_eq!(c.get_or_insert_with(1, || 11), 11);
    assert_eq!(r.take_brief(), [(Expired, Key(1), C::Load), (Inserted, Key(1), C::Load)]);
}

#[test]
fn try_get_or_insert_with_error_stores_nothing_and_emits_nothing() {
    let c = cache::<i32>();
    let r = Recorder::attach(&c);
    let err = c.try_get_or_insert_with(1, || Err::<i32, _>("boom")).unwrap_err();
    assert_eq!(*err, "boom");
    assert_eq!(c.get(&1), None);
    assert_eq!(r.take_brief(), []);
    assert_eq!(c.try_get_or_insert_with(1, || Ok::<_, &str>(5)), Ok(5));
    assert_eq!(r.take_brief(), [(Inserted, Key(1), C::Load)]);
}

// ----- eviction ----------------------------------------------------------------------

#[test]
fn a_write_that_must_make_room_removes_an_expired_entry_as_expired_not_evicted() {
    let clock = ManualClock::new();
    let c: Cache<u32, i32> =
        Cache::builder().max_entries(4).shards(1).sweep_interval(NO_SWEEP).clock(clock.clone()).build().unwrap();
    for k in 0..4 {
        c.put_with_ttl(k, 0, ms(10));
    }
    clock.advance(ms(10));
    let r = Recorder::attach(&c);
    c.put(4, 4);
    let events = r.take_brief();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0], (Inserted, Key(4), C::Put));
    let (kind, Key(gone), command) = &events[1] else { panic!("{events:?}") };
    assert_eq!((*kind, *command), (Expired, C::Put), "the write found it expired: {events:?}");
    assert!(*gone < 4, "{events:?}");
    assert_eq!(c.len(), 4);
    // The other expired entries go once each, later; none as evicted.
    assert_eq!(c.sweep_expired(), 3);
    assert!(r.take_brief().iter().all(|(k, _, _)| *k == Expired));
}

#[test]
fn eviction_keeps_len_within_max_entries_and_emits_one_evicted_per_removed_entry() {
    for (max, shards) in [(1, None), (8, None), (16, Some(4)), (5, Some(4)), (100, Some(2)), (300, None)] {
        let mut b = Cache::<u32, usize>::builder().max_entries(max).sweep_interval(NO_SWEEP);
        if let Some(s) = shards {
            b = b.shards(s);
        }
        let c = b.build().unwrap();
        assert_eq!(c.max_entries(), Some(max));
        let r = Recorder::attach(&c);
        let mut rng = StdRng::seed_from_u64(max as u64);
        let keys = max as u32 * 4;
        for i in 0..3000 {
            let k = rng.gen_range(0..keys);
            match i % 6 {
                0..=2 => c.put(k, i),
                3 => {
                    c.get(&k);
                }
                4 => c.put_all([(k, i), ((k + 1) % keys, i), ((k + 7) % keys, i)]),
                _ => {
                    c.get_or_insert_with(k, || i);
                }
            }
            assert!(c.len() <= max, "len {} > max_entries {max} after op {i}", c.len());
        }
        let events = r.take();
        let evicted = events.iter().filter(|e| e.kind == Evicted).count();
        assert!(evicted > 0, "max {max}: no eviction happened");
        assert!(events
            .iter()
            .filter(|e| e.kind == Evicted)
            .all(|e| e.command == C::Evict && matches!(e.target, Key(_))));
        // `replay` refuses an Evicted for an absent key: no entry is evicted twice.
        let replayed = replay(&events);
        let held: HashSet<u32> = (0..keys).filter(|k| c.contains_key(k)).collect();
        assert_eq!(replayed, held, "max {max}: the event stream replays to the cache's keys");
        assert_eq!(c.len(), held.len());
        let inserted: usize = events.iter().filter(|e| e.kind == Inserted).map(|e| e.target.keys().len()).sum();
        assert_eq!(inserted - evicted, held.len(), "max {max}: every removal has its Evicted event");
        assert_versions_increase(&events);
    }
}

// ----- versions --------------------------------------------------------------------------

#[test]
fn version_strictly_increases_per_key_across_writes_deletes_and_reinserts() {
    let clock = ManualClock::new();
    let c: Cache<u32, i64> =
        Cache::builder().max_entries(4).shards(1).sweep_interval(NO_SWEEP).clock(clock.clone()).build().unwrap();
    let r = Recorder::attach(&c);
    c.put(1, 1);
    c.put(1, 2);
    c.delete(&1);
    c.delete(&1);
    c.put_new(1, 3);
    c.replace(1, 4);
    c.expire(&1, ms(100));
    c.touch(&1);
    c.update(1, 0, |v| v + 1);
    c.incr(1, 1);
    c.decr(1, 1);
    c.take(&1);
    c.get_or_insert_with(1, || 9);
    c.put_all([(1, 1), (2, 2)]);
    c.put_new_all([(3, 3)]);
    c.delete_all(Query::Keys(vec![1, 2]));
    c.put(1, 5);
    c.delete_all(Query::All);
    c.put(1, 6);
    c.delete_all(Query::filter(|k, _| *k == 1));
    c.put_with_ttl(1, 7, ms(1));
    clock.advance(ms(1));
    c.get(&1);
    c.put_with_ttl(1, 8, ms(1));
    clock.advance(ms(1));
    c.sweep_expired();
    for k in 1..=10 {
        c.put(k, k.into());
    }
    let events = r.take();
    assert!(events.iter().any(|e| e.kind == Evicted));
    assert!(events.iter().any(|e| e.kind == Expired && e.command == C::Sweep));
    assert_versions_increase(&events);
    let v1: Vec<u64> =
        events.iter().filter(|e| e.target.keys().contains(&1) || e.target == Target::All).map(|e| e.version).collect();
    assert!(v1.len() >= 24, "{v1:?}");
    assert!(v1.windows(2).all(|w| w[0] < w[1]), "{v1:?}");
}

// ----- builder ----------------------------------------------------------------------------

#[test]
fn builder_rejects_invalid_options_naming_the_option() {
    fn rejects(b: nebulex::CacheBuilder<u32, u32>, expected: &str) {
        match b.build() {
            Err(Error::InvalidOption { option, reason }) => {
                assert_eq!(option, expected, "reason: {reason}");
                assert!(!reason.is_empty());
            }
            other => panic!("expected InvalidOption {{ option: {expected:?} }}, got {other:?}"),
        }
    }
    rejects(Cache::builder().max_entries(0), "max_entries");
    rejects(Cache::builder().sweep_interval(Duration::ZERO), "sweep_interval");
    rejects(Cache::builder().sweep_interval(MIN_SWEEP_INTERVAL - Duration::from_nanos(1)), "sweep_interval");
    assert!(Cache::<u32, u32>::builder().sweep_interval(MIN_SWEEP_INTERVAL).build().is_ok());
    rejects(Cache::builder().default_ttl(Duration::ZERO), "default_ttl");
    rejects(Cache::builder().name(""), "name");
    rejects(Cache::builder().shards(0), "shards");
    rejects(Cache::builder().shards(3), "shards");
    rejects(Cache::builder().shards(12), "shards");
    rejects(Cache::builder().max_entries(2).shards(4), "shards");
    rejects(Cache::builder().shards(nebulex::MAX_SHARDS_OPTION * 2), "shards");
    rejects(Cache::builder().shards(1 << (usize::BITS - 1)), "shards");
    assert!(Cache::<u32, u32>::builder().shards(nebulex::MAX_SHARDS_OPTION).build().is_ok());
    assert!(Cache::<u32, u32>::builder().shards(1).build().is_ok());
    assert!(Cache::<u32, u32>::builder().shards(64).max_entries(64).build().is_ok());
    // Durations no clock can add mean "never", not a panic.
    let forever = Cache::<u32, u32>::builder().sweep_interval(Duration::MAX).default_ttl(Duration::MAX).build();
    forever.unwrap().put(1, 1);
    let err = Cache::<u32, u32>::builder().max_entries(0).build().unwrap_err();
    assert!(err.to_string().contains("max_entries"), "{err}");
}

#[test]
fn events_carry_the_cache_name_and_node_id() {
    let c: Cache<u32, u32> = Cache::builder().name("users").node_id(NodeId(42)).build().unwrap();
    assert_eq!(&*c.name(), "users");
    assert_eq!(c.node_id(), NodeId(42));
    let r = Recorder::attach(&c);
    c.put(1, 1);
    let events = r.take();
    assert_eq!(events.len(), 1);
    assert_eq!(&*events[0].cache, "users");
    assert_eq!(events[0].metadata.node, NodeId(42));
}

// ----- listeners -------------------------------------------------------------------------------

#[test]
fn listener_with_only_inserted_filter_gets_only_inserts() {
    let c = cache::<i32>();
    let all = Recorder::attach(&c);
    let inserts = Recorder::attach_with(&c, "inserts", EventFilter::only([Inserted]));
    c.put(1, 1);
    c.put(1, 2);
    c.delete(&1);
    c.put_all([(1, 1), (2, 2)]);
    c.delete_all(Query::All);
    assert_eq!(inserts.take_brief(), [(Inserted, Key(1), C::Put), (Inserted, Keys(vec![1, 2]), C::PutAll)]);
    assert_eq!(all.take().len(), 5);
}

#[test]
fn changing_a_registered_filter_changes_what_it_receives() {
    let c = cache::<i32>();
    let filter = EventFilter::none();
    let r = Recorder::attach_with(&c, "f", filter.clone());
    c.put(1, 1);
    assert_eq!(r.take_brief(), []);
    filter.set([Deleted]);
    c.put(1, 2);
    c.delete(&1);
    assert_eq!(r.take_brief(), [(Deleted, Key(1), C::Delete)]);
}

#[test]
fn unregister_stops_delivery() {
    let c = cache::<i32>();
    let r = Recorder::attach(&c);
    c.put(1, 1);
    assert!(c.unregister_event_listener("recorder"));
    c.put(1, 2);
    c.delete(&1);
    assert_eq!(r.take_brief(), [(Inserted, Key(1), C::Put)]);
    assert!(!c.unregister_event_listener("recorder"), "already gone");
}

#[test]
fn registering_a_duplicate_listener_id_errors_and_keeps_the_first() {
    let c = cache::<i32>();
    let r = Recorder::attach_with(&c, "dup", EventFilter::all());
    let second = Arc::new(AtomicUsize::new(0));
    let s = second.clone();
    let err = c
        .register_event_listener("dup", EventFilter::all(), move |_| {
            s.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap_err();
    assert_eq!(err, Error::ListenerExists("dup".to_string()));
    c.put(1, 1);
    assert_eq!(r.take().len(), 1, "the first listener still gets each event once");
    assert_eq!(second.load(Ordering::SeqCst), 0);
}

// ----- background sweep ---------------------------------------------------------------------

#[test]
fn background_sweep_removes_an_expired_entry_with_one_expired_sweep_event() {
    let c: Cache<u32, i32> = Cache::builder().name("swept").sweep_interval(ms(20)).build().unwrap();
    let r = Recorder::attach(&c);
    c.put_with_ttl(1, 10, ms(10));
    let deadline = Instant::now() + Duration::from_secs(5);
    // Poll without reading the key (a read would expire it itself).
    while !r.snapshot().iter().any(|e| e.kind == Expired) {
        assert!(Instant::now() < deadline, "no Expired event within 5 s; events: {:?}", r.snapshot());
        std::thread::sleep(ms(5));
    }
    assert_eq!(c.len(), 0);
    assert_eq!(c.get(&1), None);
    assert_eq!(r.take_brief(), [(Inserted, Key(1), C::Put), (Expired, Key(1), C::Sweep)]);
}

#[test]
fn cache_is_a_send_sync_handle_whose_clones_share_one_store() {
    fn send_sync<T: Send + Sync + Clone>() {}
    send_sync::<Cache<String, Vec<u8>>>();
    let a = cache::<i32>();
    let b = a.clone();
    assert!(a.ptr_eq(&b));
    let r = Recorder::attach(&a);
    b.put(1, 1);
    assert_eq!(a.get(&1), Some(1));
    assert_eq!(r.take_brief(), [(Inserted, Key(1), C::Put)], "a listener sees writes through every handle");
    let weak = a.downgrade();
    assert!(weak.upgrade().is_some());
    drop((a, b));
    assert!(weak.upgrade().is_none(), "the cache lives while some handle does");
    let other = cache::<i32>();
    assert!(!other.ptr_eq(&cache::<i32>()));
}

#[test]
fn put_with_zero_ttl_expires_as_soon_as_the_clock_moves() {
    let (c, clock) = manual::<i32>();
    let r = Recorder::attach(&c);
    c.put_with_ttl(1, 10, Duration::ZERO);
    assert_eq!(c.ttl(&1), Some(Some(Duration::from_nanos(1))));
    clock.advance(Duration::from_nanos(1));
    assert_eq!(c.get(&1), None);
    assert_eq!(r.take_brief(), [(Inserted, Key(1), C::Put), (Expired, Key(1), C::Get)]);
}

// ----- panics ------------------------------------------------------------------------

#[test]
fn a_panicking_listener_loses_the_write_nothing_and_the_other_listeners_no_event() {
    let clock = ManualClock::new();
    let c: Cache<u32, i32> =
        Cache::builder().max_entries(4).shards(1).sweep_interval(NO_SWEEP).clock(clock.clone()).build().unwrap();
    c.register_event_listener("panics", EventFilter::all(), |e| panic!("listener fails on {:?}", e.kind)).unwrap();
    let r = Recorder::attach(&c);
    for k in 0..8 {
        c.put(k, 0);
    }
    assert_eq!(c.len(), 4, "each write kept the bound: its trim ran after the failing listener");
    let events = r.take_brief();
    assert_eq!(events.iter().filter(|(k, _, _)| *k == Inserted).count(), 8, "{events:?}");
    assert_eq!(events.iter().filter(|(k, _, _)| *k == Evicted).count(), 4, "{events:?}");
    let present: Vec<u32> = (0..8).filter(|k| c.contains_key(k)).collect();
    c.put_all(present.iter().map(|&k| (k, 1)).chain([(100, 1)]));
    let events = r.take_brief();
    assert!(events.contains(&(Inserted, Keys(vec![100]), C::PutAll)), "{events:?}");
    assert!(events.contains(&(Updated, Keys(present), C::PutAll)), "{events:?}");
    c.delete_all(Query::All);
    for k in 200..204 {
        c.put_with_ttl(k, 0, ms(10));
    }
    r.take();
    clock.advance(ms(10));
    assert_eq!(c.sweep_expired(), 4);
    assert_eq!(r.take_brief().iter().filter(|(k, _, _)| *k == Expired).count(), 4, "every expired entry's event");
    assert_eq!(c.len(), 0);
}

#[test]
fn a_panicking_delete_all_predicate_reaches_its_caller_after_the_event_of_what_it_removed() {
    let c: Cache<u32, i32> = Cache::builder().shards(1).sweep_interval(NO_SWEEP).build().unwrap();
    c.put_all((0..10).map(|k| (k, k as i32)));
    let r = Recorder::attach(&c);
    let seen = Arc::new(AtomicUsize::new(0));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        c.delete_all(Query::filter(move |_, _| {
            assert!(seen.fetch_add(1, Ordering::Relaxed) < 5, "the predicate fails on its sixth entry");
            true
        }))
    }));
    assert!(outcome.is_err(), "the predicate's panic reaches the caller");
    let events = r.take_brief();
    let [(Deleted, Keys(removed), C::DeleteAll)] = &events[..] else { panic!("{events:?}") };
    assert_eq!(removed.len(), 5, "{events:?}");
    assert_eq!(c.len(), 5, "what the predicate did not judge stays");
    assert!(removed.iter().all(|k| !c.contains_key(k)), "the event names exactly what was removed");
}

/// A listener's closure is dropped with its last handle, when it is
/// unregistered: once no lock is held, so that what it held may call into
/// the cache as it drops, even to unregister another listener.
#[test]
fn a_listener_closure_may_unregister_another_listener_as_it_drops() {
    struct Unregisters(nebulex::WeakCache<u32, u32>);
    impl Drop for Unregisters {
        fn drop(&mut self) {
            if let Some(cache) = self.0.upgrade() {
                assert!(cache.unregister_event_listener("other"));
            }
        }
    }
    let c: Cache<u32, u32> = Cache::builder().build().unwrap();
    let held = Unregisters(c.downgrade());
    c.register_event_listener("a", EventFilter::all(), move |_| {
        let _ = &held;
    })
    .unwrap();
    c.register_event_listener("other", EventFilter::all(), |_| {}).unwrap();
    let (done, unregistered) = std::sync::mpsc::channel();
    let cache = c.clone();
    std::thread::spawn(move || {
        let _ = done.send(cache.unregister_event_listener("a"));
    });
    assert_eq!(unregistered.recv_timeout(Duration::from_secs(10)), Ok(true), "unregistering hung");
    assert!(!c.unregister_event_listener("other"), "the closure's drop unregistered it");
}

/// A key whose `Clone` or `Eq` panics on one value, once armed on this thread
/// (the calls of these tests run on it).
#[derive(Debug)]
struct Touchy(u32);

thread_local! {
    static CLONE_PANICS_ON: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
    static EQ_PANICS_ON: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

impl Clone for Touchy {
    fn clone(&self) -> Self {
        assert_ne!(CLONE_PANICS_ON.get(), Some(self.0), "a touchy key's clone");
        Touchy(self.0)
    }
}

impl PartialEq for Touchy {
    /// Panics comparing the armed key with itself: when it is looked up and
    /// found (not when another key's lookup meets it by a hash collision,
    /// which depends on the table's seed).
    fn eq(&self, other: &Self) -> bool {
        assert!(!(self.0 == other.0 && EQ_PANICS_ON.get() == Some(self.0)), "a touchy key's eq");
        self.0 == other.0
    }
}

impl Eq for Touchy {}

impl std::hash::Hash for Touchy {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

/// Runs `call` with `cell` armed on `on`, expecting it to panic; disarms.
fn panics_with_armed(cell: &'static std::thread::LocalKey<std::cell::Cell<Option<u32>>>, on: u32, call: impl FnOnce()) {
    cell.set(Some(on));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(call));
    cell.set(None);
    assert!(outcome.is_err(), "the key's panic reaches the caller");
}

fn touchy_cache() -> Cache<Touchy, u32> {
    Cache::builder().shards(1).sweep_interval(NO_SWEEP).build().unwrap()
}

/// A load whose key's `Eq` panics as the load ends (it is then forgotten
/// by the key) is still finished and forgotten: the panic reaches its
/// caller, and later callers of the key load afresh instead of waiting for
/// it for ever (nor does the process abort, which a second panic while the
/// first unwinds would make it do).
#[test]
fn a_load_whose_key_eq_panics_as_it_ends_leaves_no_load_behind() {
    let c = touchy_cache();
    panics_with_armed(&EQ_PANICS_ON, 1, || {
        let _ = c.try_get_or_insert_with(Touchy(1), || Err::<u32, &str>("the record is unreachable"));
    });
    panics_with_armed(&EQ_PANICS_ON, 2, || {
        c.get_or_insert_with(Touchy(2), || 2);
    });
    let (loaded, got) = std::sync::mpsc::channel();
    let later = c.clone();
    std::thread::spawn(move || {
        let _ = loaded.send((later.get_or_insert_with(Touchy(1), || 10), later.get_or_insert_with(Touchy(2), || 20)));
    });
    assert_eq!(got.recv_timeout(Duration::from_secs(10)), Ok((10, 20)), "later callers load afresh");
}

/// A single-key write or load that finds the key's entry expired copies the
/// key before it removes that entry: a `Clone` that panics leaves the entry
/// as it was, with no event.
#[test]
fn a_write_or_load_whose_key_clone_panics_leaves_an_expired_entry_as_it_was() {
    for call in ["put", "update", "get_or_insert_with"] {
        let clock = ManualClock::new();
        let c: Cache<Touchy, u32> =
            Cache::builder().shards(1).clock(clock.clone()).sweep_interval(NO_SWEEP).build().unwrap();
        c.put_with_ttl(Touchy(1), 1, ms(5));
        clock.advance(ms(5));
        let r = Recorder::attach(&c);
        panics_with_armed(&CLONE_PANICS_ON, 1, || match call {
            "put" => c.put(Touchy(1), 2),
            "update" => {
                c.update(Touchy(1), 0, |v| v + 1);
            }
            _ => {
                c.get_or_insert_with(Touchy(1), || 5);
            }
        });
        assert!(r.take_brief().is_empty(), "{call}: no event");
        assert_eq!(c.len(), 1, "{call}: the expired entry is still stored");
    }
}

#[test]
fn a_put_all_stopped_by_a_panicking_key_clone_emits_the_events_of_what_it_stored() {
    let c = touchy_cache();
    c.put(Touchy(1), 0);
    let r = Recorder::attach(&c);
    // Keys are stored in order; the new key 5's copy for the table panics.
    panics_with_armed(&CLONE_PANICS_ON, 5, || c.put_all((0..10).map(|k| (Touchy(k), k))));
    let events = r.take_brief();
    let [(Inserted, Keys(inserted), C::PutAll), (Updated, Keys(updated), C::PutAll)] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(inserted, &[0, 2, 3, 4].map(Touchy));
    assert_eq!(updated, &[Touchy(1)]);
    let mut held: Vec<u32> = (0..10).filter(|k| c.contains_key(&Touchy(*k))).collect();
    held.sort_unstable();
    assert_eq!(held, [0, 1, 2, 3, 4], "what the events name is exactly what is stored");
    assert_eq!(c.get(&Touchy(1)), Some(1));
}

#[test]
fn a_delete_all_of_keys_stopped_by_a_panicking_key_eq_names_the_keys_it_judged() {
    let c = touchy_cache();
    c.put_all((0..10).map(|k| (Touchy(k), k)));
    let r = Recorder::attach(&c);
    // Key 5 is stored, so looking it up compares it, and that panics.
    panics_with_armed(&EQ_PANICS_ON, 5, || {
        c.delete_all(Query::Keys([0, 1, 20, 5, 7].map(Touchy).into()));
    });
    let events = r.take_brief();
    let [(Deleted, Keys(deleted), C::DeleteAll)] = &events[..] else { panic!("{events:?}") };
    assert_eq!(deleted, &[0, 1, 20].map(Touchy));
    let held: Vec<u32> = (0..10).filter(|k| c.contains_key(&Touchy(*k))).collect();
    assert_eq!(held, [2, 3, 4, 5, 6, 7, 8, 9], "what the call did not reach stays");
}

#[test]
fn a_delete_all_filter_stopped_by_a_panicking_key_clone_names_exactly_what_it_removed() {
    let c = touchy_cache();
    c.put_all((0..10).map(|k| (Touchy(k), k)));
    let r = Recorder::attach(&c);
    panics_with_armed(&CLONE_PANICS_ON, 5, || {
        c.delete_all(Query::filter(|_, _| true));
    });
    let events = r.take_brief();
    // The filter meets the keys in the table's order: if key 5 came first,
    // nothing was removed, and nothing is announced.
    let mut named: Vec<u32> = match &events[..] {
        [] => Vec::new(),
        [(Deleted, Keys(deleted), C::DeleteAll)] => deleted.iter().map(|k| k.0).collect(),
        other => panic!("{other:?}"),
    };
    assert!(c.contains_key(&Touchy(5)), "the entry whose key could not be copied for the event stays");
    let mut gone: Vec<u32> = (0..10).filter(|k| !c.contains_key(&Touchy(*k))).collect();
    gone.sort_unstable();
    named.sort_unstable();
    assert_eq!(named, gone, "the event names exactly what was removed");
}

#[test]
fn single_key_calls_stopped_by_a_panicking_key_clone_change_nothing_unannounced() {
    let c = touchy_cache();
    c.put(Touchy(1), 1);
    let r = Recorder::attach(&c);
    // The key is copied for the event before anything changes.
    panics_with_armed(&CLONE_PANICS_ON, 1, || {
        c.expire(&Touchy(1), Duration::from_secs(5));
    });
    panics_with_armed(&CLONE_PANICS_ON, 1, || {
        c.delete(&Touchy(1));
    });
    assert_eq!(r.take_brief(), [], "nothing changed, so nothing is announced");
    assert_eq!(c.ttl(&Touchy(1)), Some(None), "the entry keeps its time to live");
    assert_eq!(c.get(&Touchy(1)), Some(1), "and stays");
    // Disarmed, the same calls change the entry and say so.
    assert!(c.touch(&Touchy(1)));
    assert!(c.delete(&Touchy(1)));
    assert_eq!(r.take_brief(), [(Updated, Key(Touchy(1)), C::Touch), (Deleted, Key(Touchy(1)), C::Delete)]);
}

#[test]
fn a_write_into_a_full_shard_evicts_another_entry_not_its_own() {
    for round in 0..200 {
        let c: Cache<u32, i64> = Cache::builder().max_entries(64).shards(1).sweep_interval(NO_SWEEP).build().unwrap();
        for k in 0..64 {
            c.put(k, 0);
            c.get(&k); // every resident has been used: the newcomer is the least used
        }
        let r = Recorder::attach(&c);
        assert_eq!(c.incr(1_000, 1), 1);
        assert_eq!(c.get(&1_000), Some(1), "round {round}: the counter was evicted by its own write");
        let events = r.take_brief();
        let [(Inserted, Key(1_000), C::Incr), (Evicted, Key(other), C::Evict)] = &events[..] else {
            panic!("round {round}: {events:?}")
        };
        assert!(*other < 64);
        assert_eq!(c.len(), 64);
    }
}

/// At a manual clock's end (time stops there), an entry written with a time
/// to live is not expired at once: its deadline, which saturates, is still
/// later than the clock.
#[test]
fn at_a_manual_clocks_end_an_entry_with_a_ttl_lives() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder().clock(clock.clone()).sweep_interval(NO_SWEEP).build().unwrap();
    clock.advance(Duration::MAX);
    cache.put_with_ttl(1, 1, Duration::MAX);
    cache.put_with_ttl(2, 2, Duration::from_nanos(1));
    assert_eq!((cache.get(&1), cache.get(&2)), (Some(1), Some(2)));
}

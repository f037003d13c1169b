//! `get_or_insert_with` / `try_get_or_insert_with`: single flight, shared
//! errors, panicking loaders, and loads overtaken by a write or delete.
#![allow(clippy::unwrap_used)]

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::Recorder;
use nebulex::{Cache, Command, EventType, Query, Target};

const THREADS: usize = 16;

fn cache() -> Cache<u32, u64> {
    Cache::builder().name("loader").sweep_interval(Duration::from_secs(3600)).build().unwrap()
}

/// Spins (sleeping 1 ms at a time) until `cond` holds; fails after 10 s.
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn concurrent_get_or_insert_with_runs_the_loader_once_and_all_get_its_value() {
    let cache = cache();
    let rec = Recorder::attach(&cache);
    let calls = Arc::new(AtomicUsize::new(0));
    let arrived = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS as u64)
        .map(|i| {
            let (cache, calls, arrived, barrier) = (cache.clone(), calls.clone(), arrived.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                arrived.fetch_add(1, Ordering::SeqCst);
                cache.get_or_insert_with(7, || {
                    calls.fetch_add(1, Ordering::SeqCst);
                    // Hold the load open until every thread has made its call.
                    wait_until("all threads called", || arrived.load(Ordering::SeqCst) == THREADS);
                    1000 + i
                })
            })
        })
        .collect();
    let values: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the loader ran once");
    assert!(values.iter().all(|v| *v == values[0]), "all got the loaded value: {values:?}");
    assert_eq!(cache.get(&7), Some(values[0]));
    assert_eq!(rec.take_brief(), [(EventType::Inserted, Target::Key(7), Command::Load)]);
}

#[derive(Debug)]
struct LoadError(&'static str);

/// One round: a loader that fails once released, `THREADS - 1` callers that
/// join it. Returns how many callers got the loader's very error (the others
/// came after the load ended and ran their own loaders, which also fail).
fn failing_load_round() -> usize {
    let cache = cache();
    let rec = Recorder::attach(&cache);
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let first_done = Arc::new(AtomicBool::new(false));

    let loader = {
        let (cache, first_done) = (cache.clone(), first_done.clone());
        thread::spawn(move || {
            cache.try_get_or_insert_with(1, || {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                first_done.store(true, Ordering::SeqCst);
                Err(LoadError("first"))
            })
        })
    };
    started_rx.recv().unwrap();

    let arrived = Arc::new(AtomicUsize::new(0));
    let waiters: Vec<_> = (0..THREADS - 1)
        .map(|_| {
            let (cache, arrived, first_done) = (cache.clone(), arrived.clone(), first_done.clone());
            thread::spawn(move || {
                arrived.fetch_add(1, Ordering::SeqCst);
                let mut own = false;
                let got = cache.try_get_or_insert_with(1, || {
                    own = true;
                    assert!(first_done.load(Ordering::SeqCst), "a second loader ran while the first was in flight");
                    Err(LoadError("own"))
                });
                (got, own)
            })
        })
        .collect();
    wait_until("all waiters called", || arrived.load(Ordering::SeqCst) == THREADS - 1);
    // The counter says every waiter is about to call; give them a moment to
    // park on the load (a late one is told apart below, not a failure).
    thread::sleep(Duration::from_millis(200));
    release_tx.send(()).unwrap();

    let first = loader.join().unwrap().unwrap_err();
    assert_eq!(first.0, "first");
    let mut shared = 0;
    for w in waiters {
        let (got, own) = w.join().unwrap();
        let err = got.unwrap_err();
        if own {
            assert_eq!(err.0, "own");
        } else {
            assert!(Arc::ptr_eq(&err, &first), "a waiter got the loader's error itself: {err:?}");
            shared += 1;
        }
    }
    assert_eq!(cache.get(&1), None, "a failed load stores nothing");
    assert!(cache.is_empty());
    assert_eq!(rec.take_brief(), [], "a failed load emits nothing");
    shared
}

#[test]
fn try_get_or_insert_with_error_is_shared_with_concurrent_waiters_and_nothing_is_stored() {
    for _ in 0..5 {
        if failing_load_round() == THREADS - 1 {
            return;
        }
    }
    panic!("in 5 rounds, never did every waiter join the failing load");
}

#[test]
fn a_panicking_loader_lets_a_waiter_retry_and_load() {
    let cache = cache();
    let rec = Recorder::attach(&cache);
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let panicker = {
        let cache = cache.clone();
        thread::spawn(move || {
            catch_unwind(AssertUnwindSafe(|| {
                cache.get_or_insert_with(1, || {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    panic!("loader failed (expected by the test)")
                })
            }))
        })
    };
    started_rx.recv().unwrap();

    let arrived = Arc::new(AtomicBool::new(false));
    let own_calls = Arc::new(AtomicUsize::new(0));
    let waiter = {
        let (cache, arrived, own_calls) = (cache.clone(), arrived.clone(), own_calls.clone());
        thread::spawn(move || {
            arrived.store(true, Ordering::SeqCst);
            cache.get_or_insert_with(1, || {
                own_calls.fetch_add(1, Ordering::SeqCst);
                99
            })
        })
    };
    wait_until("the waiter called", || arrived.load(Ordering::SeqCst));
    thread::sleep(Duration::from_millis(20));
    release_tx.send(()).unwrap();

    assert!(panicker.join().unwrap().is_err(), "the loading thread sees its loader's panic");
    assert_eq!(waiter.join().unwrap(), 99, "the waiter loads for itself");
    assert_eq!(own_calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.get(&1), Some(99));
    assert_eq!(rec.take_brief(), [(EventType::Inserted, Target::Key(1), Command::Load)]);
    assert_eq!(cache.get_or_insert_with(2, || 5), 5, "the cache still works after a loader panic");
}

/// Starts `get_or_insert_with(1, || 10)` on a thread whose loader blocks until
/// released; returns once the loader runs.
fn blocked_load(cache: &Cache<u32, u64>) -> (thread::JoinHandle<u64>, mpsc::Sender<()>) {
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let cache = cache.clone();
    let handle = thread::spawn(move || {
        cache.get_or_insert_with(1, || {
            started_tx.send(()).unwrap();
            release_rx.recv().unwrap();
            10
        })
    });
    started_rx.recv().unwrap();
    (handle, release_tx)
}

#[test]
fn a_delete_during_a_load_makes_it_return_its_value_without_storing_it() {
    let cache = cache();
    let rec = Recorder::attach(&cache);
    let (load, release) = blocked_load(&cache);
    assert!(!cache.delete(&1));
    release.send(()).unwrap();
    assert_eq!(load.join().unwrap(), 10, "the load still returns its value");
    assert_eq!(cache.get(&1), None, "but does not store it");
    assert_eq!(rec.take_brief(), [(EventType::Deleted, Target::Key(1), Command::Delete)]);
    assert_eq!(cache.get_or_insert_with(1, || 11), 11, "the next load stores");
    assert_eq!(cache.get(&1), Some(11));
}

#[test]
fn a_put_during_a_load_wins_over_the_loaded_value() {
    let cache = cache();
    let rec = Recorder::attach(&cache);
    let (load, release) = blocked_load(&cache);
    cache.put(1, 20);
    release.send(()).unwrap();
    assert_eq!(load.join().unwrap(), 10);
    assert_eq!(cache.get(&1), Some(20));
    assert_eq!(rec.take_brief(), [(EventType::Inserted, Target::Key(1), Command::Put)]);
}

/// Removes key 1 by the call `how` names (one of [`REMOVALS`]).
fn remove_key_1(cache: &Cache<u32, u64>, how: &str) {
    match how {
        "delete" => {
            cache.delete(&1);
        }
        "delete_all All" => {
            cache.delete_all(Query::All);
        }
        "delete_all Keys" => {
            cache.delete_all(Query::Keys(vec![1]));
        }
        "delete_all filter" => {
            cache.delete_all(Query::filter(|_, _| true));
        }
        "invalidate" => {
            cache.invalidate(&1);
        }
        "invalidate_where" => {
            cache.invalidate_where(|k| *k == 1);
        }
        other => panic!("no removal named {other:?}"),
    }
}

/// The calls that remove a key (and overtake a load of it).
const REMOVALS: [&str; 6] =
    ["delete", "delete_all All", "delete_all Keys", "delete_all filter", "invalidate", "invalidate_where"];

#[test]
fn delete_all_and_invalidate_during_a_load_keep_it_from_storing() {
    for how in &REMOVALS[1..] {
        let cache = cache();
        let (load, release) = blocked_load(&cache);
        remove_key_1(&cache, how);
        release.send(()).unwrap();
        assert_eq!(load.join().unwrap(), 10, "{how}");
        assert_eq!(cache.get(&1), None, "{how}: the overtaken load stored its value");
    }
}

/// Runs `call` while a load of key 1 is in flight; then a caller of key 1
/// must still share that load, and the load must store.
#[track_caller]
fn assert_the_load_survives(call: impl FnOnce(&Cache<u32, u64>)) {
    let cache = cache();
    let (load, release) = blocked_load(&cache);
    call(&cache);
    let late_cache = cache.clone();
    let late = thread::spawn(move || late_cache.get_or_insert_with(1, || 30));
    release.send(()).unwrap();
    assert_eq!(load.join().unwrap(), 10);
    assert_eq!(late.join().unwrap(), 10, "the caller of key 1 loaded again");
    assert_eq!(cache.get(&1), Some(10), "the load of key 1 did not store");
}

#[test]
fn a_replace_that_finds_no_entry_leaves_a_load_in_flight_be() {
    assert_the_load_survives(|cache| assert!(!cache.replace(1, 20), "nothing to replace: nothing changed"));
}

#[test]
fn invalidate_where_leaves_the_loads_of_keys_it_does_not_select_alone() {
    assert_the_load_survives(|cache| assert_eq!(cache.invalidate_where(|k| *k == 2), 0));
}

#[test]
fn a_caller_after_a_delete_or_invalidation_loads_afresh_instead_of_waiting_for_the_overtaken_load() {
    for how in REMOVALS {
        let cache = cache();
        let (load, release) = blocked_load(&cache);
        remove_key_1(&cache, how);
        // The overtaken load is still blocked: a caller that joined it would
        // wait for it, and get its stale value once it is released.
        let (late_tx, late_rx) = mpsc::channel();
        let late_cache = cache.clone();
        let late = thread::spawn(move || late_tx.send(late_cache.get_or_insert_with(1, || 30)).unwrap());
        let fresh = late_rx.recv_timeout(Duration::from_secs(10));
        release.send(()).unwrap();
        let fresh = fresh.or_else(|_| late_rx.recv());
        late.join().unwrap();
        assert_eq!(fresh, Ok(30), "{how}: a caller after the change got the overtaken load's value");
        assert_eq!(load.join().unwrap(), 10, "{how}");
        assert_eq!(cache.get(&1), Some(30), "{how}: the fresh load's value is the one stored");
    }
}

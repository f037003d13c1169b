//! `get_or_insert_with_async` / `try_get_or_insert_with_async`: single
//! flight without blocking a thread, shared errors, a dropped leader, and
//! loads overtaken by a delete or an invalidation.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Recorder;
use nebulex::{Cache, Command, EventType, Target};
use tokio::sync::oneshot;
use tokio::time::timeout;

const TASKS: usize = 16;
const PATIENCE: Duration = Duration::from_secs(10);

fn cache() -> Cache<u32, u64> {
    Cache::builder().name("loader").sweep_interval(Duration::from_secs(3600)).build().unwrap()
}

/// Waits (without blocking the thread) until `cond` holds; fails after
/// [`PATIENCE`].
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_run_the_async_loader_once_and_all_get_its_value() {
    let cache = cache();
    let rec = Recorder::attach(&cache);
    let calls = Arc::new(AtomicUsize::new(0));
    let arrived = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..TASKS as u64)
        .map(|i| {
            let (cache, calls, arrived) = (cache.clone(), calls.clone(), arrived.clone());
            tokio::spawn(async move {
                arrived.fetch_add(1, Ordering::SeqCst);
                cache
                    .get_or_insert_with_async(7, || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        // Hold the load open until every task has made its call.
                        until("all tasks called", || arrived.load(Ordering::SeqCst) == TASKS).await;
                        1000 + i
                    })
                    .await
            })
        })
        .collect();
    let mut values = Vec::new();
    for task in tasks {
        values.push(timeout(PATIENCE, task).await.unwrap().unwrap());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the loader ran once");
    assert!(values.iter().all(|v| *v == values[0]), "all got the loaded value: {values:?}");
    assert_eq!(cache.get(&7), Some(values[0]));
    assert_eq!(rec.take_brief(), [(EventType::Inserted, Target::Key(7), Command::Load)]);
}

/// On one thread, a caller waiting for another's load must yield that thread
/// to the load: a blocking wait would never see it end. (Run on a thread of
/// its own, so that such a hang fails the test instead of stalling it.)
#[test]
fn a_waiting_caller_does_not_block_the_thread_its_leader_needs() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(leader_and_waiter_on_one_thread());
        let _ = done.send(());
    });
    finished.recv_timeout(PATIENCE).expect("the waiter blocked the only thread");
}

async fn leader_and_waiter_on_one_thread() {
    let cache = cache();
    let (release, released) = oneshot::channel::<()>();
    let leader = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_insert_with_async(1, || async {
                    released.await.unwrap();
                    10
                })
                .await
        })
    };
    tokio::task::yield_now().await; // the leader starts its load
    let waiter = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.get_or_insert_with_async(1, || async { 99 }).await })
    };
    tokio::task::yield_now().await; // the waiter waits for it
    release.send(()).unwrap();
    assert_eq!(timeout(PATIENCE, leader).await.unwrap().unwrap(), 10);
    assert_eq!(timeout(PATIENCE, waiter).await.unwrap().unwrap(), 10, "the waiter got the leader's value");
}

// One thread, so the order is known: the leader starts its load, then the
// waiter joins it, then the load ends.
#[tokio::test(flavor = "current_thread")]
async fn waiters_share_the_leader_s_error_and_nothing_is_stored() {
    #[derive(Debug)]
    struct Down;
    let cache = cache();
    let (release, released) = oneshot::channel::<()>();
    let leader = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .try_get_or_insert_with_async(1, || async {
                    released.await.unwrap();
                    Err::<u64, _>(Down)
                })
                .await
        })
    };
    tokio::task::yield_now().await;
    let waiter = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.try_get_or_insert_with_async(1, || async { Ok::<u64, Down>(5) }).await })
    };
    tokio::task::yield_now().await;
    release.send(()).unwrap();
    let led = timeout(PATIENCE, leader).await.unwrap().unwrap().unwrap_err();
    let shared = timeout(PATIENCE, waiter).await.unwrap().unwrap().unwrap_err();
    assert!(Arc::ptr_eq(&led, &shared), "the waiter got the very error of the load it joined");
    assert_eq!(cache.get(&1), None);
}

#[tokio::test(flavor = "current_thread")]
async fn a_dropped_leader_lets_a_waiter_load_for_itself() {
    let cache = cache();
    let leader = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.get_or_insert_with_async(1, std::future::pending::<u64>).await })
    };
    tokio::task::yield_now().await; // the leader's load is in flight, for ever
    let waiter = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.get_or_insert_with_async(1, || async { 42 }).await })
    };
    tokio::task::yield_now().await; // the waiter waits for it
    leader.abort();
    assert_eq!(timeout(PATIENCE, waiter).await.unwrap().unwrap(), 42, "the waiter loaded after the drop");
    assert_eq!(cache.get(&1), Some(42));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_or_an_invalidation_during_an_async_load_keeps_it_from_storing() {
    for invalidate in [false, true] {
        let cache = cache();
        let (release, released) = oneshot::channel::<()>();
        let (started_tx, started) = oneshot::channel::<()>();
        let load = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_insert_with_async(1, || async {
                        started_tx.send(()).unwrap();
                        released.await.unwrap();
                        10
                    })
                    .await
            })
        };
        started.await.unwrap();
        if invalidate {
            cache.invalidate(&1);
        } else {
            cache.delete(&1);
        }
        release.send(()).unwrap();
        assert_eq!(timeout(PATIENCE, load).await.unwrap().unwrap(), 10, "the load still returns its value");
        assert_eq!(cache.get(&1), None, "but does not store it (invalidate: {invalidate})");
    }
}

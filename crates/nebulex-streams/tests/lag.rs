//! Slow subscribers: writers never wait for them, and what they miss is
//! counted exactly and reported where it was missed.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use futures::StreamExt;
use nebulex::{Cache, EventType};
use nebulex_streams::{
    BroadcastError, BroadcastStatus, Item, Lagged, Streams, StreamsExt, SubscribeOptions, Telemetry,
};

use common::{drain, Recorded, PATIENCE};

fn cache(name: &str) -> Cache<u64, u64> {
    Cache::builder().name(name).build().unwrap()
}

/// Walks a single writer's items of one unpartitioned stream: every event's
/// `seq` must be the next published one, a `Lagged(n)` must stand exactly
/// where `n` events were dropped, and be the only notice of them (an event
/// follows it). Returns (received, lagged, lag notices).
#[track_caller]
fn check_positions(items: &[Item<u64>]) -> (u64, u64, usize) {
    let (mut received, mut lagged, mut notices) = (0u64, 0u64, 0usize);
    let mut next_seq = 1u64;
    if let Some(at) = items.windows(2).position(|pair| pair[0].is_err() && pair[1].is_err()) {
        let around: Vec<_> = items[at.saturating_sub(1)..(at + 3).min(items.len())]
            .iter()
            .map(|i| i.as_ref().map(|e| e.metadata.seq).map_err(|l| l.0))
            .collect();
        panic!("one loss told as two notices in a row: {around:?}");
    }
    for item in items {
        match item {
            Ok(e) => {
                assert_eq!(
                    e.metadata.seq, next_seq,
                    "event received where expected (after {received} events, {lagged} lagged)"
                );
                next_seq += 1;
                received += 1;
            }
            Err(Lagged(n)) => {
                assert!(*n > 0, "a Lagged counts at least one event");
                next_seq += n;
                lagged += n;
                notices += 1;
            }
        }
    }
    (received, lagged, notices)
}

#[test]
fn stalled_subscriber_does_not_block_writers_and_lag_is_exact() {
    const PUTS: u64 = 100_000;
    let cache = cache("stalled");
    let _streams = Streams::builder(&cache).buffer(64).start().unwrap();
    let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();

    // The subscriber never reads while these run; they all complete.
    for i in 0..PUTS {
        cache.put(i % 1_000, i);
    }

    let items = drain(&mut sub);
    let (received, lagged, notices) = check_positions(&items);
    assert_eq!(received + lagged, PUTS, "received + lagged == published");
    assert_eq!(received, 64, "the buffer kept its first 64 events");
    assert_eq!(notices, 1);
    assert_eq!(items.last(), Some(&Err(Lagged(PUTS - 64))), "the loss is told after the events kept");
}

#[test]
fn intermittent_reader_sees_each_lag_exactly_where_events_were_dropped() {
    const ROUNDS: u64 = 200;
    const PER_ROUND: u64 = 300;
    let cache = cache("intermittent");
    let _streams = Streams::builder(&cache).buffer(64).start().unwrap();
    let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();

    let mut items = Vec::new();
    let mut published = 0;
    for round in 0..ROUNDS {
        for i in 0..PER_ROUND {
            cache.put(i, round);
            published += 1;
        }
        // Read only a little: the buffer overflows again next round.
        for _ in 0..(round % 50) {
            match common::try_item(&mut sub) {
                Some(item) => items.push(item),
                None => break,
            }
        }
    }
    items.extend(drain(&mut sub));
    let (received, lagged, notices) = check_positions(&items);
    assert_eq!(received + lagged, published);
    assert!(notices > 100, "a lag notice per overflow, got {notices}");
}

/// With the reader on another thread, racing a writer that fills a buffer of
/// one, every `Lagged(n)` still stands exactly where its `n` events were
/// dropped: never before an event buffered ahead of the loss. (A third
/// thread keeps both cores busy, so that either side is preempted anywhere.)
#[test]
fn a_reader_on_another_thread_sees_each_lag_exactly_where_events_were_dropped() {
    use std::sync::atomic::AtomicBool;
    const PUTS: u64 = 300_000;
    let cache = cache("racing");
    let _streams = Streams::builder(&cache).buffer(1).start().unwrap();
    let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let spinner = {
        let done = done.clone();
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    };
    let writer = {
        let (cache, done) = (cache.clone(), done.clone());
        std::thread::spawn(move || {
            for i in 0..PUTS {
                cache.put(i % 1_000, i);
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut items = Vec::new();
    loop {
        let finished = done.load(Ordering::SeqCst);
        match common::try_item(&mut sub) {
            Some(item) => items.push(item),
            None if finished => break,
            None => std::hint::spin_loop(),
        }
    }
    writer.join().unwrap();
    spinner.join().unwrap();
    let (received, lagged, notices) = check_positions(&items);
    assert_eq!(received + lagged, PUTS);
    assert!(notices > 0 && received > 0, "{received} received, {notices} notices: the race was run");
}

#[test]
fn stalled_subscriber_does_not_block_concurrent_writers_and_lag_is_exact() {
    const WRITERS: u64 = 2;
    const PUTS: u64 = 50_000;
    let cache = cache("stalled-concurrent");
    let _streams = Streams::builder(&cache).buffer(64).start().unwrap();
    let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let cache = cache.clone();
            std::thread::spawn(move || {
                for i in 0..PUTS {
                    cache.put(w * 1_000_000 + i % 500, i);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let items = drain(&mut sub);
    let received = items.iter().filter(|i| i.is_ok()).count() as u64;
    let lagged: u64 = items.iter().filter_map(|i| i.as_ref().err()).map(|Lagged(n)| *n).sum();
    assert!(items.iter().all(|i| !matches!(i, Err(Lagged(0)))));
    assert_eq!(received + lagged, WRITERS * PUTS);
}

#[test]
fn a_stalled_subscriber_does_not_affect_one_that_keeps_up() {
    const PUTS: u64 = 100_000;
    const BUFFER: usize = 1_024;
    let cache = cache("slow-and-fast");
    let _streams = Streams::builder(&cache).buffer(BUFFER).start().unwrap();
    let mut slow = cache.subscribe(SubscribeOptions::new()).unwrap();
    let mut fast = cache.subscribe(SubscribeOptions::new()).unwrap();

    // The fast subscriber reads in its own thread. On a loaded machine the
    // writer waits for it to stay within half its buffer (the test's own flow
    // control, not the stream's): the point is that the slow one's overflow
    // does not disturb the fast one.
    let fast_received = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    {
        let fast_received = fast_received.clone();
        std::thread::spawn(move || {
            let mut lags = Vec::new();
            let mut last_seq = 0;
            let mut in_order = true;
            while let Some(item) = fast.recv_blocking() {
                match item {
                    Ok(e) => {
                        in_order &= e.metadata.seq == last_seq + 1;
                        last_seq = e.metadata.seq;
                        fast_received.fetch_add(1, Ordering::Release);
                    }
                    Err(Lagged(n)) => lags.push(n),
                }
            }
            tx.send((lags, in_order)).unwrap();
        });
    }
    for i in 0..PUTS {
        if i % 64 == 0 {
            let caught_up =
                common::wait_until(PATIENCE, || i - fast_received.load(Ordering::Acquire) < BUFFER as u64 / 2);
            assert!(caught_up, "the fast subscriber stopped reading");
        }
        cache.put(i % 777, i);
    }
    assert!(common::wait_until(PATIENCE, || fast_received.load(Ordering::Acquire) == PUTS));

    let slow_items = drain(&mut slow);
    let (received, lagged, _) = check_positions(&slow_items);
    assert_eq!(received + lagged, PUTS);
    assert!(lagged >= PUTS - BUFFER as u64, "the slow one did overflow: {lagged}");

    Streams::lookup(&cache).unwrap().stop();
    let (fast_lags, in_order) = rx.recv_timeout(PATIENCE).expect("the fast reader ends at stop");
    assert!(fast_lags.is_empty(), "the fast subscriber never lagged: {fast_lags:?}");
    assert!(in_order, "the fast subscriber got every event in order");
    assert_eq!(fast_received.load(Ordering::Acquire), PUTS);
}

#[test]
fn lagged_is_reported_to_the_observer_with_the_same_counts() {
    let cache = cache("lag-telemetry");
    let telemetry = Recorded::new();
    let _streams = Streams::builder(&cache).partitions(2).buffer(16).observer(telemetry.observer()).start().unwrap();
    let mut sub = cache.subscribe(SubscribeOptions::new().partition(1)).unwrap();
    let keys: Vec<u64> = (0..10_000).filter(|k| nebulex_streams::partition_of(k, 2) == 1).take(50).collect();

    let mut items = Vec::new();
    for round in 0..20u64 {
        for &k in &keys {
            cache.put(k, round);
        }
        items.extend(std::iter::from_fn(|| common::try_item(&mut sub)).take(5));
    }
    items.extend(drain(&mut sub));

    let told: Vec<u64> = items.iter().filter_map(|i| i.as_ref().err()).map(|Lagged(n)| *n).collect();
    let received = items.iter().filter(|i| i.is_ok()).count() as u64;
    assert_eq!(received + told.iter().sum::<u64>(), 20 * keys.len() as u64);
    assert!(told.len() > 1);

    let all = telemetry.all();
    let observed: Vec<u64> = all
        .iter()
        .filter_map(|t| match t {
            Telemetry::Lagged { cache, partition, missed } => {
                assert_eq!(&**cache, "lag-telemetry");
                assert_eq!(*partition, 1);
                Some(*missed)
            }
            _ => None,
        })
        .collect();
    assert_eq!(observed, told, "one Telemetry::Lagged per Lagged received, same counts");

    // Each dropped event was also a broadcast error.
    let full = all
        .iter()
        .filter(|t| {
            matches!(
                t,
                Telemetry::Broadcast {
                    status: BroadcastStatus::Error,
                    reason: Some(BroadcastError::SubscriberFull { capacity: 16 }),
                    ..
                }
            )
        })
        .count() as u64;
    assert_eq!(full, told.iter().sum::<u64>());
}

#[test]
fn a_filtered_subscribers_lag_counts_only_events_of_its_types() {
    const N: u64 = 1_000;
    let cache = cache("lag-filtered");
    let _streams = Streams::builder(&cache).buffer(8).start().unwrap();
    let mut deletes = cache.subscribe(SubscribeOptions::new().events([EventType::Deleted])).unwrap();
    let mut everything = cache.subscribe(SubscribeOptions::new()).unwrap();
    for i in 0..N {
        cache.put(i, 1); // inserted
        cache.put(i, 2); // updated
        cache.delete(&i); // deleted
    }

    let items = drain(&mut deletes);
    let received: Vec<_> = items.iter().filter_map(|i| i.as_ref().ok()).collect();
    assert!(received.iter().all(|e| e.kind == EventType::Deleted));
    let lagged: u64 = items.iter().filter_map(|i| i.as_ref().err()).map(|Lagged(n)| *n).sum();
    assert_eq!(received.len(), 8);
    assert_eq!(received.len() as u64 + lagged, N, "only deletes count");

    let items = drain(&mut everything);
    let received = items.iter().filter(|i| i.is_ok()).count() as u64;
    let lagged: u64 = items.iter().filter_map(|i| i.as_ref().err()).map(|Lagged(n)| *n).sum();
    assert_eq!(received + lagged, 3 * N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_reader_gets_lagged_through_stream_next_then_continues() {
    let cache = cache("lag-async");
    let streams = Streams::builder(&cache).buffer(4).start().unwrap();
    let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();
    for i in 0..10 {
        cache.put(i, i);
    }
    let mut items = Vec::new();
    for _ in 0..5 {
        items.push(tokio::time::timeout(PATIENCE, sub.next()).await.unwrap().unwrap());
    }
    assert!(items[..4].iter().all(|i| i.is_ok()));
    assert_eq!(items[4], Err(Lagged(6)));
    // Reading continues with the next event.
    cache.put(100, 1);
    let next = tokio::time::timeout(PATIENCE, sub.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(next.target, nebulex::Target::Key(100));
    assert_eq!(next.metadata.seq, 11);
    streams.stop();
    assert!(tokio::time::timeout(PATIENCE, sub.next()).await.unwrap().is_none());
}

/// A loss notice rides with the next event instead of taking a slot of its
/// own: a subscriber that frees its one slot still gets the next event.
#[test]
fn a_loss_notice_takes_no_slot_from_the_next_event() {
    let cache = cache("loss_takes_no_slot");
    let _streams = Streams::builder(&cache).buffer(1).start().unwrap();
    let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();
    let key = |e: Arc<nebulex::CacheEntryEvent<u64>>| e.target.keys()[0];

    cache.put(1, 1);
    cache.put(2, 2); // the buffer holds 1: dropped
    assert_eq!(sub.try_recv().map(key), Ok(1));
    cache.put(3, 3); // the freed slot takes it, after the notice of 2's loss
    assert_eq!(sub.try_recv().map(key), Err(nebulex_streams::TryRecvError::Lagged(1)));
    assert_eq!(sub.try_recv().map(key), Ok(3));
    assert_eq!(sub.try_recv().map(key), Err(nebulex_streams::TryRecvError::Empty));
}

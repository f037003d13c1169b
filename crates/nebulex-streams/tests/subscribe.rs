//! Starting streams, subscribing, routing to partitions, filtering, stopping,
//! and reading from sync and async code.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use std::future::Future;

use futures::{FutureExt, StreamExt};
use nebulex::{Cache, CacheEntryEvent, Command, EventType, Query, Target};
use nebulex_streams::{
    partition_of, BroadcastError, BroadcastStatus, Error, Lagged, Route, Streams, StreamsExt, SubscribeOptions,
    Telemetry, TryRecvError, MAX_BUSY_POLL,
};

use common::{drain, event, events_only, recv_within, Recorded, Stopper, PATIENCE};

fn cache(name: &str) -> Cache<String, u32> {
    Cache::builder().name(name).build().unwrap()
}

fn key(i: usize) -> String {
    format!("user:{i}")
}

// ----- errors ---------------------------------------------------------------

#[test]
fn subscribe_without_a_stream_fails_with_stream_not_started() {
    let cache = cache("no-stream");
    assert_eq!(cache.subscribe(SubscribeOptions::new()).unwrap_err(), Error::StreamNotStarted);
    assert!(cache.streams().is_none());
    assert!(Streams::lookup(&cache).is_none());
}

#[test]
fn subscribe_after_stop_fails_with_stream_not_started() {
    let cache = cache("stopped");
    let streams = Streams::builder(&cache).start().unwrap();
    let _live = cache.subscribe(SubscribeOptions::new()).unwrap();
    streams.stop();
    assert!(streams.is_stopped());
    assert_eq!(cache.subscribe(SubscribeOptions::new()).unwrap_err(), Error::StreamNotStarted);
    // Through a handle kept from before the stop, too.
    assert_eq!(streams.subscribe(SubscribeOptions::new()).unwrap_err(), Error::StreamNotStarted);
    // Stopping twice does nothing.
    streams.stop();
}

#[test]
fn second_start_fails_with_already_started_and_a_new_start_is_allowed_after_stop() {
    let cache = cache("restart");
    let first = Streams::builder(&cache).start().unwrap();
    assert_eq!(Streams::builder(&cache).start().unwrap_err(), Error::AlreadyStarted);
    assert_eq!(Streams::builder(&cache).partitions(4).start().unwrap_err(), Error::AlreadyStarted);
    // The refused start left the first stream working.
    let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();
    cache.put(key(1), 1);
    assert_eq!(event(&mut sub).kind, EventType::Inserted);

    first.stop();
    let second = Streams::builder(&cache).partitions(2).start().unwrap();
    assert_eq!(second.info().partitions, Some(2));
    assert!(Streams::lookup(&cache).is_some());
    let mut sub2 = cache.subscribe(SubscribeOptions::new().partition(partition_of(&key(1), 2))).unwrap();
    cache.put(key(1), 2);
    let e = event(&mut sub2);
    assert_eq!((e.kind, &e.target), (EventType::Updated, &Target::Key(key(1))));
    // The old subscription ended at the first stop and sees nothing of the second stream.
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Closed);
    // Stopping the old handle again does not touch the new stream.
    first.stop();
    assert!(!second.is_stopped());
    assert!(Streams::lookup(&cache).is_some());
    cache.put(key(1), 3);
    assert_eq!(event(&mut sub2).kind, EventType::Updated);
}

/// Sets its flag when dropped: what holds it was freed.
struct DropFlag(Arc<std::sync::atomic::AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_stream_stopped_by_another_thread_while_it_starts_leaves_no_listener_behind() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    // The stopper stops the stream as soon as `lookup` shows it, racing the
    // start. Once it did, the stream's state (its observer with it) must be
    // freed: a listener left registered with the cache would hold it for
    // the cache's life.
    let cache = cache("start-stop-race");
    let _stopper = Stopper::spawn(&cache);
    for round in 0..5_000 {
        let freed = Arc::new(AtomicBool::new(false));
        let flag = DropFlag(freed.clone());
        let streams = Streams::builder(&cache)
            .observer(move |_| {
                let _ = &flag;
            })
            .start();
        // The stopper stops it, whether it saw it during the start or after;
        // the start's caller does not (it may find its stream stopped).
        drop(streams.unwrap_or_else(|e| panic!("round {round}: {e}")));
        let deadline = Instant::now() + PATIENCE;
        while !freed.load(SeqCst) {
            assert!(Instant::now() < deadline, "round {round}: the stopped stream's state is still held");
            std::thread::yield_now();
        }
    }
}

/// A subscription made from another thread as soon as `lookup` shows the
/// stream, while `start` is finishing, hears the events written after both
/// returned. (Many partitions make the start's last step long; a third
/// thread keeps both cores busy, so that either side is preempted anywhere.)
#[test]
fn a_subscription_made_while_the_stream_starts_hears_what_is_written_after() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    const PARTITIONS: u32 = 4096;
    let key = (0u64..).find(|k| partition_of(k, PARTITIONS) == 0).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let spinner = {
        let done = done.clone();
        std::thread::spawn(move || {
            while !done.load(SeqCst) {
                std::hint::spin_loop();
            }
        })
    };
    let mut deaf = 0;
    for _ in 0..300 {
        let cache: Cache<u64, u64> = Cache::builder().name("start-subscribe-race").build().unwrap();
        let looking = cache.clone();
        let subscriber = std::thread::spawn(move || loop {
            if let Some(streams) = Streams::lookup(&looking) {
                return streams.subscribe(SubscribeOptions::new().partition(0)).unwrap();
            }
            std::hint::spin_loop();
        });
        let _streams = Streams::builder(&cache).partitions(PARTITIONS).buffer(4).start().unwrap();
        let mut sub = subscriber.join().unwrap();
        cache.put(key, 1);
        deaf += usize::from(sub.try_recv().is_err());
    }
    done.store(true, SeqCst);
    spinner.join().unwrap();
    assert_eq!(deaf, 0, "subscriptions that heard nothing");
}

#[test]
fn empty_event_filter_is_refused() {
    let cache = cache("empty-filter");
    let _streams = Streams::builder(&cache).start().unwrap();
    let err = cache.subscribe(SubscribeOptions::new().events([])).unwrap_err();
    assert_eq!(err, Error::EmptyEventFilter);
}

#[test]
fn partition_on_an_unpartitioned_stream_is_refused_with_not_partitioned() {
    let cache = cache("unpartitioned");
    let _streams = Streams::builder(&cache).start().unwrap();
    assert_eq!(cache.subscribe(SubscribeOptions::new().partition(0)).unwrap_err(), Error::NotPartitioned);
}

#[test]
fn partition_past_the_count_is_refused_with_partition_out_of_range() {
    let cache = cache("out-of-range");
    let _streams = Streams::builder(&cache).partitions(4).start().unwrap();
    assert_eq!(
        cache.subscribe(SubscribeOptions::new().partition(4)).unwrap_err(),
        Error::PartitionOutOfRange { partition: 4, partitions: 4 }
    );
    assert_eq!(
        cache.subscribe(SubscribeOptions::new().partition(u32::MAX)).unwrap_err(),
        Error::PartitionOutOfRange { partition: u32::MAX, partitions: 4 }
    );
    assert_eq!(cache.subscribe(SubscribeOptions::new().partition(3)).unwrap().partition(), 3);
}

#[test]
fn zero_partitions_and_zero_buffer_are_invalid_options_and_leave_nothing_started() {
    let cache = cache("invalid");
    assert!(matches!(Streams::builder(&cache).partitions(0).start(), Err(Error::InvalidOption(_))));
    assert!(matches!(Streams::builder(&cache).buffer(0).start(), Err(Error::InvalidOption(_))));
    let too_big = nebulex_streams::MAX_BUFFER + 1;
    assert!(matches!(Streams::builder(&cache).buffer(too_big).start(), Err(Error::InvalidOption(_))));
    assert!(matches!(Streams::builder(&cache).buffer(usize::MAX).start(), Err(Error::InvalidOption(_))));
    let too_many = nebulex_streams::MAX_PARTITIONS + 1;
    assert!(matches!(Streams::builder(&cache).partitions(too_many).start(), Err(Error::InvalidOption(_))));
    assert!(Streams::lookup(&cache).is_none());
    assert_eq!(cache.subscribe(SubscribeOptions::new()).unwrap_err(), Error::StreamNotStarted);
    // Nothing was left registered: a valid start works.
    let _streams = Streams::builder(&cache).partitions(nebulex_streams::MAX_PARTITIONS).buffer(1).start().unwrap();
}

// ----- filtering and routing --------------------------------------------------

#[test]
fn event_filter_delivers_only_the_chosen_types() {
    let cache = cache("filter");
    let _streams = Streams::builder(&cache).start().unwrap();
    let mut ins_del =
        cache.subscribe(SubscribeOptions::new().events([EventType::Inserted, EventType::Deleted])).unwrap();
    let mut all = cache.subscribe(SubscribeOptions::new()).unwrap();

    cache.put(key(1), 1); // inserted
    cache.put(key(1), 2); // updated
    cache.replace(key(1), 3); // updated
    cache.delete(&key(1)); // deleted
    cache.put(key(2), 1); // inserted
    cache.take(&key(2)); // deleted
    cache.delete(&key(3)); // deleted (always)

    let kinds = |sub: &mut nebulex_streams::Subscription<String>| {
        events_only(drain(sub)).iter().map(|e| e.kind).collect::<Vec<_>>()
    };
    use EventType::*;
    assert_eq!(kinds(&mut ins_del), [Inserted, Deleted, Inserted, Deleted, Deleted]);
    assert_eq!(kinds(&mut all), [Inserted, Updated, Updated, Deleted, Inserted, Deleted, Deleted]);
}

#[test]
fn subscriptions_without_a_partition_are_assigned_round_robin() {
    let cache = cache("round-robin");
    let _streams = Streams::builder(&cache).partitions(4).start().unwrap();
    let subs: Vec<_> = (0..8).map(|_| cache.subscribe(SubscribeOptions::new()).unwrap()).collect();
    let mut per_partition = [0; 4];
    for s in &subs {
        per_partition[s.partition() as usize] += 1;
    }
    assert_eq!(per_partition, [2, 2, 2, 2]);
    // Consecutive subscriptions take consecutive partitions.
    let order: Vec<u32> = subs.iter().map(|s| s.partition()).collect();
    for w in order.windows(2) {
        assert_eq!(w[1], (w[0] + 1) % 4, "{order:?}");
    }
    // An unpartitioned stream has the one partition 0.
    let other = self::cache("round-robin-1");
    let _s = Streams::builder(&other).start().unwrap();
    for _ in 0..3 {
        assert_eq!(other.subscribe(SubscribeOptions::new()).unwrap().partition(), 0);
    }
}

#[test]
fn default_router_sends_every_event_of_a_key_to_its_stable_partition_with_metadata() {
    const N: u32 = 4;
    let cache = cache("router");
    let _streams = Streams::builder(&cache).partitions(N).start().unwrap();
    let mut subs: Vec<_> = (0..N).map(|p| cache.subscribe(SubscribeOptions::new().partition(p)).unwrap()).collect();

    for round in 0..3u32 {
        for i in 0..200 {
            cache.put(key(i), round);
        }
    }
    for i in 0..200 {
        cache.delete(&key(i));
    }

    let mut keys_seen: HashMap<String, (u32, usize)> = HashMap::new();
    for (p, sub) in subs.iter_mut().enumerate() {
        let p = p as u32;
        let events = events_only(drain(sub));
        assert!(!events.is_empty(), "partition {p} got nothing: keys spread over all 4");
        let mut last_seq = 0;
        for e in &events {
            let Target::Key(k) = &e.target else { panic!("a single-key event: {e:?}") };
            assert_eq!(partition_of(k, N), p, "{k} is routed by its stable hash");
            assert_eq!(e.metadata.partition, Some(p));
            assert_eq!(e.metadata.partitions, Some(N));
            assert_eq!(e.metadata.topic.as_deref(), Some(format!("nbx:router:{p}").as_str()));
            assert_eq!(e.metadata.node, cache.node_id());
            assert!(
                e.metadata.seq > last_seq,
                "seq strictly increases per partition: {} after {last_seq}",
                e.metadata.seq
            );
            last_seq = e.metadata.seq;
            let entry = keys_seen.entry(k.clone()).or_insert((p, 0));
            assert_eq!(entry.0, p, "every event of {k} goes to one partition");
            entry.1 += 1;
        }
    }
    assert_eq!(keys_seen.len(), 200);
    assert!(keys_seen.values().all(|&(_, n)| n == 4), "each key: 1 insert, 2 updates, 1 delete");
}

#[test]
fn unpartitioned_stream_events_carry_no_partition_and_the_cache_topic() {
    let cache = cache("flat");
    let _streams = Streams::builder(&cache).start().unwrap();
    let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();
    for i in 0..50 {
        cache.put(key(i), 1);
    }
    let events = events_only(drain(&mut sub));
    assert_eq!(events.len(), 50);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.metadata.partition, None);
        assert_eq!(e.metadata.partitions, None);
        assert_eq!(e.metadata.topic.as_deref(), Some("nbx:flat"));
        assert_eq!(e.metadata.seq, i as u64 + 1);
        assert_eq!(e.target, Target::Key(key(i)));
    }
}

#[test]
fn multi_key_event_is_split_per_partition_with_each_part_holding_only_its_keys() {
    const N: u32 = 4;
    let cache = cache("split");
    let _streams = Streams::builder(&cache).partitions(N).start().unwrap();
    let mut subs: Vec<_> = (0..N).map(|p| cache.subscribe(SubscribeOptions::new().partition(p)).unwrap()).collect();

    let keys: Vec<String> = (0..40).map(key).collect();
    cache.put_all(keys.iter().map(|k| (k.clone(), 1)));

    let mut all_keys = BTreeSet::new();
    let mut versions = BTreeSet::new();
    for (p, sub) in subs.iter_mut().enumerate() {
        let p = p as u32;
        let events = events_only(drain(sub));
        assert_eq!(events.len(), 1, "one part per partition (40 keys reach all 4)");
        let e = &events[0];
        assert_eq!((e.kind, e.command), (EventType::Inserted, Command::PutAll));
        assert_eq!(e.metadata.partition, Some(p));
        let Target::Keys(part) = &e.target else { panic!("a multi-key part: {e:?}") };
        assert!(!part.is_empty());
        for k in part {
            assert_eq!(partition_of(k, N), p, "{k} belongs to partition {p}");
            assert!(all_keys.insert(k.clone()), "{k} is in one part only");
        }
        versions.insert(e.version);
    }
    assert_eq!(all_keys, keys.iter().cloned().collect(), "the parts together name every key");
    assert_eq!(versions.len(), 1, "the parts are one event: one version");
}

#[test]
fn delete_all_target_all_reaches_every_partition() {
    const N: u32 = 4;
    let cache = cache("all");
    let _streams = Streams::builder(&cache).partitions(N).start().unwrap();
    let mut subs: Vec<_> = (0..N).map(|p| cache.subscribe(SubscribeOptions::new().partition(p)).unwrap()).collect();
    cache.put(key(1), 1);
    drain(&mut subs[partition_of(&key(1), N) as usize]);

    assert_eq!(cache.delete_all(Query::All), 1);
    for (p, sub) in subs.iter_mut().enumerate() {
        let events = events_only(drain(sub));
        assert_eq!(events.len(), 1, "partition {p}");
        assert_eq!(events[0].kind, EventType::Deleted);
        assert_eq!(events[0].command, Command::DeleteAll);
        assert_eq!(events[0].target, Target::All);
        assert_eq!(events[0].metadata.partition, Some(p as u32));
    }
}

#[test]
fn custom_router_discards_and_reports_out_of_range_routes_without_panicking() {
    const N: u32 = 4;
    let cache = cache("custom");
    let telemetry = Recorded::new();
    let _streams = Streams::builder(&cache)
        .partitions(N)
        .hash(|e: &CacheEntryEvent<String>| match &e.target {
            Target::Key(k) if k.starts_with("temp:") => Route::Discard,
            Target::Key(k) if k.starts_with("bad:") => Route::Partition(99),
            Target::Key(k) if k.starts_with("session:") => Route::Partition(2),
            _ => Route::Partition(1),
        })
        .observer(telemetry.observer())
        .start()
        .unwrap();
    let mut subs: Vec<_> = (0..N).map(|p| cache.subscribe(SubscribeOptions::new().partition(p)).unwrap()).collect();
    telemetry.clear();

    cache.put("temp:1".to_string(), 1);
    cache.put("bad:1".to_string(), 1);
    cache.put("session:1".to_string(), 1);
    cache.put("user:1".to_string(), 1);
    cache.put_all([("user:2".to_string(), 1), ("temp:2".to_string(), 1)]); // Keys: partition 1 whole

    let got: Vec<Vec<Arc<CacheEntryEvent<String>>>> = subs
        .iter_mut()
        .map(|s| {
            // "bad:1" might have been any partition's: a loss of unknown
            // size where it would have come (a discard is none).
            let mut items = drain(s);
            assert!(matches!(items.first(), Some(Err(Lagged(0)))), "{items:?}");
            events_only(items.split_off(1))
        })
        .collect();
    assert!(got[0].is_empty() && got[3].is_empty());
    assert_eq!(got[2].len(), 1);
    assert_eq!(got[2][0].target, Target::Key("session:1".to_string()));
    assert_eq!(got[2][0].metadata.partition, Some(2));
    assert_eq!(got[1].len(), 2);
    assert_eq!(got[1][0].target, Target::Key("user:1".to_string()));
    // A custom router routes the whole event: no split.
    assert_eq!(got[1][1].target, Target::Keys(vec!["user:2".to_string(), "temp:2".to_string()]));

    let errors: Vec<_> = telemetry
        .all()
        .into_iter()
        .filter_map(|t| match t {
            Telemetry::Broadcast { status: BroadcastStatus::Error, reason, event, topic } => {
                Some((reason, event, topic))
            }
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), 1, "only the out-of-range route is an error; a discard is not");
    assert_eq!(errors[0].0, Some(BroadcastError::PartitionOutOfRange { partition: 99, partitions: N }));
    assert_eq!(errors[0].1.target, Target::Key("bad:1".to_string()));
    // Reported on the stream's own topic: no name is made (and kept for good)
    // for each partition a router wrongly answers.
    assert_eq!(&*errors[0].2, "nbx:custom");

    // The stream still works after a bad route.
    cache.delete(&"user:1".to_string());
    assert_eq!(event(&mut subs[1]).kind, EventType::Deleted);
}

#[test]
fn broadcast_from_true_keeps_the_nodes_own_events_from_its_local_subscribers() {
    let cache = cache("broadcast-from");
    let streams = Streams::builder(&cache).partitions(2).broadcast_from(true).start().unwrap();
    let mut subs: Vec<_> = (0..2).map(|p| cache.subscribe(SubscribeOptions::new().partition(p)).unwrap()).collect();
    for i in 0..100 {
        cache.put(key(i), 1);
        cache.delete(&key(i));
    }
    cache.delete_all(Query::All);
    for sub in &mut subs {
        assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    }
    streams.stop();
    for sub in &mut subs {
        assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Closed);
    }
}

// ----- lifecycle -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_drains_buffered_events_then_ends_every_subscription() {
    let cache = cache("stop");
    let streams = Streams::builder(&cache).partitions(2).start().unwrap();
    let mut subs: Vec<_> = (0..2).map(|p| cache.subscribe(SubscribeOptions::new().partition(p)).unwrap()).collect();
    // A third subscriber is already waiting in a task when the stream stops.
    let waiting = cache.subscribe(SubscribeOptions::new().partition(0).events([EventType::Expired])).unwrap();
    let waiter = tokio::spawn(async move {
        let mut waiting = waiting;
        waiting.recv().await.map(|_| ())
    });

    for i in 0..20 {
        cache.put(key(i), 1);
    }
    streams.stop();
    cache.put(key(100), 1); // after the stop: nobody sees it

    let mut received = 0;
    for sub in &mut subs {
        while let Some(item) = recv_within(sub, PATIENCE).await.expect("recv ends after stop") {
            let e = item.unwrap();
            assert_ne!(e.target, Target::Key(key(100)));
            received += 1;
        }
        // And it stays ended.
        assert!(recv_within(sub, PATIENCE).await.expect("no hang").is_none());
    }
    assert_eq!(received, 20, "every event put before the stop is received");
    let ended = tokio::time::timeout(PATIENCE, waiter).await.expect("a waiting recv is woken by stop").unwrap();
    assert_eq!(ended, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_cache_ends_subscriptions_even_while_a_streams_handle_lives() {
    let cache = cache("dropped");
    let streams = Streams::builder(&cache).start().unwrap();
    let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();
    let waiting = cache.subscribe(SubscribeOptions::new().events([EventType::Evicted])).unwrap();
    let waiter = tokio::spawn(async move {
        let mut waiting = waiting;
        waiting.recv().await.map(|_| ())
    });
    cache.put(key(1), 1);
    let clone = cache.clone();
    drop(cache);
    clone.put(key(2), 1); // a clone keeps the cache, and so the stream, alive
    drop(clone);

    let first = recv_within(&mut sub, PATIENCE).await.unwrap().unwrap().unwrap();
    assert_eq!(first.target, Target::Key(key(1)));
    let second = recv_within(&mut sub, PATIENCE).await.unwrap().unwrap().unwrap();
    assert_eq!(second.target, Target::Key(key(2)));
    assert!(recv_within(&mut sub, PATIENCE).await.expect("the stream closed with the cache").is_none());
    assert_eq!(tokio::time::timeout(PATIENCE, waiter).await.expect("a waiting recv is woken").unwrap(), None);
    assert!(streams.is_stopped());
    assert_eq!(streams.subscribe(SubscribeOptions::new()).unwrap_err(), Error::StreamNotStarted);
    streams.stop(); // no cache left: does nothing, no panic
}

#[test]
fn lookup_and_info_describe_the_started_stream() {
    let cache = cache("info");
    assert!(Streams::lookup(&cache).is_none());
    let streams = Streams::builder(&cache).partitions(3).start().unwrap();
    let info = streams.info();
    assert_eq!(&*info.cache, "info");
    assert_eq!(info.partitions, Some(3));
    assert_eq!(info.pubsub, None);
    assert_eq!(info.node, cache.node_id());

    let found = Streams::lookup(&cache).expect("the stream is found from its cache");
    assert_eq!(found.info(), info);
    assert_eq!(cache.streams().unwrap().info(), info);
    // The looked-up handle is the same stream: stopping it stops the original.
    found.stop();
    assert!(streams.is_stopped());
    assert!(Streams::lookup(&cache).is_none());

    let flat = self::cache("info-flat");
    let s = Streams::builder(&flat).start().unwrap();
    assert_eq!(s.info().partitions, None);
    assert_eq!(&*s.info().cache, "info-flat");
}

#[test]
fn dropping_every_streams_handle_does_not_stop_the_stream() {
    let cache = cache("handle-drop");
    {
        let streams = Streams::builder(&cache).start().unwrap();
        let clone = streams.clone();
        drop(streams);
        drop(clone);
    }
    drop(Streams::lookup(&cache).unwrap());
    let mut sub = cache.subscribe(SubscribeOptions::new()).expect("still started");
    cache.put(key(1), 1);
    assert_eq!(event(&mut sub).target, Target::Key(key(1)));
    assert!(!Streams::lookup(&cache).unwrap().is_stopped());
    assert_eq!(Streams::builder(&cache).start().unwrap_err(), Error::AlreadyStarted);
}

#[test]
fn dropping_a_subscription_stops_delivery_to_it_only() {
    let cache = cache("unsubscribe");
    let telemetry = Recorded::new();
    let _streams = Streams::builder(&cache).observer(telemetry.observer()).start().unwrap();
    let a = cache.subscribe(SubscribeOptions::new()).unwrap();
    let mut b = cache.subscribe(SubscribeOptions::new()).unwrap();
    drop(a);
    cache.put(key(1), 1);
    assert_eq!(event(&mut b).target, Target::Key(key(1)));
    drop(b);
    telemetry.clear();
    cache.put(key(2), 1);
    assert!(telemetry.all().is_empty(), "no subscriber: nothing is broadcast");
}

// ----- sync and async readers ------------------------------------------------

#[test]
fn recv_blocking_from_a_std_thread_receives_every_event_then_none_after_stop() {
    let cache = cache("blocking");
    let streams = Streams::builder(&cache).start().unwrap();
    let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();
    let (started_tx, started_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        started_tx.send(()).unwrap();
        let mut got = Vec::new();
        while let Some(item) = sub.recv_blocking() {
            got.push(item.map(|e| e.target.clone()));
        }
        done_tx.send(got).unwrap();
    });
    started_rx.recv_timeout(PATIENCE).unwrap();
    for i in 0..1_000 {
        cache.put(key(i), 1);
    }
    streams.stop();
    let got = done_rx.recv_timeout(PATIENCE).expect("recv_blocking returns None after stop");
    let expected: Vec<Result<Target<String>, Lagged>> = (0..1_000).map(|i| Ok(Target::Key(key(i)))).collect();
    assert_eq!(got, expected);
}

#[test]
fn try_recv_says_empty_then_gives_the_event_then_closed_after_stop() {
    let cache = cache("try-recv");
    let streams = Streams::builder(&cache).start().unwrap();
    let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    cache.put(key(1), 1);
    let e = sub.try_recv().unwrap();
    assert_eq!((e.kind, &e.target, e.command), (EventType::Inserted, &Target::Key(key(1)), Command::Put));
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    cache.put(key(1), 2);
    streams.stop();
    // Buffered before the stop: still received.
    assert_eq!(sub.try_recv().unwrap().kind, EventType::Updated);
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Closed);
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Closed);
    assert!(sub.recv_blocking().is_none());
}

#[test]
fn busy_poll_longer_than_its_maximum_is_refused_and_takes_no_partition_turn() {
    let cache = cache("busy-poll-max");
    let _streams = Streams::builder(&cache).partitions(2).start().unwrap();
    let too_long = cache.subscribe(SubscribeOptions::new().busy_poll(MAX_BUSY_POLL + Duration::from_nanos(1)));
    match too_long {
        Err(Error::InvalidOption(msg)) => assert!(msg.contains("busy_poll"), "{msg}"),
        other => panic!("expected InvalidOption, got {:?}", other.map(|s| s.partition())),
    }
    // The refused one took no turn: round-robin starts at partition 0.
    let longest = cache.subscribe(SubscribeOptions::new().busy_poll(MAX_BUSY_POLL)).unwrap();
    let none = cache.subscribe(SubscribeOptions::new().busy_poll(Duration::ZERO)).unwrap();
    assert_eq!((longest.partition(), none.partition()), (0, 1));
}

#[test]
fn a_busy_polling_receive_looks_for_its_budget_then_sleeps_and_a_write_wakes_it() {
    let cache = cache("busy-poll-budget");
    let streams = Streams::builder(&cache).start().unwrap();
    let budget = MAX_BUSY_POLL;
    let mut sub = cache.subscribe(SubscribeOptions::new().busy_poll(budget)).unwrap();
    let (woken, wake_count) = counting_waker();
    let mut cx = std::task::Context::from_waker(&woken);

    // Nothing comes: the first poll looks for the whole budget, then sleeps.
    let mut receive = Box::pin(sub.recv());
    let start = Instant::now();
    assert!(receive.as_mut().poll(&mut cx).is_pending());
    assert!(start.elapsed() >= budget, "it looked for {:?} of {budget:?}", start.elapsed());
    // A poll of the same wait does not look again.
    let again = Instant::now();
    assert!(receive.as_mut().poll(&mut cx).is_pending());
    assert!(again.elapsed() < budget, "a second look in one wait took {:?}", again.elapsed());

    // The sleeping receive is woken by the write and has its event.
    cache.put(key(1), 1);
    assert_eq!(wake_count.load(std::sync::atomic::Ordering::SeqCst), 1, "the write woke the receive");
    match receive.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(Some(Ok(e))) => assert_eq!(e.target, Target::Key(key(1))),
        other => panic!("expected the event, got {:?}", other.map(|o| o.map(|i| i.is_ok()))),
    }
    drop(receive);
    streams.stop();
    // A stopped stream ends a busy-polling receive at once.
    let start = Instant::now();
    assert!(sub.recv().now_or_never().expect("ready in one poll").is_none());
    assert!(start.elapsed() < budget, "the close was seen after {:?}", start.elapsed());
}

#[test]
fn a_busy_polling_receive_takes_an_event_written_while_it_looks() {
    let cache = cache("busy-poll");
    let streams = Streams::builder(&cache).start().unwrap();
    let mut sub = cache.subscribe(SubscribeOptions::new().busy_poll(MAX_BUSY_POLL)).unwrap();
    // Each round, a writer puts one key a millisecond after it is told the
    // receive starts. A round counts when one poll had the event and the
    // put came after the poll started (a receive that does not look would
    // answer `Pending` then). A writer held off the CPU past the budget
    // makes a round not count, so a few are tried.
    let mut in_one_poll = 0;
    for i in 0..20 {
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let writer = {
            let cache = cache.clone();
            std::thread::spawn(move || {
                go_rx.recv().unwrap();
                let start = Instant::now();
                while start.elapsed() < Duration::from_millis(1) {
                    std::hint::spin_loop();
                }
                let put_at = Instant::now();
                cache.put(key(i), 1);
                put_at
            })
        };
        go_tx.send(()).unwrap();
        let polled_at = Instant::now();
        let one_poll = sub.recv().now_or_never();
        let put_at = writer.join().unwrap();
        let item = match one_poll {
            Some(item) => {
                in_one_poll += usize::from(put_at > polled_at);
                item
            }
            None => sub.recv_blocking(),
        };
        assert_eq!(item.unwrap().unwrap().target, Target::Key(key(i)));
    }
    assert!(in_one_poll > 0, "no receive had, within one poll, an event put after it started");
    streams.stop();
    assert!(sub.recv_blocking().is_none());
}

#[test]
fn a_busy_polling_receive_reports_what_was_missed_then_the_next_event() {
    let cache = cache("busy-poll-lag");
    let _streams = Streams::builder(&cache).buffer(1).start().unwrap();
    let mut sub = cache.subscribe(SubscribeOptions::new().busy_poll(Duration::from_millis(1))).unwrap();
    for i in 0..3 {
        cache.put(key(i), 1);
    }
    cache.put(key(0), 2);
    assert_eq!(sub.recv().now_or_never().unwrap().unwrap().unwrap().target, Target::Key(key(0)));
    assert_eq!(sub.recv().now_or_never().unwrap().unwrap().unwrap_err(), Lagged(3));
}

/// A waker that counts its wakes.
fn counting_waker() -> (std::task::Waker, Arc<std::sync::atomic::AtomicUsize>) {
    struct Count(Arc<std::sync::atomic::AtomicUsize>);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    (Arc::new(Count(count.clone())).into(), count)
}

#[test]
fn busy_polling_readers_receive_every_event_then_none_after_stop() {
    let cache = cache("busy-poll-readers");
    let streams = Streams::builder(&cache).partitions(2).start().unwrap();
    let options = || SubscribeOptions::new().busy_poll(Duration::from_micros(200));
    let (mut sync_sub, mut async_sub) = (cache.subscribe(options()).unwrap(), cache.subscribe(options()).unwrap());
    let sync_reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        while let Some(item) = sync_sub.recv_blocking() {
            got.push(item.unwrap().target.clone());
        }
        got
    });
    let async_reader = std::thread::spawn(move || {
        futures::executor::block_on(async move {
            let mut got = Vec::new();
            while let Some(item) = async_sub.next().await {
                got.push(item.unwrap().target.clone());
            }
            got
        })
    });
    for i in 0..2_000 {
        cache.put(key(i), 1);
    }
    streams.stop();
    for (p, reader) in [sync_reader, async_reader].into_iter().enumerate() {
        let got = reader.join().unwrap();
        let expected: Vec<Target<String>> =
            (0..2_000).map(key).filter(|k| partition_of(k, 2) == p as u32).map(Target::Key).collect();
        assert_eq!(got, expected, "partition {p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_task_reads_with_stream_next_until_the_stream_stops() {
    let cache = cache("async");
    let streams = Streams::builder(&cache).partitions(2).start().unwrap();
    let mut tasks = Vec::new();
    for p in 0..2 {
        let mut sub = cache.subscribe(SubscribeOptions::new().partition(p)).unwrap();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(item) = sub.next().await {
                got.push(item.unwrap());
            }
            got
        }));
    }
    // Writes from another thread while the tasks wait.
    let writer = {
        let cache = cache.clone();
        std::thread::spawn(move || {
            for i in 0..500 {
                cache.put(key(i), 1);
                cache.delete(&key(i));
            }
        })
    };
    tokio::task::spawn_blocking(move || writer.join().unwrap()).await.unwrap();
    streams.stop();
    let mut total = 0;
    for (p, task) in tasks.into_iter().enumerate() {
        let got = tokio::time::timeout(PATIENCE, task).await.expect("the task ends after stop").unwrap();
        for pair in got.chunks(2) {
            let Target::Key(k) = &pair[0].target else { panic!() };
            assert_eq!(partition_of(k, 2), p as u32);
            assert_eq!(pair[0].kind, EventType::Inserted);
            assert_eq!((pair[1].kind, &pair[1].target), (EventType::Deleted, &pair[0].target));
        }
        total += got.len();
    }
    assert_eq!(total, 1_000);
}

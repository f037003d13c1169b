//! The Invalidator over the in-process bus: scopes, targets, no echo, the
//! fail-safe flush on loss, the disconnect policies, and the load race.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nebulex::{Cache, NodeId, Query};
use nebulex_streams::{
    partition_of, DisconnectPolicy, EventScope, Invalidator, InvalidatorBuilder, InvalidatorEvent, MemoryBus, PubSub,
    Streams, StreamsExt, SubscribeOptions, Telemetry,
};
use support::*;

type Reports = Arc<Mutex<Vec<InvalidatorEvent>>>;

/// A node on the bus, connected, whose invalidators' reports land in the
/// returned list.
async fn node_recording(id: u64, bus: &PubSub, partitions: u32) -> (Cache<String, u32>, Streams<String>, Reports) {
    let cache = node("users", id);
    let reports: Reports = Arc::default();
    let streams = Streams::builder(&cache)
        .partitions(partitions)
        .pubsub(bus.clone())
        .observer(recording(&reports))
        .start()
        .unwrap();
    streams.ready().await.unwrap();
    (cache, streams, reports)
}

/// An observer that adds the invalidators' reports to `reports`.
fn recording(reports: &Reports) -> impl Fn(&Telemetry<String>) + Send + Sync + 'static {
    let seen = reports.clone();
    move |t| {
        if let Telemetry::Invalidator { event, .. } = t {
            seen.lock().unwrap().push(event.clone());
        }
    }
}

/// A node whose invalidator reports land in the returned list.
async fn node_with_invalidator(
    id: u64,
    bus: &PubSub,
    partitions: u32,
    scope: EventScope,
    policy: DisconnectPolicy,
) -> (Cache<String, u32>, Streams<String>, Invalidator, Reports) {
    let (cache, streams, reports) = node_recording(id, bus, partitions).await;
    let invalidator = Invalidator::builder(&streams).scope(scope).on_disconnect(policy).start().unwrap();
    (cache, streams, invalidator, reports)
}

/// Selects frames of `origin` that carry events (not its heartbeats).
fn from_with_events(origin: NodeId) -> impl Fn(&str, &[u8]) -> bool + Send + Sync + 'static {
    move |_, bytes| {
        nebulex_streams::wire::decode::<String>(bytes, &Default::default())
            .is_ok_and(|f| f.header.origin == origin && !f.events.is_empty())
    }
}

fn invalidations(reports: &Reports) -> usize {
    reports.lock().unwrap().iter().filter(|e| matches!(e, InvalidatorEvent::Invalidate { .. })).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_scope_ignores_own_writes_and_removes_other_nodes_changes() {
    let bus = PubSub::memory();
    let (a, _sa, _ia, ra) = node_with_invalidator(1, &bus, 2, EventScope::Remote, DisconnectPolicy::Flush).await;
    let (b, _sb, _ib, rb) = node_with_invalidator(2, &bus, 2, EventScope::Remote, DisconnectPolicy::Flush).await;

    a.put("user:1".into(), 1);
    eventually("B saw A's insert", || invalidations(&rb) == 1).await;
    assert_eq!(a.get("user:1"), Some(1), "A keeps its own write");
    b.put("user:1".into(), 2);
    // Reported after the removal: wait on the report, then check the cache.
    eventually("A applied B's write", || invalidations(&ra) == 1).await;
    assert!(!a.contains_key("user:1"), "A invalidated user:1");
    assert_eq!(b.get("user:1"), Some(2), "B keeps its own write");
    assert_eq!(invalidations(&ra), 1, "A acted on B's write only");
    assert_eq!(invalidations(&rb), 1, "B acted on A's write only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_elsewhere_leaves_the_copy_and_a_write_removes_it() {
    let bus = PubSub::memory();
    let (a, _sa, _ia, _) = node_with_invalidator(1, &bus, 1, EventScope::Remote, DisconnectPolicy::Flush).await;
    let (b, _sb, _ib, rb) = node_with_invalidator(2, &bus, 1, EventScope::Remote, DisconnectPolicy::Flush).await;
    let unhandled =
        |r: &Reports| r.lock().unwrap().iter().filter(|e| matches!(e, InvalidatorEvent::Unhandled { .. })).count();

    b.put("user:1".into(), 1);
    // A reads the record through its cache: a load, which B must ignore.
    assert_eq!(a.get_or_insert_with("user:1".into(), || 1), 1);
    eventually("B saw A's load", || unhandled(&rb) == 1).await;
    assert_eq!(invalidations(&rb), 0, "a load is not a change");
    assert_eq!(b.get("user:1"), Some(1), "B keeps its copy");
    // A write of the same key on A is a change: B's copy goes.
    a.put("user:1".into(), 2);
    eventually("B applied A's write", || invalidations(&rb) == 1).await;
    assert!(!b.contains_key("user:1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_scope_acts_only_on_own_writes_and_all_on_both() {
    let bus = PubSub::memory();
    let (a, _sa, _ia, ra) = node_with_invalidator(1, &bus, 1, EventScope::Local, DisconnectPolicy::Flush).await;
    let (b, _sb, _ib, rb) = node_with_invalidator(2, &bus, 1, EventScope::All, DisconnectPolicy::Flush).await;

    a.put("k".into(), 1); // Local scope: A removes its own write.
    eventually("A counted its own write", || invalidations(&ra) == 1).await;
    assert!(!a.contains_key("k"), "A removed its own write");
    eventually("B (All) saw A's write", || invalidations(&rb) == 1).await;
    b.put("mine".into(), 1); // All scope: B removes its own write too.
    eventually("B removed its own write", || !b.contains_key("mine")).await;
    eventually("B counted both", || invalidations(&rb) == 2).await;
    // A ignores B's write (not in its Local scope): only its own write counted.
    assert_eq!(invalidations(&ra), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_all_targets_are_removed_without_echo() {
    let bus = PubSub::memory();
    let (a, _sa, _ia, _) = node_with_invalidator(1, &bus, 4, EventScope::Remote, DisconnectPolicy::Flush).await;
    let (b, _sb, _ib, rb) = node_with_invalidator(2, &bus, 4, EventScope::Remote, DisconnectPolicy::Flush).await;
    let mut a_hears: Vec<_> =
        (0..4).map(|p| a.subscribe(SubscribeOptions::new().scope(EventScope::Remote).partition(p)).unwrap()).collect();
    let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    let parts_of = |ks: &[String]| {
        let mut ps: Vec<u32> = ks.iter().map(|k| partition_of(k, 4)).collect();
        ps.sort();
        ps.dedup();
        ps.len()
    };
    // A's put_all reaches B as one event per partition.
    a.put_all(keys.iter().map(|k| (k.clone(), 1)));
    eventually("B applied A's put_all", || invalidations(&rb) == parts_of(&keys)).await;

    b.delete_all(Query::Keys(keys[..10].to_vec()));
    eventually("k0..k9 removed from A", || keys[..10].iter().all(|k| !a.contains_key(k))).await;
    assert!(keys[10..].iter().all(|k| a.contains_key(k)), "only the named keys");
    b.delete_all(Query::All);
    eventually("everything removed from A", || a.is_empty()).await;

    // One marker per partition, written by B after its deletes: B's frames
    // keep their order per partition, so each subscription has heard every
    // earlier event of B once its marker arrives.
    for p in 0..4 {
        let marker = (0..).map(|i| format!("marker{i}")).find(|k| partition_of(k, 4) == p).unwrap();
        b.put(marker, 0);
    }

    // No echo: A's invalidations emitted nothing, so A heard exactly B's two
    // deletes: one event per partition the keys fall in, then one per partition.
    let mut heard = 0;
    for sub in &mut a_hears {
        for item in until(sub, |e| e.target.keys().iter().any(|k| k.starts_with("marker"))).await {
            let e = item.expect("no lag");
            assert_eq!((e.metadata.node, e.kind), (NodeId(2), nebulex::EventType::Deleted));
            heard += 1;
        }
    }
    assert_eq!(heard, parts_of(&keys[..10]) + 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_frame_flushes_exactly_its_partition() {
    let bus = PubSub::memory();
    let memory = bus.as_memory().unwrap().clone();
    let (a, _sa, _ia, ra) = node_with_invalidator(1, &bus, 4, EventScope::Remote, DisconnectPolicy::Flush).await;
    let (b, _sb, _ib, rb) = node_with_invalidator(2, &bus, 4, EventScope::Remote, DisconnectPolicy::Flush).await;
    let keys: Vec<String> = (0..200).map(|i| format!("key:{i}")).collect();
    for k in &keys {
        b.put(k.clone(), 1);
    }
    // The bus is quiet once A has applied every one of B's writes.
    eventually("A applied B's writes", || invalidations(&ra) == keys.len()).await;
    let lost = "key:0".to_string();
    let p = partition_of(&lost, 4);
    let on_p = |i: usize| (0..).map(|j| format!("probe:{j}")).filter(|k| partition_of(k, 4) == p).nth(i).unwrap();
    // B knows where A's partition stands once it applied a write of A there.
    let before = invalidations(&rb);
    a.put(on_p(0), 1);
    eventually("B applied A's probe", || invalidations(&rb) == before + 1).await;
    // A's write of key:0 is lost on the way; the next one on its partition reveals the gap.
    memory.drop_frames_where(1, from_with_events(NodeId(1)));
    a.put(lost.clone(), 2);
    a.put(on_p(1), 3);
    eventually("B resynced partition", || {
        rb.lock().unwrap().iter().any(|e| matches!(e, InvalidatorEvent::Resync { partition, .. } if *partition == p))
    })
    .await;
    for k in &keys {
        assert_eq!(b.contains_key(k), partition_of(k, 4) != p, "{k}: only partition {p} is flushed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_last_frame_is_revealed_by_the_next_heartbeat() {
    let bus = PubSub::memory();
    let memory = bus.as_memory().unwrap().clone();
    let a = node("users", 1);
    let sa =
        Streams::builder(&a).partitions(1).pubsub(bus.clone()).heartbeat(Duration::from_millis(20)).start().unwrap();
    sa.ready().await.unwrap();
    let (b, _sb, _ib, rb) = node_with_invalidator(2, &bus, 1, EventScope::Remote, DisconnectPolicy::Flush).await;
    let before = invalidations(&rb);
    a.put("first".into(), 1);
    eventually("B applied A's first write", || invalidations(&rb) == before + 1).await;
    b.put("cached".into(), 1);
    memory.drop_frames_where(1, from_with_events(NodeId(1)));
    a.put("cached".into(), 2); // lost, and A writes nothing after it
    eventually("B resynced after A's heartbeat", || {
        rb.lock().unwrap().iter().any(|e| matches!(e, InvalidatorEvent::Resync { .. }))
    })
    .await;
    assert!(!b.contains_key("cached"), "B flushed after A's heartbeat");
}

/// Lets the single-threaded runtime run every task that can run.
async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

/// The heartbeat of the streams `node_with_invalidator` starts (the default).
const HEARTBEAT: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn flush_policy_flushes_at_the_cut_every_heartbeat_of_the_outage_and_at_the_restore() {
    let bus = PubSub::memory();
    let memory = bus.as_memory().unwrap().clone();
    let (b, _sb, _ib, rb) = node_with_invalidator(2, &bus, 2, EventScope::Remote, DisconnectPolicy::Flush).await;
    let resyncs = || rb.lock().unwrap().iter().filter(|e| matches!(e, InvalidatorEvent::Resync { .. })).count();
    b.put("a".into(), 1);
    memory.cut(NodeId(2));
    settle().await;
    assert_eq!(resyncs(), 2, "both partitions flushed at the cut");
    assert!(b.is_empty());

    // What is read during the outage misses the other nodes' changes: it is
    // flushed again within a heartbeat, for as long as the outage lasts.
    b.put("read-during-outage".into(), 1);
    tokio::time::sleep(HEARTBEAT / 2).await;
    settle().await;
    assert!(b.contains_key("read-during-outage"), "served until the next heartbeat");
    tokio::time::sleep(HEARTBEAT).await;
    settle().await;
    assert!(!b.contains_key("read-during-outage"), "flushed again a heartbeat into the outage");
    b.put("read-later".into(), 1);
    tokio::time::sleep(HEARTBEAT * 10).await;
    settle().await;
    assert!(!b.contains_key("read-later"), "and again, while the outage lasts");

    b.put("read-last".into(), 1);
    memory.restore(NodeId(2));
    settle().await;
    assert!(!b.contains_key("read-last"), "flushed at once on restore");
    let after = resyncs();
    b.put("read-after".into(), 1);
    tokio::time::sleep(HEARTBEAT * 5).await;
    settle().await;
    assert_eq!(resyncs(), after, "no more flushes once the connection is back");
    assert!(b.contains_key("read-after"));
}

#[tokio::test(start_paused = true)]
async fn serve_stale_flushes_what_was_read_during_a_long_outage_within_max() {
    let bus = PubSub::memory();
    let memory = bus.as_memory().unwrap().clone();
    let max = Duration::from_secs(30);
    let (b, _sb, _ib, _rb) =
        node_with_invalidator(2, &bus, 1, EventScope::Remote, DisconnectPolicy::ServeStale { max }).await;
    memory.cut(NodeId(2));
    tokio::time::sleep(max + HEARTBEAT).await;
    settle().await;
    // Read after the outage's first flush: it may go stale at once, unheard.
    b.put("read-during-outage".into(), 1);
    tokio::time::sleep(max / 2).await;
    settle().await;
    assert!(b.contains_key("read-during-outage"), "served within the window");
    tokio::time::sleep(max / 2 + HEARTBEAT).await;
    settle().await;
    assert!(!b.contains_key("read-during-outage"), "flushed within max, though the outage goes on");
    memory.restore(NodeId(2));
}

#[tokio::test(start_paused = true)]
async fn serve_stale_flushes_within_max_of_a_loss_though_an_outage_flush_is_due_later() {
    let bus = PubSub::memory();
    let memory = bus.as_memory().unwrap().clone();
    let (b, streams, _) = node_recording(2, &bus, 1).await;
    memory.cut(NodeId(2));
    // Started during the outage: its next flush is a heartbeat away.
    let max = HEARTBEAT / 5;
    let _ib = Invalidator::builder(&streams).on_disconnect(DisconnectPolicy::ServeStale { max }).start().unwrap();
    settle().await;
    b.put("read-during-outage".into(), 1);
    memory.restore(NodeId(2)); // told as a loss: flushed within max
    tokio::time::sleep(max + max / 2).await;
    settle().await;
    assert!(!b.contains_key("read-during-outage"), "flushed within max of the loss, not at the outage's next flush");
}

#[tokio::test(start_paused = true)]
async fn an_invalidator_of_its_own_changes_does_not_flush_during_an_outage() {
    let bus = PubSub::memory();
    let memory = bus.as_memory().unwrap().clone();
    let (b, streams, rb) = node_recording(2, &bus, 1).await;
    memory.cut(NodeId(2));
    // Started during the outage.
    let _ib = Invalidator::builder(&streams).scope(EventScope::Local).start().unwrap();
    settle().await;
    b.put("k".into(), 1); // its own change: removed at once
    settle().await;
    assert!(!b.contains_key("k"));
    // What it reads during the outage is no other node's business.
    b.get_or_insert_with("read-during-outage".into(), || 1); // a load: no change to act on
    tokio::time::sleep(HEARTBEAT * 5).await;
    settle().await;
    assert!(b.contains_key("read-during-outage"), "an outage hides nothing from a Local invalidator");
    assert!(rb.lock().unwrap().iter().all(|e| !matches!(e, InvalidatorEvent::Resync { .. })));
    memory.restore(NodeId(2));
}

#[tokio::test(start_paused = true)]
async fn a_flush_that_is_due_is_not_held_back_by_a_busy_partition() {
    let bus = PubSub::memory();
    let memory = bus.as_memory().unwrap().clone();
    let max = HEARTBEAT;
    let (b, _sb, _ib, rb) =
        node_with_invalidator(2, &bus, 1, EventScope::Remote, DisconnectPolicy::ServeStale { max }).await;
    memory.cut(NodeId(2));
    memory.restore(NodeId(2));
    settle().await; // the loss is read: a flush is due in `max`
    b.put("read-before-the-flush".into(), 1);
    // 500 events of another node wait in the worker's buffer when the flush
    // comes due (the bus delivers at once; the worker has not run since).
    let events: Vec<_> = (0..500)
        .map(|i| {
            Arc::new(nebulex::CacheEntryEvent {
                cache: "users".into(),
                kind: nebulex::EventType::Updated,
                target: nebulex::Target::Key(format!("k{i}")),
                command: nebulex::Command::Put,
                version: 2,
                metadata: nebulex::EventMetadata {
                    node: NodeId(9),
                    partition: None,
                    partitions: None,
                    topic: None,
                    seq: 0,
                    timestamp: std::time::SystemTime::now(),
                },
            })
        })
        .collect();
    let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let header = nebulex_streams::wire::FrameHeader {
        origin: NodeId(9),
        epoch: millis << 16,
        cache: "users".into(),
        partition: 0,
        partitions: 1,
        first_seq: 1,
        sent_at_us: 0,
        last: false,
    };
    memory.publish_raw("nbx:users:0", &nebulex_streams::wire::encode(&header, &events, None).unwrap());
    tokio::time::advance(max * 2).await; // the clock passes the flush, then the worker runs
    settle().await;
    let reports = rb.lock().unwrap().clone();
    let resync = reports.iter().position(|e| matches!(e, InvalidatorEvent::Resync { .. })).expect("a flush");
    let before = reports[..resync].iter().filter(|e| matches!(e, InvalidatorEvent::Invalidate { .. })).count();
    // (The one the worker was already waiting for may come first.)
    assert!(before <= 1, "the due flush waited for {before} of the 500 events");
    assert_eq!(invalidations(&rb), 500, "the flood was applied");
    assert!(!b.contains_key("read-before-the-flush"));
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidator_started_before_the_first_connection_flushes_what_is_read_meanwhile() {
    // No server listens here: the stream keeps trying, and never connects.
    let port = nebulex_testkit::free_port().unwrap();
    let b = node("users", 2);
    let heartbeat = Duration::from_millis(50);
    let streams = Streams::builder(&b)
        .pubsub(PubSub::redis(format!("redis://127.0.0.1:{port}/")))
        .heartbeat(heartbeat)
        .start()
        .unwrap();
    let _invalidator = Invalidator::builder(&streams).start().unwrap();
    b.put("read-before-connecting".into(), 1);
    eventually("flushed within a heartbeat or so", || !b.contains_key("read-before-connecting")).await;
    streams.stop();
}

#[tokio::test(start_paused = true)]
async fn serve_stale_keeps_entries_for_at_most_max_then_flushes() {
    let bus = PubSub::memory();
    let memory = bus.as_memory().unwrap().clone();
    let max = Duration::from_secs(30);
    let (b, _sb, _ib, rb) =
        node_with_invalidator(2, &bus, 1, EventScope::Remote, DisconnectPolicy::ServeStale { max }).await;
    b.put("a".into(), 1);
    memory.cut(NodeId(2));
    tokio::time::sleep(max - Duration::from_secs(1)).await;
    assert_eq!(b.get("a"), Some(1), "served during the window");
    assert!(rb.lock().unwrap().iter().all(|e| !matches!(e, InvalidatorEvent::Resync { .. })));
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(!b.contains_key("a"), "flushed once max passed");
    assert!(rb.lock().unwrap().iter().any(|e| matches!(e, InvalidatorEvent::Resync { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stale_for_ever_survives_an_outage_and_keeps_invalidating() {
    let bus = PubSub::memory();
    let memory = bus.as_memory().unwrap().clone();
    let forever = DisconnectPolicy::ServeStale { max: Duration::MAX };
    let (a, _sa, _ia, _) = node_with_invalidator(1, &bus, 1, EventScope::Remote, DisconnectPolicy::Flush).await;
    let (b, _sb, ib, rb) = node_with_invalidator(2, &bus, 1, EventScope::Remote, forever).await;
    b.put("k".into(), 1);
    memory.cut(NodeId(2));
    memory.restore(NodeId(2));
    until_flowing(&a, &mut b.subscribe(SubscribeOptions::new().scope(EventScope::Remote)).unwrap(), "probe").await;
    assert_eq!(b.get("k"), Some(1), "served stale: no flush within `max`");
    a.put("k".into(), 2);
    eventually("B's worker still applies A's writes", || !b.contains_key("k")).await;
    assert!(!ib.is_stopped());
    assert!(rb.lock().unwrap().iter().all(|e| !matches!(e, InvalidatorEvent::Resync { .. })));
}

/// A load of "user:1" on `cache`, on a thread of its own, that has read 1
/// from the system of record and waits to return it until told to.
fn blocked_load(cache: &Cache<String, u32>) -> (std::thread::JoinHandle<u32>, std::sync::mpsc::Sender<()>) {
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let loader_cache = cache.clone();
    let load = std::thread::spawn(move || {
        loader_cache.get_or_insert_with("user:1".to_string(), || {
            started_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            1 // read from the system of record before the other node's write
        })
    });
    started_rx.recv().unwrap();
    (load, go_tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_overtaken_by_a_remote_change_is_returned_but_not_stored() {
    let bus = PubSub::memory();
    let (a, _sa, _ia, _) = node_with_invalidator(1, &bus, 1, EventScope::Remote, DisconnectPolicy::Flush).await;
    let (b, _sb, _ib, rb) = node_with_invalidator(2, &bus, 1, EventScope::Remote, DisconnectPolicy::Flush).await;
    let (load, go_tx) = blocked_load(&b);
    a.put("user:1".into(), 2); // A changes the record meanwhile
    eventually("B's invalidator applied A's change", || invalidations(&rb) == 1).await;
    go_tx.send(()).unwrap();
    assert_eq!(load.join().unwrap(), 1, "the caller still gets what it loaded");
    assert!(!b.contains_key("user:1"), "but the possibly stale value is not stored");
}

/// An event that A's router sends nowhere (a partition out of range) might
/// have been any partition's: every partition of B has a gap, and B's
/// invalidator flushes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_a_router_sends_nowhere_is_a_loss_on_every_partition_of_the_other_nodes() {
    use nebulex_streams::Route;
    let bus = PubSub::memory();
    let a = node("users", 1);
    let _sa = Streams::builder(&a)
        .partitions(2)
        .pubsub(bus.clone())
        .hash(|e| match &e.target {
            nebulex::Target::Key(k) if k == "lost" => Route::Partition(99),
            nebulex::Target::Key(k) => Route::Partition(partition_of(k, 2)),
            _ => Route::Partition(0),
        })
        .start()
        .unwrap();
    let (b, sb, rb) = node_recording(2, &bus, 2).await;
    let _ib = Invalidator::builder(&sb).start().unwrap();
    let mut on_b: Vec<_> =
        (0..2).map(|p| b.subscribe(SubscribeOptions::new().scope(EventScope::Remote).partition(p)).unwrap()).collect();
    for sub in &mut on_b {
        until_flowing(&a, sub, "probe").await;
    }
    let keys: Vec<String> = (0..20).map(|i| format!("user:{i}")).collect();
    for k in &keys {
        b.put(k.clone(), 1);
    }
    a.put("lost".into(), 1);
    for sub in &mut on_b {
        // (After the probes still buffered.)
        let lagged = loop {
            if let Err(lagged) = next(sub).await {
                break lagged;
            }
        };
        assert_eq!(lagged, nebulex_streams::Lagged(1), "a number no frame carried");
    }
    eventually("B's invalidator flushed both partitions", || keys.iter().all(|k| !b.contains_key(k))).await;
    let resyncs = rb.lock().unwrap().iter().filter(|e| matches!(e, InvalidatorEvent::Resync { .. })).count();
    assert!(resyncs >= 2, "{:?}", rb.lock().unwrap());
}

/// What the cache holds when an invalidator starts was stored before it
/// could hear of other nodes' changes: it is removed (and reported), and a
/// load in flight does not store what it read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidator_removes_what_was_stored_before_it_started_and_what_loads_in_flight_read() {
    let bus = PubSub::memory();
    let a = node("users", 1);
    let _sa = start(&a, &bus, 2).await;
    let (b, sb, rb) = node_recording(2, &bus, 2).await;
    b.put("cached".into(), 1);
    let (load, go_tx) = blocked_load(&b);
    // A changes the record; B's stream hears it before B has an invalidator.
    let on_user_1 = SubscribeOptions::new().scope(EventScope::Remote).partition(partition_of(&"user:1".to_string(), 2));
    let mut heard = b.subscribe(on_user_1).unwrap();
    a.put("user:1".into(), 2);
    until(&mut heard, |e| e.target == nebulex::Target::Key("user:1".into())).await;

    let _ib = Invalidator::builder(&sb).start().unwrap();
    assert!(!b.contains_key("cached"), "removed as the invalidator starts");
    let flushed = |p: u32| InvalidatorEvent::Resync { partition: p, count: 1 };
    let reports = rb.lock().unwrap().clone();
    assert_eq!(reports, [InvalidatorEvent::Started, flushed(partition_of(&"cached".to_string(), 2))]);
    go_tx.send(()).unwrap();
    assert_eq!(load.join().unwrap(), 1, "the caller still gets what it loaded");
    assert!(!b.contains_key("user:1"), "but the possibly stale value is not stored");
}

/// A stream stopped and started again heard nothing meanwhile: the new
/// invalidator does not keep what the cache held from before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidator_of_a_restarted_stream_removes_what_went_stale_meanwhile() {
    let bus = PubSub::memory();
    let a = node("users", 1);
    let _sa = start(&a, &bus, 1).await;
    let b = node("users", 2);
    let first = start(&b, &bus, 1).await;
    let _first_invalidator = Invalidator::builder(&first).start().unwrap();
    b.put("k".into(), 1);
    first.stop();
    a.put("k".into(), 2); // unheard by B
    let again = start(&b, &bus, 1).await;
    let _invalidator = Invalidator::builder(&again).start().unwrap();
    assert_eq!(b.get("k"), None, "B's copy from before, removed");
}

#[tokio::test]
async fn stop_ends_the_workers_and_reports_it() {
    let bus = PubSub::memory();
    let (a, _sa, _ia, _) = node_with_invalidator(1, &bus, 1, EventScope::Remote, DisconnectPolicy::Flush).await;
    let (b, _sb, ib, rb) = node_with_invalidator(2, &bus, 1, EventScope::Remote, DisconnectPolicy::Flush).await;
    assert!(matches!(rb.lock().unwrap()[0], InvalidatorEvent::Started));
    ib.stop();
    ib.stop();
    assert!(ib.is_stopped());
    b.put("k".into(), 1);
    a.put("k".into(), 2);
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(b.get("k"), Some(1), "a stopped invalidator removes nothing");
    assert_eq!(rb.lock().unwrap().iter().filter(|e| matches!(e, InvalidatorEvent::Stopped)).count(), 1);
}

#[tokio::test]
async fn stopping_the_stream_stops_the_invalidator() {
    let bus = PubSub::memory();
    let (_b, sb, ib, rb) = node_with_invalidator(2, &bus, 2, EventScope::Remote, DisconnectPolicy::Flush).await;
    sb.stop();
    eventually("the invalidator saw its stream end", || ib.is_stopped()).await;
    let stopped = rb.lock().unwrap().iter().filter(|e| matches!(e, InvalidatorEvent::Stopped)).count();
    assert_eq!(stopped, 1, "Stopped is reported once");
    ib.stop(); // and stopping it again does nothing
    assert_eq!(rb.lock().unwrap().iter().filter(|e| matches!(e, InvalidatorEvent::Stopped)).count(), 1);
}

/// Two nodes, A and B, on one memory bus with heartbeats of 100 ms (long
/// enough that a busy machine does not make A fall silent by itself), and
/// B's invalidator made by `invalidator`, whose reports land in `reports`:
/// returned once B has heard a change of A's.
struct SilencePair {
    memory: MemoryBus,
    heartbeat: Duration,
    a: Cache<String, u32>,
    b: Cache<String, u32>,
    reports: Reports,
    _streams: (Streams<String>, Streams<String>),
    _invalidator: Invalidator,
}

impl SilencePair {
    async fn start(invalidator: impl FnOnce(InvalidatorBuilder<'_, String>) -> InvalidatorBuilder<'_, String>) -> Self {
        let bus = PubSub::memory();
        let memory = bus.as_memory().unwrap().clone();
        let heartbeat = Duration::from_millis(100);
        let started = |cache: &Cache<String, u32>, reports: &Reports| {
            Streams::builder(cache)
                .pubsub(bus.clone())
                .heartbeat(heartbeat)
                .observer(recording(reports))
                .start()
                .unwrap()
        };
        let (a, b) = (node("users", 1), node("users", 2));
        let reports: Reports = Arc::default();
        let sa = started(&a, &Reports::default());
        let sb = started(&b, &reports);
        sa.ready().await.unwrap();
        sb.ready().await.unwrap();
        let _invalidator = invalidator(Invalidator::builder(&sb).scope(EventScope::Remote)).start().unwrap();
        a.put("heard".into(), 1);
        eventually("B hears A", || invalidations(&reports) == 1).await;
        SilencePair { memory, heartbeat, a, b, reports, _streams: (sa, sb), _invalidator }
    }

    fn resyncs(&self) -> usize {
        self.reports.lock().unwrap().iter().filter(|e| matches!(e, InvalidatorEvent::Resync { .. })).count()
    }
}

/// A node fallen silent without stopping may be alive and writing its
/// record, cut off from the transport: while it stays silent, what this node
/// reads misses its changes, so it is flushed every heartbeat as during an
/// outage of this node's own; once the node is heard again, no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_another_node_is_silent_without_stopping_what_is_read_is_flushed_every_heartbeat() {
    let pair = SilencePair::start(|builder| builder).await;
    let (a, b, heartbeat) = (&pair.a, &pair.b, pair.heartbeat);

    // A is cut off from the transport, and goes on writing its record.
    pair.memory.cut(NodeId(1));
    eventually("A's silence flushed", || pair.resyncs() >= 1).await;
    b.put("read-while-a-is-silent".into(), 1);
    eventually("flushed again while A stays silent", || !b.contains_key("read-while-a-is-silent")).await;
    b.put("read-later".into(), 1);
    eventually("and again", || !b.contains_key("read-later")).await;

    // A is back: its next frame is a counted gap, flushed; then no more.
    pair.memory.restore(NodeId(1));
    b.put("probe".into(), 1);
    a.put("probe".into(), 2);
    eventually("A's changes flow again", || !b.contains_key("probe")).await;
    tokio::time::sleep(heartbeat * 2).await; // a flush planned while A was silent may still come
    b.put("read-after".into(), 1);
    tokio::time::sleep(heartbeat * 10).await;
    assert!(b.contains_key("read-after"), "no more flushes once A is heard again");
}

/// `silent_node_window` bounds how long a node fallen silent without
/// stopping keeps the partition flushing: it flushes while the window runs,
/// then what is read stays (for a node that crashed, the cache is whole
/// again), though the node is still silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_keeps_the_partition_flushing_only_for_the_silent_node_window() {
    // Silence is noticed 5 heartbeats after A was last heard: the window
    // leaves about 10 more of flushing. The default (100) would flush on
    // for 10 s, longer than this test waits.
    let window = Duration::from_millis(100) * 15;
    let pair = SilencePair::start(|builder| builder.silent_node_window(window)).await;
    let (b, heartbeat) = (&pair.b, pair.heartbeat);

    pair.memory.cut(NodeId(1));
    let cut = Instant::now();
    eventually("A's silence flushed", || pair.resyncs() >= 1).await;
    b.put("read-while-a-is-silent".into(), 1);
    eventually("flushed again within the window", || !b.contains_key("read-while-a-is-silent")).await;

    // Past the window, a read survives several heartbeats though A is still
    // silent.
    let mut probe = 0;
    loop {
        assert!(cut.elapsed() < heartbeat * 60, "B still flushes {:?} after A fell silent", cut.elapsed());
        let key = format!("probe-{probe}");
        b.put(key.clone(), 1);
        tokio::time::sleep(heartbeat * 4).await;
        if b.contains_key(&key) {
            break;
        }
        probe += 1;
    }
    let flushes = pair.resyncs();
    tokio::time::sleep(heartbeat * 5).await;
    assert_eq!(pair.resyncs(), flushes, "no more flushes past the window");
}

/// A silent node forgotten to make room for new origins (past
/// `MAX_ORIGINS_PER_PARTITION`) keeps the partition flushing for its window,
/// as if it were still followed: it may still be writing, cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_forgotten_to_make_room_keeps_the_partition_flushing() {
    let pair = SilencePair::start(|builder| builder).await;
    let b = &pair.b;
    pair.memory.cut(NodeId(1));
    eventually("A's silence flushed", || pair.resyncs() >= 1).await;

    // New origins, each of which stopped at once: A, silent longest, is
    // forgotten to make room for the last of them.
    for origin in 0..nebulex_streams::MAX_ORIGINS_PER_PARTITION as u64 {
        let header = nebulex_streams::wire::FrameHeader {
            origin: NodeId(1_000 + origin),
            epoch: 1,
            cache: "users".into(),
            partition: 0,
            partitions: 0,
            first_seq: 1,
            sent_at_us: 0,
            last: true,
        };
        let none: &[Arc<nebulex::CacheEntryEvent<String>>] = &[];
        pair.memory.publish_raw("nbx:users", &nebulex_streams::wire::encode(&header, none, None).unwrap());
    }
    // (A flush planned before may still come: then one more.)
    for read in ["read-after-the-new-origins", "read-later"] {
        b.put(read.into(), 1);
        eventually("still flushed while A is silent", || !b.contains_key(read)).await;
    }
}

/// This process's resident memory, in bytes.
#[cfg(target_os = "linux")]
fn resident_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).expect("a VmRSS line");
    line.trim().trim_end_matches("kB").trim().parse::<usize>().expect("VmRSS in kB") * 1_024
}

/// Mapped when made, B's 4,096 outbound buffers and its invalidator's 4,096
/// buffers would take 8 GiB at their default sizes, most of it for events
/// that may never come. Those beyond the stream's allowance are mapped as
/// events fill them, and carry events as well.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_partitions_map_a_bounded_share_of_their_buffers_when_they_start() {
    let bus = PubSub::memory();
    let partitions = nebulex_streams::MAX_PARTITIONS;
    let a = node("users", 1);
    let sa = Streams::builder(&a).partitions(partitions).outbound_buffer(16).pubsub(bus.clone()).start().unwrap();
    let before = resident_bytes();
    let b = node("users", 2);
    let sb = Streams::builder(&b).partitions(partitions).pubsub(bus.clone()).start().unwrap();
    let _ib = Invalidator::builder(&sb).start().unwrap();
    let grown = resident_bytes().saturating_sub(before);
    assert!(grown < nebulex_streams::PREMAPPED_BYTES + (256 << 20), "B took {} MiB at start", grown >> 20);

    for streams in [&sa, &sb] {
        tokio::time::timeout(PATIENCE, streams.ready()).await.expect("ready in time").expect("ready");
    }
    let keys: Vec<String> = (0..256).map(|i| format!("user:{i}")).collect();
    for key in &keys {
        b.put(key.clone(), 0);
        a.put(key.clone(), 1);
    }
    eventually("every copy on B removed by A's writes", || keys.iter().all(|k| !b.contains_key(k))).await;
}

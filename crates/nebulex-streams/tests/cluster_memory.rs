//! Two and three nodes in one process over the in-process bus: events cross,
//! own echoes are ignored, and injected faults surface as exact lag.

mod common;
mod support;

use std::time::Duration;

use nebulex::{Cache, EventType, NodeId, Target};
use nebulex_streams::{Lagged, MemoryBus, PubSub, Streams, StreamsExt, SubscribeOptions, Subscription, Telemetry};
use support::receive_all;

type Item = Result<std::sync::Arc<nebulex::CacheEntryEvent<String>>, Lagged>;

fn node(name: &str, node: u64) -> Cache<String, u32> {
    Cache::builder().name(name).node_id(NodeId(node)).build().expect("cache")
}

async fn next(sub: &mut Subscription<String>) -> Item {
    tokio::time::timeout(Duration::from_secs(5), sub.recv()).await.expect("an item within 5 s").expect("stream open")
}

async fn start(cache: &Cache<String, u32>, bus: &PubSub, partitions: u32) -> Streams<String> {
    let streams = Streams::builder(cache).partitions(partitions).pubsub(bus.clone()).start().expect("start");
    streams.ready().await.expect("ready");
    streams
}

#[tokio::test]
async fn events_of_one_node_reach_the_other_with_keys_intact() {
    let bus = PubSub::memory();
    let (a, b) = (node("users", 1), node("users", 2));
    let _sa = start(&a, &bus, 1).await;
    let _sb = start(&b, &bus, 1).await;
    let mut on_b = b.subscribe(SubscribeOptions::new()).unwrap();

    a.put("user:1".into(), 1);
    a.put("user:1".into(), 2);
    a.delete("user:1");
    for kind in [EventType::Inserted, EventType::Updated, EventType::Deleted] {
        let e = next(&mut on_b).await.unwrap();
        assert_eq!((e.kind, &e.target, e.metadata.node), (kind, &Target::Key("user:1".to_string()), NodeId(1)));
    }
    // B's own event arrives locally, once: its echo from the bus is ignored.
    b.put("user:2".into(), 1);
    let e = next(&mut on_b).await.unwrap();
    assert_eq!((e.metadata.node, &e.target), (NodeId(2), &Target::Key("user:2".to_string())));
    assert!(on_b.try_recv().is_err());
}

#[tokio::test]
async fn dropped_frames_are_reported_as_exact_lag() {
    let bus = PubSub::memory();
    let memory: MemoryBus = bus.as_memory().unwrap().clone();
    let (a, b) = (node("users", 1), node("users", 2));
    let _sa = start(&a, &bus, 1).await;
    let gaps = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = gaps.clone();
    let _sb = Streams::builder(&b)
        .partitions(1)
        .pubsub(bus.clone())
        .observer(move |t| {
            if let Telemetry::Gap { missed, origin, .. } = t {
                seen.lock().unwrap().push((*origin, *missed));
            }
        })
        .start()
        .unwrap();
    _sb.ready().await.unwrap();
    let mut on_b = b.subscribe(SubscribeOptions::new()).unwrap();

    a.put("k0".into(), 0);
    assert!(next(&mut on_b).await.is_ok());
    // One event per frame here: wait for each before the next write.
    // Lose A's next frame that carries events (not a heartbeat).
    memory.drop_frames_where(1, |_, bytes| {
        nebulex_streams::wire::decode::<String>(bytes, &Default::default())
            .is_ok_and(|f| f.header.origin == NodeId(1) && !f.events.is_empty())
    });
    a.put("k1".into(), 1);
    while memory.frames_dropped() < 1 {
        tokio::task::yield_now().await;
    }
    a.put("k2".into(), 2);
    assert_eq!(next(&mut on_b).await.unwrap_err(), Lagged(1));
    assert_eq!(next(&mut on_b).await.unwrap().target, Target::Key("k2".to_string()));
    // (Readers are told first, then the report is made.)
    support::eventually("the gap reported", || !gaps.lock().unwrap().is_empty()).await;
    assert_eq!(*gaps.lock().unwrap(), [(Some(NodeId(1)), 1)]);
}

#[tokio::test]
async fn a_cut_connection_is_an_unknown_gap_then_events_flow_again() {
    let bus = PubSub::memory();
    let memory = bus.as_memory().unwrap().clone();
    let (a, b) = (node("users", 1), node("users", 2));
    let _sa = start(&a, &bus, 2).await;
    let sb = start(&b, &bus, 2).await;
    let mut subs: Vec<_> = (0..2).map(|p| b.subscribe(SubscribeOptions::new().partition(p)).unwrap()).collect();

    assert_eq!(sb.info().connected, Some(true));
    memory.cut(NodeId(2));
    assert_eq!(sb.info().connected, Some(false), "a health check sees the connection down");
    for sub in &mut subs {
        assert_eq!(next(sub).await.unwrap_err(), Lagged(0));
    }
    a.put("lost".into(), 1);
    memory.restore(NodeId(2));
    assert_eq!(sb.info().connected, Some(true));
    // Back: the loss is told again (what was published meanwhile is gone)...
    for sub in &mut subs {
        assert_eq!(next(sub).await.unwrap_err(), Lagged(0));
    }
    // ...and events flow again.
    a.put("after".into(), 1);
    let p = nebulex_streams::partition_of("after", 2) as usize;
    let e = next(&mut subs[p]).await.unwrap();
    assert_eq!(e.target, Target::Key("after".to_string()));
}

#[tokio::test]
async fn cluster_options_apply_before_or_after_the_transport() {
    let bus = PubSub::memory();
    let (a, b, c) = (node("users", 1), node("users", 2), node("users", 3));
    let rejected = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = rejected.clone();
    // The key given before the transport counts as much as after it.
    let sa = Streams::builder(&a)
        .signing_key("k3y")
        .pubsub(bus.clone())
        .observer(move |t| {
            if let Telemetry::FrameRejected { reason, .. } = t {
                seen.lock().unwrap().push(reason.label());
            }
        })
        .start()
        .unwrap();
    let sb = Streams::builder(&b).pubsub(bus.clone()).signing_key("k3y").start().unwrap();
    let sc = Streams::builder(&c).pubsub(bus.clone()).start().unwrap();
    for s in [&sa, &sb, &sc] {
        s.ready().await.unwrap();
    }
    let mut on_a = a.subscribe(SubscribeOptions::new()).unwrap();
    c.put("unsigned".into(), 1);
    b.put("signed".into(), 1);
    let e = next(&mut on_a).await.unwrap();
    assert_eq!((e.metadata.node, &e.target), (NodeId(2), &Target::Key("signed".to_string())));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !rejected.lock().unwrap().contains(&"unsigned") {
        assert!(tokio::time::Instant::now() < deadline, "C's unsigned frame was not refused");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(on_a.try_recv().is_err(), "nothing of C's reached A");
}

#[tokio::test]
async fn bad_cluster_options_are_refused_and_leave_nothing_started() {
    use nebulex_streams::{Error, MAX_BACKOFF, MAX_BATCH_LINGER, MAX_BUFFER, MIN_HEARTBEAT};
    let bus = PubSub::memory();
    let cache = node("options", 1);
    let builder = || Streams::builder(&cache).pubsub(bus.clone());
    let ms = Duration::from_millis;
    let refused = [
        ("batch_size 0", builder().batch_size(0).start()),
        ("outbound_buffer 0", builder().outbound_buffer(0).start()),
        ("outbound_buffer too big", builder().outbound_buffer(MAX_BUFFER + 1).start()),
        ("max_frame_bytes 63", builder().max_frame_bytes(63).start()),
        // Receivers would refuse its heartbeats: deaf to its numbering.
        ("max_frame_bytes below a signed heartbeat", builder().signing_key("secret").max_frame_bytes(64).start()),
        ("empty prefix", builder().prefix("").start()),
        ("prefix with a space", builder().prefix("a b").start()),
        ("zero backoff", builder().backoff(Duration::ZERO, ms(10)).start()),
        ("max backoff below initial", builder().backoff(ms(10), ms(5)).start()),
        ("max backoff too long", builder().backoff(ms(10), MAX_BACKOFF + ms(1)).start()),
        ("zero heartbeat", builder().heartbeat(Duration::ZERO).start()),
        ("heartbeat too short", builder().heartbeat(MIN_HEARTBEAT - Duration::from_nanos(1)).start()),
        ("batch_linger too long", builder().batch_linger(MAX_BATCH_LINGER + Duration::from_nanos(1)).start()),
        ("empty signing key", builder().signing_key([]).start()),
    ];
    for (what, outcome) in refused {
        assert!(matches!(outcome, Err(Error::InvalidOption(_))), "{what}: {outcome:?}");
    }
    assert!(Streams::lookup(&cache).is_none());
    // Nothing was left registered: valid options at their lower limits start.
    let streams = builder()
        .outbound_buffer(1)
        .batch_size(1)
        .max_frame_bytes(64)
        .backoff(MAX_BACKOFF, MAX_BACKOFF)
        .heartbeat(MIN_HEARTBEAT)
        .batch_linger(MAX_BATCH_LINGER)
        .start()
        .expect("start");
    streams.ready().await.expect("ready");
}

// One thread: the sender task cannot run between the writes and the
// shutdown, so everything is still buffered when the stream stops.
#[tokio::test(flavor = "current_thread")]
async fn a_node_shut_down_right_after_its_writes_has_sent_them_all() {
    let bus = PubSub::memory();
    let (a, b) = (node("users", 1), node("users", 2));
    let sa = start(&a, &bus, 2).await;
    let _sb = start(&b, &bus, 2).await;
    let on_b: Vec<_> = (0..2).map(|p| b.subscribe(SubscribeOptions::new().partition(p)).unwrap()).collect();
    const N: usize = 5_000;
    for i in 0..N {
        a.put(format!("user:{i}"), 1);
    }
    sa.shutdown().await;
    assert!(sa.is_stopped());
    receive_all(on_b, N).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_stopped_by_another_thread_while_it_starts_still_shuts_down() {
    // The stopper stops the stream as soon as `lookup` shows it, racing the
    // start (its connection and sender task included). However the race
    // goes, the stream's shutdown must end: its sender saw the stop.
    let bus = PubSub::memory();
    let cache = node("users", 1);
    let _stopper = common::Stopper::spawn(&cache);
    for round in 0..300 {
        let streams = Streams::builder(&cache).pubsub(bus.clone()).start().expect("start");
        tokio::time::timeout(Duration::from_secs(10), streams.shutdown())
            .await
            .unwrap_or_else(|_| panic!("round {round}: shutdown never ended"));
    }
}

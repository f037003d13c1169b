//! Cluster behaviour under faults, over the in-process bus (`PubSub::memory()`):
//! writers never wait for the network, every loss is counted exactly,
//! `broadcast_from`, three nodes, and frames refused for a foreign signing
//! key or partition count. Every wait has a deadline; nothing sleeps and hopes.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nebulex::{Cache, CacheEntryEvent, EventType, NodeId, Target};
use nebulex_streams::wire::{self, DecodeLimits};
use nebulex_streams::{
    BroadcastError, Lagged, MemoryBus, PubSub, Route, Streams, StreamsBuilder, StreamsExt, SubscribeOptions,
    Subscription, Telemetry, FORGOTTEN_ORIGINS, MAX_ORIGINS_PER_PARTITION,
};
use tokio::time::{timeout, timeout_at, Instant};

/// The longest a test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(20);
/// Heartbeats often, so a lost last frame shows as a gap quickly.
const HEARTBEAT: Duration = Duration::from_millis(25);

type Event = Arc<CacheEntryEvent<String>>;

fn node(name: &str, id: u64) -> Cache<String, u32> {
    Cache::builder().name(name).node_id(NodeId(id)).build().expect("cache")
}

/// A stream on the bus, with a large subscriber buffer (subscribers here never
/// lag locally: every loss they see is the network's).
fn builder<'a>(cache: &'a Cache<String, u32>, bus: &PubSub) -> StreamsBuilder<'a, String, u32> {
    Streams::builder(cache).pubsub(bus.clone()).buffer(1 << 15).heartbeat(HEARTBEAT)
}

async fn ready(streams: Streams<String>) -> Streams<String> {
    timeout(PATIENCE, streams.ready()).await.expect("ready in time").expect("ready");
    streams
}

/// Every telemetry report of a stream, by kind.
type Gaps = Arc<Mutex<Vec<(Option<NodeId>, u64)>>>;

#[derive(Clone, Default)]
struct Reports {
    rejected: Arc<Mutex<Vec<&'static str>>>,
    gaps: Gaps,
    outbound_full: Arc<AtomicU64>,
}

impl Reports {
    fn observer(&self) -> impl Fn(&Telemetry<String>) + Send + Sync + 'static {
        let me = self.clone();
        move |t: &Telemetry<String>| match t {
            Telemetry::FrameRejected { reason, .. } => me.rejected.lock().unwrap().push(reason.label()),
            Telemetry::Gap { origin, missed, .. } => me.gaps.lock().unwrap().push((*origin, *missed)),
            Telemetry::Broadcast { reason: Some(BroadcastError::Transport(_)), .. } => {
                me.outbound_full.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }

    fn rejected(&self) -> Vec<&'static str> {
        self.rejected.lock().unwrap().clone()
    }
}

/// What a subscriber received: events, and the counts of its `Lagged` notices.
#[derive(Debug, Default)]
struct Tally {
    events: Vec<Event>,
    lagged: Vec<u64>,
}

impl Tally {
    fn lost(&self) -> u64 {
        self.lagged.iter().sum()
    }

    /// Events received plus events reported missed.
    fn accounted(&self) -> u64 {
        self.events.len() as u64 + self.lost()
    }

    fn keys(&self) -> Vec<String> {
        self.events.iter().map(key_of).collect()
    }
}

fn key_of(e: &Event) -> String {
    match &e.target {
        Target::Key(k) => k.clone(),
        other => panic!("expected a one-key event, got {other:?}"),
    }
}

/// Receives into `tally` until `done` holds; panics at the deadline.
async fn read_until(sub: &mut Subscription<String>, tally: &mut Tally, mut done: impl FnMut(&Tally) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done(tally) {
        match timeout_at(deadline, sub.recv()).await {
            Err(_) => panic!(
                "timed out: {} events received ({:?}…), lagged {:?}",
                tally.events.len(),
                tally.keys().into_iter().take(5).collect::<Vec<_>>(),
                tally.lagged
            ),
            Ok(None) => panic!("the stream ended"),
            Ok(Some(Ok(event))) => tally.events.push(event),
            Ok(Some(Err(Lagged(n)))) => tally.lagged.push(n),
        }
    }
}

/// The next event of `sub`, within the deadline; panics on a `Lagged`.
async fn next_event(sub: &mut Subscription<String>) -> Event {
    let mut tally = Tally::default();
    read_until(sub, &mut tally, |t| !t.events.is_empty() || !t.lagged.is_empty()).await;
    assert!(tally.lagged.is_empty(), "expected an event, got Lagged({:?})", tally.lagged);
    tally.events.remove(0)
}

/// Waits until `cond` holds, checking after each yield; panics at the deadline.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Selects, for `drop_frames_where`, `origin`'s frames that carry events (not
/// its heartbeats), adding the events of each frame it selects to `lost`.
fn event_frames_of(origin: NodeId, lost: Arc<AtomicU64>) -> impl Fn(&str, &[u8]) -> bool + Send + Sync + 'static {
    move |_, bytes| match wire::decode::<String>(bytes, &DecodeLimits::default()) {
        Ok(f) if f.header.origin == origin && !f.events.is_empty() => {
            lost.fetch_add(f.events.len() as u64, Ordering::SeqCst);
            true
        }
        _ => false,
    }
}

// (a) Publishing never blocks a writer.

/// With the writer's connection cut, 10,000 writes complete at once (on
/// their own thread, under a deadline); once it is back, the receiver is
/// told exactly how many it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_complete_with_the_writers_transport_cut_and_the_loss_is_counted() {
    let bus = PubSub::memory();
    let memory: MemoryBus = bus.as_memory().expect("memory bus").clone();
    let (a, b) = (node("users", 1), node("users", 2));
    let _sa = ready(builder(&a, &bus).outbound_buffer(8).start().expect("start a")).await;
    let _sb = ready(builder(&b, &bus).start().expect("start b")).await;
    let mut on_b = b.subscribe(SubscribeOptions::new()).expect("subscribe");

    // B knows A's numbering once it has one of A's events.
    a.put("warm-up".into(), 0);
    assert_eq!(key_of(&next_event(&mut on_b).await), "warm-up");

    memory.cut(NodeId(1));
    const WRITES: u32 = 10_000;
    let writer = a.clone();
    let burst = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        for i in 0..WRITES {
            writer.put(format!("k{i}"), i);
        }
        started.elapsed()
    });
    let took = timeout(PATIENCE, burst).await.expect("10,000 writes never wait for the transport").expect("writer");
    eprintln!("10,000 writes with the transport cut took {took:?}");
    assert_eq!(a.len(), WRITES as usize + 1);

    memory.restore(NodeId(1));
    // What the sender had not yet tried when the link came back may get
    // through; everything else is lost, and all of it is counted exactly (a
    // lost last frame shows when a heartbeat tells the next number).
    let mut tally = Tally::default();
    read_until(&mut on_b, &mut tally, |t| t.accounted() >= u64::from(WRITES)).await;
    assert_eq!(tally.accounted(), u64::from(WRITES), "lagged {:?}", tally.lagged);
    assert!(tally.lost() > 0, "the cut lost nothing?");
    // (A burst slower than A's silence limit also has B tell A's silence,
    // as `Lagged(0)`; the loss itself is still told with its size.)
    assert!(tally.lagged.iter().any(|&n| n > 0), "a known loss is reported with its size: {:?}", tally.lagged);
    eprintln!("of {WRITES}: {} got through, {} lost in the cut", tally.events.len(), tally.lost());
    // The stream goes on.
    a.put("after".into(), 1);
    assert_eq!(key_of(&next_event(&mut on_b).await), "after");
}

/// On a single-threaded runtime the sender cannot run during a burst: an
/// outbound buffer of 8 keeps 8 events and drops the other 9,992, and the
/// bus loses the one frame that carries the 8. The receiver's `Lagged`
/// counts add up, with what it received, to exactly what was published.
#[tokio::test(flavor = "current_thread")]
async fn a_full_outbound_buffer_and_lost_frames_are_counted_exactly() {
    let bus = PubSub::memory();
    let memory: MemoryBus = bus.as_memory().expect("memory bus").clone();
    let (a, b) = (node("users", 1), node("users", 2));
    let sent = Reports::default();
    let _sa = ready(builder(&a, &bus).outbound_buffer(8).observer(sent.observer()).start().expect("start a")).await;
    let got = Reports::default();
    let _sb = ready(builder(&b, &bus).observer(got.observer()).start().expect("start b")).await;
    let mut on_b = b.subscribe(SubscribeOptions::new()).expect("subscribe");

    a.put("warm-up".into(), 0);
    assert_eq!(key_of(&next_event(&mut on_b).await), "warm-up");

    let lost_in_frames = Arc::new(AtomicU64::new(0));
    memory.drop_frames_where(1, event_frames_of(NodeId(1), lost_in_frames.clone()));
    const WRITES: u64 = 10_000;
    let started = std::time::Instant::now();
    for i in 0..WRITES {
        a.put(format!("k{i}"), i as u32);
    }
    eprintln!("10,000 writes into a full outbound buffer took {:?}", started.elapsed());
    // The writer did not wait: the sender never ran, so all but 8 were dropped.
    assert_eq!(sent.outbound_full.load(Ordering::SeqCst), WRITES - 8);

    // Let the sender take the 8 (their frame is lost) before writing again.
    wait_for("the frame of the 8 to be lost", || memory.frames_dropped() == 1).await;
    a.put("after".into(), 1);
    let mut tally = Tally::default();
    read_until(&mut on_b, &mut tally, |t| t.keys().contains(&"after".to_string())).await;
    assert_eq!(lost_in_frames.load(Ordering::SeqCst), 8, "the one frame the bus lost held the 8 buffered events");
    assert_eq!(memory.frames_dropped(), 1);
    assert_eq!(tally.keys(), ["after"]);
    assert_eq!(tally.lost(), WRITES, "lagged {:?}", tally.lagged);
    assert_eq!(tally.accounted(), WRITES + 1);
    assert_eq!(tally.lost(), sent.outbound_full.load(Ordering::SeqCst) + lost_in_frames.load(Ordering::SeqCst));
    // (Readers are told first, then the report is made.)
    let reported = || got.gaps.lock().unwrap().iter().map(|(_, n)| n).sum::<u64>();
    wait_for("every gap reported", || reported() >= WRITES).await;
    let gaps = got.gaps.lock().unwrap().clone();
    assert_eq!(gaps.iter().map(|(_, n)| n).sum::<u64>(), WRITES, "gaps {gaps:?}");
    assert!(gaps.iter().all(|(origin, _)| *origin == Some(NodeId(1))), "gaps {gaps:?}");
}

/// A writer thread and the sender racing: whatever the buffer and the bus
/// lose, per partition the receiver's events plus its `Lagged` counts equal
/// the events published, and the events it did get are in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_burst_with_lost_frames_is_accounted_exactly() {
    const PARTITIONS: u32 = 2;
    const WRITES: u32 = 10_000;
    let bus = PubSub::memory();
    let memory: MemoryBus = bus.as_memory().expect("memory bus").clone();
    let (a, b) = (node("users", 1), node("users", 2));
    let sent = Reports::default();
    let _sa = ready(
        builder(&a, &bus)
            .partitions(PARTITIONS)
            .outbound_buffer(8)
            .batch_size(4)
            .observer(sent.observer())
            .start()
            .expect("start a"),
    )
    .await;
    let _sb = ready(builder(&b, &bus).partitions(PARTITIONS).start().expect("start b")).await;
    let mut subs: Vec<_> =
        (0..PARTITIONS).map(|p| b.subscribe(SubscribeOptions::new().partition(p)).expect("subscribe")).collect();

    // Warm up every partition, so B knows A's numbering on each.
    let warm_up: Vec<String> = (0..PARTITIONS)
        .map(|p| (0..).map(|i| format!("warm-up-{i}")).find(|k| nebulex_streams::partition_of(k, PARTITIONS) == p))
        .map(|k| k.expect("a key of each partition"))
        .collect();
    for (p, k) in warm_up.iter().enumerate() {
        a.put(k.clone(), 0);
        assert_eq!(&key_of(&next_event(&mut subs[p]).await), k);
    }

    let lost_in_frames = Arc::new(AtomicU64::new(0));
    memory.drop_frames_where(5, event_frames_of(NodeId(1), lost_in_frames.clone()));
    let writer = a.clone();
    let burst = tokio::task::spawn_blocking(move || {
        for i in 0..WRITES {
            writer.put(format!("k{i}"), i);
        }
    });
    timeout(PATIENCE, burst).await.expect("the burst never waits").expect("writer");

    let mut published = vec![0u64; PARTITIONS as usize];
    for i in 0..WRITES {
        published[nebulex_streams::partition_of(&format!("k{i}"), PARTITIONS) as usize] += 1;
    }
    let mut lost = 0;
    for (p, sub) in subs.iter_mut().enumerate() {
        let mut tally = Tally::default();
        // The last frames may be lost too: a heartbeat then tells the jump.
        read_until(sub, &mut tally, |t| t.accounted() >= published[p]).await;
        assert_eq!(tally.accounted(), published[p], "partition {p}: lagged {:?}", tally.lagged);
        assert!(!tally.lagged.contains(&0), "partition {p}: {:?}", tally.lagged);
        // Received events keep their order: increasing indexes, all of A.
        let indexes: Vec<u32> = tally.keys().iter().map(|k| k[1..].parse().expect("k{i}")).collect();
        assert!(indexes.windows(2).all(|w| w[0] < w[1]), "partition {p} out of order");
        assert!(tally.events.iter().all(|e| e.metadata.node == NodeId(1)));
        lost += tally.lost();
    }
    // A starved sender may publish fewer than 5 event frames to lose.
    let dropped = memory.frames_dropped();
    assert!((1..=5).contains(&dropped), "{dropped} frames dropped");
    assert_eq!(lost, sent.outbound_full.load(Ordering::SeqCst) + lost_in_frames.load(Ordering::SeqCst));
    eprintln!(
        "of {WRITES}: {} dropped by the outbound buffer, {} in {dropped} lost frames",
        sent.outbound_full.load(Ordering::SeqCst),
        lost_in_frames.load(Ordering::SeqCst)
    );
}

// (b) broadcast_from(true)

/// Node A with `broadcast_from(true)` gets B's events but not its own; its
/// own events still reach B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_from_gets_the_other_nodes_events_but_not_its_own() {
    let bus = PubSub::memory();
    let (a, b) = (node("users", 1), node("users", 2));
    let _sa = ready(builder(&a, &bus).broadcast_from(true).start().expect("start a")).await;
    let _sb = ready(builder(&b, &bus).start().expect("start b")).await;
    let mut on_a = a.subscribe(SubscribeOptions::new()).expect("subscribe a");
    let mut on_b = b.subscribe(SubscribeOptions::new()).expect("subscribe b");

    a.put("from-a".into(), 1);
    // Local delivery happens on the writing thread: nothing for A.
    assert!(matches!(on_a.try_recv(), Err(nebulex_streams::TryRecvError::Empty)));
    // A's event did go out: B has it, from node 1.
    let e = next_event(&mut on_b).await;
    assert_eq!((key_of(&e), e.metadata.node), ("from-a".to_string(), NodeId(1)));

    b.put("from-b".into(), 2);
    let e = next_event(&mut on_a).await;
    assert_eq!((key_of(&e), e.metadata.node), ("from-b".to_string(), NodeId(2)));
    // B sees its own event locally too (it has no broadcast_from).
    assert_eq!(key_of(&next_event(&mut on_b).await), "from-b");

    // More of A's own writes, then a marker from B: the marker is the next
    // thing A's subscriber sees (no echo of its own events came before it).
    a.put("from-a-2".into(), 3);
    a.delete("from-a");
    assert_eq!(key_of(&next_event(&mut on_b).await), "from-a-2");
    assert_eq!(key_of(&next_event(&mut on_b).await), "from-a");
    b.put("marker".into(), 4);
    let e = next_event(&mut on_a).await;
    assert_eq!((key_of(&e), e.metadata.node), ("marker".to_string(), NodeId(2)));
    assert!(matches!(on_a.try_recv(), Err(nebulex_streams::TryRecvError::Empty)));
}

// (c) Three nodes

/// Three nodes on one bus, three partitions: each node's subscribers see
/// every node's events (their own locally, the others' through the bus), in
/// each origin's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_see_each_others_events() {
    const PARTITIONS: u32 = 3;
    const PER_NODE: u32 = 60;
    let bus = PubSub::memory();
    let nodes: Vec<_> = (1..=3).map(|id| node("users", id)).collect();
    let mut streams = Vec::new();
    for n in &nodes {
        streams.push(ready(builder(n, &bus).partitions(PARTITIONS).start().expect("start")).await);
    }
    let mut subs: Vec<Vec<_>> = nodes
        .iter()
        .map(|n| (0..PARTITIONS).map(|p| n.subscribe(SubscribeOptions::new().partition(p)).expect("sub")).collect())
        .collect();

    for i in 0..PER_NODE {
        for (id, n) in nodes.iter().enumerate() {
            n.put(format!("n{}-k{i}", id + 1), i);
        }
    }
    for (at, node_subs) in subs.iter_mut().enumerate() {
        let mut all = Vec::new();
        for (p, sub) in node_subs.iter_mut().enumerate() {
            let expected: u64 = (0..PER_NODE)
                .flat_map(|i| (1..=3).map(move |id| format!("n{id}-k{i}")))
                .filter(|k| nebulex_streams::partition_of(k, PARTITIONS) as usize == p)
                .count() as u64;
            let mut tally = Tally::default();
            read_until(sub, &mut tally, |t| t.accounted() >= expected).await;
            assert!(tally.lagged.is_empty(), "node {} partition {p}: lagged {:?}", at + 1, tally.lagged);
            assert_eq!(tally.events.len() as u64, expected);
            for e in &tally.events {
                let origin = key_of(e)[1..2].parse::<u64>().expect("n{id}");
                assert_eq!(e.metadata.node, NodeId(origin), "metadata names the writer");
                assert_eq!(e.metadata.partition, Some(p as u32));
            }
            all.extend(tally.events);
        }
        for origin in 1..=3u64 {
            let from: Vec<String> = all.iter().filter(|e| e.metadata.node == NodeId(origin)).map(key_of).collect();
            assert_eq!(from.len(), PER_NODE as usize, "node {} got {} events of node {origin}", at + 1, from.len());
        }
        // Nothing more is waiting anywhere (no duplicates, no echoes).
        for sub in node_subs.iter_mut() {
            assert!(matches!(sub.try_recv(), Err(nebulex_streams::TryRecvError::Empty)));
        }
    }
}

// (d) Signing keys

/// B signs with another key than A: each refuses the other's frames as
/// `bad_signature` and delivers none of their events; a node with A's key
/// gets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_key_mismatch_rejects_frames_and_delivers_nothing() {
    let bus = PubSub::memory();
    let (a, b, c) = (node("users", 1), node("users", 2), node("users", 3));
    let on_a_reports = Reports::default();
    let on_b_reports = Reports::default();
    let _sa = ready(builder(&a, &bus).signing_key("alpha").observer(on_a_reports.observer()).start().expect("a")).await;
    let _sb = ready(builder(&b, &bus).signing_key("beta").observer(on_b_reports.observer()).start().expect("b")).await;
    let _sc = ready(builder(&c, &bus).signing_key("alpha").start().expect("c")).await;
    let mut on_a = a.subscribe(SubscribeOptions::new()).expect("subscribe a");
    let mut on_b = b.subscribe(SubscribeOptions::new()).expect("subscribe b");
    let mut on_c = c.subscribe(SubscribeOptions::new()).expect("subscribe c");

    // Two frames of A, one after the other: C gets both, so the first one's
    // delivery to B is over by the time C has the second.
    a.put("one".into(), 1);
    assert_eq!(key_of(&next_event(&mut on_c).await), "one");
    a.put("two".into(), 2);
    assert_eq!(key_of(&next_event(&mut on_c).await), "two");
    b.put("from-b".into(), 3);
    // B's event reaches B locally, nobody else.
    assert_eq!(key_of(&next_event(&mut on_b).await), "from-b");
    c.put("from-c".into(), 4);
    assert_eq!(key_of(&next_event(&mut on_c).await), "from-c");
    // A sees its own two locally, then C's.
    for k in ["one", "two", "from-c"] {
        assert_eq!(key_of(&next_event(&mut on_a).await), k);
    }

    wait_for("B to refuse A's frames", || on_b_reports.rejected().len() >= 2).await;
    wait_for("A to refuse B's frame", || !on_a_reports.rejected().is_empty()).await;
    assert!(on_b_reports.rejected().iter().all(|l| *l == "bad_signature"), "{:?}", on_b_reports.rejected());
    assert!(on_a_reports.rejected().iter().all(|l| *l == "bad_signature"), "{:?}", on_a_reports.rejected());
    // None of A's or C's events reached B; none of B's reached A.
    assert!(matches!(on_b.try_recv(), Err(nebulex_streams::TryRecvError::Empty)));
    assert!(matches!(on_a.try_recv(), Err(nebulex_streams::TryRecvError::Empty)));
    assert!(on_b_reports.gaps.lock().unwrap().is_empty());
}

/// A node with a key refuses unsigned frames as `unsigned`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_key_rejects_unsigned_frames() {
    let bus = PubSub::memory();
    let (a, b) = (node("users", 1), node("users", 2));
    let reports = Reports::default();
    let _sa = ready(builder(&a, &bus).start().expect("a")).await;
    let _sb = ready(builder(&b, &bus).signing_key("beta").observer(reports.observer()).start().expect("b")).await;
    let mut on_b = b.subscribe(SubscribeOptions::new()).expect("subscribe b");

    a.put("one".into(), 1);
    wait_for("B to refuse A's frames", || reports.rejected().contains(&"unsigned")).await;
    assert!(reports.rejected().iter().all(|l| *l == "unsigned"), "{:?}", reports.rejected());
    b.put("own".into(), 2);
    assert_eq!(key_of(&next_event(&mut on_b).await), "own");
    assert!(matches!(on_b.try_recv(), Err(nebulex_streams::TryRecvError::Empty)));
}

// (e) Partition counts

/// A has 4 partitions and B 2: they share the channels of partitions 0 and
/// 1, and B refuses A's frames there as `partition_count`; C, with 4, gets
/// A's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_partition_count_rejects_frames() {
    let bus = PubSub::memory();
    let (a, b, c) = (node("users", 1), node("users", 2), node("users", 3));
    let reports = Reports::default();
    let _sa = ready(builder(&a, &bus).partitions(4).start().expect("a")).await;
    let _sb = ready(builder(&b, &bus).partitions(2).observer(reports.observer()).start().expect("b")).await;
    let _sc = ready(builder(&c, &bus).partitions(4).start().expect("c")).await;
    let mut on_b: Vec<_> = (0..2).map(|p| b.subscribe(SubscribeOptions::new().partition(p)).expect("sub b")).collect();

    // A key of A's partition 0: its frame goes on `nbx:users:0`, B's channel too.
    let key = (0..).map(|i| format!("k{i}")).find(|k| nebulex_streams::partition_of(k, 4) == 0).expect("a key");
    let mut on_c = c.subscribe(SubscribeOptions::new().partition(0)).expect("sub c");
    a.put(key.clone(), 1);
    assert_eq!(key_of(&next_event(&mut on_c).await), key);
    a.put(key.clone(), 2);
    assert_eq!(key_of(&next_event(&mut on_c).await), key);

    wait_for("B to refuse A's frames", || reports.rejected().contains(&"partition_count")).await;
    assert!(reports.rejected().iter().all(|l| *l == "partition_count"), "{:?}", reports.rejected());
    for sub in &mut on_b {
        assert!(matches!(sub.try_recv(), Err(nebulex_streams::TryRecvError::Empty)));
    }
}

// (f) What a receiver checks, frame by frame.

/// Node B of cache "users" alone on a memory bus, with a subscriber: frames
/// crafted here and published raw on its channel are what it hears.
struct Lone {
    memory: MemoryBus,
    /// B's telemetry.
    reports: Reports,
    on_b: Subscription<String>,
    /// B and its stream, held for the test's length.
    _held: (Cache<String, u32>, Streams<String>),
}

impl Lone {
    async fn start() -> Lone {
        Lone::start_with(HEARTBEAT).await
    }

    /// B heartbeats every `heartbeat` (and checks for silences as often).
    async fn start_with(heartbeat: Duration) -> Lone {
        let bus = PubSub::memory();
        let memory = bus.as_memory().expect("memory bus").clone();
        let cache = node("users", 2);
        let reports = Reports::default();
        let streams = builder(&cache, &bus).heartbeat(heartbeat).observer(reports.observer());
        let streams = ready(streams.start().expect("start b")).await;
        let on_b = cache.subscribe(SubscribeOptions::new()).expect("subscribe");
        Lone { memory, reports, on_b, _held: (cache, streams) }
    }
}

/// A frame of `origin` with one `Inserted` event per key.
fn craft(
    origin: u64,
    epoch: u64,
    cache: &str,
    partition: u32,
    partitions: u32,
    first_seq: u64,
    keys: &[&str],
) -> Vec<u8> {
    let header = wire::FrameHeader {
        origin: NodeId(origin),
        epoch,
        cache: cache.into(),
        partition,
        partitions,
        first_seq,
        sent_at_us: 0,
        last: false,
    };
    encode_frame(&header, keys)
}

/// [`craft`] for cache "users", unpartitioned, with a send time: `sent_ms`
/// milliseconds after its epoch's start, by the origin's clock.
fn craft_sent(origin: u64, epoch: u64, sent_ms: u64, first_seq: u64, keys: &[&str]) -> Vec<u8> {
    let header = wire::FrameHeader {
        origin: NodeId(origin),
        epoch,
        cache: "users".into(),
        partition: 0,
        partitions: 0,
        first_seq,
        sent_at_us: ((epoch >> 16) + sent_ms) * 1_000,
        last: false,
    };
    encode_frame(&header, keys)
}

/// A frame with `header` and one `Inserted` event per key.
fn encode_frame(header: &wire::FrameHeader, keys: &[&str]) -> Vec<u8> {
    let (origin, cache) = (header.origin, header.cache.as_str());
    let events: Vec<Event> = keys
        .iter()
        .map(|k| {
            Arc::new(CacheEntryEvent {
                cache: cache.into(),
                kind: nebulex::EventType::Inserted,
                target: Target::Key(k.to_string()),
                command: nebulex::Command::Put,
                version: 1,
                metadata: nebulex::EventMetadata {
                    node: origin,
                    partition: None,
                    partitions: None,
                    topic: None,
                    seq: 0,
                    timestamp: std::time::UNIX_EPOCH,
                },
            })
        })
        .collect();
    wire::encode(header, &events, None).expect("encode")
}

/// The heartbeat a stopping stream sends last on a partition of cache
/// "users": its numbering there ended cleanly at `next - 1`.
fn last_heartbeat(origin: u64, epoch: u64, partition: u32, partitions: u32, next: u64) -> Vec<u8> {
    let header = wire::FrameHeader {
        origin: NodeId(origin),
        epoch,
        cache: "users".into(),
        partition,
        partitions,
        first_seq: next,
        sent_at_us: 0,
        last: true,
    };
    let none: &[Event] = &[];
    wire::encode(&header, none, None).expect("encode")
}

/// Frames injected on B's channels, as any client of the engine could: each
/// bad one is refused with its reason; sequence numbers make gaps (exact
/// `Lagged`), refuse a replay, and restart with a new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_refuses_bad_frames_with_their_reason_and_follows_sequence_numbers() {
    let bus = PubSub::memory();
    let memory: MemoryBus = bus.as_memory().expect("memory bus").clone();
    let b = node("users", 2);
    let reports = Reports::default();
    let _sb = ready(
        builder(&b, &bus).partitions(2).max_frame_bytes(256).observer(reports.observer()).start().expect("start b"),
    )
    .await;
    let mut on_b = b.subscribe(SubscribeOptions::new().partition(0)).expect("subscribe");
    let ch0 = "nbx:users:0";
    let refused = |bytes: &[u8], label: &str| {
        let before = reports.rejected().len();
        memory.publish_raw(ch0, bytes);
        // The memory bus delivers synchronously: the verdict is in.
        assert_eq!(reports.rejected()[before..], [label], "frame {:02x?}", &bytes[..bytes.len().min(8)]);
    };
    refused(&[], "truncated");
    refused(&[1], "truncated");
    refused(&[2, 0, 0x90], "version");
    refused(&[1, 0, 0xc1], "malformed");
    refused(&[1, 1, 0x90], "truncated"); // flagged signed, too short for a tag
    refused(&craft(9, 1, "users", 0, 2, 1, &[]).into_iter().chain([0]).collect::<Vec<_>>(), "malformed");
    refused(&craft(9, 1, "users", 2, 2, 1, &[]), "malformed"); // partition 2 of 2
    refused(&craft(9, 1, "sessions", 0, 2, 1, &["x"]), "foreign_cache");
    refused(&craft(9, 1, "users", 0, 4, 1, &["x"]), "partition_count");
    refused(&craft(9, 1, "users", 0, 0, 1, &["x"]), "partition_count");
    refused(&craft(9, 1, "users", 1, 2, 1, &["x"]), "wrong_partition");
    let long_key = "k".repeat(300);
    refused(&craft(9, 1, "users", 0, 2, 1, &[&long_key]), "too_large");
    assert!(matches!(on_b.try_recv(), Err(nebulex_streams::TryRecvError::Empty)));
    assert!(reports.gaps.lock().unwrap().is_empty());

    // Node 9, epoch 1: a first frame sets the numbering (5, 6; next 7).
    memory.publish_raw(ch0, &craft(9, 1, "users", 0, 2, 5, &["a", "b"]));
    // A jump of 3 (7, 8, 9 missed), then 10.
    memory.publish_raw(ch0, &craft(9, 1, "users", 0, 2, 10, &["c"]));
    // A replay (numbers already seen) is refused whole; so is an overlap.
    refused(&craft(9, 1, "users", 0, 2, 5, &["a", "b"]), "replay");
    refused(&craft(9, 1, "users", 0, 2, 10, &["c", "d"]), "replay");
    // A heartbeat (no events) carrying the next number: nothing missed.
    memory.publish_raw(ch0, &craft(9, 1, "users", 0, 2, 11, &[]));
    // The last heartbeat of a stopping stream, then a new epoch: numbering
    // restarts at 1, no gap.
    memory.publish_raw(ch0, &last_heartbeat(9, 1, 0, 2, 11));
    memory.publish_raw(ch0, &craft(9, 2, "users", 0, 2, 1, &["e"]));
    // A new epoch without the last one's end: the node restarted without
    // stopping, and may have lost what it had not sent (an unknown count).
    memory.publish_raw(ch0, &craft(9, 3, "users", 0, 2, 1, &["f"]));
    // A restart whose first frame is not number 1: a gap of what came before.
    memory.publish_raw(ch0, &last_heartbeat(9, 3, 0, 2, 2));
    memory.publish_raw(ch0, &craft(9, 4, "users", 0, 2, 3, &["g"]));
    let mut tally = Tally::default();
    read_until(&mut on_b, &mut tally, |t| t.events.len() == 6).await;
    assert_eq!(tally.keys(), ["a", "b", "c", "e", "f", "g"]);
    assert_eq!(tally.lagged, [3, 0, 2]);
    let seqs: Vec<u64> = tally.events.iter().map(|e| e.metadata.seq).collect();
    assert_eq!(seqs, [5, 6, 10, 1, 1, 3]);
    assert!(tally.events.iter().all(|e| e.metadata.node == NodeId(9) && e.metadata.partition == Some(0)));
    assert_eq!(*reports.gaps.lock().unwrap(), [(Some(NodeId(9)), 3), (Some(NodeId(9)), 0), (Some(NodeId(9)), 2)]);
    assert!(matches!(on_b.try_recv(), Err(nebulex_streams::TryRecvError::Empty)));
}

/// A frame of an origin's *earlier* epoch, once a later one was seen, is
/// refused: epochs grow with each start of a node's stream, so it can only be
/// a replay (or a very late duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_of_an_earlier_epoch_is_refused() {
    let Lone { memory, reports, mut on_b, _held } = Lone::start().await;
    let old = craft(9, 1, "users", 0, 0, 1, &["old"]);
    memory.publish_raw("nbx:users", &old);
    // Node 9 restarts: epoch 2.
    memory.publish_raw("nbx:users", &craft(9, 2, "users", 0, 0, 1, &["new"]));
    // Someone replays the first frame.
    memory.publish_raw("nbx:users", &old);
    memory.publish_raw("nbx:users", &craft(9, 2, "users", 0, 0, 2, &["marker"]));
    let mut tally = Tally::default();
    read_until(&mut on_b, &mut tally, |t| t.keys().contains(&"marker".to_string())).await;
    assert_eq!(tally.keys(), ["old", "new", "marker"], "the replayed frame was not delivered again");
    assert!(reports.rejected.lock().unwrap().contains(&"old_epoch"), "{:?}", reports.rejected.lock().unwrap());
}

/// A node restarted with its clock set back starts a lower epoch. While its
/// earlier stream runs, such a frame is a replay; once that stream stopped
/// cleanly or fell silent, a lower epoch never seen is the node again, and
/// is followed (refusing it would leave its writes unheard: an invalidator
/// would keep the copies they made stale). The epoch it left stays refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_with_its_clock_set_back_is_followed_once_its_stream_is_gone() {
    let Lone { memory, reports, mut on_b, _held } = Lone::start().await;
    let (later, set_back, further_back) = (epoch_from_now(-1_000), epoch_from_now(-60_000), epoch_from_now(-120_000));

    // Node 9 stops cleanly, then restarts with its clock a minute back.
    let before = craft(9, later, "users", 0, 0, 1, &["before"]);
    memory.publish_raw("nbx:users", &before);
    memory.publish_raw("nbx:users", &last_heartbeat(9, later, 0, 0, 2));
    memory.publish_raw("nbx:users", &craft(9, set_back, "users", 0, 0, 1, &["after a clean stop"]));
    // Its frames of the epoch it left are replays, although that epoch is
    // the greater one now.
    memory.publish_raw("nbx:users", &before);
    memory.publish_raw("nbx:users", &craft(9, later, "users", 0, 0, 2, &["replayed"]));
    memory.publish_raw("nbx:users", &craft(9, set_back, "users", 0, 0, 2, &["marker"]));
    memory.publish_raw("nbx:users", &last_heartbeat(9, set_back, 0, 0, 3));
    let mut tally = Tally::default();
    read_until(&mut on_b, &mut tally, |t| t.keys().contains(&"marker".to_string())).await;
    assert_eq!(tally.keys(), ["before", "after a clean stop", "marker"]);
    assert!(tally.lagged.is_empty(), "a clean stop and restart lose nothing: {:?}", tally.lagged);
    assert_eq!(reports.rejected(), ["old_epoch", "old_epoch"]);

    // Node 10 crashes (no LAST), then restarts with its clock set back: its
    // frames are replays while its earlier stream may still run, and are
    // followed once that fell silent (the loss of what it had not sent is
    // reported then, once).
    memory.publish_raw("nbx:users", &craft(10, later, "users", 0, 0, 1, &["from 10"]));
    read_until(&mut on_b, &mut tally, |t| t.events.len() == 4).await;
    memory.publish_raw("nbx:users", &craft(10, further_back, "users", 0, 0, 1, &["too early"]));
    assert_eq!(reports.rejected().len(), 3, "{:?}", reports.rejected());
    read_until(&mut on_b, &mut tally, |t| !t.lagged.is_empty()).await;
    assert_eq!(tally.lagged, [0], "10's silence is a possible loss");
    memory.publish_raw("nbx:users", &craft(10, further_back, "users", 0, 0, 2, &["after a crash"]));
    read_until(&mut on_b, &mut tally, |t| t.keys().contains(&"after a crash".to_string())).await;
    assert_eq!(tally.keys(), ["before", "after a clean stop", "marker", "from 10", "after a crash"]);
    assert_eq!(tally.lagged, [0, 1], "number 1 of the new stream was refused, and is a gap");
    assert_eq!(reports.rejected(), ["old_epoch"; 3]);
    // (Readers are told first, then the report is made.)
    wait_for("both gaps reported", || reports.gaps.lock().unwrap().len() == 2).await;
    assert_eq!(*reports.gaps.lock().unwrap(), [(Some(NodeId(10)), 0), (Some(NodeId(10)), 1)]);
}

/// A lost connection forgets nothing that guards against replays: after it,
/// an origin's next frame may jump (the loss was reported as unknown), but
/// frames it already sent, or frames of its older epochs, stay refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_stay_refused_after_a_lost_connection() {
    let Lone { memory, reports, mut on_b, _held } = Lone::start().await;
    let old_epoch = craft(9, 1, "users", 0, 0, 1, &["old"]);
    let seen = craft(9, 2, "users", 0, 0, 1, &["seen"]);
    memory.publish_raw("nbx:users", &old_epoch);
    memory.publish_raw("nbx:users", &last_heartbeat(9, 1, 0, 0, 2)); // a clean restart
    memory.publish_raw("nbx:users", &seen);
    let mut tally = Tally::default();
    read_until(&mut on_b, &mut tally, |t| t.events.len() == 2).await;
    memory.cut(NodeId(2));
    memory.restore(NodeId(2));
    // Told when lost and again when back; with no event between, one notice.
    read_until(&mut on_b, &mut tally, |t| !t.lagged.is_empty()).await;
    memory.publish_raw("nbx:users", &old_epoch);
    memory.publish_raw("nbx:users", &seen);
    // After the loss, a jump is still counted: it may hold more than what
    // was published while the connection was down.
    memory.publish_raw("nbx:users", &craft(9, 2, "users", 0, 0, 7, &["after"]));
    read_until(&mut on_b, &mut tally, |t| t.keys().contains(&"after".to_string())).await;
    assert_eq!(tally.keys(), ["old", "seen", "after"]);
    assert_eq!(tally.lagged, [0, 5]);
    let rejected = reports.rejected.lock().unwrap().clone();
    assert_eq!(rejected, ["old_epoch", "replay"]);
    let gaps = reports.gaps.lock().unwrap().clone();
    assert_eq!(gaps.last(), Some(&(Some(NodeId(9)), 5)), "{gaps:?}");
    assert!(gaps[..gaps.len() - 1].iter().all(|(origin, _)| origin.is_none()), "{gaps:?}");
}

/// Frames lost after this node's connection came back are counted, though
/// its loss was already told: the origin's next frame jumps by them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_lost_after_a_reconnection_are_counted() {
    let bus = PubSub::memory();
    let memory: MemoryBus = bus.as_memory().expect("memory bus").clone();
    let (a, b) = (node("users", 1), node("users", 2));
    // Heartbeats rare: only event frames move the numbering here.
    let slow = |c| Streams::builder(c).pubsub(bus.clone()).buffer(1 << 15).heartbeat(Duration::from_secs(60));
    let _sa = ready(slow(&a).start().expect("start a")).await;
    let _sb = ready(slow(&b).start().expect("start b")).await;
    let mut on_b = b.subscribe(SubscribeOptions::new()).expect("subscribe");
    a.put("k0".to_string(), 0);
    assert_eq!(key_of(&next_event(&mut on_b).await), "k0");
    memory.cut(NodeId(2));
    memory.restore(NodeId(2));
    let mut tally = Tally::default();
    read_until(&mut on_b, &mut tally, |t| !t.lagged.is_empty()).await;
    assert_eq!(tally.lagged, [0], "the lost connection, told");
    // Connected again; then A's next frame is lost.
    let lost = Arc::new(AtomicU64::new(0));
    memory.drop_frames_where(1, event_frames_of(NodeId(1), lost.clone()));
    a.put("k1".to_string(), 1);
    wait_for("the frame of k1 to be dropped", || lost.load(Ordering::SeqCst) == 1).await;
    a.put("k2".to_string(), 2);
    read_until(&mut on_b, &mut tally, |t| !t.events.is_empty()).await;
    assert_eq!(tally.keys(), ["k2"]);
    assert_eq!(tally.lagged, [0, 1], "k1's loss, counted");
}

/// A gap is counted in the origin's sequence numbers, which number its events
/// of every type: a subscriber that filters by type is told the whole jump,
/// at least what it missed (here, none of its type) — never less.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_subscriber_is_told_the_whole_gap_of_events_of_every_type() {
    let bus = PubSub::memory();
    let memory: MemoryBus = bus.as_memory().expect("memory bus").clone();
    let (a, b) = (node("users", 1), node("users", 2));
    let _sa = ready(builder(&a, &bus).start().expect("start a")).await;
    let _sb = ready(builder(&b, &bus).start().expect("start b")).await;
    let mut deletes = b.subscribe(SubscribeOptions::new().events([EventType::Deleted])).expect("subscribe");
    // B knows where A's numbering stands before anything is lost (else the
    // loss would come before B's first frame of A, and nobody could tell).
    a.delete("warm-up");
    assert_eq!(key_of(&next_event(&mut deletes).await), "warm-up");
    let lost = Arc::new(AtomicU64::new(0));
    memory.drop_frames_where(1, event_frames_of(NodeId(1), lost.clone()));
    a.put("k".to_string(), 1); // an insert, lost on the way
    wait_for("the insert's frame to be dropped", || lost.load(Ordering::SeqCst) == 1).await;
    a.delete("k");
    let mut tally = Tally::default();
    read_until(&mut deletes, &mut tally, |t| !t.events.is_empty()).await;
    assert_eq!(tally.lagged, [1], "the lost insert, counted though not of its type");
    assert_eq!((tally.events[0].kind, key_of(&tally.events[0])), (EventType::Deleted, "k".to_string()));
}

/// An origin that fell silent (its loss told) and is heard again long after,
/// with the same epoch, has what it sent meanwhile counted as a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_heard_again_long_after_falling_silent_has_its_gap_counted() {
    let Lone { memory, mut on_b, _held, .. } = Lone::start().await;
    let epoch = epoch_from_now(-60_000); // started before us
    memory.publish_raw("nbx:users", &craft(9, epoch, "users", 0, 0, 1, &["first"]));
    let mut tally = Tally::default();
    read_until(&mut on_b, &mut tally, |t| !t.lagged.is_empty()).await;
    assert_eq!((tally.keys(), tally.lagged.clone()), (vec!["first".to_string()], vec![0]), "fell silent");
    // Past the time a stopped origin is forgotten (100 heartbeats), it goes
    // on at 5: it sent 2, 3, 4 while unheard.
    tokio::time::sleep(HEARTBEAT * 110).await;
    memory.publish_raw("nbx:users", &craft(9, epoch, "users", 0, 0, 5, &["again"]));
    read_until(&mut on_b, &mut tally, |t| t.events.len() == 2).await;
    assert_eq!(tally.lagged, [0, 3], "what it sent while unheard, counted");
}

/// An epoch of a stream that started `ms_from_now` milliseconds from now.
fn epoch_from_now(ms_from_now: i64) -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    ((now + ms_from_now) as u64) << 16
}

/// A node whose stream started after ours: we listened from its number 1,
/// so a first frame further on is a gap of what came before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_started_after_us_is_followed_from_its_first_number() {
    let Lone { memory, reports, mut on_b, _held } = Lone::start().await;
    // Node 9 started before us: its numbering is taken as it comes.
    memory.publish_raw("nbx:users", &craft(9, epoch_from_now(-60_000), "users", 0, 0, 40, &["older"]));
    // Node 10 started after us, and its first two frames were lost.
    memory.publish_raw("nbx:users", &craft(10, epoch_from_now(1_000), "users", 0, 0, 3, &["newer"]));
    let mut tally = Tally::default();
    read_until(&mut on_b, &mut tally, |t| t.events.len() == 2).await;
    assert_eq!(tally.keys(), ["older", "newer"]);
    assert_eq!(tally.lagged, [2]);
    assert_eq!(*reports.gaps.lock().unwrap(), [(Some(NodeId(10)), 2)]);
}

/// A node that falls silent without having stopped is taken for gone after
/// a few heartbeats: what it had not sent is lost, once reported; a node
/// whose last frame said it stopped is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_silent_without_stopping_is_a_possible_loss_reported_once() {
    let Lone { memory, reports, mut on_b, _held } = Lone::start().await;
    let started = Instant::now();
    memory.publish_raw("nbx:users", &craft(9, 1, "users", 0, 0, 1, &["from 9"]));
    memory.publish_raw("nbx:users", &craft(10, 1, "users", 0, 0, 1, &["from 10"]));
    memory.publish_raw("nbx:users", &last_heartbeat(10, 1, 0, 0, 2)); // 10 stopped cleanly
    let mut tally = Tally::default();
    read_until(&mut on_b, &mut tally, |t| !t.lagged.is_empty()).await;
    assert!(started.elapsed() >= HEARTBEAT * nebulex_streams::SILENT_HEARTBEATS, "not before the silence limit");
    assert_eq!(tally.keys(), ["from 9", "from 10"]);
    assert_eq!(tally.lagged, [0]);
    // (Readers are told first, then the report is made.)
    wait_for("the silence reported", || !reports.gaps.lock().unwrap().is_empty()).await;
    assert_eq!(*reports.gaps.lock().unwrap(), [(Some(NodeId(9)), 0)]);
    // Once: a marker from 10's next start arrives with nothing before it.
    tokio::time::sleep(HEARTBEAT * 2 * nebulex_streams::SILENT_HEARTBEATS).await;
    memory.publish_raw("nbx:users", &craft(10, 2, "users", 0, 0, 1, &["marker"]));
    read_until(&mut on_b, &mut tally, |t| t.keys().contains(&"marker".to_string())).await;
    assert_eq!(tally.lagged, [0], "reported once, and 10's clean stop and restart are no loss");
}

/// Frames with this node's own id: its echoes (or its earlier stream's) are
/// ignored; a stream started later with the same id is another node,
/// refused and reported rather than taken for echoes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_node_with_our_id_is_reported_not_taken_for_our_echo() {
    let bus = PubSub::memory();
    let memory: MemoryBus = bus.as_memory().expect("memory bus").clone();
    let b = node("users", 2);
    let reports = Reports::default();
    let _sb = ready(builder(&b, &bus).observer(reports.observer()).start().expect("start b")).await;
    let before = reports.rejected().len();
    memory.publish_raw("nbx:users", &craft(2, 1, "users", 0, 0, 1, &["earlier stream"]));
    assert_eq!(reports.rejected().len(), before, "an earlier stream of ours: ignored");
    memory.publish_raw("nbx:users", &craft(2, epoch_from_now(60_000), "users", 0, 0, 1, &["impostor"]));
    assert_eq!(reports.rejected()[before..], ["same_node_id"]);
}

/// Keeps, as they are published, the frames of `origin` signed with
/// "alpha" that carry events (`events`) or not (heartbeats); drops none.
fn keep_signed_frames(memory: &MemoryBus, origin: u64, events: bool) -> Arc<Mutex<Vec<Vec<u8>>>> {
    let kept: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let into = kept.clone();
    memory.drop_frames_where(1, move |_, bytes| {
        let limits = DecodeLimits { signing_key: Some(b"alpha"), ..Default::default() };
        let decoded = wire::decode::<String>(bytes, &limits);
        if decoded.is_ok_and(|f| f.header.origin == NodeId(origin) && f.events.is_empty() != events) {
            into.lock().unwrap().push(bytes.to_vec());
        }
        false
    });
    kept
}

/// A signed heartbeat captured and sent again is refused as a replay: its
/// sequence number is still the next one, but its send time is not later
/// than the last frame taken from its origin. (Taken, it would pass for a
/// sign of life of a node cut off from the transport.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_signed_heartbeat_is_refused() {
    let bus = PubSub::memory();
    let memory: MemoryBus = bus.as_memory().expect("memory bus").clone();
    let (a, b) = (node("users", 1), node("users", 2));
    let reports = Reports::default();
    let _sb = ready(builder(&b, &bus).signing_key("alpha").observer(reports.observer()).start().expect("b")).await;
    let heartbeats = keep_signed_frames(&memory, 1, false);
    let _sa = ready(builder(&a, &bus).signing_key("alpha").start().expect("a")).await;
    wait_for("A's first heartbeat and two more", || heartbeats.lock().unwrap().len() >= 3).await;
    let first = heartbeats.lock().unwrap()[0].clone();
    let before = reports.rejected().len();
    memory.publish_raw("nbx:users", &first);
    assert_eq!(reports.rejected()[before..], ["replay"]);
}

/// A signed frame of a node's earlier stream, never heard here, replayed
/// while the node is silent, is followed (it looks like the node restarted
/// with its clock set back); but once the node's real stream goes on from
/// where it stood, the receiver goes back to it: the node is not cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_old_stream_was_replayed_while_it_was_silent_is_heard_again() {
    let bus = PubSub::memory();
    let memory: MemoryBus = bus.as_memory().expect("memory bus").clone();
    let (a, b) = (node("users", 1), node("users", 2));
    let captured = keep_signed_frames(&memory, 2, true);
    // B's first stream writes a frame, and stops; its second one runs.
    let first = ready(builder(&b, &bus).signing_key("alpha").start().expect("b, first")).await;
    b.put("old".into(), 1);
    wait_for("B's first frame", || captured.lock().unwrap().len() == 1).await;
    first.stop();
    first.shutdown().await;
    let _second = ready(builder(&b, &bus).signing_key("alpha").start().expect("b, second")).await;
    // A starts now: it never heard B's first stream.
    let reports = Reports::default();
    let _sa = ready(builder(&a, &bus).signing_key("alpha").observer(reports.observer()).start().expect("a")).await;
    let mut on_a = a.subscribe(SubscribeOptions::new()).expect("subscribe");
    b.put("heard".into(), 1);
    assert_eq!(key_of(&next_event(&mut on_a).await), "heard");

    // B is cut off; once A took it for silent, B's old frame is replayed.
    memory.cut(NodeId(2));
    wait_for("A takes B for silent", || reports.gaps.lock().unwrap().contains(&(Some(NodeId(2)), 0))).await;
    let old = captured.lock().unwrap()[0].clone();
    memory.publish_raw("nbx:users", &old);
    // B is back and writes: A hears it.
    memory.restore(NodeId(2));
    b.put("after".into(), 1);
    let mut tally = Tally::default();
    read_until(&mut on_a, &mut tally, |t| t.keys().contains(&"after".to_string())).await;
    assert!(!reports.rejected().contains(&"old_epoch"), "B's real frames were taken: {:?}", reports.rejected());
}

/// Each new node makes this one announce every partition (so the newcomer
/// learns where its numbering stands) at once, but at most 4 times a
/// quarter heartbeat: a stream of frames from made-up origins does not make
/// it heartbeat every partition for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_origins_are_greeted_at_most_4_times_a_quarter_heartbeat() {
    const PARTITIONS: u32 = 16;
    let bus = PubSub::memory();
    let memory: MemoryBus = bus.as_memory().expect("memory bus").clone();
    let b = node("users", 2);
    // A quarter heartbeat (2 s) longer than the test: its greetings fall in
    // at most two windows of 4.
    let heartbeat = Duration::from_secs(8);
    let _sb =
        ready(Streams::builder(&b).pubsub(bus.clone()).partitions(PARTITIONS).heartbeat(heartbeat).start().expect("b"))
            .await;
    // B's frames, counted as they are published.
    let sent = Arc::new(AtomicU64::new(0));
    let counted = sent.clone();
    memory.drop_frames_where(1, move |_, bytes| {
        if wire::decode::<String>(bytes, &DecodeLimits::default()).is_ok_and(|f| f.header.origin == NodeId(2)) {
            counted.fetch_add(1, Ordering::SeqCst);
        }
        false
    });
    // B's greeting at start is out of the way.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = sent.load(Ordering::SeqCst);
    // 100 origins, one after another, over about 200 ms (no heartbeat is due
    // in it).
    for origin in 100..200 {
        memory.publish_raw("nbx:users:0", &craft(origin, 1, "users", 0, PARTITIONS, 1, &["made up"]));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    wait_for("B's greeting", || sent.load(Ordering::SeqCst) >= before + u64::from(PARTITIONS)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let greetings = (sent.load(Ordering::SeqCst) - before) / u64::from(PARTITIONS);
    assert!(greetings <= 8, "B announced every partition {greetings} times for 100 new origins in 200 ms");
}

/// A node restarted with its clock set back is followed; a replay of the
/// last heartbeat of the epoch it left does not bring that epoch back (its
/// send time is not after the last frame taken of it), so the node is not
/// cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_heartbeat_of_a_left_epoch_does_not_bring_it_back() {
    let Lone { memory, reports, mut on_b, _held } = Lone::start().await;
    let (hi, lo) = (epoch_from_now(-1_000), epoch_from_now(-60_000));
    let heartbeat = craft_sent(9, hi, 20, 2, &[]);
    memory.publish_raw("nbx:users", &craft_sent(9, hi, 10, 1, &["before"]));
    memory.publish_raw("nbx:users", &heartbeat);
    let mut tally = Tally::default();
    read_until(&mut on_b, &mut tally, |t| !t.lagged.is_empty()).await; // 9 crashed: silent
    memory.publish_raw("nbx:users", &craft_sent(9, lo, 5, 1, &["after the restart"]));
    read_until(&mut on_b, &mut tally, |t| t.keys().contains(&"after the restart".to_string())).await;
    memory.publish_raw("nbx:users", &heartbeat);
    assert_eq!(reports.rejected(), ["old_epoch"], "the replayed heartbeat is refused");
    memory.publish_raw("nbx:users", &craft_sent(9, lo, 6, 2, &["still heard"]));
    read_until(&mut on_b, &mut tally, |t| t.keys().contains(&"still heard".to_string())).await;
    assert_eq!(tally.keys(), ["before", "after the restart", "still heard"]);
}

/// A node restarted with its clock set back (a lower epoch) is followed; a
/// frame of the epoch it left, never heard here, replayed, brings that epoch
/// back (as if the lower one had been the replay), and the node's real
/// frames are refused meanwhile. Once the epoch brought back falls silent,
/// the real one goes on from where it stood: the node is not cut off, and
/// the frames refused are a gap of known size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_left_epoch_brought_back_by_a_replay_gives_way_once_it_falls_silent() {
    let Lone { memory, reports, mut on_b, _held } = Lone::start().await;
    let (hi, lo) = (epoch_from_now(-1_000), epoch_from_now(-60_000));
    let mut tally = Tally::default();
    memory.publish_raw("nbx:users", &craft_sent(9, hi, 10, 1, &["before"]));
    read_until(&mut on_b, &mut tally, |t| !t.lagged.is_empty()).await; // 9 crashed: silent
    memory.publish_raw("nbx:users", &craft_sent(9, lo, 5, 1, &["after the restart"]));
    memory.publish_raw("nbx:users", &craft_sent(9, hi, 30, 2, &["replayed"]));
    read_until(&mut on_b, &mut tally, |t| t.keys().contains(&"replayed".to_string())).await;
    memory.publish_raw("nbx:users", &craft_sent(9, lo, 6, 2, &["refused"]));
    assert_eq!(reports.rejected(), ["old_epoch"]);
    read_until(&mut on_b, &mut tally, |t| t.lagged.len() == 2).await; // the epoch brought back: silent
    memory.publish_raw("nbx:users", &craft_sent(9, lo, 7, 3, &["heard again"]));
    read_until(&mut on_b, &mut tally, |t| t.keys().contains(&"heard again".to_string())).await;
    assert_eq!(tally.keys(), ["before", "after the restart", "replayed", "heard again"]);
    assert_eq!(tally.lagged, [0, 0, 1], "each silence, then the frame refused");
    assert_eq!(reports.rejected(), ["old_epoch"]);
}

/// Frames of events with the same send time (a sender of another kind may
/// stamp two in one microsecond) are both taken: their numbers tell them
/// apart. Only a heartbeat's send time must be later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_of_events_sent_in_the_same_microsecond_are_both_taken() {
    let Lone { memory, reports, mut on_b, _held } = Lone::start().await;
    let epoch = epoch_from_now(-1_000);
    memory.publish_raw("nbx:users", &craft_sent(9, epoch, 10, 1, &["one"]));
    memory.publish_raw("nbx:users", &craft_sent(9, epoch, 10, 2, &["two"]));
    let mut tally = Tally::default();
    read_until(&mut on_b, &mut tally, |t| t.events.len() == 2).await;
    assert_eq!(tally.keys(), ["one", "two"]);
    assert_eq!(reports.rejected(), Vec::<&str>::new());
}

/// With a signing key, a frame that bears this node's id and another epoch
/// is checked before anything is made of its id: an unsigned one is refused
/// as unsigned, not taken for another node with our id nor for our earlier
/// stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_signing_key_a_forged_frame_with_our_id_is_refused_as_unsigned() {
    let bus = PubSub::memory();
    let memory: MemoryBus = bus.as_memory().expect("memory bus").clone();
    let b = node("users", 2);
    let reports = Reports::default();
    let _sb = ready(builder(&b, &bus).signing_key("beta").observer(reports.observer()).start().expect("b")).await;
    let before = reports.rejected().len();
    memory.publish_raw("nbx:users", &craft(2, epoch_from_now(60_000), "users", 0, 0, 1, &["later"]));
    memory.publish_raw("nbx:users", &craft(2, 1, "users", 0, 0, 1, &["earlier"]));
    assert_eq!(reports.rejected()[before..], ["unsigned", "unsigned"]);
}

/// Origin 9, whose stream started after B's (so B follows it from its
/// number 1), sends frame 1 ("first") and stops: its epoch, and that frame
/// as captured.
fn origin_9_sends_first_then_stops(memory: &MemoryBus) -> (u64, Vec<u8>) {
    let epoch = epoch_from_now(1_000);
    let captured = craft(9, epoch, "users", 0, 0, 1, &["first"]);
    memory.publish_raw("nbx:users", &captured);
    memory.publish_raw("nbx:users", &last_heartbeat(9, epoch, 0, 0, 2));
    (epoch, captured)
}

/// Origin 9's captured frame comes again, then its numbering goes on at 5:
/// the replay is refused, and 2, 3 and 4 are a gap (heard as for the first
/// time, it would be 1 to 4).
async fn origin_9_is_judged_from_where_it_stood(
    memory: &MemoryBus,
    on_b: &mut Subscription<String>,
    reports: &Reports,
    epoch: u64,
    captured: &[u8],
) {
    memory.publish_raw("nbx:users", captured);
    memory.publish_raw("nbx:users", &craft(9, epoch, "users", 0, 0, 5, &["again"]));
    let mut tally = Tally::default();
    read_until(on_b, &mut tally, |t| t.events.len() == 2).await;
    assert_eq!(tally.keys(), ["first", "again"], "the captured frame, refused");
    assert_eq!(tally.lagged, [3], "judged from where it stood: 2, 3 and 4 lost");
    assert_eq!(reports.rejected(), ["replay"]);
}

/// An origin that stopped is forgotten after a while (nodes coming and going
/// with new ids must not grow a receiver's state), but the last ones
/// forgotten are still judged from where they stood: a frame of one captured
/// earlier and replayed is refused, and a later one is a gap from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_origin_is_forgotten_after_a_while_and_its_captured_frames_stay_refused() {
    let Lone { memory, reports, mut on_b, _held } = Lone::start().await;
    let (epoch, captured) = origin_9_sends_first_then_stops(&memory);
    // Long after (100 heartbeats), it is forgotten.
    tokio::time::sleep(HEARTBEAT * 110).await;
    origin_9_is_judged_from_where_it_stood(&memory, &mut on_b, &reports, epoch, &captured).await;
}

/// Whether a node's stream started after ours is judged by how long each
/// has run, by its own clock: clocks set apart do not matter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whether_a_node_started_after_us_is_judged_by_how_long_each_ran_not_by_clocks_set_apart() {
    let Lone { memory, reports, mut on_b, _held } = Lone::start().await;
    // Node 9's clock is a minute behind ours: its stream seems to have
    // started before ours, but this frame was sent as it started. We have
    // listened since its number 1: its frames 1 and 2 were lost.
    memory.publish_raw("nbx:users", &craft_sent(9, epoch_from_now(-60_000), 0, 3, &["behind"]));
    // Node 10's clock is a minute ahead: its stream seems to have started
    // after ours, but it has run for two minutes: its numbering is taken as
    // it comes.
    memory.publish_raw("nbx:users", &craft_sent(10, epoch_from_now(60_000), 120_000, 40, &["ahead"]));
    let mut tally = Tally::default();
    read_until(&mut on_b, &mut tally, |t| t.events.len() == 2).await;
    assert_eq!(tally.keys(), ["behind", "ahead"]);
    assert_eq!(tally.lagged, [2]);
    assert_eq!(*reports.gaps.lock().unwrap(), [(Some(NodeId(9)), 2)]);
}

/// Only the last [`FORGOTTEN_ORIGINS`] forgotten origins are kept on: one
/// forgotten before them is heard again as for the first time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_last_forgotten_origins_are_kept_on() {
    let Lone { memory, reports, mut on_b, _held } = Lone::start().await;
    // Started before us: first heard at 3, each stops there.
    let epoch = epoch_from_now(-60_000);
    let stopped = |origin: u64| memory.publish_raw("nbx:users", &last_heartbeat(origin, epoch, 0, 0, 3));
    stopped(9);
    tokio::time::sleep(HEARTBEAT * 110).await; // 9 is forgotten, then as many others
    let others = 1_000..1_000 + FORGOTTEN_ORIGINS as u64;
    others.clone().for_each(stopped);
    tokio::time::sleep(HEARTBEAT * 110).await;
    // Each goes on at 5: from where it stood, 3 and 4 are lost; heard as for
    // the first time, the numbering is taken as it comes.
    memory.publish_raw("nbx:users", &craft(9, epoch, "users", 0, 0, 5, &["nine"]));
    memory.publish_raw("nbx:users", &craft(others.start, epoch, "users", 0, 0, 5, &["other"]));
    let mut tally = Tally::default();
    read_until(&mut on_b, &mut tally, |t| t.events.len() == 2).await;
    assert_eq!(tally.keys(), ["nine", "other"]);
    assert_eq!(tally.lagged, [2], "only the origin still kept on has a gap");
    assert_eq!(*reports.gaps.lock().unwrap(), [(Some(NodeId(others.start)), 2)]);
}

/// An origin kept among the last forgotten is judged from where it stood
/// also when its return makes room on a full partition: the origins
/// forgotten for it do not push it out of those kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_forgotten_origin_whose_return_makes_room_is_judged_from_where_it_stood() {
    // Slow heartbeats: nothing is forgotten by time meanwhile.
    let Lone { memory, reports, mut on_b, _held } = Lone::start_with(Duration::from_secs(10)).await;
    let (epoch, captured) = origin_9_sends_first_then_stops(&memory);
    // Made-up origins, each stopped at once, fill the partition; then each
    // new one past the limit forgets the eighth heard longest ago (9 among
    // the first), until exactly `FORGOTTEN_ORIGINS` were forgotten: 9 is
    // among the oldest kept, and the partition is full again.
    let made_up = (MAX_ORIGINS_PER_PARTITION - 1) + FORGOTTEN_ORIGINS;
    for origin in 1_000..1_000 + made_up as u64 {
        memory.publish_raw("nbx:users", &last_heartbeat(origin, 1, 0, 0, 3));
    }
    origin_9_is_judged_from_where_it_stood(&memory, &mut on_b, &reports, epoch, &captured).await;
}

/// A partition flooded with events does not hold back another's: each of
/// the sender's passes takes a share of frames from every partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_partition_does_not_starve_the_others_on_the_way_out() {
    let bus = PubSub::memory();
    let memory: MemoryBus = bus.as_memory().expect("memory bus").clone();
    // The order event frames take on the bus: (partition channel, key).
    let order = Arc::new(Mutex::new(Vec::new()));
    let log = order.clone();
    memory.drop_frames_where(u64::MAX, move |channel, bytes| {
        if let Ok(f) = wire::decode::<String>(bytes, &DecodeLimits::default()) {
            for e in &f.events {
                if let Target::Key(k) = &e.target {
                    log.lock().unwrap().push((channel.to_string(), k.clone()));
                }
            }
        }
        false
    });
    let a = node("users", 1);
    let _sa = ready(
        builder(&a, &bus)
            .partitions(2)
            .hash(|e| match &e.target {
                Target::Key(k) if k == "lone" => Route::Partition(1),
                _ => Route::Partition(0),
            })
            .batch_size(1)
            // The sender waits after its first event: all below are queued by then.
            .batch_linger(Duration::from_millis(100))
            .start()
            .expect("start a"),
    )
    .await;
    const FLOOD: usize = 300;
    for i in 0..FLOOD {
        a.put(format!("flood:{i}"), 0);
    }
    a.put("lone".to_string(), 0);
    wait_for("every event on the bus", || order.lock().unwrap().len() == FLOOD + 1).await;
    let order = order.lock().unwrap();
    let lone = order.iter().position(|(_, k)| k == "lone").expect("sent");
    assert_eq!(order[lone].0, "nbx:users:1");
    assert!(lone < FLOOD / 2, "the lone event waited behind {lone} flood events");
}

/// Made-up origins (anyone may publish on the channels without a signing
/// key) cannot make a receiver follow more than `MAX_ORIGINS_PER_PARTITION`
/// origins on a partition: past that, while every one is live, a new
/// origin's frame is refused and the partition's readers are told of a loss
/// (the other partitions are not affected); once they have fallen silent,
/// the longest silent make room for new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_origins_are_followed_up_to_a_bound_and_the_silent_make_room() {
    const SLOW_HEARTBEAT: Duration = Duration::from_millis(200);
    let bus = PubSub::memory();
    let memory = bus.as_memory().expect("memory bus").clone();
    let cache = node("users", 2);
    let reports = Reports::default();
    let streams = Streams::builder(&cache).pubsub(bus.clone()).partitions(2).heartbeat(SLOW_HEARTBEAT);
    let _streams = ready(streams.observer(reports.observer()).start().unwrap()).await;
    let mut on_0 = cache.subscribe(SubscribeOptions::new().partition(0)).expect("subscribe");
    let mut on_1 = cache.subscribe(SubscribeOptions::new().partition(1)).expect("subscribe");
    let started = Instant::now();
    for origin in 0..MAX_ORIGINS_PER_PARTITION as u64 {
        memory.publish_raw("nbx:users:0", &craft(1_000 + origin, 1, "users", 0, 2, 1, &[]));
    }
    memory.publish_raw("nbx:users:0", &craft(9, 1, "users", 0, 2, 1, &["refused"]));
    memory.publish_raw("nbx:users:1", &craft(9, 1, "users", 1, 2, 1, &["on another partition"]));
    assert!(started.elapsed() < SLOW_HEARTBEAT * nebulex_streams::SILENT_HEARTBEATS, "every origin is live still");
    assert_eq!(reports.rejected(), ["too_many_origins"]);
    let (mut tally_0, mut tally_1) = (Tally::default(), Tally::default());
    read_until(&mut on_0, &mut tally_0, |t| !t.lagged.is_empty()).await;
    assert_eq!((tally_0.keys(), &tally_0.lagged[..]), (vec![], &[0][..]), "the refused origin's frame is a loss");
    read_until(&mut on_1, &mut tally_1, |t| t.events.len() == 1).await;
    assert_eq!(tally_1.keys(), ["on another partition"]);

    // Once they are silent (a possible loss, told), a new origin is followed.
    read_until(&mut on_0, &mut tally_0, |t| t.lagged.len() == 2).await;
    memory.publish_raw("nbx:users:0", &craft(10, 1, "users", 0, 2, 1, &["followed"]));
    read_until(&mut on_0, &mut tally_0, |t| t.events.len() == 1).await;
    assert_eq!(tally_0.keys(), ["followed"]);
    assert_eq!(reports.rejected(), ["too_many_origins"], "refused only while all were live");
}

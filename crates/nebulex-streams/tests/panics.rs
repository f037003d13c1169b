//! User code that panics inside the stream's machinery — a telemetry
//! observer, a router, a key's `Eq` — is caught: writes still deliver their
//! events, a router's failure is reported, and the invalidator outlives it,
//! flushing the copies it could not vouch for.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nebulex::{Cache, NodeId};
use nebulex_streams::{
    BroadcastError, BroadcastStatus, DisconnectPolicy, EventScope, Invalidator, InvalidatorEvent, PubSub, Route,
    Streams, StreamsExt, SubscribeOptions, Telemetry,
};
use serde::{Deserialize, Serialize};
use support::{eventually, PATIENCE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_observer_does_not_stop_writes_or_their_events() {
    let cache: Cache<String, u32> = Cache::builder().name("users").build().unwrap();
    let calls = Arc::new(AtomicBool::new(false));
    let called = calls.clone();
    let _streams = Streams::builder(&cache)
        .observer(move |_| {
            called.store(true, Ordering::SeqCst);
            panic!("observer bug");
        })
        .start()
        .unwrap();
    let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();
    for i in 0..3 {
        cache.put(format!("user:{i}"), i);
    }
    for i in 0..3 {
        let event = tokio::time::timeout(PATIENCE, sub.recv()).await.expect("in time").expect("open").unwrap();
        assert_eq!(event.target, nebulex::Target::Key(format!("user:{i}")));
    }
    assert!(calls.load(Ordering::SeqCst), "the observer was called, and panicked");
    assert_eq!(cache.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_router_is_reported_and_the_stream_routes_the_next_events() {
    let cache: Cache<String, u32> = Cache::builder().name("users").build().unwrap();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let log = errors.clone();
    let _streams = Streams::builder(&cache)
        .partitions(2)
        .hash(|e| match &e.target {
            nebulex::Target::Key(k) if k.starts_with("bad") => panic!("router bug on {k}"),
            _ => Route::Partition(1),
        })
        .observer(move |t| {
            if let Telemetry::Broadcast { status: BroadcastStatus::Error, reason: Some(reason), event, .. } = t {
                log.lock().unwrap().push((reason.clone(), event.target.clone()));
            }
        })
        .start()
        .unwrap();
    let mut sub = cache.subscribe(SubscribeOptions::new().partition(1)).unwrap();
    cache.put("bad:1".to_string(), 1);
    cache.put("user:1".to_string(), 2);
    let mut next = async || tokio::time::timeout(PATIENCE, sub.recv()).await.expect("in time").expect("open");
    // It might have been this partition's event: a loss of unknown size.
    assert_eq!(next().await.unwrap_err(), nebulex_streams::Lagged(0));
    let event = next().await.unwrap();
    assert_eq!(event.target, nebulex::Target::Key("user:1".to_string()), "the next event is routed");
    assert_eq!(cache.len(), 2, "the write whose event the router failed on stands");
    let errors = errors.lock().unwrap();
    let [(BroadcastError::RouterPanicked(message), nebulex::Target::Key(key))] = &errors[..] else {
        panic!("{errors:?}")
    };
    assert_eq!((message.as_str(), key.as_str()), ("router bug on bad:1", "bad:1"));
}

/// While set, comparing the key `"poison"` panics.
static POISON: AtomicBool = AtomicBool::new(false);

/// A key whose `Eq` panics for `"poison"` while [`POISON`] is set.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
struct Touchy(String);

impl PartialEq for Touchy {
    fn eq(&self, other: &Self) -> bool {
        if POISON.load(Ordering::SeqCst) && self.0 == "poison" {
            panic!("Eq of a poisoned key");
        }
        self.0 == other.0
    }
}

impl Eq for Touchy {}

impl std::hash::Hash for Touchy {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

type Reports = Arc<Mutex<Vec<InvalidatorEvent>>>;

async fn node(id: u64, bus: &PubSub) -> (Cache<Touchy, u32>, Streams<Touchy>, Invalidator, Reports) {
    let cache = Cache::builder().name("users").node_id(NodeId(id)).build().unwrap();
    let reports: Reports = Arc::default();
    let seen = reports.clone();
    let streams = Streams::builder(&cache)
        .pubsub(bus.clone())
        .observer(move |t| {
            if let nebulex_streams::Telemetry::Invalidator { event, .. } = t {
                seen.lock().unwrap().push(event.clone());
            }
        })
        .start()
        .unwrap();
    tokio::time::timeout(PATIENCE, streams.ready()).await.expect("ready in time").unwrap();
    let invalidator = Invalidator::builder(&streams)
        .scope(EventScope::Remote)
        .on_disconnect(DisconnectPolicy::Flush)
        .start()
        .unwrap();
    (cache, streams, invalidator, reports)
}

fn count(reports: &Reports, pred: impl Fn(&InvalidatorEvent) -> bool) -> usize {
    reports.lock().unwrap().iter().filter(|e| pred(e)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidator_whose_removal_panics_flushes_the_partition_and_keeps_working() {
    let bus = PubSub::memory();
    let (a, _sa, _ia, _ra) = node(1, &bus).await;
    let (b, _sb, _ib, rb) = node(2, &bus).await;
    let key = |k: &str| Touchy(k.to_owned());

    // B holds two copies; A has none, so A's own writes compare no keys.
    b.put(key("poison"), 1);
    b.put(key("other"), 1);
    POISON.store(true, Ordering::SeqCst);
    a.put(key("poison"), 2);
    // B's removal of "poison" panics in `Eq`: B flushes instead.
    eventually("B flushed after the panic", || count(&rb, |e| matches!(e, InvalidatorEvent::Resync { .. })) == 1).await;
    POISON.store(false, Ordering::SeqCst);
    assert_eq!(b.len(), 0, "no copy B could not vouch for is left");

    // The worker is still there: A's next write removes B's copy.
    b.put(key("after"), 1);
    let before = count(&rb, |e| matches!(e, InvalidatorEvent::Invalidate { count: 1, .. }));
    a.put(key("after"), 2);
    eventually("B removed its copy", || {
        count(&rb, |e| matches!(e, InvalidatorEvent::Invalidate { count: 1, .. })) == before + 1
    })
    .await;
    assert!(!b.contains_key(&key("after")));
}

/// A key whose `Serialize` panics for `"bad-out"` and whose `Deserialize`
/// panics for `"bad-in"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Fragile(String);

impl Serialize for Fragile {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        assert_ne!(self.0, "bad-out", "Serialize of a fragile key");
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Fragile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        assert_ne!(s, "bad-in", "Deserialize of a fragile key");
        Ok(Fragile(s))
    }
}

/// The next item of `sub`: an event's target, or a loss.
async fn next(
    sub: &mut nebulex_streams::Subscription<Fragile>,
) -> Result<nebulex::Target<Fragile>, nebulex_streams::Lagged> {
    match tokio::time::timeout(PATIENCE, sub.recv()).await.expect("in time").expect("open") {
        Ok(event) => Ok(event.target.clone()),
        Err(lagged) => Err(lagged),
    }
}

/// A key's serialization that panics, on the sending node or on the
/// receiving one, loses its frame and no more: the frame is reported (not
/// published, or refused), the other node is told of the loss, and the
/// next events flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_serialization_panics_loses_its_frame_not_the_cluster_tasks() {
    let bus = PubSub::memory();
    let reports: Arc<Mutex<Vec<Telemetry<Fragile>>>> = Arc::default();
    let started = |id: u64| {
        let cache: Cache<Fragile, u32> = Cache::builder().name("fragile").node_id(NodeId(id)).build().unwrap();
        let seen = reports.clone();
        let streams = Streams::builder(&cache)
            .pubsub(bus.clone())
            .observer(move |t: &Telemetry<Fragile>| {
                if matches!(t, Telemetry::PublishFailed { .. } | Telemetry::FrameRejected { .. }) {
                    seen.lock().unwrap().push(t.clone());
                }
            })
            .start()
            .unwrap();
        (cache, streams)
    };
    let ((a, sa), (b, sb)) = (started(1), started(2));
    tokio::time::timeout(PATIENCE, sa.ready()).await.expect("ready in time").unwrap();
    tokio::time::timeout(PATIENCE, sb.ready()).await.expect("ready in time").unwrap();
    let mut on_b = b.subscribe(SubscribeOptions::new().scope(EventScope::Remote)).unwrap();
    let key = |k: &str| Fragile(k.to_owned());
    a.put(key("first"), 1);
    assert_eq!(next(&mut on_b).await, Ok(nebulex::Target::Key(key("first"))));

    let reported = |what: fn(&Telemetry<Fragile>) -> bool| reports.lock().unwrap().iter().filter(|t| what(t)).count();
    a.put(key("bad-out"), 1);
    eventually("A reports the frame it could not encode", || {
        reported(|t| matches!(t, Telemetry::PublishFailed { .. })) == 1
    })
    .await;
    a.put(key("second"), 1);
    assert_eq!(next(&mut on_b).await, Err(nebulex_streams::Lagged(1)), "B is told of the lost frame");
    assert_eq!(next(&mut on_b).await, Ok(nebulex::Target::Key(key("second"))), "A's sender still runs");

    a.put(key("bad-in"), 1);
    eventually("B refuses the frame it could not decode", || {
        reported(|t| {
            matches!(t, Telemetry::FrameRejected { reason: nebulex_streams::wire::RejectReason::Malformed(_), .. })
        }) == 1
    })
    .await;
    a.put(key("third"), 1);
    assert_eq!(next(&mut on_b).await, Err(nebulex_streams::Lagged(1)), "B counts the refused frame as lost");
    assert_eq!(next(&mut on_b).await, Ok(nebulex::Target::Key(key("third"))), "B still receives");
}

/// The application's metrics recorder is called from the cluster's tasks
/// too: a panic in it is caught where the report is made, after the readers
/// were told, and loses nothing more.
#[cfg(feature = "metrics")]
mod with_a_panicking_recorder {
    use super::*;
    use metrics::Recorder;
    use support::Panicking;

    /// A node of cache `name` on `bus`, its stream's metrics taken from
    /// `recorder`, with a subscription to the other nodes' events.
    async fn node(
        name: &str,
        id: u64,
        bus: &PubSub,
        recorder: &dyn Recorder,
    ) -> (Cache<Fragile, u32>, Streams<Fragile>, nebulex_streams::Subscription<Fragile>) {
        let cache: Cache<Fragile, u32> = Cache::builder().name(name).node_id(NodeId(id)).build().unwrap();
        let streams =
            metrics::with_local_recorder(recorder, || Streams::builder(&cache).pubsub(bus.clone()).start().unwrap());
        tokio::time::timeout(PATIENCE, streams.ready()).await.expect("ready in time").unwrap();
        let sub = cache.subscribe(SubscribeOptions::new().scope(EventScope::Remote)).unwrap();
        (cache, streams, sub)
    }

    /// B's recorder panics counting a gap, while B handles A's frame: B's
    /// readers are told the gap's count, no more, and the next frames are
    /// taken.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_while_a_gap_is_counted_loses_nothing_more() {
        let bus = nebulex_streams::MemoryBus::new();
        let pubsub = PubSub::from(bus.clone());
        let plain = Panicking::new("none", None);
        let (a, _sa, _) = node("gappy", 1, &pubsub, &plain).await;
        let on_gaps = Panicking::new("nebulex_streams_gaps_total", None);
        let (_b, _sb, mut on_b) = node("gappy", 2, &pubsub, &on_gaps).await;
        let key = |k: &str| Fragile(k.to_owned());
        a.put(key("first"), 1);
        assert_eq!(next(&mut on_b).await, Ok(nebulex::Target::Key(key("first"))));

        bus.drop_frames(1);
        a.put(key("dropped"), 1);
        a.put(key("second"), 1);
        // B sees the gap (at "second", or at A's next heartbeat if both went
        // in the dropped frame) and its recorder panics counting it.
        let mut items = vec![next(&mut on_b).await];
        a.put(key("third"), 1);
        let third = Ok(nebulex::Target::Key(key("third")));
        while items.last() != Some(&third) {
            items.push(next(&mut on_b).await); // fails unless "third" comes
        }
        assert!(on_gaps.booms() > 0, "the recorder panicked");
        let second = Ok(nebulex::Target::Key(key("second")));
        assert!(
            matches!(items[..], [Err(nebulex_streams::Lagged(1 | 2)), ..]),
            "the gap, counted, comes first: {items:?}"
        );
        assert!(items[1..].iter().all(|i| *i == second || *i == third), "nothing else: {items:?}");
    }

    /// A's recorder panics in A's sender task, counting the frame a key's
    /// `Serialize` failed on: that frame is lost (B is told its count), and
    /// A's sender goes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_while_the_sender_counts_a_lost_frame_loses_nothing_more() {
        let bus = PubSub::memory();
        let on_unsent = Panicking::new("nebulex_streams_broadcast_errors_total", Some("transport"));
        let (a, sa, _) = node("mute", 1, &bus, &on_unsent).await;
        let plain = Panicking::new("none", None);
        let (_b, _sb, mut on_b) = node("mute", 2, &bus, &plain).await;
        let key = |k: &str| Fragile(k.to_owned());
        // B has heard A: it knows where A's numbering stands.
        a.put(key("first"), 1);
        assert_eq!(next(&mut on_b).await, Ok(nebulex::Target::Key(key("first"))));
        a.put(key("bad-out"), 1); // not encoded; counting it panics in A's sender task
        eventually("A's recorder panicked", || on_unsent.booms() > 0).await;
        a.put(key("after"), 1);
        assert_eq!(next(&mut on_b).await, Err(nebulex_streams::Lagged(1)), "B is told of the frame lost");
        assert_eq!(next(&mut on_b).await, Ok(nebulex::Target::Key(key("after"))));
        assert_eq!(sa.info().connected, Some(true), "A's sender goes on");
    }
}

/// The application's logger panics as an invalidator's worker receives a
/// loss notice (receiving logs it): the loss is still acted on, and the
/// worker goes on.
#[tokio::test]
async fn a_logger_that_panics_on_a_loss_notice_does_not_end_the_invalidator() {
    use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
    static ARMED: AtomicBool = AtomicBool::new(false);
    /// Panics once, while armed, on a subscriber's lag warning (a count
    /// missed, no origin).
    struct PanicOnLagged;
    impl<S: tracing::Subscriber> Layer<S> for PanicOnLagged {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            let fields = event.metadata().fields();
            if fields.field("missed").is_some()
                && fields.field("origin").is_none()
                && ARMED.swap(false, Ordering::SeqCst)
            {
                panic!("logger bug");
            }
        }
    }
    // The stream's tasks run on this test's one thread: they log through it.
    let _log = tracing::subscriber::set_default(tracing_subscriber::registry().with(PanicOnLagged));
    let memory = nebulex_streams::MemoryBus::new();
    let bus = PubSub::from(memory.clone());
    let node = |id| Cache::<String, u32>::builder().name("users").node_id(NodeId(id)).build().unwrap();
    let (a, b) = (node(1), node(2));
    let _sa = Streams::builder(&a).pubsub(bus.clone()).start().unwrap();
    let sb = Streams::builder(&b).pubsub(bus.clone()).start().unwrap();
    tokio::time::timeout(PATIENCE, sb.ready()).await.expect("ready in time").unwrap();
    let _invalidator = Invalidator::builder(&sb).start().unwrap();

    b.put("held".into(), 1);
    ARMED.store(true, Ordering::SeqCst);
    memory.cut(NodeId(2));
    eventually("B's invalidator flushes at the loss", || !b.contains_key("held")).await;
    assert!(!ARMED.load(Ordering::SeqCst), "the logger panicked in the worker");

    memory.restore(NodeId(2));
    eventually("B is connected again", || sb.info().connected == Some(true)).await;
    b.put("later".into(), 1);
    a.put("later".into(), 2);
    eventually("B's invalidator still removes what A changes", || !b.contains_key("later")).await;
}

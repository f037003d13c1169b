//! A stream stopped and started again at once on one node, while the other
//! node keeps running: the old stream's sender still sends what it had
//! routed (cut short in its `batch_linger`), and the new one sends once it
//! is done, so the other nodes see a clean restart. And an invalidator
//! whose runtime ended says it has stopped.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nebulex::{Cache, Target};
use nebulex_streams::{
    EventScope, Invalidator, Lagged, PubSub, Streams, StreamsExt, SubscribeOptions, Telemetry, MAX_BATCH_LINGER,
};
use support::*;

type Rejected = Arc<Mutex<Vec<&'static str>>>;

fn recording_rejections(rejected: &Rejected) -> impl Fn(&Telemetry<String>) + Send + Sync + 'static {
    let rejected = rejected.clone();
    move |t| {
        if let Telemetry::FrameRejected { reason, .. } = t {
            rejected.lock().unwrap().push(reason.label());
        }
    }
}

/// Lets the one-thread runtime run every task that can run.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// B writes "k" while its stream lingers for company, stops, and starts
/// again at once. A (with an invalidator) hears the old stream's frame with
/// "k" (sent, as `stop` promises) before the new stream's first: A's copy
/// of "k", read before B's write, goes.
#[tokio::test]
async fn a_write_routed_before_a_quick_restart_reaches_the_other_nodes() {
    let bus = PubSub::memory();
    let rejected: Rejected = Arc::default();
    let a = node("users", 1);
    let sa = Streams::builder(&a).pubsub(bus.clone()).observer(recording_rejections(&rejected)).start().unwrap();
    sa.ready().await.unwrap();
    let _ia = Invalidator::builder(&sa).start().unwrap();
    let mut on_a = a.subscribe(SubscribeOptions::new().scope(EventScope::Remote)).unwrap();
    assert_eq!(a.get_or_insert_with("k".into(), || 1), 1, "A reads k from the record");

    let b: Cache<String, u32> = node("users", 2);
    let first = Streams::builder(&b).pubsub(bus.clone()).batch_linger(MAX_BATCH_LINGER).start().unwrap();
    first.ready().await.unwrap();
    b.put("k".into(), 2); // B changes the record
    settle().await; // B's sender takes the event and lingers
    first.stop(); // "events already routed are still sent"
    let again = Streams::builder(&b).pubsub(bus.clone()).start().unwrap();
    again.ready().await.unwrap();
    b.put("probe".into(), 3);
    let before = until(&mut on_a, |e| e.target == Target::Key("probe".into())).await;
    assert!(
        matches!(&before[..], [Ok(e)] if e.target == Target::Key("k".into())),
        "A heard k, from B's first stream, before B's next stream: {before:?}"
    );

    tokio::time::timeout(PATIENCE, first.shutdown()).await.expect("the first stream's sender finished");
    // Nothing more is coming: every frame of B's first stream was published.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while a.contains_key("k") && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after: Vec<_> = std::iter::from_fn(|| on_a.try_recv().ok()).collect();
    assert!(
        !a.contains_key("k"),
        "A's copy of k ({:?}) is stale for good: B's write was refused ({:?}), and A's subscriber was told {:?}",
        a.get("k"),
        rejected.lock().unwrap(),
        after
    );
}

/// A heard B's first stream. B writes "k", stops cleanly and starts again
/// at once: A gets "k" and is told of no loss (it is no crash).
#[tokio::test]
async fn a_clean_quick_restart_is_no_loss_to_the_other_nodes() {
    let bus = PubSub::memory();
    let rejected: Rejected = Arc::default();
    let a = node("users", 1);
    let sa = Streams::builder(&a).pubsub(bus.clone()).observer(recording_rejections(&rejected)).start().unwrap();
    sa.ready().await.unwrap();
    let mut on_a = a.subscribe(SubscribeOptions::new().scope(EventScope::Remote)).unwrap();

    let b: Cache<String, u32> = node("users", 2);
    let first = Streams::builder(&b).pubsub(bus.clone()).batch_linger(MAX_BATCH_LINGER).start().unwrap();
    first.ready().await.unwrap();
    b.put("first".into(), 1);
    let before = until(&mut on_a, |e| e.target == Target::Key("first".into())).await;
    assert!(before.is_empty(), "{before:?}");

    b.put("k".into(), 2);
    settle().await; // B's sender takes the event and lingers
    first.stop();
    let again = Streams::builder(&b).pubsub(bus.clone()).start().unwrap();
    again.ready().await.unwrap();
    b.put("probe".into(), 3);
    let mut items = until(&mut on_a, |e| e.target == Target::Key("probe".into())).await;
    tokio::time::timeout(PATIENCE, first.shutdown()).await.expect("the first stream's sender finished");
    b.put("probe2".into(), 4);
    items.extend(until(&mut on_a, |e| e.target == Target::Key("probe2".into())).await);

    let got_k = items.iter().any(|i| matches!(i, Ok(e) if e.target == Target::Key("k".into())));
    let lagged: Vec<u64> = items.iter().filter_map(|i| i.as_ref().err().map(|Lagged(n)| *n)).collect();
    assert!(
        got_k && lagged.is_empty(),
        "clean stop + start of B: A got k? {got_k}; A was told Lagged{lagged:?}; A refused {:?}",
        rejected.lock().unwrap()
    );
}

/// B stops its stream and starts it again at once: the old stream, still
/// sending what it had routed, does not take the new one's frames for
/// another node using its id (`same_node_id`).
#[tokio::test]
async fn a_clean_quick_restart_is_not_taken_for_another_node_with_the_same_id() {
    let bus = PubSub::memory();
    let rejected: Rejected = Arc::default();
    let b: Cache<String, u32> = node("users", 2);
    let first = Streams::builder(&b)
        .pubsub(bus.clone())
        .batch_linger(MAX_BATCH_LINGER)
        .observer(recording_rejections(&rejected))
        .start()
        .unwrap();
    first.ready().await.unwrap();
    b.put("k".into(), 1);
    settle().await; // B's sender takes the event and lingers
    first.stop();
    let again = Streams::builder(&b).pubsub(bus.clone()).start().unwrap();
    again.ready().await.unwrap();
    b.put("probe".into(), 2);
    tokio::time::timeout(PATIENCE, first.shutdown()).await.expect("the first stream's sender finished");
    assert!(rejected.lock().unwrap().is_empty(), "B's old stream reported {:?}", rejected.lock().unwrap());
}

/// B's invalidator was started on a runtime that has ended, while B's
/// stream runs on: its workers went with the runtime, so it has stopped,
/// and says so (`is_stopped`, a `Stopped` report).
#[test]
fn an_invalidator_whose_runtime_ended_says_it_has_stopped() {
    let runtime = || tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let bus = PubSub::memory();
    let main = runtime();
    let b = node("users", 2);
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = stopped.clone();
    let sb = main.block_on(async {
        let sb = Streams::builder(&b)
            .pubsub(bus.clone())
            .observer(move |t: &Telemetry<String>| {
                if matches!(t, Telemetry::Invalidator { event: nebulex_streams::InvalidatorEvent::Stopped, .. }) {
                    seen.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            })
            .start()
            .unwrap();
        sb.ready().await.unwrap();
        sb
    });
    let setup = runtime();
    let ib = setup.block_on(async { Invalidator::builder(&sb).start().unwrap() });
    assert!(!ib.is_stopped());
    drop(setup); // the invalidator's workers go with it
    assert!(ib.is_stopped(), "the invalidator says it still runs");
    assert!(stopped.load(std::sync::atomic::Ordering::SeqCst), "no Stopped report");
    assert!(!sb.is_stopped(), "the stream runs on");
}

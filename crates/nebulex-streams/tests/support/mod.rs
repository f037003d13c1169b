//! Helpers of the cluster tests: nodes, subscriptions, and waiting with a
//! deadline instead of sleeping.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use nebulex::{Cache, CacheEntryEvent, NodeId};
use nebulex_streams::{Lagged, PubSub, Streams, Subscription};

pub(crate) type Item = Result<Arc<CacheEntryEvent<String>>, Lagged>;

/// The longest a test waits for something that should happen.
pub(crate) const PATIENCE: Duration = Duration::from_secs(15);

pub(crate) fn node(name: &str, id: u64) -> Cache<String, u32> {
    Cache::builder().name(name).node_id(NodeId(id)).build().expect("cache")
}

pub(crate) async fn start(cache: &Cache<String, u32>, pubsub: &PubSub, partitions: u32) -> Streams<String> {
    let streams = Streams::builder(cache)
        .partitions(partitions)
        .pubsub(pubsub.clone())
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .start()
        .expect("start");
    tokio::time::timeout(PATIENCE, streams.ready()).await.expect("ready in time").expect("ready");
    assert_eq!(streams.info().connected, Some(true), "ready: the connection is up");
    streams
}

/// The next item, failing the test if none comes in time.
pub(crate) async fn next(sub: &mut Subscription<String>) -> Item {
    tokio::time::timeout(PATIENCE, sub.recv()).await.expect("an item in time").expect("stream open")
}

/// Reads until an event satisfies `pred`, returning every item read before it.
pub(crate) async fn until(
    sub: &mut Subscription<String>,
    pred: impl Fn(&CacheEntryEvent<String>) -> bool,
) -> Vec<Item> {
    let mut before = Vec::new();
    loop {
        match next(sub).await {
            Ok(e) if pred(&e) => return before,
            other => before.push(other),
        }
    }
}

/// Keeps writing probes from `writer` until `sub` receives one, proving events
/// flow end to end again; returns the items read meanwhile.
pub(crate) async fn until_flowing(writer: &Cache<String, u32>, sub: &mut Subscription<String>, tag: &str) -> Vec<Item> {
    let mut before = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    for i in 0.. {
        assert!(tokio::time::Instant::now() < deadline, "events did not flow again in time");
        let key = format!("{tag}:{i}");
        writer.put(key.clone(), i);
        match tokio::time::timeout(Duration::from_millis(100), sub.recv()).await {
            Ok(Some(Ok(e))) if e.target.keys().iter().any(|k| k.starts_with(tag)) => return before,
            Ok(Some(item)) => before.push(item),
            Ok(None) => panic!("stream ended"),
            Err(_) => {}
        }
    }
    before
}

/// Reads `n` events from `subs` together (one per partition, say), failing
/// on a `Lagged`, an end, or an event that does not come in time.
pub(crate) async fn receive_all(subs: Vec<Subscription<String>>, n: usize) {
    receive_from(&mut futures::stream::select_all(subs), n).await;
}

/// Waits until `cond` holds, failing the test after [`PATIENCE`].
pub(crate) async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A node that writes, shuts its stream down and is gone at once (its
/// runtime dropped, as at a process's exit): another node over `pubsub`
/// gets every one of its events, and no loss, for its last frames said that
/// its stream stopped (a node gone without them is reported silent after
/// `SILENT_HEARTBEATS` heartbeats).
pub(crate) async fn a_node_that_shuts_down_and_exits_delivers_its_last_events(pubsub: PubSub) {
    use nebulex_streams::{EventScope, StreamsExt, SubscribeOptions, SILENT_HEARTBEATS};
    const HEARTBEAT: Duration = Duration::from_millis(100);
    const PARTITIONS: u32 = 4;
    const EVENTS: u32 = 40;
    // What could not be published, per node.
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = {
        let failed = failed.clone();
        move |cache: &Cache<String, u32>, pubsub: &PubSub| {
            let failed = failed.clone();
            Streams::builder(cache)
                .partitions(PARTITIONS)
                .pubsub(pubsub.clone())
                .heartbeat(HEARTBEAT)
                .observer(move |t: &nebulex_streams::Telemetry<String>| {
                    if let nebulex_streams::Telemetry::PublishFailed { frames, .. } = t {
                        failed.fetch_add(*frames, std::sync::atomic::Ordering::SeqCst);
                    }
                })
                .start()
        }
    };
    let b = node("users", 2);
    let streams = started(&b, &pubsub).expect("start b");
    tokio::time::timeout(PATIENCE, streams.ready()).await.expect("ready in time").expect("ready");
    let subs: Vec<_> = (0..PARTITIONS)
        .map(|p| b.subscribe(SubscribeOptions::new().partition(p).scope(EventScope::Remote)).expect("subscribe"))
        .collect();
    let writer = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        rt.block_on(async {
            let a = node("users", 1);
            let streams = started(&a, &pubsub).expect("start a");
            tokio::time::timeout(PATIENCE, streams.ready()).await.expect("ready in time").expect("ready");
            for i in 0..EVENTS {
                a.put(format!("k{i}"), i);
            }
            streams.shutdown().await;
        });
        drop(rt);
    });
    tokio::task::spawn_blocking(move || writer.join()).await.expect("join").expect("the writer");
    let mut all = futures::stream::select_all(subs);
    receive_from(&mut all, EVENTS as usize).await;
    // Past the time a node gone without its last frames is reported silent.
    let quiet = HEARTBEAT * (SILENT_HEARTBEATS + 3);
    if let Ok(item) = tokio::time::timeout(quiet, futures::StreamExt::next(&mut all)).await {
        panic!("nothing more was due, got {item:?}");
    }
    assert_eq!(failed.load(std::sync::atomic::Ordering::SeqCst), 0, "frames not published");
}

/// Reads `n` events from `all`, failing on a `Lagged`, an end, or an event
/// that does not come in time.
async fn receive_from(all: &mut futures::stream::SelectAll<Subscription<String>>, n: usize) {
    use futures::StreamExt;
    for got in 0..n {
        match tokio::time::timeout(PATIENCE, all.next()).await {
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(lagged))) => panic!("{lagged:?} after {got} of {n} events"),
            Ok(None) => panic!("the streams ended after {got} of {n} events"),
            Err(_) => panic!("only {got} of {n} events arrived within {PATIENCE:?} of the last"),
        }
    }
}

/// Everything waiting in `sub`, until `Empty` or `Closed`.
pub(crate) fn drain<K>(sub: &mut Subscription<K>) -> Vec<Result<Arc<CacheEntryEvent<K>>, Lagged>> {
    std::iter::from_fn(|| match sub.try_recv() {
        Ok(event) => Some(Ok(event)),
        Err(nebulex_streams::TryRecvError::Lagged(n)) => Some(Err(Lagged(n))),
        Err(_) => None,
    })
    .collect()
}

/// A metrics recorder whose counters named `name` (and whose `reason`
/// label is `reason`, if given) panic when incremented; every other metric
/// is a no-op.
#[cfg(feature = "metrics")]
pub(crate) struct Panicking {
    name: &'static str,
    reason: Option<&'static str>,
    /// How many times its counters panicked.
    booms: Arc<std::sync::atomic::AtomicUsize>,
}

#[cfg(feature = "metrics")]
impl Panicking {
    pub(crate) fn new(name: &'static str, reason: Option<&'static str>) -> Self {
        Panicking { name, reason, booms: Arc::default() }
    }

    /// How many times its counters panicked so far.
    pub(crate) fn booms(&self) -> usize {
        self.booms.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(feature = "metrics")]
mod panicking {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use metrics::{Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

    use super::Panicking;

    struct Boom(Arc<AtomicUsize>);

    impl CounterFn for Boom {
        fn increment(&self, _: u64) {
            self.0.fetch_add(1, Ordering::SeqCst);
            panic!("recorder bug");
        }
        fn absolute(&self, _: u64) {
            panic!("recorder bug");
        }
    }

    impl Recorder for Panicking {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            let reason = key.labels().find(|l| l.key() == "reason").map(|l| l.value().to_owned());
            if key.name() == self.name && self.reason.is_none_or(|r| reason.as_deref() == Some(r)) {
                Counter::from_arc(Arc::new(Boom(self.booms.clone())))
            } else {
                Counter::noop()
            }
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }
}

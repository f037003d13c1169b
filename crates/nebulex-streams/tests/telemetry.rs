//! Telemetry in its three layers: the typed observer, `tracing` events under
//! the target `nebulex_streams`, and `metrics` counters.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::Arc;

use nebulex::{Cache, Target};
use nebulex_streams::{
    partition_of, BroadcastError, BroadcastStatus, Lagged, Streams, StreamsExt, SubscribeOptions, Telemetry,
};

use common::{drain, event, events_only, Recorded};

fn cache(name: &str) -> Cache<String, u32> {
    Cache::builder().name(name).build().unwrap()
}

/// The broadcasts recorded: (status, reason, topic, event target).
type Broadcast = (BroadcastStatus, Option<BroadcastError>, String, Target<String>);

fn broadcasts(recorded: &Recorded<String>) -> Vec<Broadcast> {
    recorded
        .all()
        .into_iter()
        .filter_map(|t| match t {
            Telemetry::Broadcast { status, reason, topic, event } => {
                Some((status, reason, topic.to_string(), event.target.clone()))
            }
            _ => None,
        })
        .collect()
}

// ----- the observer ----------------------------------------------------------

#[test]
fn observer_gets_listener_registered_at_start_and_listener_unregistered_at_stop() {
    init_tracing();
    let cache = cache("lifecycle");
    let recorded = Recorded::new();
    let streams = Streams::builder(&cache).observer(recorded.observer()).start().unwrap();
    let all = recorded.all();
    assert_eq!(all.len(), 1, "{all:?}");
    assert!(matches!(&all[0], Telemetry::ListenerRegistered { cache } if &**cache == "lifecycle"), "{all:?}");

    let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();
    cache.put("a".to_string(), 1);
    event(&mut sub);
    streams.stop();
    streams.stop(); // a second stop reports nothing more
    let all = recorded.all();
    let unregistered: Vec<_> = all.iter().filter(|t| matches!(t, Telemetry::ListenerUnregistered { .. })).collect();
    assert_eq!(unregistered.len(), 1, "{all:?}");
    assert!(matches!(all.last().unwrap(), Telemetry::ListenerUnregistered { cache } if &**cache == "lifecycle"));
    assert_eq!(all.iter().filter(|t| matches!(t, Telemetry::ListenerRegistered { .. })).count(), 1);

    // A new stream on the same cache reports to its own observer.
    let again = Recorded::new();
    let restarted = Streams::builder(&cache).observer(again.observer()).start().unwrap();
    assert!(matches!(again.all().as_slice(), [Telemetry::ListenerRegistered { .. }]));
    restarted.stop();
    assert!(matches!(
        again.all().as_slice(),
        [Telemetry::ListenerRegistered { .. }, Telemetry::ListenerUnregistered { .. }]
    ));
    assert_eq!(recorded.all().len(), all.len(), "the old observer hears nothing of the new stream");
}

#[test]
fn dropping_the_cache_reports_its_listener_unregistered() {
    init_tracing();
    let cache = cache("dropped");
    let recorded = Recorded::new();
    let streams = Streams::builder(&cache).observer(recorded.observer()).start().unwrap();
    drop(cache); // the listener goes with it, and the stream stops
    assert!(streams.is_stopped());
    assert!(
        matches!(
            recorded.all().as_slice(),
            [Telemetry::ListenerRegistered { .. }, Telemetry::ListenerUnregistered { .. }]
        ),
        "{:?}",
        recorded.all()
    );
    streams.stop(); // reports nothing more
    assert_eq!(recorded.all().len(), 2);
}

/// The observer told that the listener went with its cache may drop (or
/// make) a subscription: no lock of the stream is held while it runs.
#[test]
fn an_observer_may_drop_a_subscription_when_told_the_cache_is_gone() {
    use std::sync::Mutex;
    let cache = cache("dropped with a subscriber");
    let held: Arc<Mutex<Option<nebulex_streams::Subscription<String>>>> = Arc::default();
    let on_report = held.clone();
    let _streams = Streams::builder(&cache)
        .observer(move |t| {
            if let Telemetry::ListenerUnregistered { .. } = t {
                drop(on_report.lock().unwrap().take());
            }
        })
        .start()
        .unwrap();
    *held.lock().unwrap() = Some(cache.subscribe(SubscribeOptions::new()).unwrap());
    let (dropped, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(cache);
        let _ = dropped.send(());
    });
    assert!(done.recv_timeout(std::time::Duration::from_secs(10)).is_ok(), "dropping the cache hung");
    assert!(held.lock().unwrap().is_none(), "the observer ran");
}

#[test]
fn every_delivered_event_is_a_broadcast_ok_on_its_partition_topic() {
    init_tracing();
    const N: u32 = 4;
    let cache = cache("topics");
    let recorded = Recorded::new();
    let _streams = Streams::builder(&cache).partitions(N).observer(recorded.observer()).start().unwrap();
    let mut subs: Vec<_> = (0..N).map(|p| cache.subscribe(SubscribeOptions::new().partition(p)).unwrap()).collect();
    // A second subscriber on partition 0: still one broadcast per event.
    let mut extra = cache.subscribe(SubscribeOptions::new().partition(0)).unwrap();
    recorded.clear();

    for i in 0..40 {
        cache.put(format!("user:{i}"), 1);
    }
    cache.delete(&"user:0".to_string());

    let seen = broadcasts(&recorded);
    assert_eq!(seen.len(), 41);
    for (status, reason, topic, target) in &seen {
        assert_eq!(*status, BroadcastStatus::Ok);
        assert_eq!(*reason, None);
        let Target::Key(k) = target else { panic!("{target:?}") };
        assert_eq!(*topic, format!("nbx:topics:{}", partition_of(k, N)));
    }
    // The observer's events are the ones delivered, topic included.
    let delivered: usize = subs
        .iter_mut()
        .map(|s| {
            events_only(drain(s))
                .iter()
                .map(|e| {
                    let p = e.metadata.partition.unwrap();
                    assert_eq!(e.metadata.topic.as_deref(), Some(format!("nbx:topics:{p}").as_str()));
                })
                .count()
        })
        .sum();
    assert_eq!(delivered, 41);
    assert_eq!(events_only(drain(&mut extra)).len(), seen.iter().filter(|b| b.2 == "nbx:topics:0").count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_transport_and_no_local_subscriber_every_event_is_a_broadcast_ok() {
    init_tracing();
    const N: u32 = 2;
    let cache = cache("sent");
    let recorded = Recorded::new();
    let streams = Streams::builder(&cache)
        .partitions(N)
        .pubsub(nebulex_streams::PubSub::memory())
        .observer(recorded.observer())
        .start()
        .unwrap();
    streams.ready().await.unwrap();
    recorded.clear();
    for i in 0..10 {
        cache.put(format!("user:{i}"), 1);
    }
    let seen = broadcasts(&recorded);
    assert_eq!(seen.len(), 10, "each event handed to the cluster is a broadcast: {seen:?}");
    for (status, reason, topic, target) in &seen {
        let Target::Key(k) = target else { panic!("{target:?}") };
        assert_eq!(
            (*status, reason, topic.clone()),
            (BroadcastStatus::Ok, &None, format!("nbx:sent:{}", partition_of(k, N)))
        );
    }
    streams.shutdown().await;
}

#[test]
fn unpartitioned_broadcasts_are_on_the_cache_topic() {
    init_tracing();
    let cache = cache("flat-topic");
    let recorded = Recorded::new();
    let _streams = Streams::builder(&cache).observer(recorded.observer()).start().unwrap();
    let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();
    cache.put("a".to_string(), 1);
    cache.put("a".to_string(), 2);
    let seen = broadcasts(&recorded);
    assert_eq!(seen.len(), 2);
    for (status, _, topic, _) in &seen {
        assert_eq!((*status, topic.as_str()), (BroadcastStatus::Ok, "nbx:flat-topic"));
    }
    let Telemetry::Broadcast { event: observed, .. } = recorded.all().pop().unwrap() else { panic!() };
    event(&mut sub);
    let received = event(&mut sub);
    assert!(Arc::ptr_eq(&observed, &received), "the observer sees the very event delivered");
}

#[test]
fn a_full_subscriber_buffer_is_a_broadcast_error() {
    init_tracing();
    let cache = cache("full");
    let recorded = Recorded::new();
    let _streams = Streams::builder(&cache).buffer(2).observer(recorded.observer()).start().unwrap();
    let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();
    recorded.clear();
    for i in 0..5 {
        cache.put(format!("k{i}"), 1);
    }
    let seen = broadcasts(&recorded);
    let statuses: Vec<_> = seen.iter().map(|b| (b.0, b.1.clone())).collect();
    let full = Some(BroadcastError::SubscriberFull { capacity: 2 });
    assert_eq!(
        statuses,
        [
            (BroadcastStatus::Ok, None),
            (BroadcastStatus::Ok, None),
            (BroadcastStatus::Error, full.clone()),
            (BroadcastStatus::Error, full.clone()),
            (BroadcastStatus::Error, full),
        ]
    );
    assert!(seen.iter().all(|b| b.2 == "nbx:full"));
    assert_eq!(seen[2].3, Target::Key("k2".to_string()));
    let items = drain(&mut sub);
    assert_eq!(items.len(), 3);
    assert_eq!(items[2], Err(Lagged(3)));
}

// ----- metrics ---------------------------------------------------------------

#[cfg(feature = "metrics")]
mod with_metrics {
    use std::collections::HashMap;

    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
    use metrics_util::MetricKind;
    use nebulex::EventType;

    /// A key of `partition` out of `partitions`, by the default router.
    fn key_in(partition: u32, partitions: u32, nth: usize) -> String {
        (0..).map(|i| format!("key:{i}")).filter(|k| partition_of(k, partitions) == partition).nth(nth).unwrap()
    }

    /// Counter values by name and sorted labels.
    fn counters(snapshotter: &Snapshotter) -> HashMap<(String, Vec<(String, String)>), u64> {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.kind() == MetricKind::Counter)
            .map(|(key, _, _, value)| {
                let DebugValue::Counter(n) = value else { unreachable!() };
                let mut labels: Vec<_> =
                    key.key().labels().map(|l| (l.key().to_string(), l.value().to_string())).collect();
                labels.sort();
                ((key.key().name().to_string(), labels), n)
            })
            .collect()
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<_> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        v.sort();
        v
    }

    #[test]
    fn metrics_count_events_by_cache_partition_and_kind_and_lagged_events() {
        init_tracing();
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let cache = cache("metered");
        // The recorder is this thread's only: other tests do not see it. The
        // stream takes its handles at start.
        let streams = metrics::with_local_recorder(&recorder, || {
            Streams::builder(&cache).partitions(2).buffer(4).start().unwrap()
        });
        let mut p0 = cache.subscribe(SubscribeOptions::new().partition(0)).unwrap();
        let mut p1 = cache.subscribe(SubscribeOptions::new().partition(1)).unwrap();

        // Partition 0 keeps up: 10 inserts, 10 updates, 10 deletes.
        let k0 = key_in(0, 2, 0);
        for _ in 0..10 {
            cache.put(k0.clone(), 1);
            event(&mut p0);
            cache.put(k0.clone(), 2);
            event(&mut p0);
            cache.delete(&k0);
            event(&mut p0);
        }
        // Partition 1 stalls: 4 inserts delivered, 16 dropped.
        for i in 0..20 {
            cache.put(key_in(1, 2, i), 1);
        }
        let items = drain(&mut p1);
        assert_eq!(items.len(), 5);
        assert_eq!(items[4], Err(Lagged(16)));

        let c = counters(&snapshotter);
        let events = |p: &str, kind: EventType| {
            c[&(
                "nebulex_streams_events_total".to_string(),
                labels(&[("cache", "metered"), ("partition", p), ("kind", kind.as_str())]),
            )]
        };
        assert_eq!(events("0", EventType::Inserted), 10);
        assert_eq!(events("0", EventType::Updated), 10);
        assert_eq!(events("0", EventType::Deleted), 10);
        assert_eq!(events("0", EventType::Expired), 0);
        assert_eq!(events("1", EventType::Inserted), 4);
        assert_eq!(events("1", EventType::Deleted), 0);
        let lagged = |p: &str| {
            c[&("nebulex_streams_lagged_total".to_string(), labels(&[("cache", "metered"), ("partition", p)]))]
        };
        assert_eq!(lagged("0"), 0);
        assert_eq!(lagged("1"), 16);
        let errors = |reason: &str| {
            c[&(
                "nebulex_streams_broadcast_errors_total".to_string(),
                labels(&[("cache", "metered"), ("reason", reason)]),
            )]
        };
        assert_eq!(errors("subscriber_full"), 16);
        assert_eq!(errors("partition_out_of_range"), 0);
        streams.stop();
    }

    #[test]
    fn metrics_count_out_of_range_routes_as_broadcast_errors() {
        init_tracing();
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let cache = cache("misrouted");
        let _streams = metrics::with_local_recorder(&recorder, || {
            Streams::builder(&cache)
                .partitions(2)
                .hash(|e: &nebulex::CacheEntryEvent<String>| match &e.target {
                    Target::Key(k) if k.starts_with("bad:") => nebulex_streams::Route::Partition(7),
                    Target::Key(k) if k.starts_with("panic:") => panic!("a router that panics on {k}"),
                    _ => nebulex_streams::Route::Partition(0),
                })
                .start()
                .unwrap()
        });
        let mut sub = cache.subscribe(SubscribeOptions::new().partition(0)).unwrap();
        for i in 0..3 {
            cache.put(format!("bad:{i}"), 1);
        }
        cache.put("panic:0".to_string(), 1);
        cache.put("good".to_string(), 1);
        // What went nowhere might have been this partition's: one notice of
        // a loss of unknown size, before the next event.
        let items = drain(&mut sub);
        assert!(matches!(items[..], [Err(Lagged(0)), Ok(_)]), "{items:?}");

        let c = counters(&snapshotter);
        let errors = |reason: &str| {
            c[&(
                "nebulex_streams_broadcast_errors_total".to_string(),
                labels(&[("cache", "misrouted"), ("reason", reason)]),
            )]
        };
        assert_eq!(errors("partition_out_of_range"), 3);
        assert_eq!(errors("router_panicked"), 1);
        assert_eq!(errors("subscriber_full"), 0);
        let inserted = c[&(
            "nebulex_streams_events_total".to_string(),
            labels(&[("cache", "misrouted"), ("partition", "0"), ("kind", "inserted")]),
        )];
        assert_eq!(inserted, 1);
    }

    /// Events the outbound buffer could not take are counted as events
    /// (`outbound_full`), frames the transport could not publish as frames
    /// (`transport`): the same counts the observer hears.
    #[tokio::test(flavor = "current_thread")]
    async fn metrics_count_a_full_outbound_buffer_in_events_and_unpublished_frames_in_frames() {
        use std::sync::atomic::{AtomicU64, Ordering};

        use nebulex::NodeId;
        use nebulex_streams::PubSub;
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let bus = PubSub::memory();
        let memory = bus.as_memory().unwrap().clone();
        let a: Cache<String, u32> = Cache::builder().name("cut").node_id(NodeId(1)).build().unwrap();
        let (full, unpublished) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (f, u) = (full.clone(), unpublished.clone());
        let observer = move |t: &Telemetry<String>| match t {
            Telemetry::Broadcast { reason: Some(BroadcastError::Transport(_)), .. } => {
                f.fetch_add(1, Ordering::SeqCst);
            }
            Telemetry::PublishFailed { frames, .. } => {
                u.fetch_add(*frames as u64, Ordering::SeqCst);
            }
            _ => {}
        };
        let streams = metrics::with_local_recorder(&recorder, || {
            Streams::builder(&a).pubsub(bus.clone()).outbound_buffer(8).observer(observer).start().unwrap()
        });
        streams.ready().await.unwrap();
        memory.cut(NodeId(1));
        // On this one-thread runtime the sender cannot run during the burst:
        // the buffer keeps 8 events, and the other 92 are dropped.
        for i in 0..100 {
            a.put(format!("k{i}"), i);
        }
        assert_eq!(full.load(Ordering::SeqCst), 92);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while unpublished.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "the sender never tried to publish the 8");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }

        let c = counters(&snapshotter);
        let errors = |reason: &str| {
            c[&("nebulex_streams_broadcast_errors_total".to_string(), labels(&[("cache", "cut"), ("reason", reason)]))]
        };
        assert_eq!(errors("outbound_full"), 92, "events");
        assert_eq!(errors("transport"), unpublished.load(Ordering::SeqCst), "frames");
        assert_eq!(errors("subscriber_full"), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_count_invalidations_and_record_propagation() {
        use nebulex::NodeId;
        use nebulex_streams::{Invalidator, PubSub};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let bus = PubSub::memory();
        let a: Cache<String, u32> = Cache::builder().name("near").node_id(NodeId(1)).build().unwrap();
        let b: Cache<String, u32> = Cache::builder().name("near").node_id(NodeId(2)).build().unwrap();
        let sa = Streams::builder(&a).pubsub(bus.clone()).start().unwrap();
        let sb = metrics::with_local_recorder(&recorder, || Streams::builder(&b).pubsub(bus.clone()).start().unwrap());
        sa.ready().await.unwrap();
        sb.ready().await.unwrap();
        let _inv = Invalidator::builder(&sb).start().unwrap();
        for i in 0..5 {
            b.put(format!("k{i}"), 1);
        }
        for i in 0..5 {
            a.put(format!("k{i}"), 2);
        }
        // A snapshot drains counters and histograms: sum over every poll.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut removed: u64 = 0;
        let mut samples: Vec<f64> = Vec::new();
        loop {
            for (key, _, _, value) in snapshotter.snapshot().into_vec() {
                match value {
                    DebugValue::Counter(n) if key.key().name() == "nebulex_streams_invalidations_total" => removed += n,
                    DebugValue::Histogram(v) if key.key().name() == "nebulex_streams_propagation_seconds" => {
                        samples.extend(v.iter().map(|s| s.into_inner()));
                    }
                    _ => {}
                }
            }
            if removed >= 5 && samples.len() >= 5 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "removed {removed}, samples {samples:?}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!((removed, samples.len()), (5, 5), "each of A's writes removed B's copy: {samples:?}");
        assert!(samples.iter().all(|s| (0.0..10.0).contains(s)), "origin → applied, in seconds: {samples:?}");
        assert!(b.is_empty());
    }
}

// ----- tracing ---------------------------------------------------------------

/// `tracing` caches, per call site, whether anyone listens. A subscriber set
/// for one thread (`with_default`) while other tests' threads register the
/// same call sites can lose that race and never see their events. So this
/// binary installs one global subscriber before any test touches a stream
/// (each test calls [`init_tracing`] first), and the capture is per thread.
mod tracing_capture {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::OnceLock;

    use tracing::field::{Field, Visit};
    use tracing::{Level, Subscriber};
    use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

    #[derive(Debug, Clone)]
    pub(crate) struct Captured {
        pub(crate) level: Level,
        pub(crate) message: String,
        pub(crate) fields: HashMap<String, String>,
    }

    thread_local! {
        static CAPTURED: RefCell<Option<Vec<Captured>>> = const { RefCell::new(None) };
    }

    #[derive(Default)]
    struct Fields(HashMap<String, String>);

    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.insert(field.name().to_string(), format!("{value:?}"));
        }
    }

    /// Keeps the events of target `nebulex_streams` of the capturing threads.
    struct Capture;

    impl<S: Subscriber> Layer<S> for Capture {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            if event.metadata().target() != "nebulex_streams" {
                return;
            }
            CAPTURED.with(|captured| {
                if let Some(captured) = captured.borrow_mut().as_mut() {
                    let mut fields = Fields::default();
                    event.record(&mut fields);
                    let message = fields.0.remove("message").unwrap_or_default();
                    captured.push(Captured { level: *event.metadata().level(), message, fields: fields.0 });
                }
            });
        }
    }

    pub(crate) fn init() {
        static INIT: OnceLock<()> = OnceLock::new();
        INIT.get_or_init(|| {
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Capture))
                .expect("no other global subscriber in this test binary");
        });
    }

    /// The `nebulex_streams` events that `f` emitted on this thread.
    pub(crate) fn capture(f: impl FnOnce()) -> Vec<Captured> {
        init();
        CAPTURED.with(|c| *c.borrow_mut() = Some(Vec::new()));
        f();
        CAPTURED.with(|c| c.borrow_mut().take().unwrap_or_default())
    }
}

use tracing_capture::init as init_tracing;

#[test]
fn tracing_reports_lifecycle_broadcasts_and_a_subscriber_lagged_warning() {
    use tracing::Level;
    let captured = tracing_capture::capture(|| {
        let cache = cache("traced");
        let streams = Streams::builder(&cache).buffer(2).start().unwrap();
        let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();
        for i in 0..5 {
            cache.put(format!("k{i}"), 1);
        }
        assert_eq!(drain(&mut sub).last(), Some(&Err(Lagged(3))));
        streams.stop();
    });
    let find = |message: &str| captured.iter().filter(|c| c.message == message).cloned().collect::<Vec<_>>();

    let lagged = find("subscriber lagged");
    assert_eq!(lagged.len(), 1, "{captured:#?}");
    assert_eq!(lagged[0].level, Level::WARN);
    assert_eq!(lagged[0].fields["cache"], "traced");
    assert_eq!(lagged[0].fields["partition"], "0");
    assert_eq!(lagged[0].fields["missed"], "3");

    let registered = find("listener registered");
    assert_eq!(registered.len(), 1, "{captured:#?}");
    assert_eq!(registered[0].level, Level::DEBUG);
    assert_eq!(registered[0].fields["cache"], "traced");
    assert_eq!(find("listener unregistered").len(), 1, "{captured:#?}");

    let ok = find("broadcast");
    assert_eq!(ok.len(), 2, "{captured:#?}");
    assert!(ok.iter().all(|c| c.level == Level::TRACE && c.fields["topic"] == "nbx:traced"));
    assert_eq!(ok[0].fields["kind"], "inserted");
    let failed = find("broadcast failed");
    assert_eq!(failed.len(), 3, "{captured:#?}");
    assert!(failed.iter().all(|c| c.fields["reason"].contains("full")));
}

//! What application code does to a stream: a key's `Clone`, `Hash` or
//! `Drop` that panics, a logger or metrics recorder that panics, a runtime
//! that shuts down. The stream tells every loss, and carries on.
#![allow(clippy::unwrap_used)]

mod support;

mod keys {
    //! A key whose `Clone` or `Hash` panics as its event is routed: the event
    //! goes to no partition, and every reader that wants its type is told of a
    //! loss (`Lagged(0)`), as with a router that panics.

    use std::hash::{Hash, Hasher};
    use std::sync::atomic::{AtomicBool, Ordering};

    use nebulex::{Cache, Target};
    use nebulex_streams::{partition_of, Item, Streams, StreamsExt, SubscribeOptions};

    use super::support::drain;

    /// A key: `id` is what it is; `copy` marks a clone. While armed, cloning a
    /// clone of key 13 (`CLONE_BOMB`) or hashing one (`HASH_BOMB`) panics. The
    /// cache clones the caller's key once for the event; the stream then clones
    /// or hashes that copy.
    #[derive(Debug)]
    struct K {
        id: u64,
        copy: bool,
    }

    static CLONE_BOMB: AtomicBool = AtomicBool::new(false);
    static HASH_BOMB: AtomicBool = AtomicBool::new(false);

    impl K {
        fn new(id: u64) -> Self {
            K { id, copy: false }
        }
    }

    impl Clone for K {
        fn clone(&self) -> Self {
            if self.copy && self.id == 13 && CLONE_BOMB.load(Ordering::SeqCst) {
                panic!("Clone of key 13");
            }
            K { id: self.id, copy: true }
        }
    }

    impl PartialEq for K {
        fn eq(&self, other: &Self) -> bool {
            self.id == other.id
        }
    }
    impl Eq for K {}

    impl Hash for K {
        fn hash<H: Hasher>(&self, state: &mut H) {
            if self.copy && self.id == 13 && HASH_BOMB.load(Ordering::SeqCst) {
                panic!("Hash of key 13");
            }
            self.id.hash(state);
        }
    }

    fn describe(items: &[Item<K>]) -> Vec<String> {
        items
            .iter()
            .map(|i| match i {
                Ok(e) => match &e.target {
                    Target::Key(k) => format!("key {} (seq {})", k.id, e.metadata.seq),
                    other => format!("{other:?}"),
                },
                Err(l) => format!("{l:?}"),
            })
            .collect()
    }

    /// Unpartitioned stream, no router: the stream clones the event's key to
    /// hand it over. Key 13's clone panics: the subscriber must be told of a
    /// loss (as for a router's panic), not miss the event silently.
    #[test]
    fn a_key_whose_clone_panics_while_routed_is_a_loss_told_to_the_subscriber() {
        let cache: Cache<K, u32> = Cache::builder().name("clone-bomb").build().unwrap();
        let _streams = Streams::builder(&cache).start().unwrap();
        let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();
        cache.put(K::new(1), 1);
        CLONE_BOMB.store(true, Ordering::SeqCst);
        cache.put(K::new(13), 13); // the cache's clone succeeds; the stream's panics
        CLONE_BOMB.store(false, Ordering::SeqCst);
        cache.put(K::new(2), 2);
        assert!(cache.contains_key(&K::new(13)), "the write stands");

        let items = drain(&mut sub);
        let seen = describe(&items);
        let lagged = items.iter().any(|i| i.is_err());
        let events = items.iter().filter(|i| i.is_ok()).count();
        assert!(
            lagged,
            "3 events were published, {events} received and no Lagged notice: silent loss. items: {seen:?}"
        );
    }

    /// Partitioned stream, default router: the stream hashes the event's key
    /// with `StableHasher`. Key 13's hash panics: its partition's subscriber
    /// (whichever it is) must be told of a loss.
    #[test]
    fn a_key_whose_hash_panics_while_routed_is_a_loss_told_to_the_subscribers() {
        let cache: Cache<K, u32> = Cache::builder().name("hash-bomb").build().unwrap();
        let _streams = Streams::builder(&cache).partitions(2).start().unwrap();
        let home = partition_of(&K::new(13), 2);
        let mut sub = cache.subscribe(SubscribeOptions::new().partition(home)).unwrap();
        HASH_BOMB.store(true, Ordering::SeqCst);
        cache.put(K::new(13), 13);
        HASH_BOMB.store(false, Ordering::SeqCst);
        assert!(cache.contains_key(&K::new(13)), "the write stands");
        // One more event of the same partition, to show the stream still works.
        let other = (100..).map(K::new).find(|k| partition_of(k, 2) == home).unwrap();
        cache.put(other, 0);

        let items = drain(&mut sub);
        let seen = describe(&items);
        assert!(
            items.iter().any(|i| i.is_err()),
            "key 13's event reached partition {home}'s subscriber neither as an event nor as a Lagged notice: {seen:?}"
        );
    }
}

mod drops {
    //! A key whose `Drop` panics in the stream's own tasks (the cluster sender,
    //! an invalidator's worker) ends neither.

    use std::hash::{Hash, Hasher};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use nebulex::{Cache, NodeId, Target};
    use nebulex_streams::{
        EventScope, Invalidator, InvalidatorEvent, Item, PubSub, Streams, StreamsExt, SubscribeOptions, Subscription,
        Telemetry,
    };
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    const PATIENCE: Duration = Duration::from_secs(10);

    /// While set, dropping a *decoded* (received from another node) key named
    /// "boom" panics.
    static DECODED_BOMB: AtomicBool = AtomicBool::new(false);
    /// While set, dropping the stream's copy of an event's key (a clone of the
    /// cache's clone) of a local key named "boom-out" panics.
    static COPY_BOMB: AtomicBool = AtomicBool::new(false);

    #[derive(Debug)]
    struct D {
        name: String,
        /// 0: the caller's key; 1: the cache's copy for the event; 2: the
        /// stream's copy of that.
        gen: u8,
        decoded: bool,
    }

    fn d(name: &str) -> D {
        D { name: name.to_owned(), gen: 0, decoded: false }
    }

    impl Clone for D {
        fn clone(&self) -> Self {
            D { name: self.name.clone(), gen: self.gen.saturating_add(1), decoded: self.decoded }
        }
    }

    impl Drop for D {
        fn drop(&mut self) {
            if std::thread::panicking() {
                return;
            }
            if self.decoded && self.name == "boom" && DECODED_BOMB.swap(false, Ordering::SeqCst) {
                panic!("Drop of a decoded key `boom`");
            }
            if self.gen >= 2 && !self.decoded && self.name == "boom-out" && COPY_BOMB.swap(false, Ordering::SeqCst) {
                panic!("Drop of an event's copy of `boom-out`");
            }
        }
    }

    impl PartialEq for D {
        fn eq(&self, other: &Self) -> bool {
            self.name == other.name
        }
    }
    impl Eq for D {}
    impl Hash for D {
        fn hash<H: Hasher>(&self, state: &mut H) {
            self.name.hash(state);
        }
    }
    impl Serialize for D {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&self.name)
        }
    }
    impl<'de> Deserialize<'de> for D {
        fn deserialize<De: Deserializer<'de>>(de: De) -> Result<Self, De::Error> {
            let name = String::deserialize(de)?;
            Ok(D { name, gen: 0, decoded: true })
        }
    }

    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while tokio::time::Instant::now() < deadline {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        eprintln!("not in time: {what}");
        false
    }

    fn node(id: u64) -> Cache<D, u32> {
        Cache::builder().name("drops").node_id(NodeId(id)).build().unwrap()
    }

    /// B's invalidator receives A's change of "boom"; the decoded key's `Drop`
    /// panics in B's worker after the change is applied. The worker outlives
    /// it: B's copy of a key A changes afterwards goes too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_whose_drop_panics_in_an_invalidator_worker_does_not_end_it() {
        let bus = PubSub::memory();
        let (a, b) = (node(1), node(2));
        let sa = Streams::builder(&a).pubsub(bus.clone()).start().unwrap();
        let invalidations = Arc::new(AtomicUsize::new(0));
        let count = invalidations.clone();
        let sb = Streams::builder(&b)
            .pubsub(bus.clone())
            .observer(move |t: &Telemetry<D>| {
                if let Telemetry::Invalidator { event: InvalidatorEvent::Invalidate { .. }, .. } = t {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            })
            .start()
            .unwrap();
        tokio::time::timeout(PATIENCE, sa.ready()).await.unwrap().unwrap();
        tokio::time::timeout(PATIENCE, sb.ready()).await.unwrap().unwrap();
        let invalidator = Invalidator::builder(&sb).scope(EventScope::Remote).start().unwrap();

        // Works before.
        b.put(d("before"), 1);
        a.put(d("before"), 2);
        assert!(eventually("B's copy of `before` is invalidated", || !b.contains_key(&d("before"))).await);

        DECODED_BOMB.store(true, Ordering::SeqCst);
        let before = invalidations.load(Ordering::SeqCst);
        a.put(d("boom"), 1);
        assert!(eventually("B applies `boom`", || invalidations.load(Ordering::SeqCst) > before).await);
        assert!(eventually("the Drop bomb went off", || !DECODED_BOMB.load(Ordering::SeqCst)).await);

        // A later change on A must still remove B's copy.
        b.put(d("after"), 1);
        a.put(d("after"), 2);
        let removed = eventually("B's copy of `after` is invalidated", || !b.contains_key(&d("after"))).await;
        assert!(
            removed,
            "B still serves its stale copy of `after` {PATIENCE:?} after A changed it: the invalidator's worker died \
             (is_stopped = {}, connected = {:?})",
            invalidator.is_stopped(),
            sb.info().connected
        );
    }

    async fn next(sub: &mut Subscription<D>, within: Duration) -> Option<Item<D>> {
        tokio::time::timeout(within, sub.recv()).await.ok().flatten()
    }

    fn name(item: &Item<D>) -> String {
        match item {
            Ok(e) => match &e.target {
                Target::Key(k) => k.name.clone(),
                other => format!("{other:?}"),
            },
            Err(l) => format!("{l:?}"),
        }
    }

    /// A's event of "boom-out" goes only to A's outbound buffer; its key's
    /// `Drop` panics in A's sender task once the frame is made. The frame is
    /// sent, and A's next events after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_whose_drop_panics_in_the_sender_task_does_not_mute_the_node() {
        let bus = PubSub::memory();
        let (a, b) = (node(1), node(2));
        let start = |c: &Cache<D, u32>| {
            Streams::builder(c).pubsub(bus.clone()).heartbeat(Duration::from_millis(50)).start().unwrap()
        };
        let (sa, sb) = (start(&a), start(&b));
        tokio::time::timeout(PATIENCE, sa.ready()).await.unwrap().unwrap();
        tokio::time::timeout(PATIENCE, sb.ready()).await.unwrap().unwrap();
        let mut on_b = b.subscribe(SubscribeOptions::new().scope(EventScope::Remote)).unwrap();

        a.put(d("first"), 1);
        let first = next(&mut on_b, PATIENCE).await.expect("first");
        assert_eq!(name(&first), "first");

        COPY_BOMB.store(true, Ordering::SeqCst);
        a.put(d("boom-out"), 1);
        assert!(eventually("the Drop bomb went off", || !COPY_BOMB.load(Ordering::SeqCst)).await);

        a.put(d("second"), 2);
        let mut items = Vec::new();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while tokio::time::Instant::now() < deadline {
            if let Some(item) = next(&mut on_b, Duration::from_millis(200)).await {
                let n = name(&item);
                items.push(n.clone());
                if n == "second" {
                    break;
                }
            }
        }
        assert!(
            items.iter().any(|n| n == "second"),
            "B never received A's `second` (items: {items:?}); A connected = {:?}",
            sa.info().connected
        );
    }
}

#[cfg(feature = "metrics")]
mod reporting {
    //! The application's logger (`tracing`) and metrics recorder are called from
    //! the event path: a panic in them is caught where the report is made, after
    //! the readers were told, and loses nothing.

    use super::support::{drain, Panicking};
    use nebulex::{Cache, Query, Target};
    use nebulex_streams::{Item, Lagged, Route, Streams, StreamsExt, SubscribeOptions, TryRecvError};

    fn describe(items: &[Item<String>]) -> Vec<String> {
        items
            .iter()
            .map(|i| match i {
                Ok(e) => format!("{:?} {:?}", e.kind, e.target),
                Err(l) => format!("{l:?}"),
            })
            .collect()
    }

    /// A recorder whose `nebulex_streams_events_total` counter panics. A
    /// `delete_all` (target `All`) goes to every partition; the count of
    /// partition 0's delivery panics, and partition 1 never gets the event nor a
    /// loss notice. (An invalidator of partition 1 would keep what was deleted.)
    #[test]
    fn a_recorder_that_panics_on_one_partition_lets_a_delete_all_reach_the_others() {
        let cache: Cache<String, u32> = Cache::builder().name("recorder-events").build().unwrap();
        let recorder = Panicking::new("nebulex_streams_events_total", None);
        let _streams =
            metrics::with_local_recorder(&recorder, || Streams::builder(&cache).partitions(2).start().unwrap());
        let mut p0 = cache.subscribe(SubscribeOptions::new().partition(0)).unwrap();
        let mut p1 = cache.subscribe(SubscribeOptions::new().partition(1)).unwrap();

        cache.delete_all(Query::All); // the cache catches the recorder's panic: the call returns

        let (got0, got1) = (drain(&mut p0), drain(&mut p1));
        assert!(matches!(&got0[..], [Ok(e)] if e.target == Target::All), "{:?}", describe(&got0));
        assert!(
            !got1.is_empty(),
            "partition 1's subscriber got neither the delete-all event nor a Lagged notice (partition 0 got {:?})",
            describe(&got0)
        );
    }

    /// A router that panics is told to readers as `Lagged(0)` (`panics.rs`),
    /// unless the application's logger panics on the error the stream logs
    /// first: then no reader is told anything.
    #[test]
    fn a_logger_that_panics_on_a_router_panic_lets_the_loss_be_told() {
        use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
        /// Panics on every `error` event.
        struct PanicOnError;
        impl<S: tracing::Subscriber> Layer<S> for PanicOnError {
            fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
                if *event.metadata().level() == tracing::Level::ERROR {
                    panic!("logger bug");
                }
            }
        }
        let cache: Cache<String, u32> = Cache::builder().name("logger-router").build().unwrap();
        let _streams = Streams::builder(&cache)
            .partitions(2)
            .hash(|e| match &e.target {
                Target::Key(k) if k.starts_with("bad") => panic!("router bug on {k}"),
                _ => Route::Partition(1),
            })
            .start()
            .unwrap();
        let mut sub = cache.subscribe(SubscribeOptions::new().partition(1)).unwrap();
        tracing::subscriber::with_default(tracing_subscriber::registry().with(PanicOnError), || {
            cache.put("bad:1".to_string(), 1);
        });
        cache.put("user:1".to_string(), 2);
        assert_eq!(cache.len(), 2);

        let items = drain(&mut sub);
        assert_eq!(
            items.first().and_then(|i| i.as_ref().err()).copied(),
            Some(Lagged(0)),
            "the router's failure was not told as a loss: {:?}",
            describe(&items)
        );
    }

    /// A recorder whose `nebulex_streams_lagged_total` counter panics: the
    /// receive that takes a `Lagged` notice panics while reporting it, after
    /// the notice was taken from the buffer. The notice is gone: the subscriber,
    /// carrying on, counts fewer events than were published.
    #[test]
    fn a_recorder_that_panics_as_a_lag_is_reported_hands_over_the_notice() {
        let cache: Cache<u64, u64> = Cache::builder().name("recorder-lagged").build().unwrap();
        let recorder = Panicking::new("nebulex_streams_lagged_total", None);
        let _streams = metrics::with_local_recorder(&recorder, || Streams::builder(&cache).buffer(1).start().unwrap());
        let mut sub = cache.subscribe(SubscribeOptions::new()).unwrap();
        for i in 0..3 {
            cache.put(i, i); // the buffer holds the first; the other two are dropped
        }
        let (mut received, mut missed, mut panics) = (0u64, 0u64, 0);
        for _ in 0..4 {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sub.try_recv())) {
                Ok(Ok(_)) => received += 1,
                Ok(Err(TryRecvError::Lagged(n))) => missed += n,
                Ok(Err(_)) => {}
                Err(_) => panics += 1,
            }
        }
        assert_eq!(
            received + missed,
            3,
            "3 events published; received {received}, told of {missed} missed (receives that panicked: {panics})"
        );
    }
}

mod runtime {
    //! The runtime a clustered stream was started on shuts down while the stream
    //! lives: the node says its link is down, and its readers are told of the
    //! loss.

    use std::time::{Duration, Instant};

    use nebulex::{Cache, NodeId};
    use nebulex_streams::{EventScope, PubSub, Streams, StreamsExt, SubscribeOptions, TryRecvError};

    const PATIENCE: Duration = Duration::from_secs(5);

    fn node(id: u64) -> Cache<String, u32> {
        Cache::builder().name("rt").node_id(NodeId(id)).build().unwrap()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
    }

    #[test]
    fn a_node_whose_runtime_shut_down_says_its_link_is_down_and_tells_the_loss() {
        let bus = PubSub::memory();
        let (rt_a, rt_b) = (runtime(), runtime());
        let (a, b) = (node(1), node(2));
        let start = |rt: &tokio::runtime::Runtime, c: &Cache<String, u32>| {
            let _in = rt.enter();
            let s = Streams::builder(c).pubsub(bus.clone()).heartbeat(Duration::from_millis(50)).start().unwrap();
            rt.block_on(async { tokio::time::timeout(PATIENCE, s.ready()).await.unwrap().unwrap() });
            s
        };
        let sa = start(&rt_a, &a);
        let _sb = start(&rt_b, &b);
        let mut on_a = a.subscribe(SubscribeOptions::new().scope(EventScope::Remote)).unwrap();

        let wait_item = |sub: &mut nebulex_streams::Subscription<String>| {
            let deadline = Instant::now() + PATIENCE;
            loop {
                match sub.try_recv() {
                    Err(TryRecvError::Empty) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    other => return other,
                }
            }
        };
        b.put("before".into(), 1);
        assert!(matches!(wait_item(&mut on_a), Ok(e) if e.target == nebulex::Target::Key("before".into())));

        // A's runtime goes (say, a runtime made for start-up, then dropped).
        drop(rt_a);

        b.put("after".into(), 2);
        let got = wait_item(&mut on_a);
        assert!(
            !matches!(got, Err(TryRecvError::Empty)),
            "A's remote subscriber got neither B's `after` nor a Lagged notice within {PATIENCE:?}; \
             A says connected = {:?}, stopped = {}",
            sa.info().connected,
            sa.is_stopped()
        );
    }
}

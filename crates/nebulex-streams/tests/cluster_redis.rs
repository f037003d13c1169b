//! Nodes over a real, throwaway `redis-server`: events cross with keys intact
//! and per-key order kept, connections killed mid-stream and a full server
//! restart show up as `Lagged` and then events flow again, and garbage or
//! forged frames are refused and counted while real traffic continues.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nebulex::{EventType, NodeId, Target};
use nebulex_streams::wire::{encode, FrameHeader};
use nebulex_streams::{partition_of, Lagged, PubSub, Streams, StreamsExt, SubscribeOptions, Telemetry, TryRecvError};
use nebulex_testkit::RedisServer;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_exchange_events_in_per_key_order() {
    let redis = RedisServer::start().expect("redis-server");
    let pubsub = PubSub::redis(redis.url());
    let nodes: Vec<_> = (1..=3).map(|i| node("users", i)).collect();
    let mut streams = Vec::new();
    for n in &nodes {
        streams.push(start(n, &pubsub, 2).await);
    }
    let mut subs: Vec<Vec<_>> = nodes
        .iter()
        .map(|n| (0..2).map(|p| n.subscribe(SubscribeOptions::new().partition(p)).unwrap()).collect())
        .collect();

    // Each node writes its own keys and a shared one.
    for round in 0..50u32 {
        for (i, n) in nodes.iter().enumerate() {
            n.put(format!("node{i}:{}", round % 5), round);
            if round % 10 == 9 {
                n.delete(&format!("node{i}:{}", round % 5));
            }
        }
    }
    let writes_per_node = 50 + 5;
    for (receiver, node_subs) in subs.iter_mut().enumerate() {
        // Per origin and key: the versions seen, in arrival order.
        let mut versions: HashMap<(NodeId, String), Vec<u64>> = HashMap::new();
        let mut count = 0;
        let deadline = std::time::Instant::now() + PATIENCE;
        while count < writes_per_node * 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "node {receiver} got {count} of {} events in time",
                writes_per_node * 3
            );
            for sub in node_subs.iter_mut() {
                loop {
                    let e = match sub.try_recv() {
                        Ok(e) => e,
                        Err(TryRecvError::Lagged(n)) => panic!("node {receiver} lagged by {n} after {count} events"),
                        Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                    };
                    let Target::Key(k) = &e.target else { panic!("single-key events only") };
                    assert_eq!(partition_of(k, 2), sub.partition(), "key routed to its partition");
                    versions.entry((e.metadata.node, k.clone())).or_default().push(e.version);
                    count += 1;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(count, writes_per_node * 3, "node {receiver} got every event exactly once");
        for ((origin, key), vs) in versions {
            assert!(vs.windows(2).all(|w| w[0] < w[1]), "per-key order from {origin:?} for {key}: {vs:?}");
        }
    }
    drop(streams);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pubsub_connections_and_a_restart_are_gaps_then_events_flow() {
    let mut redis = RedisServer::start().expect("redis-server");
    let pubsub = PubSub::redis(redis.url());
    let (a, b) = (node("orders", 1), node("orders", 2));
    let _sa = start(&a, &pubsub, 1).await;
    let _sb = start(&b, &pubsub, 1).await;
    let mut on_b = b.subscribe(SubscribeOptions::new()).unwrap();
    until_flowing(&a, &mut on_b, "warmup").await;

    // CLIENT KILL TYPE pubsub: B's subscriber connection is gone.
    assert!(redis.kill_pubsub_clients().expect("kill") >= 1);
    let before = until_flowing(&a, &mut on_b, "after-kill").await;
    assert!(before.iter().any(|i| i.is_err()), "a Lagged notice before events flow again: {before:?}");

    // A full restart: both connections of both nodes are lost.
    redis.restart().expect("restart");
    let before = until_flowing(&a, &mut on_b, "after-restart").await;
    assert!(before.iter().any(|i| i.is_err()), "a Lagged notice after the restart: {before:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_hangs_without_closing_is_a_gap_then_events_flow() {
    let redis = RedisServer::start().expect("redis-server");
    let pubsub = PubSub::redis(redis.url());
    let fast = |c| Streams::builder(c).pubsub(pubsub.clone()).heartbeat(Duration::from_millis(50));
    // Alone on the server: no other node whose silence could tell the loss.
    let a = node("users", 1);
    let sa = fast(&a).start().expect("start a");
    tokio::time::timeout(PATIENCE, sa.ready()).await.expect("ready in time").expect("ready");
    let mut on_a = a.subscribe(SubscribeOptions::new()).unwrap();
    // Frozen, the server keeps every connection open and answers nothing.
    redis.freeze().expect("freeze");
    let lost = tokio::time::timeout(PATIENCE, on_a.recv()).await;
    redis.thaw().expect("thaw");
    assert!(matches!(lost, Ok(Some(Err(Lagged(0))))), "the hung connection, told: {lost:?}");
    let back = next(&mut on_a).await;
    assert_eq!(back.unwrap_err(), Lagged(0), "the connection made again, told");
    let b = node("users", 2);
    let _sb = fast(&b).start().expect("start b");
    until_flowing(&b, &mut on_a, "after-the-hang").await;
}

/// The Redis client queues what the server sends without bound: a node that
/// handles frames slower than they come falls behind for good, its queue
/// growing. Once its own frames come back more than 10 s late, it makes its
/// subscription again (the queue goes with it) and tells a loss of unknown
/// size. Here every frame it refuses takes it 50 ms (its observer sleeps),
/// and 240 of them come at once: 12 s of work, ahead of its own heartbeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_falls_far_behind_the_server_reconnects_and_tells_a_loss() {
    let redis = RedisServer::start().expect("redis-server");
    let links_lost = Arc::new(Mutex::new(0));
    let lost = links_lost.clone();
    let a = node("users", 1);
    let sa = Streams::builder(&a)
        .pubsub(PubSub::redis(redis.url()))
        .heartbeat(Duration::from_millis(100))
        .observer(move |t| match t {
            Telemetry::FrameRejected { .. } => std::thread::sleep(Duration::from_millis(50)),
            Telemetry::Gap { origin: None, .. } => *lost.lock().unwrap() += 1,
            _ => {}
        })
        .start()
        .unwrap();
    tokio::time::timeout(PATIENCE, sa.ready()).await.expect("ready in time").expect("ready");
    for _ in 0..240 {
        redis.command(&[b"PUBLISH", b"nbx:users", b"\x01\x00garbage"]).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while *links_lost.lock().unwrap() == 0 {
        assert!(std::time::Instant::now() < deadline, "the node never caught up, nor said it could not");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Connected again: events flow.
    let mut on_a = a.subscribe(SubscribeOptions::new()).unwrap();
    let b = node("users", 2);
    let _sb = Streams::builder(&b).pubsub(PubSub::redis(redis.url())).start().unwrap();
    until_flowing(&b, &mut on_a, "after-catching-up").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_forged_frames_are_rejected_and_counted() {
    let redis = RedisServer::start().expect("redis-server");
    let pubsub = PubSub::redis(redis.url());
    let a = node("carts", 1);
    let b = node("carts", 2);
    let _sa = Streams::builder(&a).pubsub(pubsub.clone()).signing_key("k3y").start().unwrap();
    _sa.ready().await.unwrap();
    let rejected = Arc::new(Mutex::new(Vec::new()));
    let seen = rejected.clone();
    let _sb = Streams::builder(&b)
        .pubsub(pubsub.clone())
        .signing_key("k3y")
        .observer(move |t| {
            if let Telemetry::FrameRejected { reason, .. } = t {
                seen.lock().unwrap().push(reason.label());
            }
        })
        .start()
        .unwrap();
    _sb.ready().await.unwrap();
    let mut on_b = b.subscribe(SubscribeOptions::new()).unwrap();

    let channel = b"nbx:carts";
    let header = FrameHeader {
        origin: NodeId(66),
        epoch: 1,
        cache: "carts".into(),
        partition: 0,
        partitions: 0,
        first_seq: 1,
        sent_at_us: 0,
        last: false,
    };
    let forged_event = Arc::new(nebulex::CacheEntryEvent {
        cache: nebulex::Name::new("carts"),
        kind: EventType::Deleted,
        target: Target::All,
        command: nebulex::Command::DeleteAll,
        version: 1,
        metadata: nebulex::EventMetadata {
            node: NodeId(66),
            partition: None,
            partitions: None,
            topic: None,
            seq: 1,
            timestamp: std::time::SystemTime::now(),
        },
    });
    let unsigned = encode::<String>(&header, std::slice::from_ref(&forged_event), None).unwrap();
    let wrong_key = encode::<String>(&header, &[forged_event], Some(b"guess")).unwrap();
    let garbage: Vec<u8> = (0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    for payload in [&garbage[..], &[1u8][..], &unsigned[..], &wrong_key[..], &[9u8, 0, 0][..]] {
        let reply = redis.command(&[b"PUBLISH", channel, payload]).unwrap();
        assert_eq!(reply, ":2", "both nodes subscribed");
    }
    // Real traffic still flows, and nothing forged got through.
    a.put("cart:1".into(), 1);
    let e = next(&mut on_b).await.unwrap();
    assert_eq!((e.metadata.node, &e.target), (NodeId(1), &Target::Key("cart:1".to_string())));
    let deadline = std::time::Instant::now() + PATIENCE;
    while rejected.lock().unwrap().len() < 5 {
        assert!(std::time::Instant::now() < deadline, "rejections: {:?}", rejected.lock().unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let mut labels = rejected.lock().unwrap().clone();
    labels.sort();
    assert_eq!(labels, ["bad_signature", "truncated", "unsigned", "version", "version"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_fails_ready_and_a_bad_url_fails_start() {
    let port = nebulex_testkit::free_port().unwrap();
    let a = node("x", 1);
    let s = Streams::builder(&a).pubsub(PubSub::redis(format!("redis://127.0.0.1:{port}/"))).start().unwrap();
    let err = tokio::time::timeout(PATIENCE, s.ready()).await.expect("answer in time").unwrap_err();
    assert!(matches!(err, nebulex_streams::Error::Transport(_)), "{err}");
    s.stop();
    let err = Streams::builder(&a).pubsub(PubSub::redis("not a url")).start().unwrap_err();
    assert!(matches!(err, nebulex_streams::Error::Transport(_)), "{err}");
}

// One thread: the sender task cannot run between the writes and the drop,
// so everything is still buffered when the stream stops.
#[tokio::test(flavor = "current_thread")]
async fn a_cache_dropped_right_after_its_writes_still_sends_them() {
    let redis = RedisServer::start().expect("redis-server");
    let pubsub = PubSub::redis(redis.url());
    let (a, b) = (node("users", 1), node("users", 2));
    let sa = start(&a, &pubsub, 2).await;
    let _sb = start(&b, &pubsub, 2).await;
    let on_b: Vec<_> = (0..2).map(|p| b.subscribe(SubscribeOptions::new().partition(p)).unwrap()).collect();
    const N: usize = 5_000;
    for i in 0..N {
        a.put(format!("user:{i}"), 1);
    }
    // Dropping the cache stops its stream; no handle is left to wait on.
    drop((sa, a));
    receive_all(on_b, N).await;
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_exchange_events_over_tls_and_an_untrusted_certificate_fails_ready() {
    let redis = RedisServer::start_tls().expect("redis-server with TLS");
    let tls_url = redis.tls_url().expect("a TLS port");
    let pubsub = PubSub::redis(tls_url.clone());
    let (a, b) = (node("users", 1), node("users", 2));
    let _sa = start(&a, &pubsub, 2).await;
    let _sb = start(&b, &pubsub, 2).await;
    let on_b: Vec<_> = (0..2).map(|p| b.subscribe(SubscribeOptions::new().partition(p)).unwrap()).collect();
    const N: usize = 200;
    for i in 0..N {
        a.put(format!("user:{i}"), 1);
    }
    receive_all(on_b, N).await;

    // The certificate is checked unless the URL says `#insecure`: a
    // self-signed one is refused, and plain text to the TLS port gets nowhere.
    let port = tls_url.trim_start_matches("rediss://127.0.0.1:").split('/').next().unwrap().to_owned();
    for url in [format!("rediss://127.0.0.1:{port}/"), format!("redis://127.0.0.1:{port}/")] {
        let c = node("users", 3);
        let s = Streams::builder(&c).pubsub(PubSub::redis(url.clone())).start().unwrap();
        let err = tokio::time::timeout(PATIENCE, s.ready()).await.expect("answer in time").unwrap_err();
        assert!(matches!(err, nebulex_streams::Error::Transport(_)), "{url}: {err}");
    }
}

/// A node that shuts its stream down and exits at once: its last events and
/// its last frames reach the other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_shuts_down_and_exits_at_once_delivers_its_last_events() {
    let redis = RedisServer::start().expect("redis-server");
    a_node_that_shuts_down_and_exits_delivers_its_last_events(PubSub::redis(redis.url())).await;
}

/// A node ends a connection whose queue its own frames say is far behind:
/// frames that anyone may publish with its id, sent long ago (a replay, or
/// forged), do not make it drop a sound connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_that_only_claim_to_be_a_nodes_own_do_not_make_it_reconnect() {
    let redis = RedisServer::start().expect("redis-server");
    let pubsub = PubSub::redis(redis.url());
    let (a, b) = (node("carts", 1), node("carts", 2));
    let _sa = Streams::builder(&a).pubsub(pubsub.clone()).signing_key("k3y").start().unwrap();
    let sb = Streams::builder(&b).pubsub(pubsub).signing_key("k3y").start().unwrap();
    tokio::time::timeout(PATIENCE, sb.ready()).await.expect("ready in time").unwrap();
    let mut on_b = b.subscribe(SubscribeOptions::new()).unwrap();
    until_flowing(&a, &mut on_b, "before").await;
    let none: &[Arc<nebulex::CacheEntryEvent<String>>] = &[];
    let an_hour = 3_600_000_000;
    let now = nebulex_streams::wire::unix_micros(std::time::SystemTime::now());
    for sent_at_us in [1, now - an_hour, now + an_hour, now - an_hour / 2] {
        let header = FrameHeader {
            origin: NodeId(2),
            epoch: 1,
            cache: "carts".into(),
            partition: 0,
            partitions: 0,
            first_seq: 1,
            sent_at_us,
            last: false,
        };
        redis.command(&[b"PUBLISH", b"nbx:carts", &encode::<String>(&header, none, None).unwrap()]).unwrap();
    }
    a.put("after".into(), 1);
    let item = next(&mut on_b).await.map(|e| e.target.clone());
    assert_eq!(item, Ok(Target::Key("after".to_string())), "B's connection was not dropped");
}

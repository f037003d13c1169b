//! Nodes over a real, throwaway `nats-server`: events cross with keys intact
//! and per-key order kept, a server restart shows up as `Lagged` and then
//! events flow again, and garbage frames are refused while traffic continues.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nebulex::{NodeId, Target};
use nebulex_streams::{PubSub, Streams, StreamsExt, SubscribeOptions, Telemetry};
use nebulex_testkit::NatsServer;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_events_in_per_key_order() {
    let nats = NatsServer::start().expect("nats-server");
    let pubsub = PubSub::nats(nats.url());
    let (a, b) = (node("users", 1), node("users", 2));
    let _sa = start(&a, &pubsub, 4).await;
    let _sb = start(&b, &pubsub, 4).await;
    let p = nebulex_streams::partition_of("user:7", 4);
    let mut on_b = b.subscribe(SubscribeOptions::new().partition(p)).unwrap();

    for v in 0..100 {
        a.put("user:7".into(), v);
    }
    a.delete("user:7");
    let mut last = 0;
    for i in 0..101 {
        let e = next(&mut on_b).await.unwrap();
        assert_eq!((e.metadata.node, &e.target), (NodeId(1), &Target::Key("user:7".to_string())));
        assert!(e.version > last, "versions increase");
        last = e.version;
        assert_eq!(e.metadata.partition, Some(p));
        if i == 100 {
            assert_eq!(e.kind, nebulex::EventType::Deleted);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_each_see_the_two_others_events_in_order() {
    let nats = NatsServer::start().expect("nats-server");
    let pubsub = PubSub::nats(nats.url());
    let nodes: Vec<_> = (1..=3).map(|i| node("users", i)).collect();
    let mut streams = Vec::new();
    for n in &nodes {
        streams.push(start(n, &pubsub, 1).await);
    }
    let mut subs: Vec<_> = nodes
        .iter()
        .map(|n| n.subscribe(SubscribeOptions::new().scope(nebulex_streams::EventScope::Remote)).unwrap())
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        for v in 0..20 {
            n.put(format!("node{i}"), v);
        }
    }
    for (receiver, sub) in subs.iter_mut().enumerate() {
        let mut last: std::collections::HashMap<NodeId, u64> = std::collections::HashMap::new();
        for _ in 0..40 {
            let e = next(sub).await.unwrap();
            assert_ne!(e.metadata.node, NodeId(receiver as u64 + 1), "remote events only");
            let Target::Key(k) = &e.target else { panic!("single-key events") };
            assert_eq!(k, &format!("node{}", e.metadata.node.0 - 1), "keys intact");
            let prev = last.insert(e.metadata.node, e.version).unwrap_or(0);
            assert!(e.version > prev, "per-key order from each origin");
        }
    }
    drop(streams);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_is_a_gap_then_events_flow() {
    let mut nats = NatsServer::start().expect("nats-server");
    let pubsub = PubSub::nats(nats.url());
    let (a, b) = (node("orders", 1), node("orders", 2));
    let _sa = start(&a, &pubsub, 1).await;
    let _sb = start(&b, &pubsub, 1).await;
    let mut on_b = b.subscribe(SubscribeOptions::new()).unwrap();
    until_flowing(&a, &mut on_b, "warmup").await;

    nats.restart().expect("restart");
    let before = until_flowing(&a, &mut on_b, "after-restart").await;
    assert!(before.iter().any(|i| i.is_err()), "a Lagged notice after the restart: {before:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_are_rejected_while_traffic_flows() {
    let nats = NatsServer::start().expect("nats-server");
    let pubsub = PubSub::nats(nats.url());
    let (a, b) = (node("carts", 1), node("carts", 2));
    let _sa = start(&a, &pubsub, 1).await;
    let rejected = Arc::new(Mutex::new(Vec::new()));
    let seen = rejected.clone();
    let sb = Streams::builder(&b)
        .partitions(1)
        .pubsub(pubsub.clone())
        .observer(move |t| {
            if let Telemetry::FrameRejected { reason, .. } = t {
                seen.lock().unwrap().push(reason.label());
            }
        })
        .start()
        .unwrap();
    sb.ready().await.unwrap();
    let mut on_b = b.subscribe(SubscribeOptions::new()).unwrap();

    nats.publish("nbx:carts:0", b"\x01\x00\xc1garbage").unwrap();
    nats.publish("nbx:carts:0", b"").unwrap();
    a.put("cart:1".into(), 1);
    let e = next(&mut on_b).await.unwrap();
    assert_eq!(e.target, Target::Key("cart:1".to_string()));
    let deadline = std::time::Instant::now() + PATIENCE;
    while rejected.lock().unwrap().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "rejections: {:?}", rejected.lock().unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let mut labels = rejected.lock().unwrap().clone();
    labels.sort();
    assert_eq!(labels, ["malformed", "truncated"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_fails_ready_then_a_server_that_comes_up_is_joined() {
    let nats = NatsServer::start().expect("nats-server");
    let port = nats.port();
    let mut nats = nats;
    nats.stop();
    let a = node("x", 1);
    let s = Streams::builder(&a).pubsub(PubSub::nats(format!("nats://127.0.0.1:{port}"))).start().unwrap();
    let err = tokio::time::timeout(PATIENCE, s.ready()).await.expect("answer in time").unwrap_err();
    assert!(matches!(err, nebulex_streams::Error::Transport(_)), "{err}");
    // The link keeps trying: once the server is back, `ready` turns Ok.
    nats.restart().expect("nats-server back");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while s.ready().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "not joined within {PATIENCE:?} of the server's start");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    s.stop();
}

/// A link whose server never answers keeps trying while its stream runs, and
/// stops trying once the stream is shut down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shut_down_stream_stops_trying_an_unreachable_server() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    // A port that takes connections and closes them at once: no NATS there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(conn);
        }
    });
    let a = node("x", 1);
    let fast = Duration::from_millis(10);
    let s = Streams::builder(&a)
        .pubsub(PubSub::nats(format!("nats://127.0.0.1:{port}")))
        .backoff(fast, fast * 2)
        .start()
        .unwrap();
    assert!(tokio::time::timeout(PATIENCE, s.ready()).await.expect("answer in time").is_err());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while attempts.load(Ordering::SeqCst) < 3 {
        assert!(tokio::time::Instant::now() < deadline, "the link does not keep trying");
        tokio::time::sleep(fast).await;
    }
    s.shutdown().await;
    let after = attempts.load(Ordering::SeqCst);
    // Retrying every 20 ms, a link still trying would try about 25 times.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let more = attempts.load(Ordering::SeqCst) - after;
    assert!(more <= 1, "{more} attempts after shutdown");
}

/// A node that shuts its stream down and exits at once: its last events and
/// its last frames reach the other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_shuts_down_and_exits_at_once_delivers_its_last_events() {
    let nats = NatsServer::start().expect("nats-server");
    a_node_that_shuts_down_and_exits_delivers_its_last_events(PubSub::nats(nats.url())).await;
}

/// A server that requires a login is joined with the user and password of
/// its URL; without them, `ready` fails with the server's refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_credentials_of_the_url_log_in() {
    let nats = NatsServer::start_with_user("alice", "p@ss").expect("nats-server");
    let url = format!("nats://alice:p%40ss@127.0.0.1:{}", nats.port());
    let pubsub = PubSub::nats(url);
    assert_eq!(pubsub.describe(), format!("nats://127.0.0.1:{}", nats.port()), "no credentials shown");
    let (a, b) = (node("users", 1), node("users", 2));
    let _sa = start(&a, &pubsub, 1).await;
    let _sb = start(&b, &pubsub, 1).await;
    let mut on_b = b.subscribe(SubscribeOptions::new()).unwrap();
    a.put("user:1".into(), 1);
    let e = next(&mut on_b).await.unwrap();
    assert_eq!(e.target, Target::Key("user:1".to_string()));

    let c = node("users", 3);
    let anonymous = Streams::builder(&c).pubsub(PubSub::nats(nats.url())).start().unwrap();
    let refused = tokio::time::timeout(PATIENCE, anonymous.ready()).await.expect("an answer in time");
    let message = refused.expect_err("refused").to_string();
    assert!(message.contains("authorization violation"), "{message}");
}

/// A connection that hangs without closing (a frozen server) is found out
/// within a few heartbeats, told as a loss, and made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_hangs_without_closing_is_a_gap_then_events_flow() {
    let nats = NatsServer::start().expect("nats-server");
    let pubsub = PubSub::nats(nats.url());
    let fast = |c| {
        Streams::builder(c)
            .pubsub(pubsub.clone())
            .heartbeat(Duration::from_millis(50))
            .backoff(Duration::from_millis(20), Duration::from_millis(200))
    };
    let a = node("users", 1);
    let sa = fast(&a).start().expect("start a");
    tokio::time::timeout(PATIENCE, sa.ready()).await.expect("ready in time").expect("ready");
    let mut on_a = a.subscribe(SubscribeOptions::new().scope(nebulex_streams::EventScope::Remote)).unwrap();
    // Frozen, the server keeps every connection open and answers nothing.
    nats.freeze().expect("freeze");
    let lost = tokio::time::timeout(PATIENCE, on_a.recv()).await;
    nats.thaw().expect("thaw");
    assert!(matches!(lost, Ok(Some(Err(nebulex_streams::Lagged(0))))), "the hung connection, told: {lost:?}");
    let b = node("users", 2);
    let _sb = fast(&b).start().expect("start b");
    until_flowing(&b, &mut on_a, "after-the-hang").await;
}

/// Publishes `n` tiny messages on `subject` over one raw connection.
fn flood(port: u16, subject: &str, n: usize) {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut info = String::new();
    reader.read_line(&mut info).unwrap();
    let mut out = b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n".to_vec();
    for _ in 0..n {
        out.extend_from_slice(format!("PUB {subject} 1\r\nx\r\n").as_bytes());
    }
    out.extend_from_slice(b"PING\r\n");
    stream.write_all(&out).unwrap();
    let mut pong = String::new();
    reader.read_line(&mut pong).unwrap();
    assert!(pong.starts_with("PONG"), "{pong}");
}

/// A node whose receiving falls behind while the NATS client reads on: the
/// client's queue overflows and it drops messages (a slow consumer), while
/// the connection stays up. That is a loss of unknown size on every
/// partition, told to the readers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_the_client_drops_for_a_slow_consumer_are_a_loss() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const FLOOD: usize = 150_000;
    let nats = NatsServer::start().expect("nats-server");
    let b = node("flood", 2);
    let handled = Arc::new(AtomicUsize::new(0));
    let counted = handled.clone();
    let streams = Streams::builder(&b)
        .pubsub(PubSub::nats(nats.url()))
        .observer(move |t| {
            // The flood is garbage: each message handled is refused. The
            // first is slow to handle (a slow logger, a busy core) while the
            // worker's other tasks, the client's connection among them, run.
            if let Telemetry::FrameRejected { .. } = t {
                if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                    tokio::task::block_in_place(|| std::thread::sleep(Duration::from_secs(2)));
                }
            }
        })
        .start()
        .unwrap();
    tokio::time::timeout(PATIENCE, streams.ready()).await.expect("ready in time").expect("ready");
    let mut sub = b.subscribe(SubscribeOptions::new()).unwrap();
    let port = nats.port();
    tokio::task::spawn_blocking(move || flood(port, "nbx:flood", FLOOD)).await.unwrap();
    assert_eq!(next(&mut sub).await, Err(nebulex_streams::Lagged(0)), "the readers are told");
    assert!(handled.load(Ordering::SeqCst) < FLOOD, "the client dropped messages");
    assert_eq!(streams.info().connected, Some(true), "the connection stayed up");
}

/// A cache name that would make its channel a NATS wildcard (or no subject
/// at all) is refused as the stream starts: it would hear other caches.
#[tokio::test]
async fn a_cache_whose_channel_is_no_nats_subject_of_its_own_is_refused() {
    for name in ["users.*", "users.>", "my users", "users."] {
        let cache = node(name, 1);
        let outcome = Streams::builder(&cache).pubsub(PubSub::nats("nats://127.0.0.1:1")).start().map(|_| ());
        assert!(matches!(outcome, Err(nebulex_streams::Error::InvalidOption(_))), "{name}: {outcome:?}");
        assert!(Streams::lookup(&cache).is_none(), "{name}: nothing is left started");
    }
}

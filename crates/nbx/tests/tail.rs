//! `nbx tail` and `nbx demo` as a user runs them: the built binary as a child
//! process, against a throwaway `redis-server` (and `nats-server`), with a
//! real node writing. Every wait has a deadline; the child's output is read
//! line by line as it comes.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nebulex::{Cache, CacheEntryEvent, EventMetadata, EventType, Name, NodeId, Query, Target};
use nebulex_streams::wire::{encode, FrameHeader};
use nebulex_streams::{PubSub, Streams};
use nebulex_testkit::{NatsServer, RedisServer};
use serde_json::Value;

const NBX: &str = env!("CARGO_BIN_EXE_nbx");
/// The longest any single wait may take.
const PATIENCE: Duration = Duration::from_secs(20);

/// A running `nbx` child, its stdout and stderr read line by line by two
/// threads; killed when dropped.
struct Nbx {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    /// Every stdout line read so far, for failure messages.
    seen: Vec<String>,
}

impl Nbx {
    fn spawn(args: &[&str]) -> Nbx {
        let mut child = Command::new(NBX)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nbx");
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        Nbx { child, stdout, stderr, seen: Vec::new() }
    }

    /// The next stdout line, or a panic once `deadline` passes.
    fn line(&mut self, deadline: Instant) -> String {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.stdout.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line.clone());
                line
            }
            Err(RecvTimeoutError::Timeout) => panic!("no line from nbx in time; so far: {:#?}", self.seen),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().ok();
                let err: Vec<String> = self.stderr.try_iter().collect();
                panic!("nbx closed its stdout ({status:?}); stderr: {err:#?}; stdout: {:#?}", self.seen)
            }
        }
    }

    /// The next stdout line as JSON.
    fn json(&mut self, deadline: Instant) -> Value {
        let line = self.line(deadline);
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Waits for a stderr line containing `needle`.
    fn stderr_line(&mut self, needle: &str, deadline: Instant) -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no stderr line with {needle:?} ({e:?})"),
            }
        }
    }

    /// Waits for the process to exit.
    fn wait(&mut self, deadline: Instant) -> ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "nbx did not exit in time");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every remaining stdout line, once the process ended.
    fn rest(&mut self) -> Vec<String> {
        self.stdout.iter().collect()
    }
}

impl Drop for Nbx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(pipe: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn deadline() -> Instant {
    Instant::now() + PATIENCE
}

/// Polls `PUBSUB NUMPAT` until the tail's pattern subscription is in place.
fn wait_pattern_subscribed(redis: &RedisServer) {
    let deadline = deadline();
    loop {
        let reply = redis.command(&[b"PUBSUB", b"NUMPAT"]).unwrap();
        if reply.trim_start_matches(':').parse::<u64>().is_ok_and(|n| n >= 1) {
            return;
        }
        assert!(Instant::now() < deadline, "tail never subscribed (NUMPAT {reply})");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

/// A node: cache `users` with a stream of 4 partitions over `pubsub`, ready.
fn node(rt: &tokio::runtime::Runtime, pubsub: PubSub) -> (Cache<String, u64>, Streams<String>) {
    let _guard = rt.enter();
    let cache: Cache<String, u64> = Cache::builder().name("users").build().unwrap();
    let streams = Streams::builder(&cache).partitions(4).pubsub(pubsub).start().unwrap();
    rt.block_on(streams.ready()).unwrap();
    (cache, streams)
}

/// Writes a known history; returns per key the (kind, command) expected.
fn write_history(cache: &Cache<String, u64>) -> HashMap<String, Vec<(&'static str, &'static str)>> {
    cache.put("user:1".into(), 1);
    cache.put("user:1".into(), 2);
    cache.delete("user:1");
    cache.put("user:2".into(), 1);
    cache.update("user:2".into(), 0, |v| v + 1);
    cache.take("user:2");
    cache.delete_all(Query::Keys(vec!["user:3".to_string()]));
    cache.put_all(vec![("user:4".to_string(), 4), ("user:5".to_string(), 5)]);
    HashMap::from([
        ("user:1".into(), vec![("inserted", "put"), ("updated", "put"), ("deleted", "delete")]),
        ("user:2".into(), vec![("inserted", "put"), ("updated", "update"), ("deleted", "take")]),
        ("user:3".into(), vec![("deleted", "delete_all")]),
        ("user:4".into(), vec![("inserted", "put_all")]),
        ("user:5".into(), vec![("inserted", "put_all")]),
    ])
}

/// Reads JSON event lines until every expected event arrived; checks their
/// order per key, their sequence numbers per partition, and that nothing
/// else (gap, rejection) came.
fn expect_history(tail: &mut Nbx, expected: &HashMap<String, Vec<(&'static str, &'static str)>>) {
    let total: usize = expected.values().map(Vec::len).sum();
    let deadline = deadline();
    let mut got: HashMap<String, Vec<(String, String)>> = HashMap::new();
    let mut versions: HashMap<String, Vec<u64>> = HashMap::new();
    let mut last_seq: HashMap<(String, u64), u64> = HashMap::new();
    let mut count = 0;
    while count < total {
        let line = tail.json(deadline);
        assert_eq!(line["type"], "event", "only events expected: {line}");
        assert_eq!(line["cache"], "users");
        let partition = line["partition"].as_u64().expect("a partitioned stream");
        assert!(partition < 4);
        assert_eq!(line["partitions"], 4);
        assert!(line["time"].as_str().unwrap().ends_with('Z'));
        let origin = line["origin"].as_str().unwrap().to_string();
        assert_eq!(origin.len(), 16, "origin in hex: {origin}");
        let seq = line["seq"].as_u64().unwrap();
        if let Some(prev) = last_seq.insert((origin, partition), seq) {
            assert_eq!(seq, prev + 1, "consecutive seq on partition {partition}: {line}");
        }
        let keys = line["keys"].as_array().unwrap();
        let target = line["target"].as_str().unwrap();
        assert!(target == "key" && keys.len() == 1 || target == "keys", "{line}");
        for key in keys {
            let key = key.as_str().unwrap().to_string();
            let kind = line["kind"].as_str().unwrap().to_string();
            let command = line["command"].as_str().unwrap().to_string();
            versions.entry(key.clone()).or_default().push(line["version"].as_u64().unwrap());
            got.entry(key).or_default().push((kind, command));
            count += 1;
        }
    }
    for (key, want) in expected {
        let want: Vec<(String, String)> = want.iter().map(|(k, c)| (k.to_string(), c.to_string())).collect();
        assert_eq!(got.get(key), Some(&want), "events of {key} in order");
    }
    for (key, vs) in versions {
        assert!(vs.windows(2).all(|w| w[0] < w[1]), "versions of {key} grow: {vs:?}");
    }
}

#[test]
fn tail_json_shows_a_nodes_events_in_order_and_rejects_forged_frames() {
    let redis = RedisServer::start().expect("redis-server");
    let url = redis.url();
    let mut tail = Nbx::spawn(&["tail", "--redis", &url, "--cache", "users", "--json"]);
    let subscribed = tail.stderr_line("subscribed", deadline());
    assert!(subscribed.contains("pattern nbx:users:*"), "{subscribed}");
    wait_pattern_subscribed(&redis);

    let rt = runtime();
    let (cache, streams) = node(&rt, PubSub::redis(url.clone()));
    let expected = write_history(&cache);
    expect_history(&mut tail, &expected);

    // A forged frame on the unpartitioned channel, then one on a partition's.
    redis.command(&[b"PUBLISH", b"nbx:users", b"garbage"]).unwrap();
    let line = tail.json(deadline());
    assert_eq!(line["type"], "rejected", "{line}");
    assert_eq!(line["reason"], "version");
    assert_eq!(line["bytes"], 7);
    assert_eq!(line["channel"], "nbx:users");
    redis.command(&[b"PUBLISH", b"nbx:users:2", &[1, 0, 0x93, 1, 2]]).unwrap();
    let line = tail.json(deadline());
    assert_eq!(line["type"], "rejected", "{line}");
    assert_eq!(line["reason"], "malformed");
    assert_eq!(line["channel"], "nbx:users:2");

    // The tail goes on after them.
    cache.put("user:9".into(), 9);
    let line = tail.json(deadline());
    assert_eq!((line["type"].as_str(), line["kind"].as_str()), (Some("event"), Some("inserted")), "{line}");
    assert_eq!(line["keys"], serde_json::json!(["user:9"]));
    streams.stop();
}

/// The header of a frame of node 0xfeed, epoch 1.
fn header(partition: u32, partitions: u32, first_seq: u64) -> FrameHeader {
    FrameHeader {
        origin: NodeId(0xfeed),
        epoch: 1,
        cache: "users".into(),
        partition,
        partitions,
        first_seq,
        sent_at_us: 0,
        last: false,
    }
}

/// An inserted event of `key`.
fn inserted<K>(key: K) -> Arc<CacheEntryEvent<K>> {
    Arc::new(CacheEntryEvent {
        cache: Name::new("users"),
        kind: EventType::Inserted,
        target: Target::Key(key),
        command: nebulex::Command::Put,
        version: 1,
        metadata: EventMetadata {
            node: NodeId(0xfeed),
            partition: None,
            partitions: None,
            topic: None,
            seq: 0,
            timestamp: SystemTime::now(),
        },
    })
}

/// A heartbeat: a frame without events.
fn heartbeat(h: &FrameHeader) -> Vec<u8> {
    encode::<u64>(h, &Vec::<Arc<CacheEntryEvent<u64>>>::new(), None).unwrap()
}

#[test]
fn tail_text_shows_any_key_type_gaps_and_filters() {
    let redis = RedisServer::start().expect("redis-server");
    let url = redis.url();
    let mut tail =
        Nbx::spawn(&["tail", "--redis", &url, "--cache", "users", "--partitions", "4", "--events", "inserted"]);
    tail.stderr_line("subscribed", deadline());
    let publish = |channel: &str, frame: &[u8]| {
        let reply = redis.command(&[b"PUBLISH", channel.as_bytes(), frame]).unwrap();
        assert_eq!(reply, ":1", "one subscriber got it");
    };
    // Wait until the tail's subscriptions hold: a heartbeat (not shown) reaches one client.
    let until = deadline();
    while redis.command(&[b"PUBLISH", b"nbx:users:1", &heartbeat(&header(1, 4, 1))]).unwrap() != ":1" {
        assert!(Instant::now() < until, "tail never subscribed");
        std::thread::sleep(Duration::from_millis(10));
    }

    // A tuple key (seq 1), a heartbeat saying 2 comes next, a frame from 6:
    // a gap of 4 (2, 3, 4, 5). An updated event, filtered out by --events.
    publish("nbx:users:1", &encode(&header(1, 4, 1), &[inserted((42u32, "alice".to_string()))], None).unwrap());
    publish("nbx:users:1", &heartbeat(&header(1, 4, 2)));
    let mut updated = inserted(8u64);
    Arc::get_mut(&mut updated).unwrap().kind = EventType::Updated;
    publish("nbx:users:1", &encode(&header(1, 4, 6), &[inserted(7u64), updated], None).unwrap());
    // A frame of a stream of another partition count.
    publish("nbx:users:3", &encode(&header(3, 8, 1), &[inserted(1u64)], None).unwrap());
    let deadline = deadline();
    let first = tail.line(deadline);
    assert!(first.contains("  000000000000feed  p1   seq 1 "), "{first}");
    assert!(first.ends_with("inserted put         v1     (42, \"alice\")"), "{first}");
    let gap = tail.line(deadline);
    assert!(gap.ends_with("GAP 4 events missed from 000000000000feed on partition 1"), "{gap}");
    let second = tail.line(deadline);
    assert!(second.contains("p1   seq 6 ") && second.ends_with(" 7"), "{second}");
    let rejected = tail.line(deadline);
    assert!(
        rejected.contains("REJECTED partition_count: frame says 8 partitions, the stream has 4 (")
            && rejected.ends_with("bytes) on nbx:users:3"),
        "{rejected}"
    );
    // Then 0xfeed says nothing more, without having stopped: after 5 s, what
    // it had not sent is taken for lost, as the nodes take it.
    let silent = tail.line(deadline);
    assert!(
        silent.ends_with(
            "GAP unknown number of events missed from 000000000000feed on partition 1 (fell silent without stopping)"
        ),
        "{silent}"
    );
}

#[test]
fn a_lost_connection_is_a_gap_of_unknown_size_and_the_tail_resubscribes() {
    let redis = RedisServer::start().expect("redis-server");
    let url = redis.url();
    let mut tail = Nbx::spawn(&["tail", "--redis", &url, "--cache", "users", "--json"]);
    tail.stderr_line("subscribed", deadline());
    wait_pattern_subscribed(&redis);
    let rt = runtime();
    let (cache, streams) = node(&rt, PubSub::redis(url.clone()));
    cache.put("user:1".into(), 1);
    assert_eq!(tail.json(deadline())["keys"], serde_json::json!(["user:1"]));

    assert!(redis.kill_pubsub_clients().unwrap() >= 1);
    let gap = tail.json(deadline());
    assert_eq!(gap["type"], "gap", "{gap}");
    assert_eq!(gap["missed"], Value::Null);
    assert_eq!(gap["reason"], "connection to Redis lost");
    tail.stderr_line("subscribed again", deadline());
    wait_pattern_subscribed(&redis);
    // The node reconnects too; then its events reach the tail again.
    rt.block_on(streams.ready()).unwrap();
    let deadline = deadline();
    let mut n = 2u64;
    loop {
        cache.put(format!("user:{n}"), n);
        let line = tail.stdout.recv_timeout(Duration::from_millis(200));
        if let Ok(line) = line {
            let line: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(line["type"], "event", "{line}");
            break;
        }
        assert!(Instant::now() < deadline, "no event after the reconnection");
        n += 1;
    }
    streams.stop();
}

#[test]
fn an_unreachable_server_or_a_bad_url_fails_fast_with_one_clear_line() {
    // A server that is not Redis, at a Redis URL.
    let nats = NatsServer::start().expect("nats-server");
    let not_redis = format!("redis://127.0.0.1:{}/", nats.port());
    for (args, expected) in [
        (&["tail", "--redis", "redis://127.0.0.1:1/", "--cache", "x"][..], "cannot connect to Redis at 127.0.0.1:1"),
        (&["tail", "--redis", "http://127.0.0.1/", "--cache", "x"][..], "invalid Redis URL"),
        (&["tail", "--nats", "nats://127.0.0.1:1", "--cache", "x"][..], "cannot connect to NATS at 127.0.0.1:1"),
        (&["tail", "--redis", &not_redis, "--cache", "x"][..], "its answer is not Redis's (is this a Redis server?)"),
    ] {
        let mut nbx = Nbx::spawn(args);
        // Fast: exited within this deadline.
        let status = nbx.wait(Instant::now() + Duration::from_secs(10));
        assert!(!status.success(), "{args:?} must fail");
        let err: Vec<String> = nbx.stderr.iter().collect();
        assert_eq!(err.len(), 1, "one line on stderr: {err:?}");
        assert!(err[0].starts_with("nbx: error: ") && err[0].contains(expected), "{args:?}: {}", err[0]);
        assert!(nbx.rest().is_empty());
        if expected.starts_with("cannot connect to Redis at 127.0.0.1:1") {
            assert!(err[0].to_lowercase().contains("refused"), "{}", err[0]);
        }
    }
}

#[test]
fn ctrl_c_stops_the_tail_with_exit_code_0() {
    let redis = RedisServer::start().expect("redis-server");
    let mut tail = Nbx::spawn(&["tail", "--redis", &redis.url(), "--cache", "users"]);
    tail.stderr_line("subscribed", deadline());
    let pid = tail.child.id().to_string();
    let sent = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(sent.success());
    let status = tail.wait(deadline());
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn tail_over_nats_sees_a_nodes_events() {
    let nats = NatsServer::start().expect("nats-server");
    let url = nats.url();
    let mut tail = Nbx::spawn(&["tail", "--nats", &url, "--cache", "users", "--json"]);
    let subscribed = tail.stderr_line("subscribed", deadline());
    assert!(subscribed.contains("nbx:users:0 .. nbx:users:4095"), "{subscribed}");

    let rt = runtime();
    let (cache, streams) = node(&rt, PubSub::nats(url.clone()));
    let expected = write_history(&cache);
    expect_history(&mut tail, &expected);
    nats.publish("nbx:users", b"garbage").unwrap();
    let line = tail.json(deadline());
    assert_eq!((line["type"].as_str(), line["reason"].as_str()), (Some("rejected"), Some("version")), "{line}");
    streams.stop();
}

#[test]
fn demo_runs_and_prints_totals() {
    let mut demo = Nbx::spawn(&["demo", "--seconds", "1"]);
    let status = demo.wait(Instant::now() + Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let out = demo.rest();
    let text = out.join("\n");
    // Not a terminal: plain summaries, no escape sequences.
    assert!(!text.contains('\x1b'), "{text}");
    // The summary at 1 s may or may not come before the end; the totals do.
    for line in out.iter().filter(|l| l.starts_with('[')) {
        assert!(line.contains(": inserted ") && line.contains(" lagged "), "{line}");
    }
    let totals = out.iter().position(|l| l.starts_with("totals after")).unwrap_or_else(|| panic!("{text}"));
    let events = &out[totals + 2];
    assert!(events.trim_start().starts_with("events"), "{text}");
    let count: u64 = events.split_whitespace().nth(1).unwrap().replace(',', "").parse().unwrap();
    assert!(count > 0, "{text}");
    assert!(out.iter().any(|l| l.trim_start().starts_with("inserted")), "{text}");
}

#[test]
fn demo_keeps_a_slow_rate_and_stops_when_due() {
    // 2 writers at 1 operation a second each, for 1 second.
    let mut demo = Nbx::spawn(&["demo", "--seconds", "1", "--rate", "1", "--writers", "2"]);
    let status = demo.wait(Instant::now() + Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
    let out = demo.rest();
    let text = out.join("\n");
    let operations = out.iter().find(|l| l.trim_start().starts_with("operations")).unwrap_or_else(|| panic!("{text}"));
    let count: u64 = operations.split_whitespace().nth(1).unwrap().replace(',', "").parse().unwrap();
    // One at the start and one a second later, per writer, at the most.
    assert!((1..=4).contains(&count), "{text}");
}

#[test]
fn tail_over_nats_logs_in_with_the_credentials_of_its_url() {
    let nats = NatsServer::start_with_user("alice", "p@ss").expect("nats-server");
    let url = format!("nats://alice:p%40ss@127.0.0.1:{}", nats.port());
    let mut tail = Nbx::spawn(&["tail", "--nats", &url, "--cache", "users"]);
    let line = tail.stderr_line("subscribed", deadline());
    assert!(!line.contains("p%40ss") && !line.contains("alice"), "no credentials shown: {line}");
    let mut anonymous = Nbx::spawn(&["tail", "--nats", &nats.url(), "--cache", "users"]);
    let status = anonymous.wait(deadline());
    assert!(!status.success());
    let err: Vec<String> = anonymous.stderr.iter().collect();
    assert!(err.iter().any(|l| l.contains("authorization violation")), "{err:?}");
}

//! The property users buy the Invalidator for: after a write on any node, no
//! other node keeps serving the old value — through killed connections and a
//! restarted server.
//!
//! Three nodes share a versioned system of record. Writers update the record
//! and then write or delete their node's cache; readers read through their
//! node's cache (`get_or_insert_with` loading from the record). Meanwhile the
//! engine misbehaves. Once writes stop, every node's every cached value must
//! equal the record, within a bounded time.
//!
//! The run's length, operations, faults and worst staleness window seen by
//! readers are printed (`cargo test --test chaos -- --nocapture`).

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nebulex::{Cache, NodeId};
use nebulex_streams::{EventScope, Invalidator, PubSub, Streams};
use nebulex_testkit::{NatsServer, RedisServer};
use rand::{Rng, SeedableRng};

const NODES: u64 = 3;
const KEYS: u64 = 64;
const RUN: Duration = Duration::from_secs(6);

/// The value a node caches: the record's version and its value.
type Versioned = (u64, u64);

/// The system of record: key → (version, value).
#[derive(Default)]
struct Record {
    rows: Mutex<HashMap<u64, Versioned>>,
}

impl Record {
    fn read(&self, key: u64) -> Versioned {
        self.rows.lock().unwrap().get(&key).copied().unwrap_or((0, 0))
    }
}

#[derive(Default)]
struct Stats {
    writes: AtomicU64,
    reads: AtomicU64,
    stale_reads: AtomicU64,
    /// The longest a reader saw one (node, key) stale, in microseconds.
    worst_stale_us: AtomicU64,
}

struct Node {
    cache: Cache<u64, Versioned>,
    _streams: Streams<u64>,
    _invalidator: Invalidator,
}

async fn start_nodes(pubsub: &PubSub) -> Vec<Node> {
    let mut nodes = Vec::new();
    for id in 1..=NODES {
        let cache: Cache<u64, Versioned> = Cache::builder().name("chaos").node_id(NodeId(id)).build().unwrap();
        let streams = Streams::builder(&cache)
            .partitions(4)
            .pubsub(pubsub.clone())
            .heartbeat(Duration::from_millis(100))
            .backoff(Duration::from_millis(20), Duration::from_millis(200))
            .start()
            .unwrap();
        tokio::time::timeout(support::PATIENCE, streams.ready()).await.expect("ready in time").expect("ready");
        let invalidator = Invalidator::builder(&streams).scope(EventScope::Remote).start().unwrap();
        nodes.push(Node { cache, _streams: streams, _invalidator: invalidator });
    }
    nodes
}

/// Runs writers and readers on every node while `faults` misbehaves, then
/// checks that no node keeps a stale entry.
async fn chaos(pubsub: PubSub, faults: impl FnOnce(Arc<AtomicBool>) -> std::thread::JoinHandle<u32>) {
    let nodes = start_nodes(&pubsub).await;
    let record = Arc::new(Record::default());
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();

    let mut workers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        // A writer: update the record, then write or delete the cache. The
        // record's lock is held across both, so two nodes' writes of one key
        // reach the caches in the record's order.
        let (cache, rec, st, halt) = (node.cache.clone(), record.clone(), stats.clone(), stop.clone());
        workers.push(std::thread::spawn(move || {
            let (record, stats, stop) = (rec, st, halt);
            let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
            while !stop.load(Ordering::Relaxed) {
                let key = rng.gen_range(0..KEYS);
                let mut rows = record.rows.lock().unwrap();
                let row = rows.entry(key).or_insert((0, 0));
                *row = (row.0 + 1, rng.gen());
                let row = *row;
                if rng.gen_bool(0.5) {
                    cache.put(key, row);
                } else {
                    cache.delete(&key);
                }
                drop(rows);
                stats.writes.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
            }
        }));
        // A reader: read through the cache, and measure how long a key stays stale.
        let (cache, rec, st, halt) = (node.cache.clone(), record.clone(), stats.clone(), stop.clone());
        workers.push(std::thread::spawn(move || {
            let (record, stats, stop) = (rec, st, halt);
            let mut rng = rand::rngs::StdRng::seed_from_u64(100 + i as u64);
            let mut stale_since: HashMap<u64, Instant> = HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                let key = rng.gen_range(0..KEYS);
                let seen = cache.get_or_insert_with(key, || record.read(key));
                let truth = record.read(key);
                stats.reads.fetch_add(1, Ordering::Relaxed);
                if seen.0 < truth.0 {
                    stats.stale_reads.fetch_add(1, Ordering::Relaxed);
                    let since = *stale_since.entry(key).or_insert_with(Instant::now);
                    let us = since.elapsed().as_micros() as u64;
                    stats.worst_stale_us.fetch_max(us, Ordering::Relaxed);
                } else {
                    stale_since.remove(&key);
                }
            }
        }));
    }
    let injected = faults(stop.clone());

    tokio::time::sleep(RUN).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let faults = injected.join().unwrap();
    let run = started.elapsed();

    // Writes have stopped: within a bounded time (heartbeats reveal a lost
    // last frame; reconnections flush), no node holds a stale value.
    let deadline = Instant::now() + support::PATIENCE;
    let settled = loop {
        let stale: Vec<(usize, u64, Versioned, Versioned)> = nodes
            .iter()
            .enumerate()
            .flat_map(|(n, node)| {
                let record = &record;
                (0..KEYS).filter_map(move |k| {
                    let cached = node.cache.get(&k)?;
                    let truth = record.read(k);
                    (cached != truth).then_some((n, k, cached, truth))
                })
            })
            .collect();
        if stale.is_empty() {
            break Instant::now();
        }
        assert!(Instant::now() < deadline, "stale entries remain (node, key, cached, record): {stale:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let settle = settled.duration_since(started + run);
    println!(
        "chaos over {}: {:.1} s, {} writes, {} reads ({} stale reads, worst staleness window {:.1} ms), \
         {faults} faults, zero stale entries {:.0} ms after writes stopped",
        pubsub.describe(),
        run.as_secs_f64(),
        stats.writes.load(Ordering::Relaxed),
        stats.reads.load(Ordering::Relaxed),
        stats.stale_reads.load(Ordering::Relaxed),
        stats.worst_stale_us.load(Ordering::Relaxed) as f64 / 1000.0,
        settle.as_secs_f64() * 1000.0,
    );
    assert!(faults >= 2, "the faults happened");
    assert!(stats.writes.load(Ordering::Relaxed) > 1000 && stats.reads.load(Ordering::Relaxed) > 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_entry_survives_killed_connections_and_a_redis_restart() {
    let redis = RedisServer::start().expect("redis-server");
    let pubsub = PubSub::redis(redis.url());
    chaos(pubsub, move |stop| {
        std::thread::spawn(move || {
            let mut redis = redis;
            let mut faults = 0;
            for round in 0.. {
                std::thread::sleep(Duration::from_millis(700));
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if round == 3 {
                    redis.restart().expect("restart");
                } else {
                    redis.kill_pubsub_clients().expect("kill");
                }
                faults += 1;
            }
            faults
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_entry_survives_a_nats_restart() {
    let nats = NatsServer::start().expect("nats-server");
    let pubsub = PubSub::nats(nats.url());
    chaos(pubsub, move |stop| {
        std::thread::spawn(move || {
            let mut nats = nats;
            let mut faults = 0;
            for _ in 0.. {
                std::thread::sleep(Duration::from_millis(1500));
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                nats.restart().expect("restart");
                faults += 1;
            }
            faults
        })
    })
    .await;
}

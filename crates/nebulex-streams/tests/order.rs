//! Per-key order under concurrent writers: every subscriber sees a key's events
//! in the order the writes took effect, and replaying them reproduces whether
//! the key is present at the end.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nebulex::{Cache, CacheEntryEvent, EventType, Query, Target};
use nebulex_streams::{partition_of, Lagged, Streams, StreamsExt, SubscribeOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::PATIENCE;

const KEYS: u32 = 8;
const WRITERS: u64 = 3;
/// Operations per writer: about a second per run in a debug build on two
/// cores, with the five runs of this file in parallel.
const OPS: usize = 30_000;
/// Every op emits at most a few events (a 3-key `put_all` with its
/// evictions emits 5): a buffer this large can never overflow.
const BUFFER: usize = WRITERS as usize * OPS * 6;

fn write_randomly(cache: &Cache<u32, u64>, seed: u64, expiring: bool) {
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..OPS as u64 {
        let k = rng.gen_range(0..KEYS);
        match rng.gen_range(0..if expiring { 12 } else { 10 }) {
            0 | 1 => cache.put(k, i),
            // Expiring runs only: entries that expire under the writers' feet,
            // and reads that find them expired.
            10 => cache.put_with_ttl(k, i, Duration::from_micros(rng.gen_range(0..300))),
            11 => {
                cache.get(&k);
            }
            2 => {
                cache.delete(&k);
            }
            3 => {
                cache.take(&k);
            }
            4 => {
                cache.update(k, i, |v| v + 1);
            }
            5 => {
                cache.put_new(k, i);
            }
            6 => {
                cache.replace(k, i);
            }
            7 => {
                let n = rng.gen_range(1..=3);
                cache.put_all((0..n).map(|_| (rng.gen_range(0..KEYS), i)));
            }
            8 => {
                let n = rng.gen_range(1..=3);
                cache.delete_all(Query::Keys((0..n).map(|_| rng.gen_range(0..KEYS)).collect()));
            }
            _ => {
                cache.put_new_all((0..2).map(|_| (rng.gen_range(0..KEYS), i)));
            }
        }
    }
}

/// Checks one key's history as one subscriber saw it.
fn check_history(key: u32, history: &[(EventType, u64)], present_at_end: bool) {
    let mut present = false;
    let mut last_version = 0;
    for (i, &(kind, version)) in history.iter().enumerate() {
        let at = || {
            format!("key {key}, event {i} ({kind} v{version}), history so far {:?}", &history[i.saturating_sub(5)..=i])
        };
        assert!(version > last_version, "versions strictly increase: {}", at());
        last_version = version;
        match kind {
            EventType::Inserted => {
                assert!(!present, "Inserted while present: {}", at());
                present = true;
            }
            EventType::Updated => assert!(present, "Updated while absent: {}", at()),
            // `delete` emits even when the key is absent.
            EventType::Deleted => present = false,
            EventType::Expired | EventType::Evicted => {
                assert!(present, "{kind} while absent: {}", at());
                present = false;
            }
        }
    }
    assert_eq!(present, present_at_end, "replaying key {key}'s {} events ends where the cache is", history.len());
}

#[derive(Clone, Copy)]
struct Run {
    partitions: u32,
    /// `max_entries(4)` on one shard: evictions interleave.
    bounded: bool,
    /// Entries with short time to live: expirations interleave.
    expiring: bool,
}

fn stress(name: &str, Run { partitions, bounded, expiring }: Run) {
    let started = Instant::now();
    // No sweep during the run: the end state is read before the stop, and a
    // sweep after that read would expire entries the read saw live.
    let mut builder = Cache::builder().name(name).sweep_interval(Duration::from_secs(3_600));
    if bounded {
        builder = builder.max_entries(4).shards(1);
    }
    let cache: Cache<u32, u64> = builder.build().unwrap();
    let streams = Streams::builder(&cache).partitions(partitions).buffer(BUFFER).start().unwrap();

    // One reader thread per partition, reading while the writers write.
    let (tx, rx) = mpsc::channel();
    for p in 0..partitions {
        let mut sub = cache.subscribe(SubscribeOptions::new().partition(p)).unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut events: Vec<Arc<CacheEntryEvent<u32>>> = Vec::new();
            let mut lags = Vec::new();
            while let Some(item) = sub.recv_blocking() {
                match item {
                    Ok(e) => events.push(e),
                    Err(Lagged(n)) => lags.push(n),
                }
            }
            tx.send((p, events, lags)).unwrap();
        });
    }
    drop(tx);

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let cache = cache.clone();
            std::thread::spawn(move || write_randomly(&cache, 0x5eed_0000 + w, expiring))
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    // Read the end state while the stream runs: a read that finds an entry
    // expired removes it with an `Expired` event, which the readers then see.
    let present_at_end: Vec<bool> = (0..KEYS).map(|k| cache.contains_key(&k)).collect();
    streams.stop();

    let mut histories: HashMap<u32, Vec<(EventType, u64)>> = HashMap::new();
    let mut kinds: HashMap<EventType, usize> = HashMap::new();
    for _ in 0..partitions {
        let (p, events, lags) = rx.recv_timeout(PATIENCE * 6).expect("every reader ends at stop");
        assert!(lags.is_empty(), "partition {p} lagged: {lags:?}");
        for e in events {
            assert_eq!(e.metadata.partition, Some(p));
            *kinds.entry(e.kind).or_default() += 1;
            let mut keys = match &e.target {
                Target::Key(k) => vec![*k],
                Target::Keys(ks) => ks.clone(),
                Target::All => panic!("no delete_all(Query::All) was done"),
            };
            // `delete_all(Query::Keys(..))` names its keys as given, repeats
            // included: a key named twice is still one change of it.
            keys.sort_unstable();
            keys.dedup();
            for k in keys {
                assert_eq!(partition_of(&k, partitions), p, "key {k} on partition {p}");
                histories.entry(k).or_default().push((e.kind, e.version));
            }
        }
    }
    assert_eq!(histories.len(), KEYS as usize, "every hot key was written");
    for k in 0..KEYS {
        check_history(k, &histories[&k], present_at_end[k as usize]);
    }
    for kind in [EventType::Inserted, EventType::Updated, EventType::Deleted] {
        assert!(kinds.get(&kind).copied().unwrap_or(0) > 1_000, "{kinds:?}");
    }
    if bounded {
        assert!(kinds.get(&EventType::Evicted).copied().unwrap_or(0) > 1_000, "evictions interleave: {kinds:?}");
    } else {
        assert!(!kinds.contains_key(&EventType::Evicted));
    }
    if expiring {
        assert!(kinds.get(&EventType::Expired).copied().unwrap_or(0) > 100, "expirations interleave: {kinds:?}");
    } else {
        assert!(!kinds.contains_key(&EventType::Expired));
    }
    eprintln!("{name}: {kinds:?} in {:?}", started.elapsed());
}

#[test]
fn concurrent_writers_keep_per_key_order_over_2_partitions() {
    stress("order-2", Run { partitions: 2, bounded: false, expiring: false });
}

#[test]
fn concurrent_writers_keep_per_key_order_over_4_partitions() {
    stress("order-4", Run { partitions: 4, bounded: false, expiring: false });
}

#[test]
fn concurrent_writers_keep_per_key_order_over_2_partitions_with_evictions() {
    stress("order-2-evict", Run { partitions: 2, bounded: true, expiring: false });
}

#[test]
fn concurrent_writers_keep_per_key_order_over_4_partitions_with_evictions() {
    stress("order-4-evict", Run { partitions: 4, bounded: true, expiring: false });
}

#[test]
fn concurrent_writers_keep_per_key_order_over_4_partitions_with_evictions_and_expiry() {
    stress("order-4-evict-expire", Run { partitions: 4, bounded: true, expiring: true });
}

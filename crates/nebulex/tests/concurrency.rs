//! Per-key order under concurrent writers (DESIGN.md guarantee 1): the events
//! of every key form a valid history in the order the writes took effect,
//! versions strictly increase, and replaying them gives the final presence.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use common::{assert_versions_increase, replay, Recorder};
use nebulex::{Cache, Command, EventType, Query, Target};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const WRITERS: usize = 4;
const OPS_PER_WRITER: usize = 25_000;
const HOT_KEYS: u8 = 8;

/// What the writers' calls answered, to compare with the events.
#[derive(Default, Debug, PartialEq, Eq)]
struct Tally {
    deletes_that_removed: usize,
    takes_that_removed: usize,
    put_news_that_wrote: usize,
    replaces_that_wrote: usize,
}

fn stress(max_entries: Option<usize>, shards: Option<usize>) {
    let mut b = Cache::<u8, i64>::builder().name("stress").sweep_interval(Duration::from_secs(3600));
    if let Some(max) = max_entries {
        b = b.max_entries(max);
    }
    if let Some(s) = shards {
        b = b.shards(s);
    }
    let cache = b.build().unwrap();
    let rec = Recorder::attach(&cache);
    let barrier = Arc::new(Barrier::new(WRITERS));

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (cache, barrier) = (cache.clone(), barrier.clone());
            thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(w as u64 * 7919 + max_entries.unwrap_or(0) as u64);
                let mut t = Tally::default();
                barrier.wait();
                for i in 0..OPS_PER_WRITER {
                    let k = rng.gen_range(0..HOT_KEYS);
                    let v = i as i64;
                    match rng.gen_range(0..100) {
                        0..=24 => cache.put(k, v),
                        25..=39 => t.deletes_that_removed += usize::from(cache.delete(&k)),
                        40..=49 => t.takes_that_removed += usize::from(cache.take(&k).is_some()),
                        50..=64 => {
                            cache.update(k, v, |x| x + 1);
                        }
                        65..=74 => t.put_news_that_wrote += usize::from(cache.put_new(k, v)),
                        75..=84 => t.replaces_that_wrote += usize::from(cache.replace(k, v)),
                        85..=89 => cache.put_all([(k, v), ((k + 1) % HOT_KEYS, v)]),
                        90..=94 => {
                            cache.delete_all(Query::Keys(vec![k, (k + 3) % HOT_KEYS]));
                        }
                        95..=97 => {
                            cache.get(&k);
                        }
                        _ => {
                            cache.incr(k, 1);
                        }
                    }
                    if let Some(max) = max_entries {
                        if i % 64 == 0 {
                            assert!(cache.len() <= max, "len {} > max_entries {max}", cache.len());
                        }
                    }
                }
                t
            })
        })
        .collect();
    let tallies: Vec<Tally> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    let events = rec.take();
    assert!(events.len() >= WRITERS * OPS_PER_WRITER / 2, "only {} events", events.len());

    // The recorder's vector is in emission order, and every event of a key is
    // emitted under that key's shard lock: per key, it is the write order.
    // `replay` checks each key's history is valid (no Inserted while present,
    // no Updated/Expired/Evicted/take-Deleted while absent).
    let present = replay(&events);
    assert_versions_increase(&events);
    for k in 0..HOT_KEYS {
        assert_eq!(present.contains(&k), cache.contains_key(&k), "key {k}: replayed presence");
    }
    assert_eq!(cache.len(), present.len());

    // The calls' answers agree with the events.
    let mut said = Tally::default();
    for t in &tallies {
        said.deletes_that_removed += t.deletes_that_removed;
        said.takes_that_removed += t.takes_that_removed;
        said.put_news_that_wrote += t.put_news_that_wrote;
        said.replaces_that_wrote += t.replaces_that_wrote;
    }
    let count = |kind: EventType, command: Command| {
        events.iter().filter(|e| e.kind == kind && e.command == command).map(|e| e.target.keys().len()).sum::<usize>()
    };
    let mut live = std::collections::HashSet::new();
    let mut deletes_that_removed = 0;
    for e in &events {
        if (e.kind, e.command) == (EventType::Deleted, Command::Delete) {
            if let Target::Key(k) = &e.target {
                deletes_that_removed += usize::from(live.contains(k));
            }
        }
        // Track presence as `replay` does.
        for k in e.target.keys() {
            match e.kind {
                EventType::Inserted | EventType::Updated => {
                    live.insert(*k);
                }
                _ => {
                    live.remove(k);
                }
            }
        }
    }
    let seen = Tally {
        deletes_that_removed,
        takes_that_removed: count(EventType::Deleted, Command::Take),
        put_news_that_wrote: count(EventType::Inserted, Command::PutNew),
        replaces_that_wrote: count(EventType::Updated, Command::Replace),
    };
    assert_eq!(said, seen, "what the calls returned vs what their events say");

    let evictions = count(EventType::Evicted, Command::Evict);
    if max_entries.is_some() {
        assert!(evictions > 0, "no eviction interleaved");
    } else {
        assert_eq!(evictions, 0);
    }
    let mut per_kind: HashMap<EventType, usize> = HashMap::new();
    for e in &events {
        *per_kind.entry(e.kind).or_default() += 1;
    }
    for kind in [EventType::Inserted, EventType::Updated, EventType::Deleted] {
        assert!(per_kind.get(&kind).copied().unwrap_or(0) > 0, "no {kind} event: {per_kind:?}");
    }
}

#[test]
fn concurrent_writers_keep_per_key_event_order_unbounded() {
    stress(None, None);
}

#[test]
fn concurrent_writers_keep_per_key_event_order_with_many_shards() {
    stress(None, Some(8));
}

#[test]
fn concurrent_writers_keep_per_key_event_order_with_evictions_in_one_shard() {
    stress(Some(4), Some(1));
}

#[test]
fn concurrent_writers_keep_per_key_event_order_with_evictions_across_shards() {
    stress(Some(4), Some(4));
}

/// Counts a writer out when dropped.
struct Done(Arc<AtomicUsize>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Reads and the background sweep race to remove expiring entries: each
/// expired entry still yields exactly one `Expired` event (`replay` refuses an
/// `Expired` for a key already absent), and once everything has expired the
/// stream replays to an empty cache.
#[test]
fn reads_racing_the_sweeper_yield_exactly_one_expired_per_entry() {
    let cache: Cache<u8, i64> = Cache::builder()
        .name("expiry-race")
        .default_ttl(Duration::from_millis(2))
        .sweep_interval(Duration::from_millis(1))
        .build()
        .unwrap();
    let rec = Recorder::attach(&cache);
    let barrier = Arc::new(Barrier::new(3));
    let writers_done = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..3u64)
        .map(|w| {
            let (cache, barrier, writers_done) = (cache.clone(), barrier.clone(), writers_done.clone());
            thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(w);
                barrier.wait();
                if w == 0 {
                    // A reader, for as long as the writers write: every kind
                    // of read can find an entry expired.
                    let mut i = 0u64;
                    while writers_done.load(Ordering::Acquire) < 2 {
                        let k = rng.gen_range(0..HOT_KEYS);
                        match i % 4 {
                            0 => drop(cache.get(&k)),
                            1 => drop(cache.contains_key(&k)),
                            2 => drop(cache.ttl(&k)),
                            _ => drop(cache.get_all(&[k, (k + 1) % HOT_KEYS])),
                        }
                        i += 1;
                    }
                    return;
                }
                // Counted done even if this writer panics, so the reader stops.
                let _done = Done(writers_done);
                for i in 0..15_000i64 {
                    let k = rng.gen_range(0..HOT_KEYS);
                    match rng.gen_range(0..6) {
                        0 => cache.put_with_ttl(k, i, Duration::from_micros(rng.gen_range(100..3000))),
                        1 => cache.put(k, i),
                        2 => drop(cache.put_new(k, i)),
                        3 => drop(cache.update(k, i, |x| x + 1)),
                        4 => drop(cache.touch(&k)),
                        _ => drop(cache.delete(&k)),
                    }
                    if i % 512 == 0 {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());

    // On a loaded machine the sweeper may have won every race above: race it
    // again, one short-lived entry at a time, until a read wins once.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !rec.snapshot().iter().any(|e| e.kind == EventType::Expired && e.command == Command::Get) {
        assert!(std::time::Instant::now() < deadline, "no read found an entry expired");
        cache.put_with_ttl(0, 0, Duration::from_micros(200));
        while cache.get(&0).is_some() {}
    }

    // Every entry has a time to live: wait, without reading, for the sweeper
    // to remove them all (one more is written for it should the reads above
    // have left it nothing).
    cache.put_with_ttl(1, 1, Duration::from_micros(200));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !cache.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the sweeper left {} entries", cache.len());
        thread::sleep(Duration::from_millis(2));
    }
    let events = rec.take();
    let expired: Vec<_> = events.iter().filter(|e| e.kind == EventType::Expired).collect();
    assert!(expired.iter().any(|e| e.command == Command::Sweep), "the sweeper expired nothing");
    assert!(expired.iter().any(|e| e.command == Command::Get), "no read found an entry expired");
    assert!(replay(&events).is_empty(), "the stream replays to an empty cache");
    assert_versions_increase(&events);
}

/// Entries expiring in bulk, swept a batch at a time while writers, a
/// reader and a bounded shard's evictions act on the same keys between the
/// batches: each entry still leaves exactly once (`replay` refuses a
/// removal of a key already absent), and versions keep increasing.
#[test]
fn bulk_expiry_swept_in_batches_among_writes_reads_and_evictions_removes_each_entry_once() {
    const KEYS: u32 = 3_000;
    let cache: Cache<u32, u32> = Cache::builder()
        .name("bulk-expiry")
        .shards(1)
        .max_entries(2_500)
        .sweep_interval(Duration::from_millis(1))
        .build()
        .unwrap();
    let rec = Recorder::attach(&cache);
    let stop = Arc::new(AtomicUsize::new(0));
    let helpers: Vec<_> = (0..2u64)
        .map(|h| {
            let (cache, stop) = (cache.clone(), stop.clone());
            thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(h);
                while stop.load(Ordering::Acquire) == 0 {
                    let k = rng.gen_range(0..KEYS);
                    if h == 0 {
                        let _ = cache.get(&k);
                    } else {
                        cache.sweep_expired();
                    }
                }
            })
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(7);
    for round in 0..20u32 {
        // A burst due together, then writes among the sweeps' batches.
        for k in 0..KEYS {
            cache.put_with_ttl(k, round, Duration::from_millis(1));
        }
        for i in 0..2_000 {
            let k = rng.gen_range(0..KEYS);
            match i % 3 {
                0 => cache.put_with_ttl(k, round, Duration::from_micros(rng.gen_range(100..2_000))),
                1 => cache.put(k, round),
                _ => {
                    let _ = cache.delete(&k);
                }
            }
        }
    }
    // Everything left gets a short time to live, then goes.
    for k in 0..KEYS {
        cache.put_with_ttl(k, 0, Duration::from_millis(1));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cache.is_empty() {
        assert!(std::time::Instant::now() < deadline, "{} entries left", cache.len());
        thread::sleep(Duration::from_millis(2));
    }
    stop.store(1, Ordering::Release);
    helpers.into_iter().for_each(|t| t.join().unwrap());
    let events = rec.take();
    assert!(events.iter().any(|e| e.kind == EventType::Expired && e.command == Command::Sweep), "no sweep");
    assert!(replay(&events).is_empty(), "the stream replays to an empty cache");
    assert_versions_increase(&events);
}

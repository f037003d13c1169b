//! Event aggregation: count events per type and report the counts
//! periodically (every 200 ms here), resetting them after each report.
//!
//! Run with `cargo run --release --example aggregation`.

use std::collections::BTreeMap;
use std::time::Duration;

use nebulex::{Cache, EventType};
use nebulex_streams::{Streams, StreamsExt, SubscribeOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cache: Cache<u32, u32> =
        Cache::builder().name("catalog").max_entries(500).default_ttl(Duration::from_millis(300)).build()?;
    let streams = Streams::builder(&cache).start()?;
    let mut events = cache.subscribe(SubscribeOptions::new())?;

    let aggregator = tokio::spawn(async move {
        let mut counts: BTreeMap<EventType, u64> = BTreeMap::new();
        let mut report = tokio::time::interval(Duration::from_millis(200));
        report.tick().await;
        loop {
            tokio::select! {
                item = events.recv() => match item {
                    Some(Ok(event)) => *counts.entry(event.kind).or_default() += 1,
                    Some(Err(lagged)) => println!("missed {} events", lagged.0),
                    None => break,
                },
                _ = report.tick() => {
                    println!("Cache activity: {}", render(&counts));
                    counts.clear();
                }
            }
        }
        println!("Cache activity (final): {}", render(&counts));
    });

    // A workload: inserts, updates, deletes, evictions past 500 entries, and
    // expiry after 300 ms.
    for round in 0..5u32 {
        for i in 0..400 {
            let key = round * 200 + i;
            cache.put(key, i);
            if i % 3 == 0 {
                cache.put(key, i + 1);
            }
            if i % 7 == 0 {
                cache.delete(&key);
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    cache.sweep_expired();
    streams.stop();
    aggregator.await?;
    Ok(())
}

fn render(counts: &BTreeMap<EventType, u64>) -> String {
    let parts: Vec<String> = EventType::ALL.iter().map(|t| format!("{t}: {}", counts.get(t).unwrap_or(&0))).collect();
    format!("%{{{}}}", parts.join(", "))
}

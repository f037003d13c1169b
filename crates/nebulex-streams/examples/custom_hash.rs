//! Custom routing: user events to partition 0, session events to partition 1,
//! everything else to partition 2.
//!
//! Run with `cargo run --release --example custom_hash`.

use nebulex::{Cache, CacheEntryEvent, Target};
use nebulex_streams::{Route, Streams, StreamsExt, SubscribeOptions};

fn custom_hash(event: &CacheEntryEvent<String>) -> Route {
    match &event.target {
        Target::Key(key) if key.starts_with("user:") => Route::Partition(0),
        Target::Key(key) if key.starts_with("session:") => Route::Partition(1),
        _ => Route::Partition(2),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cache: Cache<String, u32> = Cache::builder().name("app").build()?;
    let streams = Streams::builder(&cache).partitions(3).hash(custom_hash).start()?;
    let mut subscribers =
        (0..3).map(|p| cache.subscribe(SubscribeOptions::new().partition(p))).collect::<Result<Vec<_>, _>>()?;

    cache.put("user:1".to_string(), 1);
    cache.put("session:9".to_string(), 2);
    cache.put("config:theme".to_string(), 3);
    cache.put("user:2".to_string(), 4);
    streams.stop();

    for sub in &mut subscribers {
        while let Some(Ok(event)) = sub.recv_blocking() {
            println!("partition {}: {} {:?}", sub.partition(), event.kind, event.target);
        }
    }
    Ok(())
}

//! Event filtering: a subscriber that only wants insertions and deletions.
//!
//! Run with `cargo run --release --example filtering`.

use nebulex::{Cache, EventType};
use nebulex_streams::{Streams, StreamsExt, SubscribeOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cache: Cache<String, u32> = Cache::builder().name("users").build()?;
    let streams = Streams::builder(&cache).start()?;

    // Only listen for insertions and deletions.
    let mut events = cache.subscribe(SubscribeOptions::new().events([EventType::Inserted, EventType::Deleted]))?;

    cache.put("user:1".to_string(), 30); // inserted
    cache.put("user:1".to_string(), 31); // updated: filtered out
    cache.put("user:2".to_string(), 40); // inserted
    cache.delete("user:1"); // deleted
    streams.stop();

    // A plain thread can read a subscription too.
    std::thread::spawn(move || {
        while let Some(item) = events.recv_blocking() {
            match item {
                Ok(event) => println!("{} {:?} (version {})", event.kind, event.target, event.version),
                Err(lagged) => println!("missed {} events", lagged.0),
            }
        }
    })
    .join()
    .map_err(|_| "subscriber thread panicked")?;
    Ok(())
}

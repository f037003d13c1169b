//! The quick start: a cache, a stream, a subscriber task, and the events of
//! an insert, an update and a delete of "user:123".
//!
//! Run with `cargo run --release --example quickstart`.

use futures::StreamExt;
use nebulex::Cache;
use nebulex_streams::{Streams, StreamsExt, SubscribeOptions};

#[derive(Clone, Debug)]
#[allow(dead_code)] // printed through Debug only
struct User {
    name: String,
    age: u32,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. The cache.
    let cache: Cache<String, User> = Cache::builder().name("users").max_entries(100_000).build()?;

    // 2. Its stream.
    let streams = Streams::builder(&cache).start()?;

    // 3. A subscriber, in its own task.
    let mut events = cache.subscribe(SubscribeOptions::new())?;
    let handler = tokio::spawn(async move {
        while let Some(item) = events.next().await {
            match item {
                Ok(event) => println!("Cache event: {} for key {:?}", event.kind, event.target),
                Err(lagged) => println!("missed {} events", lagged.0),
            }
        }
    });

    // 4. Cache operations.
    cache.put("user:123".to_string(), User { name: "Alice".into(), age: 30 });
    cache.put("user:123".to_string(), User { name: "Alice".into(), age: 31 });
    cache.delete("user:123");

    // Stopping the stream ends the subscription once it has drained.
    streams.stop();
    handler.await?;
    Ok(())
}

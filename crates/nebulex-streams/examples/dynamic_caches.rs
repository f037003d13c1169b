//! Dynamic caches: caches created at run time, each with its own stream and
//! subscribers. A dynamic cache is simply another `Cache` with its own name.
//!
//! Run with `cargo run --release --example dynamic_caches`.

use nebulex::Cache;
use nebulex_streams::{Streams, StreamsExt, SubscribeOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tenants = ["acme", "globex", "initech"];
    let mut caches = Vec::new();
    for tenant in tenants {
        let cache: Cache<String, String> = Cache::builder().name(format!("tenant_{tenant}")).build()?;
        Streams::builder(&cache).start()?;
        let events = cache.subscribe(SubscribeOptions::new())?;
        caches.push((cache, events));
    }

    for (cache, _) in &caches {
        cache.put("greeting".to_string(), format!("hello from {}", cache.name()));
    }

    for (cache, events) in &mut caches {
        while let Ok(event) = events.try_recv() {
            println!("{}: {} {:?}", event.cache, event.kind, event.target);
        }
        // Each cache's stream is found from the cache itself.
        let info = Streams::lookup(cache).ok_or("stream not found")?.info();
        println!("  stream of {} on node {}", info.cache, info.node);
    }
    Ok(())
}

//! Partitioned processing: the stream is split into one partition per core,
//! and one task per partition handles its share of the events. Every event of
//! a key lands in the same partition, in order.
//!
//! Run with `cargo run --release --example partitioned`.

use futures::StreamExt;
use nebulex::Cache;
use nebulex_streams::{Streams, StreamsExt, SubscribeOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let partitions = std::thread::available_parallelism().map_or(2, |n| n.get()) as u32;
    let cache: Cache<String, u64> = Cache::builder().name("sessions").build()?;
    let streams = Streams::builder(&cache).partitions(partitions).start()?;

    // One handler per partition, like a supervisor with one child each.
    let mut handlers = Vec::new();
    for partition in 0..partitions {
        let mut events = cache.subscribe(SubscribeOptions::new().partition(partition))?;
        handlers.push(tokio::spawn(async move {
            let mut handled = 0;
            while let Some(item) = events.next().await {
                match item {
                    Ok(event) => {
                        println!("Partition {partition}: {} for {:?}", event.kind, event.target);
                        handled += 1;
                    }
                    Err(lagged) => println!("Partition {partition}: missed {} events", lagged.0),
                }
            }
            (partition, handled)
        }));
    }

    for i in 0..8u64 {
        cache.put(format!("session:{i}"), i);
    }
    cache.delete("session:3");
    streams.stop();

    for handler in handlers {
        let (partition, handled) = handler.await?;
        println!("partition {partition} handled {handled} events");
    }
    Ok(())
}

//! Telemetry: an observer that logs broadcast errors (here, a subscriber whose
//! small buffer overflows), next to `tracing` output of the same reports (the
//! lag they add up to, at level warn; each failed broadcast, at level trace).
//!
//! Run with `cargo run --release --example telemetry`.

use nebulex::Cache;
use nebulex_streams::{BroadcastStatus, Streams, StreamsExt, SubscribeOptions, Telemetry};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `tracing` reports go to stderr (RUST_LOG=nebulex_streams=trace adds each
    // failed broadcast).
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("nebulex_streams=warn")),
        )
        .with_writer(std::io::stderr)
        .init();

    let cache: Cache<String, u32> = Cache::builder().name("users").build()?;
    let streams = Streams::builder(&cache)
        .buffer(4)
        .observer(|t: &Telemetry<String>| match t {
            Telemetry::Broadcast { status: BroadcastStatus::Error, reason: Some(reason), topic, event } => {
                println!("Stream broadcast failed on {topic}: {reason} (dropped {} of {:?})", event.kind, event.target)
            }
            Telemetry::ListenerRegistered { cache } => println!("stream started on {cache}"),
            Telemetry::Lagged { partition, missed, .. } => {
                println!("subscriber of partition {partition} learns it missed {missed} events")
            }
            _ => {}
        })
        .start()?;

    let mut slow = cache.subscribe(SubscribeOptions::new())?;
    for i in 0..6 {
        cache.put(format!("user:{i}"), i);
    }
    streams.stop();
    while let Some(item) = slow.recv_blocking() {
        match item {
            Ok(event) => println!("received {} {:?}", event.kind, event.target),
            Err(lagged) => println!("received Lagged({})", lagged.0),
        }
    }
    Ok(())
}

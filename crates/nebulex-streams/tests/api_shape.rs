//! A copy of `shared/api_shape.rs`: the public API of DESIGN.md, in use. It asserts nothing: it only has to
//! compile. Keep a copy of it compiling in the project's test suite (e.g.
//! `crates/nebulex-streams/tests/api_shape.rs`, with features `redis` and
//! `nats`), so that the documented API and the real one never drift apart.
//! If you improve the API, change the copy and say why in the issue note.
#![allow(dead_code, unused_variables, unused_must_use, clippy::all)]

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use nebulex::{Cache, CacheEntryEvent, Command, EventType, NodeId, Query, Target};
use nebulex_streams::{
    Error, EventScope, Invalidator, Lagged, PubSub, Route, Streams, StreamsExt, StreamsInfo, SubscribeOptions,
    Subscription, TryRecvError,
};

fn cache_api() -> Result<(), nebulex::Error> {
    let cache: Cache<String, u32> = Cache::builder()
        .name("users")
        .max_entries(100_000)
        .default_ttl(Duration::from_secs(300))
        .sweep_interval(Duration::from_secs(1))
        .build()?;
    let k = "user:1".to_string();
    cache.put(k.clone(), 1);
    cache.put_with_ttl(k.clone(), 1, Duration::from_secs(1));
    let _: bool = cache.put_new(k.clone(), 2);
    let _: bool = cache.replace(k.clone(), 3);
    cache.put_all(vec![(k.clone(), 4)]);
    let _: bool = cache.put_new_all(vec![(k.clone(), 5)]);
    let _: Option<u32> = cache.get(&k);
    let _: Option<u32> = cache.get("user:1"); // &str lookups on String keys
    let _: bool = cache.contains_key(&k);
    let _: Option<u32> = cache.take(&k);
    let _: bool = cache.delete(&k);
    let _: usize = cache.delete_all(Query::All);
    let _: usize = cache.delete_all(Query::Keys(vec![k.clone()]));
    let _: usize = cache.count_all(Query::All);
    let _: Option<Option<Duration>> = cache.ttl(&k);
    let _: bool = cache.expire(&k, Duration::from_secs(5));
    let _: bool = cache.touch(&k);
    let _: u32 = cache.update(k.clone(), 0, |v| v + 1);
    let _: u32 = cache.get_or_insert_with(k.clone(), || 7);
    let _: usize = cache.len();
    let _: bool = cache.is_empty();
    let counters: Cache<String, i64> = Cache::builder().build()?;
    let _: i64 = counters.incr("hits".to_string(), 1);
    let _: i64 = counters.decr("hits".to_string(), 1);
    Ok(())
}

fn event_shape(e: &CacheEntryEvent<String>) {
    let _: &str = &e.cache;
    let kind: EventType = e.kind;
    let _: String = kind.to_string(); // "inserted", "updated", ...
    match &e.target {
        Target::Key(k) => {}
        Target::Keys(ks) => {}
        Target::All => {}
    }
    let _: Command = e.command;
    let _: u64 = e.version;
    let _: NodeId = e.metadata.node;
    let _: Option<u32> = e.metadata.partition;
    let _: Option<u32> = e.metadata.partitions;
    let _: u64 = e.metadata.seq;
}

async fn streams_api(cache: Cache<String, u32>) -> Result<(), Error> {
    let streams: Streams<String> = Streams::builder(&cache)
        .partitions(4)
        .hash(|e: &CacheEntryEvent<String>| match &e.target {
            Target::Key(k) if k.starts_with("temp:") => Route::Discard,
            _ => Route::Partition(0),
        })
        .buffer(65_536)
        .broadcast_from(false)
        .observer(|t| {
            let _ = t;
        })
        .start()?;
    let info: StreamsInfo = streams.info();
    let _: NodeId = info.node;
    let _: Option<u32> = info.partitions;
    let _: Option<bool> = info.connected;
    let _: Option<Streams<String>> = Streams::lookup(&cache);

    let mut sub: Subscription<String> =
        cache.subscribe(SubscribeOptions::new().events([EventType::Inserted, EventType::Deleted]).partition(1))?;
    let _: u32 = sub.partition();
    let _: Option<Result<Arc<CacheEntryEvent<String>>, Lagged>> = sub.next().await;
    let _: Option<Result<Arc<CacheEntryEvent<String>>, Lagged>> = sub.recv().await;
    let _: Option<Result<Arc<CacheEntryEvent<String>>, Lagged>> = sub.recv_blocking();
    match sub.try_recv() {
        Ok(event) => {}
        Err(TryRecvError::Empty) | Err(TryRecvError::Closed) => {}
        Err(TryRecvError::Lagged(n)) => {
            let _: u64 = n;
        }
    }
    streams.stop();
    Ok(())
}

async fn cluster_api(a: Cache<String, u32>) -> Result<(), Error> {
    let bus = PubSub::memory();
    let redis = PubSub::redis("redis://127.0.0.1:6379/");
    let nats = PubSub::nats("nats://127.0.0.1:4222");
    let streams = Streams::builder(&a).partitions(4).pubsub(redis).start()?;
    streams.ready().await?;
    let inv: Invalidator = Invalidator::builder(&streams).scope(EventScope::Remote).start()?;
    inv.stop();
    Ok(())
}

fn errors(e: Error) {
    match e {
        Error::AlreadyStarted
        | Error::StreamNotStarted
        | Error::EmptyEventFilter
        | Error::NotPartitioned
        | Error::NoRuntime => {}
        Error::InvalidOption(msg) => {}
        Error::PartitionOutOfRange { partition, partitions } => {
            let _: (u32, u32) = (partition, partitions);
        }
        _ => {} // transport errors and later additions
    }
}

/// The API above compiles: that is the whole test.
#[test]
fn api_shape_compiles() {}

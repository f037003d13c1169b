//! A near cache kept consistent across nodes by the Invalidator, over Redis.
//!
//! Each node caches reads of a system of record (read-through with
//! `get_or_insert_with`); a write on one node removes the stale copy on every
//! other node.
//!
//! Two nodes in one process, against the Redis at `NBX_REDIS_URL` (default
//! `redis://127.0.0.1:6379/`), with an in-process map as the "database":
//!
//! ```text
//! cargo run --release --example near_cache
//! ```
//!
//! Or one node per process, the database being a Redis hash both share
//! (`nbx:near_cache:db`, kept between runs: `del KEY` removes a record): run
//! this in two terminals, then type `set user:1 Alice` and `get user:1` in
//! one (cached), `set user:1 Bob` in the other, and `get user:1` again in the
//! first (its copy was invalidated: it reloads `Bob`):
//!
//! ```text
//! cargo run --release --example near_cache -- --node a
//! cargo run --release --example near_cache -- --node b
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use nebulex::Cache;
use nebulex_streams::{
    EventScope, Invalidator, InvalidatorEvent, PubSub, Streams, StreamsExt, SubscribeOptions, Telemetry,
};
use redis::AsyncCommands;
use tokio::io::AsyncBufReadExt;

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Node {
    name: String,
    cache: Cache<String, String>,
    streams: Streams<String>,
    _invalidator: Invalidator,
}

/// A node: a cache named "users", its stream over Redis, and its invalidator
/// (which, when `show` is set, prints each removal it makes).
async fn node(name: &str, url: &str, show: bool) -> Result<Node, Error> {
    let cache: Cache<String, String> = Cache::builder().name("users").max_entries(10_000).build()?;
    let mut builder = Streams::builder(&cache).partitions(4).pubsub(PubSub::redis(url));
    if show {
        builder = builder.observer(|t: &Telemetry<String>| {
            if let Telemetry::Invalidator { event: InvalidatorEvent::Invalidate { count, .. }, .. } = t {
                if *count > 0 {
                    let copies = if *count == 1 { "copy" } else { "copies" };
                    println!("  [invalidated: {count} local {copies} removed]");
                }
            }
        });
    }
    let streams = builder.start()?;
    tokio::time::timeout(Duration::from_secs(5), streams.ready())
        .await
        .map_err(|_| format!("Redis at {url} did not answer within 5 s"))??;
    let invalidator = Invalidator::builder(&streams).scope(EventScope::Remote).start()?;
    Ok(Node { name: name.to_string(), cache, streams, _invalidator: invalidator })
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let url = std::env::var("NBX_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_string());
    let args: Vec<String> = std::env::args().collect();
    let outcome = match args.iter().position(|a| a == "--node") {
        Some(i) => interactive(args.get(i + 1).map_or("node", String::as_str), &url).await,
        None => two_nodes(&url).await,
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("near_cache: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Two nodes in one process, scripted.
async fn two_nodes(url: &str) -> Result<(), Error> {
    let db: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    db.lock().unwrap().insert("user:1".into(), "Alice, 30".into());
    let a = node("a", url, false).await?;
    let b = node("b", url, false).await?;
    let read = |node: &Node| {
        let db = db.clone();
        let key = "user:1".to_string();
        let value = node.cache.get_or_insert_with(key.clone(), move || {
            let v = db.lock().unwrap().get(&key).cloned().unwrap_or_default();
            println!("  (loaded from the database: {v})");
            v
        });
        println!("node {} reads user:1 = {value}", node.name);
    };

    read(&a);
    read(&b);
    read(&b); // a hit: no load

    println!("node a updates user:1 in the database, then in its cache");
    db.lock().unwrap().insert("user:1".into(), "Alice, 31".into());
    a.cache.put("user:1".into(), "Alice, 31".into());
    wait_until_gone(&b, "user:1").await?;
    println!("node b's stale copy is gone");
    read(&b);

    println!("node b deletes user:1");
    db.lock().unwrap().remove("user:1");
    b.cache.delete("user:1");
    wait_until_gone(&a, "user:1").await?;
    println!("node a's copy is gone too: len a = {}, len b = {}", a.cache.len(), b.cache.len());
    a.streams.shutdown().await;
    b.streams.shutdown().await;
    Ok(())
}

async fn wait_until_gone(node: &Node, key: &str) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while node.cache.contains_key(key) {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("node {}: {key} was not invalidated within 5 s", node.name).into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// One node per process; the database is a Redis hash.
async fn interactive(name: &str, url: &str) -> Result<(), Error> {
    let node = node(name, url, true).await?;
    let mut db = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
    let table = "nbx:near_cache:db";
    println!("node {name} ready (commands: get KEY | set KEY VALUE | del KEY | show | quit)");

    // Show what other nodes change (one subscription per partition).
    for p in 0..4 {
        let mut remote = node.cache.subscribe(SubscribeOptions::new().scope(EventScope::Remote).partition(p))?;
        tokio::spawn(async move {
            while let Some(Ok(e)) = remote.next().await {
                println!("  [node {}: {} {:?}]", e.metadata.node, e.kind, e.target);
            }
        });
    }

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["get", key] => {
                let key = key.to_string();
                let cached = node.cache.get(&key);
                let value = match cached {
                    Some(v) => format!("{v} (cached)"),
                    None => {
                        // The read runs inside the load: if another node's
                        // change arrives meanwhile, what it read is not kept.
                        let read = || {
                            let (mut db, key) = (db.clone(), key.clone());
                            async move {
                                match db.hget::<_, _, Option<String>>(table, &key).await {
                                    Ok(Some(v)) => Ok(v),
                                    Ok(None) => Err(None),
                                    Err(e) => Err(Some(e.to_string())),
                                }
                            }
                        };
                        match node.cache.try_get_or_insert_with_async(key.clone(), read).await {
                            Ok(v) => format!("{v} (loaded from the database)"),
                            Err(e) => match &*e {
                                None => "(not in the database)".to_string(),
                                Some(e) => format!("(database error: {e})"),
                            },
                        }
                    }
                };
                println!("{value}");
            }
            ["set", key, value @ ..] => {
                let value = value.join(" ");
                let () = db.hset(table, key, &value).await?;
                node.cache.put(key.to_string(), value);
                println!("ok");
            }
            ["del", key] => {
                let () = db.hdel(table, key).await?;
                node.cache.delete(*key);
                println!("ok");
            }
            ["show"] => println!("{} entries cached", node.cache.len()),
            ["quit"] | ["exit"] => break,
            [] => {}
            _ => println!("commands: get KEY | set KEY VALUE | del KEY | show | quit"),
        }
    }
    // Sends this node's last changes before the process exits.
    node.streams.shutdown().await;
    Ok(())
}

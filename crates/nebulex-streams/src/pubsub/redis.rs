//! The Redis transport: Redis Pub/Sub, one channel per partition.
//!
//! Two connections per node: a Pub/Sub connection that subscribes every
//! channel and reads frames, and a multiplexed connection that publishes
//! batches of frames in one pipeline. Either one, when lost, is reconnected
//! with exponential backoff; the subscriber resubscribes every channel and
//! reports the loss, which the stream turns into a gap on every partition
//! (Pub/Sub does not replay what was published meanwhile).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use nebulex::NodeId;
use redis::aio::MultiplexedConnection;
use tokio::sync::watch;

use super::{
    keep_subscribed, redact, runtime, spawn_receiver, Backoff, Ended, Hooks, Link, LinkConfig, CONNECT_TIMEOUT,
};
use crate::error::Error;

struct RedisLink {
    client: redis::Client,
    channels: Vec<String>,
    backoff: Backoff,
    /// The publishing connection, once made.
    publisher: tokio::sync::Mutex<Publisher>,
    shutdown: watch::Sender<bool>,
}

#[derive(Default)]
struct Publisher {
    conn: Option<MultiplexedConnection>,
    failures: u32,
    /// No reconnection attempt before this instant (backoff).
    retry_at: Option<Instant>,
}

/// Connects to Redis at `url` in background tasks.
pub(crate) fn open(url: &str, config: LinkConfig) -> Result<Arc<dyn Link>, Error> {
    // `rediss://` needs a process-wide rustls crypto provider; the
    // application may have installed its own, which is then kept.
    #[cfg(feature = "tls")]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client =
        redis::Client::open(url).map_err(|e| Error::Transport(format!("invalid Redis URL `{}`: {e}", redact(url))))?;
    let rt = runtime()?;
    let (shutdown, stop) = watch::channel(false);
    let link = Arc::new(RedisLink {
        client: client.clone(),
        channels: config.channels.clone(),
        backoff: config.backoff,
        publisher: tokio::sync::Mutex::new(Publisher::default()),
        shutdown,
    });
    let guard = (config.hooks.clone(), config.ready.clone());
    spawn_receiver(&rt, guard, subscribe_loop(client, config, stop));
    Ok(link)
}

/// Subscribes every channel and hands frames to the stream, reconnecting
/// until shut down.
async fn subscribe_loop(client: redis::Client, config: LinkConfig, stop: watch::Receiver<bool>) {
    let channels: Arc<[String]> = config.channels.clone().into();
    let (hooks, liveness) = (config.hooks.clone(), config.liveness);
    let connect = || {
        let (client, channels) = (client.clone(), channels.clone());
        async move { subscribe(&client, &channels).await.map_err(|e| format!("cannot subscribe to Redis: {e}")) }
            .boxed()
    };
    let node = config.node;
    // The send time of the latest of this node's own frames heard back, over
    // every connection (none was sent before the link was opened).
    let own_heard = Arc::new(AtomicU64::new(crate::wire::unix_micros(std::time::SystemTime::now())));
    let run = |stream, stop| {
        let own = (node, own_heard.clone());
        pump(stream, channels.clone(), hooks.clone(), own, liveness, stop).boxed()
    };
    let server = ("Redis", CONNECT_TIMEOUT, "Redis Pub/Sub connection lost");
    keep_subscribed(&config, server, stop, connect, run).await;
}

async fn subscribe(client: &redis::Client, channels: &[String]) -> Result<redis::aio::PubSubStream, String> {
    let mut pubsub = client.get_async_pubsub().await.map_err(|e| one_line(&e))?;
    pubsub.subscribe(channels).await.map_err(|e| one_line(&e))?;
    Ok(pubsub.into_on_message())
}

/// A Redis error on one line; an answer that is not Redis's says so.
fn one_line(e: &redis::RedisError) -> String {
    if e.kind() == redis::ErrorKind::Parse {
        return "its answer is not Redis's (is this a Redis server?)".into();
    }
    e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Reads frames until the connection ends or the link is closed.
///
/// A connection that hangs without closing (a frozen server, a lost route)
/// would wait for ever: Redis sends this node's own frames back, and it
/// sends one on every partition at least once a heartbeat, so hearing
/// nothing at all for `liveness` ends it too.
///
/// The client queues what the server sends without bound, so the server
/// never finds this reader slow: when frames come faster than they are
/// handled, the queue would grow for ever. This node's own frames, back
/// more than [`behind_limit`] after they were sent (by this node's clock),
/// say so: the connection is ended, its queue with it, as a lost one (a
/// loss of unknown size, which an invalidator flushes). Anyone may publish
/// a frame that says it is this node's (the check runs before any other):
/// only one sent after the latest of its own heard back, and not in the
/// future, is taken for a measure of the lag.
async fn pump(
    mut stream: redis::aio::PubSubStream,
    channels: Arc<[String]>,
    hooks: Arc<Hooks>,
    (node, own_heard): (NodeId, Arc<AtomicU64>),
    liveness: Duration,
    mut stop: watch::Receiver<bool>,
) -> Ended {
    let behind_limit = u64::try_from(behind_limit(liveness).as_micros()).unwrap_or(u64::MAX);
    loop {
        tokio::select! {
            msg = tokio::time::timeout(liveness, stream.next()) => match msg {
                Ok(Some(msg)) => {
                    let bytes = msg.get_payload_bytes();
                    if let Some((_, sent)) = crate::wire::peek_origin_sent(bytes).filter(|(o, _)| *o == node) {
                        let now = crate::wire::unix_micros(std::time::SystemTime::now());
                        // (Redis keeps a publisher's order: an earlier one
                        // heard after a later one is a replay.)
                        let latest = sent > own_heard.load(Ordering::Relaxed) && sent <= now.saturating_add(FUTURE_SLACK_US);
                        if latest {
                            own_heard.store(sent, Ordering::Relaxed);
                        }
                        let behind = now.saturating_sub(sent);
                        if latest && behind > behind_limit {
                            tracing::warn!(target: "nebulex_streams", behind_ms = behind / 1_000,
                                "Redis Pub/Sub is behind: this node's own frames come back late; reconnecting");
                            return Ended::Lost;
                        }
                    }
                    if let Some(index) = channels.iter().position(|c| c == msg.get_channel_name()) {
                        (hooks.on_frame)(index, bytes);
                    }
                }
                Ok(None) => return Ended::Lost,
                Err(_) => {
                    tracing::warn!(target: "nebulex_streams", ?liveness,
                        "Redis Pub/Sub heard nothing, not even this node's own heartbeats: the connection hangs");
                    return Ended::Lost;
                }
            },
            _ = stop.changed() => return Ended::Stopped,
        }
    }
}

/// How far ahead of this node's clock its own frame may say it was sent
/// (clocks read on different cores): 1 s.
const FUTURE_SLACK_US: u64 = 1_000_000;

/// How far behind this node's own frames a subscription may fall (twice
/// `liveness`, and at least 10 s) before it is made again.
fn behind_limit(liveness: Duration) -> Duration {
    liveness.saturating_mul(2).max(Duration::from_secs(10))
}

impl RedisLink {
    /// The publishing connection, (re)connecting unless backing off.
    async fn connection(&self, publisher: &mut Publisher) -> Option<MultiplexedConnection> {
        if let Some(conn) = &publisher.conn {
            return Some(conn.clone());
        }
        if publisher.retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        let made = tokio::time::timeout(CONNECT_TIMEOUT, self.client.get_multiplexed_async_connection()).await;
        match made {
            Ok(Ok(conn)) => {
                publisher.failures = 0;
                publisher.retry_at = None;
                publisher.conn = Some(conn.clone());
                Some(conn)
            }
            _ => {
                self.failed(publisher);
                None
            }
        }
    }

    fn failed(&self, publisher: &mut Publisher) {
        publisher.conn = None;
        publisher.retry_at = Some(Instant::now() + self.backoff.delay(publisher.failures));
        publisher.failures = publisher.failures.saturating_add(1);
    }
}

impl Link for RedisLink {
    fn publish(&self, frames: Vec<(usize, Arc<[u8]>)>) -> BoxFuture<'_, usize> {
        Box::pin(async move {
            let total = frames.len();
            let mut publisher = self.publisher.lock().await;
            let Some(mut conn) = self.connection(&mut publisher).await else { return total };
            let mut pipe = redis::pipe();
            for (index, bytes) in &frames {
                if let Some(channel) = self.channels.get(*index) {
                    pipe.publish(channel, &bytes[..]).ignore();
                }
            }
            // Others may publish while this pipeline is in flight.
            drop(publisher);
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => 0,
                Err(e) => {
                    tracing::warn!(target: "nebulex_streams", error = %e, frames = total, "Redis publish failed");
                    self.failed(&mut *self.publisher.lock().await);
                    total
                }
            }
        })
    }

    fn close(&self) {
        self.shutdown.send_replace(true);
    }
}

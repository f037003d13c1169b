//! The peers of the cluster figures: the engine's own Rust client doing the
//! least it can — publish 64-byte messages to one subscriber — on the same
//! throwaway server and the same runtime as ours.
//!
//! * Redis (`redis` crate): `PUBLISH` in pipelines of 64 over a multiplexed
//!   connection, read by an async Pub/Sub connection.
//! * NATS (`async-nats`): `publish` on one client (the client batches
//!   writes by itself), read by a subscription on another.

use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use nebulex_streams::PubSub;
use tokio::runtime::Runtime;

use super::progress::note;
use super::stream::{nanos_since, pace_gently, DRAIN_TIMEOUT, LATENCY_RATE};
use super::BenchResult;

/// Size of every raw message.
const MESSAGE_BYTES: usize = 64;
/// Commands per Redis pipeline.
const PIPELINE: usize = 64;
/// The channel (Redis) or subject (NATS) of the raw figures.
const CHANNEL: &str = "nbx-bench-raw";
/// How long the warm-up round trip may take.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the raw subscriber of the throughput figure waits for its next
/// message before the ones still missing count as lost: core NATS delivers
/// at most once (a reader the server finds slow loses messages, unannounced).
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// A cluster engine on a throwaway server.
pub(crate) enum Engine {
    /// Redis at this URL.
    Redis(String),
    /// NATS at this URL.
    Nats(String),
}

impl Engine {
    /// `redis` or `nats`.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Engine::Redis(_) => "redis",
            Engine::Nats(_) => "nats",
        }
    }

    /// The transport of a stream over this engine.
    pub(crate) fn pubsub(&self) -> PubSub {
        match self {
            Engine::Redis(url) => PubSub::redis(url),
            Engine::Nats(url) => PubSub::nats(url),
        }
    }
}

/// What the raw subscriber of the throughput figure received.
pub(crate) struct RawRate {
    /// Messages received per second, from the first publish until the last
    /// message in.
    pub(crate) per_sec: f64,
    /// Messages published that never arrived (none unless the engine dropped
    /// them).
    pub(crate) lost: usize,
}

/// `n` raw messages published as fast as the client goes, from the first
/// publish until the subscriber has the last one that arrives.
pub(crate) fn publish(rt: &Runtime, engine: &Engine, n: usize) -> BenchResult<RawRate> {
    let (start, (got, done)) = rt.block_on(async {
        match engine {
            Engine::Redis(url) => redis_publish(url, n).await,
            Engine::Nats(url) => nats_publish(url, n).await,
        }
    })?;
    if got == 0 {
        return Err(format!("the raw subscriber received none of {n} messages").into());
    }
    let lost = n - got;
    if lost > 0 {
        note(format!("LOST {lost} of {n} raw messages on the way (the rate counts those received)"));
    }
    Ok(RawRate { per_sec: got as f64 / done.duration_since(start).as_secs_f64().max(f64::MIN_POSITIVE), lost })
}

/// Raw publish-to-receive latency: a publisher and a subscriber kept
/// connected across measurement windows (interleaved with ours).
pub(crate) struct Prober {
    publisher: Publisher,
    /// The subscriber's messages, between windows.
    messages: Option<Messages>,
    /// The instant message stamps count from.
    base: Instant,
}

impl Prober {
    /// Connects both sides and waits for one round trip.
    pub(crate) fn connect(rt: &Runtime, engine: &Engine) -> BenchResult<Self> {
        let (publisher, messages) = rt.block_on(connect(engine))?;
        Ok(Prober { publisher, messages: Some(messages), base: Instant::now() })
    }

    /// Publishes `events` messages at [`LATENCY_RATE`] per second, each
    /// carrying the instant just before its publish; the histogram of their
    /// publish-to-receive times, in nanoseconds.
    pub(crate) fn window(&mut self, rt: &Runtime, events: usize) -> BenchResult<Histogram<u64>> {
        let base = self.base;
        let mut messages = self.messages.take().ok_or("the raw subscriber was lost in an earlier window")?;
        let receiver = rt.spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
            let mut got = 0;
            while got < events {
                let Some(sent) = messages.next().await else { break };
                let now = nanos_since(base);
                histogram.saturating_record(now.saturating_sub(sent).max(1));
                got += 1;
            }
            Ok::<_, hdrhistogram::CreationError>((histogram, got, messages))
        });

        let interval = Duration::from_secs(1) / LATENCY_RATE;
        let start = Instant::now();
        let mut payload = [b'x'; MESSAGE_BYTES];
        for i in 0..events {
            pace_gently(start + interval * i as u32);
            payload[..8].copy_from_slice(&nanos_since(base).to_le_bytes());
            rt.block_on(self.publisher.publish_one(&payload))?;
        }
        let (histogram, got, messages) = join(rt, receiver, "the raw subscriber")??;
        if got != events {
            return Err(format!("raw subscriber received {got} of {events} messages").into());
        }
        self.messages = Some(messages);
        Ok(histogram)
    }
}

/// Waits for a task for at most [`DRAIN_TIMEOUT`].
fn join<T>(rt: &Runtime, task: tokio::task::JoinHandle<T>, what: &str) -> BenchResult<T> {
    let abort = task.abort_handle();
    match rt.block_on(tokio::time::timeout(DRAIN_TIMEOUT, task)) {
        Ok(joined) => Ok(joined?),
        Err(_) => {
            abort.abort();
            Err(format!("{what} did not finish within {DRAIN_TIMEOUT:?}").into())
        }
    }
}

/// A raw publisher connection.
enum Publisher {
    Redis(redis::aio::MultiplexedConnection),
    Nats(async_nats::Client),
}

impl Publisher {
    /// Publishes one message (Redis: waits for the reply; NATS: hands it to
    /// the client, which writes it at once).
    async fn publish_one(&mut self, payload: &[u8]) -> BenchResult<()> {
        match self {
            Publisher::Redis(conn) => {
                redis::cmd("PUBLISH").arg(CHANNEL).arg(payload).query_async::<i64>(conn).await?;
            }
            Publisher::Nats(client) => client.publish(CHANNEL, bytes::Bytes::copy_from_slice(payload)).await?,
        }
        Ok(())
    }
}

/// What the subscriber receives: the instant each message carries in its
/// first 8 bytes (nanoseconds since the run's base; 0 when it carries none).
type Messages = futures::stream::BoxStream<'static, u64>;

fn stamp_of(payload: &[u8]) -> u64 {
    payload.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes)
}

/// A publisher and a subscriber of [`CHANNEL`], on separate connections,
/// after one message made the round trip.
async fn connect(engine: &Engine) -> BenchResult<(Publisher, Messages)> {
    match engine {
        Engine::Redis(url) => redis_connect(url).await.map(|(conn, m)| (Publisher::Redis(conn), m)),
        Engine::Nats(url) => nats_connect(url, 65_536).await.map(|(client, m)| (Publisher::Nats(client), m)),
    }
}

async fn redis_connect(url: &str) -> BenchResult<(redis::aio::MultiplexedConnection, Messages)> {
    let client = redis::Client::open(url)?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(CHANNEL).await?;
    let mut messages = pubsub.into_on_message().map(|m| stamp_of(m.get_payload_bytes())).boxed();
    let mut conn = client.get_multiplexed_async_connection().await?;
    redis::cmd("PUBLISH").arg(CHANNEL).arg(&[0u8; MESSAGE_BYTES][..]).query_async::<i64>(&mut conn).await?;
    warmed_up(&mut messages).await?;
    Ok((conn, messages))
}

/// The subscription holds `capacity` messages: past it the client drops
/// them as a slow consumer.
async fn nats_connect(url: &str, capacity: usize) -> BenchResult<(async_nats::Client, Messages)> {
    let reader = async_nats::ConnectOptions::new().subscription_capacity(capacity).connect(url).await?;
    let subscription = reader.subscribe(CHANNEL).await?;
    reader.flush().await?;
    // The stream keeps its client alive.
    let mut messages = subscription
        .map(move |m| {
            let _reader = &reader;
            stamp_of(&m.payload)
        })
        .boxed();
    let client = async_nats::connect(url).await?;
    client.publish(CHANNEL, bytes::Bytes::from_static(&[0; MESSAGE_BYTES])).await?;
    client.flush().await?;
    warmed_up(&mut messages).await?;
    Ok((client, messages))
}

/// Waits for the warm-up message.
async fn warmed_up(messages: &mut Messages) -> BenchResult<()> {
    match tokio::time::timeout(WARM_UP_TIMEOUT, messages.next()).await {
        Ok(Some(_)) => Ok(()),
        _ => Err(format!("no raw message came back within {WARM_UP_TIMEOUT:?}").into()),
    }
}

/// Redis: pipelines of [`PIPELINE`] `PUBLISH`es, one after the other, by a
/// task; another task counts what the subscriber receives. Returns (first
/// publish, (messages received, last receive)).
async fn redis_publish(url: &str, n: usize) -> BenchResult<(Instant, (usize, Instant))> {
    let (mut conn, messages) = redis_connect(url).await?;
    let receiver = tokio::spawn(count(messages, n));
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        let payload = [b'x'; MESSAGE_BYTES];
        let mut left = n;
        while left > 0 {
            let batch = left.min(PIPELINE);
            let mut pipe = redis::pipe();
            for _ in 0..batch {
                pipe.publish(CHANNEL, &payload[..]).ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
            left -= batch;
        }
        Ok::<_, redis::RedisError>(())
    });
    sender.await??;
    Ok((start, received(receiver).await?))
}

/// NATS: `n` publishes and a flush, by a task; another task counts what the
/// subscriber receives. Returns (first publish, (messages received, last
/// receive)).
async fn nats_publish(url: &str, n: usize) -> BenchResult<(Instant, (usize, Instant))> {
    let (client, messages) = nats_connect(url, n + 1_024).await?;
    let receiver = tokio::spawn(count(messages, n));
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        let payload = bytes::Bytes::from_static(&[b'x'; MESSAGE_BYTES]);
        for _ in 0..n {
            client.publish(CHANNEL, payload.clone()).await?;
        }
        client.flush().await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    });
    sender.await?.map_err(|e| e.to_string())?;
    Ok((start, received(receiver).await?))
}

/// Counts up to `n` messages, until [`IDLE_TIMEOUT`] passes without one;
/// (how many came, when the last did).
async fn count(mut messages: Messages, n: usize) -> (usize, Instant) {
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(IDLE_TIMEOUT, messages.next()).await {
            Ok(Some(_)) => got += 1,
            Ok(None) => break,
            // The last message came just before this wait began (the clock
            // is not read per message, so as not to slow the peer).
            Err(_) => return (got, Instant::now().checked_sub(IDLE_TIMEOUT).unwrap_or_else(Instant::now)),
        }
    }
    (got, Instant::now())
}

/// What the counting task counted, and when its last message came.
async fn received(receiver: tokio::task::JoinHandle<(usize, Instant)>) -> BenchResult<(usize, Instant)> {
    let abort = receiver.abort_handle();
    match tokio::time::timeout(DRAIN_TIMEOUT, receiver).await {
        Ok(joined) => Ok(joined?),
        Err(_) => {
            abort.abort();
            Err(format!("the raw subscriber was still receiving after {DRAIN_TIMEOUT:?}").into())
        }
    }
}

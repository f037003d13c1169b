//! Cluster figures: two nodes of one cache (node A writes, node B listens)
//! over a throwaway `redis-server` or `nats-server`, against the engine's own
//! client doing the least it can (raw publish to one subscriber), on the same
//! server in the same run.
//!
//! Both nodes live in this process, each with its own connections, so the
//! traffic really crosses the server. Every figure runs on one tokio runtime
//! with two workers (the machine's size), the peers' too.
//!
//! * events/s: A puts N distinct keys as fast as it can; B's subscriber
//!   (scope `Remote`) accounts for every event; from the first put until
//!   the last event is in.
//! * latency: A puts at [`LATENCY_RATE`] per second; from just before each
//!   put until B's subscriber task has the event. Measured in windows
//!   interleaved with the raw client's, each percentile the median window
//!   (a stall of the shared machine spoils one window, not the figure).
//! * the invalidator figures are in [`invalidation`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nebulex::{Cache, NodeId, Target};
use nebulex_streams::{EventScope, Lagged, PubSub, Streams, StreamsExt, SubscribeOptions, Subscription, Telemetry};
use nebulex_testkit::{NatsServer, RedisServer};
use tokio::runtime::Runtime;

use super::invalidation::{self, Invalidation};
use super::progress::{note, step};
use super::raw::{self, Engine};
use super::stream::{latency_window_events, nanos_since, pace_gently, Latency, DRAIN_TIMEOUT, LATENCY_RATE};
use super::workload::median;
use super::{BenchResult, Config};

/// How long a node may take to connect and subscribe.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Keys of warm-up writes: far above any measured key (`0..N`), so the
/// measurements ignore the warm-up's stragglers.
pub(crate) const WARM_KEYS: u64 = u64::MAX / 2;

/// Every cluster figure of one run.
pub(crate) struct ClusterFigures {
    /// Events of each throughput figure.
    pub(crate) events: usize,
    /// Over Redis, if `redis-server` is installed.
    pub(crate) redis: Option<TransportFigures>,
    /// Over NATS, if `nats-server` is installed.
    pub(crate) nats: Option<TransportFigures>,
    /// The invalidator over Redis, if `redis-server` is installed.
    pub(crate) invalidation: Option<Invalidation>,
    /// Why some or all of the above were not measured.
    pub(crate) skipped: Vec<String>,
}

/// Ours and the raw client's figures over one engine.
pub(crate) struct TransportFigures {
    /// Node A to node B, as fast as A can write.
    pub(crate) events: Events,
    /// Raw publish to one subscriber, messages per second.
    pub(crate) raw_publish_per_sec: f64,
    /// Raw messages published that the subscriber never received.
    pub(crate) raw_lost: usize,
    /// Put on A to event in B's subscriber task, paced.
    pub(crate) latency: Latency,
    /// Raw publish to receive, paced alike.
    pub(crate) raw_latency: Latency,
}

/// Node-to-node throughput.
pub(crate) struct Events {
    /// Events per second, from the first put until every event was received
    /// or reported lost.
    pub(crate) per_sec: f64,
    /// Events B's subscriber was told it missed (`Lagged(n)`); 0 when none
    /// was lost.
    pub(crate) lagged: u64,
}

/// Measures every cluster figure whose server is installed, Redis first.
pub(crate) fn measure(config: &Config) -> BenchResult<ClusterFigures> {
    let mut figures = ClusterFigures {
        events: config.cluster_events,
        redis: None,
        nats: None,
        invalidation: None,
        skipped: Vec::new(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    // Streams with a transport start on the ambient runtime.
    let _context = rt.enter();

    if nebulex_testkit::available("redis-server") {
        match step("redis-server", || Ok(RedisServer::start()?)) {
            Ok(server) => {
                // The default limit disconnects a Pub/Sub reader that falls
                // 32 MB behind; a burst of a million events can. Raised for
                // ours and the raw peer alike.
                let reply = server.command(&[b"CONFIG", b"SET", b"client-output-buffer-limit", b"pubsub 0 0 0"])?;
                if reply != "+OK" {
                    return Err(format!("CONFIG SET client-output-buffer-limit: {reply}").into());
                }
                let url = server.url();
                let redis = transport(config, &rt, Engine::Redis(url.clone()))?;
                let raw_publish = redis.raw_publish_per_sec;
                figures.redis = Some(redis);
                let rate = step("invalidations/s (redis)", || invalidation::throughput(config, &rt, &url))?;
                let (latency, raw_latency, resyncs) =
                    step("invalidation latency (redis)", || invalidation::latency(config, &rt, &url))?;
                figures.invalidation = Some(Invalidation {
                    per_sec: rate.per_sec,
                    resyncs: rate.resyncs + resyncs,
                    latency,
                    raw_publish_per_sec: raw_publish,
                    raw_latency,
                });
            }
            Err(err) => figures.skipped.push(format!("redis: {err}")),
        }
    } else {
        figures.skipped.push("redis-server is not installed".into());
    }

    if nebulex_testkit::available("nats-server") {
        match step("nats-server", || Ok(NatsServer::start()?)) {
            Ok(server) => figures.nats = Some(transport(config, &rt, Engine::Nats(server.url()))?),
            Err(err) => figures.skipped.push(format!("nats: {err}")),
        }
    } else {
        figures.skipped.push("nats-server is not installed".into());
    }
    Ok(figures)
}

/// Ours and the raw peer's figures over one engine.
fn transport(config: &Config, rt: &Runtime, engine: Engine) -> BenchResult<TransportFigures> {
    let name = engine.name();
    let n = config.cluster_events;
    let events = step(&format!("{name} events/s, node to node"), || events(config, rt, &engine))?;
    let raw = step(&format!("{name} raw publish/s"), || raw::publish(rt, &engine, n))?;
    let (latency, raw_latency) =
        step(&format!("{name} latency, node to node and raw"), || latencies(config, rt, &engine))?;
    Ok(TransportFigures { events, raw_publish_per_sec: raw.per_sec, raw_lost: raw.lost, latency, raw_latency })
}

/// A bench node: a `u64 -> u64` cache named `name` with node id `id`, big
/// enough for every key of the run.
pub(crate) fn node(config: &Config, name: &str, id: u64) -> BenchResult<Cache<u64, u64>> {
    let capacity = config.cluster_events + config.cluster_events / 10 + 1_000;
    Ok(Cache::builder().name(name).node_id(NodeId(id)).max_entries(capacity).build()?)
}

/// A telemetry observer of a bench node's stream.
pub(crate) type Observer = Box<dyn Fn(&Telemetry<u64>) + Send + Sync>;

/// Starts `cache`'s stream over `pubsub` and waits until it is subscribed.
///
/// Buffers (B's subscribers, A's outbound queue) hold a whole run, so a
/// burst is never dropped for want of room: the figure is the transport's.
pub(crate) fn start_streams(
    config: &Config,
    rt: &Runtime,
    cache: &Cache<u64, u64>,
    pubsub: &PubSub,
    observer: Option<Observer>,
) -> BenchResult<Streams<u64>> {
    let buffer = config.cluster_events + 1_000;
    // `pubsub` first: the cluster options after it apply to it.
    let mut builder = Streams::builder(cache).buffer(buffer).pubsub(pubsub.clone()).outbound_buffer(buffer);
    if let Some(observer) = observer {
        builder = builder.observer(observer);
    }
    let streams = builder.start()?;
    match rt.block_on(tokio::time::timeout(READY_TIMEOUT, streams.ready())) {
        Ok(Ok(())) => Ok(streams),
        Ok(Err(err)) => Err(err.into()),
        Err(_) => Err(format!("not connected within {READY_TIMEOUT:?}").into()),
    }
}

/// Two nodes of cache `name` over one engine: A writes, B listens.
struct Pair {
    a: Cache<u64, u64>,
    /// Kept alive: a stream ends with its cache.
    _b: Cache<u64, u64>,
    a_streams: Streams<u64>,
    b_streams: Streams<u64>,
}

impl Pair {
    /// Starts both nodes, and B's subscriber (scope `Remote`) warmed up.
    fn start(config: &Config, rt: &Runtime, name: &str, pubsub: &PubSub) -> BenchResult<(Self, Subscription<u64>)> {
        let a = node(config, name, 1)?;
        let b = node(config, name, 2)?;
        let a_streams = start_streams(config, rt, &a, pubsub, None)?;
        let b_streams = start_streams(config, rt, &b, pubsub, None)?;
        let mut sub = b.subscribe(SubscribeOptions::new().scope(EventScope::Remote))?;
        warm_up(rt, &a, &mut sub)?;
        Ok((Pair { a, _b: b, a_streams, b_streams }, sub))
    }

    fn stop(&self) {
        self.a_streams.stop();
        self.b_streams.stop();
    }
}

/// Writes warm-up keys on `writer` until `sub` receives one: the publishing
/// connection is made on the first publish, and the first frames pay for
/// lazy set-up on both sides.
fn warm_up(rt: &Runtime, writer: &Cache<u64, u64>, sub: &mut Subscription<u64>) -> BenchResult<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    for i in 0.. {
        if Instant::now() > deadline {
            break;
        }
        writer.put(WARM_KEYS + i, i);
        if let Ok(Some(Ok(_))) = rt.block_on(tokio::time::timeout(Duration::from_millis(50), sub.recv())) {
            return Ok(());
        }
    }
    Err(format!("no event crossed from node A to node B within {READY_TIMEOUT:?}").into())
}

/// How many of the measured keys (`0..n`) an event names.
fn measured(target: &Target<u64>, n: u64) -> u64 {
    match target {
        Target::Key(k) => u64::from(*k < n),
        Target::Keys(ks) => ks.iter().filter(|k| **k < n).count() as u64,
        Target::All => 0,
    }
}

/// What B's subscriber accounted for.
#[derive(Default)]
struct Count {
    /// When the last measured event was accounted for.
    done: Option<Instant>,
    received: u64,
    /// Sum of `Lagged(n)`.
    lagged: u64,
    /// `Lagged(0)` notices: an unknown number lost (a dropped connection).
    unknown: u64,
}

/// A puts `config.cluster_events` distinct keys as fast as it can; B's
/// subscriber task accounts for every one (received or reported lost).
fn events(config: &Config, rt: &Runtime, engine: &Engine) -> BenchResult<Events> {
    let n = config.cluster_events as u64;
    let (pair, mut sub) = Pair::start(config, rt, "nbx-bench-events", &engine.pubsub())?;
    let counter = rt.spawn(async move {
        let mut count = Count::default();
        while count.received + count.lagged < n {
            match sub.recv().await {
                None => return count,
                Some(Ok(event)) => count.received += measured(&event.target, n),
                Some(Err(Lagged(0))) => count.unknown += 1,
                Some(Err(Lagged(missed))) => count.lagged += missed,
            }
        }
        count.done = Some(Instant::now());
        count
    });

    let start = Instant::now();
    for k in 0..n {
        pair.a.put(k, k);
    }
    let puts = start.elapsed();
    let count = finish(rt, &pair, counter)?;
    let Some(done) = count.done else {
        return Err(format!(
            "{} received + {} lagged of {n} events within {DRAIN_TIMEOUT:?} ({} notices of an unknown loss)",
            count.received, count.lagged, count.unknown
        )
        .into());
    };
    let elapsed = done.duration_since(start);
    note(format!(
        "{n} events: puts done after {:.0} ms, last event in after {:.0} ms, {} lagged",
        puts.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e3,
        count.lagged,
    ));
    if count.lagged > 0 {
        note(format!("LOST {} of {n} events on the way (the rate counts them as accounted for)", count.lagged));
    }
    Ok(Events { per_sec: n as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE), lagged: count.lagged })
}

/// Waits for a subscriber task; past [`DRAIN_TIMEOUT`] stops the streams
/// (which ends the task) and returns what it had. Stops the pair either way.
fn finish<T: Send + 'static>(rt: &Runtime, pair: &Pair, mut task: tokio::task::JoinHandle<T>) -> BenchResult<T> {
    let outcome = rt.block_on(tokio::time::timeout(DRAIN_TIMEOUT, &mut task));
    pair.stop();
    match outcome {
        Ok(joined) => Ok(joined?),
        Err(_) => Ok(rt.block_on(task)?),
    }
}

/// Ours and the raw client's latency, in interleaved windows (ours, raw,
/// ours, ...) so that a noisy moment of the machine hits both alike; each
/// percentile is the median over the windows.
///
/// Ours: A puts keys `0..per_window` at [`LATENCY_RATE`] per second; B's
/// subscriber task records, for each, the time from just before the put
/// until it has the event. Raw: the same for a message, publish to receive.
fn latencies(config: &Config, rt: &Runtime, engine: &Engine) -> BenchResult<(Latency, Latency)> {
    let per_window = latency_window_events(config);
    let (pair, sub) = Pair::start(config, rt, "nbx-bench-latency", &engine.pubsub())?;
    let measured = (|| {
        let mut raw = raw::Prober::connect(rt, engine)?;
        let base = Instant::now();
        let stamps: Arc<Vec<AtomicU64>> = Arc::new((0..per_window).map(|_| AtomicU64::new(0)).collect());
        let mut sub = Some(sub);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..config.latency_windows {
            let (histogram, back) = ours_window(rt, &pair, sub.take(), &stamps, base)?;
            sub = Some(back);
            ours.push(Latency::of(&histogram));
            theirs.push(Latency::of(&raw.window(rt, per_window)?));
        }
        Ok::<_, Box<dyn std::error::Error>>((ours, theirs))
    })();
    pair.stop();
    let (ours, theirs) = measured?;
    note(format!(
        "{} windows of {per_window} events, p99 (us) per window: ours {}, raw {}",
        config.latency_windows,
        Latency::p99s(&ours),
        Latency::p99s(&theirs)
    ));
    Ok((Latency::median(&ours), Latency::median(&theirs)))
}

/// One window of our latency: A puts one key per stamp, paced; B's
/// subscriber task (handed back after) records each key's time from its
/// stamp until the event is in.
fn ours_window(
    rt: &Runtime,
    pair: &Pair,
    sub: Option<Subscription<u64>>,
    stamps: &Arc<Vec<AtomicU64>>,
    base: Instant,
) -> BenchResult<(Histogram<u64>, Subscription<u64>)> {
    let mut sub = sub.ok_or("the subscription was lost in an earlier window")?;
    let events = stamps.len() as u64;
    let task_stamps = Arc::clone(stamps);
    let mut task = rt.spawn(async move {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
        let mut count = Count::default();
        while count.received + count.lagged < events {
            match sub.recv().await {
                None => break,
                Some(Ok(event)) => {
                    let now = nanos_since(base);
                    if let Target::Key(k) = &event.target {
                        if let Some(stamp) = usize::try_from(*k).ok().and_then(|i| task_stamps.get(i)) {
                            let sent = stamp.load(Ordering::Acquire);
                            histogram.saturating_record(now.saturating_sub(sent).max(1));
                            count.received += 1;
                        }
                    }
                }
                Some(Err(Lagged(0))) => count.unknown += 1,
                Some(Err(Lagged(missed))) => count.lagged += missed,
            }
        }
        Ok::<_, hdrhistogram::CreationError>((histogram, count, sub))
    });

    let interval = Duration::from_secs(1) / LATENCY_RATE;
    let start = Instant::now();
    for (i, stamp) in stamps.iter().enumerate() {
        pace_gently(start + interval * i as u32);
        stamp.store(nanos_since(base), Ordering::Release);
        pair.a.put(i as u64, i as u64);
    }
    let (histogram, count, sub) = match rt.block_on(tokio::time::timeout(DRAIN_TIMEOUT, &mut task)) {
        Ok(joined) => joined??,
        Err(_) => {
            task.abort();
            return Err(format!("not every event crossed within {DRAIN_TIMEOUT:?} of the last put").into());
        }
    };
    if count.received != events {
        return Err(format!(
            "{} of {events} events received at {LATENCY_RATE} events/s ({} lagged, {} notices of an unknown loss)",
            count.received, count.lagged, count.unknown
        )
        .into());
    }
    Ok((histogram, sub))
}

impl Latency {
    /// The median of each percentile over `windows`.
    pub(crate) fn median(windows: &[Latency]) -> Latency {
        let p50: Vec<f64> = windows.iter().map(|l| l.p50_us).collect();
        let p99: Vec<f64> = windows.iter().map(|l| l.p99_us).collect();
        Latency { p50_us: median(&p50), p99_us: median(&p99) }
    }

    /// The p99 of each of `windows`, in whole microseconds, for progress notes.
    pub(crate) fn p99s(windows: &[Latency]) -> String {
        windows.iter().map(|l| format!("{:.0}", l.p99_us)).collect::<Vec<_>>().join(" ")
    }
}

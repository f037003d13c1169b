//! Invalidator figures over Redis: node B holds keys and runs an
//! `Invalidator` (scope `Remote`); node A writes the same keys; how fast,
//! and how soon, B's copies are gone.
//!
//! * invalidations/s: B holds N keys, A rewrites all of them as fast as it
//!   can; from the first put until B's cache is empty (polled every ~1 ms).
//! * invalidation latency: A puts key k (which B holds) at
//!   [`LATENCY_RATE`] per second; from just before the put until B's
//!   invalidator reports having removed it (its telemetry observer, called
//!   right after the removal; median of windows, as the other cluster
//!   latencies). The writing thread paces its puts as the raw client's
//!   publisher paces its messages (sleeping until shortly before each).
//!
//! Both are compared with the raw Redis figures (`PUBLISH` to one
//! subscriber) of the same run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nebulex::Cache;
use nebulex_streams::{EventScope, Invalidator, InvalidatorEvent, PubSub, Streams, Telemetry};
use tokio::runtime::Runtime;

use super::cluster::{node, start_streams, WARM_KEYS};
use super::progress::note;
use super::raw::{Engine, Prober};
use super::stream::{latency_window_events, nanos_since, pace_gently, Latency, DRAIN_TIMEOUT, LATENCY_RATE};
use super::{BenchResult, Config};

/// Every invalidator figure, with the raw Redis figures they are compared to.
pub(crate) struct Invalidation {
    /// Distinct keys removed from B per second.
    pub(crate) per_sec: f64,
    /// Partition flushes B's invalidator made after a loss (in either
    /// figure): 0 when every key was removed by its own event.
    pub(crate) resyncs: u64,
    /// Put on A to key gone from B, paced.
    pub(crate) latency: Latency,
    /// Raw `PUBLISH` messages per second of the same run.
    pub(crate) raw_publish_per_sec: f64,
    /// Raw `PUBLISH`-to-receive latency, in windows interleaved with ours.
    pub(crate) raw_latency: Latency,
}

/// What the throughput figure measured.
pub(crate) struct Rate {
    /// Distinct keys removed from B per second.
    pub(crate) per_sec: f64,
    /// Flushes after a loss.
    pub(crate) resyncs: u64,
}

/// Node A (writer) and node B (holder, with an invalidator) over Redis.
struct Nodes {
    a: Cache<u64, u64>,
    b: Cache<u64, u64>,
    a_streams: Streams<u64>,
    b_streams: Streams<u64>,
    invalidator: Invalidator,
    /// Resync reports of B's invalidator.
    resyncs: Arc<AtomicU64>,
    /// Removal reports of B's invalidator, while a latency window is open.
    removals: Arc<Removals>,
}

/// When B's invalidator reported each removal during an open window.
#[derive(Default)]
struct Removals {
    state: Mutex<RemovalState>,
}

#[derive(Default)]
struct RemovalState {
    /// The open window's base instant, and each report's time since it
    /// (nanoseconds), in the order of the reports.
    window: Option<(Instant, Vec<u64>)>,
    /// Whether a window was ever opened (reports before are the warm-up's).
    opened: bool,
    /// Reports that fit no window: outside one, or not of one key of
    /// partition 0.
    stray: u64,
}

impl Removals {
    fn lock(&self) -> std::sync::MutexGuard<'_, RemovalState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts recording reports, counted from `base`.
    fn open(&self, base: Instant, capacity: usize) {
        let mut state = self.lock();
        state.window = Some((base, Vec::with_capacity(capacity)));
        state.opened = true;
    }

    /// Records a report of `count` entries removed for an event of
    /// `partition`, now.
    fn record(&self, partition: u32, count: usize) {
        let mut state = self.lock();
        let opened = state.opened;
        match (&mut state.window, partition, count) {
            (Some((base, at)), 0, 1) => at.push(nanos_since(*base)),
            (None, ..) if !opened => {}
            _ => state.stray += 1,
        }
    }

    /// How many reports the open window has.
    fn count(&self) -> usize {
        self.lock().window.as_ref().map_or(0, |(_, at)| at.len())
    }

    /// Reports that fit no window so far.
    fn stray(&self) -> u64 {
        self.lock().stray
    }

    /// Stops recording; the reports of the window.
    fn close(&self) -> Vec<u64> {
        self.lock().window.take().map(|(_, at)| at).unwrap_or_default()
    }
}

impl Nodes {
    /// Both nodes of cache `name`, B holding keys `0..keys`, B's invalidator
    /// started and one invalidation seen to work end to end.
    fn start(config: &Config, rt: &Runtime, url: &str, name: &str, keys: u64) -> BenchResult<Self> {
        let pubsub = PubSub::redis(url);
        let a = node(config, name, 1)?;
        let b = node(config, name, 2)?;
        // Before B's stream starts, so the fill does not cross the network.
        for k in 0..keys {
            b.put(k, k);
        }
        let resyncs = Arc::new(AtomicU64::new(0));
        let removals = Arc::new(Removals::default());
        let (seen, removed) = (Arc::clone(&resyncs), Arc::clone(&removals));
        let observer = move |t: &Telemetry<u64>| match t {
            Telemetry::Invalidator { event: InvalidatorEvent::Resync { .. }, .. } => {
                seen.fetch_add(1, Ordering::Relaxed);
            }
            Telemetry::Invalidator { event: InvalidatorEvent::Invalidate { partition, count }, .. } => {
                removed.record(*partition, *count)
            }
            _ => {}
        };
        let a_streams = start_streams(config, rt, &a, &pubsub, None)?;
        let b_streams = start_streams(config, rt, &b, &pubsub, Some(Box::new(observer)))?;
        // B was filled from nothing while A wrote nothing: nothing is stale.
        let invalidator = Invalidator::builder(&b_streams).scope(EventScope::Remote).keep_cached().start()?;
        let nodes = Nodes { a, b, a_streams, b_streams, invalidator, resyncs, removals };
        if nodes.b_streams.info().partitions.is_some() {
            nodes.stop();
            return Err("the invalidation latency pairs removals with puts in order: it needs one partition".into());
        }
        nodes.warm_up()?;
        if nodes.b.len() != keys as usize {
            nodes.stop();
            return Err(format!("node B holds {} keys after the warm-up, not {keys}", nodes.b.len()).into());
        }
        Ok(nodes)
    }

    /// B takes a warm-up key, A writes it, until B loses one within 50 ms.
    fn warm_up(&self) -> BenchResult<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        for i in 0.. {
            let key = WARM_KEYS + i;
            self.b.put(key, 0);
            self.a.put(key, 0);
            let gone = Instant::now() + Duration::from_millis(50);
            while Instant::now() < gone {
                if !self.b.contains_key(&key) {
                    return Ok(());
                }
                thread::sleep(Duration::from_micros(100));
            }
            if Instant::now() > deadline {
                break;
            }
        }
        self.stop();
        Err("no invalidation crossed from node A to node B within 15 s".into())
    }

    fn stop(&self) {
        self.invalidator.stop();
        self.a_streams.stop();
        self.b_streams.stop();
    }
}

/// B holds `config.cluster_events` keys; A rewrites them all as fast as it
/// can; keys removed from B per second, until B is empty.
pub(crate) fn throughput(config: &Config, rt: &Runtime, url: &str) -> BenchResult<Rate> {
    let n = config.cluster_events as u64;
    let nodes = Nodes::start(config, rt, url, "nbx-bench-invalidate", n)?;
    let start = Instant::now();
    for k in 0..n {
        nodes.a.put(k, k);
    }
    let puts = start.elapsed();
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while !nodes.b.is_empty() {
        if Instant::now() > deadline {
            let left = nodes.b.len();
            nodes.stop();
            return Err(format!("node B still holds {left} of {n} keys {DRAIN_TIMEOUT:?} after the last put").into());
        }
        thread::sleep(Duration::from_millis(1));
    }
    let elapsed = start.elapsed();
    nodes.stop();
    let resyncs = nodes.resyncs.load(Ordering::Relaxed);
    note(format!(
        "{n} keys: puts on A done after {:.0} ms, B empty after {:.0} ms, {resyncs} resyncs",
        puts.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e3,
    ));
    if resyncs > 0 {
        note("B's invalidator lost events and flushed (resync): some keys went without their own event");
    }
    Ok(Rate { per_sec: n as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE), resyncs })
}

/// A puts keys which B holds at [`LATENCY_RATE`] per second, paced as the
/// raw client's messages; each key's time is from just before its put until
/// B's invalidator reports its removal.
///
/// In windows of distinct keys, interleaved with windows of the raw client
/// (ours, raw, ours, ...) as the other cluster latencies, so that a noisy
/// moment hits both alike; each percentile is the median over the windows.
/// Returns ours, the raw client's, and the resyncs.
pub(crate) fn latency(config: &Config, rt: &Runtime, url: &str) -> BenchResult<(Latency, Latency, u64)> {
    let per_window = latency_window_events(config);
    let windows = config.latency_windows;
    let keys = (per_window * windows) as u64;
    let nodes = Nodes::start(config, rt, url, "nbx-bench-invalidation-latency", keys)?;
    let measured = (|| {
        let mut raw = Prober::connect(rt, &Engine::Redis(url.to_string()))?;
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for w in 0..windows {
            ours.push(Latency::of(&invalidation_window(&nodes, (w * per_window) as u64, per_window)?));
            theirs.push(Latency::of(&raw.window(rt, per_window)?));
        }
        Ok::<_, Box<dyn std::error::Error>>((ours, theirs))
    })();
    nodes.stop();
    let (ours, theirs) = measured?;
    note(format!(
        "{windows} windows of {per_window} keys, p99 (us) per window: ours {}, raw {}",
        Latency::p99s(&ours),
        Latency::p99s(&theirs)
    ));
    Ok((Latency::median(&ours), Latency::median(&theirs), nodes.resyncs.load(Ordering::Relaxed)))
}

/// One window of [`latency`]: keys `first..first + events`.
///
/// B applies one partition's events in A's order (the streams have one
/// partition), so the n-th removal it reports is the n-th key put. Fails if
/// a report is missing (a resync removes without one), a report fits no
/// window (another key, or none), a removal is reported before its put, or
/// a key of the window is still on B.
fn invalidation_window(nodes: &Nodes, first: u64, events: usize) -> BenchResult<Histogram<u64>> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let base = Instant::now();
    let (resyncs, stray) = (nodes.resyncs.load(Ordering::Relaxed), nodes.removals.stray());
    nodes.removals.open(base, events);
    // When each key was put, nanoseconds since `base`.
    let mut stamps = Vec::with_capacity(events);
    let interval = Duration::from_secs(1) / LATENCY_RATE;
    let start = Instant::now();
    for (i, key) in (first..first + events as u64).enumerate() {
        pace_gently(start + interval * i as u32);
        stamps.push(nanos_since(base));
        nodes.a.put(key, key);
    }
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while nodes.removals.count() < events
        && nodes.resyncs.load(Ordering::Relaxed) == resyncs
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(1));
    }
    let removed = nodes.removals.close();
    if removed.len() != events {
        let strays = nodes.removals.stray() - stray;
        let held = (first..first + events as u64).filter(|key| nodes.b.contains_key(key)).count();
        return Err(format!(
            "node B reported {} of {events} removals ({strays} reports fit no key of the window, and B still \
             holds {held} of its keys)",
            removed.len()
        )
        .into());
    }
    let strays = nodes.removals.stray() - stray;
    if strays > 0 {
        return Err(format!("node B reported {strays} removals that fit no key of the window").into());
    }
    if let Some(i) = (0..events).find(|&i| removed[i] < stamps[i]) {
        return Err(format!("node B reported the removal of key {} before its put", first + i as u64).into());
    }
    if let Some(key) = (first..first + events as u64).find(|key| nodes.b.contains_key(key)) {
        return Err(format!("key {key} is still on node B after {events} removals were reported").into());
    }
    for (at, put) in removed.iter().zip(&stamps) {
        histogram.saturating_record((at - put).max(1));
    }
    Ok(histogram)
}

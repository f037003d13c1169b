//! Event stream figures: end-to-end throughput (one stream, or one
//! subscriber per partition) and put-to-subscriber latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nebulex::Target;
use nebulex_streams::{Lagged, Streams, StreamsExt, SubscribeOptions, Subscription, TryRecvError};

use super::progress::note;
use super::throughput::moka_filled;
use super::workload::{median, Keys};
use super::{new_cache, BenchResult, Config};

/// How long the subscribers may take to account for every event after the
/// last put, before the run is declared broken.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A subscriber adds its count to the shared tally at least this often (and
/// whenever its queue runs empty), so the shared counter is not a hot spot.
const FLUSH_EVERY: u64 = 4_096;

/// End-to-end throughput of one stream configuration.
pub(crate) struct E2e {
    /// Events per second, from the first put until the subscribers have
    /// accounted for the last event (median over the repetitions).
    pub(crate) events_per_sec: f64,
    /// Events reported as `Lagged` (the most in any repetition); 0 when the
    /// buffer is big enough.
    pub(crate) lagged: u64,
}

/// The end-to-end figures, measured in rounds: each round times moka's
/// inserts, then the stream with 1 partition, then with 4, back to back, so
/// that a noisy moment of a shared machine hits all three alike. Ratios are
/// the medians of each round's ratios.
pub(crate) struct StreamFigures {
    /// One unpartitioned stream, one subscriber.
    pub(crate) one: E2e,
    /// 4 partitions, one subscriber each.
    pub(crate) four: E2e,
    /// moka's insert rate in the same rounds (median).
    pub(crate) moka_insert: f64,
    /// `one` over moka's insert rate.
    pub(crate) vs_moka: f64,
    /// The hardware's reach for the same work, in the same rounds (median):
    /// see [`channel_e2e_once`].
    pub(crate) channel: f64,
    /// `one` over `channel`.
    pub(crate) vs_channel: f64,
    /// `four` over `one`.
    pub(crate) four_vs_one: f64,
}

/// Runs `config.e2e_reps` rounds (see [`StreamFigures`]), each also
/// timing the bare map-and-channel peer.
///
/// In each stream run this thread puts every key while one subscriber
/// thread per partition receives every event with `recv_blocking`. Fails if
/// an event is neither received nor reported as lagged.
pub(crate) fn measure(config: &Config, keys: &Keys) -> BenchResult<StreamFigures> {
    let (mut one, mut four, mut moka) = (Vec::new(), Vec::new(), Vec::new());
    let (mut vs_moka, mut four_vs_one) = (Vec::new(), Vec::new());
    let (mut channel, mut vs_channel) = (Vec::new(), Vec::new());
    let (mut lagged_one, mut lagged_four) = (0, 0);
    let rate = |elapsed: Duration| keys.len() as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
    for round in 1..=config.e2e_reps {
        let (_, moka_fill) = moka_filled(config, keys, None)?;
        let run_one = e2e_once(config, keys, 1)?;
        let run_four = e2e_once(config, keys, 4)?;
        let run_channel = channel_e2e_once(config, keys)?;
        note(format!(
            "round {round}: moka inserts {:.0} ms; last event in after {:.0} ms (1 partition, puts done after \
             {:.0} ms), {:.0} ms (4 partitions), {:.0} ms (map and channel); lagged {} / {}",
            moka_fill.as_secs_f64() * 1e3,
            run_one.elapsed.as_secs_f64() * 1e3,
            run_one.puts.as_secs_f64() * 1e3,
            run_four.elapsed.as_secs_f64() * 1e3,
            run_channel.as_secs_f64() * 1e3,
            run_one.lagged,
            run_four.lagged,
        ));
        let (r_moka, r_one, r_four) = (rate(moka_fill), rate(run_one.elapsed), rate(run_four.elapsed));
        moka.push(r_moka);
        one.push(r_one);
        four.push(r_four);
        vs_moka.push(r_one / r_moka);
        four_vs_one.push(r_four / r_one);
        let r_channel = rate(run_channel);
        channel.push(r_channel);
        vs_channel.push(r_one / r_channel);
        lagged_one = lagged_one.max(run_one.lagged);
        lagged_four = lagged_four.max(run_four.lagged);
    }
    Ok(StreamFigures {
        one: E2e { events_per_sec: median(&one), lagged: lagged_one },
        four: E2e { events_per_sec: median(&four), lagged: lagged_four },
        moka_insert: median(&moka),
        vs_moka: median(&vs_moka),
        four_vs_one: median(&four_vs_one),
        channel: median(&channel),
        vs_channel: median(&vs_channel),
    })
}

/// Shards of the map-and-channel peer.
const PEER_SHARDS: usize = 64;

/// The peer's map: the standard one (hashbrown) with the hash nebulex uses.
type PeerMap = std::collections::HashMap<u64, u64, foldhash::fast::FixedState>;

/// The least a cache with a change stream must do, as a peer for the
/// end-to-end figure: a map sharded behind mutexes, and for every insert a
/// message (key, value, version, whether it was new) sent under the shard's
/// lock over a bounded channel (`std::sync::mpsc::sync_channel`, crossbeam's
/// array queue) to one receiving thread. Returns the time from the first
/// insert until the receiver has the last message.
fn channel_e2e_once(config: &Config, keys: &Keys) -> BenchResult<Duration> {
    let expected = keys.len();
    let per_shard = config.capacity.div_ceil(PEER_SHARDS);
    let shards: Vec<std::sync::Mutex<PeerMap>> = (0..PEER_SHARDS)
        .map(|_| std::sync::Mutex::new(PeerMap::with_capacity_and_hasher(per_shard, Default::default())))
        .collect();
    let (tx, rx) = mpsc::sync_channel::<(u64, u64, u64, bool)>(config.stream_buffer);
    let ready = Arc::new(Barrier::new(2));
    let receiver = {
        let ready = Arc::clone(&ready);
        thread::Builder::new().name("nbx-bench-channel".into()).spawn(move || {
            ready.wait();
            let mut got = 0;
            while got < expected && rx.recv().is_ok() {
                got += 1;
            }
            (got, Instant::now())
        })?
    };
    ready.wait();
    let start = Instant::now();
    for (version, &k) in keys.insert.iter().enumerate() {
        let mut shard = shards[(k >> 58) as usize % PEER_SHARDS].lock().map_err(|_| "a peer shard was poisoned")?;
        let new = shard.insert(k, k).is_none();
        tx.send((k, k, version as u64, new)).map_err(|_| "the peer's receiver ended early")?;
    }
    drop(tx);
    let (got, end) = receiver.join().map_err(|_| "the peer's receiver panicked")?;
    if got != expected {
        return Err(format!("the peer's receiver got {got} of {expected} messages").into());
    }
    Ok(end.duration_since(start))
}

/// One end-to-end run.
struct E2eRun {
    /// From the first put until the last event was accounted for.
    elapsed: Duration,
    /// From the first put until the last put returned (tells whether the
    /// writer or the subscribers set the pace).
    puts: Duration,
    /// Events reported as lagged.
    lagged: u64,
}

/// Events accounted for by all subscribers of one run.
#[derive(Default)]
struct Tally {
    /// Received plus lagged, over every subscriber.
    accounted: AtomicU64,
    /// Lagged only.
    lagged: AtomicU64,
}

impl Tally {
    /// Adds a subscriber's pending count; whoever brings the total to
    /// `expected` reports the instant on `done`.
    fn flush(&self, pending: &mut u64, expected: u64, done: &Sender<Instant>) {
        if *pending == 0 {
            return;
        }
        let total = self.accounted.fetch_add(*pending, Ordering::AcqRel) + *pending;
        *pending = 0;
        if total == expected {
            // The receiver is gone only if the run already gave up.
            let _ = done.send(Instant::now());
        }
    }
}

fn e2e_once(config: &Config, keys: &Keys, partitions: u32) -> BenchResult<E2eRun> {
    let expected = keys.len() as u64;
    let cache = new_cache(config.capacity)?;
    let builder = Streams::builder(&cache).buffer(config.stream_buffer);
    let streams = if partitions > 1 { builder.partitions(partitions).start()? } else { builder.start()? };

    let mut subscriptions = Vec::new();
    for partition in 0..partitions {
        let options =
            if partitions > 1 { SubscribeOptions::new().partition(partition) } else { SubscribeOptions::new() };
        subscriptions.push(cache.subscribe(options)?);
    }

    let tally = Arc::new(Tally::default());
    let ready = Arc::new(Barrier::new(subscriptions.len() + 1));
    let (done_tx, done_rx) = mpsc::channel();
    let (exit_tx, exit_rx) = mpsc::channel();
    for sub in subscriptions {
        let (tally, ready, done, exit) = (Arc::clone(&tally), Arc::clone(&ready), done_tx.clone(), exit_tx.clone());
        thread::Builder::new().name("nbx-bench-subscriber".into()).spawn(move || {
            ready.wait();
            consume(sub, &tally, expected, &done);
            let _ = exit.send(());
        })?;
    }
    drop((done_tx, exit_tx));

    ready.wait();
    let start = Instant::now();
    for &k in &keys.insert {
        cache.put(k, k);
    }
    let puts = start.elapsed();
    let finished = done_rx.recv_timeout(DRAIN_TIMEOUT);
    streams.stop();
    wait_for_exits(&exit_rx, partitions)?;

    let accounted = tally.accounted.load(Ordering::Acquire);
    let lagged = tally.lagged.load(Ordering::Acquire);
    let end = finished.map_err(|_| {
        format!(
            "{accounted} of {expected} events received or reported lagged within \
             {DRAIN_TIMEOUT:?} of the last put"
        )
    })?;
    if accounted != expected {
        return Err(format!("{accounted} events received or lagged for {expected} puts").into());
    }
    Ok(E2eRun { elapsed: end.duration_since(start), puts, lagged })
}

/// Receives until the stream stops, counting events and lagged events.
///
/// Drains with `try_recv` and blocks in `recv_blocking` only when the queue
/// is empty, which is also when it publishes its count: so the shared tally
/// is touched rarely, yet is complete as soon as the last event is in.
fn consume(mut sub: Subscription<u64>, tally: &Tally, expected: u64, done: &Sender<Instant>) {
    let mut pending = 0u64;
    loop {
        let item = match sub.try_recv() {
            Ok(event) => Ok(event),
            Err(TryRecvError::Lagged(n)) => Err(Lagged(n)),
            Err(TryRecvError::Closed) => break,
            Err(TryRecvError::Empty) => {
                tally.flush(&mut pending, expected, done);
                match sub.recv_blocking() {
                    Some(item) => item,
                    None => break,
                }
            }
        };
        match item {
            Ok(_event) => pending += 1,
            Err(Lagged(n)) => {
                tally.lagged.fetch_add(n, Ordering::AcqRel);
                pending += n;
            }
        }
        if pending >= FLUSH_EVERY {
            tally.flush(&mut pending, expected, done);
        }
    }
    tally.flush(&mut pending, expected, done);
}

/// Waits until `count` subscriber threads have ended (`stop()` ends their
/// subscriptions); a subscription that outlives `stop()` is an error.
fn wait_for_exits(exits: &Receiver<()>, count: u32) -> BenchResult<()> {
    for ended in 0..count {
        if exits.recv_timeout(DRAIN_TIMEOUT).is_err() {
            return Err(format!("{} subscription(s) still open {DRAIN_TIMEOUT:?} after stop()", count - ended).into());
        }
    }
    Ok(())
}

/// Put-to-receive latency percentiles, in microseconds.
pub(crate) struct Latency {
    /// Median latency.
    pub(crate) p50_us: f64,
    /// 99th percentile latency.
    pub(crate) p99_us: f64,
}

impl Latency {
    /// The percentiles of a histogram of nanoseconds.
    pub(crate) fn of(histogram: &Histogram<u64>) -> Self {
        Latency {
            p50_us: histogram.value_at_quantile(0.50) as f64 / 1_000.0,
            p99_us: histogram.value_at_quantile(0.99) as f64 / 1_000.0,
        }
    }
}

/// Events per second of the latency figure: paced, far below saturation, so
/// the figure is the path of one event and not queueing.
pub(crate) const LATENCY_RATE: u32 = 10_000;

/// Events of one latency window.
pub(crate) fn latency_window_events(config: &Config) -> usize {
    let events = f64::from(LATENCY_RATE) * config.latency_duration.as_secs_f64();
    (events as usize / config.latency_windows.max(1)).max(1)
}

/// How long a busy-polling subscriber looks before it sleeps: ten times the
/// gap between two events of the latency figures, so that a pause of the
/// writer's core (a busy machine takes some of a few hundred microseconds)
/// does not put it to sleep.
pub(crate) const BUSY_POLL: Duration = Duration::from_micros(10 * 1_000_000 / LATENCY_RATE as u64);
const _: () = assert!(BUSY_POLL.as_nanos() <= nebulex_streams::MAX_BUSY_POLL.as_nanos());

/// The latency figures, each over the same paced sends to an async task on
/// a one-worker tokio runtime.
pub(crate) struct Latencies {
    /// A subscription with the default options: its task sleeps between
    /// events and the writer wakes it.
    pub(crate) stream: Latency,
    /// The same hand-over through a tokio unbounded channel: the floor the
    /// machine's thread wake-ups set for a task that sleeps between events.
    pub(crate) channel: Latency,
    /// A subscription that busy-polls ([`BUSY_POLL`]) before it sleeps.
    pub(crate) busy_poll: Latency,
    /// The same put (on a cache without a stream), then a counter the sender
    /// raises, read by a task that spins on it: the floor of any hand-over
    /// of a put between two cores of this machine.
    pub(crate) spin: Latency,
}

/// Measures [`Latencies`] in `config.latency_windows` rounds, each round one
/// window of each kind back to back (so a noisy moment of a shared machine
/// hits them alike), starting with the next kind each round (so none always
/// follows the same one); each figure is over every event of its windows.
///
/// In a window this thread puts keys `0..n` at [`LATENCY_RATE`] per second
/// while the task receives them; the latency of each is from just before its
/// put (or send) until the task has it. Fails if an event is neither
/// received nor reported as lagged.
pub(crate) fn latencies(config: &Config) -> BenchResult<Latencies> {
    let events = latency_window_events(config);
    let new = || Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3);
    // Stream, channel, busy-polling stream, spin hand-over.
    let mut histograms = [new()?, new()?, new()?, new()?];
    let kinds = histograms.len();
    for round in 0..config.latency_windows.max(1) {
        for kind in (0..kinds).map(|k| (k + round) % kinds) {
            let window = match kind {
                0 => stream_window(config, events, SubscribeOptions::new())?,
                1 => channel_window(events)?,
                2 => stream_window(config, events, SubscribeOptions::new().busy_poll(BUSY_POLL))?,
                _ => spin_window(config, events)?,
            };
            histograms[kind].add(window)?;
        }
    }
    let [stream, channel, busy_poll, spin] = histograms.each_ref().map(Latency::of);
    Ok(Latencies { stream, channel, busy_poll, spin })
}

/// One window of a subscription's latency.
fn stream_window(config: &Config, events: usize, options: SubscribeOptions) -> BenchResult<Histogram<u64>> {
    let cache = new_cache(config.capacity)?;
    let streams = Streams::builder(&cache).buffer(config.stream_buffer).start()?;
    let sub = cache.subscribe(options)?;
    let measured = paced(events, |i| cache.put(i, i), sub);
    streams.stop();
    measured
}

/// One window of a tokio unbounded channel's latency.
fn channel_window(events: usize) -> BenchResult<Histogram<u64>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    paced(
        events,
        |i| {
            // The receiver lives until every key is in.
            let _ = tx.send(i);
        },
        rx,
    )
}

/// One window of the spin hand-over's latency: each send is a put, as in a
/// subscription's window, on a cache without a stream.
fn spin_window(config: &Config, events: usize) -> BenchResult<Histogram<u64>> {
    let cache = new_cache(config.capacity)?;
    let raised = Arc::new(AtomicU64::new(0));
    let receiver = Spin { raised: Arc::clone(&raised), next: 0 };
    paced(
        events,
        |i| {
            cache.put(i, i);
            raised.store(i + 1, Ordering::Release);
        },
        receiver,
    )
}

/// What a latency task receives: a key, or a count of keys missed.
enum Received {
    Key(u64),
    Lagged(u64),
}

/// The receiving end of a latency measurement.
trait Receiving: Send + 'static {
    /// The next key; `None` once the sender is gone.
    fn next(&mut self) -> impl std::future::Future<Output = Option<Received>> + Send;
}

impl Receiving for Subscription<u64> {
    async fn next(&mut self) -> Option<Received> {
        match self.recv().await? {
            Ok(event) => match &event.target {
                Target::Key(k) => Some(Received::Key(*k)),
                _ => Some(Received::Lagged(0)),
            },
            Err(Lagged(n)) => Some(Received::Lagged(n)),
        }
    }
}

impl Receiving for tokio::sync::mpsc::UnboundedReceiver<u64> {
    async fn next(&mut self) -> Option<Received> {
        self.recv().await.map(Received::Key)
    }
}

/// The receiving end of the spin hand-over: keys `0..raised`, in order.
struct Spin {
    raised: Arc<AtomicU64>,
    next: u64,
}

impl Receiving for Spin {
    async fn next(&mut self) -> Option<Received> {
        // Spins on its worker, which runs nothing else: the runtime's timers
        // stand still meanwhile, so the wait for the task (`DRAIN_TIMEOUT`)
        // is this loop's own.
        let start = Instant::now();
        while self.raised.load(Ordering::Acquire) <= self.next {
            if start.elapsed() > DRAIN_TIMEOUT {
                return None;
            }
            std::hint::spin_loop();
        }
        self.next += 1;
        Some(Received::Key(self.next - 1))
    }
}

/// Sends `0..events` with `send` at [`LATENCY_RATE`] per second on this
/// thread while a task on a one-worker tokio runtime receives them from
/// `receiver`; the latency of each (nanoseconds) is from just before its send
/// until the task has it.
fn paced(events: usize, mut send: impl FnMut(u64), mut receiver: impl Receiving) -> BenchResult<Histogram<u64>> {
    // Send instants, nanoseconds since `base`, indexed by key.
    let base = Instant::now();
    let stamps: Arc<Vec<AtomicU64>> = Arc::new((0..events).map(|_| AtomicU64::new(0)).collect());
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let (ready_tx, ready_rx) = mpsc::channel();
    let task_stamps = Arc::clone(&stamps);
    let mut task = runtime.spawn(async move {
        let _ = ready_tx.send(());
        let (mut received, mut lagged) = (0u64, 0u64);
        while received + lagged < events as u64 {
            match receiver.next().await {
                None => break,
                Some(Received::Key(k)) => {
                    let now = nanos_since(base);
                    if let Some(stamp) = usize::try_from(k).ok().and_then(|i| task_stamps.get(i)) {
                        let sent = stamp.load(Ordering::Acquire);
                        histogram.saturating_record(now.saturating_sub(sent).max(1));
                    }
                    received += 1;
                }
                Some(Received::Lagged(n)) => lagged += n.max(1),
            }
        }
        (histogram, received, lagged)
    });
    ready_rx.recv_timeout(DRAIN_TIMEOUT).map_err(|_| "the receiving task did not start")?;

    let interval = Duration::from_secs(1) / LATENCY_RATE;
    let start = Instant::now();
    for (i, stamp) in stamps.iter().enumerate() {
        pace_until(start + interval * i as u32);
        stamp.store(nanos_since(base), Ordering::Release);
        send(i as u64);
    }

    let outcome = runtime.block_on(async { tokio::time::timeout(DRAIN_TIMEOUT, &mut task).await });
    let (histogram, received, lagged) = match outcome {
        Ok(joined) => joined?,
        Err(_) => {
            task.abort();
            return Err(format!("not every event arrived within {DRAIN_TIMEOUT:?} of the last send").into());
        }
    };
    if received + lagged != events as u64 {
        return Err(format!("{received} received + {lagged} lagged for {events} sends").into());
    }
    if lagged > 0 {
        return Err(format!("{lagged} of {events} events lagged at {LATENCY_RATE} events/s").into());
    }
    Ok(histogram)
}

/// Nanoseconds from `base` to now.
pub(crate) fn nanos_since(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Waits until `slot`: sleeps while it is far, then yields until it comes
/// (sleep alone overshoots by tens of microseconds; yielding rather than
/// spinning leaves the core to the subscriber on a small machine).
fn pace_until(slot: Instant) {
    pace(slot, Duration::from_micros(200));
}

/// Waits until `slot` without taking a core: sleeps while the slot is further
/// than a sleep overshoots (about 55 us: the kernel's default timer slack),
/// then yields. For the cluster figures, whose runtime and server need both
/// cores of a small machine more than the local figures do.
pub(crate) fn pace_gently(slot: Instant) {
    pace(slot, Duration::from_micros(70));
}

/// Sleeps until `margin` before `slot`, then yields until it comes.
fn pace(slot: Instant, margin: Duration) {
    loop {
        let now = Instant::now();
        if now >= slot {
            return;
        }
        let left = slot - now;
        if left > margin {
            thread::sleep(left - margin);
        } else {
            thread::yield_now();
        }
    }
}

//! `nbx demo`: the embedded default in action, in one process, no server.
//!
//! A `Cache<String, u64>` with a size bound and a default TTL (so entries are
//! evicted and expire), a stream with partitions, writer threads doing random
//! `put` / `put_with_ttl` / `update` / `delete` / `get_or_insert_with` / `get`
//! on a key space larger than the cache, and one subscriber thread per
//! partition counting the events it receives per kind. A live view shows per
//! partition the counts, the events per second and a bar; at the end, the
//! totals.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nebulex::{Cache, EventType};
use nebulex_streams::{Lagged, Streams, StreamsExt, SubscribeOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How often the terminal view is redrawn.
const REDRAW: Duration = Duration::from_millis(200);
/// How often a plain summary is printed when stdout is not a terminal.
const SUMMARY: Duration = Duration::from_secs(1);
/// Width of a partition's rate bar, in characters.
const BAR: usize = 20;
/// Operations a writer does between two looks at the clock.
const CHUNK: u64 = 64;

/// Options of `nbx demo`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Writers pick keys user:0 .. user:K-1 at random and mix put (35%), put_with_ttl
with a short TTL (10%), update (20%), delete (10%), get_or_insert_with (15%)
and get (10%). As the key space is larger than the cache, inserts evict
entries; entries expire through the default TTL, the short TTLs and the
periodic sweep. When stdout is a terminal the view is redrawn in place about
5 times per second, else a plain summary is printed once per second. Ctrl-C
stops the demo early and prints the totals.")]
pub(crate) struct DemoArgs {
    /// Partitions of the stream; one subscriber thread reads each.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    partitions: u32,
    /// Writer threads.
    #[arg(long, value_name = "W", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    writers: u32,
    /// How long to run, in seconds (0: until Ctrl-C).
    #[arg(long, value_name = "S", default_value_t = 10)]
    seconds: u64,
    /// Distinct keys the writers pick from.
    #[arg(long, value_name = "K", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
    /// The cache's size bound (`max_entries`); below --keys, entries get evicted.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_entries: usize,
    /// The cache's default TTL, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..))]
    ttl_ms: u64,
    /// Operations per second of each writer (0: as fast as it can).
    #[arg(long, value_name = "OPS", default_value_t = 20_000)]
    rate: u64,
}

/// What one partition's subscriber counted.
#[derive(Default)]
struct Counts {
    kinds: [AtomicU64; 5],
    lagged: AtomicU64,
}

/// A reading of every counter at one instant.
#[derive(Clone)]
struct Snapshot {
    at: Instant,
    /// Per partition: the count of each kind.
    kinds: Vec<[u64; 5]>,
    /// Per partition: the events missed.
    lagged: Vec<u64>,
    ops: u64,
}

impl Snapshot {
    fn take(counts: &[Counts], ops: &AtomicU64) -> Self {
        Snapshot {
            at: Instant::now(),
            kinds: counts.iter().map(|c| std::array::from_fn(|k| c.kinds[k].load(Ordering::Relaxed))).collect(),
            lagged: counts.iter().map(|c| c.lagged.load(Ordering::Relaxed)).collect(),
            ops: ops.load(Ordering::Relaxed),
        }
    }

    fn events(&self, p: usize) -> u64 {
        self.kinds[p].iter().sum()
    }

    fn total_kind(&self, k: usize) -> u64 {
        self.kinds.iter().map(|c| c[k]).sum()
    }

    fn total(&self) -> u64 {
        (0..self.kinds.len()).map(|p| self.events(p)).sum()
    }
}

/// Runs `nbx demo`.
pub(crate) fn run(args: &DemoArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.max_entries == 0 {
        return Err("--max-entries must be at least 1".into());
    }
    let ttl = Duration::from_millis(args.ttl_ms);
    let cache: Cache<String, u64> = Cache::builder()
        .name("demo")
        .max_entries(args.max_entries)
        .default_ttl(ttl)
        .sweep_interval(Duration::from_millis(250))
        .build()?;
    let streams = Streams::builder(&cache).partitions(args.partitions).start()?;
    let counts: Arc<[Counts]> = (0..args.partitions).map(|_| Counts::default()).collect();
    let mut readers = Vec::new();
    for p in 0..args.partitions {
        let mut sub = cache.subscribe(SubscribeOptions::new().partition(p))?;
        let counts = counts.clone();
        readers.push(std::thread::Builder::new().name(format!("demo-sub-{p}")).spawn(move || {
            let c = &counts[p as usize];
            while let Some(item) = sub.recv_blocking() {
                match item {
                    Ok(event) => {
                        let k = EventType::ALL.iter().position(|t| *t == event.kind).unwrap_or(0);
                        c.kinds[k].fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Lagged(n)) => {
                        c.lagged.fetch_add(n, Ordering::Relaxed);
                    }
                }
            }
        })?);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..args.writers {
        let (cache, stop, ops) = (cache.clone(), stop.clone(), ops.clone());
        let (keys, rate) = (args.keys, args.rate);
        writers.push(
            std::thread::Builder::new()
                .name(format!("demo-writer-{w}"))
                .spawn(move || write_loop(&cache, keys, rate, u64::from(w), &stop, &ops))?,
        );
    }

    let started = Instant::now();
    let limit = (args.seconds > 0).then(|| Duration::from_secs(args.seconds));
    let terminal = io::stdout().is_terminal();
    let mut view = View::new(args, terminal);
    view.history.push_back(Snapshot::take(&counts, &ops));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let shown = rt.block_on(async {
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let mut tick = tokio::time::interval(if terminal { REDRAW } else { SUMMARY });
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tick.tick().await;
        let deadline = async {
            match limit {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let snap = Snapshot::take(&counts, &ops);
                    view.show(&snap, cache.len(), started.elapsed(), limit)?;
                }
                _ = &mut deadline => return Ok::<_, io::Error>(()),
                _ = &mut ctrl_c => return Ok(()),
            }
        }
    });

    // Stop the writers, then the stream: each subscriber drains its buffer
    // and ends, so the totals hold every event published.
    stop.store(true, Ordering::Release);
    for w in writers {
        let _ = w.join();
    }
    let elapsed = started.elapsed();
    streams.stop();
    for r in readers {
        let _ = r.join();
    }
    let last = Snapshot::take(&counts, &ops);
    if let Err(e) = shown {
        if e.kind() == io::ErrorKind::BrokenPipe {
            return Ok(());
        }
        return Err(e.into());
    }
    match totals(args, &last, elapsed, cache.len(), terminal) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// One writer: random operations on random keys until `stop`, at `rate`
/// operations per second (0: unpaced).
fn write_loop(cache: &Cache<String, u64>, keys: u64, rate: u64, seed: u64, stop: &AtomicBool, ops: &AtomicU64) {
    let mut rng = StdRng::seed_from_u64(0x6e62_7864_656d_6f00 ^ seed);
    let started = Instant::now();
    let mut done = 0u64;
    // Paced: about 10 ms of operations at a time, so that a slow rate is
    // kept too.
    let chunk = if rate > 0 { (rate / 100).clamp(1, CHUNK) } else { CHUNK };
    while !stop.load(Ordering::Acquire) {
        for _ in 0..chunk {
            let key = format!("user:{}", rng.gen_range(0..keys));
            let value = rng.gen::<u64>() % 1_000;
            match rng.gen_range(0..100u32) {
                0..=34 => cache.put(key, value),
                35..=44 => cache.put_with_ttl(key, value, Duration::from_millis(rng.gen_range(50..500))),
                45..=64 => {
                    cache.update(key, 0, |v| v + 1);
                }
                65..=74 => {
                    cache.delete(&key);
                }
                75..=89 => {
                    cache.get_or_insert_with(key, || value);
                }
                _ => {
                    cache.get(&key);
                }
            }
        }
        done += chunk;
        ops.fetch_add(chunk, Ordering::Relaxed);
        if rate > 0 {
            let due = started + Duration::from_secs_f64(done as f64 / rate as f64);
            // In short naps, so that a stop is seen soon.
            while !stop.load(Ordering::Acquire) {
                let now = Instant::now();
                if now >= due {
                    break;
                }
                std::thread::sleep((due - now).min(STOP_CHECK));
            }
        }
    }
}

/// The longest a paced writer sleeps before it looks whether to stop.
const STOP_CHECK: Duration = Duration::from_millis(20);

/// The live view.
struct View {
    terminal: bool,
    partitions: usize,
    /// Lines drawn last time (to move back over them).
    drawn: usize,
    /// Recent snapshots, for rates over about the last second.
    history: VecDeque<Snapshot>,
    header: String,
}

impl View {
    fn new(args: &DemoArgs, terminal: bool) -> Self {
        let header = format!(
            "cache \"demo\": at most {} entries, TTL {} ms, {} keys; {}; {}{}",
            thousands(args.max_entries as u64),
            thousands(args.ttl_ms),
            thousands(args.keys),
            plural(args.partitions, "partition"),
            plural(args.writers, "writer"),
            if args.rate > 0 { format!(" at {} ops/s each", thousands(args.rate)) } else { String::new() },
        );
        View { terminal, partitions: args.partitions as usize, drawn: 0, history: VecDeque::new(), header }
    }

    fn show(&mut self, snap: &Snapshot, len: usize, elapsed: Duration, limit: Option<Duration>) -> io::Result<()> {
        // Rates over the window from the oldest snapshot kept (about 1 s back).
        let base = self.history.front().cloned();
        self.history.push_back(snap.clone());
        while self.history.len() > 1 && snap.at.duration_since(self.history[0].at) > Duration::from_millis(1_050) {
            self.history.pop_front();
        }
        let rate = |now: u64, then: Option<u64>, at: Option<Instant>| match (then, at) {
            (Some(then), Some(at)) if snap.at > at => {
                (now.saturating_sub(then)) as f64 / snap.at.duration_since(at).as_secs_f64()
            }
            _ => 0.0,
        };
        let at = base.as_ref().map(|b| b.at);
        let rates: Vec<f64> =
            (0..self.partitions).map(|p| rate(snap.events(p), base.as_ref().map(|b| b.events(p)), at)).collect();
        let all_rate = rate(snap.total(), base.as_ref().map(Snapshot::total), at);
        let ops_rate = rate(snap.ops, base.as_ref().map(|b| b.ops), at);
        let clock = match limit {
            Some(l) => format!("{:.1} s of {} s", elapsed.as_secs_f64(), l.as_secs()),
            None => format!("{:.1} s (Ctrl-C to stop)", elapsed.as_secs_f64()),
        };
        let mut out = io::stdout().lock();
        if self.terminal {
            let peak = rates.iter().copied().fold(1.0, f64::max);
            let mut lines = vec![
                format!("nbx demo — {clock}"),
                self.header.clone(),
                format!(
                    "{:<5}{:>11}{:>11}{:>11}{:>11}{:>11}{:>9}{:>13}",
                    "part", "inserted", "updated", "deleted", "expired", "evicted", "lagged", "events/s"
                ),
            ];
            for (p, r) in rates.iter().enumerate() {
                let filled = ((r / peak) * BAR as f64).round() as usize;
                let bar: String = "█".repeat(filled.min(BAR)) + &" ".repeat(BAR - filled.min(BAR));
                lines.push(format!(
                    "{}{:>13}  {bar}",
                    row(&format!("p{p}"), &snap.kinds[p], snap.lagged[p]),
                    format!("{}/s", thousands(r.round() as u64)),
                ));
            }
            let all: [u64; 5] = std::array::from_fn(|k| snap.total_kind(k));
            lines.push(format!(
                "{}{:>13}",
                row("all", &all, snap.lagged.iter().sum()),
                format!("{}/s", thousands(all_rate.round() as u64))
            ));
            lines.push(format!(
                "cache: {} entries; writers: {} ops/s",
                thousands(len as u64),
                thousands(ops_rate.round() as u64)
            ));
            // Auto-wrap off while drawing (DECAWM), so a line wider than the
            // terminal is cut instead of taking two rows: going back up
            // `drawn` rows then lands on the first line of the frame.
            let mut frame = String::from("\x1b[?7l");
            if self.drawn > 0 {
                let _ = write!(frame, "\x1b[{}A\r", self.drawn);
            }
            for line in &lines {
                let _ = writeln!(frame, "\x1b[2K{line}");
            }
            frame.push_str("\x1b[?7h");
            self.drawn = lines.len();
            out.write_all(frame.as_bytes())?;
        } else {
            let t = elapsed.as_secs_f64();
            for (p, r) in rates.iter().enumerate() {
                let counts = plain_row(&format!("p{p}"), &snap.kinds[p], snap.lagged[p]);
                writeln!(out, "[{t:6.1}s] {counts} | {}/s", thousands(r.round() as u64))?;
            }
            let all: [u64; 5] = std::array::from_fn(|k| snap.total_kind(k));
            writeln!(
                out,
                "[{t:6.1}s] {} | {}/s | cache {} entries, {} ops/s",
                plain_row("all", &all, snap.lagged.iter().sum()),
                thousands(all_rate.round() as u64),
                thousands(len as u64),
                thousands(ops_rate.round() as u64)
            )?;
        }
        out.flush()
    }
}

/// A table row of counts: name, the five kinds, lagged.
fn row(name: &str, kinds: &[u64; 5], lagged: u64) -> String {
    let mut s = format!("{name:<5}");
    for k in kinds {
        let _ = write!(s, "{:>11}", thousands(*k));
    }
    let _ = write!(s, "{:>9}", thousands(lagged));
    s
}

/// A plain summary of counts: `p0: inserted 12 updated 3 ... lagged 0`.
fn plain_row(name: &str, kinds: &[u64; 5], lagged: u64) -> String {
    let mut s = format!("{name}:");
    for (kind, n) in EventType::ALL.iter().zip(kinds) {
        let _ = write!(s, " {kind} {n}");
    }
    let _ = write!(s, " lagged {lagged}");
    s
}

/// Prints the totals of the run.
fn totals(args: &DemoArgs, snap: &Snapshot, elapsed: Duration, len: usize, terminal: bool) -> io::Result<()> {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let per_sec = |n: u64| thousands((n as f64 / secs).round() as u64);
    let total = snap.total();
    let mut out = io::stdout().lock();
    if terminal {
        // Clear the line, and a `^C` the terminal may have echoed on it.
        write!(out, "\r\x1b[2K")?;
    }
    writeln!(
        out,
        "totals after {:.1} s ({}, {}):",
        elapsed.as_secs_f64(),
        plural(args.writers, "writer"),
        plural(args.partitions, "partition")
    )?;
    writeln!(out, "  operations  {:>12}  ({}/s)", thousands(snap.ops), per_sec(snap.ops))?;
    writeln!(out, "  events      {:>12}  ({}/s)", thousands(total), per_sec(total))?;
    for (k, kind) in EventType::ALL.iter().enumerate() {
        writeln!(out, "    {:<10}{:>12}", kind.as_str(), thousands(snap.total_kind(k)))?;
    }
    writeln!(out, "  lagged      {:>12}", thousands(snap.lagged.iter().sum()))?;
    let per_partition: Vec<String> =
        (0..snap.kinds.len()).map(|p| format!("p{p} {}", thousands(snap.events(p)))).collect();
    writeln!(out, "  per partition: {}", per_partition.join(", "))?;
    writeln!(out, "  cache: {} entries (at most {})", thousands(len as u64), thousands(args.max_entries as u64))?;
    out.flush()
}

/// `1 writer`, `2 writers`.
fn plural(n: u32, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut s = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            s.push(',');
        }
        s.push(c);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}

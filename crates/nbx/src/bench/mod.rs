//! `nbx bench`: every figure of the benchmark report, measured in one run on
//! one machine, ours and the peer's side by side (the machines are shared and
//! noisy, so only ratios from the same run are compared).

mod chart;
mod cluster;
mod hit_ratio;
mod invalidation;
mod listener;
mod memory;
mod progress;
mod raw;
mod report;
mod stream;
mod sweep;
mod throughput;
mod workload;
mod zipf;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nebulex::{Cache, CacheBuilder};

use self::progress::{quiet_step, step};
use self::report::Figures;
use self::workload::Keys;

/// Options of `nbx bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// Fewer repetitions and shorter runs: the whole report in seconds.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object on stdout instead of a table (progress goes to
    /// stderr either way).
    #[arg(long)]
    json: bool,
    /// Also write a bar chart (SVG) of the rates, ours beside the peers', to
    /// this file.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

/// What a benchmark step returns.
pub(crate) type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Sizes and repetition counts of a run.
pub(crate) struct Config {
    /// Whether this is a `--quick` run.
    pub(crate) quick: bool,
    /// Distinct keys of the throughput, memory and stream figures.
    pub(crate) keys: usize,
    /// Capacity of every cache in those figures: above `keys`, so none evicts.
    pub(crate) capacity: usize,
    /// Lookups of each lookup-throughput pass, on caches holding all `keys`.
    pub(crate) lookups: usize,
    /// Repetitions of each throughput measurement (the median is kept).
    pub(crate) reps: usize,
    /// Repetitions of the sweep measurement (the median is kept).
    pub(crate) sweep_reps: usize,
    /// Entries of the caches of the sweep measurement (the first of `keys`).
    pub(crate) sweep_keys: usize,
    /// Rounds of the listener-overhead measurement (each: one fill with a
    /// stream, one without).
    pub(crate) listener_rounds: usize,
    /// Repetitions of each end-to-end stream measurement.
    pub(crate) e2e_reps: usize,
    /// Accesses of the hit-ratio trace.
    pub(crate) zipf_accesses: usize,
    /// How long the paced latency measurement runs (for the cluster ones:
    /// each side, ours and the raw client's).
    pub(crate) latency_duration: Duration,
    /// Windows the latency figures are split into, ours and the peers'
    /// interleaved: for the cluster ones the median window is kept, the local
    /// ones count every event of their windows.
    pub(crate) latency_windows: usize,
    /// Per-subscriber buffer of the stream figures: 4 times the default,
    /// tens of milliseconds of events, so a subscriber that keeps up does not
    /// lag even when descheduled for a while; any lag is reported.
    pub(crate) stream_buffer: usize,
    /// Events (and raw messages, and invalidated keys) of each cluster
    /// throughput figure.
    pub(crate) cluster_events: usize,
}

impl Config {
    fn new(quick: bool) -> Self {
        Self {
            quick,
            keys: 1_000_000,
            capacity: 1_100_000,
            lookups: if quick { 250_000 } else { 1_000_000 },
            reps: if quick { 2 } else { 5 },
            sweep_reps: if quick { 1 } else { 3 },
            sweep_keys: if quick { 100_000 } else { 1_000_000 },
            listener_rounds: if quick { 5 } else { 11 },
            e2e_reps: if quick { 3 } else { 9 },
            zipf_accesses: if quick { 1_000_000 } else { 2_000_000 },
            latency_duration: if quick { Duration::from_millis(1_500) } else { Duration::from_secs(5) },
            latency_windows: 5,
            stream_buffer: 4 * nebulex_streams::DEFAULT_BUFFER,
            cluster_events: if quick { 200_000 } else { 1_000_000 },
        }
    }
}

/// A `u64 -> u64` nebulex cache bounded to `capacity` entries, as every
/// figure uses.
pub(crate) fn new_cache(capacity: usize) -> Result<Cache<u64, u64>, nebulex::Error> {
    cache_builder(capacity).build()
}

/// The builder of [`new_cache`], for a figure that adds an option.
pub(crate) fn cache_builder(capacity: usize) -> CacheBuilder<u64, u64> {
    Cache::builder().name("bench").max_entries(capacity)
}

/// Runs every measurement and prints the report (JSON or table) on stdout.
pub(crate) fn run(args: &BenchArgs) -> BenchResult<()> {
    let config = Config::new(args.quick);
    let started = Instant::now();
    let keys = step("keys", || Ok(Keys::new(config.keys)))?;
    // First, while no other thread of ours is alive to allocate.
    let memory = quiet_step("memory", || memory::measure(&config, &keys))?;
    let throughput = step("put/get throughput", || throughput::measure(&config, &keys))?;
    let sweep = step("sweep of what came due", || sweep::measure(&config, &keys))?;
    let listener = step("listener overhead", || listener::measure(&config, &keys))?;
    let stream = step("stream e2e: moka, 1 partition, 4 partitions", || stream::measure(&config, &keys))?;
    drop(keys);
    let hit_ratio = step("hit ratio", || hit_ratio::measure(&config))?;
    let latency =
        step("latency: stream, tokio channel, busy-polling stream, spin hand-over", || stream::latencies(&config))?;
    // After the local figures: servers and network threads would disturb them.
    let cluster = cluster::measure(&config)?;
    eprintln!("nbx bench: done in {:.1} s", started.elapsed().as_secs_f64());

    let figures =
        Figures { quick: config.quick, throughput, sweep, listener, stream, hit_ratio, memory, latency, cluster };
    if let Some(path) = &args.svg {
        std::fs::write(path, chart::svg(&figures)?).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("nbx bench: chart written to {}", path.display());
    }
    if args.json {
        println!("{}", figures.to_json());
    } else {
        print!("{}", figures.to_table());
    }
    Ok(())
}

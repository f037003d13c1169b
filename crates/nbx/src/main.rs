//! `nbx`: the nebulex command line.
//!
//! Subcommands:
//! - `demo`: the embedded default in action, no server: writers, a
//!   partitioned stream and a live view of its events.
//! - `tail`: a live view of a cluster's events, read straight from its Redis
//!   or NATS channels (it never writes to the cache).
//! - `bench`: measures the cache and its event streams against their peers
//!   (moka, quick_cache) in one run, and prints the figures as a table or as
//!   one JSON object.

mod alloc;
mod bench;
mod dates;
mod demo;
mod tail;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Counts live heap bytes, so `bench` can report the memory held per entry.
#[global_allocator]
static GLOBAL: alloc::CountingAllocator = alloc::CountingAllocator;

/// The nebulex command line: demo, live event tail and benchmark report.
#[derive(Debug, Parser)]
#[command(name = "nbx", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Watch a cache's events live, in one process, no server needed: writer
    /// threads, a partitioned stream, one subscriber per partition.
    Demo(demo::DemoArgs),
    /// Print a cluster's cache entry events as they cross Redis or NATS:
    /// gaps in sequence numbers and refused frames included. Read-only.
    Tail(tail::TailArgs),
    /// Benchmark nebulex against moka, quick_cache and raw Redis/NATS, measured in one run.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Tail(args) => tail::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nbx: error: {err}");
            ExitCode::FAILURE
        }
    }
}

//! `nbx`: the nebulex command line.
//!
//! Subcommands:
//! - `bench`: measures the cache and its event streams against their peers
//!   (moka, quick_cache) in one run, and prints the figures as a table or as
//!   one JSON object.
//!
//! `tail` (live event tail of a cluster) and `demo` are planned.

mod alloc;
mod bench;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Counts live heap bytes, so `bench` can report the memory held per entry.
#[global_allocator]
static GLOBAL: alloc::CountingAllocator = alloc::CountingAllocator;

/// The nebulex command line: demo, live event tail and benchmark report.
#[derive(Debug, Parser)]
#[command(name = "nbx", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmark nebulex against moka and quick_cache, measured in one run.
    Bench(bench::BenchArgs),
    // Later: `Tail` (live event tail of a cluster) and `Demo`.
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
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

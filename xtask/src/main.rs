//! `cargo xtask …`: the project's own automation — the paper's experiment, benchmarks, the
//! model table and the GPU check. Each command parses its arguments and calls the library
//! crates; the user commands are in the `vimseg` binary.

mod bench;
mod bench_models;
mod bench_volume;
mod fuzz;
mod gpu_check;
mod models;

use clap::{Parser, Subcommand};

/// Heap accounting for the memory figures of `models` and the benchmarks.
#[global_allocator]
static ALLOC: cpu_ops::memory::Counting = cpu_ops::memory::Counting;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "vimseg project tasks: the paper's experiment, benchmarks, models, GPU check",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The paper's comparison end to end: train, predict, segment, evaluate, report.
    Experiment(vimseg::experiment::Args),
    /// Every model's parameter count and CPU forward time (and optionally a training step).
    Models(models::Args),
    /// Benchmarks that print ratios against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(bench::Command),
    /// The fuzz targets for a bounded time each (cargo fuzz where installed, else built in).
    Fuzz(fuzz::Args),
    /// Checks and measurements on a GPU machine (build with `--features cuda`), as JSON lines.
    GpuCheck(gpu_check::Args),
}

fn main() -> std::process::ExitCode {
    cpu_ops::keep_freed_memory();
    vimseg::exit(match Cli::parse().command {
        Command::Experiment(args) => vimseg::experiment::run(&args),
        Command::Models(args) => models::run(&args),
        Command::Bench(command) => bench::run(&command),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::GpuCheck(args) => gpu_check::run(&args),
    })
}

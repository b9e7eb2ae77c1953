//! `cargo xtask …`: the command-line layer of the vimseg workspace. Each command parses its
//! arguments and calls the library crates; nothing here is needed to use the crates.

mod bench;
mod data;
mod evaluate;
mod experiment;
mod gpu_check;
mod models;
mod report;
mod segment;
mod targets;
mod train_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "vimseg tasks: data, models, training, prediction, post-processing, evaluation, experiments",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Datasets: download the real ones, or write synthetic stand-ins.
    #[command(subcommand)]
    Data(data::Command),
    /// Score segmentations against ground truth: mSA, SA50, SA75 per image and their means.
    Evaluate(evaluate::Args),
    /// Write the float32 training-target stack (channels first) of a label image.
    Targets(targets::Args),
    /// Turn a prediction stack into an instance segmentation with the paper's watershed recipes.
    Segment(segment::Args),
    /// Every model's parameter count and CPU forward time (and optionally a training step).
    Models(models::Args),
    /// The paper's comparison end to end: train, predict, segment, evaluate, report.
    Experiment(experiment::Args),
    /// Train a model on your own data (CREMI-layout HDF5, LIVECell, or TIFF pairs).
    Train(train_cmd::TrainArgs),
    /// Predict an image or stack with a checkpoint, whole or in tiles with a halo.
    Predict(train_cmd::PredictArgs),
    /// Benchmarks that print ratios against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(bench::Command),
    /// Checks and measurements on a GPU machine (build with `--features cuda`), as JSON lines.
    GpuCheck(gpu_check::Args),
}

fn main() -> std::process::ExitCode {
    cpu_ops::keep_freed_memory();
    match run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Data(command) => data::run(&command),
        Command::Evaluate(args) => evaluate::run(&args),
        Command::Targets(args) => targets::run(&args),
        Command::Segment(args) => segment::run(&args),
        Command::Models(args) => models::run(&args),
        Command::Experiment(args) => experiment::run(&args),
        Command::Train(args) => train_cmd::train(&args),
        Command::Predict(args) => train_cmd::predict(&args),
        Command::Bench(command) => bench::run(&command),
        Command::GpuCheck(args) => gpu_check::run(&args),
    }
}

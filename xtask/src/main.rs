//! `cargo xtask …`: the command-line layer of the vimseg workspace. Each command parses its
//! arguments and calls the library crates; nothing here is needed to use the crates.

mod data;
mod evaluate;
mod segment;
mod targets;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "vimseg tasks: targets, post-processing and evaluation",
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
}

fn main() -> std::process::ExitCode {
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
    }
}

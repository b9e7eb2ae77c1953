//! The `vimseg` command line: a thin layer of argument parsing over the library crates
//! (`seg-pipeline` and the stage crates). `cargo xtask` reuses its `experiment` command.

pub mod args;
pub mod data;
pub mod evaluate;
pub mod experiment;
pub mod job;
pub mod segment;
pub mod targets;
pub mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vimseg",
    about = "UNet, UNETR and ViM-UNet for biomedical instance segmentation: data, training, \
             prediction, post-processing, evaluation, experiments",
    version
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Datasets: download the real ones, or write synthetic stand-ins.
    #[command(subcommand)]
    Data(data::Command),
    /// Train a model on your own data (CREMI-layout HDF5, LIVECell, or TIFF pairs).
    Train(train::TrainArgs),
    /// Predict an image or stack with a checkpoint, whole or in tiles with a halo.
    Predict(train::PredictArgs),
    /// Write a checkpoint's model as model.safetensors + config.json, for use outside a run.
    Export(train::ExportArgs),
    /// The finish step of a blockwise stage run as tasks (`--plan`, `--task`): checks that every
    /// block is done (naming those that are not), and for `segment` stitches the ids.
    Finish(job::FinishArgs),
    /// Where a blockwise stage run as tasks stands: blocks done, failed, pending.
    Status(job::StatusArgs),
    /// Turn a prediction stack into an instance segmentation with the paper's watershed recipes.
    Segment(segment::Args),
    /// Score segmentations against ground truth: mSA, SA50, SA75 per image and their means.
    Evaluate(evaluate::Args),
    /// Write the float32 training-target stack (channels first) of a label image.
    Targets(targets::Args),
    /// The paper's comparison end to end: train, predict, segment, evaluate, report.
    Experiment(experiment::Args),
}

/// Where and how a training run computes: shared by `train` and `experiment`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute precision: f32, or bf16 mixed precision (meant for CUDA; see docs/gpu.md).
    #[arg(long, default_value = "f32")]
    pub precision: seg_train::Precision,
    /// UNETR / ViM-UNet: recompute each block's activations in the backward pass instead of
    /// keeping them (less memory, about one more forward pass per step; the same gradients).
    #[arg(long)]
    pub checkpoint_activations: bool,
    /// Seed of the initialisation, the data order and stochastic depth.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Under a scheduler that gives this process fewer CPUs than the machine has (Slurm's
/// `--cpus-per-task`), computes on that many threads: sets `RAYON_NUM_THREADS` (read by rayon and
/// by candle's matrix products) from `SLURM_CPUS_PER_TASK` unless it is set already. Call it
/// first in `main`, before any thread starts.
pub fn threads_from_scheduler() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    if let Some(n) = std::env::var("SLURM_CPUS_PER_TASK")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Runs one command.
pub fn run(command: &Command) -> anyhow::Result<()> {
    // A memory cap that does not parse would otherwise be ignored by every check.
    seg_io::memory::env_limit().map_err(anyhow::Error::msg)?;
    match command {
        Command::Data(command) => data::run(command),
        Command::Train(args) => train::train(args),
        Command::Predict(args) => train::predict(args),
        Command::Export(args) => train::export(args),
        Command::Segment(args) => segment::run(args),
        Command::Finish(args) => job::finish(args),
        Command::Status(args) => job::status(args),
        Command::Evaluate(args) => evaluate::run(args),
        Command::Targets(args) => targets::run(args),
        Command::Experiment(args) => experiment::run(args),
    }
}

/// The process's exit: runs `result` of a command and prints its error chain on failure.
pub fn exit(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", message(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: the library errors already put their
/// source's text into their own message, so a cause whose text is there is not repeated.
pub fn message(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_cause_is_printed_once() {
        let io = std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "failed to fill whole buffer",
        );
        let e = seg_io::Error::Io {
            path: "a.tif".into(),
            source: io,
        };
        let e = anyhow::Error::new(e).context("reading the labels");
        assert_eq!(
            super::message(&e),
            "reading the labels: a.tif: failed to fill whole buffer"
        );
    }
}

//! `cargo xtask bench models`: the paper's models here and in PyTorch, in the same run.

use std::process::Command;

use anyhow::Context;
use serde_json::Value;

#[derive(clap::Args)]
pub struct Args {
    /// Models (comma-separated): unet, unetr-b, vim-unet-t.
    #[arg(long, value_delimiter = ',', default_value = "unet,unetr-b,vim-unet-t")]
    models: Vec<String>,
    /// Input side.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// UNETR and ViM-UNet canvas: paper (1024²) or native (the input size).
    #[arg(long, default_value = "paper")]
    canvas: String,
    /// Timed training steps and forwards after one warm-up each (the median is printed).
    #[arg(long, default_value_t = 1)]
    steps: usize,
    /// Also run ours with activation checkpointing.
    #[arg(long)]
    checkpointing: bool,
    /// Forwards only (no training step on either side): the peaks are the forwards'.
    #[arg(long, conflicts_with = "checkpointing")]
    no_train: bool,
    /// The Python with PyTorch; its side is skipped when `import torch` fails.
    #[arg(long, default_value = "python3")]
    python: String,
}

/// One measurement, in a process of its own (so that its peak memory is its own).
fn measure(mut cmd: Command) -> anyhow::Result<Value> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{shown} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("{shown} printed no JSON line"))?;
    serde_json::from_str(line).with_context(|| format!("{shown}: {line}"))
}

fn ours(args: &Args, model: &str, checkpointing: bool) -> anyhow::Result<Value> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["models", "--json", "--models", model]);
    if !args.no_train {
        cmd.arg("--train-step");
    }
    cmd.args(["--size", &args.size.to_string()])
        .args(["--canvas", &args.canvas])
        .args(["--steps", &args.steps.to_string()]);
    if checkpointing {
        cmd.arg("--checkpoint-activations");
    }
    measure(cmd)
}

fn pytorch(args: &Args, model: &str) -> anyhow::Result<Value> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/bench_pytorch_models.py"
    );
    let mut cmd = Command::new(&args.python);
    cmd.arg(script)
        .args(["--model", model])
        .args(["--threads", &rayon::current_num_threads().to_string()])
        .args(["--size", &args.size.to_string()])
        .args(["--canvas", &args.canvas])
        .args(["--steps", &args.steps.to_string()]);
    if args.no_train {
        cmd.arg("--no-train");
    }
    measure(cmd)
}

fn torch_version(python: &str) -> Option<String> {
    let out = Command::new(python)
        .args(["-c", "import torch; print(torch.__version__)"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    }
}

fn cell(v: Option<f64>, scale: f64, digits: usize) -> String {
    v.map(|v| format!("{:.*}", digits, v / scale))
        .unwrap_or_else(|| "–".into())
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        matches!(args.canvas.as_str(), "paper" | "native"),
        "--canvas {:?}: expected paper or native",
        args.canvas
    );
    let torch = torch_version(&args.python);
    println!(
        "{}, {} threads, kernels {}, scan kernels {}; input {s}², UNETR and ViM-UNet on the {} canvas; training \
         step at batch 2 with Adam; PyTorch: {}; median of {} after a warm-up; each \
         measurement in a process of its own, ours then PyTorch's per model",
        seg_data::machine::describe(),
        rayon::current_num_threads(),
        cpu_ops::simd_path(),
        vim_scan::cpu::kernel_path().name(),
        if args.canvas == "paper" {
            "paper's 1024²".to_string()
        } else {
            format!("native {}²", args.size)
        },
        torch
            .as_deref()
            .unwrap_or("not importable, its side skipped"),
        args.steps,
        s = args.size
    );
    println!(
        "| model | training | forward ms | PyTorch | ratio | step ms | PyTorch | ratio | peak \
         RSS GiB | PyTorch | ratio | our peak heap GiB |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    const GIB: f64 = (1u64 << 30) as f64;
    for model in &args.models {
        let mut runs = vec![("default", ours(args, model, false)?)];
        if args.checkpointing {
            runs.push(("checkpointed", ours(args, model, true)?));
        }
        let theirs = match torch {
            Some(_) => Some(pytorch(args, model)?),
            None => None,
        };
        let t = |key: &str| theirs.as_ref().and_then(|v| num(v, key));
        for (training, v) in runs {
            println!(
                "| {model} | {training} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell(num(&v, "forward_ms"), 1.0, 0),
                cell(t("forward_ms"), 1.0, 0),
                ratio(num(&v, "forward_ms"), t("forward_ms")),
                cell(num(&v, "step_ms"), 1.0, 0),
                cell(t("step_ms"), 1.0, 0),
                ratio(num(&v, "step_ms"), t("step_ms")),
                cell(num(&v, "peak_rss_bytes"), GIB, 2),
                cell(t("peak_rss_bytes"), GIB, 2),
                ratio(num(&v, "peak_rss_bytes"), t("peak_rss_bytes")),
                cell(num(&v, "peak_heap_bytes"), GIB, 2),
            );
        }
    }
    Ok(())
}

use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Tensor};
use vim_nets::{Canvas, Model, ModelConfig, ModelKind, PresetOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Models to time (comma-separated); all by default.
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// Input side for the forward (and training-step) timing.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// ViT/ViM canvas: paper (1024²) or native (the input size).
    #[arg(long, default_value = "paper")]
    canvas: String,
    /// Also time one training step (forward + backward + Adam) at batch 2.
    #[arg(long)]
    train_step: bool,
    /// Only print parameter counts.
    #[arg(long)]
    no_time: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// UNet / decoder initial features (the paper: 64).
    #[arg(long, default_value_t = 64)]
    features: usize,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let kinds: Vec<ModelKind> = match &args.models {
        None => ModelKind::ALL.to_vec(),
        Some(names) => names
            .iter()
            .map(|n| n.parse::<ModelKind>())
            .collect::<Result<_, _>>()?,
    };
    let canvas = match args.canvas.as_str() {
        "paper" => Canvas::Paper,
        "native" => Canvas::Native(args.size.div_ceil(16) * 16),
        other => anyhow::bail!("--canvas {other:?}: expected paper or native"),
    };
    let device = seg_train::device(&args.device)?;
    println!(
        "{} on {}, {} threads; input 1×1×{s}×{s}, canvas {:?}",
        if args.no_time {
            "parameter counts"
        } else {
            "parameters and times"
        },
        args.device,
        rayon::current_num_threads(),
        canvas,
        s = args.size
    );
    println!("| model | parameters (C = 2) | forward ms | train step ms (batch 2) |");
    println!("|---|---:|---:|---:|");
    for kind in kinds {
        let config = ModelConfig::preset(kind, 2, &{
            let mut opts = PresetOptions::default();
            opts.canvas = canvas;
            opts.features = args.features;
            opts
        });
        let count = config.parameter_count()?;
        if args.no_time {
            println!(
                "| {} | {} | | |",
                kind.label(),
                seg_pipeline::system::group_digits(count)
            );
            continue;
        }
        let model = Model::new(config, &device, 0)?;
        let x = Tensor::randn(0f32, 1.0, (1, 1, args.size, args.size), &device)?;
        model.forward(&x, false).context("warm-up forward")?;
        let t = Instant::now();
        let y = model.forward(&x, false)?;
        y.to_device(&candle_core::Device::Cpu)?;
        let fwd = t.elapsed().as_secs_f64() * 1e3;
        let step = if args.train_step {
            let x2 = Tensor::randn(0f32, 1.0, (2, 1, args.size, args.size), &device)?;
            let target = Tensor::zeros((2, 2, args.size, args.size), DType::F32, &device)?;
            let mut adam = seg_train::optim::Adam::new(model.params().trainable(), 1e-4);
            // One warm-up step (allocates the optimizer state), then the median of three.
            let mut times = Vec::new();
            for _ in 0..4 {
                let t = Instant::now();
                let loss = seg_train::dice_loss(&model.forward(&x2, true)?, &target)?;
                adam.step(&loss.backward()?)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let mut timed = times[1..].to_vec();
            timed.sort_by(f64::total_cmp);
            format!("{:.0}", timed[1])
        } else {
            String::new()
        };
        println!(
            "| {} | {} | {fwd:.0} | {step} |",
            kind.label(),
            seg_pipeline::system::group_digits(count)
        );
    }
    Ok(())
}

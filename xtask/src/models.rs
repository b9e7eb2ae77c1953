use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Tensor};
use cpu_ops::memory::{gib, live_bytes, peak_bytes, reset_peak};
use seg_pipeline::system::peak_rss;
use vim_nets::{Canvas, Model, ModelConfig, ModelKind, Pass, PresetOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Models to time (comma-separated); all by default.
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    /// Input side for the forward (and training-step) timing.
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// ViT/ViM canvas: paper (1024²) or native (the input size).
    #[arg(long, default_value = "paper")]
    pub canvas: String,
    /// Also time one training step (forward + backward + Adam) at batch 2, with its peak
    /// memory and what the forward keeps for the backward pass, by layer kind.
    #[arg(long)]
    pub train_step: bool,
    /// Timed forwards and training steps, each after a warm-up (the median of each is printed).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Train with activation checkpointing (each block recomputed in the backward pass).
    #[arg(long)]
    pub checkpoint_activations: bool,
    /// Train with candle's plain autograd (no segments: every composed op keeps its
    /// intermediates), to measure what the segments save.
    #[arg(long)]
    pub plain_autograd: bool,
    /// Only print parameter counts.
    #[arg(long)]
    pub no_time: bool,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// UNet / decoder initial features (the paper: 64).
    #[arg(long, default_value_t = 64)]
    pub features: usize,
    /// Print one JSON object per model instead of the tables (for `bench models`).
    #[arg(long)]
    pub json: bool,
    /// Also profile one forward (and, with --train-step, one training step): wall time by
    /// layer part (the stage and detail marks of the forward passes), then the loss, the
    /// backward pass and the optimizer step.
    #[arg(long)]
    pub profile: bool,
}

/// One profiled call: wall time by mark kind, in order of first appearance, with the number of
/// marks of each kind. The time from the previous mark (or the start) to a mark counts for the
/// mark's kind.
type Profile = Vec<(String, f64, usize)>;

fn timed_by_kind<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(Profile, T)> {
    let marks: std::rc::Rc<std::cell::RefCell<Vec<(&'static str, Instant)>>> = Default::default();
    let sink = marks.clone();
    let start = Instant::now();
    vim_nets::checkpoint::set_stage_hook(Some(Box::new(move |kind, _| {
        sink.borrow_mut().push((kind, Instant::now()));
    })));
    let out = f();
    vim_nets::checkpoint::set_stage_hook(None);
    let end = Instant::now();
    let out = out?;
    let mut profile: Profile = Vec::new();
    let mut last = start;
    let mut add = |kind: &str, secs: f64| match profile.iter_mut().find(|(k, _, _)| k == kind) {
        Some(row) => {
            row.1 += secs * 1e3;
            row.2 += 1;
        }
        None => profile.push((kind.to_string(), secs * 1e3, 1)),
    };
    for &(kind, at) in marks.borrow().iter() {
        add(kind, (at - last).as_secs_f64());
        last = at;
    }
    if end > last {
        add("(after the last mark)", (end - last).as_secs_f64());
    }
    Ok((profile, out))
}

fn print_profile(title: &str, profile: &Profile) {
    let total: f64 = profile.iter().map(|(_, ms, _)| ms).sum();
    println!("\n{title}: {total:.0} ms");
    println!("| part | marks | ms | share |");
    println!("|---|---:|---:|---:|");
    for (kind, ms, n) in profile {
        println!(
            "| {kind} | {n} | {ms:.1} | {:.1} % |",
            100.0 * ms / total.max(1e-9)
        );
    }
}

/// Live heap bytes at each stage mark of one training forward, summed by stage kind.
fn kept_by_stage(model: &Model, x: &Tensor) -> anyhow::Result<(Vec<(String, isize)>, Tensor)> {
    let marks: std::rc::Rc<std::cell::RefCell<Vec<(&'static str, usize)>>> = Default::default();
    let sink = marks.clone();
    let start = live_bytes();
    vim_nets::checkpoint::set_stage_hook(Some(Box::new(move |kind, mark| {
        if mark == vim_nets::checkpoint::Mark::Stage {
            sink.borrow_mut().push((kind, live_bytes()));
        }
    })));
    let y = model.forward(x, true);
    vim_nets::checkpoint::set_stage_hook(None);
    let y = y?;
    let mut sums: BTreeMap<&'static str, isize> = BTreeMap::new();
    let mut order = Vec::new();
    let mut last = start;
    for &(kind, live) in marks.borrow().iter() {
        if !sums.contains_key(kind) {
            order.push(kind);
        }
        *sums.entry(kind).or_default() += live as isize - last as isize;
        last = live;
    }
    Ok((
        order
            .into_iter()
            .map(|k| (k.to_string(), sums[k]))
            .collect(),
        y,
    ))
}

fn mib(bytes: isize) -> String {
    format!("{:.0}", bytes as f64 / (1u64 << 20) as f64)
}

/// One model's figures.
struct Row {
    kind: ModelKind,
    parameters: usize,
    forward_ms: Option<f64>,
    step_ms: Option<f64>,
    forward_peak_heap: Option<usize>,
    forward_estimate: u64,
    peak_heap: Option<usize>,
    step_estimate: u64,
    peak_rss: Option<u64>,
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
    anyhow::ensure!(args.steps >= 1, "--steps must be at least 1");
    let device = seg_train::device(&args.device)?;
    let heap = cpu_ops::memory::counting() && device.is_cpu();
    let training = match (args.checkpoint_activations, args.plain_autograd) {
        (true, _) => "activation checkpointing",
        (false, true) => "candle's plain autograd (no segments)",
        (false, false) => "segments",
    };
    if !args.json {
        println!(
            "{} on {}, {} threads, kernels {}, scan kernels {}; input 1×1×{s}×{s}, canvas {:?}{}",
            if args.no_time {
                "parameter counts"
            } else {
                "parameters and times"
            },
            args.device,
            rayon::current_num_threads(),
            cpu_ops::simd_path(),
            vim_scan::cpu::kernel_path().name(),
            canvas,
            if args.train_step {
                format!("; training with {training}")
            } else {
                String::new()
            },
            s = args.size
        );
        println!(
            "| model | parameters (C = 2) | forward ms | forward peak heap (estimate) | train step ms \
             (batch 2) | step peak heap (estimate) | process peak RSS |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|");
    }
    let _plain = args
        .plain_autograd
        .then(vim_nets::checkpoint::PlainAutograd::new);
    let mut breakdowns = Vec::new();
    let mut profiles: Vec<(String, Profile)> = Vec::new();
    let mut graphs = Vec::new();
    for kind in kinds {
        let config = ModelConfig::preset(kind, 2, &{
            let mut opts = PresetOptions::default();
            opts.canvas = canvas;
            opts.features = args.features;
            opts
        });
        let parameters = config.parameter_count()?;
        let estimate = |batch, pass| {
            config
                .memory_estimate(parameters, batch, args.size, args.size, pass)
                .total()
        };
        let mut row = Row {
            kind,
            parameters,
            forward_ms: None,
            step_ms: None,
            forward_peak_heap: None,
            forward_estimate: estimate(1, Pass::Inference),
            peak_heap: None,
            step_estimate: estimate(
                2,
                Pass::Training {
                    checkpoint_activations: args.checkpoint_activations,
                },
            ),
            peak_rss: None,
        };
        if !args.no_time {
            let model = Model::new(config, &device, 0)?;
            model.set_checkpoint_activations(args.checkpoint_activations);
            let x = Tensor::randn(0f32, 1.0, (1, 1, args.size, args.size), &device)?;
            model.forward(&x, false).context("warm-up forward")?;
            reset_peak();
            // The median of `steps` forwards, as PyTorch's side of `bench models` times them.
            let mut times = Vec::new();
            for _ in 0..args.steps.max(1) {
                let t = Instant::now();
                let y = model.forward(&x, false)?;
                y.to_device(&candle_core::Device::Cpu)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            row.forward_ms = Some(crate::bench::middle(times));
            row.forward_peak_heap = heap.then(peak_bytes);
            if args.profile {
                let (p, _) = timed_by_kind(|| Ok(model.forward(&x, false)?))?;
                profiles.push((format!("{}: forward, batch 1", kind.label()), p));
            }
            if args.train_step {
                let x2 = Tensor::randn(0f32, 1.0, (2, 1, args.size, args.size), &device)?;
                let target = Tensor::zeros((2, 2, args.size, args.size), DType::F32, &device)?;
                let mut adam = seg_train::optim::Adam::new(model.params().trainable(), 1e-4);
                // One warm-up step (allocates the optimizer state), then the median of the
                // rest; the peaks are those of the timed steps.
                let mut times = Vec::new();
                for i in 0..=args.steps {
                    if i == 1 {
                        reset_peak();
                    }
                    let t = Instant::now();
                    let (kept, y) = if i == 1 && heap {
                        let before = live_bytes();
                        let (stages, y) = kept_by_stage(&model, &x2)?;
                        (Some((stages, live_bytes() as isize - before as isize)), y)
                    } else {
                        (None, model.forward(&x2, true)?)
                    };
                    let loss = seg_train::dice_loss(&y, &target)?;
                    drop(y);
                    let grads = model.backward(&loss)?;
                    drop(loss);
                    adam.step(&grads)?;
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                    if let Some(k) = kept {
                        breakdowns.push((kind, k));
                    }
                }
                row.step_ms = Some(crate::bench::middle(times[1..].to_vec()));
                row.peak_heap = heap.then(peak_bytes);
                if args.profile {
                    let (mut p, y) = timed_by_kind(|| Ok(model.forward(&x2, true)?))?;
                    let mut part = |name: &str, f: &mut dyn FnMut() -> anyhow::Result<()>| {
                        let t = Instant::now();
                        let r = f();
                        p.push((name.to_string(), t.elapsed().as_secs_f64() * 1e3, 1));
                        r
                    };
                    let mut loss = None;
                    part("loss", &mut || {
                        loss = Some(seg_train::dice_loss(&y, &target)?);
                        Ok(())
                    })?;
                    drop(y);
                    let loss = loss.context("no loss")?;
                    graphs.push((kind, graph_size(&loss)));
                    let mut grads = None;
                    part("backward pass (all layers)", &mut || {
                        grads = Some(model.backward(&loss)?);
                        Ok(())
                    })?;
                    drop(loss);
                    let grads = grads.context("no gradients")?;
                    part("Adam step", &mut || Ok(adam.step(&grads)?))?;
                    profiles.push((
                        format!("{}: training step, batch 2 ({training})", kind.label()),
                        p,
                    ));
                }
            }
            row.peak_rss = peak_rss();
        }
        print_row(&row, args, training)?;
    }
    if args.json {
        return Ok(());
    }
    for (title, profile) in &profiles {
        print_profile(title, profile);
    }
    for (kind, (nodes, bytes)) in graphs {
        println!(
            "\n{}: the training step's gradient graph holds {nodes} tensors computed from the \
             parameters, {} MiB in all; the backward pass zero-fills and adds a gradient of \
             each one's size",
            kind.label(),
            mib(bytes as isize)
        );
    }
    for (kind, (stages, total)) in breakdowns {
        println!(
            "\n{}: heap the training forward keeps for the backward pass, by stage kind \
             (MiB; the model's weights and Adam's state are outside it)",
            kind.label()
        );
        println!("| stage | MiB |");
        println!("|---|---:|");
        for (name, bytes) in stages {
            println!("| {name} | {} |", mib(bytes));
        }
        println!("| **all** | **{}** |", mib(total));
    }
    Ok(())
}

/// The tensors of the gradient graph that ends in `loss`, leaves (parameters) left out: how
/// many, and their bytes.
fn graph_size(loss: &Tensor) -> (usize, usize) {
    let nodes = loss.sorted_nodes();
    let inner: Vec<_> = nodes.iter().filter(|n| !n.is_variable()).collect();
    let bytes = inner
        .iter()
        .map(|n| n.elem_count() * n.dtype().size_in_bytes())
        .sum();
    (inner.len(), bytes)
}

/// A measured peak with the estimate beside it (the estimate alone when nothing was measured).
fn with_estimate(measured: Option<usize>, estimate: u64) -> String {
    let estimate = gib(estimate as usize);
    match measured {
        Some(m) => format!("{} ({estimate})", gib(m)),
        None => format!("({estimate})"),
    }
}

fn print_row(row: &Row, args: &Args, training: &str) -> anyhow::Result<()> {
    if args.json {
        let v = serde_json::json!({
            "model": row.kind.name(),
            "parameters": row.parameters,
            "forward_ms": row.forward_ms,
            "step_ms": row.step_ms,
            "forward_peak_heap_bytes": row.forward_peak_heap,
            "forward_estimate_bytes": row.forward_estimate,
            "step_estimate_bytes": row.step_estimate,
            "peak_heap_bytes": row.peak_heap,
            "peak_rss_bytes": row.peak_rss,
            "training": training,
            "kernels": cpu_ops::simd_path(),
            "scan_kernels": vim_scan::cpu::kernel_path().name(),
            "threads": rayon::current_num_threads(),
        });
        println!("{v}");
        return Ok(());
    }
    let ms = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_default();
    println!(
        "| {} | {} | {} | {} | {} | {} | {} |",
        row.kind.label(),
        seg_pipeline::system::group_digits(row.parameters),
        ms(row.forward_ms),
        with_estimate(row.forward_peak_heap, row.forward_estimate),
        ms(row.step_ms),
        with_estimate(row.peak_heap, row.step_estimate),
        row.peak_rss.map(|b| gib(b as usize)).unwrap_or_default(),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A profile attributes the whole call to the parts the forward marks, in order, and counts
    /// each mark (a UNet of depth 2: two encoder blocks, the base, two decoder blocks).
    #[test]
    fn a_profile_covers_the_forward_by_its_marked_parts() {
        let mut config = ModelConfig::preset(ModelKind::UNet, 2, &PresetOptions::default());
        if let vim_nets::NetConfig::UNet(u) = &mut config.net {
            u.depth = 2;
            u.initial_features = 4;
        }
        let model = Model::new(config, &candle_core::Device::Cpu, 0).unwrap();
        let x = Tensor::zeros((1, 1, 32, 32), DType::F32, &candle_core::Device::Cpu).unwrap();
        let t = Instant::now();
        let (profile, y) = timed_by_kind(|| Ok(model.forward(&x, false)?)).unwrap();
        let wall = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(y.dims(), &[1, 2, 32, 32]);
        let kinds: Vec<(&str, usize)> = profile.iter().map(|(k, _, n)| (k.as_str(), *n)).collect();
        assert_eq!(
            kinds[..4],
            [
                ("UNet: conv block", 5),
                ("UNet: pooling", 2),
                ("UNet: upsampler", 2),
                ("output", 2)
            ]
        );
        let total: f64 = profile.iter().map(|(_, ms, _)| ms).sum();
        assert!(total <= wall && total > 0.0, "{total} of {wall} ms");
        // The hook is removed afterwards.
        assert!(vim_nets::checkpoint::set_stage_hook(None).is_none());
    }
}

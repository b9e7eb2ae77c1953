//! `cargo xtask gpu-check --out DIR`: the checks and measurements of a GPU machine, written as
//! JSON lines to `DIR/gpu-check.jsonl` (one object per record, flushed as it is made, so a run
//! cut short keeps what it measured). Run by `scripts/gpu-check.sh` from a binary built with
//! `--features cuda`; a CPU-only build says so and stops.
//!
//! 1. `environment`: device, compute capability, memory, driver and the CUDA libraries loaded.
//! 2. `scan`: vim-scan's CUDA forward and backward against the CPU kernel on the same random
//!    inputs (largest errors), and the op's time and effective bandwidth at ViM-T/ViM-S shapes.
//! 3. `model`: each model's forward on CPU and GPU with the same weights (largest difference),
//!    inference time per image (512² and 520×704, median after warm-up, including the copy
//!    back), and the peak device memory and time of a training step at batch 2, 512².
//! 4. `train`: a short training run on the embedded synthetic CREMI data on the GPU, with the
//!    validation loss per epoch.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};
use vim_nets::{Model, ModelConfig, ModelKind, PresetOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Folder for gpu-check.jsonl (created).
    #[arg(long)]
    out: PathBuf,
    /// Scratch folder for synthetic data, weights and the training run (default: OUT/work).
    #[arg(long)]
    work: Option<PathBuf>,
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Parts to run (comma-separated): environment, scan, models, train. All by default.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Timed repetitions after warm-up.
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// Models for the model part (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "unet,unetr-b,vim-unet-t,vim-unet-s"
    )]
    models: Vec<String>,
}

struct Log {
    file: std::fs::File,
}

impl Log {
    fn record(&mut self, v: Value) -> anyhow::Result<()> {
        println!("{v}");
        writeln!(self.file, "{v}")?;
        self.file.flush()?;
        Ok(())
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create", args.out.display()))?;
    let path = args.out.join("gpu-check.jsonl");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    let mut log = Log { file };
    let device = match seg_train::device(&args.device) {
        Ok(d) if d.is_cuda() => d,
        Ok(_) => anyhow::bail!("gpu-check needs a CUDA device (--device cuda[:N])"),
        Err(e) => {
            log.record(json!({"check": "device", "error": e.to_string()}))?;
            return Err(e.into());
        }
    };
    let work = args.work.clone().unwrap_or_else(|| args.out.join("work"));
    std::fs::create_dir_all(&work).with_context(|| format!("{}: cannot create", work.display()))?;
    let wanted = |part: &str| {
        args.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|p| p == part))
    };
    let mut failures = Vec::new();
    let mut attempt = |log: &mut Log, part: &str, r: anyhow::Result<()>| -> anyhow::Result<()> {
        if let Err(e) = r {
            let msg = format!("{e:#}");
            eprintln!("{part}: FAILED: {msg}");
            log.record(json!({"check": part, "error": msg}))?;
            failures.push(part.to_string());
        }
        Ok(())
    };
    if wanted("environment") {
        let r = environment(&mut log, &device);
        attempt(&mut log, "environment", r)?;
    }
    if wanted("scan") {
        let r = scan(&mut log, &device, args.repeats);
        attempt(&mut log, "scan", r)?;
    }
    if wanted("models") {
        for name in &args.models {
            let r = name
                .parse::<ModelKind>()
                .map_err(anyhow::Error::from)
                .and_then(|kind| model(&mut log, &device, kind, args.repeats, &work));
            attempt(&mut log, &format!("model {name}"), r)?;
        }
    }
    if wanted("train") {
        let r = train(&mut log, &device, &work);
        attempt(&mut log, "train", r)?;
    }
    if failures.is_empty() {
        println!("gpu-check: all parts ran; results in {}", path.display());
        Ok(())
    } else {
        anyhow::bail!(
            "gpu-check: {} failed (details in {})",
            failures.join(", "),
            path.display()
        )
    }
}

/// Median, min and max of a list of milliseconds.
fn stats(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    json!({"median": v[v.len() / 2], "min": v[0], "max": v[v.len() - 1], "n": v.len()})
}

/// Runs `f` `warm` times untimed, then `n` times timed (device synchronised); milliseconds.
fn time<T>(
    device: &Device,
    warm: usize,
    n: usize,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<Vec<f64>> {
    for _ in 0..warm {
        f()?;
    }
    device.synchronize()?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<(f64, f64)> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let diff = (&a - &b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok((diff, scale))
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::Device;

    /// (name, compute capability, total memory) of the device.
    pub fn describe(device: &Device) -> anyhow::Result<(String, (i32, i32), usize)> {
        let ctx = device.as_cuda_device()?.cuda_stream().context().clone();
        Ok((ctx.name()?, ctx.compute_capability()?, ctx.total_mem()?))
    }

    pub fn driver_version() -> Option<i32> {
        let mut v = 0i32;
        // SAFETY: cuDriverGetVersion writes one int; the driver is loaded (a device exists).
        let r =
            unsafe { candle_core::cuda_backend::cudarc::driver::sys::cuDriverGetVersion(&mut v) };
        (r == candle_core::cuda_backend::cudarc::driver::sys::cudaError_enum::CUDA_SUCCESS)
            .then_some(v)
    }

    /// Device memory in use (total − free), in bytes.
    pub fn used(device: &Device) -> anyhow::Result<usize> {
        let ctx = device.as_cuda_device()?.cuda_stream().context().clone();
        let (free, total) = ctx.mem_get_info()?;
        Ok(total - free)
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use candle_core::Device;

    pub fn describe(_: &Device) -> anyhow::Result<(String, (i32, i32), usize)> {
        anyhow::bail!("this build has no CUDA support")
    }
    pub fn driver_version() -> Option<i32> {
        None
    }
    pub fn used(_: &Device) -> anyhow::Result<usize> {
        anyhow::bail!("this build has no CUDA support")
    }
}

/// Samples device memory in use every millisecond while `f` runs; returns `f`'s value and the
/// largest sample.
fn peak_memory<T>(
    device: &Device,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, usize)> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let stop = AtomicBool::new(false);
    let peak = AtomicUsize::new(cuda::used(device)?);
    let value = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(u) = cuda::used(device) {
                    peak.fetch_max(u, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        let v = f();
        let _ = device.synchronize();
        stop.store(true, Ordering::Relaxed);
        v
    })?;
    peak.fetch_max(cuda::used(device)?, Ordering::Relaxed);
    Ok((value, peak.load(Ordering::Relaxed)))
}

fn environment(log: &mut Log, device: &Device) -> anyhow::Result<()> {
    let (name, cc, total) = cuda::describe(device)?;
    // The CUDA libraries this process has loaded, from the memory map.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut libs: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| {
            ["libcuda", "libnvrtc", "libcublas", "libcurand", "libcudart"]
                .iter()
                .any(|k| p.contains(k))
        })
        .collect();
    libs.sort_unstable();
    libs.dedup();
    log.record(json!({
        "check": "environment",
        "device": name,
        "compute_capability": [cc.0, cc.1],
        "memory_total_bytes": total,
        "driver_version": cuda::driver_version(),
        "cuda_libraries": libs,
        "cpu_threads": rayon::current_num_threads(),
        "vim_scan_chunk": 1024,
    }))
}

/// Uniform random values in [lo, hi), deterministic in `seed`.
fn uniform(shape: &[usize], lo: f64, hi: f64, seed: u64) -> anyhow::Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut rng = seg_data::synthetic::SplitMix64::new(seed);
    let v: Vec<f32> = (0..n)
        .map(|_| (lo + (hi - lo) * rng.uniform()) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

struct ScanCase {
    vars: Vec<Var>,
    grad_out: Tensor,
}

impl ScanCase {
    fn new(b: usize, e: usize, n: usize, l: usize, seed: u64) -> anyhow::Result<ScanCase> {
        let shapes: [(&[usize], f64, f64); 8] = [
            (&[b, e, l], -1.0, 1.0),  // u
            (&[b, e, l], -4.0, -1.0), // delta (before softplus)
            (&[e, n], -2.0, -0.1),    // A
            (&[b, n, l], -1.0, 1.0),  // B
            (&[b, n, l], -1.0, 1.0),  // C
            (&[e], -1.0, 1.0),        // D
            (&[b, e, l], -2.0, 2.0),  // z
            (&[e], -0.5, 0.5),        // delta_bias
        ];
        let vars = shapes
            .iter()
            .enumerate()
            .map(|(i, (s, lo, hi))| Ok(Var::from_tensor(&uniform(s, *lo, *hi, seed + i as u64)?)?))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let grad_out = uniform(&[b, e, l], -1.0, 1.0, seed + 100)?;
        Ok(ScanCase { vars, grad_out })
    }

    fn on(&self, device: &Device) -> anyhow::Result<ScanCase> {
        Ok(ScanCase {
            vars: self
                .vars
                .iter()
                .map(|v| Ok(Var::from_tensor(&v.as_tensor().to_device(device)?)?))
                .collect::<anyhow::Result<_>>()?,
            grad_out: self.grad_out.to_device(device)?,
        })
    }

    fn forward(&self) -> anyhow::Result<Tensor> {
        let v: Vec<&Tensor> = self.vars.iter().map(|v| v.as_tensor()).collect();
        Ok(vim_scan::selective_scan(
            v[0],
            v[1],
            v[2],
            v[3],
            v[4],
            Some(v[5]),
            Some(v[6]),
            Some(v[7]),
            true,
        )?)
    }

    /// Output and the gradients of Σ y·grad_out for every input.
    fn forward_backward(&self) -> anyhow::Result<(Tensor, Vec<Tensor>)> {
        let y = self.forward()?;
        let grads = (&y * &self.grad_out)?.sum_all()?.backward()?;
        let g = self
            .vars
            .iter()
            .map(|v| grads.get(v).cloned().context("an input got no gradient"))
            .collect::<anyhow::Result<_>>()?;
        Ok((y, g))
    }
}

fn scan(log: &mut Log, device: &Device, repeats: usize) -> anyhow::Result<()> {
    const NAMES: [&str; 8] = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"];
    for (model, e) in [("ViM-T", 384), ("ViM-S", 768)] {
        for l in [1025, 4097] {
            for b in [1, 2] {
                let n = 16;
                let host = ScanCase::new(b, e, n, l, 7)?;
                let gpu = host.on(device)?;
                let (y_cpu, g_cpu) = host.forward_backward()?;
                let (y_gpu, g_gpu) = gpu.forward_backward()?;
                let (dy, sy) = max_abs_diff(&y_gpu, &y_cpu)?;
                let mut grad_errors = serde_json::Map::new();
                for (i, name) in NAMES.iter().enumerate() {
                    let (d, s) = max_abs_diff(&g_gpu[i], &g_cpu[i])?;
                    grad_errors.insert(
                        (*name).into(),
                        json!({"max_abs": d, "relative_to_max": d / s.max(1e-30)}),
                    );
                }
                let fwd = time(device, 3, repeats, || gpu.forward())?;
                let fwd_bwd = time(device, 2, repeats, || gpu.forward_backward())?;
                // Bytes the forward kernel must move at least: u, delta, z in and y out
                // (b·E·L each), B and C (b·N·L each), all f32.
                let bytes = 4.0 * (4.0 * (b * e * l) as f64 + 2.0 * (b * n * l) as f64);
                let fwd = stats(fwd);
                let median = fwd["median"].as_f64().unwrap_or(f64::NAN);
                log.record(json!({
                    "check": "scan",
                    "shape": {"model": model, "batch": b, "E": e, "N": n, "L": l},
                    "forward_max_abs_error": dy,
                    "forward_relative_to_max": dy / sy.max(1e-30),
                    "gradient_errors": grad_errors,
                    "forward_ms": fwd,
                    "forward_backward_ms": stats(fwd_bwd),
                    "forward_effective_gb_per_s": bytes / (median * 1e-3) / 1e9,
                    "note": "op times include packing the inputs (three cat) around the kernel",
                }))?;
            }
        }
    }
    Ok(())
}

fn model(
    log: &mut Log,
    device: &Device,
    kind: ModelKind,
    repeats: usize,
    out: &Path,
) -> anyhow::Result<()> {
    let config = ModelConfig::preset(kind, 2, &PresetOptions::default());
    let cpu_model = Model::new(config.clone(), &Device::Cpu, 0)?;
    let weights = out.join(format!(".{}-weights.safetensors", kind.name()));
    cpu_model.save(&weights)?;
    let gpu_model = Model::from_safetensors(config.clone(), &weights, device)?;
    std::fs::remove_file(&weights).ok();
    let x = uniform(&[1, 1, 512, 512], -1.5, 1.5, 11)?;
    let y_cpu = cpu_model.forward(&x, false)?;
    let y_gpu = gpu_model.forward(&x.to_device(device)?, false)?;
    let (diff, scale) = max_abs_diff(&y_gpu, &y_cpu)?;
    drop(cpu_model);

    let mut per_image = serde_json::Map::new();
    for (h, w) in [(512, 512), (520, 704)] {
        let image = ndarray::Array2::<f32>::from_shape_fn((h, w), |(i, j)| {
            ((i * 7 + j * 13) % 97) as f32 / 48.0 - 1.0
        });
        let ms = time(device, 2, repeats, || {
            Ok(seg_train::predict::predict_image(&gpu_model, image.view())?)
        })?;
        per_image.insert(format!("{h}x{w}"), stats(ms));
    }

    // A training step at batch 2, 512²: forward, Dice loss, backward, Adam.
    let x2 = uniform(&[2, 1, 512, 512], -1.5, 1.5, 12)?.to_device(device)?;
    let target = uniform(&[2, 2, 512, 512], 0.0, 1.0, 13)?
        .ge(0.5)?
        .to_dtype(DType::F32)?
        .to_device(device)?;
    let mut adam = seg_train::optim::Adam::new(gpu_model.params().trainable(), 1e-4);
    device.synchronize()?;
    let before = cuda::used(device)?;
    let mut step = || -> anyhow::Result<()> {
        let loss = seg_train::dice_loss(&gpu_model.forward(&x2, true)?, &target)?;
        adam.step(&gpu_model.backward(&loss)?)?;
        Ok(())
    };
    let ((), first_peak) = peak_memory(device, &mut step)?;
    let (step_ms, later_peak) = peak_memory(device, || time(device, 0, 3, &mut step))?;
    // The same step in bf16 mixed precision, and the bf16 forward against the f32 one; a
    // failure here is recorded without losing the f32 figures.
    let bf16 = (|| -> anyhow::Result<Value> {
        let _bf16 = seg_train::Precision::Bf16.enter()?;
        let (ms, peak) = peak_memory(device, || time(device, 1, 3, &mut step))?;
        let y16 = gpu_model.forward(&x.to_device(device)?, false)?;
        Ok(json!({
            "train_step_ms": stats(ms),
            "peak_device_memory_bytes": peak,
            "forward_512_max_abs_difference_to_f32": max_abs_diff(&y16, &y_gpu)?.0,
            "note": "peak memory measured after the f32 steps, so their cached allocations count",
        }))
    })()
    .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    log.record(json!({
        "check": "model",
        "model": kind.label(),
        "parameters": config.parameter_count()?,
        "forward_512_max_abs_difference_cpu_gpu": diff,
        "forward_512_relative_to_max": diff / scale.max(1e-30),
        "inference_ms_per_image": per_image,
        "train_step_batch2_512": {
            "ms": stats(step_ms),
            "device_memory_before_bytes": before,
            "peak_device_memory_bytes": first_peak.max(later_peak),
            "note": "device memory in use (total − free, sampled every 1 ms), so it includes \
                     the CUDA context and candle's allocator caches",
        },
        "bf16_mixed_precision": bf16,
    }))
}

fn train(log: &mut Log, device: &Device, out: &Path) -> anyhow::Result<()> {
    use seg_pipeline::datasets::{load_splits, synthetic_data};
    use seg_pipeline::{Dataset, Profile, ProfileName};
    let profile = Profile::get(ProfileName::Quick);
    let data_dir = out.join("synthetic-cremi");
    let dir = synthetic_data(Dataset::Cremi, profile.synthetic_size(), 0, &data_dir)?;
    let splits = load_splits(Dataset::Cremi, &dir, None)?;
    let setting = seg_targets::TargetSetting::Cremi;
    let data = seg_train::TrainData {
        train: splits.train.clone(),
        val: splits.val.clone(),
        transform: seg_train::train::target_transform(setting),
        loss: seg_train::train::setting_loss(setting),
        description: json!({"gpu-check": "synthetic cremi"}),
    };
    let options = {
        let mut opts = seg_train::TrainOptions::default();
        opts.iterations = 400;
        opts.batch_size = 2;
        opts.patch = (128, 128);
        opts.lr = 1e-3;
        opts.seed = 0;
        opts.epoch_length = Some(50);
        opts.val_batches = Some(8);
        opts.min_instances = Some(2);
        opts.progress = false;
        opts
    };
    let config = ModelConfig::preset(ModelKind::UNet, 1, &{
        let mut opts = PresetOptions::default();
        opts.features = 16;
        opts
    });
    let model = Model::new(config, device, 0)?;
    let run_dir = out.join("train-run");
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir)?;
    }
    let summary = seg_train::train(
        &model,
        &data,
        &options,
        &run_dir,
        seg_train::Start::New,
        seg_train::StopAfter(None),
    )?;
    let log_path = seg_train::RunPaths::new(&run_dir).log;
    let val: Vec<f64> = std::fs::read_to_string(&log_path)
        .with_context(|| format!("{}", log_path.display()))?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("val_loss").and_then(Value::as_f64))
        .collect();
    let down = match (val.first(), val.last()) {
        (Some(a), Some(b)) => b < a,
        _ => false,
    };
    log.record(json!({
        "check": "train",
        "model": "UNet (16 initial features), synthetic CREMI boundaries, 128² patches, batch 2",
        "iterations": summary.iterations,
        "seconds": summary.seconds,
        "iterations_per_second": summary.iterations as f64 / summary.seconds,
        "val_loss_per_epoch": val,
        "loss_went_down": down,
    }))?;
    if !down {
        anyhow::bail!("the validation loss did not go down on the GPU: {val:?}");
    }
    Ok(())
}

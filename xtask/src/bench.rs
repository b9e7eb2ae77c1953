//! `cargo xtask bench conv`: the convolution kernels against candle's ops, and a UNet
//! forward and training step with either, measured in the same run.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use vim_nets::{Model, ModelConfig, ModelKind, PresetOptions};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Training-batch throughput of the data loader against the training step of the smallest
    /// model, at the same patch size and batch, in one run.
    Loader {
        #[arg(long, default_value_t = 96)]
        patch: usize,
        /// UNet initial features (the quick profile: 16).
        #[arg(long, default_value_t = 16)]
        features: usize,
        #[arg(long, default_value_t = 20)]
        batches: usize,
    },
    /// 3×3 convolutions (forward, forward+backward) and UNet forward / training step.
    Conv {
        /// Repetitions per measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Skip the whole-UNet measurements.
        #[arg(long)]
        kernels_only: bool,
    },
}

fn median(mut f: impl FnMut() -> anyhow::Result<()>, reps: usize) -> anyhow::Result<f64> {
    f()?; // warm-up
    let mut t = Vec::new();
    for _ in 0..reps.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn both(reps: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<(f64, f64)> {
    vim_nets::conv::set_enabled(true);
    let ours = median(&mut f, reps)?;
    vim_nets::conv::set_enabled(false);
    let theirs = median(&mut f, reps);
    vim_nets::conv::set_enabled(true);
    Ok((ours, theirs?))
}

/// `f` with the crate's kernels (3×3 convolutions in the Winograd form where it applies), with
/// the direct 3×3 form, and with candle's ops: (ours, direct, candle).
fn three(reps: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<[f64; 3]> {
    let (ours, candle) = both(reps, &mut f)?;
    vim_nets::conv::set_winograd(false);
    let direct = median(&mut f, reps);
    vim_nets::conv::set_winograd(true);
    Ok([ours, direct?, candle])
}

/// [`three`] of the forward and of forward + backward of the output's sum.
fn three_directions(
    reps: usize,
    f: impl Fn() -> anyhow::Result<Tensor>,
) -> anyhow::Result<([f64; 3], [f64; 3])> {
    let fwd = three(reps, || f().map(drop))?;
    let bwd = three(reps, || {
        f()?.sum_all()?.backward().map(drop).map_err(Into::into)
    })?;
    Ok((fwd, bwd))
}

/// Forward, and forward + backward of the output's sum, of `f`, each with the crate's kernels
/// and with them off: (fwd ours, fwd theirs, fwd+bwd ours, fwd+bwd theirs).
fn both_directions(
    reps: usize,
    f: impl Fn() -> anyhow::Result<Tensor>,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    let (f_ours, f_theirs) = both(reps, || f().map(drop))?;
    let (b_ours, b_theirs) = both(reps, || {
        f()?.sum_all()?.backward().map(drop).map_err(Into::into)
    })?;
    Ok((f_ours, f_theirs, b_ours, b_theirs))
}

fn loader(patch: usize, features: usize, batches: usize) -> anyhow::Result<()> {
    use seg_data::sampling::{BatchLoader, LoaderOptions, VolumeSlices};
    use seg_data::synthetic::{em_volume, EmVolumeOptions};
    let (raw, ids) = em_volume(
        &EmVolumeOptions {
            depth: 12,
            height: 4 * patch,
            width: 4 * patch,
            ..Default::default()
        },
        1,
    );
    let source = std::sync::Arc::new(VolumeSlices::new(vec![seg_data::cremi::CremiVolume {
        raw,
        labels: ids.mapv(|v| v as u32),
        resolution: None,
        slices: 0..12,
    }]));
    let transform = seg_train::train::target_transform(seg_targets::TargetSetting::Cremi);
    println!(
        "{}, {} threads",
        seg_data::machine::describe(),
        crate::models::rayon_threads()
    );
    println!("| what (batch 2, {patch}² patches, CREMI targets) | ms per batch |");
    println!("|---|---:|");
    for workers in [1, 2] {
        let opts = LoaderOptions {
            patch: (patch, patch),
            batch_size: 2,
            seed: 0,
            min_instances: Some(seg_data::sampling::MinInstances::default()),
            augmentation: Default::default(),
            shuffle: false,
            workers,
        };
        let t = Instant::now();
        let mut n = 0;
        for batch in BatchLoader::epoch(source.clone(), transform.clone(), &opts, 0)?.take(batches)
        {
            batch?;
            n += 1;
        }
        println!(
            "| loader, {workers} worker(s) | {:.1} |",
            t.elapsed().as_secs_f64() * 1e3 / n as f64
        );
    }
    let config = ModelConfig::preset(
        ModelKind::UNet,
        1,
        &PresetOptions {
            features,
            ..Default::default()
        },
    );
    let model = Model::new(config, &Device::Cpu, 0)?;
    let x = Tensor::randn(0f32, 1.0, (2, 1, patch, patch), &Device::Cpu)?;
    let target = Tensor::zeros((2, 1, patch, patch), candle_core::DType::F32, &Device::Cpu)?;
    let mut adam = seg_train::optim::Adam::new(model.params().trainable(), 1e-4);
    let step = median(
        || {
            let loss = seg_train::dice_loss(&model.forward(&x, true)?, &target)?;
            adam.step(&loss.backward()?)?;
            Ok(())
        },
        5,
    )?;
    println!("| training step, UNet with {features} features (the smallest model) | {step:.1} |");
    Ok(())
}

pub fn run(command: &Command) -> anyhow::Result<()> {
    let (reps, kernels_only) = match command {
        Command::Loader {
            patch,
            features,
            batches,
        } => return loader(*patch, *features, *batches),
        Command::Conv { reps, kernels_only } => (reps, kernels_only),
    };
    let reps = *reps;
    let dev = Device::Cpu;
    println!(
        "{}, {} threads; median of {reps} after a warm-up",
        seg_data::machine::describe(),
        crate::models::rayon_threads()
    );
    println!(
        "\n3×3 conv, stride 1, pad 1 (f32): ours (Winograd F(2×2, 3×3) where channels and width make it pay, else \
         the direct form), the direct form (products reading zero-padded input rows in place; \
         AVX2 micro-kernels) and candle 0.11 conv2d. GFLOP/s count the direct convolution's \
         2·9·C·O multiply-adds per pixel (effective rate for the Winograd form)"
    );
    println!("| B×C×H×W → O | fwd ours ms | fwd direct ms | fwd candle ms | candle / ours | GFLOP/s ours | GFLOP/s direct | fwd+bwd ours ms | fwd+bwd direct ms | fwd+bwd candle ms | candle / ours |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (b, c, h, w, o) in [
        (1, 1, 512, 512, 64),
        (1, 64, 512, 512, 64),
        (2, 64, 256, 256, 64),
        (1, 128, 256, 256, 128),
        (1, 256, 128, 128, 256),
        (1, 512, 64, 64, 512),
        (1, 1024, 32, 32, 1024),
    ] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 0.05, (o, c, 3, 3), &dev)?)?;
        let ([f_ours, f_direct, f_theirs], [b_ours, b_direct, b_theirs]) =
            three_directions(reps, || {
                Ok(vim_nets::conv::conv3x3(x.as_tensor(), k.as_tensor())?)
            })?;
        let flops = 2.0 * (b * o * h * w * c * 9) as f64;
        println!(
            "| {b}×{c}×{h}×{w} → {o} | {f_ours:.1} | {f_direct:.1} | {f_theirs:.1} | {:.1}× | {:.0} | {:.0} | {b_ours:.1} | {b_direct:.1} | {b_theirs:.1} | {:.1}× |",
            f_theirs / f_ours,
            flops / f_ours / 1e6,
            flops / f_direct / 1e6,
            b_theirs / b_ours
        );
    }
    println!(
        "\nInstanceNorm → 3×3 conv + bias → ReLU (one ConvBlock2d unit, f32): ours (one fused op; \
         Winograd, then with the direct 3×3 form) vs candle ops (instance norm composed, conv2d, \
         broadcast add, relu)"
    );
    println!("| B×C×H×W → O | fwd ours ms | fwd direct ms | fwd candle ms | candle / ours | fwd+bwd ours ms | fwd+bwd direct ms | fwd+bwd candle ms | candle / ours |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (b, c, h, w, o) in [
        (1, 64, 512, 512, 64),
        (1, 128, 512, 512, 64),
        (2, 64, 256, 256, 64),
        (1, 512, 64, 64, 512),
    ] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 0.05, (o, c, 3, 3), &dev)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 0.05, o, &dev)?)?;
        let unit = || {
            vim_nets::conv::conv3x3_block(
                x.as_tensor(),
                k.as_tensor(),
                bias.as_tensor(),
                Some(1e-5),
                true,
            )
        };
        let ([f_ours, f_direct, f_theirs], [b_ours, b_direct, b_theirs]) =
            three_directions(reps, || Ok(unit()?))?;
        println!(
            "| {b}×{c}×{h}×{w} → {o} | {f_ours:.1} | {f_direct:.1} | {f_theirs:.1} | {:.1}× | {b_ours:.1} | {b_direct:.1} | {b_theirs:.1} | {:.1}× |",
            f_theirs / f_ours,
            b_theirs / b_ours
        );
    }
    println!(
        "\nBilinear ×2 upsampling (align_corners=False; torch-em's default UNet sampler), f32: ours (two-tap \
         stencil op) vs two dense matrix products (candle matmul, the form it replaces)"
    );
    println!("| B×C×H×W → 2H×2W | fwd ours ms | fwd matmul ms | ratio | fwd+bwd ours ms | fwd+bwd matmul ms | ratio |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (b, c, h, w) in [(1, 64, 256, 256), (2, 128, 128, 128), (1, 512, 32, 32)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?)?;
        let up = || vim_nets::layers::resize_bilinear(x.as_tensor(), 2 * h, 2 * w, false);
        let (f_ours, f_theirs, b_ours, b_theirs) = both_directions(reps, || Ok(up()?))?;
        println!(
            "| {b}×{c}×{h}×{w} | {f_ours:.1} | {f_theirs:.1} | {:.1}× | {b_ours:.1} | {b_theirs:.1} | {:.1}× |",
            f_theirs / f_ours,
            b_theirs / b_ours
        );
    }
    other_convolutions(reps, &dev)?;
    if *kernels_only {
        return Ok(());
    }
    println!(
        "\nUNet (torch-em UNet2d, depth 4, 64 features, C = 2), whole model with our kernels, \
         with our kernels but the direct 3×3 form, or candle's ops"
    );
    println!("| measurement | ours ms | ours, direct 3×3 ms | candle ms | candle / ours |");
    println!("|---|---:|---:|---:|---:|");
    let model = Model::new(
        ModelConfig::preset(ModelKind::UNet, 2, &PresetOptions::default()),
        &dev,
        0,
    )?;
    let x = Tensor::randn(0f32, 1.0, (1, 1, 512, 512), &dev)?;
    let [o, d, t] = three(reps, || {
        model.forward(&x, false)?;
        Ok(())
    })?;
    println!(
        "| forward 1×1×512² | {o:.0} | {d:.0} | {t:.0} | {:.2}× |",
        t / o
    );
    let x2 = Tensor::randn(0f32, 1.0, (2, 1, 256, 256), &dev)?;
    let target = Tensor::zeros((2, 2, 256, 256), candle_core::DType::F32, &dev)?;
    let mut adam = seg_train::optim::Adam::new(model.params().trainable(), 1e-4);
    let [o, d, t] = three(reps, || {
        let loss = seg_train::dice_loss(&model.forward(&x2, true)?, &target)?;
        adam.step(&loss.backward()?)?;
        Ok(())
    })?;
    println!(
        "| training step 2×1×256² (Adam) | {o:.0} | {d:.0} | {t:.0} | {:.2}× |",
        t / o
    );
    Ok(())
}

type Run = Box<dyn Fn() -> anyhow::Result<Tensor>>;

/// The convolutions that are one matrix product (1×1, 2×2 stride-2 transposed, 16×16
/// stride-16 patch embedding) as the models run them: ours (the `matconv` ops), the matrix
/// product form they replaced (the same layer with the crate's kernels off) and candle's
/// conv ops.
fn other_convolutions(reps: usize, dev: &Device) -> anyhow::Result<()> {
    println!(
        "\n1×1, 2×2 stride-2 transposed and 16×16 stride-16 convolutions with bias (f32): ours \
         (one op on the packed product) vs the matrix-product form (candle matmul, permutes, \
         broadcast bias) vs candle 0.11 conv2d / conv_transpose2d + bias"
    );
    println!("| conv | B×C×H×W → O | fwd ours ms | fwd matmul form ms | fwd candle conv ms | GFLOP/s ours | fwd+bwd ours ms | fwd+bwd matmul form ms | fwd+bwd candle conv ms |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let cases: [(&str, usize, usize, usize, usize); 5] = [
        ("1×1", 1, 128, 256, 256),
        ("1×1", 1, 1024, 32, 32),
        ("2×2 transposed", 1, 128, 256, 256),
        ("2×2 transposed", 1, 1024, 32, 32),
        ("16×16 patch", 1, 3, 1024, 1024),
    ];
    for (kind, b, c, h, w) in cases {
        let (o, k) = match kind {
            "16×16 patch" => (768, 16),
            "1×1" => (c / 2, 1),
            _ => (c / 2, 2),
        };
        let params = vim_nets::params::Params::new(dev, 0);
        let s = params.root();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), dev)?)?;
        let x2 = x.clone();
        let (ours, theirs): (Run, Run) = if kind == "2×2 transposed" {
            let layer = vim_nets::layers::ConvTranspose2x2::new(&s, c, o)?;
            let l2 = layer.clone();
            (
                Box::new(move || Ok(layer.forward(x2.as_tensor())?)),
                Box::new(move || {
                    let y = x.as_tensor().conv_transpose2d(&l2.weight, 0, 0, 2, 1)?;
                    Ok(y.broadcast_add(&l2.bias.reshape((1, o, 1, 1))?)?)
                }),
            )
        } else {
            let layer = vim_nets::layers::Conv2d::new(&s, c, o, k, k, 0, true)?;
            let l2 = layer.clone();
            (
                Box::new(move || {
                    Ok(if k == 1 {
                        layer.forward(x2.as_tensor())?
                    } else {
                        vim_nets::layers::patch_tokens(x2.as_tensor(), &layer)?
                    })
                }),
                Box::new(move || {
                    let y = x.as_tensor().conv2d(&l2.weight, 0, k, 1, 1)?;
                    let bias = l2.bias.as_ref().expect("bias");
                    Ok(y.broadcast_add(&bias.reshape((1, o, 1, 1))?)?)
                }),
            )
        };
        let (f_ours, f_mm, b_ours, b_mm) = both_directions(reps, &ours)?;
        let f_theirs = median(|| theirs().map(drop), reps)?;
        let b_theirs = median(
            || {
                theirs()?
                    .sum_all()?
                    .backward()
                    .map(drop)
                    .map_err(Into::into)
            },
            reps,
        )?;
        let (oh, ow) = if kind == "2×2 transposed" {
            (h, w)
        } else {
            (h / k, w / k)
        };
        let flops = 2.0 * (b * o * c * k * k * oh * ow) as f64;
        println!(
            "| {kind} | {b}×{c}×{h}×{w} → {o} | {f_ours:.1} | {f_mm:.1} | {f_theirs:.1} | {:.0} | {b_ours:.1} | {b_mm:.1} | {b_theirs:.1} |",
            flops / f_ours / 1e6,
        );
    }
    Ok(())
}

//! `cargo xtask bench conv`: the convolution kernels against candle's ops, and a UNet
//! forward and training step with either, measured in the same run.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use vim_nets::{Kernels, Model, ModelConfig, ModelKind, PresetOptions};

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
    /// The paper's models (forward, training step, peak memory) here and, when `torch` is
    /// importable, in PyTorch (`scripts/bench_pytorch_models.py`), with the ratios.
    Models(crate::bench_models::Args),
    /// The encoders' fused ops against their composed forms (candle's ops), forward and
    /// forward + backward, with heap peaks: SAM's attention (ViT-B, the paper's 1024² canvas;
    /// GFLOP/s beside the measured FMA peak), ViM's causal conv1d + SiLU, the MLP's bias +
    /// GELU and the linear layers with bias; first the packed product on each micro-kernel
    /// path.
    EncoderOps {
        /// Repetitions per measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Only these sections (comma-separated: products, attention, conv1d, gelu, linear).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// A synthetic EM volume made slice by slice into Zarr through blockwise predict, segment
    /// and evaluate: voxels per second and peak RSS per stage, for several depths.
    Volume(crate::bench_volume::Args),
}

fn median(mut f: impl FnMut() -> anyhow::Result<()>, reps: usize) -> anyhow::Result<f64> {
    f()?; // warm-up
    let mut t = Vec::new();
    for _ in 0..reps.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(middle(t))
}

/// The median of `times` (the upper one of an even count); `times` is not empty.
pub(crate) fn middle(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// `f` with the crate's kernels and with candle's ops: (ours, candle).
fn both(
    reps: usize,
    mut f: impl FnMut(Kernels) -> anyhow::Result<()>,
) -> anyhow::Result<(f64, f64)> {
    let ours = median(|| f(Kernels::Auto), reps)?;
    let theirs = median(|| f(Kernels::Candle), reps)?;
    Ok((ours, theirs))
}

/// `f` with the crate's kernels (3×3 convolutions in the Winograd form where it applies), with
/// the direct 3×3 form, and with candle's ops: (ours, direct, candle).
fn three(
    reps: usize,
    mut f: impl FnMut(Kernels) -> anyhow::Result<()>,
) -> anyhow::Result<[f64; 3]> {
    let (ours, candle) = both(reps, &mut f)?;
    let direct = median(|| f(Kernels::Direct), reps)?;
    Ok([ours, direct, candle])
}

/// [`three`] of the forward and of forward + backward of the output's sum.
fn three_directions(
    reps: usize,
    f: impl Fn(Kernels) -> anyhow::Result<Tensor>,
) -> anyhow::Result<([f64; 3], [f64; 3])> {
    let fwd = three(reps, |k| f(k).map(drop))?;
    let bwd = three(reps, |k| {
        f(k)?.sum_all()?.backward().map(drop).map_err(Into::into)
    })?;
    Ok((fwd, bwd))
}

/// Forward (no gradient tracked: `forward(k, false)`), and forward + backward of the output's
/// sum (`forward(k, true)`), each with the crate's kernels and with candle's ops:
/// (fwd ours, fwd theirs, fwd+bwd ours, fwd+bwd theirs).
fn both_directions(
    reps: usize,
    f: impl Fn(Kernels, bool) -> anyhow::Result<Tensor>,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    let (f_ours, f_theirs) = both(reps, |k| {
        let _no_grad = vim_nets::layers::NoGrad::new();
        f(k, false).map(drop)
    })?;
    let (b_ours, b_theirs) = both(reps, |k| {
        f(k, true)?
            .sum_all()?
            .backward()
            .map(drop)
            .map_err(Into::into)
    })?;
    Ok((f_ours, f_theirs, b_ours, b_theirs))
}

/// `v` as an operand: tracked by the gradient graph when `grad`, detached otherwise.
fn tracked(v: &Var, grad: bool) -> Tensor {
    if grad {
        v.as_tensor().clone()
    } else {
        v.as_tensor().detach()
    }
}

/// The heap a forward + backward of `run` under `k` holds at its peak beyond what was live
/// before it, in MiB.
fn backward_memory(
    run: &impl Fn(Kernels, bool) -> anyhow::Result<Tensor>,
    k: Kernels,
) -> anyhow::Result<f64> {
    extra_memory(|| {
        run(k, true)?.sum_all()?.backward()?;
        Ok(())
    })
}

/// The heap `f` holds at its peak beyond what was live before it, in MiB (the counting
/// allocator of `cpu_ops::memory`).
fn extra_memory(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    use cpu_ops::memory::{live_bytes, peak_bytes, reset_peak};
    reset_peak();
    let before = live_bytes();
    f()?;
    Ok(peak_bytes().saturating_sub(before) as f64 / (1 << 20) as f64)
}

/// The crate's packed product on each micro-kernel path this CPU runs, same run, all threads.
fn product_paths() {
    println!(
        "\nThe packed product (convolutions, attention tiles) on each micro-kernel path, GFLOP/s \
         on all threads, about 1 s per path:"
    );
    let rows: Vec<_> = [
        ("3×3 conv 64 → 64, 4096 pixels", 64, 4096, 576),
        ("3×3 conv 512 → 512, 1024 pixels", 512, 1024, 4608),
        ("attention tile QKᵀ", 72, 256, 64),
        ("attention tile PV", 72, 64, 256),
    ]
    .into_iter()
    .map(|(what, m, n, k)| {
        let rates = cpu_ops::product_path_gflops(m, n, k, 1000);
        (format!("{what}: {m} × {k} · {k} × {n}"), rates)
    })
    .collect();
    let names: Vec<&str> = rows[0].1.iter().map(|r| r.0).collect();
    println!(
        "| m × k · k × n | {} | best / avx2+fma |",
        names.join(" | ")
    );
    println!("|---|{}---:|", "---:|".repeat(names.len()));
    for (what, rates) in rows {
        let avx2 = rates.iter().find(|r| r.0 == "avx2+fma").map(|r| r.1);
        let best = rates.iter().map(|r| r.1).fold(0.0, f64::max);
        println!(
            "| {what} | {} | {} |",
            rates
                .iter()
                .map(|r| format!("{:.0}", r.1))
                .collect::<Vec<_>>()
                .join(" | "),
            avx2.map_or("–".into(), |a| format!("{:.2}×", best / a))
        );
    }
}

fn encoder_ops(reps: usize, only: &[String]) -> anyhow::Result<()> {
    const SECTIONS: [&str; 6] = ["products", "attention", "conv1d", "gelu", "linear", "norms"];
    if let Some(bad) = only.iter().find(|o| !SECTIONS.contains(&o.as_str())) {
        anyhow::bail!(
            "--only: no section {bad:?} (sections: {})",
            SECTIONS.join(", ")
        );
    }
    let want = |section: &str| only.is_empty() || only.iter().any(|o| o == section);
    let dev = Device::Cpu;
    let peak = cpu_ops::fma_peak_gflops(300);
    println!(
        "{}, {} threads, {path} product kernels; median of {reps} after a warm-up; measured \
         FMA peak ({path} vectors): {peak:.0} GFLOP/s",
        seg_data::machine::describe(),
        rayon::current_num_threads(),
        path = cpu_ops::simd_path(),
    );
    if want("products") {
        product_paths();
    }
    if want("attention") {
        println!(
        "\nSAM ViT-B attention (12 heads of 64, decomposed relative-position bias): the tiled op \
         (online softmax, no L × L matrix) against the composed one (candle matmul, broadcast \
         adds, softmax, in chunks of heads whose score matrices stay under 128 MiB). GFLOP/s \
         count the forward's two products, 4·L²·64 per head. Memory: the heap one forward + \
         backward holds at its peak, beyond its inputs."
    );
        println!(
        "| attention | tiled fwd ms | composed fwd ms | composed / tiled | tiled GFLOP/s | % of peak | tiled fwd+bwd ms | composed fwd+bwd ms | composed / tiled | tiled MiB | composed MiB |"
    );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let (heads, hd) = (12, 64);
        for (name, b, grid) in [
            ("global 64×64, 1 image", 1, 64),
            ("global 64×64, 2 images", 2, 64),
            ("windowed 14×14, 25 windows", 25, 14),
            ("windowed 14×14, 50 windows", 50, 14),
        ] {
            let l = grid * grid;
            let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, l, 3, heads, hd), &dev)?)?;
            let rh = Var::from_tensor(&Tensor::randn(0f32, 0.1, (2 * grid - 1, hd), &dev)?)?;
            let rw = Var::from_tensor(&Tensor::randn(0f32, 0.1, (2 * grid - 1, hd), &dev)?)?;
            let run = |k: Kernels, grad: bool| -> anyhow::Result<Tensor> {
                let (q, h, w) = (tracked(&qkv, grad), tracked(&rh, grad), tracked(&rw, grad));
                Ok(vim_nets::sam::attention(&q, &h, &w, (grid, grid), None, k)?)
            };
            let (f_ours, f_theirs, b_ours, b_theirs) = both_directions(reps, run)?;
            let memory = |k| backward_memory(&run, k);
            let (m_ours, m_theirs) = (memory(Kernels::Auto)?, memory(Kernels::Candle)?);
            let flops = 4.0 * (b * heads * l * l * hd) as f64;
            let rate = flops / f_ours / 1e6;
            println!(
            "| {name} | {f_ours:.0} | {f_theirs:.0} | {:.2}× | {rate:.0} | {:.0} % | {b_ours:.0} | {b_theirs:.0} | {:.2}× | {m_ours:.0} | {m_theirs:.0} |",
            f_theirs / f_ours,
            100.0 * rate / peak,
            b_theirs / b_ours
        );
        }
    }
    if want("attention") {
        println!(
            "\nWindowed attention on windows that the image's edge cuts, 2 images (the native \
             512² canvas: a 32 × 32 token grid in 3 × 3 windows of 14 × 14; the paper's 1024²: \
             64 × 64 in 5 × 5): the tiled op computing the queries on the image only (the \
             padding's tokens stay keys) against it computing every window's queries."
        );
        println!("| grid | image's queries fwd ms | all queries fwd ms | all / image's | image's fwd+bwd ms | all fwd+bwd ms | all / image's |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        let (heads, hd, ws, images) = (12, 64, 14, 2);
        for grid in [32usize, 64] {
            let n = grid.div_ceil(ws);
            let b = images * n * n;
            let l = ws * ws;
            let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, l, 3, heads, hd), &dev)?)?;
            let rh = Var::from_tensor(&Tensor::randn(0f32, 0.1, (2 * ws - 1, hd), &dev)?)?;
            let rw = Var::from_tensor(&Tensor::randn(0f32, 0.1, (2 * ws - 1, hd), &dev)?)?;
            let wanted = vim_nets::sam::window_queries(b, (ws, ws), (grid, grid), heads);
            // Both on the tiled op: `Auto` stands for the image's queries, `Candle` for all.
            let run = |k: Kernels, grad: bool| -> anyhow::Result<Tensor> {
                let (q, h, w) = (tracked(&qkv, grad), tracked(&rh, grad), tracked(&rw, grad));
                let queries = (k == Kernels::Auto).then_some(&wanted[..]);
                let grid = (ws, ws);
                Ok(vim_nets::sam::attention(
                    &q,
                    &h,
                    &w,
                    grid,
                    queries,
                    Kernels::Auto,
                )?)
            };
            let (f_ours, f_theirs, b_ours, b_theirs) = both_directions(reps, run)?;
            println!(
                "| {grid} × {grid}, {b} windows | {f_ours:.0} | {f_theirs:.0} | {:.2}× | {b_ours:.0} | {b_theirs:.0} | {:.2}× |",
                f_theirs / f_ours,
                b_theirs / b_ours
            );
        }
    }
    if want("attention") {
        println!(
            "\nSAM's attention on the tokens its qkv layer writes, 12 heads of 64, 2 images: one op \
             (`rel_pos_attention`: the heads gathered and the decomposed bias computed inside \
             it) against the heads gathered by candle's reshapes and permutes, the bias from \
             the tables by candle's products and the tiled op (`grid_attention`) between them. \
             Windows: the queries on the image only in both. Kept: the heap the forward's graph \
             holds beyond its inputs; peak: the heap forward + backward holds at its peak beyond \
             its inputs."
        );
        println!("| attention | one op fwd ms | gathers + tiled op fwd ms | ratio | one op fwd+bwd ms | gathers + tiled op fwd+bwd ms | ratio | one op kept MiB | gathers kept MiB | one op peak MiB | gathers peak MiB |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let (heads, hd, ws, images) = (12usize, 64usize, 14usize, 2usize);
        for (name, grid, window) in [
            ("windowed, native 512² canvas", 32usize, true),
            ("global, native 512² canvas", 32, false),
            ("windowed, 1024² canvas", 64, true),
        ] {
            let n = grid.div_ceil(ws);
            let (b, side) = if window {
                (images * n * n, ws)
            } else {
                (images, grid)
            };
            let d = heads * hd;
            let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, side, side, 3 * d), &dev)?)?;
            let rh = Var::from_tensor(&Tensor::randn(0f32, 0.1, (2 * side - 1, hd), &dev)?)?;
            let rw = Var::from_tensor(&Tensor::randn(0f32, 0.1, (2 * side - 1, hd), &dev)?)?;
            let wanted =
                window.then(|| vim_nets::sam::window_queries(b, (ws, ws), (grid, grid), heads));
            let scale = (hd as f32).powf(-0.5);
            // `Auto` stands for the one op, `Candle` for the gathers around the tiled op.
            let run = |k: Kernels, grad: bool| -> anyhow::Result<Tensor> {
                let (q, h, w) = (tracked(&qkv, grad), tracked(&rh, grad), tracked(&rw, grad));
                let queries = wanted.as_deref();
                if k == Kernels::Auto {
                    return cpu_ops::rel_pos_attention(&q, &h, &w, heads, scale, queries, k)?
                        .ok_or_else(|| anyhow::anyhow!("the op serves f32 CPU tensors"));
                }
                let q = q.reshape((b, side * side, 3, heads, hd))?;
                let y = vim_nets::sam::attention(&q, &h, &w, (side, side), queries, Kernels::Auto)?;
                Ok(y.reshape((b, side, side, d))?)
            };
            linear_row(&format!("{name}: {b} × {side}²"), reps, run)?;
        }
    }
    if want("conv1d") {
        println!(
        "\nViM's causal depthwise conv1d (k 4) + bias + SiLU: one op against the composed form \
         (padding, 4 shifted multiply-adds, SiLU)."
    );
        println!("| B × E × L | fused fwd ms | composed fwd ms | composed / fused | fused fwd+bwd ms | composed fwd+bwd ms | composed / fused | fused MiB | composed MiB |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (b, e, l) in [(1, 384, 4097), (2, 384, 4097), (2, 768, 4097)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, e, l), &dev)?)?;
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (e, 1, 4), &dev)?)?;
            let bias = Var::from_tensor(&Tensor::randn(0f32, 0.1, e, &dev)?)?;
            let run = |k: Kernels, grad: bool| -> anyhow::Result<Tensor> {
                let t = |v: &Var| tracked(v, grad);
                Ok(vim_nets::vim::causal_conv_silu(
                    &t(&x),
                    &t(&w),
                    &t(&bias),
                    k,
                    false,
                )?)
            };
            let (f_ours, f_theirs, b_ours, b_theirs) = both_directions(reps, run)?;
            let memory = |k| backward_memory(&run, k);
            let (m_ours, m_theirs) = (memory(Kernels::Auto)?, memory(Kernels::Candle)?);
            println!(
            "| {b} × {e} × {l} | {f_ours:.1} | {f_theirs:.1} | {:.1}× | {b_ours:.1} | {b_theirs:.1} | {:.1}× | {m_ours:.0} | {m_theirs:.0} |",
            f_theirs / f_ours,
            b_theirs / b_ours
        );
        }
    }
    if want("gelu") {
        println!(
            "\nSAM's MLP bias + exact GELU after the first linear layer: one op against candle's \
         broadcast add and gelu_erf."
        );
        println!("| rows × features | fused fwd ms | composed fwd ms | composed / fused | fused fwd+bwd ms | composed fwd+bwd ms | composed / fused |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for (rows, n) in [(4096, 3072), (8192, 3072)] {
            let y = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, n), &dev)?)?;
            let bias = Var::from_tensor(&Tensor::randn(0f32, 0.1, n, &dev)?)?;
            let lin = |grad: bool| {
                let t = |v: &Var| tracked(v, grad);
                (t(&y), t(&bias))
            };
            let run = |k: Kernels, grad: bool| -> anyhow::Result<Tensor> {
                let (y, b) = lin(grad);
                Ok(match cpu_ops::bias_gelu(&y, &b, k)? {
                    Some(out) => out,
                    None => y.broadcast_add(&b)?.gelu_erf()?,
                })
            };
            let (f_ours, f_theirs, b_ours, b_theirs) = both_directions(reps, run)?;
            println!(
            "| {rows} × {n} | {f_ours:.1} | {f_theirs:.1} | {:.1}× | {b_ours:.1} | {b_theirs:.1} | {:.1}× |",
            f_theirs / f_ours,
            b_theirs / b_ours
        );
        }
    }
    if want("norms") {
        println!(
            "\nLayerNorm (SAM), RMSNorm and RoPE (ViM) as one op each against their composed \
             candle forms (peak: the heap forward + backward holds beyond the inputs)."
        );
        println!("| op: shape | fused fwd ms | composed fwd ms | composed / fused | fused fwd+bwd ms | composed fwd+bwd ms | composed / fused | fused peak MiB | composed peak MiB |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let (vb, vl, vd) = (2, 4097, 192);
        let cases: [(&str, Vec<usize>); 3] = [
            ("LayerNorm", vec![2, 64, 64, 768]),
            ("RMSNorm", vec![vb, vl, vd]),
            ("RoPE", vec![vb, vl, vd]),
        ];
        for (name, dims) in cases {
            let d = *dims.last().expect("rank 3 or 4");
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, dims.as_slice(), &dev)?)?;
            let w = Var::from_tensor(&(Tensor::randn(0f32, 0.1, d, &dev)? + 1.0)?)?;
            let bias = Var::from_tensor(&Tensor::randn(0f32, 0.1, d, &dev)?)?;
            // The rotation's tables (64² patch tokens) only where they are used.
            let (cos, sin) = if name == "RoPE" {
                vim_nets::vim::rope_tables(d, 64)
            } else {
                (Vec::new(), Vec::new())
            };
            let rows = cos.len() / d;
            let cos = Tensor::from_vec(cos, (rows, d), &dev)?;
            let sin = Tensor::from_vec(sin, (rows, d), &dev)?;
            let run = |k: Kernels, grad: bool| -> anyhow::Result<Tensor> {
                let (x, w, b) = (tracked(&x, grad), tracked(&w, grad), tracked(&bias, grad));
                Ok(match name {
                    "LayerNorm" => vim_nets::layers::layer_norm(&x, &w, &b, 1e-6, k)?,
                    "RMSNorm" => vim_nets::layers::rms_norm(&x, &w, 1e-5, k)?,
                    _ => match cpu_ops::rope(&x, &cos, &sin, k)? {
                        Some(y) => y,
                        None => vim_nets::vim::apply_rope(&x, &cos, &sin)?,
                    },
                })
            };
            let (f_ours, f_theirs, b_ours, b_theirs) = both_directions(reps, run)?;
            let memory = |k| backward_memory(&run, k);
            let (m_ours, m_theirs) = (memory(Kernels::Auto)?, memory(Kernels::Candle)?);
            let shape: Vec<String> = dims.iter().map(|v| v.to_string()).collect();
            println!(
                "| {name}: {} | {f_ours:.1} | {f_theirs:.1} | {:.1}× | {b_ours:.1} | {b_theirs:.1} | {:.1}× | {m_ours:.0} | {m_theirs:.0} |",
                shape.join(" × "),
                f_theirs / f_ours,
                b_theirs / b_ours
            );
        }
    }
    if want("linear") {
        println!(
        "\nSAM's linear layers with bias: one op (the product written onto the bias rows) against \
         candle's matmul and broadcast add; the windowed qkv (`linear_windows`: the product on \
         the grid's own tokens, written out in windows with the padding filled with the bias) \
         against zero padding, partitioning and the linear op on every window. Kept: the heap \
         the forward's graph holds beyond its inputs; peak: the heap forward + backward holds at \
         its peak beyond its inputs."
    );
        println!("| layer: rows × in → out | fused fwd ms | composed fwd ms | composed / fused | fused fwd+bwd ms | composed fwd+bwd ms | composed / fused | fused kept MiB | composed kept MiB | fused peak MiB | composed peak MiB |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (name, rows, inp, out) in [("qkv", 8192, 768, 2304), ("MLP lin2", 8192, 3072, 768)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, rows / 2, inp), &dev)?)?;
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.02, (out, inp), &dev)?)?;
            let bias = Var::from_tensor(&Tensor::randn(0f32, 0.1, out, &dev)?)?;
            let run = |k: Kernels, grad: bool| -> anyhow::Result<Tensor> {
                let (x, w, b) = (tracked(&x, grad), tracked(&w, grad), tracked(&bias, grad));
                Ok(match cpu_ops::linear(&x, &w, &b, k)? {
                    Some(y) => y,
                    None => x
                        .reshape((rows, inp))?
                        .matmul(&w.t()?)?
                        .broadcast_add(&b)?
                        .reshape((2, rows / 2, out))?,
                })
            };
            linear_row(&format!("{name}: {rows} × {inp} → {out}"), reps, run)?;
        }
        // The MLP's first layer and its GELU: one op against candle's product and the
        // bias + GELU op after it.
        let (rows, inp, out) = (8192usize, 768usize, 3072usize);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, rows / 2, inp), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.02, (out, inp), &dev)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 0.1, out, &dev)?)?;
        let run = |k: Kernels, grad: bool| -> anyhow::Result<Tensor> {
            let (x, w, b) = (tracked(&x, grad), tracked(&w, grad), tracked(&bias, grad));
            if let Some(y) = cpu_ops::linear_gelu(&x, &w, &b, k)? {
                return Ok(y);
            }
            let y = x.reshape((rows, inp))?.matmul(&w.t()?)?;
            let y = match cpu_ops::bias_gelu(&y, &b, Kernels::Auto)? {
                Some(y) => y,
                None => anyhow::bail!("the bias + GELU op serves f32 CPU tensors"),
            };
            Ok(y.reshape((2, rows / 2, out))?)
        };
        let what = format!(
            "MLP lin1 + GELU (against product, then bias + GELU op): {rows} × {inp} → {out}"
        );
        linear_row(&what, reps, run)?;
        // SAM's windowed qkv: the grid zero-padded to multiples of 14, cut into windows and
        // multiplied (the composed form), against the product on the grid's own tokens
        // written out in windows (the padding filled with the bias).
        for (name, grid) in [("native 512² canvas", 32usize), ("1024² canvas", 64)] {
            let (inp, out, ws) = (768usize, 2304usize, 14usize);
            let n = grid.div_ceil(ws);
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, grid, grid, inp), &dev)?)?;
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.02, (out, inp), &dev)?)?;
            let bias = Var::from_tensor(&Tensor::randn(0f32, 0.1, out, &dev)?)?;
            let run = |k: Kernels, grad: bool| -> anyhow::Result<Tensor> {
                let (x, w, b) = (tracked(&x, grad), tracked(&w, grad), tracked(&bias, grad));
                if let Some(y) = cpu_ops::linear_windows(&x, &w, &b, ws, k)? {
                    return Ok(y);
                }
                let windows = x
                    .pad_with_zeros(1, 0, n * ws - grid)?
                    .pad_with_zeros(2, 0, n * ws - grid)?
                    .reshape((2, n, ws, n, ws, inp))?
                    .permute((0, 1, 3, 2, 4, 5))?
                    .reshape((2 * n * n, ws, ws, inp))?;
                let flat = windows.reshape((2 * n * n * ws * ws, inp))?;
                let y = match cpu_ops::linear(&flat, &w, &b, Kernels::Auto)? {
                    Some(y) => y,
                    None => anyhow::bail!("the linear op serves f32 CPU tensors"),
                };
                Ok(y.reshape((2 * n * n, ws, ws, out))?)
            };
            let what = format!(
                "windowed qkv, {name}: 2 × {grid}² → {} windows × {ws}² tokens, {inp} → {out}",
                2 * n * n
            );
            linear_row(&what, reps, run)?;
        }
    }
    Ok(())
}

/// One row of the linear table: `run` under the crate's op and the composed form, forward and
/// forward + backward, what the forward keeps and the backward's peak.
fn linear_row(
    what: &str,
    reps: usize,
    run: impl Fn(Kernels, bool) -> anyhow::Result<Tensor>,
) -> anyhow::Result<()> {
    let (f_ours, f_theirs, b_ours, b_theirs) = both_directions(reps, &run)?;
    let kept = |k| -> anyhow::Result<f64> {
        let before = cpu_ops::memory::live_bytes();
        let y = run(k, true)?;
        let after = cpu_ops::memory::live_bytes();
        drop(y);
        Ok(after.saturating_sub(before) as f64 / (1 << 20) as f64)
    };
    let peak = |k| backward_memory(&run, k);
    println!(
        "| {what} | {f_ours:.1} | {f_theirs:.1} | {:.2}× | {b_ours:.1} | {b_theirs:.1} | {:.2}× | {:.0} | {:.0} | {:.0} | {:.0} |",
        f_theirs / f_ours,
        b_theirs / b_ours,
        kept(Kernels::Auto)?,
        kept(Kernels::Candle)?,
        peak(Kernels::Auto)?,
        peak(Kernels::Candle)?
    );
    Ok(())
}

fn loader(patch: usize, features: usize, batches: usize) -> anyhow::Result<()> {
    use seg_data::sampling::{BatchLoader, LoaderOptions, VolumeSlices};
    use seg_data::synthetic::{em_volume, EmVolumeOptions};
    let (raw, ids) = em_volume(
        &{
            let mut opts = EmVolumeOptions::default();
            opts.depth = 12;
            opts.height = 4 * patch;
            opts.width = 4 * patch;
            opts
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
        rayon::current_num_threads()
    );
    println!("| what (batch 2, {patch}² patches, CREMI targets) | ms per batch |");
    println!("|---|---:|");
    for workers in [1, 2] {
        let opts = {
            let mut opts = LoaderOptions::default();
            opts.patch = (patch, patch);
            opts.batch_size = 2;
            opts.seed = 0;
            opts.min_instances = Some(seg_data::sampling::MinInstances::default());
            opts.augmentation = Default::default();
            opts.shuffle = false;
            opts.workers = workers;
            opts
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
    let config = ModelConfig::preset(ModelKind::UNet, 1, &{
        let mut opts = PresetOptions::default();
        opts.features = features;
        opts
    });
    let model = Model::new(config, &Device::Cpu, 0)?;
    let x = Tensor::randn(0f32, 1.0, (2, 1, patch, patch), &Device::Cpu)?;
    let target = Tensor::zeros((2, 1, patch, patch), candle_core::DType::F32, &Device::Cpu)?;
    let mut adam = seg_train::optim::Adam::new(model.params().trainable(), 1e-4);
    let step = median(
        || {
            let loss = seg_train::dice_loss(&model.forward(&x, true)?, &target)?;
            adam.step(&model.backward(&loss)?)?;
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
        Command::Models(args) => return crate::bench_models::run(args),
        Command::Volume(args) => return crate::bench_volume::run(args),
        Command::EncoderOps { reps, only } => return encoder_ops(*reps, only),
    };
    let reps = *reps;
    let dev = Device::Cpu;
    println!(
        "{}, {} threads, {} product kernels; median of {reps} after a warm-up",
        seg_data::machine::describe(),
        rayon::current_num_threads(),
        cpu_ops::simd_path()
    );
    println!(
        "\n3×3 conv, stride 1, pad 1 (f32): ours (Winograd F(4×4, 3×3) where channels and width make it pay, else \
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
            three_directions(reps, |kernels| {
                Ok(cpu_ops::conv3x3(x.as_tensor(), k.as_tensor(), kernels)?)
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
        "\n3×3 weight gradient alone (f32; the input untracked, so the backward pass computes only \
         the kernel's gradient, from an output gradient of ones): ours (Winograd F(4×4, 3×3) \
         where channels, row width and image size make it pay, else the direct form) against the \
         direct form (dot products of padded input rows with output-gradient rows); the shapes \
         of the UNet's training step on 512² patches at batch 2"
    );
    println!("| B×C×H×W → O | ours ms | direct ms | direct / ours |");
    println!("|---|---:|---:|---:|");
    for (b, c, h, w, o) in [
        (2, 64, 512, 512, 64),
        (2, 128, 512, 512, 64),
        (2, 128, 256, 256, 128),
        (2, 256, 128, 128, 256),
        (2, 512, 64, 64, 512),
        (2, 1024, 32, 32, 1024),
        (2, 64, 128, 128, 64),
    ] {
        let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 0.05, (o, c, 3, 3), &dev)?)?;
        let time = |kernels| -> anyhow::Result<f64> {
            let y = cpu_ops::conv3x3(&x, k.as_tensor(), kernels)?;
            median(
                || {
                    y.backward()?;
                    Ok(())
                },
                reps,
            )
        };
        let (ours, direct) = (time(Kernels::Auto)?, time(Kernels::Direct)?);
        println!(
            "| {b}×{c}×{h}×{w} → {o} | {ours:.1} | {direct:.1} | {:.2}× |",
            direct / ours
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
        // One layer per kernel choice, sharing the weights: the layer composes the unit from
        // candle ops where the fused op does not serve.
        let layer = |kernels| vim_nets::layers::Conv2d {
            weight: k.as_tensor().clone(),
            bias: Some(bias.as_tensor().clone()),
            kernel: 3,
            stride: 1,
            padding: 1,
            kernels,
        };
        let ([f_ours, f_direct, f_theirs], [b_ours, b_direct, b_theirs]) =
            three_directions(reps, |kernels| {
                Ok(layer(kernels).norm_conv_relu(x.as_tensor())?)
            })?;
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
        let (f_ours, f_theirs, b_ours, b_theirs) = both_directions(reps, |kernels, grad| {
            let x = if grad {
                x.as_tensor().clone()
            } else {
                x.as_tensor().detach()
            };
            Ok(cpu_ops::resize_bilinear(&x, 2 * h, 2 * w, false, kernels)?)
        })?;
        println!(
            "| {b}×{c}×{h}×{w} | {f_ours:.1} | {f_theirs:.1} | {:.1}× | {b_ours:.1} | {b_theirs:.1} | {:.1}× |",
            f_theirs / f_ours,
            b_theirs / b_ours
        );
    }
    println!(
        "\n2×2 max pooling (the UNet's downsampler), f32: ours (one op, the gradient routed to \
         each window's maximum) vs a reshape and two max reductions (candle, the form it replaces)"
    );
    println!("| B×C×H×W | fwd ours ms | fwd candle ms | ratio | fwd+bwd ours ms | fwd+bwd candle ms | ratio |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (b, c, h, w) in [(1, 64, 512, 512), (2, 64, 256, 256), (2, 512, 64, 64)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?)?;
        let (f_ours, f_theirs, b_ours, b_theirs) = both_directions(reps, |kernels, grad| {
            Ok(vim_nets::layers::max_pool2(&tracked(&x, grad), kernels)?)
        })?;
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
    // One model per kernel choice, with the same weights (same seed).
    let config = ModelConfig::preset(ModelKind::UNet, 2, &PresetOptions::default());
    let kinds = [Kernels::Auto, Kernels::Direct, Kernels::Candle];
    let models = kinds
        .iter()
        .map(|&k| Model::new_with_kernels(config.clone(), &dev, 0, k))
        .collect::<Result<Vec<_>, _>>()?;
    // The model (and below, its optimiser) of a kernel choice.
    let index = |k: Kernels| kinds.iter().position(|&c| c == k).unwrap_or(0);
    let model = |k: Kernels| &models[index(k)];
    let x = Tensor::randn(0f32, 1.0, (1, 1, 512, 512), &dev)?;
    let [o, d, t] = three(reps, |k| {
        model(k).forward(&x, false)?;
        Ok(())
    })?;
    println!(
        "| forward 1×1×512² | {o:.0} | {d:.0} | {t:.0} | {:.2}× |",
        t / o
    );
    let x2 = Tensor::randn(0f32, 1.0, (2, 1, 256, 256), &dev)?;
    let target = Tensor::zeros((2, 2, 256, 256), candle_core::DType::F32, &dev)?;
    let mut adams: Vec<_> = models
        .iter()
        .map(|m| seg_train::optim::Adam::new(m.params().trainable(), 1e-4))
        .collect();
    let [o, d, t] = three(reps, |k| {
        let loss = seg_train::dice_loss(&model(k).forward(&x2, true)?, &target)?;
        adams[index(k)].step(&model(k).backward(&loss)?)?;
        Ok(())
    })?;
    println!(
        "| training step 2×1×256² (Adam) | {o:.0} | {d:.0} | {t:.0} | {:.2}× |",
        t / o
    );
    Ok(())
}

/// The convolutions that are one matrix product (1×1 and 2×2 stride-2 transposed) as the
/// models run them: with the crate's kernels (its op where the shape rule takes it, see
/// `cpu_ops::conv1x1`), with candle's matrix-product form (the same call under
/// `Kernels::Candle`), and candle's conv ops. The forward runs with no gradient tracked
/// (inference), forward + backward with one.
fn other_convolutions(reps: usize, dev: &Device) -> anyhow::Result<()> {
    println!(
        "\n1×1 and 2×2 stride-2 transposed convolutions with bias (f32): ours \
         (Kernels::Auto: the op on the packed product where it pays) vs the matrix-product form \
         (Kernels::Candle: candle matmul, permutes, broadcast bias) vs candle 0.11 conv2d / \
         conv_transpose2d + bias; forward without gradient tracking, forward + backward with it"
    );
    println!("| conv | B×C×H×W → O | fwd ours ms | fwd matmul form ms | fwd candle conv ms | matmul / ours fwd | fwd+bwd ours ms | fwd+bwd matmul form ms | fwd+bwd candle conv ms | matmul / ours fwd+bwd |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let cases: [(&str, usize, usize, usize, usize); 4] = [
        ("1×1", 1, 128, 256, 256),
        ("1×1", 1, 1024, 32, 32),
        ("2×2 transposed", 1, 128, 256, 256),
        ("2×2 transposed", 1, 1024, 32, 32),
    ];
    for (kind, b, c, h, w) in cases {
        let (o, k) = match kind {
            "1×1" => (c / 2, 1),
            _ => (c / 2, 2),
        };
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), dev)?)?;
        let weight_shape = if kind == "2×2 transposed" {
            (c, o, k, k)
        } else {
            (o, c, k, k)
        };
        let bound = 1.0 / ((c * k * k) as f32).sqrt();
        let weight = Var::from_tensor(&Tensor::rand(-bound, bound, weight_shape, dev)?)?;
        let bias = Var::from_tensor(&Tensor::rand(-bound, bound, o, dev)?)?;
        // The layer's computation under `kernels`, on tracked or detached operands.
        let run = |kernels: Kernels, grad: bool| -> anyhow::Result<Tensor> {
            let (x, wt, bt) = (
                tracked(&x, grad),
                tracked(&weight, grad),
                tracked(&bias, grad),
            );
            Ok(if kind == "1×1" {
                cpu_ops::conv1x1(&x, &wt, Some(&bt), kernels)?
            } else {
                cpu_ops::conv_transpose2x2(&x, &wt, &bt, kernels)?
            })
        };
        let conv_ops = || -> anyhow::Result<Tensor> {
            let y = if kind == "1×1" {
                x.as_tensor().conv2d(weight.as_tensor(), 0, 1, 1, 1)?
            } else {
                x.as_tensor()
                    .conv_transpose2d(weight.as_tensor(), 0, 0, 2, 1)?
            };
            Ok(y.broadcast_add(&bias.as_tensor().reshape((1, o, 1, 1))?)?)
        };
        let (f_ours, f_mm, b_ours, b_mm) = both_directions(reps, run)?;
        let f_theirs = median(
            || {
                let _no_grad = vim_nets::layers::NoGrad::new();
                conv_ops().map(drop)
            },
            reps,
        )?;
        let b_theirs = median(
            || {
                conv_ops()?
                    .sum_all()?
                    .backward()
                    .map(drop)
                    .map_err(Into::into)
            },
            reps,
        )?;
        println!(
            "| {kind} | {b}×{c}×{h}×{w} → {o} | {f_ours:.1} | {f_mm:.1} | {f_theirs:.1} | {:.2}× | {b_ours:.1} | {b_mm:.1} | {b_theirs:.1} | {:.2}× |",
            f_mm / f_ours,
            b_mm / b_ours,
        );
    }
    Ok(())
}

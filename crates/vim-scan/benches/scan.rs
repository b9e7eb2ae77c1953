//! `cargo bench -p vim-scan`: the CPU kernels at the paper's shapes (ViM-T: E 384, ViM-S: E 768;
//! N 16; L 1025 for a 512² image, 4097 for the 1024² canvas), forward and forward+backward,
//! against the sequential f64 reference measured in the same run.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use vim_scan::{cpu, reference, ScanInputs, ScanShape};

/// The scan composed of plain candle ops, as a port without a kernel would write it:
/// (B, E, L, N) discretisation tensors, then one small step per time index (O(L) graph nodes).
#[allow(clippy::too_many_arguments)]
fn composed(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: &Tensor,
    z: &Tensor,
    bias: &Tensor,
) -> candle_core::Result<Tensor> {
    let (bs, e, l) = u.dims3()?;
    let n = a.dim(1)?;
    let x = delta.broadcast_add(&bias.reshape((1, e, 1))?)?;
    // Stable softplus: relu(x) + log(1 + exp(−|x|)).
    let dt = (x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    let da = dt
        .unsqueeze(3)?
        .broadcast_mul(&a.reshape((1, e, 1, n))?)?
        .exp()?;
    let dbu = (&dt * u)?
        .unsqueeze(3)?
        .broadcast_mul(&b.transpose(1, 2)?.unsqueeze(1)?)?;
    let ct = c.transpose(1, 2)?.unsqueeze(1)?; // (B, 1, L, N)
    let mut h = Tensor::zeros((bs, e, n), u.dtype(), u.device())?;
    let mut ys = Vec::with_capacity(l);
    for t in 0..l {
        h = ((h * da.narrow(2, t, 1)?.squeeze(2)?)? + dbu.narrow(2, t, 1)?.squeeze(2)?)?;
        ys.push(h.broadcast_mul(&ct.narrow(2, t, 1)?.squeeze(2)?)?.sum(2)?);
    }
    let y = (Tensor::stack(&ys, 2)? + u.broadcast_mul(&d.reshape((1, e, 1))?)?)?;
    y * z.silu()?
}

/// Forward + backward of the candle op against the composed version, same inputs, same run.
fn against_composed(channels: usize, length: usize) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let var = |shape: &[usize], scale: f64, offset: f64| -> candle_core::Result<Var> {
        Var::from_tensor(&((Tensor::rand(0f32, 1.0, shape, &dev)? * scale)? + offset)?)
    };
    let (bs, n) = (1, 16);
    let u = var(&[bs, channels, length], 1.0, -0.5)?;
    let delta = var(&[bs, channels, length], 4.0, -2.0)?;
    let a = var(&[channels, n], -1.0, -0.1)?;
    let b = var(&[bs, n, length], 1.0, -0.5)?;
    let c = var(&[bs, n, length], 1.0, -0.5)?;
    let d = var(&[channels], 1.0, 0.5)?;
    let z = var(&[bs, channels, length], 1.0, -0.5)?;
    let bias = var(&[channels], 0.2, -0.1)?;
    let t =
        |f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<(f64, f64, Tensor)> {
            let s = Instant::now();
            let y = f()?;
            let fwd = s.elapsed().as_secs_f64() * 1e3;
            y.sum_all()?.backward()?;
            Ok((fwd, s.elapsed().as_secs_f64() * 1e3, y))
        };
    let ours = || {
        vim_scan::selective_scan(
            u.as_tensor(),
            delta.as_tensor(),
            a.as_tensor(),
            b.as_tensor(),
            c.as_tensor(),
            Some(d.as_tensor()),
            Some(z.as_tensor()),
            Some(bias.as_tensor()),
            true,
        )
    };
    let theirs = || {
        composed(
            u.as_tensor(),
            delta.as_tensor(),
            a.as_tensor(),
            b.as_tensor(),
            c.as_tensor(),
            d.as_tensor(),
            z.as_tensor(),
            bias.as_tensor(),
        )
    };
    t(&ours)?; // warm-up
    let (of, ob, yo) = t(&ours)?;
    let (cf, cb, yc) = t(&theirs)?;
    let diff = (yo - yc)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!(
        "E {channels} L {length} batch 1, candle op vs composed candle ops: forward {of:.1} vs {cf:.1} ms ({:.0}x), forward+backward {ob:.1} vs {cb:.1} ms ({:.0}x); max |difference| {diff:.1e}",
        cf / of,
        cb / ob
    );
    Ok(())
}

fn main() {
    println!(
        "machine: {} logical CPUs used by rayon; default kernel path: {}",
        rayon::current_num_threads(),
        cpu::kernel_path().name()
    );
    against_composed(384, 1025).expect("composed comparison");
    for (channels, length, batch) in [
        (384, 1025, 1),
        (384, 4097, 1),
        (384, 4097, 2),
        (768, 4097, 1),
    ] {
        let shape = ScanShape {
            batch,
            channels,
            state: 16,
            length,
        };
        let rows = batch * channels * length;
        let mut seed = 1u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let u: Vec<f32> = (0..rows).map(|_| next()).collect();
        let delta: Vec<f32> = (0..rows).map(|_| next() * 4.0 - 2.0).collect();
        let a: Vec<f32> = (0..channels * 16)
            .map(|i| -((i % 16) as f32 + 1.0))
            .collect();
        let bc: Vec<f32> = (0..batch * 16 * length).map(|_| next()).collect();
        let d: Vec<f32> = vec![1.0; channels];
        let z: Vec<f32> = (0..rows).map(|_| next()).collect();
        let bias: Vec<f32> = vec![0.0; channels];
        let inputs = ScanInputs {
            u: &u,
            delta: &delta,
            a: &a,
            b: &bc,
            c: &bc,
            d: Some(&d),
            z: Some(&z),
            delta_bias: Some(&bias),
            delta_softplus: true,
            reverse: false,
        };
        let time = |f: &mut dyn FnMut()| {
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t = Instant::now();
                f();
                best = best.min(t.elapsed().as_secs_f64() * 1e3);
            }
            best
        };
        let t = Instant::now();
        reference::selective_scan(shape, &inputs).unwrap();
        let reference_ms = t.elapsed().as_secs_f64() * 1e3;
        // Every kernel path this CPU has, in the same run; the widest is the default.
        let mut paths = vec![
            cpu::KernelPath::Portable,
            cpu::KernelPath::Avx2,
            cpu::KernelPath::Avx512,
        ];
        paths.retain(|p| *p <= cpu::KernelPath::best());
        for path in paths {
            let mut saved = None;
            let fwd = time(&mut || {
                saved = Some(
                    cpu::forward_on(path, shape, &inputs, cpu::CHUNK)
                        .unwrap()
                        .saved,
                )
            });
            let grad: Vec<f32> = vec![1.0; rows];
            let saved = saved.unwrap();
            let bwd = time(&mut || {
                cpu::backward_on(path, shape, &inputs, &saved, &grad).unwrap();
            });
            println!(
                "E {channels:>3} L {length:>4} batch {batch}, {:>8} path: forward {fwd:>7.1} ms, forward+backward {:>7.1} ms; sequential f64 reference forward {reference_ms:>7.1} ms ({:.1}x the forward)",
                path.name(),
                fwd + bwd,
                reference_ms / fwd
            );
        }
    }
}

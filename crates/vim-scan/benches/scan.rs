//! `cargo bench -p vim-scan`: the CPU kernels at the paper's shapes (ViM-T: E 384, ViM-S: E 768;
//! N 16; L 1025 for a 512² image, 4097 for the 1024² canvas), forward and forward+backward,
//! against the sequential f64 reference measured in the same run.

use std::time::Instant;

use vim_scan::{cpu, reference, ScanInputs, ScanShape};

fn main() {
    println!(
        "machine: {} logical CPUs used by rayon",
        rayon::current_num_threads()
    );
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
        let mut saved = None;
        let fwd = time(&mut || saved = Some(cpu::forward(shape, &inputs).unwrap().saved));
        let grad: Vec<f32> = vec![1.0; rows];
        let saved = saved.unwrap();
        let bwd = time(&mut || {
            cpu::backward(shape, &inputs, &saved, &grad).unwrap();
        });
        let t = Instant::now();
        reference::selective_scan(shape, &inputs).unwrap();
        let reference_ms = t.elapsed().as_secs_f64() * 1e3;
        println!(
            "E {channels:>3} L {length:>4} batch {batch}: forward {fwd:>7.1} ms, forward+backward {:>7.1} ms; sequential f64 reference forward {reference_ms:>7.1} ms ({:.1}x)",
            fwd + bwd,
            reference_ms / fwd
        );
    }
}

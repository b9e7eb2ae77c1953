//! Runs the CUDA kernel source (`src/cuda/scan.cu`) on the CPU, one OS thread per CUDA thread
//! with real barriers and atomics (tests/cuda_emulation/shim.hpp), and compares its forward
//! output and packed gradients with the f64 reference and the CPU backward. This checks the
//! kernel's block scans, chunk carries and gradient accumulation without a GPU; it is skipped
//! with a message where no C++20 compiler is installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use vim_scan::{cpu, reference, ScanInputs, ScanShape};

const SOURCE: &str = include_str!("../src/cuda/scan.cu");
const SHIM: &str = include_str!("cuda_emulation/shim.hpp");
const DRIVER: &str = include_str!("cuda_emulation/driver.cpp");

fn compiler() -> Option<String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let ok = Command::new(&cxx)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(cxx)
}

/// Builds the emulated kernels once per test binary.
fn driver(dir: &Path) -> Option<PathBuf> {
    let cxx = compiler()?;
    let pattern = "extern __shared__ __align__(16) unsigned char dyn[];";
    assert_eq!(
        SOURCE.matches(pattern).count(),
        2,
        "scan.cu changed its shared memory"
    );
    let kernel = SOURCE.replace(pattern, "unsigned char *dyn = emu_dynamic_shared;");
    let all = format!("{SHIM}\n#include <string>\n{kernel}\n{DRIVER}");
    let src = dir.join("emulated.cpp");
    std::fs::write(&src, all).unwrap();
    let exe = dir.join("driver");
    let out = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap();
    if !out.status.success() {
        let log = String::from_utf8_lossy(&out.stderr);
        if log.contains("barrier") || log.contains("c++20") || log.contains("atomic_ref") {
            eprintln!("skipped: {cxx} lacks C++20 <barrier>/atomic_ref");
            return None;
        }
        panic!("the emulated kernel did not compile:\n{log}");
    }
    Some(exe)
}

#[derive(Clone, Copy)]
struct Case {
    shape: ScanShape,
    d: bool,
    z: bool,
    bias: bool,
    softplus: bool,
}

fn read<F: vim_scan::Float>(path: &Path) -> Vec<f64> {
    let bytes = std::fs::read(path).unwrap();
    let size = std::mem::size_of::<F>();
    bytes
        .chunks_exact(size)
        .map(|b| {
            if size == 4 {
                f32::from_le_bytes(b.try_into().unwrap()) as f64
            } else {
                f64::from_le_bytes(b.try_into().unwrap())
            }
        })
        .collect()
}

/// Largest absolute difference relative to the largest magnitude of `want` (at least 1).
fn rel(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
        / scale
}

fn check(exe: &Path, dir: &Path, dtype: &str, c: Case, seed: u64, tol: f64) {
    let ScanShape {
        batch,
        channels,
        state,
        length,
    } = c.shape;
    let flag = |b: bool| if b { "1" } else { "0" }.to_string();
    let status = Command::new(exe)
        .arg(dir)
        .arg(dtype)
        .args([batch, channels, state, length].map(|v| v.to_string()))
        .args([c.d, c.z, c.bias, c.softplus].map(flag))
        .arg(seed.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let load = |name: &str| {
        let p = dir.join(name);
        if dtype == "f32" {
            read::<f32>(&p)
        } else {
            read::<f64>(&p)
        }
    };
    let (x1g, x2, x3) = (load("x1g.bin"), load("x2.bin"), load("x3.bin"));
    let (y, grads) = (load("y.bin"), load("grads.bin"));
    let rows = batch * channels * length;
    let bc = batch * state * length;
    let mut at = channels * state;
    let mut next = |present: bool| {
        present.then(|| {
            let s = &x2[at..at + channels];
            at += channels;
            s
        })
    };
    let d = next(c.d);
    let bias = next(c.bias);
    let zs = if c.z { 3 } else { 2 };
    let inputs = ScanInputs {
        u: &x1g[..rows],
        delta: &x1g[rows..2 * rows],
        a: &x2[..channels * state],
        b: &x3[..bc],
        c: &x3[bc..],
        d,
        z: c.z.then(|| &x1g[2 * rows..3 * rows]),
        delta_bias: bias,
        delta_softplus: c.softplus,
        reverse: false,
    };
    let grad_out = &x1g[zs * rows..];
    let want_y = reference::selective_scan(c.shape, &inputs).unwrap();
    let err = rel(&y, &want_y);
    assert!(err < tol, "{dtype} {:?}: forward error {err:e}", c.shape);

    let fwd = cpu::forward(c.shape, &inputs).unwrap();
    let g = cpu::backward(c.shape, &inputs, &fwd.saved, grad_out).unwrap();
    let mut at = 0;
    let mut part = |name: &str, want: Option<&Vec<f64>>| {
        if let Some(want) = want {
            let got = &grads[at..at + want.len()];
            at += want.len();
            let err = rel(got, want);
            assert!(err < tol, "{dtype} {:?}: d{name} error {err:e}", c.shape);
        }
    };
    part("u", Some(&g.u));
    part("delta", Some(&g.delta));
    part("z", g.z.as_ref());
    part("A", Some(&g.a));
    part("D", g.d.as_ref());
    part("delta_bias", g.delta_bias.as_ref());
    part("B", Some(&g.b));
    part("C", Some(&g.c));
    assert_eq!(at, grads.len(), "packed gradient length");
}

#[test]
fn the_cuda_kernels_agree_with_the_reference_when_emulated_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = driver(dir.path()) else {
        eprintln!("skipped: no C++ compiler to emulate the CUDA kernels");
        return;
    };
    let all = Case {
        shape: ScanShape {
            batch: 2,
            channels: 2,
            state: 3,
            length: 2100,
        },
        d: true,
        z: true,
        bias: true,
        softplus: true,
    };
    // Three chunks, the last one partial; every optional input.
    check(&exe, dir.path(), "f64", all, 1, 1e-10);
    check(&exe, dir.path(), "f32", all, 2, 2e-4);
    // Exactly one chunk, N = 16, no z or D, no softplus.
    let one_chunk = Case {
        shape: ScanShape {
            batch: 1,
            channels: 3,
            state: 16,
            length: 1024,
        },
        d: false,
        z: false,
        bias: true,
        softplus: false,
    };
    check(&exe, dir.path(), "f64", one_chunk, 3, 1e-10);
    // L = 1, N = 1, nothing optional; and a length just past one chunk.
    let tiny = Case {
        shape: ScanShape {
            batch: 1,
            channels: 2,
            state: 1,
            length: 1,
        },
        d: false,
        z: false,
        bias: false,
        softplus: false,
    };
    check(&exe, dir.path(), "f64", tiny, 4, 1e-12);
    let past = Case {
        shape: ScanShape {
            length: 1025,
            ..tiny.shape
        },
        d: true,
        ..tiny
    };
    check(&exe, dir.path(), "f32", past, 5, 2e-4);
}

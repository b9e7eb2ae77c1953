//! The CUDA path (feature `cuda`): the kernel source compiles with NVRTC, and on a machine with
//! a GPU the CUDA forward and every gradient equal the CPU kernel's. Without a device the GPU
//! comparison is skipped with a message.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use vim_scan::selective_scan;

#[test]
fn nvrtc_compiles_the_kernels() {
    let ptx = vim_scan::cuda::ptx().expect("NVRTC");
    for entry in [
        "vim_scan_fwd_f32",
        "vim_scan_fwd_f64",
        "vim_scan_bwd_f32",
        "vim_scan_bwd_f64",
    ] {
        assert!(
            ptx.contains(&format!(".entry {entry}(")),
            "the PTX lacks {entry}"
        );
    }
}

fn inputs(dev: &Device, dtype: DType) -> Vec<Var> {
    let (b, e, n, l) = (2, 5, 16, 2100);
    let shapes: [&[usize]; 8] = [
        &[b, e, l],
        &[b, e, l],
        &[e, n],
        &[b, n, l],
        &[b, n, l],
        &[e],
        &[b, e, l],
        &[e],
    ];
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let t = Tensor::rand(-1f32, 1f32, *s, &Device::Cpu).unwrap();
            // A negative; delta shifted so softplus gives small steps.
            let t = match i {
                1 => (t - 2.0).unwrap(),
                2 => ((t - 1.2).unwrap() * 0.8).unwrap(),
                _ => t,
            };
            Var::from_tensor(&t.to_dtype(dtype).unwrap().to_device(dev).unwrap()).unwrap()
        })
        .collect()
}

/// The output and the gradients of Σ y·w.
fn run(vars: &[Var], w: &Tensor) -> (Tensor, Vec<Tensor>) {
    let v: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let y = selective_scan(
        v[0],
        v[1],
        v[2],
        v[3],
        v[4],
        Some(v[5]),
        Some(v[6]),
        Some(v[7]),
        true,
    )
    .unwrap();
    let w = w
        .to_dtype(y.dtype())
        .unwrap()
        .to_device(y.device())
        .unwrap();
    let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let g = vars.iter().map(|v| grads.get(v).unwrap().clone()).collect();
    (y, g)
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let b = b
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let d = (&a - &b).unwrap().abs().unwrap().flatten_all().unwrap();
    let s = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    d.max(0).unwrap().to_scalar::<f64>().unwrap() / s.to_scalar::<f64>().unwrap().max(1.0)
}

#[test]
fn cuda_forward_and_gradients_equal_the_cpu_kernel() {
    let gpu = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            return;
        }
    };
    for (dtype, tol) in [(DType::F32, 2e-4), (DType::F64, 1e-10)] {
        let cpu_vars = inputs(&Device::Cpu, dtype);
        let gpu_vars: Vec<Var> = cpu_vars
            .iter()
            .map(|v| Var::from_tensor(&v.as_tensor().to_device(&gpu).unwrap()).unwrap())
            .collect();
        let w = Tensor::rand(-1f32, 1f32, cpu_vars[0].dims(), &Device::Cpu).unwrap();
        let (y_cpu, g_cpu) = run(&cpu_vars, &w);
        let (y_gpu, g_gpu) = run(&gpu_vars, &w);
        assert!(max_rel(&y_gpu, &y_cpu) < tol, "{dtype:?} forward");
        for (i, (a, b)) in g_gpu.iter().zip(&g_cpu).enumerate() {
            assert!(
                max_rel(a, b) < tol,
                "{dtype:?} gradient {i}: {}",
                max_rel(a, b)
            );
        }
    }
}

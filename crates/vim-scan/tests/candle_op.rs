//! The candle operation: same numbers as the kernels, and a gradient for every input.

#![cfg(feature = "candle")]

use candle_core::{DType, Device, Tensor, Var};
use vim_scan::{cpu, selective_scan, selective_scan_reversed, ScanInputs, ScanShape};

fn random(n: usize, lo: f64, hi: f64, seed: u64) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lo + (hi - lo) * ((s >> 11) as f64 / (1u64 << 53) as f64)
        })
        .collect()
}

/// The shapes of the op's eight inputs: u, delta, A, B, C, D, z, delta_bias.
fn input_dims(batch: usize, channels: usize, state: usize, length: usize) -> [Vec<usize>; 8] {
    [
        vec![batch, channels, length],
        vec![batch, channels, length],
        vec![channels, state],
        vec![batch, state, length],
        vec![batch, state, length],
        vec![channels],
        vec![batch, channels, length],
        vec![channels],
    ]
}

/// The op's eight inputs as variables of `dtype`, reproducible from `seed`, A negative.
fn input_vars(
    (batch, channels, state, length): (usize, usize, usize, usize),
    seed: u64,
    dtype: DType,
) -> Vec<Var> {
    let ranges = [
        (-1.0, 1.0),
        (-2.0, 1.0),
        (-2.0, -0.1),
        (-1.0, 1.0),
        (-1.0, 1.0),
        (-1.0, 1.0),
        (-2.0, 2.0),
        (-0.5, 0.5),
    ];
    input_dims(batch, channels, state, length)
        .iter()
        .zip(ranges)
        .enumerate()
        .map(|(k, (d, (lo, hi)))| {
            let n = d.iter().product();
            let t = Tensor::from_vec(
                random(n, lo, hi, seed + k as u64),
                d.as_slice(),
                &Device::Cpu,
            )
            .unwrap();
            Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
        })
        .collect()
}

#[test]
fn every_input_gets_the_kernels_gradient_through_autograd() {
    let shape = ScanShape {
        batch: 2,
        channels: 3,
        state: 4,
        length: 37,
    };
    let ScanShape {
        batch,
        channels,
        state,
        length,
    } = shape;
    let rows = batch * channels * length;
    let dev = Device::Cpu;
    let data = [
        random(rows, -1.0, 1.0, 1),
        random(rows, -2.0, 1.0, 2),
        random(channels * state, -2.0, -0.1, 3),
        random(batch * state * length, -1.0, 1.0, 4),
        random(batch * state * length, -1.0, 1.0, 5),
        random(channels, -1.0, 1.0, 6),
        random(rows, -2.0, 2.0, 7),
        random(channels, -0.5, 0.5, 8),
    ];
    let dims = input_dims(batch, channels, state, length);
    let vars: Vec<Var> = data
        .iter()
        .zip(dims)
        .map(|(v, d)| Var::from_tensor(&Tensor::from_vec(v.clone(), d, &dev).unwrap()).unwrap())
        .collect();
    let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    // u comes out of an upstream operation, so the gradient must also pass through it.
    let w = Var::from_tensor(&Tensor::full(1.5f64, (), &dev).unwrap()).unwrap();
    let u = t[0].broadcast_mul(w.as_tensor()).unwrap();
    let y = selective_scan(
        &u,
        t[1],
        t[2],
        t[3],
        t[4],
        Some(t[5]),
        Some(t[6]),
        Some(t[7]),
        true,
    )
    .unwrap();
    let r = Tensor::from_vec(random(rows, -1.0, 1.0, 9), (batch, channels, length), &dev).unwrap();
    let grads = (y.clone() * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    let u_scaled: Vec<f64> = data[0].iter().map(|v| v * 1.5).collect();
    let inputs = ScanInputs {
        u: &u_scaled,
        delta: &data[1],
        a: &data[2],
        b: &data[3],
        c: &data[4],
        d: Some(&data[5]),
        z: Some(&data[6]),
        delta_bias: Some(&data[7]),
        delta_softplus: true,
        reverse: false,
    };
    let forward = cpu::forward(shape, &inputs).unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        forward.y
    );
    let r_vec = r.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let g = cpu::backward(shape, &inputs, &forward.saved, &r_vec).unwrap();
    let gu: Vec<f64> = g.u.iter().map(|v| v * 1.5).collect();
    let expected = [
        gu,
        g.delta,
        g.a,
        g.b,
        g.c,
        g.d.unwrap(),
        g.z.unwrap(),
        g.delta_bias.unwrap(),
    ];
    let names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"];
    for ((var, want), name) in vars.iter().zip(&expected).zip(names) {
        let got = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        let got = got.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let err = got
            .iter()
            .zip(want)
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(err < 1e-12, "{name}: {err:e}");
        assert!(
            got.iter().any(|v| *v != 0.0),
            "{name}: gradient is all zero"
        );
    }
    let gw = grads
        .get(&w)
        .expect("the upstream parameter gets a gradient");
    let want: f64 = g.u.iter().zip(&data[0]).map(|(g, x)| g * x).sum();
    assert!((gw.to_scalar::<f64>().unwrap() - want).abs() < 1e-9);
}

/// The reversed op equals flipping the time-series inputs, scanning and flipping back, in its
/// output and in every input's gradient.
#[test]
fn the_reversed_op_is_the_scan_of_flipped_inputs() {
    let (batch, channels, state, length) = (2, 3, 16, 41);
    let rows = batch * channels * length;
    let dev = Device::Cpu;
    let vars = input_vars((batch, channels, state, length), 20, DType::F64);
    let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let r = Tensor::from_vec(random(rows, -1.0, 1.0, 40), (batch, channels, length), &dev).unwrap();
    let run = |reversed: bool| {
        let f = |x: &Tensor| x.flip(&[2]).unwrap();
        let y = if reversed {
            selective_scan_reversed(
                t[0],
                t[1],
                t[2],
                t[3],
                t[4],
                Some(t[5]),
                Some(t[6]),
                Some(t[7]),
                true,
            )
            .unwrap()
        } else {
            f(&selective_scan(
                &f(t[0]),
                &f(t[1]),
                t[2],
                &f(t[3]),
                &f(t[4]),
                Some(t[5]),
                Some(&f(t[6])),
                Some(t[7]),
                true,
            )
            .unwrap())
        };
        let grads = (y.clone() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let g: Vec<Vec<f64>> = vars.iter().map(|v| flat(grads.get(v).unwrap())).collect();
        (flat(&y), g)
    };
    let (y, g) = run(true);
    let (y_flip, g_flip) = run(false);
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
    assert!(close(&y, &y_flip), "outputs differ");
    for (k, (a, b)) in g.iter().zip(&g_flip).enumerate() {
        assert!(close(a, b), "gradient of input {k} differs");
        assert!(
            a.iter().any(|v| *v != 0.0),
            "gradient of input {k} is all zero"
        );
    }
}

/// Inputs no gradient is tracked through take the direct path (no packing): the same values as
/// the differentiable op, in both directions, in f32 and f64.
#[test]
fn untracked_inputs_give_the_tracked_values() {
    let (batch, channels, state, length) = (2, 3, 16, 29);
    for dtype in [DType::F64, DType::F32] {
        let vars = input_vars((batch, channels, state, length), 60, dtype);
        let tracked: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let plain: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().detach()).collect();
        for reversed in [false, true] {
            let f = if reversed {
                selective_scan_reversed
            } else {
                selective_scan
            };
            let y = |t: &[Tensor]| {
                f(
                    &t[0],
                    &t[1],
                    &t[2],
                    &t[3],
                    &t[4],
                    Some(&t[5]),
                    Some(&t[6]),
                    Some(&t[7]),
                    true,
                )
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
            };
            assert_eq!(y(&tracked), y(&plain), "{dtype:?} reversed {reversed}");
        }
    }
}

#[test]
fn f32_works_and_bad_shapes_are_named() {
    let dev = Device::Cpu;
    let u = Tensor::ones((1, 2, 5), DType::F32, &dev).unwrap();
    let delta = Tensor::full(0.3f32, (1, 2, 5), &dev).unwrap();
    let a = Tensor::full(-1.0f32, (2, 3), &dev).unwrap();
    let bc = Tensor::ones((1, 3, 5), DType::F32, &dev).unwrap();
    let y = selective_scan(&u, &delta, &a, &bc, &bc, None, None, None, false).unwrap();
    assert_eq!(y.dims(), &[1, 2, 5]);
    let wrong = Tensor::ones((1, 3, 4), DType::F32, &dev).unwrap();
    let err = selective_scan(&u, &delta, &a, &wrong, &bc, None, None, None, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("B has shape [1, 3, 4]"), "{err}");
    // Half-precision inputs are computed in f32 and returned in their dtype.
    for dtype in [DType::BF16, DType::F16] {
        let h = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let yh = selective_scan(
            &h(&u),
            &h(&delta),
            &h(&a),
            &h(&bc),
            &h(&bc),
            None,
            None,
            None,
            false,
        )
        .unwrap();
        assert_eq!(yh.dtype(), dtype);
        let diff = (yh.to_dtype(DType::F32).unwrap() - &y)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 2e-2, "{dtype:?}: {diff}");
    }
    let ints = u.to_dtype(DType::I64).unwrap();
    let err = selective_scan(&ints, &delta, &a, &bc, &bc, None, None, None, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not supported"), "{err}");
}

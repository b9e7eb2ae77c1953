//! The `*_vjp` functions (each op's backward pass called as a function) give the gradients
//! that candle's autograd gives through the op, and `None` where the op's kernels do not serve.

use candle_core::{DType, Device, Tensor, Var};
use cpu_ops::{Conv3x3Block, Kernels, LayerGrads};

fn rand(shape: &[usize], seed: u64) -> Tensor {
    // A small LCG, so the test needs no random-number crate.
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// max |a − b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let s = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-12)
}

/// A vjp function under test: (x, w, b, the op's output, output gradient) → gradients.
type Vjp<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Option<LayerGrads>;

/// The autograd gradients of `Σ f(x, w, b) · g` against `vjp`'s.
fn check(
    what: &str,
    shapes: [&[usize]; 3],
    f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    vjp: Vjp,
) {
    let x = Var::from_tensor(&rand(shapes[0], 1)).unwrap();
    let w = Var::from_tensor(&(rand(shapes[1], 2) * 0.3).unwrap()).unwrap();
    let b = Var::from_tensor(&rand(shapes[2], 3)).unwrap();
    let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor());
    let g = rand(y.dims(), 4);
    let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let (xd, wd, bd) = (
        x.as_tensor().detach(),
        w.as_tensor().detach(),
        b.as_tensor().detach(),
    );
    let got = vjp(&xd, &wd, &bd, &y.detach(), &g).unwrap_or_else(|| panic!("{what}: not served"));
    let want = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
    let input = got
        .input
        .unwrap_or_else(|| panic!("{what}: no input gradient"));
    for (name, a, b) in [
        ("input", &input, &want(&x)),
        ("weight", &got.weight, &want(&w)),
        ("bias", &got.bias, &want(&b)),
    ] {
        assert_eq!(a.dims(), b.dims(), "{what}: {name} shape");
        let e = rel(a, b);
        assert!(e < 1e-6, "{what}: {name} gradient differs by {e}");
    }
}

#[test]
fn each_vjp_gives_the_autograd_gradients() {
    let k = Kernels::Auto;
    for (name, unit) in [
        ("InstanceNorm, conv, ReLU", Conv3x3Block::torch_em()),
        ("conv + bias", Conv3x3Block::new(None, false)),
        ("InstanceNorm, conv", Conv3x3Block::new(Some(1e-5), false)),
    ] {
        check(
            name,
            [&[2, 5, 9, 11], &[6, 5, 3, 3], &[6]],
            &|x, w, b| cpu_ops::conv3x3_block(x, w, b, unit, k).unwrap().unwrap(),
            &|x, w, _, y, g| cpu_ops::conv3x3_block_vjp(x, w, unit, y, g, true, k).unwrap(),
        );
    }
    check(
        "1×1",
        [&[2, 5, 6, 7], &[3, 5, 1, 1], &[3]],
        &|x, w, b| cpu_ops::conv1x1(x, w, Some(b), k).unwrap(),
        &|x, w, _, _, g| cpu_ops::conv1x1_vjp(x, w, g, true, k).unwrap(),
    );
    check(
        "2×2 transposed",
        [&[2, 5, 6, 7], &[5, 3, 2, 2], &[3]],
        &|x, w, b| cpu_ops::conv_transpose2x2(x, w, b, k).unwrap(),
        &|x, w, _, _, g| cpu_ops::conv_transpose2x2_vjp(x, w, g, true, k).unwrap(),
    );
    for relu in [false, true] {
        check(
            &format!("BatchNorm, relu {relu}"),
            [&[2, 4, 6, 7], &[4], &[4]],
            &|x, w, b| {
                cpu_ops::batch_norm_train(x, w, b, 1e-5, relu, k)
                    .unwrap()
                    .unwrap()
            },
            &|x, w, b, _, g| cpu_ops::batch_norm_train_vjp(x, w, b, 1e-5, relu, g, k).unwrap(),
        );
    }
}

#[test]
fn the_input_gradient_is_skipped_when_not_asked_for() {
    let (x, w, g) = (
        rand(&[1, 3, 5, 5], 1),
        rand(&[4, 3, 3, 3], 2),
        rand(&[1, 4, 5, 5], 3),
    );
    let unit = Conv3x3Block::torch_em();
    let y = cpu_ops::conv3x3_block(&x, &w, &rand(&[4], 4), unit, Kernels::Auto)
        .unwrap()
        .unwrap();
    let got = cpu_ops::conv3x3_block_vjp(&x, &w, unit, &y, &g, false, Kernels::Auto)
        .unwrap()
        .unwrap();
    assert!(got.input.is_none());
    assert_eq!(got.weight.dims(), w.dims());
}

#[test]
fn the_vjps_are_none_where_the_kernels_do_not_serve() {
    let (x, w) = (rand(&[1, 3, 5, 5], 1), rand(&[4, 3, 3, 3], 2));
    let g = rand(&[1, 4, 5, 5], 3);
    let unit = Conv3x3Block::torch_em();
    assert!(
        cpu_ops::conv3x3_block_vjp(&x, &w, unit, &g, &g, true, Kernels::Candle)
            .unwrap()
            .is_none()
    );
    let x64 = x.to_dtype(DType::F64).unwrap();
    let w1 = rand(&[4, 3, 1, 1], 4);
    assert!(cpu_ops::conv1x1_vjp(&x64, &w1, &g, true, Kernels::Auto)
        .unwrap()
        .is_none());
    assert!(!cpu_ops::conv1x1_served(&x64, &w1, Kernels::Auto).unwrap());
    let (c, p) = (rand(&[1, 3, 5, 5], 5), rand(&[3], 6));
    assert!(
        cpu_ops::batch_norm_train_vjp(&c, &p, &p, 1e-5, true, &c, Kernels::Candle)
            .unwrap()
            .is_none()
    );
}

#[test]
fn the_relu_vjp_in_place_equals_the_allocating_one() {
    let (g, y) = (rand(&[2, 3, 40, 50], 1), rand(&[2, 3, 40, 50], 2));
    let want = cpu_ops::relu_vjp(&g, &y).unwrap();
    let composed = (&g * y.gt(0.0).unwrap().to_dtype(DType::F32).unwrap()).unwrap();
    assert_eq!(rel(&want, &composed), 0.0);
    let fresh = g.copy().unwrap();
    cpu_ops::relu_vjp_in_place(&fresh, &y).unwrap();
    assert_eq!(rel(&fresh, &want), 0.0);
    // Where the output is not positive the gradient is zero, elsewhere untouched.
    let kept = y.gt(0.0).unwrap().to_dtype(DType::F32).unwrap();
    assert_eq!(rel(&(&fresh * &kept).unwrap(), &fresh), 0.0);
    assert!(cpu_ops::relu_vjp_in_place(&fresh, &rand(&[2, 3, 40, 49], 3)).is_err());
}

/// The unit on parts concatenated along channels: without a gradient tracked the concatenation
/// is never written, and the output and every gradient equal the unit on the concatenation's.
#[test]
fn the_unit_on_parts_equals_the_unit_on_their_concatenation() {
    // Few channels (the direct form), and enough for Winograd's form under `Kernels::Auto`.
    let small: (&[&[usize]], usize) = (&[&[2, 3, 12, 50], &[2, 4, 12, 50], &[2, 1, 12, 50]], 5);
    let wide: (&[&[usize]], usize) = (&[&[1, 40, 8, 64], &[1, 48, 8, 64]], 48);
    for ((shapes, o), kernels) in [small, wide]
        .into_iter()
        .flat_map(|s| [(s, Kernels::Auto), (s, Kernels::Direct)])
    {
        let channels: usize = shapes.iter().map(|s| s[1]).sum();
        for unit in [
            Conv3x3Block::torch_em(),
            Conv3x3Block::new(None, false),
            Conv3x3Block::new(Some(1e-5), false),
        ] {
            let what = format!("{unit:?}, {kernels:?}");
            let parts: Vec<Var> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| Var::from_tensor(&rand(s, 10 + i as u64)).unwrap())
                .collect();
            let w = rand(&[o, channels, 3, 3], 2) * (1.0 / channels as f64).sqrt();
            let w = Var::from_tensor(&w.unwrap()).unwrap();
            let b = Var::from_tensor(&rand(&[o], 3)).unwrap();
            let tensors: Vec<&Tensor> = parts.iter().map(|v| v.as_tensor()).collect();
            let cat = Tensor::cat(&tensors, 1).unwrap();
            let y = cpu_ops::conv3x3_block(&cat, &w, &b, unit, kernels)
                .unwrap()
                .unwrap();
            let g = rand(y.dims(), 4);
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();

            // Tracked: differentiable, through the concatenation.
            let tracked = cpu_ops::conv3x3_block_cat(&tensors, &w, &b, unit, kernels)
                .unwrap()
                .unwrap();
            assert!(rel(&tracked, &y) < 1e-6, "{what}: tracked output");
            let tracked_grads = (&tracked * &g).unwrap().sum_all().unwrap().backward();
            let tracked_grads = tracked_grads.unwrap();
            // Untracked: the sum over parts.
            let detached: Vec<Tensor> = tensors.iter().map(|t| t.detach()).collect();
            let refs: Vec<&Tensor> = detached.iter().collect();
            let (wd, bd) = (w.as_tensor().detach(), b.as_tensor().detach());
            let got = cpu_ops::conv3x3_block_cat(&refs, &wd, &bd, unit, kernels)
                .unwrap()
                .unwrap();
            assert!(!got.track_op());
            let e = rel(&got, &y);
            assert!(e < 1e-5, "{what}: output differs by {e}");

            let vjp = cpu_ops::conv3x3_block_cat_vjp(&refs, &wd, unit, &got, &g, true, kernels)
                .unwrap()
                .unwrap();
            assert_eq!(vjp.inputs.len(), parts.len(), "{what}");
            for (i, (part, gx)) in parts.iter().zip(&vjp.inputs).enumerate() {
                assert_eq!(gx.dims(), part.dims(), "{what}: part {i}");
                assert!(
                    gx.is_contiguous(),
                    "{what}: part {i} not a tensor of its own"
                );
                let want = grads.get(part.as_tensor()).unwrap();
                let e = rel(gx, want);
                assert!(e < 1e-5, "{what}: part {i} gradient differs by {e}");
                let e = rel(tracked_grads.get(part.as_tensor()).unwrap(), want);
                assert!(e < 1e-6, "{what}: tracked part {i} gradient differs by {e}");
            }
            for (name, a, v) in [("weight", &vjp.weight, &w), ("bias", &vjp.bias, &b)] {
                let e = rel(a, grads.get(v.as_tensor()).unwrap());
                assert!(e < 1e-5, "{what}: {name} gradient differs by {e}");
            }
            let without =
                cpu_ops::conv3x3_block_cat_vjp(&refs, &wd, unit, &got, &g, false, kernels)
                    .unwrap()
                    .unwrap();
            assert!(without.inputs.is_empty(), "{what}");
        }
    }
}

#[test]
fn parts_that_do_not_fit_are_errors() {
    let (a, w, b) = (
        rand(&[1, 3, 6, 6], 1),
        rand(&[4, 5, 3, 3], 2),
        rand(&[4], 3),
    );
    let unit = Conv3x3Block::torch_em();
    let k = Kernels::Auto;
    let other_size = rand(&[1, 2, 6, 7], 4);
    let err = cpu_ops::conv3x3_block_cat(&[&a, &other_size], &w, &b, unit, k).unwrap_err();
    assert!(err.to_string().contains("differ"), "{err}");
    let too_few = rand(&[1, 1, 6, 6], 5);
    let err = cpu_ops::conv3x3_block_cat(&[&a, &too_few], &w, &b, unit, k).unwrap_err();
    assert!(err.to_string().contains("4 input channels"), "{err}");
    assert!(cpu_ops::conv3x3_block_cat(&[], &w, &b, unit, k).is_err());
    let g = rand(&[1, 4, 6, 6], 6);
    assert!(cpu_ops::conv3x3_block_cat_vjp(&[&a, &too_few], &w, unit, &g, &g, true, k).is_err());
    let fits = rand(&[1, 2, 6, 6], 7);
    assert!(
        cpu_ops::conv3x3_block_cat(&[&a, &fits], &w, &b, unit, Kernels::Candle)
            .unwrap()
            .is_none()
    );
}

/// The input gradient from the output gradient and the kernel alone equals autograd's through
/// the plain 3×3 convolution, in both the Winograd (`Auto`, 40 channels in and out) and the
/// direct form.
#[test]
fn the_input_vjp_of_a_plain_3x3_gives_the_autograd_input_gradient() {
    for (c, o, kernels) in [
        (40, 40, Kernels::Auto),
        (40, 40, Kernels::Direct),
        (3, 5, Kernels::Auto),
    ] {
        let x = Var::from_tensor(&rand(&[2, c, 12, 64], 5)).unwrap();
        let w = (rand(&[o, c, 3, 3], 6) * 0.3).unwrap();
        let y = cpu_ops::conv3x3(x.as_tensor(), &w, kernels).unwrap();
        let g = rand(y.dims(), 7);
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let want = grads.get(x.as_tensor()).unwrap();
        let got = cpu_ops::conv3x3_input_vjp(&g, &w, kernels).unwrap();
        assert_eq!(got.dims(), want.dims());
        assert!(
            rel(&got, want) < 1e-5,
            "{c}→{o} {kernels:?}: {}",
            rel(&got, want)
        );
    }
}

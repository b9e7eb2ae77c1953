//! BatchNorm with batch statistics, affine and ReLU, as one op whose backward is written by
//! hand: the graph keeps the op's input (and parameters) and nothing else; the backward pass
//! recomputes the per-channel statistics from it and allocates only the gradients.
//!
//! Composed of candle ops, the same layer keeps about eight input-sized intermediates for its
//! backward pass and allocates as many again while differentiating them.

use candle_core::{Context, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::storage::slice;
use crate::Kernels;

/// Per-channel mean and 1/sqrt(biased variance + eps) of x (B, C, H·W) ([`moments`]).
fn statistics(x: &[f32], b: usize, c: usize, hw: usize, eps: f64) -> Vec<(f32, f32)> {
    moments(x, b, c, hw)
        .into_iter()
        .map(|(mean, var)| (mean as f32, (1.0 / (var + eps).sqrt()) as f32))
        .collect()
}

/// Per-channel mean and biased variance of x (B, C, H·W): two passes, each in blocks summed
/// in f32 lanes and added in f64 ([`crate::sums`]).
fn moments(x: &[f32], b: usize, c: usize, hw: usize) -> Vec<(f64, f64)> {
    let n = (b * hw) as f64;
    (0..c)
        .into_par_iter()
        .map(|ci| {
            let plane = |bi: usize| &x[(bi * c + ci) * hw..(bi * c + ci + 1) * hw];
            let sum: f64 = (0..b).map(|bi| crate::sums::sum(plane(bi))).sum();
            let mean = sum / n;
            // The centred squares in f32 from the mean rounded to f32: two passes, as
            // E[x²] − E[x]² loses the variance where the mean is large against it.
            let m = mean as f32;
            let sq: f64 = (0..b)
                .map(|bi| {
                    let p = plane(bi);
                    crate::sums::pair_sums(p, p, |v, _| ((v - m) * (v - m), 0.0)).0
                })
                .sum();
            (mean, sq / n)
        })
        .collect()
}

/// The batch statistics of x (B, C, H, W) that a training BatchNorm's running statistics
/// follow: per channel, the mean and the unbiased variance (`n / (n − 1)` times the biased
/// one; the biased one where n = 1), as (C) tensors without a graph, in one parallel pass per
/// moment. `None` where the kernels do not serve x (the caller composes them).
pub fn batch_statistics(
    x: &Tensor,
    kernels: Kernels,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    if !kernels.serve(x) {
        return Ok(None);
    }
    let (b, c, h, w) = x.dims4()?;
    let x = x.detach().contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let n = (b * h * w) as f64;
    let (mean, var): (Vec<f32>, Vec<f32>) = moments(slice(cpu, layout)?, b, c, h * w)
        .into_iter()
        .map(|(m, v)| {
            (
                m as f32,
                (if n > 1.0 { v * n / (n - 1.0) } else { v }) as f32,
            )
        })
        .unzip();
    let dev = x.device();
    Ok(Some((Tensor::new(mean, dev)?, Tensor::new(var, dev)?)))
}

fn dims(l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (b, c, h, w) = l.shape().dims4()?;
    Ok((b, c, h * w))
}

/// Training-mode BatchNorm2d (biased batch variance, `eps`), `· weight + bias`, then ReLU when
/// `relu`: one op, forward and backward, for contiguous f32 CPU tensors (others: `None`, the
/// caller composes the layer). The running statistics are not touched.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
    kernels: Kernels,
) -> candle_core::Result<Option<Tensor>> {
    if !kernels.serve(x) {
        return Ok(None);
    }
    let c = x.dim(1)?;
    if weight.dims() != [c] || bias.dims() != [c] {
        candle_core::bail!(
            "batch_norm_train: {c} channels, weight {:?}, bias {:?}",
            weight.dims(),
            bias.dims()
        );
    }
    Ok(Some(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        BatchNorm { eps, relu },
    )?))
}

/// [`batch_norm_train`]'s backward as a function (see [`crate::LayerGrads`]): the gradients of
/// input, weight and bias from the input, weight, bias and output gradient (the batch
/// statistics are taken from `x` again). `None` where [`batch_norm_train`] would not have
/// served the forward.
pub fn batch_norm_train_vjp(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
    grad: &Tensor,
    kernels: Kernels,
) -> candle_core::Result<Option<crate::LayerGrads>> {
    if !kernels.serve(x) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (gx, gw, gb) =
        BatchNorm { eps, relu }.bwd(&x, &weight.contiguous()?, &bias.contiguous()?, &x, grad)?;
    Ok(Some(crate::LayerGrads {
        input: gx,
        weight: gw.context("batch norm: no weight gradient")?,
        bias: gb.context("batch norm: no bias gradient")?,
    }))
}

struct BatchNorm {
    eps: f64,
    relu: bool,
}

impl CustomOp3 for BatchNorm {
    fn name(&self) -> &'static str {
        "batch-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, hw) = dims(xl)?;
        let (x, w, bias) = (slice(xs, xl)?, slice(ws, wl)?, slice(bs, bl)?);
        let stats = statistics(x, b, c, hw, self.eps);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(hw.max(1))
            .zip(x.par_chunks(hw.max(1)))
            .enumerate()
            .for_each(|(i, (yp, xp))| {
                let ci = i % c;
                let (mean, inv) = stats[ci];
                let scale = inv * w[ci];
                let shift = bias[ci] - mean * scale;
                for (o, &v) in yp.iter_mut().zip(xp) {
                    let t = v * scale + shift;
                    *o = if self.relu { t.max(0.0) } else { t };
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, c, h, wd) = x.dims4()?;
        let n = b * c * h * wd;
        let packed = grad.contiguous()?.apply_op3_no_bwd(
            x,
            &Tensor::cat(&[w, bias], 0)?,
            &BatchNormGrad {
                eps: self.eps,
                relu: self.relu,
            },
        )?;
        // The parameters' gradients are copied out: views would keep the whole packed
        // storage (the input's size) alive for as long as they are, to the end of a backward
        // pass where they wait to be summed.
        // (`Tensor::copy` would clone the whole storage.)
        let own = |t: Tensor| Tensor::from_vec(t.to_vec1::<f32>()?, c, t.device());
        let gw = own(packed.narrow(0, n, c)?)?;
        let gb = own(packed.narrow(0, n + c, c)?)?;
        let gx = packed.narrow(0, 0, n)?.reshape((b, c, h, wd))?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// (output gradient, x, [weight; bias]) → [x gradient; weight gradient; bias gradient], flat.
struct BatchNormGrad {
    eps: f64,
    relu: bool,
}

impl CustomOp3 for BatchNormGrad {
    fn name(&self) -> &'static str {
        "batch-norm-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, hw) = dims(xl)?;
        let (g, x, params) = (slice(gs, gl)?, slice(xs, xl)?, slice(ps, pl)?);
        let (w, bias) = params.split_at(c);
        let stats = statistics(x, b, c, hw, self.eps);
        let relu = self.relu;
        // g' is the gradient reaching the affine output (zero where ReLU cut it). Per channel:
        // Σ g' (the bias gradient) and Σ g'·x̂ (the weight gradient); then
        // dx = w·inv/N · (N·g' − Σ g' − x̂ · Σ g'·x̂).
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ci| {
                let (mean, inv) = stats[ci];
                let (scale, shift) = (inv * w[ci], bias[ci] - mean * inv * w[ci]);
                let (mut sg, mut sgx) = (0f64, 0f64);
                for bi in 0..b {
                    let at = (bi * c + ci) * hw;
                    let (s, sx) =
                        crate::sums::pair_sums(&g[at..at + hw], &x[at..at + hw], |gv, v| {
                            // Branch-free, so that the sums vectorise.
                            let gp = if relu && v * scale + shift <= 0.0 {
                                0.0
                            } else {
                                gv
                            };
                            (gp, gp * ((v - mean) * inv))
                        });
                    sg += s;
                    sgx += sx;
                }
                (sg, sgx)
            })
            .collect();
        let nf = (b * hw) as f32;
        let mut out = vec![0f32; x.len() + 2 * c];
        let (gx, gp) = out.split_at_mut(x.len());
        gx.par_chunks_mut(hw.max(1))
            .enumerate()
            .for_each(|(i, dst)| {
                let ci = i % c;
                let at = i * hw;
                let (mean, inv) = stats[ci];
                let (scale, shift) = (inv * w[ci], bias[ci] - mean * inv * w[ci]);
                let (sg, sgx) = (sums[ci].0 as f32, sums[ci].1 as f32);
                let k = w[ci] * inv / nf;
                for ((o, &gv), &v) in dst.iter_mut().zip(&g[at..at + hw]).zip(&x[at..at + hw]) {
                    let gp = if relu && v * scale + shift <= 0.0 {
                        0.0
                    } else {
                        gv
                    };
                    let xhat = (v - mean) * inv;
                    *o = k * (nf * gp - sg - xhat * sgx);
                }
            });
        for ci in 0..c {
            gp[ci] = sums[ci].1 as f32;
            gp[c + ci] = sums[ci].0 as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * c)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::*;
    use crate::testing::max_rel;

    /// BatchNorm (+ ReLU) composed of candle ops, in f64.
    fn composed(x: &Tensor, w: &Tensor, b: &Tensor, relu: bool) -> Tensor {
        let c = x.dim(1).unwrap();
        let shape = (1, c, 1, 1);
        let mean = x
            .mean_keepdim(0)
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
            .mean_keepdim(3)
            .unwrap();
        let centred = x.broadcast_sub(&mean).unwrap();
        let var = centred
            .sqr()
            .unwrap()
            .mean_keepdim(0)
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
            .mean_keepdim(3)
            .unwrap();
        let y = centred
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w.reshape(shape).unwrap())
            .unwrap()
            .broadcast_add(&b.reshape(shape).unwrap())
            .unwrap();
        if relu {
            y.relu().unwrap()
        } else {
            y
        }
    }

    #[test]
    fn batch_norm_matches_the_composed_layer_and_its_gradients() {
        let dev = Device::Cpu;
        for relu in [false, true] {
            for (b, c, h, w) in [(2, 3, 5, 7), (1, 4, 16, 16), (3, 1, 2, 3)] {
                let x = Var::from_tensor(
                    &((Tensor::randn(0f32, 1.0, (b, c, h, w), &dev).unwrap() * 2.0).unwrap() + 0.5)
                        .unwrap(),
                )
                .unwrap();
                let wt = Var::from_tensor(&Tensor::randn(1f32, 0.3, c, &dev).unwrap()).unwrap();
                let bt = Var::from_tensor(&Tensor::randn(0f32, 0.3, c, &dev).unwrap()).unwrap();
                let r = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev).unwrap();
                let ours = batch_norm_train(&x, &wt, &bt, 1e-5, relu, Kernels::Auto)
                    .unwrap()
                    .unwrap();
                let g_ours = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let f64s = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap();
                let (x64, w64, b64) = (f64s(&x), f64s(&wt), f64s(&bt));
                let reference = composed(&x64, &w64, &b64, relu);
                let g_ref = (&reference * r.to_dtype(DType::F64).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                assert!(
                    max_rel(&ours, &f32s(&reference)) < 1e-5,
                    "{relu} {b}×{c}×{h}×{w}"
                );
                for (name, a, e) in [("x", &x, &x64), ("weight", &wt, &w64), ("bias", &bt, &b64)] {
                    let ga = g_ours.get(a).unwrap();
                    let ge = f32s(g_ref.get(e).unwrap());
                    assert!(
                        max_rel(ga, &ge) < 1e-4,
                        "{relu} {b}×{c}×{h}×{w}: {name}: {}",
                        max_rel(ga, &ge)
                    );
                }
            }
        }
        // Not served: other dtypes and the candle choice.
        let x = Tensor::zeros((1, 2, 2, 2), DType::F64, &dev).unwrap();
        let p = Tensor::ones(2, DType::F64, &dev).unwrap();
        assert!(batch_norm_train(&x, &p, &p, 1e-5, true, Kernels::Auto)
            .unwrap()
            .is_none());
    }

    /// The statistics a running BatchNorm follows: per channel, the batch's mean and unbiased
    /// variance, against the same in f64 from candle's ops; a single value's variance is the
    /// biased one (zero). Not served: f64 and the candle choice.
    #[test]
    fn batch_statistics_are_the_mean_and_the_unbiased_variance() {
        let dev = Device::Cpu;
        for (b, c, h, w) in [(2, 3, 5, 7), (1, 4, 16, 16), (3, 2, 1, 1), (1, 2, 1, 1)] {
            let x = ((Tensor::randn(0f32, 1.0, (b, c, h, w), &dev).unwrap() * 3.0).unwrap() + 2.0)
                .unwrap();
            let (mean, var) = batch_statistics(&x, Kernels::Auto).unwrap().unwrap();
            let flat = x
                .to_dtype(DType::F64)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .reshape((c, b * h * w))
                .unwrap();
            let m = flat.mean_keepdim(1).unwrap();
            let sq = flat
                .broadcast_sub(&m)
                .unwrap()
                .sqr()
                .unwrap()
                .sum(1)
                .unwrap();
            let n = (b * h * w) as f64;
            let want_var = (sq / if n > 1.0 { n - 1.0 } else { 1.0 }).unwrap();
            let f32s = |t: Tensor| t.to_dtype(DType::F32).unwrap();
            let m = f32s(m.flatten_all().unwrap());
            assert!(max_rel(&mean, &m) < 1e-5, "mean {b}×{c}×{h}×{w}");
            if n > 1.0 {
                assert!(max_rel(&var, &f32s(want_var)) < 1e-5, "var {b}×{c}×{h}×{w}");
            } else {
                assert_eq!(var.to_vec1::<f32>().unwrap(), vec![0.0; c]);
            }
        }
        let x64 = Tensor::zeros((1, 2, 3, 3), DType::F64, &dev).unwrap();
        assert!(batch_statistics(&x64, Kernels::Auto).unwrap().is_none());
        let x = Tensor::zeros((1, 2, 3, 3), DType::F32, &dev).unwrap();
        assert!(batch_statistics(&x, Kernels::Candle).unwrap().is_none());
    }
}

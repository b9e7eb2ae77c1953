//! A linear layer's bias and the exact (erf) GELU after it as one op, forward and backward: one
//! pass over the product instead of a broadcast add and candle's GELU (whose erf is scalar).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::rowpath::RowPath;
use crate::storage::{row_sum, slice};
use crate::Kernels;

/// `gelu(y + bias)` with the exact GELU `a·Φ(a)` for y (…, n) and bias (n), differentiable in
/// both. `None` when the crate's kernels do not serve the tensors.
///
/// Φ comes from a Chebyshev fit of erfc (relative error 1.2e-7), so for negative inputs, where
/// the GELU is tiny, it stays accurate relative to its value.
///
/// # Errors
/// A bias whose length is not y's last dimension.
pub fn bias_gelu(
    y: &Tensor,
    bias: &Tensor,
    kernels: Kernels,
) -> candle_core::Result<Option<Tensor>> {
    if !kernels.serve_all(&[y, bias]) {
        return Ok(None);
    }
    let n = *y.dims().last().unwrap_or(&0);
    if bias.dims() != [n] || n == 0 {
        candle_core::bail!("bias_gelu: y {:?}, bias {:?}", y.dims(), bias.dims());
    }
    let op = BiasGelu::new();
    Ok(Some(y.contiguous()?.apply_op2(&bias.contiguous()?, op)?))
}

#[derive(Clone, Copy)]
pub(crate) struct BiasGelu {
    path: RowPath,
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / √(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// erfc(z) for z ≥ 0 by the Chebyshev fit of Numerical Recipes (`erfcc`; relative error below
/// 1.2e-7 everywhere), branch-free.
#[inline(always)]
fn erfc(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * vim_scan::Float::exp_kernel(-z * z + poly)
}

/// Φ(a) = erfc(−a/√2) / 2: the lower tail directly (accurate relative to its small values,
/// where a·Φ(a) is small too), the upper as one minus the tail.
#[inline(always)]
fn cdf(a: f32) -> f32 {
    let tail = 0.5 * erfc(a.abs() * FRAC_1_SQRT_2);
    if a < 0.0 {
        tail
    } else {
        1.0 - tail
    }
}

#[inline(always)]
fn forward_row(y: &[f32], bias: &[f32], out: &mut [f32]) {
    for ((o, &v), &b) in out.iter_mut().zip(y).zip(bias) {
        let a = v + b;
        *o = a * cdf(a);
    }
}

/// `gelu(v)` in place.
#[inline(always)]
fn in_place_row(v: &mut [f32]) {
    for v in v {
        let a = *v;
        *v = a * cdf(a);
    }
}

/// The pre-activation's gradient `g · (Φ(a) + a·φ(a))` into `ga`.
#[inline(always)]
fn backward_row(y: &[f32], bias: &[f32], g: &[f32], ga: &mut [f32]) {
    for (((d, &v), &b), &gv) in ga.iter_mut().zip(y).zip(bias).zip(g) {
        let a = v + b;
        let pdf = INV_SQRT_2PI * vim_scan::Float::exp_kernel(-0.5 * a * a);
        *d = gv * (cdf(a) + a * pdf);
    }
}

row_paths! {
    /// [`forward_row`] compiled for `path`.
    fn forward_on = forward_row(y: &[f32], bias: &[f32], out: &mut [f32]);
}

row_paths! {
    /// [`in_place_row`] compiled for `path`.
    fn in_place_on = in_place_row(v: &mut [f32]);
}

row_paths! {
    /// [`backward_row`] compiled for `path`.
    fn backward_on = backward_row(y: &[f32], bias: &[f32], g: &[f32], ga: &mut [f32]);
}

impl BiasGelu {
    pub(crate) fn new() -> BiasGelu {
        BiasGelu {
            path: RowPath::detect(),
        }
    }

    pub(crate) fn forward(&self, y: &[f32], bias: &[f32], out: &mut [f32]) {
        forward_on(self.path, y, bias, out)
    }

    pub(crate) fn backward(&self, y: &[f32], bias: &[f32], g: &[f32], ga: &mut [f32]) {
        backward_on(self.path, y, bias, g, ga)
    }
}

/// Rows per parallel task.
const ROWS: usize = 16;

impl BiasGelu {
    /// `gelu(y + bias)` for every row of y (rows of `bias.len()`, which is not zero), on
    /// rayon's threads.
    pub(crate) fn forward_rows(&self, y: &[f32], bias: &[f32]) -> Vec<f32> {
        let n = bias.len();
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(n * ROWS)
            .zip(y.par_chunks(n * ROWS))
            .for_each(|(o, y)| {
                for (o, y) in o.chunks_exact_mut(n).zip(y.chunks_exact(n)) {
                    self.forward(y, bias, o);
                }
            });
        out
    }

    /// `gelu(v)` in place for all of `v`, on rayon's threads in runs of `n · ROWS` values.
    pub(crate) fn in_place_rows(&self, v: &mut [f32], n: usize) {
        v.par_chunks_mut(n.max(1) * ROWS)
            .for_each(|v| in_place_on(self.path, v));
    }

    /// The pre-activation's gradient for every row of y and of the output gradient g (same
    /// length as y), on rayon's threads.
    pub(crate) fn backward_rows(&self, y: &[f32], bias: &[f32], g: &[f32]) -> Vec<f32> {
        let n = bias.len();
        let mut ga = vec![0f32; g.len()];
        ga.par_chunks_mut(n * ROWS)
            .zip(y.par_chunks(n * ROWS).zip(g.par_chunks(n * ROWS)))
            .for_each(|(d, (y, g))| {
                for ((d, y), g) in d
                    .chunks_exact_mut(n)
                    .zip(y.chunks_exact(n))
                    .zip(g.chunks_exact(n))
                {
                    self.backward(y, bias, g, d);
                }
            });
        ga
    }
}

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, bias) = (slice(ys, yl)?, slice(bs, bl)?);
        Ok((
            CpuStorage::F32(self.forward_rows(y, bias)),
            yl.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        y: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let ga = grad.contiguous()?.apply_op3_no_bwd(
            &y.contiguous()?,
            &bias.contiguous()?,
            &BiasGeluGrad {
                forward: BiasGelu { path: self.path },
            },
        )?;
        let n = bias.elem_count();
        let gy = ga.reshape(y.dims())?;
        let gb = row_sum(&gy.reshape((y.elem_count() / n, n))?)?;
        Ok((Some(gy), Some(gb)))
    }
}

/// (output gradient, y, bias) → the pre-activation's gradient.
struct BiasGeluGrad {
    forward: BiasGelu,
}

/// A zero bias for rows of y's last dimension.
fn no_bias(y: &Tensor) -> candle_core::Result<Tensor> {
    let n = *y.dims().last().unwrap_or(&0);
    Tensor::zeros(n, candle_core::DType::F32, y.device())
}

/// `gelu(y)` of an f32 CPU tensor, computed without a graph.
pub(crate) fn gelu_values(y: &Tensor) -> candle_core::Result<Tensor> {
    y.contiguous()?
        .apply_op2_no_bwd(&no_bias(y)?, &BiasGelu::new())
}

/// The gradient of `gelu(y)`'s input y for the output's gradient `g` (y's shape).
pub(crate) fn gelu_grad(y: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    let op = BiasGeluGrad {
        forward: BiasGelu::new(),
    };
    g.contiguous()?
        .apply_op3_no_bwd(&y.contiguous()?, &no_bias(y)?, &op)
}

impl CustomOp3 for BiasGeluGrad {
    fn name(&self) -> &'static str {
        "bias-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, y, bias) = (slice(gs, gl)?, slice(ys, yl)?, slice(bs, bl)?);
        if y.len() != g.len() {
            candle_core::bail!(
                "bias-gelu backward: {} gradients for {} values",
                g.len(),
                y.len()
            );
        }
        let ga = self.forward.backward_rows(y, bias, g);
        Ok((CpuStorage::F32(ga), gl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_rel, values, weighted_grads};
    use candle_core::{Device, Var};

    #[test]
    fn the_normal_cdf_is_within_5e_6_relative() {
        // Φ(a) to 1e-10 (from erfc tables).
        for (a, want) in [
            (0.0f32, 0.5f64),
            (0.5, 0.691_462_461_3),
            (1.0, 0.841_344_746_1),
            (-1.0, 0.158_655_253_9),
            (-2.5, 0.006_209_665_3),
            (-4.0, 3.167_124_183e-5),
            (-6.0, 9.865_876_450e-10),
            (3.0, 0.998_650_101_97),
        ] {
            let got = cdf(a) as f64;
            assert!((got - want).abs() < 5e-6 * want, "Φ({a}) = {got}");
        }
    }

    #[test]
    fn equals_candle_bias_add_and_gelu_forward_and_backward() {
        let dev = Device::Cpu;
        for (rows, n) in [(37, 24), (5, 3), (1, 100), (600, 20)] {
            let t = |len: usize, seed: u64, shape: &[usize], scale: f32| {
                let v: Vec<f32> = values(len, seed).iter().map(|v| v * scale).collect();
                Var::from_tensor(&Tensor::from_vec(v, shape, &dev).unwrap()).unwrap()
            };
            let (y, b) = (t(rows * n, 1, &[rows, n], 3.0), t(n, 2, &[n], 1.0));
            let weights = Tensor::from_vec(values(rows * n, 3), (rows, n), &dev).unwrap();
            let want = y.as_tensor().broadcast_add(&b).unwrap().gelu_erf().unwrap();
            let gw = weighted_grads(&want, &weights);
            for path in RowPath::available() {
                // In place (no bias), the same values as the rows with a zero bias.
                let rows_of = BiasGelu { path };
                let pre = values(rows * n, 5);
                let mut in_place = pre.clone();
                rows_of.in_place_rows(&mut in_place, n);
                assert_eq!(
                    in_place,
                    rows_of.forward_rows(&pre, &vec![0.0; n]),
                    "{path:?}"
                );
                let got = y.as_tensor().apply_op2(&b, BiasGelu { path }).unwrap();
                assert!(max_rel(&got, &want) < 1e-6, "forward {rows}×{n} {path:?}");
                let gg = weighted_grads(&got, &weights);
                for (name, v) in [("y", &y), ("bias", &b)] {
                    let e = max_rel(gg.get(v).unwrap(), gw.get(v).unwrap());
                    assert!(e < 1e-5, "d{name} {rows}×{n} {path:?}: {e}");
                }
            }
        }
        let y = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros(2, candle_core::DType::F32, &dev).unwrap();
        assert!(bias_gelu(&y, &b, Kernels::Auto).is_err());
        assert!(bias_gelu(&y, &b, Kernels::Candle).unwrap().is_none());
    }
}

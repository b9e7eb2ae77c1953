//! The Mamba mixer's causal depthwise 1-D convolution with bias and SiLU as one op, forward and
//! backward: `y[b, e, t] = silu(bias[e] + Σ_j w[e, j] · x[b, e, t − (k − 1) + j])`, zero before
//! the first token. Composed of candle's ops it is a padding copy, k shifted multiply-adds and a
//! SiLU, each a pass over the (B, E, L) tensor; here it is one pass forward and one backward.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::rowpath::RowPath;
use crate::storage::slice;
use crate::Kernels;

/// `silu(bias + causal depthwise conv1d(x, weight))` for x (B, E, L), weight (E, 1, k) or
/// (E, k), bias (E), differentiable in all three. `None` when the crate's kernels do not serve
/// the tensors (not f32 on the CPU, or [`Kernels::Candle`]).
///
/// # Errors
/// Shapes that do not agree.
pub fn causal_conv1d_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    kernels: Kernels,
) -> candle_core::Result<Option<Tensor>> {
    conv1d_silu(x, weight, bias, kernels, false)
}

/// [`causal_conv1d_silu`] backwards in time, `y[t]` reading `x[t .. t + k]` (zero past the last
/// token): equal to flipping x along L, the causal op, and flipping the result, as the backward
/// direction of a bidirectional Mamba layer does; each row is reversed in cache instead.
///
/// # Errors
/// Shapes that do not agree.
pub fn causal_conv1d_silu_reversed(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    kernels: Kernels,
) -> candle_core::Result<Option<Tensor>> {
    conv1d_silu(x, weight, bias, kernels, true)
}

fn conv1d_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    kernels: Kernels,
    reverse: bool,
) -> candle_core::Result<Option<Tensor>> {
    if !kernels.serve_all(&[x, weight, bias]) {
        return Ok(None);
    }
    let (_, e, _) = x.dims3()?;
    let k = weight.elem_count() / e.max(1);
    if weight.elem_count() != e * k || k == 0 || bias.dims() != [e] {
        candle_core::bail!(
            "causal_conv1d_silu: x {:?}, weight {:?}, bias {:?}",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    let op = CausalConv {
        k,
        path: RowPath::detect(),
        reverse,
    };
    Ok(Some(x.contiguous()?.apply_op3(
        &weight.reshape((e, k))?.contiguous()?,
        &bias.contiguous()?,
        op,
    )?))
}

struct CausalConv {
    k: usize,
    path: RowPath,
    /// Rows are walked backwards in time (reversed into the row buffers and back).
    reverse: bool,
}

/// The pre-activation of one row: `a[t] = bias + Σ_j w[j] · xp[t + j]`, with `xp` the row
/// preceded by k − 1 zeros.
#[inline(always)]
fn pre_activation(xp: &[f32], w: &[f32], bias: f32, a: &mut [f32]) {
    a.fill(bias);
    for (j, &wj) in w.iter().enumerate() {
        for (o, &v) in a.iter_mut().zip(&xp[j..]) {
            *o += wj * v;
        }
    }
}

#[inline(always)]
fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + vim_scan::Float::exp_kernel(-a))
}

/// One row forward: `y = silu(a)`.
#[inline(always)]
fn forward_row(xp: &[f32], w: &[f32], bias: f32, y: &mut [f32]) {
    pre_activation(xp, w, bias, y);
    for v in y.iter_mut() {
        *v *= sigmoid(*v);
    }
}

/// One row backward: from the output gradient `g`, the pre-activation's gradient into
/// `ga[k − 1..k − 1 + l]` (`ga` is l + 2(k − 1) long and zero outside that range), the input's
/// gradient into `dx`, the weight and bias gradients added to `dw` and `db`.
#[inline(always)]
fn backward_row(
    xp: &[f32],
    w: &[f32],
    bias: f32,
    g: &[f32],
    ga: &mut [f32],
    dx: &mut [f32],
    (dw, db): (&mut [f32], &mut f32),
) {
    let (k, l) = (w.len(), g.len());
    let row = k - 1..k - 1 + l;
    pre_activation(xp, w, bias, &mut ga[row.clone()]);
    for (a, &gv) in ga[row.clone()].iter_mut().zip(g) {
        let s = sigmoid(*a);
        *a = gv * s * (1.0 + *a * (1.0 - s));
    }
    let ga_row = &ga[row];
    *db += ga_row.iter().sum::<f32>();
    for (j, d) in dw.iter_mut().enumerate() {
        *d += xp[j..j + l]
            .iter()
            .zip(ga_row)
            .map(|(a, b)| a * b)
            .sum::<f32>();
    }
    // x[s] reached a[s + (k − 1) − j] through w[j]: dx[s] = Σ_j' w[k − 1 − j'] · ga[s + j'],
    // with ga's unpadded index s + j' ≥ l reading the zeros after it.
    dx.fill(0.0);
    for (jp, &wj) in w.iter().rev().enumerate() {
        for (o, &v) in dx.iter_mut().zip(&ga[k - 1 + jp..]) {
            *o += wj * v;
        }
    }
}

row_paths! {
    /// [`forward_row`] compiled for `path`.
    fn forward_on = forward_row(xp: &[f32], w: &[f32], bias: f32, y: &mut [f32]);
}

row_paths! {
    /// [`backward_row`] compiled for `path`.
    fn backward_on = backward_row(
        xp: &[f32],
        w: &[f32],
        bias: f32,
        g: &[f32],
        ga: &mut [f32],
        dx: &mut [f32],
        grads: (&mut [f32], &mut f32),
    );
}

/// `row` (reversed when `reverse`) preceded by k − 1 zeros (and followed by k − 1 more, for the
/// backward's reads).
fn padded(row: &[f32], k: usize, reverse: bool, buf: &mut Vec<f32>) {
    buf.clear();
    buf.resize(k - 1, 0.0);
    if reverse {
        buf.extend(row.iter().rev());
    } else {
        buf.extend_from_slice(row);
    }
    buf.resize(row.len() + 2 * (k - 1), 0.0);
}

impl CustomOp3 for CausalConv {
    fn name(&self) -> &'static str {
        "causal-conv1d-silu"
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
        let (_, e, l) = xl.shape().dims3()?;
        let (x, w, bias) = (slice(xs, xl)?, slice(ws, wl)?, slice(bs, bl)?);
        let k = self.k;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(l.max(1))
            .zip(x.par_chunks(l.max(1)))
            .enumerate()
            .for_each_init(Vec::new, |buf, (i, (yr, xr))| {
                let ei = i % e;
                padded(xr, k, self.reverse, buf);
                forward_on(self.path, buf, &w[ei * k..(ei + 1) * k], bias[ei], yr);
                if self.reverse {
                    yr.reverse();
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
        let (b, e, l) = x.dims3()?;
        let k = self.k;
        let params = Tensor::cat(&[w.flatten_all()?, bias.clone()], 0)?;
        let flat = grad.contiguous()?.apply_op3_no_bwd(
            x,
            &params,
            &CausalConvGrad {
                forward: CausalConv {
                    k,
                    path: self.path,
                    reverse: self.reverse,
                },
            },
        )?;
        let n = b * e * l;
        let dx = flat.narrow(0, 0, n)?.reshape((b, e, l))?;
        let dw = flat.narrow(0, n, e * k)?.reshape((e, k))?;
        let db = flat.narrow(0, n + e * k, e)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// (output gradient, x, [weight; bias]) → [dx; dweight; dbias], flat.
struct CausalConvGrad {
    forward: CausalConv,
}

impl CustomOp3 for CausalConvGrad {
    fn name(&self) -> &'static str {
        "causal-conv1d-silu-grad"
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
        let (b, e, l) = xl.shape().dims3()?;
        let (g, x, params) = (slice(gs, gl)?, slice(xs, xl)?, slice(ps, pl)?);
        let k = self.forward.k;
        let (w, bias) = params.split_at(e * k);
        let mut out = vec![0f32; x.len() + e * (k + 1)];
        let (dx, dp) = out.split_at_mut(x.len());
        // Per channel: its rows in every image (dx rows are strided by E rows; gathered here).
        let per_channel: Vec<(Vec<f32>, Vec<f32>, f32)> = (0..e)
            .into_par_iter()
            .map(|ei| {
                let (mut buf, mut ga) = (Vec::new(), vec![0f32; l + 2 * (k - 1)]);
                let reverse = self.forward.reverse;
                let mut g_rev = vec![0f32; if reverse { l } else { 0 }];
                let mut dxs = vec![0f32; b * l];
                let (mut dw, mut db) = (vec![0f32; k], 0f32);
                for bi in 0..b {
                    let at = (bi * e + ei) * l;
                    padded(&x[at..at + l], k, reverse, &mut buf);
                    let g_row = if reverse {
                        g_rev
                            .iter_mut()
                            .zip(g[at..at + l].iter().rev())
                            .for_each(|(o, v)| *o = *v);
                        &g_rev[..]
                    } else {
                        &g[at..at + l]
                    };
                    let dx_row = &mut dxs[bi * l..(bi + 1) * l];
                    backward_on(
                        self.forward.path,
                        &buf,
                        &w[ei * k..(ei + 1) * k],
                        bias[ei],
                        g_row,
                        &mut ga,
                        dx_row,
                        (&mut dw, &mut db),
                    );
                    if reverse {
                        dx_row.reverse();
                    }
                }
                (dxs, dw, db)
            })
            .collect();
        for (ei, (dxs, dw, db)) in per_channel.into_iter().enumerate() {
            for bi in 0..b {
                let at = (bi * e + ei) * l;
                dx[at..at + l].copy_from_slice(&dxs[bi * l..(bi + 1) * l]);
            }
            dp[ei * k..(ei + 1) * k].copy_from_slice(&dw);
            dp[e * k + ei] = db;
        }
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_rel, values, var, weighted_grads};
    use candle_core::Device;

    /// The composed form (as the mixer wrote it): padding, k shifted multiply-adds, SiLU.
    fn composed(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        let (_, e, l) = x.dims3().unwrap();
        let k = w.dim(1).unwrap();
        let xp = x.pad_with_zeros(2, k - 1, 0).unwrap();
        let mut acc = b
            .reshape((1, e, 1))
            .unwrap()
            .broadcast_as(x.dims())
            .unwrap()
            .contiguous()
            .unwrap();
        for j in 0..k {
            let wj = w.narrow(1, j, 1).unwrap().reshape((1, e, 1)).unwrap();
            acc = (acc + xp.narrow(2, j, l).unwrap().broadcast_mul(&wj).unwrap()).unwrap();
        }
        acc.silu().unwrap()
    }

    /// Both directions against the composed form (the reversed one as flip, composed, flip),
    /// forward and every gradient, on both compiled paths.
    #[test]
    fn equals_the_composed_convolution_forward_and_backward() {
        let dev = Device::Cpu;
        for (b, e, l, k) in [(2, 5, 37, 4), (1, 3, 2, 4), (3, 4, 19, 1), (1, 2, 9, 3)] {
            let (x, w, bias) = (var(&[b, e, l], 1), var(&[e, k], 2), var(&[e], 3));
            let weights = Tensor::from_vec(values(b * e * l, 4), (b, e, l), &dev).unwrap();
            for reverse in [false, true] {
                let want = if reverse {
                    let x_flipped = x.flip(&[2]).unwrap();
                    composed(&x_flipped, &w, &bias).flip(&[2]).unwrap()
                } else {
                    composed(&x, &w, &bias)
                };
                let gw = weighted_grads(&want, &weights);
                for path in RowPath::available() {
                    let op = CausalConv { k, path, reverse };
                    let got = x.as_tensor().apply_op3(&w, &bias, op).unwrap();
                    let case = format!("({b}, {e}, {l}, {k}) {path:?} reverse {reverse}");
                    assert!(max_rel(&got, &want) < 1e-5, "forward {case}");
                    let gg = weighted_grads(&got, &weights);
                    for (name, v) in [("x", &x), ("w", &w), ("bias", &bias)] {
                        let err = max_rel(gg.get(v).unwrap(), gw.get(v).unwrap());
                        assert!(err < 1e-5, "d{name} {case}: {err}");
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors_and_others_not_served() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 8), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((3, 1, 4), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap();
        assert!(causal_conv1d_silu(&x, &w, &b, Kernels::Auto)
            .unwrap()
            .is_some());
        let b2 = Tensor::zeros(2, candle_core::DType::F32, &dev).unwrap();
        assert!(causal_conv1d_silu(&x, &w, &b2, Kernels::Auto).is_err());
        assert!(causal_conv1d_silu(&x, &w, &b, Kernels::Candle)
            .unwrap()
            .is_none());
        assert!(causal_conv1d_silu_reversed(&x, &w, &b2, Kernels::Auto).is_err());
        assert!(causal_conv1d_silu_reversed(&x, &w, &b, Kernels::Candle)
            .unwrap()
            .is_none());
    }
}

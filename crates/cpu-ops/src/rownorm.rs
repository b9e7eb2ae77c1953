//! LayerNorm and RMSNorm over the last axis, and Vim's rotary position embedding, each as one op
//! with a hand-written backward. Composed of candle's ops, a LayerNorm is seven passes over its
//! input (mean, centring, square, mean, sqrt, division, affine) and keeps their results for the
//! backward pass; RoPE is two narrows, a negation, two concatenations and two products. Here the
//! forward is one pass per row, and the backward recomputes a row's statistics from the input,
//! which with the parameters is all the graph keeps.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::rowpath::RowPath;
use crate::storage::slice;
use crate::Kernels;

/// Rows per parallel task.
const ROWS: usize = 32;

/// `(x − mean) / √(var + eps) · w + b` over the last axis (biased variance), x (…, D), w and b
/// (D); differentiable in all three. `None` where the crate's kernels do not serve the tensors.
///
/// # Errors
/// Parameters whose length is not x's last dimension.
pub fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    kernels: Kernels,
) -> candle_core::Result<Option<Tensor>> {
    row_norm(x, &[w, b], eps, false, kernels)
}

/// `x / √(mean(x²) + eps) · w` over the last axis, x (…, D), w (D); differentiable in both.
/// `None` where the crate's kernels do not serve the tensors.
///
/// # Errors
/// A weight whose length is not x's last dimension.
pub fn rms_norm(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    kernels: Kernels,
) -> candle_core::Result<Option<Tensor>> {
    row_norm(x, &[w], eps, true, kernels)
}

/// [`layer_norm`]'s backward as a function (see [`crate::LayerGrads`]): for x, the parameters
/// and the output's gradient `dy` (x's shape), the gradients of x, w and b. `None` where the
/// crate's kernels do not serve the tensors.
///
/// # Errors
/// Parameters whose length is not x's last dimension, or a `dy` not of x's shape.
pub fn layer_norm_vjp(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    dy: &Tensor,
    kernels: Kernels,
) -> candle_core::Result<Option<crate::LayerGrads>> {
    let Some((op, packed)) = row_norm_op(x, &[w, b], eps, false, kernels)? else {
        return Ok(None);
    };
    if dy.dims() != x.dims() || !kernels.serve_all(&[dy]) {
        candle_core::bail!("layer_norm_vjp: x {:?}, gradient {:?}", x.dims(), dy.dims());
    }
    let (gx, gp) = op.grads(&x.contiguous()?, &packed, dy)?;
    // Copies of their own values (candle's `copy` clones the whole buffer): views would keep
    // the whole buffer, x's gradient too, alive with them.
    Ok(Some(crate::LayerGrads {
        input: Some(gx),
        weight: gp.get(0)?.force_contiguous()?,
        bias: gp.get(1)?.force_contiguous()?,
    }))
}

fn row_norm(
    x: &Tensor,
    params: &[&Tensor],
    eps: f64,
    rms: bool,
    kernels: Kernels,
) -> candle_core::Result<Option<Tensor>> {
    let Some((op, packed)) = row_norm_op(x, params, eps, rms, kernels)? else {
        return Ok(None);
    };
    Ok(Some(x.contiguous()?.apply_op2(&packed, op)?))
}

/// The op and its packed parameters, once the tensors are checked; `None` where the kernels
/// do not serve them.
fn row_norm_op(
    x: &Tensor,
    params: &[&Tensor],
    eps: f64,
    rms: bool,
    kernels: Kernels,
) -> candle_core::Result<Option<(RowNorm, Tensor)>> {
    let mut all = vec![x];
    all.extend(params);
    if !kernels.serve_all(&all) {
        return Ok(None);
    }
    let d = *x.dims().last().unwrap_or(&0);
    if d == 0 || params.iter().any(|p| p.dims() != [d]) {
        let name = if rms { "rms_norm" } else { "layer_norm" };
        let shapes: Vec<_> = params.iter().map(|p| p.dims().to_vec()).collect();
        candle_core::bail!("{name}: x {:?}, parameters {shapes:?}", x.dims());
    }
    // The parameters travel as one (k, D) tensor; `stack` passes their gradients back.
    let packed = Tensor::stack(params, 0)?;
    let op = RowNorm {
        rms,
        eps: eps as f32,
        path: RowPath::detect(),
    };
    Ok(Some((op, packed)))
}

#[derive(Clone, Copy)]
struct RowNorm {
    rms: bool,
    eps: f32,
    path: RowPath,
}

/// `Σ f(v)` over a row in sixteen lanes (vectorised, and a shorter rounding chain than one
/// running sum).
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for k in 0..16 {
            acc[k] += f(c[k]);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    acc.iter().sum::<f32>() + tail
}

/// A row's mean (0 for RMSNorm) and 1/√(variance + eps) (or 1/√(mean square + eps)); the
/// variance from the centred values (two passes).
#[inline(always)]
fn stats(x: &[f32], rms: bool, eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = if rms { 0.0 } else { lane_sum(x, |v| v) / n };
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline(always)]
fn forward_row(x: &[f32], w: &[f32], b: Option<&[f32]>, (rms, eps): (bool, f32), y: &mut [f32]) {
    let (mean, r) = stats(x, rms, eps);
    match b {
        Some(b) => {
            for (((o, &v), &wv), &bv) in y.iter_mut().zip(x).zip(w).zip(b) {
                *o = (v - mean) * r * wv + bv;
            }
        }
        None => {
            for ((o, &v), &wv) in y.iter_mut().zip(x).zip(w) {
                *o = v * r * wv;
            }
        }
    }
}

/// One row's input gradient into `gx`, its parameter gradients added to `gw` (and `gb`):
/// with x̂ = (x − mean)·r and ĝ = g·w, `gx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))` (no `mean(ĝ)` term
/// for RMSNorm), `gw += g·x̂`, `gb += g`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_row(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    rms: bool,
    gx: &mut [f32],
    gw: &mut [f32],
    gb: Option<&mut [f32]>,
) {
    let (mean, r) = stats(x, rms, eps);
    let n = x.len() as f32;
    let sum_g = if rms {
        0.0
    } else {
        w.iter().zip(g).map(|(&wv, &gv)| wv * gv).sum::<f32>()
    };
    let mut sum_gx = [0f32; 16];
    for (i, ((&v, &wv), &gv)) in x.iter().zip(w).zip(g).enumerate() {
        sum_gx[i % 16] += gv * wv * (v - mean) * r;
    }
    let sum_gx = sum_gx.iter().sum::<f32>();
    let mean_g = if rms { 0.0 } else { sum_g / n };
    let mean_gx = sum_gx / n;
    for ((((o, &v), &wv), &gv), gwv) in gx.iter_mut().zip(x).zip(w).zip(g).zip(gw.iter_mut()) {
        let xh = (v - mean) * r;
        *o = r * (gv * wv - mean_g - xh * mean_gx);
        *gwv += gv * xh;
    }
    if let Some(gb) = gb {
        for (o, &gv) in gb.iter_mut().zip(g) {
            *o += gv;
        }
    }
}

row_paths! {
    /// [`forward_row`] compiled for `path`.
    fn forward_on = forward_row(x: &[f32], w: &[f32], b: Option<&[f32]>, s: (bool, f32), y: &mut [f32]);
}

row_paths! {
    /// [`backward_row`] compiled for `path`.
    fn backward_on = backward_row(
        x: &[f32],
        w: &[f32],
        g: &[f32],
        eps: f32,
        rms: bool,
        gx: &mut [f32],
        gw: &mut [f32],
        gb: Option<&mut [f32]>,
    );
}

impl RowNorm {
    fn forward(&self, x: &[f32], w: &[f32], b: Option<&[f32]>, y: &mut [f32]) {
        forward_on(self.path, x, w, b, (self.rms, self.eps), y)
    }

    fn backward(
        &self,
        x: &[f32],
        w: &[f32],
        g: &[f32],
        gx: &mut [f32],
        (gw, gb): (&mut [f32], Option<&mut [f32]>),
    ) {
        backward_on(self.path, x, w, g, self.eps, self.rms, gx, gw, gb)
    }

    /// The parameters' rows: w, and b for LayerNorm.
    fn params<'a>(&self, p: &'a [f32], d: usize) -> (&'a [f32], Option<&'a [f32]>) {
        let (w, rest) = p.split_at(d);
        (w, (!self.rms).then_some(rest))
    }
}

impl CustomOp2 for RowNorm {
    fn name(&self) -> &'static str {
        if self.rms {
            "rms-norm"
        } else {
            "layer-norm"
        }
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, p) = (slice(xs, xl)?, slice(ps, pl)?);
        let d = *xl.dims().last().unwrap_or(&1);
        let (w, b) = self.params(p, d);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d * ROWS)
            .zip(x.par_chunks(d * ROWS))
            .for_each(|(ys, xs)| {
                for (yr, xr) in ys.chunks_mut(d).zip(xs.chunks(d)) {
                    self.forward(xr, w, b, yr);
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gp) = self.grads(x, params, grad)?;
        Ok((Some(gx), Some(gp)))
    }
}

impl RowNorm {
    /// The gradients of x and of the packed parameters for contiguous x.
    fn grads(
        &self,
        x: &Tensor,
        params: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let flat = x.apply_op3_no_bwd(params, &grad.contiguous()?, &RowNormGrad(*self))?;
        let n = x.elem_count();
        let gx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
        let gp = flat
            .narrow(0, n, params.elem_count())?
            .reshape(params.shape())?;
        Ok((gx, gp))
    }
}

/// (x, parameters, output gradient) → [gx; gw (; gb)], flat.
struct RowNormGrad(RowNorm);

impl CustomOp3 for RowNormGrad {
    fn name(&self) -> &'static str {
        "row-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, p, g) = (slice(xs, xl)?, slice(ps, pl)?, slice(gs, gl)?);
        let d = *xl.dims().last().unwrap_or(&1);
        let op = self.0;
        let (w, _) = op.params(p, d);
        let mut out = vec![0f32; x.len() + p.len()];
        let (gx, gp) = out.split_at_mut(x.len());
        // Each task's parameter gradients, summed in task order afterwards (a fixed order, so
        // training repeats exactly).
        let parts: Vec<Vec<f32>> = gx
            .par_chunks_mut(d * ROWS)
            .zip(x.par_chunks(d * ROWS))
            .zip(g.par_chunks(d * ROWS))
            .map(|((gxs, xs), gs)| {
                let mut part = vec![0f32; p.len()];
                let (gw, gb) = part.split_at_mut(d);
                let mut gb = (!op.rms).then_some(gb);
                for ((gxr, xr), gr) in gxs.chunks_mut(d).zip(xs.chunks(d)).zip(gs.chunks(d)) {
                    op.backward(xr, w, gr, gxr, (&mut *gw, gb.as_deref_mut()));
                }
                part
            })
            .collect();
        for part in parts {
            for (o, v) in gp.iter_mut().zip(part) {
                *o += v;
            }
        }
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

/// Vim's rotary embedding on tokens x (B, L, D) whose last n tokens are the patches, with
/// tables `cos`, `sin` (n, D): for each pair (2i, 2i + 1) of a patch token,
/// `y₂ᵢ = x₂ᵢ·cos₂ᵢ − x₂ᵢ₊₁·sin₂ᵢ`, `y₂ᵢ₊₁ = x₂ᵢ₊₁·cos₂ᵢ₊₁ + x₂ᵢ·sin₂ᵢ₊₁`; the leading
/// L − n tokens pass unchanged. Differentiable in x (the tables are constants). `None` where
/// the crate's kernels do not serve the tensors.
///
/// # Errors
/// Tables that do not fit x, or an odd D.
pub fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    kernels: Kernels,
) -> candle_core::Result<Option<Tensor>> {
    if !kernels.serve_all(&[x, cos, sin]) {
        return Ok(None);
    }
    let (_, l, d) = x.dims3()?;
    let n = cos.dim(0)?;
    if cos.dims() != [n, d] || sin.dims() != [n, d] || n > l || d % 2 != 0 {
        candle_core::bail!(
            "rope: x {:?}, cos {:?}, sin {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    let op = Rope {
        head: l - n,
        transpose: false,
    };
    Ok(Some(x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        op,
    )?))
}

/// The rotation, or (`transpose`) its transpose, which is its backward pass.
#[derive(Clone, Copy)]
struct Rope {
    head: usize,
    transpose: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, cos, sin) = (slice(xs, xl)?, slice(cs, cl)?, slice(ss, sl)?);
        let (_, l, d) = xl.shape().dims3()?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .enumerate()
            .for_each(|(row, (yr, xr))| {
                let t = row % l;
                if t < self.head {
                    yr.copy_from_slice(xr);
                    return;
                }
                let at = (t - self.head) * d;
                let (c, s) = (&cos[at..at + d], &sin[at..at + d]);
                for i in (0..d).step_by(2) {
                    let (a, b) = (xr[i], xr[i + 1]);
                    if self.transpose {
                        yr[i] = a * c[i] + b * s[i + 1];
                        yr[i + 1] = b * c[i + 1] - a * s[i];
                    } else {
                        yr[i] = a * c[i] - b * s[i];
                        yr[i + 1] = b * c[i + 1] + a * s[i + 1];
                    }
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = Rope {
            transpose: !self.transpose,
            ..*self
        };
        let gx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &back)?;
        Ok((Some(gx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_rel, owns_its_buffer, values, var};
    use candle_core::{Device, D};

    fn composed_layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let centred = x.broadcast_sub(&mean).unwrap();
        let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let y = centred
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap();
        y.broadcast_mul(w).unwrap().broadcast_add(b).unwrap()
    }

    fn composed_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        x.broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w)
            .unwrap()
    }

    fn composed_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let (b, l, d) = x.dims3().unwrap();
        let n = cos.dim(0).unwrap();
        let t = x.narrow(1, l - n, n).unwrap();
        let pairs = t.reshape((b, n, d / 2, 2)).unwrap();
        let x0 = pairs.narrow(3, 0, 1).unwrap();
        let x1 = pairs.narrow(3, 1, 1).unwrap();
        let rot = Tensor::cat(&[&x1.neg().unwrap(), &x0], 3)
            .unwrap()
            .reshape((b, n, d))
            .unwrap();
        let y = (t.broadcast_mul(cos).unwrap() + rot.broadcast_mul(sin).unwrap()).unwrap();
        Tensor::cat(&[&x.narrow(1, 0, l - n).unwrap(), &y], 1).unwrap()
    }

    /// Forward and every gradient of the ops against the composed forms, on rows that are
    /// not centred (an offset of 3) and of lengths that are not multiples of the vector width.
    #[test]
    fn the_norms_equal_the_composed_forms() {
        let dev = Device::Cpu;
        for (b, l, d) in [(2, 37, 64), (1, 5, 13), (3, 70, 192)] {
            let x = var(&[b, l, d], 1);
            let shifted = (x.as_tensor() + 3.0).unwrap();
            let (w, bias) = (var(&[d], 2), var(&[d], 3));
            let weights = Tensor::from_vec(values(b * l * d, 4), (b, l, d), &dev).unwrap();
            let check = |got: Tensor, want: Tensor, vars: &[&candle_core::Var], what: &str| {
                assert!(
                    max_rel(&got, &want) < 1e-5,
                    "{what} forward ({b}, {l}, {d})"
                );
                let loss = |t: &Tensor| (t * &weights).unwrap().sum_all().unwrap();
                let (gg, gw) = (
                    loss(&got).backward().unwrap(),
                    loss(&want).backward().unwrap(),
                );
                for (k, v) in vars.iter().enumerate() {
                    let err = max_rel(gg.get(v).unwrap(), gw.get(v).unwrap());
                    assert!(err < 1e-4, "{what} gradient {k} ({b}, {l}, {d}): {err}");
                }
            };
            let got = layer_norm(&shifted, &w, &bias, 1e-6, Kernels::Auto)
                .unwrap()
                .unwrap();
            let want = composed_layer_norm(&shifted, &w, &bias, 1e-6);
            check(got, want, &[&x, &w, &bias], "layer_norm");
            // The backward pass as a function, outside the graph.
            let want = composed_layer_norm(&shifted, &w, &bias, 1e-6);
            let e = (want * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g = layer_norm_vjp(&shifted, &w, &bias, 1e-6, &weights, Kernels::Auto)
                .unwrap()
                .unwrap();
            let gx = g.input.as_ref().unwrap();
            for (name, got, v) in [("x", gx, &x), ("w", &g.weight, &w), ("b", &g.bias, &bias)] {
                let err = max_rel(got, e.get(v).unwrap());
                assert!(err < 1e-4, "layer_norm_vjp d{name} ({b}, {l}, {d}): {err}");
                // The parameters' gradients (kept to the end of a backward pass) hold their own
                // values only.
                assert!(
                    name == "x" || owns_its_buffer(got),
                    "d{name} holds a larger buffer"
                );
            }
            let short = weights.narrow(1, 0, l - 1).unwrap();
            assert!(layer_norm_vjp(&shifted, &w, &bias, 1e-6, &short, Kernels::Auto).is_err());
            let got = rms_norm(&shifted, &w, 1e-5, Kernels::Auto)
                .unwrap()
                .unwrap();
            let want = composed_rms_norm(&shifted, &w, 1e-5);
            check(got, want, &[&x, &w], "rms_norm");
        }
    }

    /// Every row path this CPU has (AVX-512F, AVX2 + FMA, portable) gives the composed
    /// forms' forward and gradients.
    #[test]
    fn every_row_path_equals_the_composed_forms() {
        let dev = Device::Cpu;
        let (b, l, d) = (2, 21, 45);
        let x = var(&[b, l, d], 5);
        let shifted = (x.as_tensor() + 3.0).unwrap();
        let (w, bias) = (var(&[d], 6), var(&[d], 7));
        let weights = Tensor::from_vec(values(b * l * d, 8), (b, l, d), &dev).unwrap();
        let loss = |t: &Tensor| (t * &weights).unwrap().sum_all().unwrap();
        for rms in [false, true] {
            let want = if rms {
                composed_rms_norm(&shifted, &w, 1e-5)
            } else {
                composed_layer_norm(&shifted, &w, &bias, 1e-5)
            };
            let gw = loss(&want).backward().unwrap();
            let params: Vec<&Tensor> = if rms { vec![&w] } else { vec![&w, &bias] };
            for path in RowPath::available() {
                let op = RowNorm {
                    rms,
                    eps: 1e-5,
                    path,
                };
                let packed = Tensor::stack(&params, 0).unwrap();
                let got = shifted.apply_op2(&packed, op).unwrap();
                assert!(max_rel(&got, &want) < 1e-5, "forward rms {rms} {path:?}");
                let gg = loss(&got).backward().unwrap();
                for (k, v) in [&x, &w, &bias]
                    .into_iter()
                    .take(params.len() + 1)
                    .enumerate()
                {
                    let err = max_rel(gg.get(v).unwrap(), gw.get(v).unwrap());
                    assert!(err < 1e-4, "gradient {k}, rms {rms} {path:?}: {err}");
                }
            }
        }
    }

    #[test]
    fn rope_equals_the_composed_rotation() {
        let dev = Device::Cpu;
        for (b, l, n, d) in [(2, 17, 16, 8), (1, 9, 9, 6), (2, 26, 25, 192)] {
            let x = var(&[b, l, d], 5);
            let cos = Tensor::from_vec(values(n * d, 6), (n, d), &dev).unwrap();
            let sin = Tensor::from_vec(values(n * d, 7), (n, d), &dev).unwrap();
            let weights = Tensor::from_vec(values(b * l * d, 8), (b, l, d), &dev).unwrap();
            let got = rope(&x, &cos, &sin, Kernels::Auto).unwrap().unwrap();
            let want = composed_rope(&x, &cos, &sin);
            assert!(max_rel(&got, &want) < 1e-6, "forward ({b}, {l}, {n}, {d})");
            let loss = |t: &Tensor| (t * &weights).unwrap().sum_all().unwrap();
            let (gg, gw) = (
                loss(&got).backward().unwrap(),
                loss(&want).backward().unwrap(),
            );
            let err = max_rel(gg.get(&x).unwrap(), gw.get(&x).unwrap());
            assert!(err < 1e-6, "gradient ({b}, {l}, {n}, {d}): {err}");
        }
    }

    #[test]
    fn bad_shapes_are_errors_and_others_not_served() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3, 8), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::ones(8, candle_core::DType::F32, &dev).unwrap();
        let short = Tensor::ones(7, candle_core::DType::F32, &dev).unwrap();
        assert!(rms_norm(&x, &short, 1e-5, Kernels::Auto).is_err());
        assert!(layer_norm(&x, &w, &short, 1e-5, Kernels::Auto).is_err());
        assert!(rms_norm(&x, &w, 1e-5, Kernels::Candle).unwrap().is_none());
        let table = Tensor::ones((4, 8), candle_core::DType::F32, &dev).unwrap();
        assert!(rope(&x, &table, &table, Kernels::Auto).is_err());
        let x64 = x.to_dtype(candle_core::DType::F64).unwrap();
        assert!(rms_norm(&x64, &w, 1e-5, Kernels::Auto).unwrap().is_none());
    }
}

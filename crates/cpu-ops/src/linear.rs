//! A linear layer with bias, `y = x · Wᵀ + b`, as one op: the product writes onto rows that
//! already hold the bias (candle's CPU product, the `gemm` crate, with its destination read),
//! so no bias-free product is allocated and none is kept for the backward pass. Composed of
//! candle's ops, the product and the broadcast add are two nodes, and the graph keeps the
//! product's output (as the add's input) until the backward pass ends: in a SAM ViT-B block
//! that is the qkv, output-projection and second MLP products, five token-sized tensors.
//!
//! The backward pass: `dx = dy · W`, `dW = dyᵀ · x` in W's own (out, in) layout (candle's
//! matmul backward forms `(xᵀ·dy)ᵀ`, a transposed view that the gradient's accumulation
//! then copies element by element) and `db = Σ_rows dy` on all threads (candle's `sum(0)`
//! takes one column at a time on one thread).
//!
//! All three products run the `gemm` crate's kernels in one task per thread, each on a block
//! of the result's rows (`rows_product`).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use crate::storage::{row_sum, slice};
use crate::Kernels;

/// `x · weightᵀ + bias` for x (…, in), weight (out, in) and bias (out) → (…, out), as one op
/// for f32 CPU tensors served by `kernels`; `None` otherwise (the caller composes the layer).
///
/// The op takes x of any rank ≥ 2 as it is: reshapes to and from a matrix would be graph
/// nodes of their own, each a zero-filled gradient and an addition in the backward pass.
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    kernels: Kernels,
) -> candle_core::Result<Option<Tensor>> {
    apply(x, weight, bias, kernels, false)
}

/// `gelu(x · weightᵀ + bias)` with the exact (erf) GELU, as one op (see [`linear`]): the
/// product writes onto the bias rows and the GELU runs over them. The backward pass needs the
/// pre-activation, which the op keeps beside the graph (the graph keeps x); where none of the
/// three tensors is tracked (inference) there is no backward pass, and the GELU overwrites the
/// product in place.
pub fn linear_gelu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    kernels: Kernels,
) -> candle_core::Result<Option<Tensor>> {
    apply(x, weight, bias, kernels, true)
}

/// [`linear_gelu`] computed without a graph, for a backward pass written by hand
/// ([`linear_gelu_vjp`]): the pre-activation `x · weightᵀ + bias` and the output, its GELU.
/// `None` where the kernels do not serve the tensors.
///
/// # Errors
/// As [`linear`].
pub fn linear_gelu_parts(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    kernels: Kernels,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    if !served(x, weight, bias, kernels)? {
        return Ok(None);
    }
    let op = Linear { gelu: None };
    let pre = x
        .contiguous()?
        .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)?;
    let out = crate::gelu::gelu_values(&pre)?;
    Ok(Some((pre, out)))
}

/// [`linear`]'s backward as a function (see [`crate::LayerGrads`]): for x (…, in), weight
/// (out, in) and the output's gradient `dy` (x's leading dimensions, out), the gradients of x
/// (where `input`), of the weight in its own layout and of the bias.
///
/// # Errors
/// Shapes that do not fit.
pub fn linear_vjp(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    input: bool,
) -> candle_core::Result<crate::LayerGrads> {
    let (out, inp) = weight.dims2()?;
    let rows = x.elem_count() / inp.max(1);
    if x.dims().last() != Some(&inp) || dy.elem_count() != rows * out {
        candle_core::bail!(
            "linear_vjp: input {:?}, weight {:?}, gradient {:?} do not fit",
            x.dims(),
            weight.dims(),
            dy.dims()
        );
    }
    let dy = dy.contiguous()?.reshape((rows, out))?;
    let x2 = x.reshape((rows, inp))?;
    let (gx, gw) = match Kernels::Auto.serve_all(&[&dy, &x2, weight]) {
        true => {
            let w = weight.contiguous()?;
            let gx = input
                .then(|| dy.apply_op2_no_bwd(&w, &VjpProduct::Input))
                .transpose()?;
            let x2 = x2.contiguous()?;
            (gx, dy.apply_op2_no_bwd(&x2, &VjpProduct::Weight)?)
        }
        false => {
            let gx = input.then(|| dy.matmul(weight)).transpose()?;
            (gx, dy.t()?.matmul(&x2)?)
        }
    };
    Ok(crate::LayerGrads {
        input: gx.map(|g| g.reshape(x.dims())).transpose()?,
        weight: gw,
        bias: row_sum(&dy)?,
    })
}

/// [`linear_gelu`]'s backward as a function: [`linear_vjp`] of the gradient that the GELU
/// passes to its input, the pre-activation `pre` that [`linear_gelu_parts`] gave.
///
/// # Errors
/// Shapes that do not fit.
pub fn linear_gelu_vjp(
    x: &Tensor,
    weight: &Tensor,
    pre: &Tensor,
    dy: &Tensor,
    input: bool,
) -> candle_core::Result<crate::LayerGrads> {
    if pre.dims() != dy.dims() {
        candle_core::bail!(
            "linear_gelu_vjp: pre-activation {:?}, gradient {:?}",
            pre.dims(),
            dy.dims()
        );
    }
    linear_vjp(x, weight, &crate::gelu::gelu_grad(pre, dy)?, input)
}

/// Whether the kernels serve a linear layer's tensors; an error where their shapes do not fit.
fn served(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    kernels: Kernels,
) -> candle_core::Result<bool> {
    if !kernels.serve_all(&[x, weight, bias]) || x.rank() < 2 {
        return Ok(false);
    }
    let (out, inp) = weight.dims2()?;
    let last = x.dims()[x.rank() - 1];
    if last != inp || bias.dims() != [out] || out == 0 {
        candle_core::bail!(
            "linear: input {:?}, weight {:?}, bias {:?} do not fit (or no outputs)",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    Ok(true)
}

fn apply(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    kernels: Kernels,
    gelu: bool,
) -> candle_core::Result<Option<Tensor>> {
    if !served(x, weight, bias, kernels)? {
        return Ok(None);
    }
    let tracked = x.track_op() || weight.track_op() || bias.track_op();
    let op = Linear {
        gelu: gelu.then(|| GeluState {
            rows: crate::gelu::BiasGelu::new(),
            pre: tracked.then(Arc::default),
        }),
    };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
        .map(Some)
}

/// `x · weightᵀ + bias` on a (B, H, W, in) grid of tokens, written out in SAM's windows:
/// (B·nh·nw, ws, ws, out) with nh = ⌈H / ws⌉, nw = ⌈W / ws⌉, window-major, as if the grid had
/// been zero-padded to multiples of `ws` and cut into windows before the product. A padded
/// token's output is the bias alone, so the product runs on the grid's own tokens only and
/// the padding is filled with the bias; the graph keeps the unpadded input. f32 CPU tensors
/// served by `kernels`; `None` otherwise (the caller pads, partitions and multiplies).
pub fn linear_windows(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    ws: usize,
    kernels: Kernels,
) -> candle_core::Result<Option<Tensor>> {
    if !kernels.serve_all(&[x, weight, bias]) || x.rank() != 4 {
        return Ok(None);
    }
    let (_, _, _, inp) = x.dims4()?;
    let (out, w_in) = weight.dims2()?;
    if ws == 0 || w_in != inp || bias.dims() != [out] {
        candle_core::bail!(
            "linear_windows: input {:?}, weight {:?}, bias {:?}, window {ws} do not fit",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    x.contiguous()?
        .apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            LinearWindows { ws },
        )
        .map(Some)
}

/// [`linear_windows`]'s op.
struct LinearWindows {
    ws: usize,
}

impl CustomOp3 for LinearWindows {
    fn name(&self) -> &'static str {
        "linear-windows"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        wts: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (b, h, w, inp) = xl.shape().dims4()?;
        let (out, _) = wl.shape().dims2()?;
        let bias = slice(bs, bl)?;
        let rows = b * h * w;
        if !xl.is_contiguous() {
            candle_core::bail!("linear_windows: expected a contiguous input");
        }
        let flat = Layout::contiguous_with_offset((rows, inp), xl.start_offset());
        let (CpuStorage::F32(tokens), _) = Linear::product(xs, &flat, wts, wl, bias)? else {
            candle_core::bail!("linear_windows: the product is not f32");
        };
        let ws = self.ws;
        let (nh, nw) = (h.div_ceil(ws), w.div_ceil(ws));
        let windows = b * nh * nw;
        let len = windows * ws * ws * out;
        // Not zero-filled: the tasks below write every row, a token's or the bias.
        let mut y: Vec<f32> = Vec::with_capacity(len);
        let dst = crate::SendPtr::allocation(&mut y);
        (0..windows * ws).into_par_iter().for_each(|line| {
            // Row `ry` of window `win`: image row r of image bi, columns wx·ws ..
            let (win, ry) = (line / ws, line % ws);
            let (bi, wy, wx) = (win / (nh * nw), (win / nw) % nh, win % nw);
            let r = wy * ws + ry;
            for rx in 0..ws {
                let c = wx * ws + rx;
                let src = match r < h && c < w {
                    true => &tokens[((bi * h + r) * w + c) * out..][..out],
                    false => bias,
                };
                // SAFETY: y's allocation holds windows·ws² rows of `out` floats; row
                // line·ws + rx is written by this task alone.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), dst.at((line * ws + rx) * out), out)
                };
            }
        });
        // SAFETY: the tasks wrote all windows·ws² rows, every float of the `len`.
        unsafe { y.set_len(len) };
        Ok((CpuStorage::F32(y), Shape::from((windows, ws, ws, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = linear_windows_vjp(x, w, self.ws, grad, true)?;
        Ok((g.input, Some(g.weight), Some(g.bias)))
    }
}

/// [`linear_windows`]'s backward as a function (see [`crate::LayerGrads`]): for the grid x
/// (B, H, W, in), the weight and the gradient `dy` of the windowed output (B·nh·nw, ws, ws,
/// out), the gradients of x (where `input`), of the weight and of the bias (which every row
/// reaches, the padding's too).
///
/// # Errors
/// Shapes that do not fit.
pub fn linear_windows_vjp(
    x: &Tensor,
    weight: &Tensor,
    ws: usize,
    dy: &Tensor,
    input: bool,
) -> candle_core::Result<crate::LayerGrads> {
    let (b, h, wd, _) = x.dims4()?;
    let (out, _) = weight.dims2()?;
    let (nh, nw) = (h.div_ceil(ws.max(1)), wd.div_ceil(ws.max(1)));
    if ws == 0 || dy.dims() != [b * nh * nw, ws, ws, out] {
        candle_core::bail!(
            "linear_windows_vjp: grid {:?}, window {ws}, gradient {:?} do not fit",
            x.dims(),
            dy.dims()
        );
    }
    let dy = dy.contiguous()?;
    let gb = row_sum(&dy.reshape((dy.elem_count() / out.max(1), out))?)?;
    // The grid's own rows, in token order.
    let g = dy
        .reshape((b, nh, nw, ws, ws, out))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((b, nh * ws, nw * ws, out))?
        .narrow(1, 0, h)?
        .narrow(2, 0, wd)?
        .contiguous()?;
    let grads = linear_vjp(x, weight, &g, input)?;
    Ok(crate::LayerGrads { bias: gb, ..grads })
}

/// [`linear`]'s and [`linear_gelu`]'s op.
struct Linear {
    /// With the GELU: its rows, and the pre-activation the forward computed.
    gelu: Option<GeluState>,
}

/// The pre-activation a graph's linear-GELU op keeps for its backward pass (set by the forward).
type Kept = Arc<Mutex<Option<Arc<Vec<f32>>>>>;

struct GeluState {
    rows: crate::gelu::BiasGelu,
    /// Set by the forward; kept as long as the graph keeps the op (a second backward pass over
    /// the same graph reads it again). `None` where no backward pass follows: the GELU runs in
    /// place on the product.
    pre: Option<Kept>,
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        if self.gelu.is_some() {
            "linear-gelu"
        } else {
            "linear"
        }
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
        let (out, inp) = wl.shape().dims2()?;
        if !xl.is_contiguous() {
            candle_core::bail!("linear: expected a contiguous input");
        }
        let rows = xl.shape().elem_count() / inp.max(1);
        let flat = Layout::contiguous_with_offset((rows, inp), xl.start_offset());
        let (y, _) = Linear::product(xs, &flat, ws, wl, slice(bs, bl)?)?;
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("rank ≥ 2") = out;
        let Some(gelu) = &self.gelu else {
            return Ok((y, Shape::from(dims)));
        };
        let CpuStorage::F32(mut pre) = y else {
            candle_core::bail!("linear: the product is not f32");
        };
        let Some(keep) = &gelu.pre else {
            gelu.rows.in_place_rows(&mut pre, out);
            return Ok((CpuStorage::F32(pre), Shape::from(dims)));
        };
        let g = gelu.rows.forward_rows(&pre, &vec![0.0f32; out]);
        *keep.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(pre));
        Ok((CpuStorage::F32(g), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, inp) = w.dims2()?;
        let rows = x.elem_count() / inp.max(1);
        let mut grad = grad.contiguous()?.reshape((rows, out))?;
        if let Some(gelu) = &self.gelu {
            let Some(keep) = &gelu.pre else {
                candle_core::bail!("linear-gelu: backward pass of a forward that kept nothing");
            };
            let pre = keep.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let Some(pre) = pre else {
                candle_core::bail!("linear-gelu: backward pass before the forward ran");
            };
            grad = grad.apply_op1_no_bwd(&GeluGrad(gelu.rows, pre))?;
        }
        let g = linear_vjp(x, w, &grad, true)?;
        Ok((g.input, Some(g.weight), Some(g.bias)))
    }
}

/// The output gradient → the pre-activation's gradient, for the pre-activation it holds.
struct GeluGrad(crate::gelu::BiasGelu, Arc<Vec<f32>>);

impl candle_core::CustomOp1 for GeluGrad {
    fn name(&self) -> &'static str {
        "linear-gelu-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, z) = (slice(gs, gl)?, self.1.as_slice());
        let (_, n) = gl.shape().dims2()?;
        if g.len() != z.len() {
            candle_core::bail!(
                "linear-gelu backward: {} gradients for {} values",
                g.len(),
                z.len()
            );
        }
        let dz = self.0.backward_rows(z, &vec![0.0f32; n], g);
        Ok((CpuStorage::F32(dz), gl.shape().clone()))
    }
}

impl Linear {
    /// `x · Wᵀ + b` for contiguous x (rows, in) and w (out, in): the product written onto
    /// rows that hold the bias ([`rows_product`]).
    fn product(
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        b: &[f32],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, inp) = xl.shape().dims2()?;
        let (out, _) = wl.shape().dims2()?;
        let (x, w) = (slice(xs, xl)?, slice(ws, wl)?);
        if b.len() != out {
            candle_core::bail!("linear: a bias of {} for {out} outputs", b.len());
        }
        let (x, wt) = (Operand::rows(x, inp), Operand::columns(w, inp));
        let y = rows_product((rows, out, inp), x, wt, Some(b))?;
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }
}

/// An operand of [`rows_product`]: element (i, j) at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Operand<'a> {
    /// A row-major matrix with rows of `width` floats.
    fn rows(data: &'a [f32], width: usize) -> Self {
        Operand {
            data,
            rs: width,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with rows of `width` floats.
    fn columns(data: &'a [f32], width: usize) -> Self {
        Operand {
            data,
            rs: 1,
            cs: width,
        }
    }

    /// Whether an `r × c` matrix fits in `data`.
    fn holds(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// `C = A · B` (or `C = A · B + init`, every row of C a copy of the row `init` first) for A
/// (m × k) and B (k × n) → C (m × n, row-major), on the gemm crate's kernels: one task per
/// thread takes a block of C's rows and multiplies it single-threaded. The tasks fill and
/// pack their blocks at once; with the gemm crate's own threads its packing of the operands
/// and any fill of C ran on the calling thread while the others waited.
fn rows_product(
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    init: Option<&[f32]>,
) -> candle_core::Result<Vec<f32>> {
    use rayon::prelude::*;
    if !a.holds(m, k) || !b.holds(k, n) || init.is_some_and(|row| row.len() != n) {
        candle_core::bail!("linear: product operands do not hold {m} × {k} · {k} × {n}");
    }
    let block = m.div_ceil(rayon::current_num_threads()).max(1);
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    let dst = crate::SendPtr::allocation(&mut c);
    (0..m.div_ceil(block)).into_par_iter().for_each(|t| {
        let (r0, r1) = (t * block, ((t + 1) * block).min(m));
        // c's allocation holds m × n floats; rows r0..r1 are this task's alone. They are
        // written before they are read: with `init` or zeros here, or by the product, which
        // overwrites C where it does not read it.
        let read = match init {
            Some(row) => {
                for r in r0..r1 {
                    // SAFETY: row r lies in c's allocation and is this task's (above).
                    unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.at(r * n), n) };
                }
                true
            }
            None if k == 0 => {
                // SAFETY: as above; all-zero bytes are the float 0.
                unsafe { std::ptr::write_bytes(dst.at(r0 * n), 0, (r1 - r0) * n) };
                true
            }
            None => false,
        };
        if n == 0 || k == 0 {
            return;
        }
        // SAFETY: C's rows r0..r1 (row stride n) are this task's; A's rows r0..r1 and all of
        // B lie in their slices (`holds`, checked above). C := C·read + A·B on this thread.
        unsafe {
            gemm::gemm(
                r1 - r0,
                n,
                k,
                dst.at(r0 * n),
                1,
                n as isize,
                read,
                a.data.as_ptr().add(r0 * a.rs),
                a.cs as isize,
                a.rs as isize,
                b.data.as_ptr(),
                b.cs as isize,
                b.rs as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    // SAFETY: the tasks wrote every row: all m × n floats.
    unsafe { c.set_len(m * n) };
    Ok(c)
}

/// The products of [`linear_vjp`] on [`rows_product`]: `dy · W` (the input's gradient) or
/// `dyᵀ · x` (the weight's), for contiguous dy (rows, out), W (out, in) and x (rows, in).
enum VjpProduct {
    Input,
    Weight,
}

impl candle_core::CustomOp2 for VjpProduct {
    fn name(&self) -> &'static str {
        match self {
            VjpProduct::Input => "linear-input-grad",
            VjpProduct::Weight => "linear-weight-grad",
        }
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        os: &CpuStorage,
        ol: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, out) = gl.shape().dims2()?;
        let (lead, inp) = ol.shape().dims2()?;
        let (g, other) = (slice(gs, gl)?, slice(os, ol)?);
        let (mnk, a) = match self {
            VjpProduct::Input if lead == out => ((rows, inp, out), Operand::rows(g, out)),
            VjpProduct::Weight if lead == rows => ((out, inp, rows), Operand::columns(g, out)),
            _ => candle_core::bail!(
                "{}: gradient {:?} and operand {:?} do not fit",
                self.name(),
                gl.dims(),
                ol.dims()
            ),
        };
        let b = Operand::rows(other, inp);
        let c = rows_product(mnk, a, b, None)?;
        Ok((CpuStorage::F32(c), Shape::from((mnk.0, mnk.1))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::testing::{max_rel, var};

    /// The gradients of `Σ ours · r` and `Σ composed · r` agree in every one of `vars`.
    fn same_gradients(
        ours: &Tensor,
        composed: &Tensor,
        r: &Tensor,
        vars: [(&str, &Tensor); 3],
        what: &str,
    ) {
        let g_ours = (ours * r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_comp = (composed * r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in vars {
            let (a, e) = (g_ours.get(v).unwrap(), g_comp.get(v).unwrap());
            assert_eq!(a.dims(), e.dims(), "{what} {name}");
            assert!(max_rel(a, e) < 1e-5, "{what} {name}: {}", max_rel(a, e));
        }
    }

    /// Forward and the three gradients against candle's product and broadcast add, for a
    /// rank-3 input, a row count that is no multiple of any tile, one row, and more rows than
    /// one block of the bias gradient's sum.
    #[test]
    fn linear_matches_the_composed_layer_and_its_gradients() {
        for (dims, inp, out) in [
            (vec![2usize, 37, 24], 24usize, 50usize),
            (vec![1, 5], 5, 3),
            (vec![130, 64], 64, 192),
            (vec![2, 300, 40], 40, 70),
            // Rows that the threads' blocks split unevenly.
            (vec![7, 9], 9, 20),
        ] {
            let x = var(&dims, 1);
            let w = var(&[out, inp], 2);
            let b = var(&[out], 3);
            let mut odims = dims.clone();
            *odims.last_mut().unwrap() = out;
            let r = Tensor::randn(0f32, 1.0, odims.as_slice(), &Device::Cpu).unwrap();
            let ours = linear(&x, &w, &b, Kernels::Auto).unwrap().unwrap();
            let rows = x.elem_count() / inp;
            let composed = x
                .reshape((rows, inp))
                .unwrap()
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
                .reshape(odims.as_slice())
                .unwrap();
            assert_eq!(ours.dims(), composed.dims());
            assert!(max_rel(&ours, &composed) < 1e-6, "{dims:?}");
            // With the GELU, against candle's erf GELU; twice over one graph.
            let gelu = linear_gelu(&x, &w, &b, Kernels::Auto).unwrap().unwrap();
            let gelu_composed = composed.gelu_erf().unwrap();
            assert!(max_rel(&gelu, &gelu_composed) < 1e-5, "gelu {dims:?}");
            // Untracked (inference): the GELU in place on the product, the same values.
            let plain = |v: &candle_core::Var| v.as_tensor().detach();
            let untracked = linear_gelu(&plain(&x), &plain(&w), &plain(&b), Kernels::Auto)
                .unwrap()
                .unwrap();
            assert!(!untracked.track_op());
            assert!(
                max_rel(&untracked, &gelu_composed) < 1e-5,
                "untracked gelu {dims:?}"
            );
            for (what, ours, composed) in [
                ("", &ours, &composed),
                ("gelu", &gelu, &gelu_composed),
                ("gelu, second backward pass", &gelu, &gelu_composed),
            ] {
                let vars: [(&str, &Tensor); 3] = [("x", &x), ("weight", &w), ("bias", &b)];
                same_gradients(ours, composed, &r, vars, &format!("{what} {dims:?}"));
            }
        }
        // Not served: f64 and the candle choice; a bias of the wrong size is an error.
        let x = Tensor::zeros((2, 3), DType::F64, &Device::Cpu).unwrap();
        let w = Tensor::zeros((4, 3), DType::F64, &Device::Cpu).unwrap();
        let b = Tensor::zeros(4, DType::F64, &Device::Cpu).unwrap();
        assert!(linear(&x, &w, &b, Kernels::Auto).unwrap().is_none());
        let (x, w) = (var(&[2, 3], 4), var(&[4, 3], 5));
        assert!(linear(&x, &w, &var(&[4], 6), Kernels::Candle)
            .unwrap()
            .is_none());
        assert!(linear(&x, &w, &var(&[5], 6), Kernels::Auto).is_err());
        assert!(linear_gelu(&x, &w, &var(&[5], 6), Kernels::Auto).is_err());
        let none = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        let no_bias = Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap();
        assert!(linear_gelu(&x, &none, &no_bias, Kernels::Auto).is_err());
        assert!(linear_gelu(&x, &w, &var(&[4], 6), Kernels::Candle)
            .unwrap()
            .is_none());
    }

    /// The layer's backward passes as functions (for blocks whose backward pass is written
    /// by hand) against the gradients of the composed layers; the input's gradient only where
    /// asked for; shapes that do not fit are errors.
    #[test]
    fn the_vjp_functions_give_the_composed_gradients() {
        let (x, w, b) = (var(&[3, 29, 24], 31), var(&[40, 24], 32), var(&[40], 33));
        let composed = x
            .reshape((87, 24))
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
            .reshape((3, 29, 40))
            .unwrap();
        let r = Tensor::randn(0f32, 1.0, (3, 29, 40), &Device::Cpu).unwrap();
        let check = |g: &crate::LayerGrads, want: &Tensor, what: &str| {
            let e = want.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            let gx = g.input.as_ref().unwrap();
            for (name, got, v) in [
                ("x", gx, &x),
                ("weight", &g.weight, &w),
                ("bias", &g.bias, &b),
            ] {
                let want = e.get(v).unwrap();
                assert_eq!(got.dims(), want.dims(), "{what} {name}");
                assert!(
                    max_rel(got, want) < 1e-5,
                    "{what} {name}: {}",
                    max_rel(got, want)
                );
            }
        };
        check(&linear_vjp(&x, &w, &r, true).unwrap(), &composed, "linear");
        assert!(linear_vjp(&x, &w, &r, false).unwrap().input.is_none());
        let (pre, out) = linear_gelu_parts(&x, &w, &b, Kernels::Auto)
            .unwrap()
            .unwrap();
        let gelu = composed.gelu_erf().unwrap();
        assert!(max_rel(&pre, &composed) < 1e-6 && max_rel(&out, &gelu) < 1e-5);
        check(
            &linear_gelu_vjp(&x, &w, &pre, &r, true).unwrap(),
            &gelu,
            "gelu",
        );
        let short = r.narrow(1, 0, 28).unwrap();
        assert!(linear_vjp(&x, &w, &short, true).is_err());
        assert!(linear_gelu_vjp(&x, &w, &pre, &short, true).is_err());
        assert!(linear_gelu_parts(&x, &w, &b, Kernels::Candle)
            .unwrap()
            .is_none());
        // Windows: see the next test; a gradient of another shape is refused.
        let (g, wt) = (var(&[2, 5, 7, 6], 34), var(&[10, 6], 35));
        let dy = Tensor::zeros((6, 3, 3, 10), DType::F32, &Device::Cpu).unwrap();
        assert!(linear_windows_vjp(&g, &wt, 2, &dy, true).is_err());
    }

    /// The windowed product and its three gradients against padding, partitioning and the
    /// composed product, for grids that need padding on both axes, on one, and on none.
    #[test]
    fn linear_windows_matches_padding_partitioning_and_the_product() {
        for ((b, h, w), ws, inp, out) in [
            ((2usize, 5usize, 7usize), 3usize, 6usize, 10usize),
            ((1, 6, 4), 3, 5, 4),
            ((1, 4, 4), 2, 3, 17),
        ] {
            let x = var(&[b, h, w, inp], 11);
            let wt = var(&[out, inp], 12);
            let bias = var(&[out], 13);
            let (nh, nw) = (h.div_ceil(ws), w.div_ceil(ws));
            let ours = linear_windows(&x, &wt, &bias, ws, Kernels::Auto)
                .unwrap()
                .unwrap();
            let composed = x
                .pad_with_zeros(1, 0, nh * ws - h)
                .unwrap()
                .pad_with_zeros(2, 0, nw * ws - w)
                .unwrap()
                .reshape((b, nh, ws, nw, ws, inp))
                .unwrap()
                .permute((0, 1, 3, 2, 4, 5))
                .unwrap()
                .reshape((b * nh * nw * ws * ws, inp))
                .unwrap()
                .matmul(&wt.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap()
                .reshape((b * nh * nw, ws, ws, out))
                .unwrap();
            assert_eq!(ours.dims(), composed.dims());
            assert!(max_rel(&ours, &composed) < 1e-6, "{h}×{w}");
            let r = Tensor::randn(0f32, 1.0, ours.dims(), &Device::Cpu).unwrap();
            let what = format!("{h}×{w}");
            same_gradients(
                &ours,
                &composed,
                &r,
                [("x", &x), ("weight", &wt), ("bias", &bias)],
                &what,
            );
            // The backward pass as a function, against the composed form's gradients.
            let e = composed
                .mul(&r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let got = linear_windows_vjp(&x, &wt, ws, &r, true).unwrap();
            for (name, got, v) in [
                ("x", got.input.as_ref().unwrap(), &x),
                ("weight", &got.weight, &wt),
                ("bias", &got.bias, &bias),
            ] {
                let err = max_rel(got, e.get(v).unwrap());
                assert!(err < 1e-5, "vjp {what} {name}: {err}");
            }
        }
        let x = var(&[1, 2, 2, 3], 4);
        let (wt, bias) = (var(&[4, 3], 5), var(&[4], 6));
        assert!(linear_windows(&x, &wt, &bias, 2, Kernels::Candle)
            .unwrap()
            .is_none());
        assert!(linear_windows(&x, &wt, &var(&[5], 6), 2, Kernels::Auto).is_err());
        assert!(linear_windows(&x, &wt, &bias, 0, Kernels::Auto).is_err());
    }
}

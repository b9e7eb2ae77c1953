//! A linear layer with bias, `y = x · Wᵀ + b`, as one op: the product writes onto rows that
//! already hold the bias (candle's CPU product, the `gemm` crate, with its destination read),
//! so no bias-free product is allocated and none is kept for the backward pass. Composed of
//! candle's ops, the product and the broadcast add are two nodes, and the graph keeps the
//! product's output (as the add's input) until the backward pass ends: in a SAM ViT-B block
//! that is the qkv, output-projection and second MLP products, five token-sized tensors.
//!
//! The backward pass is candle's: `dx = dy · W`, `dW = (xᵀ · dy)ᵀ`, `db = Σ_rows dy`.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use crate::storage::slice;
use crate::Kernels;

/// `x · weightᵀ + bias` for x (…, in), weight (out, in) and bias (out) → (…, out), as one op
/// for f32 CPU tensors served by `kernels`; `None` otherwise (the caller composes the layer).
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    kernels: Kernels,
) -> candle_core::Result<Option<Tensor>> {
    if !kernels.serve_all(&[x, weight, bias]) || x.rank() < 2 {
        return Ok(None);
    }
    let (out, inp) = weight.dims2()?;
    let dims = x.dims().to_vec();
    let last = dims[dims.len() - 1];
    if last != inp || bias.dims() != [out] {
        candle_core::bail!(
            "linear: input {:?}, weight {:?}, bias {:?} do not fit",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    let rows = x.elem_count() / inp.max(1);
    // A reshape of a matrix would add a graph node (and a gradient copy) for nothing.
    let x2 = if x.rank() == 2 {
        x.contiguous()?
    } else {
        x.reshape((rows, inp))?.contiguous()?
    };
    let y = x2.apply_op3(&weight.contiguous()?, &bias.contiguous()?, Linear)?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank ≥ 2") = out;
    Ok(Some(y.reshape(out_dims)?))
}

struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
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
        let (rows, inp) = xl.shape().dims2()?;
        let (out, _) = wl.shape().dims2()?;
        let (x, w, b) = (slice(xs, xl)?, slice(ws, wl)?, slice(bs, bl)?);
        let mut y = Vec::with_capacity(rows * out);
        for _ in 0..rows {
            y.extend_from_slice(b);
        }
        if rows > 0 && inp > 0 && out > 0 {
            let threads = rayon::current_num_threads();
            let parallelism = if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: y holds rows × out floats (row stride out), x rows × inp (row stride
            // inp) and w out × inp (row stride inp), all contiguous (`slice` checked x and w);
            // element (p, j) of the right operand Wᵀ is w[j·inp + p]. y := 1·y + 1·x·Wᵀ.
            unsafe {
                gemm::gemm(
                    rows,
                    out,
                    inp,
                    y.as_mut_ptr(),
                    1,
                    out as isize,
                    true,
                    x.as_ptr(),
                    1,
                    inp as isize,
                    w.as_ptr(),
                    inp as isize,
                    1,
                    1.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gx = grad.matmul(w)?;
        // The weight gradient as candle's matmul backward forms it, (xᵀ·dy)ᵀ.
        let gw = x.t()?.matmul(grad)?.t()?;
        let gb = grad.sum(0)?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::testing::{max_rel, var};

    /// Forward and the three gradients against candle's product and broadcast add, for a
    /// rank-3 input, a row count that is no multiple of any tile, and one row.
    #[test]
    fn linear_matches_the_composed_layer_and_its_gradients() {
        for (dims, inp, out) in [
            (vec![2usize, 37, 24], 24usize, 50usize),
            (vec![1, 5], 5, 3),
            (vec![130, 64], 64, 192),
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
            let g_ours = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g_comp = (&composed * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
                let (a, e) = (g_ours.get(v).unwrap(), g_comp.get(v).unwrap());
                assert_eq!(a.dims(), e.dims(), "{name}");
                assert!(max_rel(a, e) < 1e-5, "{dims:?} {name}: {}", max_rel(a, e));
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
    }
}

//! 2×2 max pooling with stride 2 as one op: one pass forward, and a backward that sends each
//! window's gradient to its maximum, found again from the input (the graph keeps only the
//! input). Composed of candle's ops it is a reshape and two max reductions, whose backward
//! compares the broadcast maxima with the input and multiplies, several passes at full size.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::storage::slice;
use crate::Kernels;

/// 2×2 / stride 2 max pooling of x (B, C, H, W) with even H and W, differentiable: the gradient
/// of each window goes to its first maximum in row-major order, as PyTorch's `max_pool2d`
/// does (a NaN counts as the maximum). `None` where the crate's kernels do not serve x or a
/// side is odd.
pub fn max_pool2x2(x: &Tensor, kernels: Kernels) -> candle_core::Result<Option<Tensor>> {
    if !kernels.serve(x) {
        return Ok(None);
    }
    let (_, _, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(MaxPool)?))
}

struct MaxPool;

/// The offset (0..4: row-major in the window) of the first maximum of a window.
#[inline(always)]
fn argmax(v: [f32; 4]) -> usize {
    let mut best = 0;
    for k in 1..4 {
        if v[k] > v[best] || (v[k].is_nan() && !v[best].is_nan()) {
            best = k;
        }
    }
    best
}

/// The larger of a and b, NaN if either is (branch-free, so the row loop vectorises); equal
/// to the value [`argmax`] picks.
#[inline(always)]
fn nan_max(a: f32, b: f32) -> f32 {
    if a > b || a.is_nan() {
        a
    } else {
        b
    }
}

/// The four values of output pixel (i, j)'s window in a plane of width w.
#[inline(always)]
fn window(plane: &[f32], w: usize, i: usize, j: usize) -> [f32; 4] {
    let (a, b) = (2 * i * w + 2 * j, (2 * i + 1) * w + 2 * j);
    [plane[a], plane[a + 1], plane[b], plane[b + 1]]
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool-2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let x = slice(s, l)?;
        let (oh, ow) = (h / 2, w / 2);
        let mut y = vec![0f32; b * c * oh * ow];
        y.par_chunks_mut((oh * ow).max(1))
            .zip(x.par_chunks((h * w).max(1)))
            .for_each(|(out, plane)| {
                for (i, row) in out.chunks_mut(ow.max(1)).enumerate() {
                    let r0 = &plane[2 * i * w..(2 * i + 1) * w];
                    let r1 = &plane[(2 * i + 1) * w..(2 * i + 2) * w];
                    for (j, o) in row.iter_mut().enumerate() {
                        let top = nan_max(r0[2 * j], r0[2 * j + 1]);
                        *o = nan_max(top, nan_max(r1[2 * j], r1[2 * j + 1]));
                    }
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((b, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &MaxPoolGrad)?))
    }
}

/// (x, output gradient) → the input gradient.
struct MaxPoolGrad;

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "max-pool-2x2-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, _, h, w) = xl.shape().dims4()?;
        let (x, g) = (slice(xs, xl)?, slice(gs, gl)?);
        let (oh, ow) = (h / 2, w / 2);
        let mut gx = vec![0f32; x.len()];
        gx.par_chunks_mut((h * w).max(1))
            .zip(x.par_chunks((h * w).max(1)))
            .zip(g.par_chunks((oh * ow).max(1)))
            .for_each(|((out, plane), gp)| {
                for i in 0..oh {
                    for j in 0..ow {
                        let k = argmax(window(plane, w, i, j));
                        out[(2 * i + k / 2) * w + 2 * j + k % 2] = gp[i * ow + j];
                    }
                }
            });
        Ok((CpuStorage::F32(gx), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_rel, values, var};
    use candle_core::Device;

    /// Against candle's reshape and max reductions, on inputs without ties (where both send
    /// each window's gradient to the same place).
    #[test]
    fn equals_the_composed_pooling() {
        for (b, c, h, w) in [(2, 3, 8, 6), (1, 1, 2, 2), (1, 4, 16, 34)] {
            let x = var(&[b, c, h, w], 1);
            let weights = Tensor::from_vec(
                values(b * c * h * w / 4, 2),
                (b, c, h / 2, w / 2),
                &Device::Cpu,
            )
            .unwrap();
            let got = max_pool2x2(&x, Kernels::Auto).unwrap().unwrap();
            let want = x
                .reshape((b, c, h / 2, 2, w / 2, 2))
                .unwrap()
                .max(5)
                .unwrap()
                .max(3)
                .unwrap();
            assert_eq!(max_rel(&got, &want), 0.0);
            let loss = |t: &Tensor| (t * &weights).unwrap().sum_all().unwrap();
            let (gg, gw) = (
                loss(&got).backward().unwrap(),
                loss(&want).backward().unwrap(),
            );
            assert_eq!(max_rel(gg.get(&x).unwrap(), gw.get(&x).unwrap()), 0.0);
        }
    }

    /// Ties send the gradient to the first maximum only; a NaN is the maximum; odd sides and
    /// other dtypes are not served.
    #[test]
    fn ties_nan_and_unserved_inputs() {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(
            &Tensor::from_vec(vec![1f32, 1.0, 0.0, 1.0], (1, 1, 2, 2), &dev).unwrap(),
        )
        .unwrap();
        let y = max_pool2x2(&x, Kernels::Auto).unwrap().unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx: Vec<f32> = g.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(gx, vec![1.0, 0.0, 0.0, 0.0]);
        assert_eq!(argmax([0.0, f32::NAN, 5.0, 1.0]), 1);
        let odd = Tensor::zeros((1, 1, 3, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(max_pool2x2(&odd, Kernels::Auto).unwrap().is_none());
        let f64x = Tensor::zeros((1, 1, 2, 2), candle_core::DType::F64, &dev).unwrap();
        assert!(max_pool2x2(&f64x, Kernels::Auto).unwrap().is_none());
        assert!(max_pool2x2(x.as_tensor(), Kernels::Candle)
            .unwrap()
            .is_none());
    }
}

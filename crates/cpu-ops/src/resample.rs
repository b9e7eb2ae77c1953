//! Bilinear resampling (PyTorch's `interpolate(mode="bilinear", align_corners=False)`) as a
//! two-tap stencil on the CPU, forward and gradient, as a candle op. Written as two dense
//! matrix products ([`bilinear_matrix`]), an ×2 upsampling of a C × H × W map costs
//! 12·C·H³ flops, nearly all of them on zeros; the UNet's four upsamplers spent about a tenth
//! of its arithmetic there. Here each output value reads two values of a row and two rows.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::Kernels;
use rayon::prelude::*;

/// The two source indices and their weights of every output index along one axis.
#[derive(Debug, Clone)]
struct Taps {
    first: Vec<usize>,
    second: Vec<usize>,
    w_first: Vec<f32>,
    w_second: Vec<f32>,
}

/// `(i0, i1, l1)` for each of `out` outputs resampling `inp` inputs: the output reads
/// `(1 − l1)·x[i0] + l1·x[i1]` (PyTorch's source index `(o + ½)·inp/out − ½`, clamped at 0).
fn bilinear_taps(inp: usize, out: usize) -> Vec<(usize, usize, f64)> {
    let scale = inp as f64 / out as f64;
    (0..out)
        .map(|i| {
            let src = (scale * (i as f64 + 0.5) - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(inp - 1);
            let i1 = if i0 + 1 < inp { i0 + 1 } else { i0 };
            (i0, i1, src - i0 as f64)
        })
        .collect()
}

impl Taps {
    fn new(inp: usize, out: usize) -> Taps {
        let t = bilinear_taps(inp, out);
        Taps {
            first: t.iter().map(|t| t.0).collect(),
            second: t.iter().map(|t| t.1).collect(),
            w_first: t.iter().map(|t| (1.0 - t.2) as f32).collect(),
            w_second: t.iter().map(|t| t.2 as f32).collect(),
        }
    }
}

/// `dst = a·u + b·v`.
fn blend(dst: &mut [f32], u: &[f32], a: f32, v: &[f32], b: f32) {
    for ((d, &u), &v) in dst.iter_mut().zip(u).zip(v) {
        *d = a * u + b * v;
    }
}

/// `dst += a·u`.
fn axpy(dst: &mut [f32], u: &[f32], a: f32) {
    for (d, &u) in dst.iter_mut().zip(u) {
        *d += a * u;
    }
}

/// One plane (h × w) resampled to (taps_h.len() × taps_w.len()): along rows into `tmp`
/// (h × out_w), then two rows of `tmp` per output row.
fn forward_plane(x: &[f32], w: usize, th: &Taps, tw: &Taps, tmp: &mut Vec<f32>, y: &mut [f32]) {
    let ow = tw.first.len();
    tmp.resize(x.len() / w * ow, 0.0);
    for (src, row) in x.chunks_exact(w).zip(tmp.chunks_exact_mut(ow)) {
        for (j, d) in row.iter_mut().enumerate() {
            *d = tw.w_first[j] * src[tw.first[j]] + tw.w_second[j] * src[tw.second[j]];
        }
    }
    for (i, out) in y.chunks_exact_mut(ow).enumerate() {
        let (a, b) = (th.first[i], th.second[i]);
        blend(
            out,
            &tmp[a * ow..(a + 1) * ow],
            th.w_first[i],
            &tmp[b * ow..(b + 1) * ow],
            th.w_second[i],
        );
    }
}

/// The transpose of [`forward_plane`]: the gradient `g` (out_h × out_w) of one plane spread
/// back onto its h × w inputs.
fn backward_plane(g: &[f32], w: usize, th: &Taps, tw: &Taps, tmp: &mut Vec<f32>, gx: &mut [f32]) {
    let ow = tw.first.len();
    let h = gx.len() / w;
    tmp.clear();
    tmp.resize(h * ow, 0.0);
    for (i, src) in g.chunks_exact(ow).enumerate() {
        let (a, b) = (th.first[i], th.second[i]);
        axpy(&mut tmp[a * ow..(a + 1) * ow], src, th.w_first[i]);
        axpy(&mut tmp[b * ow..(b + 1) * ow], src, th.w_second[i]);
    }
    for (row, out) in tmp.chunks_exact(ow).zip(gx.chunks_exact_mut(w)) {
        out.fill(0.0);
        for (j, &v) in row.iter().enumerate() {
            out[tw.first[j]] += tw.w_first[j] * v;
            out[tw.second[j]] += tw.w_second[j] * v;
        }
    }
}

/// Bilinear resize of (B, C, H, W) to (B, C, out_h, out_w).
struct Resize {
    out: (usize, usize),
}

impl CustomOp1 for Resize {
    fn name(&self) -> &'static str {
        "bilinear-resize"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let (oh, ow) = self.out;
        let x = crate::storage::slice(s, l)?;
        let (th, tw) = (Taps::new(h, oh), Taps::new(w, ow));
        let mut y = vec![0.0f32; b * c * oh * ow];
        y.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each_init(Vec::new, |tmp, (y, x)| {
                forward_plane(x, w, &th, &tw, tmp, y)
            });
        Ok((CpuStorage::F32(y), Shape::from((b, c, oh, ow))))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let g = grad
            .contiguous()?
            .apply_op1_no_bwd(&ResizeGrad { inp: (h, w) })?;
        Ok(Some(g))
    }
}

/// The gradient of [`Resize`]: (B, C, out_h, out_w) back to (B, C, H, W).
struct ResizeGrad {
    inp: (usize, usize),
}

impl CustomOp1 for ResizeGrad {
    fn name(&self) -> &'static str {
        "bilinear-resize-grad"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, oh, ow) = l.shape().dims4()?;
        let (h, w) = self.inp;
        let g = crate::storage::slice(s, l)?;
        let (th, tw) = (Taps::new(h, oh), Taps::new(w, ow));
        let mut gx = vec![0.0f32; b * c * h * w];
        gx.par_chunks_mut(h * w)
            .zip(g.par_chunks(oh * ow))
            .for_each_init(Vec::new, |tmp, (gx, g)| {
                backward_plane(g, w, &th, &tw, tmp, gx)
            });
        Ok((CpuStorage::F32(gx), Shape::from((b, c, h, w))))
    }
}

/// The resampling matrix (out × in) of PyTorch's bilinear `interpolate` along one axis with
/// `align_corners=False`; with `antialias` the triangle filter widens for downscaling as in
/// PyTorch's antialiased kernel (for upscaling both are the same).
pub fn bilinear_matrix(inp: usize, out: usize, antialias: bool) -> Vec<f32> {
    let mut m = vec![0.0f64; out * inp];
    let scale = inp as f64 / out as f64;
    if antialias && scale > 1.0 {
        let support = scale;
        for i in 0..out {
            let center = scale * (i as f64 + 0.5);
            let xmin = ((center - support + 0.5).floor().max(0.0)) as usize;
            let xmax = ((center + support + 0.5).floor() as usize).min(inp);
            let mut total = 0.0;
            for j in xmin..xmax {
                let wgt = (1.0 - ((j as f64 - center + 0.5) / scale).abs()).max(0.0);
                m[i * inp + j] = wgt;
                total += wgt;
            }
            if total > 0.0 {
                for j in xmin..xmax {
                    m[i * inp + j] /= total;
                }
            }
        }
    } else {
        for (i, (i0, i1, l1)) in bilinear_taps(inp, out).into_iter().enumerate() {
            m[i * inp + i0] += 1.0 - l1;
            m[i * inp + i1] += l1;
        }
    }
    m.into_iter().map(|v| v as f32).collect()
}

/// Bilinear resize of (B, C, H, W) to (B, C, out_h, out_w), differentiable (unlike candle's
/// `upsample_bilinear2d`), as PyTorch's `interpolate(mode="bilinear", align_corners=False,
/// antialias=…)`: a two-tap stencil op for f32 on the CPU where no antialiasing filter applies,
/// two matrix products of [`bilinear_matrix`] otherwise.
pub fn resize_bilinear(
    x: &Tensor,
    out_h: usize,
    out_w: usize,
    antialias: bool,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let widens = antialias && (out_h < h || out_w < w);
    if !widens && kernels.serve(x) {
        return x.contiguous()?.apply_op1(Resize {
            out: (out_h, out_w),
        });
    }
    let dev = x.device();
    let rw = Tensor::from_vec(bilinear_matrix(w, out_w, antialias), (out_w, w), dev)?
        .to_dtype(x.dtype())?;
    let rh = Tensor::from_vec(bilinear_matrix(h, out_h, antialias), (out_h, h), dev)?
        .to_dtype(x.dtype())?;
    let y = x.broadcast_matmul(&rw.t()?)?;
    rh.broadcast_matmul(&y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_rel;
    use candle_core::{Device, Var};

    /// The stencil against the two dense products of `bilinear_matrix`, output and input
    /// gradient, for upscaling ×2 (the UNet's sampler), odd factors, and downscaling.
    #[test]
    fn the_stencil_matches_the_matrix_form() {
        let dev = Device::Cpu;
        for (b, c, h, w, oh, ow) in [
            (2, 3, 8, 8, 16, 16),
            (1, 2, 5, 7, 10, 14),
            (1, 1, 1, 1, 3, 2),
            (2, 2, 9, 6, 4, 13),
            (1, 4, 16, 12, 7, 5),
        ] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev).unwrap()).unwrap();
            let g = Tensor::randn(0f32, 1.0, (b, c, oh, ow), &dev).unwrap();
            let ours = resize_bilinear(x.as_tensor(), oh, ow, false, Kernels::Auto).unwrap();
            let rw = Tensor::from_vec(bilinear_matrix(w, ow, false), (ow, w), &dev).unwrap();
            let rh = Tensor::from_vec(bilinear_matrix(h, oh, false), (oh, h), &dev).unwrap();
            let theirs = rh
                .broadcast_matmul(&x.as_tensor().broadcast_matmul(&rw.t().unwrap()).unwrap())
                .unwrap();
            assert!(max_rel(&ours, &theirs) < 1e-6, "forward {b}×{c}×{h}×{w}");
            let g_ours = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let g_theirs = (theirs * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (a, t) = (
                g_ours.get(x.as_tensor()).unwrap(),
                g_theirs.get(x.as_tensor()).unwrap(),
            );
            assert!(max_rel(a, t) < 1e-5, "gradient {b}×{c}×{h}×{w} → {oh}×{ow}");
        }
    }

    /// ×2 upsampling has PyTorch's known values: edges copied, interior ¼ / ¾ blends.
    #[test]
    fn doubling_a_row_gives_quarter_blends() {
        let x = Tensor::from_vec(vec![0f32, 4.0, 8.0], (1, 1, 1, 3), &Device::Cpu).unwrap();
        let y = resize_bilinear(&x, 1, 6, false, Kernels::Auto)
            .unwrap()
            .flatten_all()
            .unwrap();
        assert_eq!(
            y.to_vec1::<f32>().unwrap(),
            vec![0.0, 1.0, 3.0, 5.0, 7.0, 8.0]
        );
    }
}

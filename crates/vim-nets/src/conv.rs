//! A 3×3, stride 1, padding 1 convolution for f32 on the CPU as im2col + gemm, forward and
//! both gradients, as a candle op. candle 0.11's own conv2d reaches a small fraction of its
//! matmul speed on these shapes and computes the input gradient with a direct-loop transposed
//! convolution; here every product is one gemm over a band of image rows.
//!
//! The input gradient of a 3×3 / stride 1 / pad 1 convolution is the same convolution of the
//! output gradient with the kernel flipped in space and transposed in channels, so one forward
//! kernel serves both directions; the weight gradient is `grad_out · colsᵀ`.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Floats per im2col band (C·9 × rows·W): 16 MB keeps a band in cache-friendly reach.
const BAND_FLOATS: usize = 4 << 20;

/// Rows per band for `c` channels of width `w`.
fn band_rows(c: usize, h: usize, w: usize) -> usize {
    (BAND_FLOATS / (c * 9 * w).max(1)).clamp(1, h)
}

/// im2col of image rows `[y0, y1)`: `cols[(ci·9 + ky·3 + kx), j]` = x[ci, y + ky − 1, x + kx − 1]
/// (zero outside) for pixel j = (y − y0)·W + x.
fn im2col(x: &[f32], c: usize, h: usize, w: usize, y0: usize, y1: usize, cols: &mut [f32]) {
    let n = (y1 - y0) * w;
    cols[..c * 9 * n]
        .chunks_mut(n)
        .enumerate()
        .for_each(|(r, row)| {
            let (ci, k) = (r / 9, r % 9);
            let (ky, kx) = (k / 3, k % 3);
            let plane = &x[ci * h * w..(ci + 1) * h * w];
            for y in y0..y1 {
                let dst = &mut row[(y - y0) * w..(y - y0 + 1) * w];
                let sy = y as isize + ky as isize - 1;
                if sy < 0 || sy >= h as isize {
                    dst.fill(0.0);
                    continue;
                }
                let src = &plane[sy as usize * w..(sy as usize + 1) * w];
                match kx {
                    0 => {
                        dst[0] = 0.0;
                        dst[1..].copy_from_slice(&src[..w - 1]);
                    }
                    1 => dst.copy_from_slice(src),
                    _ => {
                        dst[..w - 1].copy_from_slice(&src[1..]);
                        dst[w - 1] = 0.0;
                    }
                }
            }
        });
}

/// Bands of image rows, in parallel: each thread fills its own im2col buffer and runs a
/// single-threaded gemm (splitting one gemm over threads along the small O axis scales badly).
fn bands(h: usize, rows: usize, b: usize) -> Vec<(usize, usize)> {
    (0..b)
        .flat_map(|bi| (0..h).step_by(rows).map(move |y0| (bi, y0)))
        .collect()
}

/// y (B, O, H, W) = conv3x3(x (B, C, H, W), w (O, C, 3, 3)), no bias.
pub fn forward_cpu(
    x: &[f32],
    w: &[f32],
    b: usize,
    c: usize,
    h: usize,
    wd: usize,
    o: usize,
) -> Vec<f32> {
    let hw = h * wd;
    let mut y = vec![0.0f32; b * o * hw];
    let rows = band_rows(c, h, wd).min(h.div_ceil(rayon::current_num_threads().max(1)).max(1));
    let y_ptr = y.as_mut_ptr() as usize;
    bands(h, rows, b).into_par_iter().for_each_init(
        || vec![0.0f32; c * 9 * rows * wd],
        |cols, (bi, y0)| {
            let y1 = (y0 + rows).min(h);
            let n = (y1 - y0) * wd;
            im2col(&x[bi * c * hw..(bi + 1) * c * hw], c, h, wd, y0, y1, cols);
            // SAFETY: each band writes the O rows of image bi at pixels [y0·W, y1·W) only, so
            // bands never overlap; `y` outlives the parallel loop. lhs is the O × C·9 weight
            // matrix, rhs the C·9 × n band; neither aliases dst.
            unsafe {
                gemm(
                    o,
                    n,
                    c * 9,
                    (y_ptr as *mut f32).add(bi * o * hw + y0 * wd),
                    1,
                    hw as isize,
                    false,
                    w.as_ptr(),
                    1,
                    (c * 9) as isize,
                    cols.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        },
    );
    y
}

/// grad_w (O, C, 3, 3) = Σ_b grad_y_b (O, HW) · cols_bᵀ (HW, C·9).
pub fn weight_grad_cpu(
    x: &[f32],
    gy: &[f32],
    b: usize,
    c: usize,
    h: usize,
    wd: usize,
    o: usize,
) -> Vec<f32> {
    let hw = h * wd;
    let k = c * 9;
    let rows = band_rows(c, h, wd).min(h.div_ceil(rayon::current_num_threads().max(1)).max(1));
    bands(h, rows, b)
        .into_par_iter()
        .fold(
            || (vec![0.0f32; o * k], vec![0.0f32; k * rows * wd]),
            |(mut gw, mut cols), (bi, y0)| {
                let y1 = (y0 + rows).min(h);
                let n = (y1 - y0) * wd;
                im2col(
                    &x[bi * c * hw..(bi + 1) * c * hw],
                    c,
                    h,
                    wd,
                    y0,
                    y1,
                    &mut cols,
                );
                let gb = &gy[bi * o * hw..(bi + 1) * o * hw];
                // SAFETY: dst is this fold's own O × C·9 buffer; lhs reads O rows of stride hw
                // from pixel y0·W, n columns each, inside `gb`; rhs reads the band transposed
                // (n × C·9, column stride n). Accumulates (read_dst) across bands.
                unsafe {
                    gemm(
                        o,
                        k,
                        n,
                        gw.as_mut_ptr(),
                        1,
                        k as isize,
                        true,
                        gb.as_ptr().add(y0 * wd),
                        1,
                        hw as isize,
                        cols.as_ptr(),
                        n as isize,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                (gw, cols)
            },
        )
        .map(|(gw, _)| gw)
        .reduce(
            || vec![0.0f32; o * k],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

fn dims(l1: &Layout, l2: &Layout) -> candle_core::Result<(usize, usize, usize, usize, usize)> {
    let (b, c, h, w) = l1.shape().dims4()?;
    let (o, c2, kh, kw) = l2.shape().dims4()?;
    if c2 != c || kh != 3 || kw != 3 {
        candle_core::bail!(
            "conv3x3: kernel {:?} does not fit input {:?}",
            l2.shape(),
            l1.shape()
        );
    }
    Ok((b, c, h, w, o))
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("conv3x3: expected a contiguous f32 tensor"),
    }
}

struct Conv3x3;

impl CustomOp2 for Conv3x3 {
    fn name(&self) -> &'static str {
        "conv3x3-im2col"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w, o) = dims(l1, l2)?;
        let y = forward_cpu(slice(s1, l1)?, slice(s2, l2)?, b, c, h, w, o);
        Ok((CpuStorage::F32(y), Shape::from((b, o, h, w))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let w_t = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
        let gx = grad.apply_op2_no_bwd(&w_t, &Conv3x3)?;
        let gw = x.apply_op2_no_bwd(&grad, &WeightGrad { o: w.dim(0)? })?;
        Ok((Some(gx), Some(gw)))
    }
}

struct WeightGrad {
    o: usize,
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "conv3x3-weight-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l1.shape().dims4()?;
        if l2.shape().dims() != [b, self.o, h, w] {
            candle_core::bail!(
                "conv3x3 weight gradient: output gradient {:?} does not fit input {:?}",
                l2.shape(),
                l1.shape()
            );
        }
        let gw = weight_grad_cpu(slice(s1, l1)?, slice(s2, l2)?, b, c, h, w, self.o);
        Ok((CpuStorage::F32(gw), Shape::from((self.o, c, 3, 3))))
    }
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Switches the im2col + gemm kernel on or off for the whole process (off: candle's conv2d
/// everywhere). For benchmarks that compare the two in one run.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A 3×3 convolution with padding 1 and stride 1 (no bias), differentiable in both inputs:
/// the im2col + gemm kernel for contiguous f32 on the CPU, candle's conv2d otherwise. Half
/// precision on the CPU (which candle's conv2d lacks) is computed in f32 and rounded back.
pub fn conv3x3(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::BF16 | DType::F16) {
        let dtype = x.dtype();
        return conv3x3(&x.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?)?.to_dtype(dtype);
    }
    let fast = ENABLED.load(std::sync::atomic::Ordering::Relaxed);
    if fast
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.dim(3)? >= 2
    {
        x.contiguous()?.apply_op2(&w.contiguous()?, Conv3x3)
    } else {
        x.conv2d(w, 1, 1, 1, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let s = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        d / s
    }

    /// Forward and both gradients equal candle's conv2d (several shapes, incl. bands of
    /// a few rows and odd sizes).
    #[test]
    fn matches_candles_conv2d_with_gradients() {
        for (b, c, h, w, o) in [
            (1, 1, 5, 4, 3),
            (2, 3, 17, 9, 5),
            (2, 8, 40, 33, 4),
            (1, 130, 70, 64, 6),
        ] {
            let x = Var::from_tensor(&rand(&[b, c, h, w], 1)).unwrap();
            let k = Var::from_tensor(&rand(&[o, c, 3, 3], 2)).unwrap();
            let r = rand(&[b, o, h, w], 3);
            let ours = conv3x3(x.as_tensor(), k.as_tensor()).unwrap();
            let theirs = x.as_tensor().conv2d(k.as_tensor(), 1, 1, 1, 1).unwrap();
            assert!(
                max_rel(&ours, &theirs) < 1e-5,
                "forward {:?}",
                (b, c, h, w, o)
            );
            let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &k] {
                let e = max_rel(
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert!(e < 1e-4, "gradient {:?}: {e}", (b, c, h, w, o));
            }
        }
    }
}

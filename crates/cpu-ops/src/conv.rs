//! A 3×3, stride 1, padding 1 convolution for f32 on the CPU, forward and both gradients, as
//! a candle op. candle 0.11's own conv2d reaches a small fraction of its matmul speed on these
//! shapes and computes the input gradient with a direct-loop transposed convolution. Here the
//! work runs over bands of image rows and no column matrix is written: the forward is one
//! product of [`sgemm`] per band that reads zero-padded input rows in place, one offset per
//! tap, and the weight gradient (`grad_out · colsᵀ`) is dot products of those rows with
//! output-gradient rows at the three horizontal shifts. Where the channel counts and image
//! width make it pay (and [`Kernels::Auto`] allows it) the forward runs as Winograd's F(4×4, 3×3)
//! instead (36 products of O × C by C × tiles, 4× fewer multiply-adds).
//!
//! The input gradient of a 3×3 / stride 1 / pad 1 convolution is the same convolution of the
//! output gradient with the kernel flipped in space and transposed in channels, so one forward
//! kernel serves both directions.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use crate::fused::{Fused, Stats};
use crate::sgemm;
use crate::storage::{slice, ChannelSum};
use crate::winograd;
use crate::{Kernels, LayerGrads, SendPtr};
use rayon::prelude::*;

/// Pixels per forward band at least: every block of weights is reused across all of a band's
/// 16-pixel panels.
const MIN_BAND_PIXELS: usize = 256;
/// Pixels per forward band at most.
const MAX_BAND_PIXELS: usize = 2048;
/// Floats of a forward band's working set between those bounds: the input rows of one
/// channel block (about 2·BLOCK_CHANNELS floats per pixel with the halo rows of a band of a
/// few rows) and the output tile (O × pixels, accumulated once per block), 384 KB, within a
/// core's L2.
const BAND_FLOATS: usize = 96 << 10;
/// Positions (padded-row pixels) per weight-gradient band, about: four output-gradient rows
/// of a band stay in L1 while the input rows stream past them.
const GRAD_RUN: usize = 1024;
/// Floats of a weight-gradient task's padded input rows (a block of channels, 192 KB: they
/// stay in L2). Larger blocks copy each output-gradient row fewer times.
const GRAD_BLOCK_FLOATS: usize = 48 << 10;
/// Input channels per block of the forward's product depth: 14 · 9 = 126 column-matrix rows,
/// within one depth block of the product.
const BLOCK_CHANNELS: usize = 14;

fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Rows per forward band for `b` images of `h` × `w` and `o` output channels: enough pixels
/// for the product, a working set that stays in L2, and at least one band per thread.
fn band_rows(b: usize, o: usize, h: usize, w: usize) -> usize {
    let pixels = (BAND_FLOATS / (2 * BLOCK_CHANNELS + o)).clamp(MIN_BAND_PIXELS, MAX_BAND_PIXELS);
    let rows = pixels.div_ceil(w).clamp(1, h);
    let per_image = threads().div_ceil(b.max(1));
    rows.min(h.div_ceil(per_image)).max(1)
}

/// `dst = (src − m)·s`, 16 values at a time (which the compiler keeps in vector registers; an
/// element-wise iterator over the two slices stays scalar).
fn normalise_into(dst: &mut [f32], src: &[f32], m: f32, s: f32) {
    let mut d = dst.chunks_exact_mut(16);
    let mut r = src.chunks_exact(16);
    for (d, r) in (&mut d).zip(&mut r) {
        // Fixed-size arrays: vector moves instead of memcpy calls.
        let d: &mut [f32; 16] = d.try_into().expect("16 values");
        let r: &[f32; 16] = r.try_into().expect("16 values");
        *d = std::array::from_fn(|i| (r[i] - m) * s);
    }
    for (d, &v) in d.into_remainder().iter_mut().zip(r.remainder()) {
        *d = (v - m) * s;
    }
}

/// Copies image rows `[y0 − 1, y1 + 1)` of the channels `chans` of one image (C × H × W)
/// into `buf`, one plane of `stride` floats per channel: row r of a plane (W + 2 floats)
/// holds image row y0 + r − 1 between a zero column on each side, rows outside the image are
/// zero; with `norm` (this image's per-channel mean and reciprocal standard deviation) the
/// values are normalised. What a plane holds past its rows is left as it is.
#[allow(clippy::too_many_arguments)]
fn pad_rows(
    xb: &[f32],
    h: usize,
    wd: usize,
    y0: usize,
    y1: usize,
    chans: std::ops::Range<usize>,
    norm: Option<(&[f32], &[f32])>,
    stride: usize,
    buf: &mut [f32],
) {
    let wp = wd + 2;
    assert!(
        stride >= (y1 - y0 + 2) * wp && buf.len() >= chans.len() * stride,
        "padded-row buffer too small"
    );
    for (ci, plane) in chans.zip(buf.chunks_mut(stride)) {
        for (r, line) in plane[..(y1 - y0 + 2) * wp].chunks_exact_mut(wp).enumerate() {
            let sy = (y0 + r).wrapping_sub(1);
            if sy >= h {
                line.fill(0.0);
                continue;
            }
            line[0] = 0.0;
            line[wp - 1] = 0.0;
            let src = &xb[(ci * h + sy) * wd..(ci * h + sy + 1) * wd];
            match norm {
                Some((m, s)) => normalise_into(&mut line[1..=wd], src, m[ci], s[ci]),
                None => line[1..=wd].copy_from_slice(src),
            }
        }
    }
}

/// Bands of image rows of all images.
fn bands(h: usize, rows: usize, b: usize) -> Vec<(usize, usize)> {
    (0..b)
        .flat_map(|bi| (0..h).step_by(rows).map(move |y0| (bi, y0)))
        .collect()
}

/// y (B, O, H, W) = relu?(conv3x3(norm?(x) (B, C, H, W), w (O, C, 3, 3)) + bias?): in
/// Winograd's form where it pays ([`winograd::pays`], unless `f.winograd` is off),
/// else in the direct form ([`forward_direct`]).
#[allow(clippy::too_many_arguments)]
fn forward_fused(
    x: &[f32],
    w: &[f32],
    b: usize,
    c: usize,
    h: usize,
    wd: usize,
    o: usize,
    f: Fused,
) -> Vec<f32> {
    if f.winograd && winograd::pays(c, o, wd) {
        winograd::forward(x, w, b, c, h, wd, o, f)
    } else {
        forward_direct(x, w, b, c, h, wd, o, f)
    }
}

/// The direct form of [`forward_fused`], as an implicit product: no column matrix is built.
/// The weights are packed once; bands of image rows run in parallel, each thread copying the band's input rows (with one row of halo
/// above and below, one zero column left and right, normalised when fused) for a block of
/// channels into a small buffer, whose rows the product reads in place: with a padded row
/// length Wp = W + 2, output position q = r·Wp + x of the band takes tap (ci, ky, kx) from
/// `buf[ci·plane + ky·Wp + kx + q]`, one offset per column-matrix row for all pixels. The
/// two positions per row at x ≥ W are computed and dropped. Each thread runs a
/// single-threaded product (splitting one product over threads along the small O axis scales
/// badly) and applies bias and ReLU to its band while it is in cache.
#[allow(clippy::too_many_arguments)]
fn forward_direct(
    x: &[f32],
    w: &[f32],
    b: usize,
    c: usize,
    h: usize,
    wd: usize,
    o: usize,
    f: Fused,
) -> Vec<f32> {
    let hw = h * wd;
    let k = c * 9;
    let wp = wd + 2;
    let mut y = vec![0.0f32; b * o * hw];
    let rows = band_rows(b, o, h, wd);
    let pw = sgemm::PackedA::pack(w, o, k, k, 1);
    let cb = BLOCK_CHANNELS.min(c);
    // A channel's plane in the band buffer: the band's rows and their halo, Wp apart.
    let plane = (rows + 2) * wp;
    // Read offsets of the column-matrix rows of one channel block (channel-relative).
    let offsets: Vec<usize> = (0..cb * 9)
        .map(|r| (r / 9) * plane + (r % 9 / 3) * wp + r % 3)
        .collect();
    let y_ptr = SendPtr::new(&mut y);
    bands(h, rows, b).into_par_iter().for_each_init(
        || {
            (
                // The last panel of a band reads up to NR − 1 positions past the band.
                vec![0.0f32; cb * plane + 2 * sgemm::NR],
                vec![0.0f32; o * rows * wp],
            )
        },
        |(buf, tile), (bi, y0)| {
            let y1 = (y0 + rows).min(h);
            let n = (y1 - y0) * wp;
            let xb = &x[bi * c * hw..(bi + 1) * c * hw];
            let norm = f.norm.map(|st| st.of_image(bi, c));
            for c0 in (0..c).step_by(cb) {
                let c1 = (c0 + cb).min(c);
                pad_rows(xb, h, wd, y0, y1, c0..c1, norm, plane, buf);
                let ks = c0 * 9..c1 * 9;
                // SAFETY: `tile` holds O × n floats (row stride n); the offsets of this
                // block's rows plus the panels' reach lie within `buf` (checked by the call).
                unsafe {
                    sgemm::gemm_gathered(
                        &pw,
                        ks.clone(),
                        buf,
                        &offsets[..ks.len()],
                        n,
                        tile.as_mut_ptr(),
                        n,
                        c0 > 0,
                        0..n.div_ceil(sgemm::NR),
                    );
                }
            }
            let dst = y_ptr.at(bi * o * hw + y0 * wd);
            for (oi, t) in tile.chunks(n).take(o).enumerate() {
                let bv = f.bias.map_or(0.0, |bias| bias[oi]);
                for (r, t) in t.chunks(wp).enumerate() {
                    // SAFETY: (SendPtr's invariant) this band owns the O rows of image bi at
                    // pixels [y0·W, y1·W); bands never overlap.
                    let row =
                        unsafe { std::slice::from_raw_parts_mut(dst.add(oi * hw + r * wd), wd) };
                    let t = &t[..wd];
                    if f.relu {
                        row.iter_mut()
                            .zip(t)
                            .for_each(|(v, &t)| *v = (t + bv).max(0.0));
                    } else {
                        row.iter_mut().zip(t).for_each(|(v, &t)| *v = t + bv);
                    }
                }
            }
        },
    );
    y
}

/// y (B, O, H, W) = conv3x3(x (B, C, H, W), w (O, C, 3, 3)), no bias.
#[allow(clippy::too_many_arguments)]
fn forward_cpu(
    x: &[f32],
    w: &[f32],
    b: usize,
    c: usize,
    h: usize,
    wd: usize,
    o: usize,
    winograd: bool,
) -> Vec<f32> {
    let f = Fused {
        winograd,
        ..Fused::default()
    };
    forward_fused(x, w, b, c, h, wd, o, f)
}

/// `out[r·3 + kx] += Σ_{q < n} d[r·ld + q] · x[q + kx]` for rows r < 4 and shifts kx < 3:
/// the weight gradient of three horizontal taps of one input row against four output
/// channels, read in place. `n` is a multiple of 8.
fn dot4x3(d: &[f32], ld: usize, x: &[f32], n: usize, out: &mut [f32; 12]) {
    assert!(
        n.is_multiple_of(8) && d.len() >= 3 * ld + n && x.len() >= n + 2,
        "dot4x3 operands too short"
    );
    #[cfg(target_arch = "x86_64")]
    if sgemm::avx512() {
        // SAFETY: the CPU has AVX-512F; the lengths are checked above.
        unsafe { dot4x3_avx512(d.as_ptr(), ld, x.as_ptr(), n, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if sgemm::simd() {
        // SAFETY: the CPU has AVX2 and FMA; the lengths are checked above.
        unsafe { dot4x3_avx2(d.as_ptr(), ld, x.as_ptr(), n, out) };
        return;
    }
    dot4x3_portable(d, ld, x, n, out);
}

/// [`dot4x3`] with twelve AVX-512 accumulators: sixteen values of q per step, and the last
/// eight (n is a multiple of 8) through masked loads.
///
/// # Safety
/// The CPU has AVX-512F; `d` has 3·ld + n readable floats, `x` n + 2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot4x3_avx512(d: *const f32, ld: usize, x: *const f32, n: usize, out: &mut [f32; 12]) {
    // SAFETY: the caller keeps this function's contract (its # Safety section); the masked
    // loads of the tail read only the lanes below n (the mask's eight low lanes).
    unsafe {
        use std::arch::x86_64::*;
        let mut acc = [_mm512_setzero_ps(); 12];
        let step = |q: usize, mask: __mmask16, acc: &mut [__m512; 12]| {
            let x0 = _mm512_maskz_loadu_ps(mask, x.add(q));
            let x1 = _mm512_maskz_loadu_ps(mask, x.add(q + 1));
            let x2 = _mm512_maskz_loadu_ps(mask, x.add(q + 2));
            for r in 0..4 {
                let dv = _mm512_maskz_loadu_ps(mask, d.add(r * ld + q));
                acc[r * 3] = _mm512_fmadd_ps(dv, x0, acc[r * 3]);
                acc[r * 3 + 1] = _mm512_fmadd_ps(dv, x1, acc[r * 3 + 1]);
                acc[r * 3 + 2] = _mm512_fmadd_ps(dv, x2, acc[r * 3 + 2]);
            }
        };
        let full = n / 16 * 16;
        for q in (0..full).step_by(16) {
            step(q, 0xffff, &mut acc);
        }
        if full < n {
            step(full, 0x00ff, &mut acc);
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o += _mm512_reduce_add_ps(a);
        }
    }
}

fn dot4x3_portable(d: &[f32], ld: usize, x: &[f32], n: usize, out: &mut [f32; 12]) {
    for r in 0..4 {
        let dr = &d[r * ld..r * ld + n];
        for kx in 0..3 {
            out[r * 3 + kx] += dr
                .iter()
                .zip(&x[kx..kx + n])
                .map(|(a, b)| a * b)
                .sum::<f32>();
        }
    }
}

/// [`dot4x3`] with twelve AVX2 accumulators: four loads of `d`, three of `x`, twelve FMAs per
/// eight values of q.
///
/// # Safety
/// The CPU has AVX2 and FMA; `d` has 3·ld + n readable floats, `x` n + 2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4x3_avx2(d: *const f32, ld: usize, x: *const f32, n: usize, out: &mut [f32; 12]) {
    // SAFETY: the caller keeps this function's contract (its # Safety section).
    unsafe {
        use std::arch::x86_64::*;
        let z = _mm256_setzero_ps();
        let mut acc = [z; 12];
        for q in (0..n).step_by(8) {
            let x0 = _mm256_loadu_ps(x.add(q));
            let x1 = _mm256_loadu_ps(x.add(q + 1));
            let x2 = _mm256_loadu_ps(x.add(q + 2));
            for r in 0..4 {
                let dv = _mm256_loadu_ps(d.add(r * ld + q));
                acc[r * 3] = _mm256_fmadd_ps(dv, x0, acc[r * 3]);
                acc[r * 3 + 1] = _mm256_fmadd_ps(dv, x1, acc[r * 3 + 1]);
                acc[r * 3 + 2] = _mm256_fmadd_ps(dv, x2, acc[r * 3 + 2]);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o += sgemm::lane_sum256(a);
        }
    }
}

/// grad_w (O, C, 3, 3) = Σ_b Σ_pixels grad_y_b[o, y, x] · x̂_b[ci, y + ky − 1, x + kx − 1]
/// (x̂ the normalised input when `norm` is given, zero outside the image), with no column
/// matrix: for bands of image rows, the output gradient of a group of channels is copied
/// into rows of the padded row length Wp = W + 2 (zero at x ≥ W), the input of a block of
/// channels into zero-padded rows as in the forward, and each (ci, ky) row is one dot
/// product with four output-gradient rows at the three shifts kx ([`dot4x3`]). Tasks own
/// disjoint (channel block, output group) parts of the gradient and run over all images and
/// bands, so no accumulator is shared or reduced.
#[allow(clippy::too_many_arguments)]
fn weight_grad_fused(
    x: &[f32],
    gy: &[f32],
    b: usize,
    c: usize,
    h: usize,
    wd: usize,
    o: usize,
    norm: Option<&Stats>,
) -> Vec<f32> {
    let (hw, wp) = (h * wd, wd + 2);
    // Equal bands of about GRAD_RUN positions.
    let bands_per_image = (h * wp).div_ceil(GRAD_RUN).clamp(1, h);
    let rows = h.div_ceil(bands_per_image);
    let run = (rows * wp).next_multiple_of(8);
    // A plane holds the band's rows with their halo and room for the reads of the last
    // positions (up to 2·Wp + 2 + run − 1 from its start), zero beyond its rows.
    let stride = (rows + 2) * wp + 16;
    let chans = (GRAD_BLOCK_FLOATS / stride).clamp(1, c);
    let blocks = c.div_ceil(chans);
    // Output groups (multiples of 4) small enough for about four tasks per thread.
    let group = ((o * blocks) / (4 * threads()) / 4 * 4).clamp(4, 64);
    let groups = o.div_ceil(group);
    let tasks: Vec<(usize, usize)> = (0..blocks)
        .flat_map(|cb| (0..groups).map(move |g| (cb, g)))
        .collect();
    let parts: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(
            || {
                (
                    vec![0.0f32; group.next_multiple_of(4) * run],
                    vec![0.0f32; chans * stride],
                )
            },
            |(dy, xs), &(cb, g)| {
                let (c0, c1) = (cb * chans, ((cb + 1) * chans).min(c));
                let (o0, o1) = (g * group, ((g + 1) * group).min(o));
                let (nc, no) = (c1 - c0, o1 - o0);
                let quads = no.div_ceil(4);
                // Output-gradient rows past `no` in the last quad are zero.
                dy[no * run..quads * 4 * run].fill(0.0);
                let mut acc = vec![0.0f32; quads * 4 * nc * 9];
                for bi in 0..b {
                    let xb = &x[bi * c * hw..(bi + 1) * c * hw];
                    let stats = norm.map(|st| st.of_image(bi, c));
                    for y0 in (0..h).step_by(rows) {
                        let y1 = (y0 + rows).min(h);
                        for (oi, line) in dy.chunks_mut(run).take(no).enumerate() {
                            let src = &gy[(bi * o + o0 + oi) * hw..];
                            for (r, y) in (y0..y1).enumerate() {
                                line[r * wp..r * wp + wd]
                                    .copy_from_slice(&src[y * wd..(y + 1) * wd]);
                                line[r * wp + wd..(r + 1) * wp].fill(0.0);
                            }
                            line[(y1 - y0) * wp..].fill(0.0);
                        }
                        pad_rows(xb, h, wd, y0, y1, c0..c1, stats, stride, xs);
                        for q in 0..quads {
                            let d = &dy[q * 4 * run..];
                            for ci in 0..nc {
                                for ky in 0..3 {
                                    let mut sums = [0.0f32; 12];
                                    dot4x3(d, run, &xs[ci * stride + ky * wp..], run, &mut sums);
                                    for r in 0..4 {
                                        let at = ((q * 4 + r) * nc + ci) * 9 + ky * 3;
                                        for kx in 0..3 {
                                            acc[at + kx] += sums[r * 3 + kx];
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                acc
            },
        )
        .collect();
    let mut gw = vec![0.0f32; o * c * 9];
    for (&(cb, g), acc) in tasks.iter().zip(&parts) {
        let (c0, c1) = (cb * chans, ((cb + 1) * chans).min(c));
        let (o0, o1) = (g * group, ((g + 1) * group).min(o));
        for (oi, part) in acc.chunks((c1 - c0) * 9).take(o1 - o0).enumerate() {
            gw[((o0 + oi) * c + c0) * 9..((o0 + oi) * c + c1) * 9].copy_from_slice(part);
        }
    }
    gw
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

/// The input gradient of the convolution (the same convolution of the output gradient with
/// the kernel flipped in space and transposed in channels), then of the InstanceNorm when
/// the forward had one.
fn input_grad(
    g: &Tensor,
    w: &Tensor,
    x: &Tensor,
    norm: Option<Arc<Stats>>,
    winograd: bool,
) -> candle_core::Result<Tensor> {
    g.apply_op3_no_bwd(&flipped(w)?, x, &InputGrad { norm, winograd })
}

/// A 3×3 kernel (O, C, 3, 3) flipped in space and transposed in channels (C, O, 3, 3): the
/// kernel whose convolution of an output gradient is the input gradient.
fn flipped(w: &Tensor) -> candle_core::Result<Tensor> {
    w.detach().flip(&[2, 3])?.transpose(0, 1)?.contiguous()
}

/// The input gradient of a plain 3×3 convolution (stride 1, padding 1, no norm) from the output
/// gradient and the kernel alone: [`conv3x3`] of `grad` with the kernel flipped in space and
/// transposed in channels. A hand-written backward pass takes it after the input is gone (the
/// weight gradient, which needs the input, first).
pub fn conv3x3_input_vjp(
    grad: &Tensor,
    weight: &Tensor,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    conv3x3(grad, &flipped(weight)?, kernels)
}

/// Plain 3×3 convolution (no bias): [`conv3x3`].
struct Conv3x3 {
    winograd: bool,
}

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
        let y = forward_cpu(slice(s1, l1)?, slice(s2, l2)?, b, c, h, w, o, self.winograd);
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
        // An input that no gradient can reach (a model's input image) gets none.
        let gx = if x.track_op() {
            Some(input_grad(&grad, w, x, None, self.winograd)?)
        } else {
            None
        };
        let gw = x.apply_op2_no_bwd(
            &grad,
            &WeightGrad {
                o: w.dim(0)?,
                norm: None,
                winograd: self.winograd,
            },
        )?;
        Ok((gx, Some(gw)))
    }
}

/// InstanceNorm → 3×3 conv + bias → ReLU in one pass: [`conv3x3_block`]. The forward keeps
/// the normalisation statistics for the backward.
struct NormConvReLU {
    eps: Option<f64>,
    relu: bool,
    winograd: bool,
    stats: std::sync::Mutex<Option<Arc<Stats>>>,
}

impl CustomOp3 for NormConvReLU {
    fn name(&self) -> &'static str {
        "norm-conv3x3-relu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w, o) = dims(l1, l2)?;
        if l3.shape().dims() != [o] {
            candle_core::bail!(
                "conv3x3: bias {:?} does not fit {o} output channels",
                l3.shape()
            );
        }
        let x = slice(s1, l1)?;
        let stats = self.eps.map(|eps| Arc::new(Stats::of(x, h * w, eps)));
        let fused = Fused {
            norm: stats.as_deref(),
            bias: Some(slice(s3, l3)?),
            relu: self.relu,
            winograd: self.winograd,
        };
        let y = forward_fused(x, slice(s2, l2)?, b, c, h, w, o, fused);
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        Ok((CpuStorage::F32(y), Shape::from((b, o, h, w))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if self.eps.is_some() && stats.is_none() {
            candle_core::bail!("conv3x3 block: backward without a forward");
        }
        let g = self.grads(x, w, res, grad, stats, x.track_op())?;
        Ok((g.input, Some(g.weight), Some(g.bias)))
    }
}

impl NormConvReLU {
    /// The gradients of input (if `input`), weight and bias from the input, the weight, the
    /// output (read where a ReLU cut the gradient) and the output gradient.
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
        stats: Option<Arc<Stats>>,
        input: bool,
    ) -> candle_core::Result<LayerGrads> {
        let g = if self.relu {
            grad.contiguous()?.apply_op2_no_bwd(res, &ReluGrad)?
        } else {
            grad.contiguous()?
        };
        let bias = g.apply_op1_no_bwd(&ChannelSum)?;
        let (weight, input) = part_grads(x, w, &g, stats, input, self.winograd)?;
        Ok(LayerGrads {
            input,
            weight,
            bias,
        })
    }
}

/// The weight's and (if `input`) the input's gradient of one convolution with InstanceNorm
/// statistics `stats` (or none), from its input, kernel and output gradient `g` (past the
/// ReLU).
fn part_grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    stats: Option<Arc<Stats>>,
    input: bool,
    winograd: bool,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let norm = stats.clone();
    let o = w.dim(0)?;
    let weight = x.apply_op2_no_bwd(g, &WeightGrad { o, norm, winograd })?;
    let input = match input {
        true => Some(input_grad(g, w, x, stats, winograd)?),
        false => None,
    };
    Ok((weight, input))
}

/// A ReLU's backward as a function: `grad` where the ReLU's output `out` is positive, zero
/// elsewhere (one pass for f32 on the CPU; composed otherwise).
pub fn relu_vjp(grad: &Tensor, out: &Tensor) -> candle_core::Result<Tensor> {
    if grad.device().is_cpu() && grad.dtype() == DType::F32 && out.dtype() == DType::F32 {
        return grad
            .contiguous()?
            .apply_op2_no_bwd(&out.contiguous()?, &ReluGrad);
    }
    grad * out.gt(0.0)?.to_dtype(grad.dtype())?
}

/// [`relu_vjp`] written over `grad` itself, for a gradient the caller holds alone (a `*_vjp`
/// function's fresh output): no second buffer of its size. `grad`'s storage must not be
/// shared with another tensor, which would see the change.
pub fn relu_vjp_in_place(grad: &Tensor, out: &Tensor) -> candle_core::Result<()> {
    if grad.dims() != out.dims() {
        candle_core::bail!("relu gradient: {:?} vs {:?}", grad.dims(), out.dims());
    }
    grad.inplace_op2(&out.contiguous()?, &ReluMask)
}

/// Zeroes the gradient where the ReLU's output is not positive, in place.
struct ReluMask;

impl candle_core::InplaceOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "relu-mask"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let y = slice(s2, l2)?;
        let g = match (s1, l1.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &mut v[a..b],
            _ => candle_core::bail!("relu gradient: expected a contiguous f32 gradient"),
        };
        g.par_chunks_mut(1 << 14)
            .zip(y.par_chunks(1 << 14))
            .for_each(|(g, y)| {
                for (g, &y) in g.iter_mut().zip(y) {
                    *g = if y > 0.0 { *g } else { 0.0 };
                }
            });
        Ok(())
    }
}

/// The output gradient where the ReLU's output is positive, zero elsewhere.
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "relu-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("relu gradient: {:?} vs {:?}", l1.shape(), l2.shape());
        }
        let (g, y) = (slice(s1, l1)?, slice(s2, l2)?);
        let mut out = vec![0.0f32; g.len()];
        out.par_chunks_mut(1 << 14)
            .zip(g.par_chunks(1 << 14).zip(y.par_chunks(1 << 14)))
            .for_each(|(o, (g, y))| {
                for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                    *o = if y > 0.0 { g } else { 0.0 };
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// The convolution's input gradient, then the InstanceNorm's:
/// gx = rstd·(gx̂ − mean(gx̂) − x̂·mean(gx̂·x̂)) per (image, channel) plane.
struct InputGrad {
    norm: Option<Arc<Stats>>,
    winograd: bool,
}

impl CustomOp3 for InputGrad {
    fn name(&self) -> &'static str {
        "conv3x3-input-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, o, h, w, c) = dims(l1, l2)?;
        if l3.shape().dims() != [b, c, h, w] {
            candle_core::bail!(
                "conv3x3 input gradient: {:?} does not fit the input {:?}",
                l1.shape(),
                l3.shape()
            );
        }
        let mut gx = forward_cpu(slice(s1, l1)?, slice(s2, l2)?, b, o, h, w, c, self.winograd);
        if let Some(st) = &self.norm {
            let x = slice(s3, l3)?;
            let hw = h * w;
            gx.par_chunks_mut(hw)
                .zip(x.par_chunks(hw))
                .enumerate()
                .for_each(|(p, (g, x))| {
                    let (m, r) = (st.mean[p], st.rstd[p]);
                    let (s1, s2) = crate::sums::pair_sums(g, x, |g, x| (g, g * (x - m) * r));
                    let (m1, m2) = ((s1 / hw as f64) as f32, (s2 / hw as f64) as f32);
                    for (g, &x) in g.iter_mut().zip(x) {
                        *g = r * (*g - m1 - (x - m) * r * m2);
                    }
                });
        }
        Ok((CpuStorage::F32(gx), Shape::from((b, c, h, w))))
    }
}

struct WeightGrad {
    o: usize,
    norm: Option<Arc<Stats>>,
    winograd: bool,
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
        let (x, g) = (slice(s1, l1)?, slice(s2, l2)?);
        let gw = if self.winograd && winograd::grad_pays(c, self.o, h, w) {
            winograd::weight_grad(x, g, b, c, h, w, self.o, self.norm.as_deref())
        } else {
            weight_grad_fused(x, g, b, c, h, w, self.o, self.norm.as_deref())
        };
        Ok((CpuStorage::F32(gw), Shape::from((self.o, c, 3, 3))))
    }
}

/// Whether the crate's 3×3 op serves `x` under `kernels` (f32 on the CPU, rows of two or more
/// pixels).
fn serves(x: &Tensor, kernels: Kernels) -> bool {
    kernels.serve(x) && x.dims()[3] >= 2
}

/// A 3×3 convolution with padding 1 and stride 1 (no bias), differentiable in both inputs:
/// the crate's kernels for f32 on the CPU (unless `kernels` is [`Kernels::Candle`]), candle's
/// conv2d otherwise. Half precision on the CPU (which candle's conv2d lacks) is computed in
/// f32 and rounded back.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::ones((1, 2, 5, 6), candle_core::DType::F32, &Device::Cpu)?;
/// let w = Tensor::ones((3, 2, 3, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let y = cpu_ops::conv3x3(&x, &w, cpu_ops::Kernels::Auto)?;
/// assert_eq!(y.dims(), &[1, 3, 5, 6]);
/// // An interior pixel sums 2 channels × 9 taps of ones.
/// assert_eq!(y.get(0)?.get(0)?.get(2)?.get(2)?.to_scalar::<f32>()?, 18.0);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn conv3x3(x: &Tensor, w: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::BF16 | DType::F16) {
        let dtype = x.dtype();
        return conv3x3(&x.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?, kernels)?
            .to_dtype(dtype);
    }
    if serves(x, kernels) && w.dtype() == DType::F32 {
        x.contiguous()?.apply_op2(
            &w.contiguous()?,
            Conv3x3 {
                winograd: kernels == Kernels::Auto,
            },
        )
    } else {
        x.conv2d(w, 1, 1, 1, 1)
    }
}

/// What [`conv3x3_block`] fuses around the convolution.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Conv3x3Block {
    /// An InstanceNorm (no affine parameters) of the input with this eps, or none.
    pub norm_eps: Option<f64>,
    /// A ReLU on the output.
    pub relu: bool,
}

impl Conv3x3Block {
    /// An InstanceNorm with `norm_eps` (or none) before the convolution, a ReLU after it if
    /// `relu`.
    pub fn new(norm_eps: Option<f64>, relu: bool) -> Self {
        Conv3x3Block { norm_eps, relu }
    }

    /// One unit of torch-em's `ConvBlock2d`: InstanceNorm (eps 1e-5) → conv + bias → ReLU.
    pub fn torch_em() -> Self {
        Conv3x3Block {
            norm_eps: Some(1e-5),
            relu: true,
        }
    }
}

/// `relu?(conv3x3(InstanceNorm?(x), w) + b)` as one op for f32 on the CPU: the statistics in
/// one read of `x`, the normalisation applied while input rows are copied, bias and ReLU on
/// each band while it is in cache, and a backward of four kernels.
///
/// Returns `None` where the crate's kernels do not serve the input (another dtype or device,
/// or [`Kernels::Candle`]): the caller composes the unit from candle ops there.
pub fn conv3x3_block(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    block: Conv3x3Block,
    kernels: Kernels,
) -> candle_core::Result<Option<Tensor>> {
    if !(serves(x, kernels) && w.dtype() == DType::F32 && b.dtype() == DType::F32) {
        return Ok(None);
    }
    let op = NormConvReLU {
        eps: block.norm_eps,
        relu: block.relu,
        winograd: kernels == Kernels::Auto,
        stats: std::sync::Mutex::new(None),
    };
    Ok(Some(x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        op,
    )?))
}

/// [`conv3x3_block`]'s backward as a function (see [`LayerGrads`]): the gradients of input
/// (if `input`), weight and bias from the input, the weight, the block's output `out` (read
/// where it has a ReLU) and the output gradient; the InstanceNorm's statistics are taken from
/// `x` again. `None` where [`conv3x3_block`] would not have served the forward.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_block_vjp(
    x: &Tensor,
    w: &Tensor,
    block: Conv3x3Block,
    out: &Tensor,
    grad: &Tensor,
    input: bool,
    kernels: Kernels,
) -> candle_core::Result<Option<LayerGrads>> {
    let grads = conv3x3_block_cat_vjp(&[x], w, block, out, grad, input, kernels)?;
    Ok(grads.map(|mut g| LayerGrads {
        input: g.inputs.pop(),
        weight: g.weight,
        bias: g.bias,
    }))
}

/// The gradients of [`conv3x3_block_cat`]: one input gradient per part (where asked for),
/// and the weight's and bias's.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct CatGrads {
    /// The parts' gradients in their order, each its own tensor; empty unless asked for.
    pub inputs: Vec<Tensor>,
    pub weight: Tensor,
    pub bias: Tensor,
}

/// The f32 values of a contiguous CPU tensor, lent to `f`.
fn with_values<T>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cs) = &*s else {
        candle_core::bail!("conv3x3 block: tensor not on the CPU");
    };
    f(slice(cs, l)?)
}

/// Whether the crate's kernels serve the unit on the parts `xs` with kernel `w` (an error
/// where the parts do not fit `w`: [`check_parts`]).
fn parts_served(xs: &[&Tensor], w: &Tensor, kernels: Kernels) -> candle_core::Result<bool> {
    check_parts(xs, w)?;
    Ok(xs.iter().all(|x| serves(x, kernels)) && w.dtype() == DType::F32)
}

/// Checks that `xs` can be concatenated along channels into `w`'s input: equal batch and
/// image sizes, channels adding up to `w`'s.
fn check_parts(xs: &[&Tensor], w: &Tensor) -> candle_core::Result<()> {
    let Some(first) = xs.first() else {
        candle_core::bail!("conv3x3 block: no input");
    };
    let (b, _, h, wd) = first.dims4()?;
    let mut channels = 0;
    for x in xs {
        let (bx, c, hx, wx) = x.dims4()?;
        if (bx, hx, wx) != (b, h, wd) {
            candle_core::bail!(
                "conv3x3 block: parts {:?} and {:?} differ in batch or image size",
                first.dims(),
                x.dims()
            );
        }
        channels += c;
    }
    if w.rank() != 4 || w.dim(1)? != channels {
        candle_core::bail!(
            "conv3x3 block: kernel {:?} does not fit {channels} input channels",
            w.dims()
        );
    }
    Ok(())
}

/// [`conv3x3_block`] on the concatenation of `xs` along channels, without writing the
/// concatenation: the InstanceNorm works per channel, so the convolution is a sum over the
/// parts, each convolved with its slice of the kernel's input channels (its statistics from
/// its own values), with the bias and the ReLU applied once. Where a gradient is tracked
/// through `xs`, `w` or `b` the parts are concatenated and [`conv3x3_block`] runs, so the
/// result is differentiable; without one it costs no more memory than the output and one
/// part's contribution. `None` where [`conv3x3_block`] would not serve.
pub fn conv3x3_block_cat(
    xs: &[&Tensor],
    w: &Tensor,
    b: &Tensor,
    block: Conv3x3Block,
    kernels: Kernels,
) -> candle_core::Result<Option<Tensor>> {
    if !(parts_served(xs, w, kernels)? && b.dtype() == DType::F32) {
        return Ok(None);
    }
    let tracked = xs.iter().any(|x| x.track_op()) || w.track_op() || b.track_op();
    if xs.len() == 1 || tracked {
        return conv3x3_block(&Tensor::cat(xs, 1)?, w, b, block, kernels);
    }
    let (bn, _, h, wd) = xs[0].dims4()?;
    let o = w.dim(0)?;
    if b.dims() != [o] {
        candle_core::bail!(
            "conv3x3: bias {:?} does not fit {o} output channels",
            b.dims()
        );
    }
    let (w, b) = (w.contiguous()?, b.contiguous()?);
    let mut y: Vec<f32> = Vec::new();
    let mut c0 = 0;
    for (i, x) in xs.iter().enumerate() {
        let (x, c) = (x.contiguous()?, x.dim(1)?);
        let wi = w.narrow(1, c0, c)?.contiguous()?;
        c0 += c;
        let part = with_values(&x, |xv| {
            with_values(&wi, |wv| {
                with_values(&b, |bv| {
                    let stats = block.norm_eps.map(|eps| Stats::of(xv, h * wd, eps));
                    let f = Fused {
                        norm: stats.as_ref(),
                        bias: (i == 0).then_some(bv),
                        relu: false,
                        winograd: kernels == Kernels::Auto,
                    };
                    Ok(forward_fused(xv, wv, bn, c, h, wd, o, f))
                })
            })
        })?;
        if i == 0 {
            y = part;
            continue;
        }
        let relu = block.relu && i + 1 == xs.len();
        y.par_chunks_mut(1 << 14)
            .zip(part.par_chunks(1 << 14))
            .for_each(|(y, p)| {
                for (y, &p) in y.iter_mut().zip(p) {
                    *y = if relu { (*y + p).max(0.0) } else { *y + p };
                }
            });
    }
    Ok(Some(Tensor::from_vec(y, (bn, o, h, wd), xs[0].device())?))
}

/// [`conv3x3_block_cat`]'s backward as a function: the gradients of each part (if `input`),
/// of the weight and of the bias, from the parts, the weight, the block's output `out` (read
/// where it has a ReLU) and the output gradient. Each part's gradient is a tensor of its own,
/// so one that is done with can be freed while another is still needed. `None` where
/// [`conv3x3_block`] would not have served the forward.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_block_cat_vjp(
    xs: &[&Tensor],
    w: &Tensor,
    block: Conv3x3Block,
    out: &Tensor,
    grad: &Tensor,
    input: bool,
    kernels: Kernels,
) -> candle_core::Result<Option<CatGrads>> {
    if !parts_served(xs, w, kernels)? {
        return Ok(None);
    }
    let w = w.contiguous()?;
    let winograd = kernels == Kernels::Auto;
    let g = match block.relu {
        true => relu_vjp(grad, out)?,
        false => grad.contiguous()?,
    };
    let bias = g.apply_op1_no_bwd(&ChannelSum)?;
    let (mut weights, mut inputs) = (Vec::new(), Vec::new());
    let mut c0 = 0;
    for x in xs {
        let (x, c) = (x.contiguous()?, x.dim(1)?);
        let wi = w.narrow(1, c0, c)?.contiguous()?;
        c0 += c;
        let (_, _, h, wd) = x.dims4()?;
        let stats = match block.norm_eps {
            Some(eps) => Some(Arc::new(with_values(&x, |v| {
                Ok(Stats::of(v, h * wd, eps))
            })?)),
            None => None,
        };
        let (weight, gx) = part_grads(&x, &wi, &g, stats, input, winograd)?;
        weights.push(weight);
        inputs.extend(gx);
    }
    let weight = match weights.len() {
        1 => weights.pop().expect("one part"),
        _ => Tensor::cat(&weights, 1)?,
    };
    Ok(Some(CatGrads {
        inputs,
        weight,
        bias,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_rel, values};
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec(values(n, seed), shape, &Device::Cpu).unwrap()
    }

    /// InstanceNorm (biased variance, no affine parameters) composed of candle ops.
    fn instance_norm(x: &Tensor, eps: f64) -> Tensor {
        let mean = x.mean_keepdim(3).unwrap().mean_keepdim(2).unwrap();
        let centred = x.broadcast_sub(&mean).unwrap();
        let var = centred
            .sqr()
            .unwrap()
            .mean_keepdim(3)
            .unwrap()
            .mean_keepdim(2)
            .unwrap();
        centred
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap()
    }

    fn block(norm_eps: Option<f64>, relu: bool) -> Conv3x3Block {
        Conv3x3Block { norm_eps, relu }
    }

    /// The fused block (with and without InstanceNorm and ReLU) equals InstanceNorm → candle's
    /// conv2d → bias → ReLU composed of candle ops, forward and the gradients of input, weight
    /// and bias; bands of one or many rows, batches, odd sizes.
    #[test]
    fn fused_block_matches_composed_ops_with_gradients() {
        assert!(winograd::grad_pays(128, 130, 6, 61) && !winograd::grad_pays(40, 48, 9, 53));
        for (b, c, h, w, o) in [
            (1, 1, 5, 4, 3),
            (2, 3, 17, 9, 5),
            (2, 8, 40, 33, 4),
            (1, 130, 70, 64, 6),
            // Winograd forward and input gradient: odd sizes, partial tile runs.
            (1, 40, 9, 53, 48),
            (2, 48, 7, 97, 41),
            (3, 16, 8, 600, 8),
            // And the Winograd weight gradient.
            (2, 128, 6, 61, 130),
        ] {
            for (norm, relu) in [(true, true), (false, true), (true, false)] {
                let shift = rand(&[b, c, h, w], 1).affine(2.0, 3.0).unwrap();
                let x = Var::from_tensor(&shift).unwrap();
                let k =
                    Var::from_tensor(&rand(&[o, c, 3, 3], 2).affine(0.3, 0.0).unwrap()).unwrap();
                let bias = Var::from_tensor(&rand(&[o], 4)).unwrap();
                let r = rand(&[b, o, h, w], 3);
                let eps = norm.then_some(1e-5);
                let ours = conv3x3_block(
                    x.as_tensor(),
                    k.as_tensor(),
                    bias.as_tensor(),
                    block(eps, relu),
                    Kernels::Auto,
                )
                .unwrap()
                .unwrap();
                let xn = if norm {
                    instance_norm(x.as_tensor(), 1e-5)
                } else {
                    x.as_tensor().clone()
                };
                let mut theirs = xn
                    .conv2d(k.as_tensor(), 1, 1, 1, 1)
                    .unwrap()
                    .broadcast_add(&bias.as_tensor().reshape((1, o, 1, 1)).unwrap())
                    .unwrap();
                if relu {
                    theirs = theirs.relu().unwrap();
                }
                let case = (b, c, h, w, o, norm, relu);
                let e = max_rel(&ours, &theirs);
                assert!(e < 1e-5, "forward {case:?}: {e}");
                let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (theirs * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for (name, v) in [("x", &x), ("w", &k), ("b", &bias)] {
                    let e = max_rel(
                        g1.get(v.as_tensor()).unwrap(),
                        g2.get(v.as_tensor()).unwrap(),
                    );
                    assert!(e < 1e-4, "gradient of {name} {case:?}: {e}");
                }
            }
        }
    }

    /// The direct and the Winograd forms agree with InstanceNorm, bias and ReLU fused, on a
    /// shape where the direct form runs several channel blocks and output-row blocks of the
    /// product (the candle comparisons above take the Winograd form on such shapes).
    #[test]
    fn direct_and_winograd_forms_agree() {
        let (b, c, h, wd, o) = (2, 64, 10, 47, 80);
        assert!(winograd::pays(c, o, wd));
        let x: Vec<f32> = rand(&[b, c, h, wd], 5)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let w: Vec<f32> = rand(&[o, c, 9], 6)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let bias: Vec<f32> = rand(&[o], 7).to_vec1().unwrap();
        let stats = Stats::of(&x, h * wd, 1e-5);
        let f = Fused {
            norm: Some(&stats),
            bias: Some(&bias),
            relu: true,
            winograd: true,
        };
        let direct = forward_direct(&x, &w, b, c, h, wd, o, f);
        let wino = winograd::forward(&x, &w, b, c, h, wd, o, f);
        let scale = direct.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = direct
            .iter()
            .zip(&wino)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            scale > 1.0 && err <= 1e-5 * scale,
            "max error {err} at scale {scale}"
        );
    }

    #[test]
    fn shifted_dot_products_match_naive() {
        for (n, ld) in [(8, 8), (16, 20), (64, 70), (1032, 1040)] {
            let d = values(3 * ld + n, 11);
            let x = values(n + 2, 12);
            let mut got = [1.0f32; 12];
            dot4x3(&d, ld, &x, n, &mut got);
            let mut portable = [1.0f32; 12];
            dot4x3_portable(&d, ld, &x, n, &mut portable);
            // The AVX2 form too where the AVX-512 one is what `dot4x3` ran.
            let mut avx2 = portable;
            #[cfg(target_arch = "x86_64")]
            if sgemm::simd() {
                avx2 = [1.0f32; 12];
                // SAFETY: the CPU has AVX2 and FMA; d has 3·ld + n floats, x n + 2.
                unsafe { dot4x3_avx2(d.as_ptr(), ld, x.as_ptr(), n, &mut avx2) };
            }
            for r in 0..4 {
                for kx in 0..3 {
                    let want: f64 = 1.0
                        + (0..n)
                            .map(|q| d[r * ld + q] as f64 * x[q + kx] as f64)
                            .sum::<f64>();
                    for v in [got[r * 3 + kx], portable[r * 3 + kx], avx2[r * 3 + kx]] {
                        assert!((v as f64 - want).abs() < 1e-4 * (n as f64).sqrt(), "{n}");
                    }
                }
            }
        }
    }

    /// A plain input tensor (a model's image) gets no gradient; weight and bias gradients are
    /// those of the composed ops.
    #[test]
    fn untracked_input_gets_no_gradient() {
        let x = rand(&[1, 1, 20, 24], 1);
        let k = Var::from_tensor(&rand(&[4, 1, 3, 3], 2)).unwrap();
        let bias = Var::from_tensor(&rand(&[4], 3)).unwrap();
        let ours = conv3x3_block(
            &x,
            k.as_tensor(),
            bias.as_tensor(),
            Conv3x3Block::torch_em(),
            Kernels::Auto,
        )
        .unwrap()
        .unwrap();
        let g = ours.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        let theirs = instance_norm(&x, 1e-5)
            .conv2d(k.as_tensor(), 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias.as_tensor().reshape((1, 4, 1, 1)).unwrap())
            .unwrap()
            .relu()
            .unwrap();
        let g2 = theirs.sum_all().unwrap().backward().unwrap();
        for v in [&k, &bias] {
            let e = max_rel(
                g.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(e < 1e-4, "{e}");
        }
        let plain = conv3x3(&x, k.as_tensor(), Kernels::Auto).unwrap();
        let g = plain.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none() && g.get(k.as_tensor()).is_some());
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
            // Winograd forward and input gradient: odd sizes, partial tile runs.
            (1, 40, 9, 53, 48),
            (2, 48, 7, 97, 41),
            // And the Winograd weight gradient.
            (2, 128, 6, 61, 130),
        ] {
            let x = Var::from_tensor(&rand(&[b, c, h, w], 1)).unwrap();
            let k = Var::from_tensor(&rand(&[o, c, 3, 3], 2)).unwrap();
            let r = rand(&[b, o, h, w], 3);
            let theirs = x.as_tensor().conv2d(k.as_tensor(), 1, 1, 1, 1).unwrap();
            let g2 = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for kernels in [Kernels::Auto, Kernels::Direct] {
                let case = (b, c, h, w, o, kernels);
                let ours = conv3x3(x.as_tensor(), k.as_tensor(), kernels).unwrap();
                assert!(max_rel(&ours, &theirs) < 1e-5, "forward {case:?}");
                let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                for v in [&x, &k] {
                    let e = max_rel(
                        g1.get(v.as_tensor()).unwrap(),
                        g2.get(v.as_tensor()).unwrap(),
                    );
                    assert!(e < 1e-4, "gradient {case:?}: {e}");
                }
            }
        }
    }
}

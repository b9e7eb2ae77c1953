//! The convolutions that are one matrix product, on the crate's packed product
//! ([`crate::sgemm`]), forward and all gradients, as candle ops for f32 on the CPU:
//!
//! - 1×1 ([`conv1x1`]): `y_b (O × HW) = W (O × C) · x_b (C × HW) + bias`;
//! - 2×2, stride 2 transposed ([`conv_transpose2x2`], the decoders' upsamplers):
//!   `Y_b (O·4 × HW) = Wᵀ (O·4 × C) · x_b (C × HW)`, each row (o, dy, dx) written to the
//!   output pixels (2y + dy, 2x + dx) with bias o.
//!
//! Each product's operands are read through a [`View`] (where a row and a column of the
//! matrix lie in a flat buffer), so that no interleaved output or permuted copy is ever
//! materialised: the right-hand operand is gathered block by block into the product's packed
//! panels, and each block of the result is scattered from a tile in cache with its bias. The
//! input gradients are products of the same form with the weight transposed; the weight
//! gradients `Σ P·Qᵀ` over pixels run in parallel chunks of pixels summed in a fixed order.
//!
//! 1×1 convolutions from 1024 channels on are candle matrix products: measured against that
//! form in the same run (`cargo xtask bench conv`), the op did not reach 1.2× there; neither
//! did a patch-embedding op (k×k, stride k), so the ViT / ViM patch embeddings are candle
//! matrix products of the patch matrix (`vim_nets::layers::patch_tokens`).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::sgemm::{self, PackedA};
use crate::storage::{slice, ChannelSum};
use crate::{Kernels, LayerGrads, SendPtr};

/// Floats of a chunk of the right operand gathered at once (1 MB, within L3; a block of 128
/// of its rows is what the product keeps in L2).
const PACK_FLOATS: usize = 256 << 10;
/// Rows of the left operand per task (a multiple of the product's panel height): a task's
/// result tile and a block of the right operand stay in L2, and a block of rows is reused
/// across a whole chunk of columns instead of being streamed once per few columns.
const ROW_BLOCK: usize = 144;
/// Columns of a weight-gradient task's block of the result (with [`ROW_BLOCK`] rows).
const GRAD_COL_BLOCK: usize = 256;
/// Pixels per weight-gradient chunk: the chunk's two packed operands stay in L2 for the
/// usual channel counts, and gathers along a strided axis reuse their cache lines.
const GRAD_PIXELS: usize = 512;

/// Where the values of a matrix lie in a flat buffer. Row r, read as (c, ky, kx) with
/// r = (c·k + ky)·k + kx, starts at `c·sc + ky·sky + kx·skx`; column j, read as (gy, gx)
/// with j = gy·gw + gx, lies `gy·sy + gx·sx` beyond that.
#[derive(Debug, Clone, Copy)]
struct View {
    k: usize,
    sc: usize,
    sky: usize,
    skx: usize,
    gw: usize,
    sy: usize,
    sx: usize,
}

impl View {
    /// A row-major matrix with `cols` columns.
    fn dense(cols: usize) -> View {
        View {
            k: 1,
            sc: cols,
            sky: 0,
            skx: 0,
            gw: cols.max(1),
            sy: cols,
            sx: 1,
        }
    }

    /// The patch matrix of a (C, H, W) image for k×k patches at stride s (k = s: patch
    /// embedding; k = 2, s = 2: the pixels of a ×2 transposed conv's output): row (c, ky, kx),
    /// column (gy, gx) of a grid `w / s` wide.
    fn patches(h: usize, w: usize, k: usize, s: usize) -> View {
        View {
            k,
            sc: h * w,
            sky: w,
            skx: 1,
            gw: (w / s).max(1),
            sy: s * w,
            sx: s,
        }
    }

    fn row(&self, r: usize) -> usize {
        let kk = self.k * self.k;
        let (c, t) = (r / kk, r % kk);
        c * self.sc + (t / self.k) * self.sky + (t % self.k) * self.skx
    }

    /// Calls `f(offset, count, stride)` for the runs of columns `cols` that share a grid
    /// row: the run's values lie at `offset + i·stride` (relative to a row's start).
    fn runs(&self, cols: std::ops::Range<usize>, mut f: impl FnMut(usize, usize, usize)) {
        let mut j = cols.start;
        while j < cols.end {
            let (gy, gx) = (j / self.gw, j % self.gw);
            let n = (self.gw - gx).min(cols.end - j);
            f(gy * self.sy + gx * self.sx, n, self.sx);
            j += n;
        }
    }

    /// Row `r`'s values at columns `cols` of `src` (from `base`) into `line`.
    fn gather(
        &self,
        src: &[f32],
        base: usize,
        r: usize,
        cols: std::ops::Range<usize>,
        line: &mut [f32],
    ) {
        let start = base + self.row(r);
        let mut at = 0;
        self.runs(cols, |off, n, stride| {
            let s = start + off;
            if stride == 1 {
                line[at..at + n].copy_from_slice(&src[s..s + n]);
            } else {
                for (i, d) in line[at..at + n].iter_mut().enumerate() {
                    *d = src[s + i * stride];
                }
            }
            at += n;
        });
    }
}

/// A (m × k, element (i, p) at `a[i·rs + p·cs]`) packed in blocks of [`ROW_BLOCK`] rows.
fn pack_rows(a: &[f32], m: usize, k: usize, rs: usize, cs: usize) -> Vec<PackedA> {
    (0..m)
        .step_by(ROW_BLOCK)
        .map(|i0| PackedA::pack(&a[i0 * rs..], ROW_BLOCK.min(m - i0), k, rs, cs))
        .collect()
}

/// One product of the forward form, for every batch item b:
/// `dst[b·dst_batch + out.row(r) + out.col(j)] = Σ_p A[r, p]·src[b·src_batch + rhs.row(p) +
/// rhs.col(j)] + bias[r / per_bias]` for r < A's rows, j < n.
struct Product<'a> {
    /// The left operand in blocks of [`ROW_BLOCK`] rows.
    a: &'a [PackedA],
    m: usize,
    depth: usize,
    n: usize,
    batches: usize,
    src: &'a [f32],
    src_batch: usize,
    rhs: View,
    out: View,
    dst_batch: usize,
    bias: Option<(&'a [f32], usize)>,
}

impl Product<'_> {
    /// Tasks of a batch item and a chunk of columns: the chunk's right operand is gathered
    /// into packed panels once (the whole depth), then each block of rows of the left operand
    /// is multiplied with it into a tile that is scattered to `dst` with its bias.
    fn run(&self, dst: &mut [f32]) {
        let nr = sgemm::NR;
        let threads = rayon::current_num_threads().max(1);
        let per_item = threads.div_ceil(self.batches.max(1));
        let chunk = (PACK_FLOATS / self.depth.max(1) / nr * nr)
            .clamp(4 * nr, 32 * nr)
            .min(self.n.div_ceil(per_item).next_multiple_of(nr))
            .max(nr);
        let chunks = self.n.div_ceil(chunk);
        // Tasks write disjoint positions of `dst` through its address.
        let out = SendPtr::new(dst);
        let dst_len = dst.len();
        (0..self.batches * chunks).into_par_iter().for_each_init(
            || (Vec::new(), Vec::new(), vec![0.0f32; chunk]),
            |(tile, packed, line), item| {
                let (bi, ci) = (item / chunks, item % chunks);
                let j0 = ci * chunk;
                let nn = chunk.min(self.n - j0);
                let panels = nn.div_ceil(nr);
                packed.resize(sgemm::packed_b_len(self.depth, nn), 0.0);
                for p in 0..self.depth {
                    let line = &mut line[..nn];
                    self.rhs
                        .gather(self.src, bi * self.src_batch, p, j0..j0 + nn, line);
                    for (jp, vals) in line.chunks(nr).enumerate() {
                        let at = sgemm::b_index(self.depth, p, jp * nr);
                        packed[at..at + vals.len()].copy_from_slice(vals);
                    }
                }
                for (rb, a) in self.a.iter().enumerate() {
                    let i0 = rb * ROW_BLOCK;
                    let rows = ROW_BLOCK.min(self.m - i0);
                    tile.resize(rows * nn, 0.0);
                    if self.depth == 0 {
                        tile.fill(0.0);
                    }
                    // SAFETY: `packed` holds B (depth × nn); the tile is rows × nn.
                    unsafe {
                        sgemm::gemm(
                            a,
                            0..self.depth,
                            packed,
                            nn,
                            tile.as_mut_ptr(),
                            nn,
                            false,
                            0..panels,
                        )
                    };
                    let base = bi * self.dst_batch;
                    for (r, row) in (i0..).zip(tile.chunks(nn)) {
                        let add = self.bias.map_or(0.0, |(b, per)| b[r / per]);
                        let start = base + self.out.row(r);
                        let mut at = 0;
                        self.out.runs(j0..j0 + nn, |off, cnt, stride| {
                            let first = start + off;
                            assert!(cnt == 0 || first + (cnt - 1) * stride < dst_len);
                            let vals = &row[at..at + cnt];
                            // SAFETY: in bounds (checked); every (batch, row, column) is one
                            // output position and each task owns its columns (SendPtr).
                            let d = out.at(first);
                            unsafe {
                                if stride == 1 {
                                    let d = std::slice::from_raw_parts_mut(d, cnt);
                                    for (d, &v) in d.iter_mut().zip(vals) {
                                        *d = v + add;
                                    }
                                } else {
                                    for (i, &v) in vals.iter().enumerate() {
                                        *d.add(i * stride) = v + add;
                                    }
                                }
                            }
                            at += cnt;
                        });
                    }
                }
            },
        );
    }
}

/// `G (m × n) = Σ_b Σ_j P_b[i, j]·Q_b[c, j]` over the `k` columns of two views, the weight
/// gradients: chunks of columns split into one contiguous run per thread, each run summed into
/// its own accumulator, the accumulators then added in run order. The split depends only on
/// the sizes and the thread count, never on which thread steals which task, so the result is
/// the same from run to run.
#[allow(clippy::too_many_arguments)]
fn product_nt(
    p_src: &[f32],
    p_view: View,
    p_batch: usize,
    m: usize,
    q_src: &[f32],
    q_view: View,
    q_batch: usize,
    n: usize,
    k: usize,
    batches: usize,
) -> Vec<f32> {
    let threads = rayon::current_num_threads().max(1);
    let per_item = threads.div_ceil(batches.max(1));
    let chunk = k.div_ceil(per_item).clamp(64, GRAD_PIXELS).min(k.max(1));
    let chunks = k.div_ceil(chunk);
    let nr = sgemm::NR;
    let (col_panels, all_panels) = (GRAD_COL_BLOCK / nr, n.div_ceil(nr));
    let items = batches * chunks;
    let runs = threads.min(items).max(1);
    let partials: Vec<Vec<f32>> = (0..runs)
        .into_par_iter()
        .map(|r| {
            let mut acc = vec![0.0f32; m * n];
            for item in r * items / runs..(r + 1) * items / runs {
                let (bi, ci) = (item / chunks, item % chunks);
                let j0 = ci * chunk;
                let kk = chunk.min(k - j0);
                // P's rows over the chunk, in blocks of rows, and Qᵀ (kk × n) packed: NR rows
                // of Q side by side, interleaved pixel by pixel; each gathered once.
                let a: Vec<PackedA> = (0..m)
                    .step_by(ROW_BLOCK)
                    .map(|i0| {
                        PackedA::from_rows(ROW_BLOCK.min(m - i0), kk, |i, line| {
                            p_view.gather(p_src, bi * p_batch, i0 + i, j0..j0 + kk, line)
                        })
                    })
                    .collect();
                let mut packed = vec![0.0f32; sgemm::packed_b_len(kk, n)];
                let mut lines = vec![0.0f32; nr * kk];
                for c0 in (0..n).step_by(nr) {
                    let cnt = nr.min(n - c0);
                    for t in 0..cnt {
                        let line = &mut lines[t * kk..(t + 1) * kk];
                        q_view.gather(q_src, bi * q_batch, c0 + t, j0..j0 + kk, line);
                    }
                    let panel = &mut packed[sgemm::b_index(kk, 0, c0)..];
                    for p in 0..kk {
                        for t in 0..cnt {
                            panel[p * nr + t] = lines[t * kk + p];
                        }
                    }
                }
                // Block by block of the result, each block staying in L2 while it
                // accumulates.
                for (rb, a) in a.iter().enumerate() {
                    for p0 in (0..all_panels).step_by(col_panels) {
                        let panels = p0..(p0 + col_panels).min(all_panels);
                        // SAFETY: `packed` is Qᵀ of depth kk for n columns; rows
                        // rb·ROW_BLOCK.. of `acc` (m × n) hold a's rows.
                        unsafe {
                            let c = acc.as_mut_ptr().add(rb * ROW_BLOCK * n);
                            sgemm::gemm(a, 0..kk, &packed, n, c, n, true, panels)
                        };
                    }
                }
            }
            acc
        })
        .collect();
    let mut partials = partials.into_iter();
    let mut g = partials.next().unwrap_or_else(|| vec![0.0f32; m * n]);
    for p in partials {
        g.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    g
}

/// Which convolution a [`MatConv`] op computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// 1×1, stride 1, no padding; weight (O, C, 1, 1).
    Pointwise,
    /// 2×2, stride 2 transposed; weight (C, O, 2, 2).
    Up2,
}

/// The sizes of one call: batch, input channels, input height and width, output channels.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Pointwise => "conv1x1",
            Kind::Up2 => "conv-transpose2x2",
        }
    }

    /// The sizes of a call, checking that the weight (and the bias, where given) fit `x`.
    fn dims(self, x: &Shape, w: &Shape, bias: Option<&Shape>) -> candle_core::Result<Dims> {
        let (b, c, h, wd) = x.dims4()?;
        let wd4 = w.dims4()?;
        let (o, fits) = match self {
            Kind::Pointwise => (wd4.0, wd4.1 == c && wd4.2 == 1 && wd4.3 == 1),
            Kind::Up2 => (wd4.1, wd4.0 == c && wd4.2 == 2 && wd4.3 == 2),
        };
        if !fits || bias.is_some_and(|b| b.dims() != [o]) {
            candle_core::bail!(
                "{}: weight {w:?} and bias {bias:?} do not fit input {x:?}",
                self.name()
            );
        }
        Ok(Dims { b, c, h, w: wd, o })
    }

    fn out_shape(self, d: Dims) -> Shape {
        match self {
            Kind::Pointwise => Shape::from((d.b, d.o, d.h, d.w)),
            Kind::Up2 => Shape::from((d.b, d.o, 2 * d.h, 2 * d.w)),
        }
    }

    /// The output's matrix view (rows: output channels, or (o, dy, dx) for Up2; columns:
    /// the input grid) and its batch stride, with the product's depth and columns.
    fn output_view(self, d: Dims) -> (View, usize) {
        let hw = d.h * d.w;
        match self {
            Kind::Pointwise => (View::dense(hw), d.o * hw),
            Kind::Up2 => (View::patches(2 * d.h, 2 * d.w, 2, 2), d.o * 4 * hw),
        }
    }

    /// The input's matrix view: rows the product's depth, columns the grid.
    fn input_view(self, d: Dims) -> View {
        View::dense(d.h * d.w)
    }

    /// Rows of the output matrix, rows of the input matrix, columns (grid positions).
    fn sizes(self, d: Dims) -> (usize, usize, usize) {
        match self {
            Kind::Pointwise => (d.o, d.c, d.h * d.w),
            Kind::Up2 => (d.o * 4, d.c, d.h * d.w),
        }
    }

    /// The weight as the forward's left operand (output rows × input rows), packed; with
    /// `transpose`, as the input gradient's (input rows × output rows).
    fn pack_weight(self, w: &[f32], d: Dims, transpose: bool) -> Vec<PackedA> {
        let (mo, mi, _) = self.sizes(d);
        // Element (output row, input row) of the weight.
        let (rs, cs) = match self {
            Kind::Pointwise => (mi, 1),
            Kind::Up2 => (1, mo),
        };
        if transpose {
            pack_rows(w, mi, mo, cs, rs)
        } else {
            pack_rows(w, mo, mi, rs, cs)
        }
    }
}

/// The forward op: (x, weight, bias) → y.
struct MatConv(Kind);

impl CustomOp3 for MatConv {
    fn name(&self) -> &'static str {
        self.0.name()
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
        let kind = self.0;
        let d = kind.dims(l1.shape(), l2.shape(), Some(l3.shape()))?;
        let (x, w, bias) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (mo, mi, n) = kind.sizes(d);
        let (out, dst_batch) = kind.output_view(d);
        let shape = kind.out_shape(d);
        let mut y = vec![0.0f32; shape.elem_count()];
        Product {
            a: &kind.pack_weight(w, d, false),
            m: mo,
            depth: mi,
            n,
            batches: d.b,
            src: x,
            src_batch: d.c * d.h * d.w,
            rhs: kind.input_view(d),
            out,
            dst_batch,
            bias: Some((bias, if kind == Kind::Up2 { 4 } else { 1 })),
        }
        .run(&mut y);
        Ok((CpuStorage::F32(y), shape))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        grads(
            self.0,
            x,
            w,
            grad,
            [x.track_op(), w.track_op(), bias.track_op()],
        )
    }
}

/// The gradients of input, weight and bias of `kind` (those `want` asks for).
fn grads(
    kind: Kind,
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    want: [bool; 3],
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    let gx = match want[0] {
        true => Some(grad.apply_op3_no_bwd(
            w,
            x,
            &Grad {
                kind,
                weight: false,
            },
        )?),
        false => None,
    };
    let gw = match want[1] {
        true => Some(grad.apply_op3_no_bwd(w, x, &Grad { kind, weight: true })?),
        false => None,
    };
    let gb = match want[2] {
        true => Some(grad.apply_op1_no_bwd(&ChannelSum)?),
        false => None,
    };
    Ok((gx, gw, gb))
}

/// [`conv1x1`]'s or [`conv_transpose2x2`]'s gradients from its input, weight and output
/// gradient, or `None` where the op would not have served the forward.
fn vjp(
    kind: Kind,
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    input: bool,
    kernels: Kernels,
) -> candle_core::Result<Option<LayerGrads>> {
    let served = match kind {
        Kind::Pointwise => conv1x1_served(x, w, kernels)?,
        Kind::Up2 => serves(x, w, kernels),
    };
    if !served {
        return Ok(None);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let (gx, gw, gb) = grads(kind, &x, &w, grad, [input, true, true])?;
    Ok(gw.zip(gb).map(|(weight, bias)| LayerGrads {
        input: gx,
        weight,
        bias,
    }))
}

/// A gradient of [`MatConv`] from (output gradient, weight, input): the input's, or with
/// `weight` the weight's.
struct Grad {
    kind: Kind,
    weight: bool,
}

impl CustomOp3 for Grad {
    fn name(&self) -> &'static str {
        if self.weight {
            "matconv-weight-grad"
        } else {
            "matconv-input-grad"
        }
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
        let kind = self.kind;
        let d = kind.dims(l3.shape(), l2.shape(), None)?;
        if l1.shape() != &kind.out_shape(d) {
            candle_core::bail!(
                "{}: output gradient {:?} does not fit input {:?}",
                kind.name(),
                l1.shape(),
                l3.shape()
            );
        }
        let (g, w, x) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (mo, mi, n) = kind.sizes(d);
        let (g_view, g_batch) = kind.output_view(d);
        let (x_view, x_batch) = (kind.input_view(d), d.c * d.h * d.w);
        if self.weight {
            // Pointwise: G (O × C) = Σ g · xᵀ; Up2: G (C × O·4) = Σ x · gᵀ, which is
            // the (C, O, 2, 2) layout.
            let gw = if kind == Kind::Up2 {
                product_nt(x, x_view, x_batch, mi, g, g_view, g_batch, mo, n, d.b)
            } else {
                product_nt(g, g_view, g_batch, mo, x, x_view, x_batch, mi, n, d.b)
            };
            return Ok((CpuStorage::F32(gw), l2.shape().clone()));
        }
        let mut gx = vec![0.0f32; x.len()];
        Product {
            a: &kind.pack_weight(w, d, true),
            m: mi,
            depth: mo,
            n,
            batches: d.b,
            src: g,
            src_batch: g_batch,
            rhs: g_view,
            out: x_view,
            dst_batch: x_batch,
            bias: None,
        }
        .run(&mut gx);
        Ok((CpuStorage::F32(gx), l3.shape().clone()))
    }
}

fn apply(kind: Kind, x: &Tensor, w: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &bias.contiguous()?, MatConv(kind))
}

/// Whether the ops of this module serve `x` and `w` under `kernels` (contiguous or not, f32
/// on the CPU).
fn serves(x: &Tensor, w: &Tensor, kernels: Kernels) -> bool {
    kernels.serve(x) && w.dtype() == DType::F32
}

/// Adds a per-channel bias to (B, O, H, W).
fn add_channel_bias(y: Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
        None => Ok(y),
    }
}

/// The bias, or zeros for the ops that always add one.
fn bias_or_zeros(bias: Option<&Tensor>, o: usize, w: &Tensor) -> candle_core::Result<Tensor> {
    match bias {
        Some(b) => Ok(b.clone()),
        None => Tensor::zeros(o, w.dtype(), w.device()),
    }
}

/// Input depth from which a 1×1 convolution takes candle's matrix product: at 1024 → 512
/// channels the op measured 0.98–1.04× that form's speed forward and 1.11–1.33× forward +
/// backward (`cargo xtask bench conv`, its 1×1 rows, on two machines), short of the 1.2× a
/// hand-written kernel must show; at 128 → 64 it measured 1.47–1.6× and 1.24–1.49×.
const POINTWISE_MAX_DEPTH: usize = 1024;

/// A 1×1 convolution: x (B, C, H, W), weight (O, C, 1, 1), optional bias (O) → (B, O, H, W).
/// One op on the crate's packed product (gathering from the image, scattering with the
/// bias) for f32 on the CPU where it pays; one candle matrix product otherwise.
pub fn conv1x1(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let o = w.dim(0)?;
    if serves(x, w, kernels) && c < POINTWISE_MAX_DEPTH {
        return apply(Kind::Pointwise, x, w, &bias_or_zeros(bias, o, w)?);
    }
    let y = w
        .reshape((o, c))?
        .broadcast_matmul(&x.reshape((b, c, h * wd))?)?
        .reshape((b, o, h, wd))?;
    add_channel_bias(y, bias)
}

/// Whether [`conv1x1`] runs on the crate's kernels for `x` and `w` (so [`conv1x1_vjp`]
/// serves it).
pub fn conv1x1_served(x: &Tensor, w: &Tensor, kernels: Kernels) -> candle_core::Result<bool> {
    Ok(serves(x, w, kernels) && x.dim(1)? < POINTWISE_MAX_DEPTH)
}

/// [`conv1x1`]'s backward as a function (see [`crate::LayerGrads`]): the gradients of input
/// (if `input`), weight and bias (zeros' gradient where the forward had none) from the input,
/// the weight and the output gradient. `None` where [`conv1x1`] takes candle's product.
pub fn conv1x1_vjp(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    input: bool,
    kernels: Kernels,
) -> candle_core::Result<Option<LayerGrads>> {
    vjp(Kind::Pointwise, x, w, grad, input, kernels)
}

/// [`conv_transpose2x2`]'s backward as a function, as [`conv1x1_vjp`].
pub fn conv_transpose2x2_vjp(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    input: bool,
    kernels: Kernels,
) -> candle_core::Result<Option<LayerGrads>> {
    vjp(Kind::Up2, x, w, grad, input, kernels)
}

/// `ConvTranspose2d(kernel 2, stride 2)`: x (B, C, H, W), weight (C, O, 2, 2), bias (O) →
/// (B, O, 2H, 2W). One op for f32 on the CPU; one candle matrix product and a permute
/// otherwise.
pub fn conv_transpose2x2(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    if serves(x, w, kernels) {
        return apply(Kind::Up2, x, w, bias);
    }
    let (b, c, h, wd) = x.dims4()?;
    let (_, o, _, _) = w.dims4()?;
    let y = w
        .reshape((c, o * 4))?
        .t()?
        .broadcast_matmul(&x.reshape((b, c, h * wd))?)?
        .reshape((b, o, 2, 2, h, wd))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((b, o, 2 * h, 2 * wd))?;
    add_channel_bias(y, Some(bias))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_rel;
    use candle_core::{Device, Var};

    /// Output and the gradients of input, weight and bias of `ours` against `theirs` (candle's
    /// conv ops), both weighted by the same random output gradient.
    fn check(
        what: &str,
        x: &Var,
        w: &Var,
        b: &Var,
        ours: &dyn Fn() -> Tensor,
        theirs: &dyn Fn() -> Tensor,
    ) {
        let (yo, yt) = (ours(), theirs());
        assert_eq!(yo.dims(), yt.dims(), "{what}: shape");
        assert!(
            max_rel(&yo, &yt) < 1e-5,
            "{what}: forward {}",
            max_rel(&yo, &yt)
        );
        let g = Tensor::randn(0f32, 1.0, yo.dims(), &Device::Cpu).unwrap();
        let go = (yo * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gt = (yt * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("input", x), ("weight", w), ("bias", b)] {
            let (a, t) = (
                go.get(v.as_tensor()).unwrap(),
                gt.get(v.as_tensor()).unwrap(),
            );
            assert!(
                max_rel(a, t) < 1e-4,
                "{what}: {name} gradient {}",
                max_rel(a, t)
            );
        }
    }

    fn var(shape: &[usize], std: f32) -> Var {
        Var::from_tensor(&Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// Sizes with odd channel counts, grids that are not a multiple of the panel width,
    /// depths beyond one block, more rows and columns than one task's block, and batches of
    /// two.
    #[test]
    fn all_three_match_candles_convolutions_with_gradients() {
        for (b, c, h, w, o) in [
            (2, 3, 5, 7, 5),
            (1, 130, 4, 9, 7),
            (2, 16, 17, 3, 33),
            (2, 300, 3, 5, 150),
        ] {
            let (x, wt, bias) = (
                var(&[b, c, h, w], 1.0),
                var(&[o, c, 1, 1], 0.1),
                var(&[o], 0.1),
            );
            let bb = || bias.as_tensor().reshape((1, o, 1, 1)).unwrap();
            check(
                &format!("1×1 {b}×{c}×{h}×{w}→{o}"),
                &x,
                &wt,
                &bias,
                &|| {
                    apply(
                        Kind::Pointwise,
                        x.as_tensor(),
                        wt.as_tensor(),
                        bias.as_tensor(),
                    )
                    .unwrap()
                },
                &|| {
                    let y = x.as_tensor().conv2d(wt.as_tensor(), 0, 1, 1, 1).unwrap();
                    y.broadcast_add(&bb()).unwrap()
                },
            );
            let wt = var(&[c, o, 2, 2], 0.1);
            check(
                &format!("2×2 transposed {b}×{c}×{h}×{w}→{o}"),
                &x,
                &wt,
                &bias,
                &|| apply(Kind::Up2, x.as_tensor(), wt.as_tensor(), bias.as_tensor()).unwrap(),
                &|| {
                    let y = x
                        .as_tensor()
                        .conv_transpose2d(wt.as_tensor(), 0, 0, 2, 1)
                        .unwrap();
                    y.broadcast_add(&bb()).unwrap()
                },
            );
        }
    }

    /// The weight gradient is summed in an order fixed by the sizes and the thread count, so
    /// repeated backward passes give the same bits (with rayon's work stealing deciding the
    /// order, they differed in the last places from run to run).
    #[test]
    fn weight_gradients_are_the_same_on_every_run() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let (x, w, b) = (
                var(&[2, 24, 96, 96], 1.0),
                var(&[20, 24, 1, 1], 0.1),
                var(&[20], 0.1),
            );
            let g = Tensor::randn(0f32, 1.0, (2, 20, 96, 96), &Device::Cpu).unwrap();
            let grad = || {
                let y = apply(Kind::Pointwise, x.as_tensor(), w.as_tensor(), b.as_tensor());
                let grads = (y.unwrap() * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                grads.get(w.as_tensor()).unwrap().flatten_all().unwrap()
            };
            let first: Vec<f32> = grad().to_vec1().unwrap();
            for _ in 0..6 {
                let again: Vec<f32> = grad().to_vec1().unwrap();
                assert!(first
                    .iter()
                    .zip(&again)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        });
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        let x = Tensor::zeros((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((4, 2, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(apply(Kind::Pointwise, &x, &w, &b).is_err());
        assert!(conv1x1(&x, &w, Some(&b), Kernels::Auto).is_err());
        let w = Tensor::zeros((4, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = apply(Kind::Up2, &x, &w, &b).unwrap_err().to_string();
        assert!(err.contains("conv-transpose2x2"), "{err}");
    }

    /// The public functions give the same values whichever kernels serve them (the ops, or
    /// candle's matrix-product forms), with and without a gradient tracked, with and without
    /// bias; from 1024 input channels a 1×1 convolution takes the matrix-product form.
    #[test]
    fn every_kernel_choice_gives_the_same_values() {
        let (x, w1, wt, bias) = (
            var(&[2, 6, 8, 12], 1.0),
            var(&[5, 6, 1, 1], 0.1),
            var(&[6, 5, 2, 2], 0.1),
            var(&[5], 0.1),
        );
        let plain = x.as_tensor().detach();
        for input in [x.as_tensor(), &plain] {
            for b in [Some(bias.as_tensor()), None] {
                let run = |k: Kernels| {
                    [
                        conv1x1(input, w1.as_tensor(), b, k).unwrap(),
                        conv_transpose2x2(input, wt.as_tensor(), bias.as_tensor(), k).unwrap(),
                    ]
                };
                for (ours, theirs) in run(Kernels::Auto).iter().zip(&run(Kernels::Candle)) {
                    assert_eq!(ours.dims(), theirs.dims());
                    assert!(max_rel(ours, theirs) < 1e-5);
                }
            }
        }
    }
}

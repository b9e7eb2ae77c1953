//! Softmax attention with an additive bias decomposed over a 2-D key grid (the relative
//! positions of SAM's ViT), forward and backward, in tiles of queries and keys with an online
//! softmax: the L × L score matrix is never held (FlashAttention-2's loops on the CPU).
//!
//! For one head (one of `BH` images × heads), tokens on a `gh × gw` grid (L = gh·gw), query i
//! and key j = (jh, jw):
//!
//! `s_ij = scale · q_i·k_j + rel_h[i, jh] + rel_w[i, jw]`, `out_i = Σ_j softmax_j(s_i) v_j`.
//!
//! The products run on the crate's packed matrix product ([`crate::sgemm`]); the element-wise
//! rows (bias, running maximum, exponentials, sums) are compiled for AVX2 + FMA where the CPU
//! has them. The forward keeps each row's log-sum-exp beside the output, so the backward
//! recomputes the probabilities tile by tile instead of storing them.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::sgemm::{b_index, gemm, packed_b_len, simd, PackedA, NR};
use crate::storage::slice;
use crate::Kernels;

/// The branch-free exponential that vectorises (within 3e-7 relative).
#[inline(always)]
fn exp(x: f32) -> f32 {
    vim_scan::Float::exp_kernel(x)
}

/// Queries per tile (a multiple of the micro-kernel's 6 rows).
const QUERY_TILE: usize = 72;
/// Keys per tile (a multiple of the micro-kernel's 16 columns).
const KEY_TILE: usize = 256;

/// Attention over a `grid` of tokens with SAM's decomposed relative-position bias: `qkv`
/// (3, BH, L, hd) holds q, k and v; `rel_h` (BH, L, gh) and `rel_w` (BH, L, gw) the bias of
/// each query towards each key row and column. Returns (BH, L, hd), differentiable in all
/// three inputs. `None` when the crate's kernels do not serve the tensors (not f32 on the CPU,
/// or [`Kernels::Candle`]): the caller composes the attention.
///
/// `queries`, where given, holds for each of the BH heads the rows × columns of the grid, from
/// its top-left, whose queries are wanted (a window that the image's edge cuts: the padding's
/// tokens are keys, but their outputs are thrown away). The other queries are not computed:
/// their outputs are zero and take no part in the gradients.
///
/// # Errors
/// Shapes that do not agree with each other or with the grid.
pub fn grid_attention(
    qkv: &Tensor,
    rel_h: &Tensor,
    rel_w: &Tensor,
    grid: (usize, usize),
    scale: f32,
    queries: Option<&[(usize, usize)]>,
    kernels: Kernels,
) -> candle_core::Result<Option<Tensor>> {
    if !kernels.serve_all(&[qkv, rel_h, rel_w]) {
        return Ok(None);
    }
    let (three, bh, l, hd) = qkv.dims4()?;
    let (gh, gw) = grid;
    if three != 3
        || l != gh * gw
        || rel_h.dims() != [bh, l, gh]
        || rel_w.dims() != [bh, l, gw]
        || hd == 0
    {
        candle_core::bail!(
            "grid_attention: qkv {:?}, rel_h {:?}, rel_w {:?} on a {gh} × {gw} grid",
            qkv.dims(),
            rel_h.dims(),
            rel_w.dims()
        );
    }
    if queries.is_some_and(|q| q.len() != bh) {
        candle_core::bail!(
            "grid_attention: {} query rectangles for {bh} heads",
            queries.map_or(0, <[_]>::len)
        );
    }
    let op = GridAttention {
        grid,
        scale,
        tiles: (QUERY_TILE, KEY_TILE),
        rows: Rows::new(),
        queries: queries.map(Arc::from),
    };
    let flat = qkv
        .contiguous()?
        .apply_op3(&rel_h.contiguous()?, &rel_w.contiguous()?, op)?;
    // The output first, then the log-sum-exp of each row: the output is a contiguous prefix.
    flat.narrow(0, 0, bh * l * hd)?
        .reshape((bh, l, hd))
        .map(Some)
}

#[derive(Clone)]
struct GridAttention {
    grid: (usize, usize),
    scale: f32,
    /// (queries, keys) per tile.
    tiles: (usize, usize),
    rows: Rows,
    /// Per head, the rectangle of wanted queries; all where `None`.
    queries: Option<Arc<[(usize, usize)]>>,
}

impl GridAttention {
    /// Head `b`'s rectangle of wanted queries.
    fn wanted(&self, b: usize) -> Option<(usize, usize)> {
        self.queries.as_ref().map(|q| q[b])
    }
}

/// The sizes every pass uses.
#[derive(Clone, Copy)]
struct Dims {
    bh: usize,
    l: usize,
    hd: usize,
    gh: usize,
    gw: usize,
    scale: f32,
    mq: usize,
    nk: usize,
    rows: Rows,
}

impl Dims {
    fn of(op: &GridAttention, l: &Layout) -> candle_core::Result<Dims> {
        let (_, bh, len, hd) = l.shape().dims4()?;
        Ok(Dims {
            bh,
            l: len,
            hd,
            gh: op.grid.0,
            gw: op.grid.1,
            scale: op.scale,
            mq: op.tiles.0,
            nk: op.tiles.1,
            rows: op.rows,
        })
    }

    fn key_tiles(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        (0..self.l)
            .step_by(self.nk)
            .map(|j0| j0..(j0 + self.nk).min(self.l))
    }

    /// The wanted queries of a head (all, or the rectangle `wanted` from the grid's top-left)
    /// in grid order, in tiles of at most `mq`.
    fn query_tiles(&self, wanted: Option<(usize, usize)>) -> Vec<Vec<usize>> {
        let rows: Vec<usize> = match wanted {
            None => (0..self.l).collect(),
            Some((vh, vw)) => {
                let gw = self.gw;
                (0..vh.min(self.gh))
                    .flat_map(|y| (0..vw.min(gw)).map(move |x| y * gw + x))
                    .collect()
            }
        };
        rows.chunks(self.mq).map(<[usize]>::to_vec).collect()
    }

    /// One head's slice of q, k or v (part 0, 1, 2).
    fn head<'a>(&self, qkv: &'a [f32], part: usize, b: usize) -> &'a [f32] {
        let n = self.l * self.hd;
        &qkv[(part * self.bh + b) * n..][..n]
    }
}

/// B operands packed once per head: a matrix's transpose (depth hd, one column per token), and
/// tiles of its rows (depth = the tile's tokens, hd columns).
fn pack_columns(x: &[f32], d: &Dims) -> Vec<f32> {
    let mut out = vec![0.0f32; packed_b_len(d.hd, d.l)];
    for (j, row) in x.chunks_exact(d.hd).enumerate() {
        for (p, &v) in row.iter().enumerate() {
            out[b_index(d.hd, p, j)] = v;
        }
    }
    out
}

fn pack_rows(x: &[f32], rows: impl ExactSizeIterator<Item = usize>, hd: usize) -> Vec<f32> {
    let depth = rows.len();
    let mut out = vec![0.0f32; packed_b_len(depth, hd)];
    for (p, i) in rows.enumerate() {
        for (c, &v) in x[i * hd..][..hd].iter().enumerate() {
            out[b_index(depth, p, c)] = v;
        }
    }
    out
}

/// Rows of `x` (hd wide) as the A operand, each scaled.
fn pack_a(x: &[f32], rows: &[usize], hd: usize, scale: f32) -> PackedA {
    PackedA::from_rows(rows.len(), hd, |r, row| {
        for (o, &v) in row.iter_mut().zip(&x[rows[r] * hd..][..hd]) {
            *o = v * scale;
        }
    })
}

/// Copies row r of `tile` (hd wide) to row `rows[r]` of `x`.
fn scatter_rows(x: &mut [f32], rows: &[usize], tile: &[f32], hd: usize) {
    for (&i, t) in rows.iter().zip(tile.chunks_exact(hd)) {
        x[i * hd..][..hd].copy_from_slice(t);
    }
}

/// `C (m × n, row stride ldc) (+)= A · B[cols]` for the key columns `cols` of a packed B
/// whose columns are the tokens (`cols.start` a multiple of [`NR`]).
fn product(a: &PackedA, b: &[f32], depth: usize, cols: std::ops::Range<usize>, c: &mut [f32]) {
    let n = cols.len();
    let b = &b[(cols.start / NR) * depth * NR..];
    assert!(c.len() >= a.rows() * n);
    // SAFETY: `b` is a packed B of depth `depth` from column `cols.start` on (a panel boundary)
    // with at least `n` columns, and `c` holds the product's rows × n floats, owned here.
    unsafe {
        gemm(
            a,
            0..depth,
            b,
            n,
            c.as_mut_ptr(),
            n,
            false,
            0..n.div_ceil(NR),
        )
    }
}

/// `C (m × n) += A · B` for a packed B of depth `a`'s depth and `n` columns.
fn product_add(a: &PackedA, b: &[f32], n: usize, c: &mut [f32]) {
    assert!(c.len() >= a.rows() * n);
    // SAFETY: `b` is a packed B of depth a.depth() and n columns; `c` holds m × n floats,
    // owned here.
    unsafe {
        gemm(
            a,
            0..a.depth(),
            b,
            n,
            c.as_mut_ptr(),
            n,
            true,
            0..n.div_ceil(NR),
        )
    }
}

/// Adds the bias of one query row to its scores for keys `keys`.
#[inline(always)]
fn add_bias(s: &mut [f32], keys: std::ops::Range<usize>, gw: usize, rh: &[f32], rw: &[f32]) {
    let mut j = keys.start;
    let mut at = 0;
    while j < keys.end {
        let (jh, jw) = (j / gw, j % gw);
        let run = (gw - jw).min(keys.end - j);
        let b = rh[jh];
        for (v, &w) in s[at..at + run].iter_mut().zip(&rw[jw..jw + run]) {
            *v += b + w;
        }
        j += run;
        at += run;
    }
}

/// Sums along each key row and column of one query's scores into `dh` and `dw`.
#[inline(always)]
fn bias_grad(ds: &[f32], keys: std::ops::Range<usize>, gw: usize, dh: &mut [f32], dw: &mut [f32]) {
    let mut j = keys.start;
    let mut at = 0;
    while j < keys.end {
        let (jh, jw) = (j / gw, j % gw);
        let run = (gw - jw).min(keys.end - j);
        let mut sum = [0.0f32; 8];
        let seg = &ds[at..at + run];
        for (c, w) in seg.chunks(8).zip(dw[jw..jw + run].chunks_mut(8)) {
            for ((s, &v), w) in sum.iter_mut().zip(c).zip(w) {
                *s += v;
                *w += v;
            }
        }
        dh[jh] += sum.iter().sum::<f32>();
        j += run;
        at += run;
    }
}

/// The largest value of a row (eight lanes, so that it vectorises).
#[inline(always)]
fn row_max(s: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let chunks = s.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &v) in m.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    rest.iter()
        .chain(&m)
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// `s ← exp(s − shift)`, returning the sum.
#[inline(always)]
fn exp_sum(s: &mut [f32], shift: f32) -> f32 {
    let mut sum = [0.0f32; 8];
    let mut chunks = s.chunks_exact_mut(8);
    for c in &mut chunks {
        for (a, v) in sum.iter_mut().zip(c.iter_mut()) {
            *v = exp(*v - shift);
            *a += *v;
        }
    }
    let mut total: f32 = sum.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp(*v - shift);
        total += *v;
    }
    total
}

/// One query row of the forward for one key tile: the bias added, the running maximum and sum
/// updated; the row left holding the probabilities (unnormalised) and the factor by which
/// the row's output so far must be scaled.
#[inline(always)]
fn forward_row(
    s: &mut [f32],
    keys: std::ops::Range<usize>,
    gw: usize,
    (rh, rw): (&[f32], &[f32]),
    (max, sum): (&mut f32, &mut f32),
) -> f32 {
    add_bias(s, keys, gw, rh, rw);
    let m = row_max(s).max(*max);
    let rescale = exp(*max - m);
    *sum = *sum * rescale + exp_sum(s, m);
    *max = m;
    rescale
}

/// One query row of the backward for one key tile: from the scores `s` and `dp = dO·vᵀ`, the
/// probabilities `p = exp(s + bias − lse)` into `s` and `ds = p ∘ (dp − D)` into `dp`, the
/// bias gradients accumulated.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_row(
    s: &mut [f32],
    dp: &mut [f32],
    keys: std::ops::Range<usize>,
    gw: usize,
    (rh, rw): (&[f32], &[f32]),
    (lse, delta): (f32, f32),
    (dh, dw): (&mut [f32], &mut [f32]),
) {
    add_bias(s, keys.clone(), gw, rh, rw);
    for (p, g) in s.iter_mut().zip(dp.iter_mut()) {
        *p = exp(*p - lse);
        *g = *p * (*g - delta);
    }
    bias_grad(dp, keys, gw, dh, dw);
}

/// The element-wise rows, compiled for AVX2 + FMA or portable.
#[derive(Clone, Copy)]
struct Rows {
    avx2: bool,
}

impl Rows {
    fn new() -> Rows {
        Rows { avx2: simd() }
    }

    fn forward(
        self,
        s: &mut [f32],
        keys: std::ops::Range<usize>,
        gw: usize,
        bias: (&[f32], &[f32]),
        state: (&mut f32, &mut f32),
    ) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is set only where the CPU has AVX2 and FMA.
            return unsafe { forward_row_avx2(s, keys, gw, bias, state) };
        }
        forward_row(s, keys, gw, bias, state)
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        self,
        s: &mut [f32],
        dp: &mut [f32],
        keys: std::ops::Range<usize>,
        gw: usize,
        bias: (&[f32], &[f32]),
        stats: (f32, f32),
        grads: (&mut [f32], &mut [f32]),
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is set only where the CPU has AVX2 and FMA.
            return unsafe { backward_row_avx2(s, dp, keys, gw, bias, stats, grads) };
        }
        backward_row(s, dp, keys, gw, bias, stats, grads)
    }
}

/// [`forward_row`] compiled with AVX2 + FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_row_avx2(
    s: &mut [f32],
    keys: std::ops::Range<usize>,
    gw: usize,
    bias: (&[f32], &[f32]),
    state: (&mut f32, &mut f32),
) -> f32 {
    forward_row(s, keys, gw, bias, state)
}

/// [`backward_row`] compiled with AVX2 + FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn backward_row_avx2(
    s: &mut [f32],
    dp: &mut [f32],
    keys: std::ops::Range<usize>,
    gw: usize,
    bias: (&[f32], &[f32]),
    stats: (f32, f32),
    grads: (&mut [f32], &mut [f32]),
) {
    backward_row(s, dp, keys, gw, bias, stats, grads)
}

/// The forward of one head's query tile (the queries `rows`): output rows (m × hd) and their
/// log-sum-exp.
#[allow(clippy::too_many_arguments)]
fn forward_tile(
    d: &Dims,
    q: &[f32],
    rows: &[usize],
    k_cols: &[f32],
    v_tiles: &[Vec<f32>],
    rel_h: &[f32],
    rel_w: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let (hd, m) = (d.hd, rows.len());
    let qa = pack_a(q, rows, hd, d.scale);
    let rows_fn = d.rows;
    let mut s = vec![0.0f32; m * d.nk];
    let (mut max, mut sum) = (vec![f32::NEG_INFINITY; m], vec![0.0f32; m]);
    let (mut out, mut lse) = (vec![0.0f32; m * hd], vec![0.0f32; m]);
    for (t, keys) in d.key_tiles().enumerate() {
        let n = keys.len();
        let s = &mut s[..m * n];
        product(&qa, k_cols, hd, keys.clone(), s);
        for (r, srow) in s.chunks_exact_mut(n).enumerate() {
            let i = rows[r];
            let bias = (&rel_h[i * d.gh..][..d.gh], &rel_w[i * d.gw..][..d.gw]);
            let rescale =
                rows_fn.forward(srow, keys.clone(), d.gw, bias, (&mut max[r], &mut sum[r]));
            if rescale != 1.0 {
                out[r * hd..][..hd].iter_mut().for_each(|o| *o *= rescale);
            }
        }
        let pa = PackedA::pack(s, m, n, n, 1);
        product_add(&pa, &v_tiles[t], hd, &mut out);
    }
    for r in 0..m {
        let inv = 1.0 / sum[r];
        out[r * hd..][..hd].iter_mut().for_each(|o| *o *= inv);
        lse[r] = max[r] + sum[r].ln();
    }
    (out, lse)
}

/// The forward of all BH heads: qkv (3, BH, L, hd), rel_h (BH, L, gh), rel_w (BH, L, gw) →
/// [output (BH, L, hd); log-sum-exp (BH, L)], flat.
fn forward_heads(
    d: &Dims,
    wanted: impl Fn(usize) -> Option<(usize, usize)>,
    qkv: &[f32],
    rel_h: &[f32],
    rel_w: &[f32],
) -> Vec<f32> {
    let (l, hd) = (d.l, d.hd);
    // Per head: k's columns, and v in key tiles, packed once for all its query tiles.
    let packed: Vec<(Vec<f32>, Vec<Vec<f32>>)> = (0..d.bh)
        .into_par_iter()
        .map(|b| {
            let v = d.head(qkv, 2, b);
            let tiles = d.key_tiles().map(|t| pack_rows(v, t, hd)).collect();
            (pack_columns(d.head(qkv, 1, b), d), tiles)
        })
        .collect();
    let tiles: Vec<(usize, Vec<usize>)> = (0..d.bh)
        .flat_map(|b| d.query_tiles(wanted(b)).into_iter().map(move |t| (b, t)))
        .collect();
    let results: Vec<(Vec<f32>, Vec<f32>)> = tiles
        .par_iter()
        .map(|(b, rows)| {
            let (k_cols, v_tiles) = &packed[*b];
            forward_tile(
                d,
                d.head(qkv, 0, *b),
                rows,
                k_cols,
                v_tiles,
                &rel_h[b * l * d.gh..][..l * d.gh],
                &rel_w[b * l * d.gw..][..l * d.gw],
            )
        })
        .collect();
    // Unwanted queries keep an output of zero (and a log-sum-exp that is never read).
    let mut flat = vec![0.0f32; d.bh * l * (hd + 1)];
    let (out, lse) = flat.split_at_mut(d.bh * l * hd);
    for ((b, rows), (o, x)) in tiles.iter().zip(results) {
        scatter_rows(&mut out[b * l * hd..][..l * hd], rows, &o, hd);
        scatter_rows(&mut lse[b * l..][..l], rows, &x, 1);
    }
    flat
}

/// The backward of all BH heads, in the layouts of [`forward_heads`]: per head, its
/// gradients.
#[allow(clippy::too_many_arguments)]
fn backward_heads(
    d: &Dims,
    wanted: impl Fn(usize) -> Option<(usize, usize)> + Sync,
    qkv: &[f32],
    rel_h: &[f32],
    rel_w: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
) -> Vec<HeadGrads> {
    let (l, hd) = (d.l, d.hd);
    (0..d.bh)
        .into_par_iter()
        .map(|b| {
            let at = b * l * hd;
            backward_head(
                d,
                wanted(b),
                d.head(qkv, 0, b),
                d.head(qkv, 1, b),
                d.head(qkv, 2, b),
                &rel_h[b * l * d.gh..][..l * d.gh],
                &rel_w[b * l * d.gw..][..l * d.gw],
                &out[at..at + l * hd],
                &lse[b * l..(b + 1) * l],
                &dout[at..at + l * hd],
            )
        })
        .collect()
}

impl CustomOp3 for GridAttention {
    fn name(&self) -> &'static str {
        "grid-attention"
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
        let d = Dims::of(self, l1)?;
        let (qkv, rel_h, rel_w) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let flat = forward_heads(&d, |b| self.wanted(b), qkv, rel_h, rel_w);
        let n = flat.len();
        Ok((CpuStorage::F32(flat), Shape::from(n)))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        rel_h: &Tensor,
        rel_w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, bh, l, hd) = qkv.dims4()?;
        let (gh, gw) = self.grid;
        let n_out = bh * l * hd;
        // Only the output's gradient: the log-sum-exp is not an output of grid_attention.
        let saved = Tensor::cat(&[res, &grad.narrow(0, 0, n_out)?.contiguous()?], 0)?;
        let bias = Tensor::cat(&[rel_h.flatten_all()?, rel_w.flatten_all()?], 0)?;
        let op = GridAttentionGrad {
            forward: self.clone(),
        };
        let flat = qkv.apply_op3_no_bwd(&bias, &saved, &op)?;
        let n_qkv = 3 * n_out;
        let dqkv = flat.narrow(0, 0, n_qkv)?.reshape((3, bh, l, hd))?;
        let dh = flat.narrow(0, n_qkv, bh * l * gh)?.reshape((bh, l, gh))?;
        let dw = flat
            .narrow(0, n_qkv + bh * l * gh, bh * l * gw)?
            .reshape((bh, l, gw))?;
        Ok((Some(dqkv), Some(dh), Some(dw)))
    }
}

/// (qkv, [rel_h; rel_w], [output; log-sum-exp; output gradient]) → [dqkv; d rel_h; d rel_w].
struct GridAttentionGrad {
    forward: GridAttention,
}

/// One head's gradients: dq, dk, dv (each L × hd), d rel_h (L × gh), d rel_w (L × gw).
type HeadGrads = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

#[allow(clippy::too_many_arguments)]
fn backward_head(
    d: &Dims,
    wanted: Option<(usize, usize)>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rel_h: &[f32],
    rel_w: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
) -> HeadGrads {
    let (l, hd) = (d.l, d.hd);
    let rows_fn = d.rows;
    let delta: Vec<f32> = out
        .chunks_exact(hd)
        .zip(dout.chunks_exact(hd))
        .map(|(o, g)| o.iter().zip(g).map(|(a, b)| a * b).sum())
        .collect();
    let (k_cols, v_cols) = (pack_columns(k, d), pack_columns(v, d));
    let q_tiles = d.query_tiles(wanted);
    // Per query tile: q (scaled) and dO as A operands, q and dO as B operands, and its rows
    // of dq.
    let qa: Vec<PackedA> = q_tiles.iter().map(|t| pack_a(q, t, hd, d.scale)).collect();
    let ga: Vec<PackedA> = q_tiles.iter().map(|t| pack_a(dout, t, hd, 1.0)).collect();
    let qb: Vec<Vec<f32>> = q_tiles
        .iter()
        .map(|t| pack_rows(q, t.iter().copied(), hd))
        .collect();
    let gb: Vec<Vec<f32>> = q_tiles
        .iter()
        .map(|t| pack_rows(dout, t.iter().copied(), hd))
        .collect();
    let mut dq_tiles: Vec<Vec<f32>> = q_tiles.iter().map(|t| vec![0.0f32; t.len() * hd]).collect();
    let (mut dk, mut dv) = (vec![0.0f32; l * hd], vec![0.0f32; l * hd]);
    let (mut dh, mut dw) = (vec![0.0f32; l * d.gh], vec![0.0f32; l * d.gw]);
    let mut s = vec![0.0f32; d.mq * d.nk];
    let mut dp = vec![0.0f32; d.mq * d.nk];
    for keys in d.key_tiles() {
        let n = keys.len();
        let k_tile = pack_rows(k, keys.clone(), hd);
        let (dk_t, dv_t) = (
            &mut dk[keys.start * hd..keys.end * hd],
            &mut dv[keys.start * hd..keys.end * hd],
        );
        for (ti, rows) in q_tiles.iter().enumerate() {
            let m = rows.len();
            let (s, dp) = (&mut s[..m * n], &mut dp[..m * n]);
            product(&qa[ti], &k_cols, hd, keys.clone(), s);
            product(&ga[ti], &v_cols, hd, keys.clone(), dp);
            for (r, (srow, grow)) in s
                .chunks_exact_mut(n)
                .zip(dp.chunks_exact_mut(n))
                .enumerate()
            {
                let i = rows[r];
                rows_fn.backward(
                    srow,
                    grow,
                    keys.clone(),
                    d.gw,
                    (&rel_h[i * d.gh..][..d.gh], &rel_w[i * d.gw..][..d.gw]),
                    (lse[i], delta[i]),
                    (&mut dh[i * d.gh..][..d.gh], &mut dw[i * d.gw..][..d.gw]),
                );
            }
            // s holds P, dp holds dS (both m × n).
            product_add(&PackedA::pack(s, n, m, 1, n), &gb[ti], hd, dv_t);
            product_add(&PackedA::pack(dp, n, m, 1, n), &qb[ti], hd, dk_t);
            product_add(
                &PackedA::pack(dp, m, n, n, 1),
                &k_tile,
                hd,
                &mut dq_tiles[ti],
            );
        }
    }
    let mut dq = vec![0.0f32; l * hd];
    for (rows, g) in q_tiles.iter().zip(&dq_tiles) {
        scatter_rows(&mut dq, rows, g, hd);
    }
    drop(dq_tiles);
    dq.iter_mut()
        .chain(dk.iter_mut())
        .for_each(|g| *g *= d.scale);
    (dq, dk, dv, dh, dw)
}

impl CustomOp3 for GridAttentionGrad {
    fn name(&self) -> &'static str {
        "grid-attention-grad"
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
        let d = Dims::of(&self.forward, l1)?;
        let (qkv, bias, saved) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (bh, l, hd) = (d.bh, d.l, d.hd);
        let (rel_h, rel_w) = bias.split_at(bh * l * d.gh);
        let (out, rest) = saved.split_at(bh * l * hd);
        let (lse, dout) = rest.split_at(bh * l);
        let wanted = |b| self.forward.wanted(b);
        let heads = backward_heads(&d, wanted, qkv, rel_h, rel_w, out, lse, dout);
        let mut flat = Vec::with_capacity(3 * bh * l * hd + bh * l * (d.gh + d.gw));
        for part in 0..3 {
            for h in &heads {
                flat.extend_from_slice([&h.0, &h.1, &h.2][part]);
            }
        }
        heads.iter().for_each(|h| flat.extend_from_slice(&h.3));
        heads.iter().for_each(|h| flat.extend_from_slice(&h.4));
        let n = flat.len();
        Ok((CpuStorage::F32(flat), Shape::from(n)))
    }
}

/// SAM's attention between its qkv and output projections, on tokens in the layout those
/// linear layers use: `qkv` (B, gh, gw, 3·heads·hd), each token's features ordered (q, k, v) ×
/// heads × hd, and the relative-position tables `table_h` (2·gh − 1, hd) and `table_w`
/// (2·gw − 1, hd) → (B, gh, gw, heads·hd). Differentiable in all three.
///
/// It is [`grid_attention`] with the decomposed bias computed inside the op from the unscaled
/// q (`rel_h[i, jh] = q_i · table_h[ih − jh + gh − 1]`, likewise along w) and the heads
/// gathered and scattered inside it: composed of candle's ops, the head-major copies, the
/// bias products and the reshapes between them are graph nodes, each a zero-filled gradient
/// and an addition in the backward pass, and the copies are kept for it. `queries` as for
/// [`grid_attention`], one rectangle per image and head (image-major). `None` when the
/// crate's kernels do not serve the tensors.
///
/// # Errors
/// Shapes that do not agree with each other or with `heads`.
pub fn rel_pos_attention(
    qkv: &Tensor,
    table_h: &Tensor,
    table_w: &Tensor,
    heads: usize,
    scale: f32,
    queries: Option<&[(usize, usize)]>,
    kernels: Kernels,
) -> candle_core::Result<Option<Tensor>> {
    if !kernels.serve_all(&[qkv, table_h, table_w]) {
        return Ok(None);
    }
    let (b, gh, gw, d3) = qkv.dims4()?;
    let hd = if heads == 0 { 0 } else { d3 / (3 * heads) };
    if hd == 0
        || gh == 0
        || gw == 0
        || d3 != 3 * heads * hd
        || table_h.dims() != [2 * gh - 1, hd]
        || table_w.dims() != [2 * gw - 1, hd]
    {
        candle_core::bail!(
            "rel_pos_attention: qkv {:?} with {heads} heads, tables {:?} and {:?}",
            qkv.dims(),
            table_h.dims(),
            table_w.dims()
        );
    }
    if queries.is_some_and(|q| q.len() != b * heads) {
        candle_core::bail!(
            "rel_pos_attention: {} query rectangles for {} heads",
            queries.map_or(0, <[_]>::len),
            b * heads
        );
    }
    let op = RelPosAttention {
        core: GridAttention {
            grid: (gh, gw),
            scale,
            tiles: (QUERY_TILE, KEY_TILE),
            rows: Rows::new(),
            queries: queries.map(Arc::from),
        },
        heads,
        lse: Arc::default(),
    };
    qkv.contiguous()?
        .apply_op3(&table_h.contiguous()?, &table_w.contiguous()?, op)
        .map(Some)
}

#[derive(Clone)]
struct RelPosAttention {
    core: GridAttention,
    heads: usize,
    /// Each head's rows' log-sum-exp (BH, L), set by the forward for the backward pass; kept
    /// as long as the graph keeps the op.
    lse: Arc<std::sync::Mutex<Option<Arc<Vec<f32>>>>>,
}

impl RelPosAttention {
    /// The sizes, from qkv's (B, gh, gw, 3·D).
    fn dims(&self, qkv: &Shape) -> candle_core::Result<Dims> {
        let (b, gh, gw, d3) = qkv.dims4()?;
        Ok(Dims {
            bh: b * self.heads,
            l: gh * gw,
            hd: d3 / (3 * self.heads),
            gh,
            gw,
            scale: self.core.scale,
            mq: self.core.tiles.0,
            nk: self.core.tiles.1,
            rows: self.core.rows,
        })
    }

    /// Token-major (B, L, parts, heads, hd) → head-major (parts, BH, L, hd).
    fn to_heads(&self, d: &Dims, x: &[f32], parts: usize) -> Vec<f32> {
        let (l, hd, heads) = (d.l, d.hd, self.heads);
        let mut out = vec![0.0f32; parts * d.bh * l * hd];
        out.par_chunks_mut(l * hd).enumerate().for_each(|(i, dst)| {
            let (part, bh) = (i / d.bh, i % d.bh);
            let (b, h) = (bh / heads, bh % heads);
            for (t, row) in dst.chunks_exact_mut(hd).enumerate() {
                let at = (((b * l + t) * parts + part) * heads + h) * hd;
                row.copy_from_slice(&x[at..at + hd]);
            }
        });
        out
    }

    /// Head-major (parts, BH, L, hd) → token-major (B, L, parts, heads, hd), parts given as
    /// slices of BH·L·hd each.
    fn to_tokens(&self, d: &Dims, parts: &[&[f32]]) -> Vec<f32> {
        let (l, hd, heads) = (d.l, d.hd, self.heads);
        let row = parts.len() * heads * hd;
        let mut out = vec![0.0f32; d.bh / heads * l * row];
        out.par_chunks_mut(row).enumerate().for_each(|(bt, dst)| {
            let (b, t) = (bt / l, bt % l);
            for (part, src) in parts.iter().enumerate() {
                for h in 0..heads {
                    let from = ((b * heads + h) * l + t) * hd;
                    dst[(part * heads + h) * hd..][..hd].copy_from_slice(&src[from..from + hd]);
                }
            }
        });
        out
    }
}

/// `Σ a_i b_i` in eight lanes (so that it vectorises).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The decomposed bias of every head's queries: q (BH, L, hd) head-major → rel_h (BH, L, gh)
/// and rel_w (BH, L, gw).
fn rel_bias(d: &Dims, q: &[f32], th: &[f32], tw: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (hd, gh, gw) = (d.hd, d.gh, d.gw);
    let mut rh = vec![0.0f32; d.bh * d.l * gh];
    let mut rw = vec![0.0f32; d.bh * d.l * gw];
    rh.par_chunks_mut(d.l * gh)
        .zip(rw.par_chunks_mut(d.l * gw))
        .zip(q.par_chunks(d.l * hd))
        .for_each(|((rh, rw), q)| {
            for (i, qi) in q.chunks_exact(hd).enumerate() {
                let (y, x) = (i / gw, i % gw);
                for (ky, o) in rh[i * gh..][..gh].iter_mut().enumerate() {
                    *o = dot(qi, &th[(y + gh - 1 - ky) * hd..][..hd]);
                }
                for (kx, o) in rw[i * gw..][..gw].iter_mut().enumerate() {
                    *o = dot(qi, &tw[(x + gw - 1 - kx) * hd..][..hd]);
                }
            }
        });
    (rh, rw)
}

impl CustomOp3 for RelPosAttention {
    fn name(&self) -> &'static str {
        "rel-pos-attention"
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
        let d = self.dims(l1.shape())?;
        let (qkv, th, tw) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let heads = self.to_heads(&d, qkv, 3);
        let (rh, rw) = rel_bias(&d, &heads[..d.bh * d.l * d.hd], th, tw);
        let mut flat = forward_heads(&d, |b| self.core.wanted(b), &heads, &rh, &rw);
        let lse = flat.split_off(d.bh * d.l * d.hd);
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(lse));
        let out = self.to_tokens(&d, &[&flat]);
        let (b, gh, gw, _) = l1.shape().dims4()?;
        let shape = Shape::from((b, gh, gw, self.heads * d.hd));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        table_h: &Tensor,
        table_w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(lse) = lse else {
            candle_core::bail!("rel_pos_attention: backward pass before the forward ran");
        };
        let tables = Tensor::cat(&[table_h.flatten_all()?, table_w.flatten_all()?], 0)?;
        let saved = Tensor::cat(&[res.flatten_all()?, grad.contiguous()?.flatten_all()?], 0)?;
        let op = RelPosAttentionGrad {
            forward: self.clone(),
            lse,
        };
        let flat = qkv.apply_op3_no_bwd(&tables, &saved, &op)?;
        let (n_qkv, n_h) = (qkv.elem_count(), table_h.elem_count());
        let dqkv = flat.narrow(0, 0, n_qkv)?.reshape(qkv.dims())?;
        let dh = flat.narrow(0, n_qkv, n_h)?.reshape(table_h.dims())?;
        let dw = flat
            .narrow(0, n_qkv + n_h, table_w.elem_count())?
            .reshape(table_w.dims())?;
        Ok((Some(dqkv), Some(dh), Some(dw)))
    }
}

/// (qkv, [table_h; table_w], [output; output gradient]) → [dqkv; d table_h; d table_w].
struct RelPosAttentionGrad {
    forward: RelPosAttention,
    lse: Arc<Vec<f32>>,
}

impl CustomOp3 for RelPosAttentionGrad {
    fn name(&self) -> &'static str {
        "rel-pos-attention-grad"
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
        let op = &self.forward;
        let d = op.dims(l1.shape())?;
        let (qkv, tables, saved) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (l, hd, gh, gw) = (d.l, d.hd, d.gh, d.gw);
        let (th, tw) = tables.split_at((2 * gh - 1) * hd);
        let (out, dout) = saved.split_at(saved.len() / 2);
        let heads = op.to_heads(&d, qkv, 3);
        let q = &heads[..d.bh * l * hd];
        let (rh, rw) = rel_bias(&d, q, th, tw);
        let (out, dout) = (op.to_heads(&d, out, 1), op.to_heads(&d, dout, 1));
        let wanted = |b| op.core.wanted(b);
        let mut grads = backward_heads(&d, wanted, &heads, &rh, &rw, &out, &self.lse, &dout);
        drop((out, dout, rh, rw));
        // The bias's share: dq += Σ_k d rel · table row, d table row += Σ d rel · q, per head
        // into its own tables, summed after.
        let tables: Vec<(Vec<f32>, Vec<f32>)> = grads
            .par_iter_mut()
            .zip(q.par_chunks(l * hd))
            .map(|((dq, _, _, dh, dw), q)| {
                let (mut gth, mut gtw) = (vec![0.0f32; th.len()], vec![0.0f32; tw.len()]);
                for (i, (qi, dqi)) in q.chunks_exact(hd).zip(dq.chunks_exact_mut(hd)).enumerate() {
                    let (y, x) = (i / gw, i % gw);
                    let pairs = dh[i * gh..][..gh]
                        .iter()
                        .enumerate()
                        .map(|(ky, &g)| ((y + gh - 1 - ky) * hd, g, true))
                        .chain(
                            dw[i * gw..][..gw]
                                .iter()
                                .enumerate()
                                .map(|(kx, &g)| ((x + gw - 1 - kx) * hd, g, false)),
                        );
                    for (row, g, along_h) in pairs {
                        if g == 0.0 {
                            continue;
                        }
                        let (t, gt) = if along_h {
                            (&th[row..row + hd], &mut gth[row..row + hd])
                        } else {
                            (&tw[row..row + hd], &mut gtw[row..row + hd])
                        };
                        for (((dqv, gtv), &tv), &qv) in
                            dqi.iter_mut().zip(gt.iter_mut()).zip(t).zip(qi)
                        {
                            *dqv += g * tv;
                            *gtv += g * qv;
                        }
                    }
                }
                (gth, gtw)
            })
            .collect();
        let parts: Vec<Vec<f32>> = (0..3)
            .map(|p| {
                let mut all = Vec::with_capacity(d.bh * l * hd);
                for g in &grads {
                    all.extend_from_slice([&g.0, &g.1, &g.2][p]);
                }
                all
            })
            .collect();
        drop(grads);
        let mut flat = op.to_tokens(&d, &[&parts[0], &parts[1], &parts[2]]);
        drop(parts);
        for (j, n) in [(0usize, th.len()), (1, tw.len())] {
            let start = flat.len();
            flat.resize(start + n, 0.0);
            for t in &tables {
                let src = if j == 0 { &t.0 } else { &t.1 };
                for (a, &v) in flat[start..].iter_mut().zip(src) {
                    *a += v;
                }
            }
        }
        let n = flat.len();
        Ok((CpuStorage::F32(flat), Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_rel, values, var, weighted_grads};
    use candle_core::{Device, D};

    /// The attention composed of candle's ops, the L × L matrix whole.
    fn composed(
        qkv: &Tensor,
        rel_h: &Tensor,
        rel_w: &Tensor,
        grid: (usize, usize),
        scale: f32,
    ) -> Tensor {
        let (_, bh, l, hd) = qkv.dims4().unwrap();
        let (gh, gw) = grid;
        let (q, k, v) = (
            qkv.get(0).unwrap(),
            qkv.get(1).unwrap(),
            qkv.get(2).unwrap(),
        );
        let s = (q * scale as f64).unwrap().matmul(&k.t().unwrap()).unwrap();
        let s = s
            .reshape((bh, l, gh, gw))
            .unwrap()
            .broadcast_add(&rel_h.unsqueeze(3).unwrap())
            .unwrap()
            .broadcast_add(&rel_w.unsqueeze(2).unwrap())
            .unwrap()
            .reshape((bh, l, l))
            .unwrap();
        let e = s
            .broadcast_sub(&s.max_keepdim(D::Minus1).unwrap())
            .unwrap()
            .exp()
            .unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        let _ = hd;
        p.matmul(&v).unwrap()
    }

    fn op_with_tiles(
        qkv: &Tensor,
        rel_h: &Tensor,
        rel_w: &Tensor,
        grid: (usize, usize),
        scale: f32,
        tiles: (usize, usize),
        avx2: bool,
    ) -> Tensor {
        let (_, bh, l, hd) = qkv.dims4().unwrap();
        let op = GridAttention {
            grid,
            scale,
            tiles,
            rows: Rows { avx2 },
            queries: None,
        };
        qkv.apply_op3(rel_h, rel_w, op)
            .unwrap()
            .narrow(0, 0, bh * l * hd)
            .unwrap()
            .reshape((bh, l, hd))
            .unwrap()
    }

    /// Forward and all three gradients equal the composed attention's, with one tile and with
    /// many (partial tiles on both axes), on the AVX2 rows and the portable ones.
    #[test]
    fn equals_the_composed_attention_forward_and_backward() {
        let dev = Device::Cpu;
        for (bh, grid, hd, tiles) in [
            (3, (6, 9), 8, (12, 16)),
            (2, (5, 7), 16, (72, 256)),
            (1, (9, 8), 12, (6, 32)),
        ] {
            let l = grid.0 * grid.1;
            let scale = (hd as f32).powf(-0.5);
            let qkv = var(&[3, bh, l, hd], 1);
            let rel_h = var(&[bh, l, grid.0], 2);
            let rel_w = var(&[bh, l, grid.1], 3);
            let weights = Tensor::from_vec(values(bh * l * hd, 4), (bh, l, hd), &dev).unwrap();
            let want = composed(&qkv, &rel_h, &rel_w, grid, scale);
            let gw = weighted_grads(&want, &weights);
            for avx2 in [false, simd()] {
                let got = op_with_tiles(&qkv, &rel_h, &rel_w, grid, scale, tiles, avx2);
                assert!(
                    max_rel(&got, &want) < 1e-5,
                    "forward {grid:?} {tiles:?} {avx2}"
                );
                let gg = weighted_grads(&got, &weights);
                for (name, v) in [("qkv", &qkv), ("rel_h", &rel_h), ("rel_w", &rel_w)] {
                    let (a, b) = (gg.get(v).unwrap(), gw.get(v).unwrap());
                    let e = max_rel(a, b);
                    assert!(e < 1e-4, "d{name} {grid:?} {tiles:?} {avx2}: {e}");
                }
            }
        }
    }

    /// With a rectangle of wanted queries per head, the wanted rows equal the composed
    /// attention's, the others are zero, and the gradients are the composed attention's with
    /// the unwanted rows' outputs left out of the loss (the padding's keys still count).
    #[test]
    fn unwanted_queries_are_skipped_exactly() {
        let dev = Device::Cpu;
        let (bh, grid, hd) = (4, (6, 9), 8);
        let l = grid.0 * grid.1;
        let wanted = [(6, 9), (4, 9), (6, 5), (2, 3)];
        let mask: Vec<f32> = wanted
            .iter()
            .flat_map(|&(vh, vw)| {
                (0..l).flat_map(move |i| {
                    let keep = i / grid.1 < vh && i % grid.1 < vw;
                    std::iter::repeat_n(if keep { 1.0 } else { 0.0 }, hd)
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (bh, l, hd), &dev).unwrap();
        let scale = (hd as f32).powf(-0.5);
        let qkv = var(&[3, bh, l, hd], 11);
        let rel_h = var(&[bh, l, grid.0], 12);
        let rel_w = var(&[bh, l, grid.1], 13);
        let weights = Tensor::from_vec(values(bh * l * hd, 14), (bh, l, hd), &dev).unwrap();
        let want = (composed(&qkv, &rel_h, &rel_w, grid, scale) * &mask).unwrap();
        let gw = weighted_grads(&want, &weights);
        for tiles in [(72, 256), (6, 16)] {
            let op = GridAttention {
                grid,
                scale,
                tiles,
                rows: Rows::new(),
                queries: Some(Arc::from(&wanted[..])),
            };
            let got = qkv
                .apply_op3(&rel_h, &rel_w, op)
                .unwrap()
                .narrow(0, 0, bh * l * hd)
                .unwrap()
                .reshape((bh, l, hd))
                .unwrap();
            // Exactly zero where unwanted.
            let outside = (&got * (1.0 - &mask).unwrap()).unwrap();
            assert_eq!(
                outside
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
            assert!(max_rel(&got, &want) < 1e-5, "forward {tiles:?}");
            let gg = weighted_grads(&got, &weights);
            for (name, v) in [("qkv", &qkv), ("rel_h", &rel_h), ("rel_w", &rel_w)] {
                let e = max_rel(gg.get(v).unwrap(), gw.get(v).unwrap());
                assert!(e < 1e-4, "d{name} {tiles:?}: {e}");
            }
        }
        let rh = Tensor::zeros((bh, l, grid.0), candle_core::DType::F32, &dev).unwrap();
        let rw = Tensor::zeros((bh, l, grid.1), candle_core::DType::F32, &dev).unwrap();
        let q = qkv.as_tensor();
        let short = grid_attention(q, &rh, &rw, grid, scale, Some(&wanted[..3]), Kernels::Auto);
        assert!(short.is_err());
    }

    /// SAM's attention composed as the model did before the op: the heads gathered with
    /// candle's permutes, the decomposed bias from the tables by gathered rows and products,
    /// [`grid_attention`], and the output laid back out per token.
    fn rel_pos_composed(
        qkv: &Tensor,
        th: &Tensor,
        tw: &Tensor,
        heads: usize,
        scale: f32,
        queries: Option<&[(usize, usize)]>,
    ) -> Tensor {
        let (b, gh, gw, d3) = qkv.dims4().unwrap();
        let (hd, l, bh) = (d3 / (3 * heads), gh * gw, b * heads);
        let hm = qkv
            .reshape((b, l, 3, heads, hd))
            .unwrap()
            .permute((2, 0, 3, 1, 4))
            .unwrap()
            .reshape((3, bh, l, hd))
            .unwrap()
            .contiguous()
            .unwrap();
        let q = hm.get(0).unwrap();
        let rows = |t: &Tensor, n: usize| {
            let idx: Vec<u32> = (0..n)
                .flat_map(|i| (0..n).map(move |j| (i + n - 1 - j) as u32))
                .collect();
            let idx = Tensor::from_vec(idx, n * n, &Device::Cpu).unwrap();
            t.index_select(&idx, 0)
                .unwrap()
                .reshape((n, n, hd))
                .unwrap()
        };
        let (rh, rw) = (rows(th, gh), rows(tw, gw));
        let rq = q.reshape((bh, gh, gw, 1, hd)).unwrap();
        // rel_h[b, y, x, ky] = q[b, y, x] · rh[y, ky]; rel_w[b, y, x, kx] = q[b, y, x] · rw[x, kx].
        let bias = |r: Tensor, n: usize| {
            rq.broadcast_mul(&r)
                .unwrap()
                .sum(4)
                .unwrap()
                .reshape((bh, l, n))
                .unwrap()
        };
        let rel_h = bias(rh.reshape((1, gh, 1, gh, hd)).unwrap(), gh);
        let rel_w = bias(rw.reshape((1, 1, gw, gw, hd)).unwrap(), gw);
        grid_attention(&hm, &rel_h, &rel_w, (gh, gw), scale, queries, Kernels::Auto)
            .unwrap()
            .unwrap()
            .reshape((b, heads, gh, gw, hd))
            .unwrap()
            .permute((0, 2, 3, 1, 4))
            .unwrap()
            .reshape((b, gh, gw, heads * hd))
            .unwrap()
    }

    /// The op on tokens equals the composition: forward and the gradients of qkv and both
    /// tables, for several grids and head counts, with and without skipped queries.
    #[test]
    fn rel_pos_attention_equals_its_composition() {
        let dev = Device::Cpu;
        for (b, grid, heads, hd, wanted) in [
            (2usize, (5usize, 7usize), 3usize, 8usize, None),
            (1, (9, 8), 2, 16, None),
            (
                3,
                (6, 6),
                2,
                12,
                Some(vec![(6, 6), (6, 6), (4, 6), (4, 6), (2, 3), (2, 3)]),
            ),
        ] {
            let (gh, gw) = grid;
            let scale = (hd as f32).powf(-0.5);
            let qkv = var(&[b, gh, gw, 3 * heads * hd], 21);
            let th = var(&[2 * gh - 1, hd], 22);
            let tw = var(&[2 * gw - 1, hd], 23);
            let queries = wanted.as_deref();
            let want = rel_pos_composed(&qkv, &th, &tw, heads, scale, queries);
            let got = rel_pos_attention(&qkv, &th, &tw, heads, scale, queries, Kernels::Auto)
                .unwrap()
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(max_rel(&got, &want) < 1e-5, "forward {grid:?}");
            let weights = Tensor::from_vec(values(got.elem_count(), 24), got.dims(), &dev).unwrap();
            let gw_ = weighted_grads(&want, &weights);
            // Twice over one graph: the op keeps what its backward reads.
            for pass in 0..2 {
                let gg = weighted_grads(&got, &weights);
                for (name, v) in [("qkv", &qkv), ("table_h", &th), ("table_w", &tw)] {
                    let e = max_rel(gg.get(v).unwrap(), gw_.get(v).unwrap());
                    assert!(e < 1e-4, "d{name} {grid:?} pass {pass}: {e}");
                }
            }
        }
        // Shapes that do not fit, and tensors not served.
        let qkv = Tensor::zeros((1, 3, 4, 24), candle_core::DType::F32, &dev).unwrap();
        let th = Tensor::zeros((5, 4), candle_core::DType::F32, &dev).unwrap();
        let tw = Tensor::zeros((7, 4), candle_core::DType::F32, &dev).unwrap();
        let attend = |heads, th: &Tensor, q: Option<&[(usize, usize)]>, k| {
            rel_pos_attention(&qkv, th, &tw, heads, 0.5, q, k)
        };
        assert!(attend(2, &th, None, Kernels::Auto).unwrap().is_some());
        assert!(attend(3, &th, None, Kernels::Auto).is_err());
        assert!(attend(0, &th, None, Kernels::Auto).is_err());
        assert!(attend(2, &tw, None, Kernels::Auto).is_err());
        assert!(attend(2, &th, Some(&[(3, 4)]), Kernels::Auto).is_err());
        assert!(attend(2, &th, None, Kernels::Candle).unwrap().is_none());
        let empty = Tensor::zeros((1, 0, 4, 24), candle_core::DType::F32, &dev).unwrap();
        assert!(rel_pos_attention(&empty, &th, &tw, 2, 0.5, None, Kernels::Auto).is_err());
    }

    #[test]
    fn mismatched_shapes_are_errors_and_other_tensors_are_not_served() {
        let dev = Device::Cpu;
        let qkv = Tensor::zeros((3, 2, 12, 4), candle_core::DType::F32, &dev).unwrap();
        let rh = Tensor::zeros((2, 12, 3), candle_core::DType::F32, &dev).unwrap();
        let rw = Tensor::zeros((2, 12, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(
            grid_attention(&qkv, &rh, &rw, (3, 4), 0.5, None, Kernels::Auto)
                .unwrap()
                .is_some()
        );
        assert!(grid_attention(&qkv, &rh, &rw, (4, 3), 0.5, None, Kernels::Auto).is_err());
        assert!(
            grid_attention(&qkv, &rh, &rw, (3, 4), 0.5, None, Kernels::Candle)
                .unwrap()
                .is_none()
        );
        let q64 = qkv.to_dtype(candle_core::DType::F64).unwrap();
        assert!(
            grid_attention(&q64, &rh, &rw, (3, 4), 0.5, None, Kernels::Auto)
                .unwrap()
                .is_none()
        );
    }
}

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
//! rows (bias, running maximum, exponentials, sums) are compiled for AVX-512F and for AVX2 +
//! FMA, and run on the widest the CPU has. The forward keeps each row's log-sum-exp beside
//! the output, so the backward recomputes the probabilities tile by tile instead of storing
//! them.
//!
//! The tiles read q, k, v, the output and its gradient in place, wherever a layout puts a
//! head's rows ([`Place`]: head-major for [`grid_attention`], the linear layers' token-major
//! layout for [`rel_pos_attention`]), and write their rows of the output and of the gradients
//! straight into the op's result: no head-major copy is made on either side.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::rowpath::RowPath;
use crate::sgemm::{b_index, dot, gemm, gemm_in_place, packed_b_len, PackedA, NR};
use crate::storage::slice;
use crate::{Kernels, SendPtr};

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
        rows: RowPath::detect(),
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
    /// The path the element-wise rows take.
    rows: RowPath,
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
    /// The path the element-wise rows take.
    rows: RowPath,
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
}

/// Where the rows of the heads' q, k and v (or of a tensor of one part) lie in a buffer: row
/// i of part p of head b (image b / heads, that image's head b % heads) starts at
/// `p·part + (b / heads)·image + (b % heads)·head + i·stride` and is hd floats long.
#[derive(Clone, Copy, Debug)]
struct Place {
    heads: usize,
    part: usize,
    image: usize,
    head: usize,
    stride: usize,
}

impl Place {
    /// Head-major (parts, BH, L, width): [`grid_attention`]'s layout.
    fn head_major(bh: usize, l: usize, width: usize) -> Place {
        Place {
            heads: 1,
            part: bh * l * width,
            image: l * width,
            head: 0,
            stride: width,
        }
    }

    /// Token-major (B, L, parts, heads, hd): SAM's qkv (3 parts) and the attention's output
    /// (one part), the layouts of the linear layers around the attention.
    fn tokens(heads: usize, l: usize, hd: usize, parts: usize) -> Place {
        let width = heads * hd;
        Place {
            heads,
            part: width,
            image: l * parts * width,
            head: hd,
            stride: parts * width,
        }
    }

    #[inline(always)]
    fn at(&self, part: usize, b: usize, i: usize) -> usize {
        part * self.part
            + (b / self.heads) * self.image
            + (b % self.heads) * self.head
            + i * self.stride
    }
}

/// A buffer read as rows of `width` floats placed by a [`Place`].
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    place: Place,
    width: usize,
}

impl<'a> View<'a> {
    #[inline(always)]
    fn row(&self, part: usize, b: usize, i: usize) -> &'a [f32] {
        &self.data[self.place.at(part, b, i)..][..self.width]
    }
}

/// A buffer that the tasks of a parallel loop write rows of (placed by a [`Place`]), each row
/// by one task only.
#[derive(Clone, Copy)]
struct Sink {
    ptr: SendPtr,
    len: usize,
    place: Place,
    width: usize,
}

impl Sink {
    fn new(buffer: &mut [f32], place: Place, width: usize) -> Sink {
        Sink {
            ptr: SendPtr::new(buffer),
            len: buffer.len(),
            place,
            width,
        }
    }

    /// Writes row i of part `part` of head b.
    ///
    /// # Safety
    /// The buffer outlives the loop, and no other task writes this row (SendPtr's invariant).
    unsafe fn write(&self, part: usize, b: usize, i: usize, row: &[f32]) {
        let at = self.place.at(part, b, i);
        assert!(row.len() == self.width && at + self.width <= self.len);
        // SAFETY: in bounds (asserted); no other task writes these floats (the caller's
        // contract), and `row` is memory of the caller's, not the buffer's.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), self.ptr.at(at), self.width) }
    }
}

/// B operand of depth `depth` (the rows' width) with one column per row of `row` (`n` rows):
/// a matrix's transpose packed.
fn pack_columns<'a>(n: usize, depth: usize, row: impl Fn(usize) -> &'a [f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; packed_b_len(depth, n)];
    for j in 0..n {
        for (p, &v) in row(j).iter().enumerate() {
            out[b_index(depth, p, j)] = v;
        }
    }
    out
}

/// B operand of the rows `rows` (depth = their count, `width` columns).
fn pack_rows<'a>(
    rows: impl ExactSizeIterator<Item = usize>,
    width: usize,
    row: impl Fn(usize) -> &'a [f32],
) -> Vec<f32> {
    let depth = rows.len();
    let mut out = vec![0.0f32; packed_b_len(depth, width)];
    for (p, i) in rows.enumerate() {
        for (c, &v) in row(i).iter().enumerate() {
            out[b_index(depth, p, c)] = v;
        }
    }
    out
}

/// The rows `rows` of one part of head b as the A operand.
fn pack_a(x: &View, part: usize, b: usize, rows: &[usize]) -> PackedA {
    PackedA::from_rows(rows.len(), x.width, |r, dst| {
        dst.copy_from_slice(x.row(part, b, rows[r]))
    })
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

/// `C (rows.len() × n) += A · B` for A read where it lies ([`gemm_in_place`]: row i's step p
/// at `a[rows[i] + p·step]`) and a packed B of depth `depth` and n columns.
fn product_add_in_place(
    a: &[f32],
    (rows, step): (&[usize], usize),
    depth: usize,
    b: &[f32],
    n: usize,
    c: &mut [f32],
) {
    assert!(c.len() >= rows.len() * n);
    // SAFETY: `b` is a packed B of depth `depth` and n columns; `c` holds rows.len() × n
    // floats, owned here; `gemm_in_place` checks A's reach.
    unsafe {
        gemm_in_place(
            a,
            rows,
            step,
            0..depth,
            b,
            n,
            c.as_mut_ptr(),
            n,
            true,
            0..n.div_ceil(NR),
        )
    }
}

/// The rows of an m × n row-major matrix read in place as an A operand (depth n), and of its
/// transpose (n rows, depth m).
fn in_place_rows(m: usize, n: usize) -> [(Vec<usize>, usize); 2] {
    [((0..m).map(|r| r * n).collect(), 1), ((0..n).collect(), n)]
}

/// SAM's relative-position tables (2g − 1, hd) for a gh × gw grid, packed for the products
/// that take the decomposed bias from q and give the bias's gradients back.
struct Tables {
    gh: usize,
    gw: usize,
    hd: usize,
    /// Each table as a B operand of depth hd, one column per table row: `q · tableᵀ`.
    cols: [Vec<f32>; 2],
    /// Each table as a B operand of depth 2g − 1 and hd columns: `d rel · table`.
    rows: [Vec<f32>; 2],
}

impl Tables {
    fn new(th: &[f32], tw: &[f32], (gh, gw): (usize, usize), hd: usize) -> Tables {
        let cols = |t: &[f32], n: usize| pack_columns(n, hd, |r| &t[r * hd..][..hd]);
        let rows = |t: &[f32], n: usize| pack_rows(0..n, hd, |r| &t[r * hd..][..hd]);
        let (nh, nw) = (2 * gh - 1, 2 * gw - 1);
        Tables {
            gh,
            gw,
            hd,
            cols: [cols(th, nh), cols(tw, nw)],
            rows: [rows(th, nh), rows(tw, nw)],
        }
    }

    /// The bias of the queries `rows` from their (unscaled) q packed as `qa`: (m × gh, m × gw),
    /// `rel_h[i, jh] = q_i · table_h[ih − jh + gh − 1]`, likewise along w. Each query's products
    /// with every table row are one small matrix product; the bias picks gh (gw) of them.
    fn bias(&self, qa: &PackedA, rows: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let m = rows.len();
        let mut out = [vec![0.0f32; m * self.gh], vec![0.0f32; m * self.gw]];
        for (axis, (o, g)) in out.iter_mut().zip([self.gh, self.gw]).enumerate() {
            let n = 2 * g - 1;
            let mut full = vec![0.0f32; m * n];
            product(qa, &self.cols[axis], self.hd, 0..n, &mut full);
            for ((&i, f), o) in rows
                .iter()
                .zip(full.chunks_exact(n))
                .zip(o.chunks_exact_mut(g))
            {
                let y = self.coord(axis, i);
                for (k, v) in o.iter_mut().enumerate() {
                    *v = f[y + g - 1 - k];
                }
            }
        }
        let [rh, rw] = out;
        (rh, rw)
    }

    /// Query i's row (axis 0) or column (axis 1) on the grid.
    fn coord(&self, axis: usize, i: usize) -> usize {
        if axis == 0 {
            i / self.gw
        } else {
            i % self.gw
        }
    }

    /// The bias's share of the gradients for the queries `rows`, from their bias gradients
    /// `dh` (m × gh) and `dw` (m × gw): `dq += d rel · table rows` into `dq` (m × hd), and
    /// `d table += d relᵀ · q` into `grads` (one per table), with q given as the B operand
    /// `qb` (depth m, hd columns).
    fn backward(
        &self,
        rows: &[usize],
        (dh, dw): (&[f32], &[f32]),
        qb: &[f32],
        dq: &mut [f32],
        grads: &mut [Vec<f32>; 2],
    ) {
        let m = rows.len();
        for (axis, (d, g)) in [(dh, self.gh), (dw, self.gw)].into_iter().enumerate() {
            let n = 2 * g - 1;
            let mut full = vec![0.0f32; m * n];
            for ((&i, f), d) in rows
                .iter()
                .zip(full.chunks_exact_mut(n))
                .zip(d.chunks_exact(g))
            {
                let y = self.coord(axis, i);
                for (k, &v) in d.iter().enumerate() {
                    f[y + g - 1 - k] = v;
                }
            }
            let [(rows, step), (cols, cstep)] = in_place_rows(m, n);
            product_add_in_place(&full, (&rows, step), n, &self.rows[axis], self.hd, dq);
            product_add_in_place(&full, (&cols, cstep), m, qb, self.hd, &mut grads[axis]);
        }
    }
}

/// Where a head's queries take their bias from.
#[derive(Clone, Copy)]
enum Bias<'a> {
    /// Given per query ([`grid_attention`]): rel_h (BH, L, gh) and rel_w (BH, L, gw).
    Given { rh: &'a [f32], rw: &'a [f32] },
    /// SAM's tables ([`rel_pos_attention`]).
    Tables(&'a Tables),
}

impl Bias<'_> {
    /// The bias of head b's queries `rows` (m × gh, m × gw), their unscaled q packed as `qa`.
    fn tile(&self, d: &Dims, b: usize, rows: &[usize], qa: &PackedA) -> (Vec<f32>, Vec<f32>) {
        match self {
            Bias::Given { rh, rw } => {
                let gather = |x: &[f32], g: usize| -> Vec<f32> {
                    rows.iter()
                        .flat_map(|&i| &x[(b * d.l + i) * g..][..g])
                        .copied()
                        .collect()
                };
                (gather(rh, d.gh), gather(rw, d.gw))
            }
            Bias::Tables(t) => t.bias(qa, rows),
        }
    }
}

/// Scales one query row's products with the keys `keys` and adds the row's bias:
/// `s ← scale·s + rel_h[jh] + rel_w[jw]`.
#[inline(always)]
fn add_bias(
    s: &mut [f32],
    scale: f32,
    keys: std::ops::Range<usize>,
    gw: usize,
    rh: &[f32],
    rw: &[f32],
) {
    let mut j = keys.start;
    let mut at = 0;
    while j < keys.end {
        let (jh, jw) = (j / gw, j % gw);
        let run = (gw - jw).min(keys.end - j);
        let b = rh[jh];
        for (v, &w) in s[at..at + run].iter_mut().zip(&rw[jw..jw + run]) {
            *v = *v * scale + (b + w);
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

/// One query row of the forward for one key tile: the products scaled and the bias added, the
/// running maximum and sum updated; the row left holding the probabilities (unnormalised) and the factor by which
/// the row's output so far must be scaled.
#[inline(always)]
fn forward_row(
    s: &mut [f32],
    scale: f32,
    keys: std::ops::Range<usize>,
    gw: usize,
    (rh, rw): (&[f32], &[f32]),
    (max, sum): (&mut f32, &mut f32),
) -> f32 {
    add_bias(s, scale, keys, gw, rh, rw);
    let m = row_max(s).max(*max);
    let rescale = exp(*max - m);
    *sum = *sum * rescale + exp_sum(s, m);
    *max = m;
    rescale
}

/// One query row of the backward for one key tile: from the products `s = q·kᵀ` and
/// `dp = dO·vᵀ`, the probabilities `p = exp(scale·s + bias − lse)` into `s` and `ds = p ∘ (dp − D)` into `dp`, the
/// bias gradients accumulated.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_row(
    s: &mut [f32],
    dp: &mut [f32],
    scale: f32,
    keys: std::ops::Range<usize>,
    gw: usize,
    (rh, rw): (&[f32], &[f32]),
    (lse, delta): (f32, f32),
    (dh, dw): (&mut [f32], &mut [f32]),
) {
    add_bias(s, scale, keys.clone(), gw, rh, rw);
    for (p, g) in s.iter_mut().zip(dp.iter_mut()) {
        *p = exp(*p - lse);
        *g = *p * (*g - delta);
    }
    bias_grad(dp, keys, gw, dh, dw);
}

row_paths! {
    /// [`forward_row`] compiled for `path`.
    fn forward_on = forward_row(
        s: &mut [f32],
        scale: f32,
        keys: std::ops::Range<usize>,
        gw: usize,
        bias: (&[f32], &[f32]),
        state: (&mut f32, &mut f32),
    ) -> f32;
}

row_paths! {
    /// [`backward_row`] compiled for `path`.
    fn backward_on = backward_row(
        s: &mut [f32],
        dp: &mut [f32],
        scale: f32,
        keys: std::ops::Range<usize>,
        gw: usize,
        bias: (&[f32], &[f32]),
        stats: (f32, f32),
        grads: (&mut [f32], &mut [f32]),
    );
}

/// The forward of head b's query tile (the queries `rows`): output rows (m × hd) and their
/// log-sum-exp.
#[allow(clippy::too_many_arguments)]
fn forward_tile(
    d: &Dims,
    qkv: &View,
    b: usize,
    rows: &[usize],
    k_cols: &[f32],
    v_tiles: &[Vec<f32>],
    bias: &Bias,
) -> (Vec<f32>, Vec<f32>) {
    let (hd, m) = (d.hd, rows.len());
    let qa = pack_a(qkv, 0, b, rows);
    let (rh, rw) = bias.tile(d, b, rows, &qa);
    let rows_fn = d.rows;
    let mut s = vec![0.0f32; m * d.nk];
    let (mut max, mut sum) = (vec![f32::NEG_INFINITY; m], vec![0.0f32; m]);
    let (mut out, mut lse) = (vec![0.0f32; m * hd], vec![0.0f32; m]);
    for (t, keys) in d.key_tiles().enumerate() {
        let n = keys.len();
        let s = &mut s[..m * n];
        product(&qa, k_cols, hd, keys.clone(), s);
        for (r, srow) in s.chunks_exact_mut(n).enumerate() {
            let bias = (&rh[r * d.gh..][..d.gh], &rw[r * d.gw..][..d.gw]);
            let state = (&mut max[r], &mut sum[r]);
            let rescale = forward_on(rows_fn, srow, d.scale, keys.clone(), d.gw, bias, state);
            if rescale != 1.0 {
                out[r * hd..][..hd].iter_mut().for_each(|o| *o *= rescale);
            }
        }
        // P (m × n) read in place as the A operand: no packing copy of the tile.
        let rows: Vec<usize> = (0..m).map(|r| r * n).collect();
        product_add_in_place(s, (&rows, 1), n, &v_tiles[t], hd, &mut out);
    }
    for r in 0..m {
        let inv = 1.0 / sum[r];
        out[r * hd..][..hd].iter_mut().for_each(|o| *o *= inv);
        lse[r] = max[r] + sum[r].ln();
    }
    (out, lse)
}

/// The forward of all BH heads: q, k and v read from `qkv`, each wanted query's output row
/// written to `out` and its log-sum-exp to `lse` (BH, L). Unwanted queries' rows are left as
/// they are (zero in a fresh buffer).
fn forward_heads(
    d: &Dims,
    wanted: impl Fn(usize) -> Option<(usize, usize)>,
    qkv: &View,
    bias: &Bias,
    out: &mut [f32],
    out_place: Place,
    lse: &mut [f32],
) {
    let hd = d.hd;
    // Per head: k's columns, and v in key tiles, packed once for all its query tiles.
    let packed: Vec<(Vec<f32>, Vec<Vec<f32>>)> = (0..d.bh)
        .into_par_iter()
        .map(|b| {
            let v = |i| qkv.row(2, b, i);
            let tiles = d.key_tiles().map(|t| pack_rows(t, hd, v)).collect();
            (pack_columns(d.l, hd, |i| qkv.row(1, b, i)), tiles)
        })
        .collect();
    let tiles: Vec<(usize, Vec<usize>)> = (0..d.bh)
        .flat_map(|b| d.query_tiles(wanted(b)).into_iter().map(move |t| (b, t)))
        .collect();
    let out = Sink::new(out, out_place, hd);
    let lse = Sink::new(lse, Place::head_major(d.bh, d.l, 1), 1);
    tiles.par_iter().for_each(|(b, rows)| {
        let (k_cols, v_tiles) = &packed[*b];
        let (o, x) = forward_tile(d, qkv, *b, rows, k_cols, v_tiles, bias);
        for ((&i, o), x) in rows.iter().zip(o.chunks_exact(hd)).zip(&x) {
            // SAFETY: the buffers outlive the loop, and query i of head b is in this tile
            // only, so this task alone writes its rows.
            unsafe {
                out.write(0, *b, i, o);
                lse.write(0, *b, i, std::slice::from_ref(x));
            }
        }
    });
}

/// Where the backward pass writes: the gradients of q, k and v (placed like the input), and of
/// the bias, given per query (rel_h's, rel_w's) or as SAM's tables (summed by the caller).
struct GradSinks {
    qkv: Sink,
    bias: Option<[Sink; 2]>,
}

/// The backward of all BH heads, reading the inputs, the output and its gradient (`out`,
/// `dout`, one part each) through views, with each head's log-sum-exp in `lse` (BH, L):
/// writes the gradients through `sinks`, and returns per head its tables' gradients (empty
/// where the bias was given).
#[allow(clippy::too_many_arguments)]
fn backward_heads(
    d: &Dims,
    wanted: impl Fn(usize) -> Option<(usize, usize)> + Sync,
    qkv: &View,
    bias: &Bias,
    out: &View,
    lse: &[f32],
    dout: &View,
    sinks: &GradSinks,
) -> Vec<[Vec<f32>; 2]> {
    (0..d.bh)
        .into_par_iter()
        .map(|b| {
            let lse = &lse[b * d.l..(b + 1) * d.l];
            backward_head(d, wanted(b), b, qkv, bias, out, lse, dout, sinks)
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn backward_head(
    d: &Dims,
    wanted: Option<(usize, usize)>,
    b: usize,
    qkv: &View,
    bias: &Bias,
    out: &View,
    lse: &[f32],
    dout: &View,
    sinks: &GradSinks,
) -> [Vec<f32>; 2] {
    let (l, hd) = (d.l, d.hd);
    let rows_fn = d.rows;
    let (q, k) = (|i| qkv.row(0, b, i), |i| qkv.row(1, b, i));
    let g = |i| dout.row(0, b, i);
    let (k_cols, v_cols) = (
        pack_columns(l, hd, k),
        pack_columns(l, hd, |i| qkv.row(2, b, i)),
    );
    let q_tiles = d.query_tiles(wanted);
    let delta: Vec<Vec<f32>> = q_tiles
        .iter()
        .map(|t| t.iter().map(|&i| dot(out.row(0, b, i), g(i))).collect())
        .collect();
    // Per query tile: q (unscaled) and dO as A operands, q and dO as B operands, its bias,
    // and its rows of dq and of the bias's gradients.
    let qa: Vec<PackedA> = q_tiles.iter().map(|t| pack_a(qkv, 0, b, t)).collect();
    let ga: Vec<PackedA> = q_tiles.iter().map(|t| pack_a(dout, 0, b, t)).collect();
    let qb: Vec<Vec<f32>> = q_tiles
        .iter()
        .map(|t| pack_rows(t.iter().copied(), hd, q))
        .collect();
    let gb: Vec<Vec<f32>> = q_tiles
        .iter()
        .map(|t| pack_rows(t.iter().copied(), hd, g))
        .collect();
    let biases: Vec<(Vec<f32>, Vec<f32>)> = q_tiles
        .iter()
        .zip(&qa)
        .map(|(t, qa)| bias.tile(d, b, t, qa))
        .collect();
    let zeros =
        |w: usize| -> Vec<Vec<f32>> { q_tiles.iter().map(|t| vec![0.0f32; t.len() * w]).collect() };
    let (mut dq_tiles, mut dh_tiles, mut dw_tiles) = (zeros(hd), zeros(d.gh), zeros(d.gw));
    let (mut dk, mut dv) = (vec![0.0f32; l * hd], vec![0.0f32; l * hd]);
    let mut s = vec![0.0f32; d.mq * d.nk];
    let mut dp = vec![0.0f32; d.mq * d.nk];
    for keys in d.key_tiles() {
        let n = keys.len();
        let k_tile = pack_rows(keys.clone(), hd, k);
        let (dk_t, dv_t) = (
            &mut dk[keys.start * hd..keys.end * hd],
            &mut dv[keys.start * hd..keys.end * hd],
        );
        for (ti, rows) in q_tiles.iter().enumerate() {
            let m = rows.len();
            let (s, dp) = (&mut s[..m * n], &mut dp[..m * n]);
            product(&qa[ti], &k_cols, hd, keys.clone(), s);
            product(&ga[ti], &v_cols, hd, keys.clone(), dp);
            let (rh, rw) = &biases[ti];
            let (dh, dw) = (&mut dh_tiles[ti], &mut dw_tiles[ti]);
            for (r, (srow, grow)) in s
                .chunks_exact_mut(n)
                .zip(dp.chunks_exact_mut(n))
                .enumerate()
            {
                let i = rows[r];
                backward_on(
                    rows_fn,
                    srow,
                    grow,
                    d.scale,
                    keys.clone(),
                    d.gw,
                    (&rh[r * d.gh..][..d.gh], &rw[r * d.gw..][..d.gw]),
                    (lse[i], delta[ti][r]),
                    (&mut dh[r * d.gh..][..d.gh], &mut dw[r * d.gw..][..d.gw]),
                );
            }
            // s holds P, dp holds dS (both m × n), read in place: Pᵀ and dSᵀ as the
            // transposes' rows, dS as its own.
            let [(rows, step), (cols, cstep)] = in_place_rows(m, n);
            product_add_in_place(s, (&cols, cstep), m, &gb[ti], hd, dv_t);
            product_add_in_place(dp, (&cols, cstep), m, &qb[ti], hd, dk_t);
            product_add_in_place(dp, (&rows, step), n, &k_tile, hd, &mut dq_tiles[ti]);
        }
    }
    let mut tables = [Vec::new(), Vec::new()];
    if matches!(bias, Bias::Tables(_)) {
        tables = [
            vec![0.0f32; (2 * d.gh - 1) * hd],
            vec![0.0f32; (2 * d.gw - 1) * hd],
        ];
    }
    for (ti, rows) in q_tiles.iter().enumerate() {
        let dq = &mut dq_tiles[ti];
        dq.iter_mut().for_each(|g| *g *= d.scale);
        let (dh, dw) = (&dh_tiles[ti], &dw_tiles[ti]);
        if let Bias::Tables(t) = bias {
            t.backward(rows, (dh, dw), &qb[ti], dq, &mut tables);
        }
        for (r, &i) in rows.iter().enumerate() {
            // SAFETY: the buffers outlive the loop over heads, and head b's rows are written
            // by this task only.
            unsafe {
                sinks.qkv.write(0, b, i, &dq[r * hd..][..hd]);
                if let Some([sh, sw]) = &sinks.bias {
                    sh.write(0, b, i, &dh[r * d.gh..][..d.gh]);
                    sw.write(0, b, i, &dw[r * d.gw..][..d.gw]);
                }
            }
        }
    }
    for (i, (gk, gv)) in dk.chunks_exact_mut(hd).zip(dv.chunks_exact(hd)).enumerate() {
        gk.iter_mut().for_each(|g| *g *= d.scale);
        // SAFETY: as for dq above.
        unsafe {
            sinks.qkv.write(1, b, i, gk);
            sinks.qkv.write(2, b, i, gv);
        }
    }
    tables
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
        let (qkv, rh, rw) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let place = Place::head_major(d.bh, d.l, d.hd);
        let qkv = View {
            data: qkv,
            place,
            width: d.hd,
        };
        // The output (BH, L, hd), then the log-sum-exp (BH, L).
        let mut flat = vec![0.0f32; d.bh * d.l * (d.hd + 1)];
        let (out, lse) = flat.split_at_mut(d.bh * d.l * d.hd);
        let bias = Bias::Given { rh, rw };
        forward_heads(&d, |b| self.wanted(b), &qkv, &bias, out, place, lse);
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
        let (rh, rw) = bias.split_at(bh * l * d.gh);
        let (out, rest) = saved.split_at(bh * l * hd);
        let (lse, dout) = rest.split_at(bh * l);
        let place = Place::head_major(bh, l, hd);
        let view = |data| View {
            data,
            place,
            width: hd,
        };
        let mut flat = vec![0.0f32; 3 * bh * l * hd + bh * l * (d.gh + d.gw)];
        let (dqkv, dbias) = flat.split_at_mut(3 * bh * l * hd);
        let (dh, dw) = dbias.split_at_mut(bh * l * d.gh);
        let sinks = GradSinks {
            qkv: Sink::new(dqkv, place, hd),
            bias: Some([
                Sink::new(dh, Place::head_major(bh, l, d.gh), d.gh),
                Sink::new(dw, Place::head_major(bh, l, d.gw), d.gw),
            ]),
        };
        let wanted = |b| self.forward.wanted(b);
        let bias = Bias::Given { rh, rw };
        backward_heads(
            &d,
            wanted,
            &view(qkv),
            &bias,
            &view(out),
            lse,
            &view(dout),
            &sinks,
        );
        let n = flat.len();
        Ok((CpuStorage::F32(flat), Shape::from(n)))
    }
}

/// SAM's attention between its qkv and output projections, on tokens in the layout those
/// linear layers use: `qkv` (B, gh, gw, 3·heads·hd), each token's features ordered (q, k, v) ×
/// heads × hd, and the relative-position tables `table_h` (2·gh − 1, hd) and `table_w`
/// (2·gw − 1, hd) → (B, gh, gw, heads·hd). Differentiable in all three.
///
/// It is [`grid_attention`] reading the heads where the qkv layer wrote them and writing
/// its output where the projection reads it, with the decomposed bias taken inside each
/// query tile from the unscaled q (`rel_h[i, jh] = q_i · table_h[ih − jh + gh − 1]`,
/// likewise along w: one small product of the tile's q with each table). Composed of candle's
/// ops, head-major copies, the bias products and the reshapes between them would be graph
/// nodes, each a zero-filled gradient and an addition in the backward pass, and the copies
/// would be kept for it. `queries` as for
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
    if !rel_pos_served(qkv, table_h, table_w, heads, queries, kernels)? {
        return Ok(None);
    }
    rel_pos_tiled(
        qkv,
        table_h,
        table_w,
        heads,
        scale,
        queries,
        (QUERY_TILE, KEY_TILE),
    )
}

/// [`rel_pos_attention`] computed without a graph, for a backward pass written by hand
/// ([`rel_pos_attention_vjp`]): the output and each head's log-sum-exp (B·heads, gh·gw), which
/// is all that the backward pass needs besides the inputs. `None` where the kernels do not
/// serve the tensors.
///
/// # Errors
/// As [`rel_pos_attention`].
pub fn rel_pos_attention_parts(
    qkv: &Tensor,
    table_h: &Tensor,
    table_w: &Tensor,
    heads: usize,
    scale: f32,
    queries: Option<&[(usize, usize)]>,
    kernels: Kernels,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    if !rel_pos_served(qkv, table_h, table_w, heads, queries, kernels)? {
        return Ok(None);
    }
    let op = rel_pos_op(qkv, heads, scale, queries, (QUERY_TILE, KEY_TILE))?;
    let out =
        qkv.contiguous()?
            .apply_op3_no_bwd(&table_h.contiguous()?, &table_w.contiguous()?, &op)?;
    let lse = op.lse.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(lse) = lse else {
        candle_core::bail!("rel_pos_attention: the forward left no log-sum-exp");
    };
    let lse = Arc::try_unwrap(lse).unwrap_or_else(|shared| shared.to_vec());
    let rows = qkv.dim(0)? * heads;
    let lse = Tensor::from_vec(lse, (rows, qkv.dim(1)? * qkv.dim(2)?), qkv.device())?;
    Ok(Some((out, lse)))
}

/// The gradients of [`rel_pos_attention`]'s inputs.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct AttentionGrads {
    pub qkv: Tensor,
    pub table_h: Tensor,
    pub table_w: Tensor,
}

/// [`rel_pos_attention`]'s backward as a function (as the `*_vjp` functions of
/// [`crate::LayerGrads`]): from the inputs, the output and log-sum-exp that
/// [`rel_pos_attention_parts`] gave and the output's gradient `dout`, the gradients of qkv
/// and of both tables. `None` where the kernels do not serve the tensors.
///
/// # Errors
/// Shapes that do not agree.
#[allow(clippy::too_many_arguments)]
pub fn rel_pos_attention_vjp(
    qkv: &Tensor,
    table_h: &Tensor,
    table_w: &Tensor,
    heads: usize,
    scale: f32,
    queries: Option<&[(usize, usize)]>,
    (out, lse): (&Tensor, &Tensor),
    dout: &Tensor,
    kernels: Kernels,
) -> candle_core::Result<Option<AttentionGrads>> {
    if !rel_pos_served(qkv, table_h, table_w, heads, queries, kernels)?
        || !kernels.serve_all(&[out, lse, dout])
    {
        return Ok(None);
    }
    let (b, gh, gw, d3) = qkv.dims4()?;
    let o = [b, gh, gw, d3 / 3];
    if out.dims() != o || dout.dims() != o || lse.dims() != [b * heads, gh * gw] {
        candle_core::bail!(
            "rel_pos_attention_vjp: qkv {:?} with {heads} heads, output {:?}, log-sum-exp {:?}, \
             gradient {:?}",
            qkv.dims(),
            out.dims(),
            lse.dims(),
            dout.dims()
        );
    }
    let op = rel_pos_op(qkv, heads, scale, queries, (QUERY_TILE, KEY_TILE))?;
    let lse = Arc::new(lse.flatten_all()?.to_vec1::<f32>()?);
    let [qkv, table_h, table_w] = op.grads(&qkv.contiguous()?, table_h, table_w, out, dout, lse)?;
    Ok(Some(AttentionGrads {
        qkv,
        table_h,
        table_w,
    }))
}

/// Whether the kernels serve [`rel_pos_attention`]'s tensors; an error where their shapes do
/// not agree.
fn rel_pos_served(
    qkv: &Tensor,
    table_h: &Tensor,
    table_w: &Tensor,
    heads: usize,
    queries: Option<&[(usize, usize)]>,
    kernels: Kernels,
) -> candle_core::Result<bool> {
    if !kernels.serve_all(&[qkv, table_h, table_w]) {
        return Ok(false);
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
    Ok(true)
}

/// [`rel_pos_attention`] on tiles of `tiles` (queries, keys), the shapes already checked.
fn rel_pos_tiled(
    qkv: &Tensor,
    table_h: &Tensor,
    table_w: &Tensor,
    heads: usize,
    scale: f32,
    queries: Option<&[(usize, usize)]>,
    tiles: (usize, usize),
) -> candle_core::Result<Option<Tensor>> {
    let op = rel_pos_op(qkv, heads, scale, queries, tiles)?;
    qkv.contiguous()?
        .apply_op3(&table_h.contiguous()?, &table_w.contiguous()?, op)
        .map(Some)
}

/// The op for qkv's grid, on tiles of `tiles` (queries, keys).
fn rel_pos_op(
    qkv: &Tensor,
    heads: usize,
    scale: f32,
    queries: Option<&[(usize, usize)]>,
    tiles: (usize, usize),
) -> candle_core::Result<RelPosAttention> {
    let (gh, gw) = (qkv.dim(1)?, qkv.dim(2)?);
    Ok(RelPosAttention {
        core: GridAttention {
            grid: (gh, gw),
            scale,
            tiles,
            rows: RowPath::detect(),
            queries: queries.map(Arc::from),
        },
        heads,
        lse: Arc::default(),
    })
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

    /// Where q, k and v (3 parts) or the output and its gradient (1 part) lie per head.
    fn place(&self, d: &Dims, parts: usize) -> Place {
        Place::tokens(self.heads, d.l, d.hd, parts)
    }
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
        let tables = Tables::new(th, tw, (d.gh, d.gw), d.hd);
        let qkv = View {
            data: qkv,
            place: self.place(&d, 3),
            width: d.hd,
        };
        let mut out = vec![0.0f32; d.bh * d.l * d.hd];
        let mut lse = vec![0.0f32; d.bh * d.l];
        let wanted = |b| self.core.wanted(b);
        let (bias, place) = (Bias::Tables(&tables), self.place(&d, 1));
        forward_heads(&d, wanted, &qkv, &bias, &mut out, place, &mut lse);
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(lse));
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
        let [dqkv, dh, dw] = self.grads(qkv, table_h, table_w, res, grad, lse)?;
        Ok((Some(dqkv), Some(dh), Some(dw)))
    }
}

impl RelPosAttention {
    /// The gradients of qkv (contiguous) and the tables from the output, its gradient and the
    /// log-sum-exp.
    fn grads(
        &self,
        qkv: &Tensor,
        table_h: &Tensor,
        table_w: &Tensor,
        out: &Tensor,
        grad: &Tensor,
        lse: Arc<Vec<f32>>,
    ) -> candle_core::Result<[Tensor; 3]> {
        // The tables are small: the op takes their values, and the output and its gradient
        // go in as tensors of their own (no token-sized concatenation).
        let op = RelPosAttentionGrad {
            forward: self.clone(),
            lse,
            tables: [table_h, table_w].map(|t| t.flatten_all()?.to_vec1::<f32>()),
        };
        let flat = qkv.apply_op3_no_bwd(&out.contiguous()?, &grad.contiguous()?, &op)?;
        let (n_qkv, n_h) = (qkv.elem_count(), table_h.elem_count());
        let dqkv = flat.narrow(0, 0, n_qkv)?.reshape(qkv.dims())?;
        // Copies of their own values (candle's `copy` clones the whole buffer): views would
        // keep the whole buffer, qkv's gradient too, alive with them.
        let dh = flat
            .narrow(0, n_qkv, n_h)?
            .reshape(table_h.dims())?
            .force_contiguous()?;
        let dw = flat
            .narrow(0, n_qkv + n_h, table_w.elem_count())?
            .reshape(table_w.dims())?
            .force_contiguous()?;
        Ok([dqkv, dh, dw])
    }
}

/// (qkv, output, output gradient) → [dqkv; d table_h; d table_w], with the tables' values.
struct RelPosAttentionGrad {
    forward: RelPosAttention,
    lse: Arc<Vec<f32>>,
    tables: [candle_core::Result<Vec<f32>>; 2],
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
        let (qkv, out, dout) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let [th, tw] = match &self.tables {
            [Ok(th), Ok(tw)] => [th, tw],
            [Err(e), _] | [_, Err(e)] => candle_core::bail!("rel_pos_attention backward: {e}"),
        };
        let tables = Tables::new(th, tw, (d.gh, d.gw), d.hd);
        let view = |data, parts| View {
            data,
            place: op.place(&d, parts),
            width: d.hd,
        };
        let n_qkv = qkv.len();
        let mut flat = vec![0.0f32; n_qkv + th.len() + tw.len()];
        let sinks = GradSinks {
            qkv: Sink::new(&mut flat[..n_qkv], op.place(&d, 3), d.hd),
            bias: None,
        };
        let (qkv, out, dout) = (view(qkv, 3), view(out, 1), view(dout, 1));
        let wanted = |b| op.core.wanted(b);
        let bias = Bias::Tables(&tables);
        let heads = backward_heads(&d, wanted, &qkv, &bias, &out, &self.lse, &dout, &sinks);
        // Each head's share of the tables' gradients, summed.
        let (gth, gtw) = flat[n_qkv..].split_at_mut(th.len());
        for [h, w] in &heads {
            gth.iter_mut().zip(h).for_each(|(a, v)| *a += v);
            gtw.iter_mut().zip(w).for_each(|(a, v)| *a += v);
        }
        let n = flat.len();
        Ok((CpuStorage::F32(flat), Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_rel, owns_its_buffer, values, var, weighted_grads};
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
        path: RowPath,
    ) -> Tensor {
        let (_, bh, l, hd) = qkv.dims4().unwrap();
        let op = GridAttention {
            grid,
            scale,
            tiles,
            rows: path,
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
    /// many (partial tiles on both axes), on every row path this CPU has.
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
            for path in RowPath::available() {
                let got = op_with_tiles(&qkv, &rel_h, &rel_w, grid, scale, tiles, path);
                assert!(
                    max_rel(&got, &want) < 1e-5,
                    "forward {grid:?} {tiles:?} {path:?}"
                );
                let gg = weighted_grads(&got, &weights);
                for (name, v) in [("qkv", &qkv), ("rel_h", &rel_h), ("rel_w", &rel_w)] {
                    let (a, b) = (gg.get(v).unwrap(), gw.get(v).unwrap());
                    let e = max_rel(a, b);
                    assert!(e < 1e-4, "d{name} {grid:?} {tiles:?} {path:?}: {e}");
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
                rows: RowPath::detect(),
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
            let weights =
                Tensor::from_vec(values(want.elem_count(), 24), want.dims(), &dev).unwrap();
            let gw_ = weighted_grads(&want, &weights);
            // The model's tiles (one tile here) and small ones: several query and key tiles,
            // partial ones on both axes.
            for tiles in [(QUERY_TILE, KEY_TILE), (6, 16)] {
                let got = rel_pos_tiled(&qkv, &th, &tw, heads, scale, queries, tiles)
                    .unwrap()
                    .unwrap();
                assert_eq!(got.dims(), want.dims());
                assert!(max_rel(&got, &want) < 1e-5, "forward {grid:?} {tiles:?}");
                // Twice over one graph: the op keeps what its backward reads.
                for pass in 0..2 {
                    let gg = weighted_grads(&got, &weights);
                    for (name, v) in [("qkv", &qkv), ("table_h", &th), ("table_w", &tw)] {
                        let e = max_rel(gg.get(v).unwrap(), gw_.get(v).unwrap());
                        assert!(e < 1e-4, "d{name} {grid:?} {tiles:?} pass {pass}: {e}");
                    }
                }
            }
            // The same as functions, outside the graph: the output and log-sum-exp, then the
            // gradients from them.
            let (out, lse) =
                rel_pos_attention_parts(&qkv, &th, &tw, heads, scale, queries, Kernels::Auto)
                    .unwrap()
                    .unwrap();
            assert!(max_rel(&out, &want) < 1e-5, "parts {grid:?}");
            assert_eq!(lse.dims(), [b * heads, gh * gw]);
            let g = rel_pos_attention_vjp(
                &qkv,
                &th,
                &tw,
                heads,
                scale,
                queries,
                (&out, &lse),
                &weights,
                Kernels::Auto,
            )
            .unwrap()
            .unwrap();
            for (name, got, v) in [
                ("qkv", &g.qkv, &qkv),
                ("table_h", &g.table_h, &th),
                ("table_w", &g.table_w, &tw),
            ] {
                let e = max_rel(got, gw_.get(v).unwrap());
                assert!(e < 1e-4, "vjp d{name} {grid:?}: {e}");
                // The tables' gradients (kept to the end of a backward pass) hold their own
                // values only.
                assert!(
                    name == "qkv" || owns_its_buffer(got),
                    "d{name} holds a larger buffer"
                );
            }
            // A log-sum-exp of another shape is refused.
            let bad = lse.narrow(1, 1, gh * gw - 1).unwrap();
            let vjp = |lse: &Tensor| {
                rel_pos_attention_vjp(
                    &qkv,
                    &th,
                    &tw,
                    heads,
                    scale,
                    queries,
                    (&out, lse),
                    &weights,
                    Kernels::Auto,
                )
            };
            assert!(vjp(&bad).is_err());
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

//! 3×3 / stride 1 / padding 1 convolutions by Winograd's minimal filtering F(4×4, 3×3)
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016), with the
//! interpolation points 0, ±1, ±2 and ∞.
//!
//! Each 4 × 4 block of output pixels (a tile) of one output channel is
//! `Aᵀ [Σ_c (G g Gᵀ) ⊙ (Bᵀ d B)] A`, with d the 6 × 6 input window of the tile in channel c and
//! g the 3 × 3 kernel of (output channel, c). For each of the 36 positions ξ of the transformed
//! 6 × 6 window the sum over channels is a matrix product, (O × C) · (C × tiles), so the
//! convolution becomes 36 products with 36 multiply-adds per channel pair and tile where the
//! direct convolution needs 16 · 9 = 144: 4× fewer. The transforms multiply by the small
//! integers 2, 4, 5 and 8 (and G by fractions, computed in f64 and rounded once), so the
//! result carries more rounding than the direct sum: the tests hold it to 1e-5 relative to
//! the output's scale (against f64 sums, candle's conv2d and the direct form).
//!
//! Tiles are grouped in runs of [`sgemm::NR`] along x (a run is one packed panel of the
//! products' right operands). The input transform of one channel computes L tiles per step
//! (L = 16 with AVX-512F, 8 with AVX2, the vector's lanes) from the four column phases of the
//! input rows (columns ≡ 3, 0, 1, 2 mod 4) and writes them straight into those panels; the
//! output transform reads L tiles of each product per step and writes four interleaved
//! output rows. Work is split into tasks of (image, block of tile rows, run of tile columns,
//! block of output channels), each with its own buffers, so tasks write disjoint parts of
//! the output.

use crate::fused::Fused;
use crate::sgemm::{self, PackedA, NR};
use crate::SendPtr;
use rayon::prelude::*;

/// Output pixels along each side of a tile.
const M: usize = 4;
/// Input pixels along each side of a tile's window (M + 2).
const W: usize = 6;
/// Positions of a transformed window: the products per depth block.
const P: usize = W * W;
/// Tiles per task, about (the product's n): in `cargo xtask bench conv`, 64 was faster than 32
/// and 256 on every shape, and than 128 on all but one (a tie); a task's P right operands and
/// products then take about 1.2 MB each.
const TILES: usize = 64;
/// Input channels per product (its depth; one depth block of the product).
const DEPTH: usize = 128;
/// Output channels per task at most (the product's m).
const OUT_BLOCK: usize = 128;

/// L lanes (one vector of the path that runs): the transforms run on L tiles at once, in
/// loops the compiler vectorises.
type V<const L: usize> = [f32; L];

#[inline(always)]
fn load<const L: usize>(s: &[f32], at: usize) -> V<L> {
    s[at..at + L].try_into().expect("L lanes")
}

/// One dimension of `Bᵀ d B` on L lanes, from `d(k)` (k < 6) into `out(k, ·)`:
/// `(4d0 − 5d2 + d4, d3 + d4 − 4(d1 + d2), d4 − d3 + 4(d1 − d2), d4 − d2 + 2(d3 − d1),
/// d4 − d2 − 2(d3 − d1), 4d1 − 5d3 + d5)`. Reading and writing through closures keeps the
/// vectors in registers (arrays of them moved by value turned into memory copies).
#[inline(always)]
fn bt<const L: usize>(d: impl Fn(usize) -> V<L>, mut out: impl FnMut(usize, V<L>)) {
    let [d0, d1, d2, d3, d4, d5] = [d(0), d(1), d(2), d(3), d(4), d(5)];
    let mut t = [[0.0f32; L]; W];
    for i in 0..L {
        let (m42, m31) = (d4[i] - d2[i], 2.0 * (d3[i] - d1[i]));
        t[0][i] = 4.0 * d0[i] - 5.0 * d2[i] + d4[i];
        t[1][i] = (d3[i] + d4[i]) - 4.0 * (d1[i] + d2[i]);
        t[2][i] = (d4[i] - d3[i]) + 4.0 * (d1[i] - d2[i]);
        t[3][i] = m42 + m31;
        t[4][i] = m42 - m31;
        t[5][i] = 4.0 * d1[i] - 5.0 * d3[i] + d5[i];
    }
    for (k, t) in t.iter().enumerate() {
        out(k, *t);
    }
}

/// One dimension of `Aᵀ m A` on L lanes, from `m(k)` (k < 6) into `out(k, ·)` (k < 4): with
/// s = m1 + m2, d = m1 − m2, S = m3 + m4, D = m3 − m4, `(m0 + s + S, d + 2D, s + 4S,
/// d + 8D + m5)`.
#[inline(always)]
fn at<const L: usize>(m: impl Fn(usize) -> V<L>, mut out: impl FnMut(usize, V<L>)) {
    let [m0, m1, m2, m3, m4, m5] = [m(0), m(1), m(2), m(3), m(4), m(5)];
    let mut y = [[0.0f32; L]; M];
    for i in 0..L {
        let (s, d) = (m1[i] + m2[i], m1[i] - m2[i]);
        let (bs, bd) = (m3[i] + m4[i], m3[i] - m4[i]);
        y[0][i] = m0[i] + s + bs;
        y[1][i] = d + 2.0 * bd;
        y[2][i] = s + 4.0 * bs;
        y[3][i] = d + 8.0 * bd + m5[i];
    }
    for (k, y) in y.iter().enumerate() {
        out(k, *y);
    }
}

/// The widest lane path a test allows (16, 8, or 0 for the portable loops); 16 outside tests.
#[cfg(test)]
static PINNED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(16);

/// Whether the transforms take the vector path of `width` lanes (16: AVX-512F, 8: AVX2 + FMA).
#[inline]
fn lanes(width: usize) -> bool {
    #[cfg(test)]
    if PINNED.load(std::sync::atomic::Ordering::Relaxed) < width {
        return false;
    }
    match width {
        16 => sgemm::avx512(),
        _ => sgemm::simd(),
    }
}

/// Defines `$name`, which runs its body (generic over its lanes `L`) compiled for AVX-512F
/// with L = 16 where the CPU has it, for AVX2 + FMA with L = 8 where it has those, and as it
/// is with L = 8 elsewhere.
macro_rules! lanes_dispatch {
    ($(#[$m:meta])* fn $name:ident($($a:ident : $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($a: $t),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<const L: usize>($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn wide($($a: $t),*) {
                body::<16>($($a),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn fast($($a: $t),*) {
                body::<8>($($a),*)
            }
            #[cfg(target_arch = "x86_64")]
            if lanes(16) {
                // SAFETY: the CPU has AVX-512F, AVX2 and FMA.
                return unsafe { wide($($a),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if lanes(8) {
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { fast($($a),*) };
            }
            body::<8>($($a),*)
        }
    };
    ($(#[$m:meta])* unsafe fn $name:ident($($a:ident : $t:ty),* $(,)?) { $($body:tt)* }) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name($($a: $t),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn body<const L: usize>($($a: $t),*) { $($body)* }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn wide($($a: $t),*) {
                // SAFETY: the caller keeps `$name`'s contract.
                unsafe { body::<16>($($a),*) }
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn fast($($a: $t),*) {
                // SAFETY: the caller keeps `$name`'s contract.
                unsafe { body::<8>($($a),*) }
            }
            #[cfg(target_arch = "x86_64")]
            if lanes(16) {
                // SAFETY: the CPU has AVX-512F, AVX2 and FMA; the caller keeps `$name`'s
                // contract.
                return unsafe { wide($($a),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if lanes(8) {
                // SAFETY: the CPU has AVX2 and FMA; the caller keeps `$name`'s contract.
                return unsafe { fast($($a),*) };
            }
            // SAFETY: the caller keeps `$name`'s contract.
            unsafe { body::<8>($($a),*) }
        }
    };
}

/// `G g Gᵀ` of one 3 × 3 kernel (row-major), in f64 and rounded once.
fn weight_transform(g: &[f32]) -> [f32; P] {
    let t = |v: [f64; 3]| {
        [
            v[0] / 4.0,
            -(v[0] + v[1] + v[2]) / 6.0,
            -(v[0] - v[1] + v[2]) / 6.0,
            v[0] / 24.0 + v[1] / 12.0 + v[2] / 6.0,
            v[0] / 24.0 - v[1] / 12.0 + v[2] / 6.0,
            v[2],
        ]
    };
    let g: [[f64; 3]; 3] = std::array::from_fn(|r| std::array::from_fn(|c| g[r * 3 + c] as f64));
    // G g: along each column of g.
    let cols: [[f64; W]; 3] = std::array::from_fn(|c| t([g[0][c], g[1][c], g[2][c]]));
    // (G g) Gᵀ: along each row of G g.
    let mut u = [0.0f32; P];
    for i in 0..W {
        for (j, v) in t([cols[0][i], cols[1][i], cols[2][i]])
            .into_iter()
            .enumerate()
        {
            u[i * W + j] = v as f32;
        }
    }
    u
}

/// Whether the Winograd form pays for a convolution of `c` input and `o` output channels on
/// images `w` pixels wide. It saves 108 of 144 multiply-adds per channel pair and tile but
/// transforms every input and output channel of a tile: with c·o/(c + o) below 20 (both
/// below 40) the transforms cost more than the products save. And runs of NR tiles per
/// image row must be three quarters full at least (a 32-pixel-wide image has 8 tiles per row
/// in a run of 16).
pub(crate) fn pays(c: usize, o: usize, w: usize) -> bool {
    let tw = w.div_ceil(M);
    c * o >= 20 * (c + o) && 4 * tw >= 3 * tw.div_ceil(NR) * NR
}

/// One task's part of the output.
#[derive(Clone, Copy)]
struct Task {
    image: usize,
    /// First tile row and number of tile rows.
    ty0: usize,
    rows: usize,
    /// First tile column and number of tile columns (a multiple of NR).
    tx0: usize,
    cols: usize,
    /// Block of output channels.
    ob: usize,
}

/// y (B, O, H, W) = relu?(conv3x3(norm?(x) (B, C, H, W), w (O, C, 3, 3)) + bias?).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
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
    let len = b * o * hw;
    if len == 0 {
        return Vec::new();
    }
    // Not zero-filled: the tasks below write every output pixel (set_len after them).
    let mut y: Vec<f32> = Vec::with_capacity(len);
    // Tiles: th × tw cover the image; runs of NR tile columns cover tw.
    let (th, tw) = (h.div_ceil(M), wd.div_ceil(M));
    let twp = tw.div_ceil(NR) * NR;
    let run = twp.min((TILES / NR).max(1) * NR);
    let band = (TILES / run).clamp(1, th);
    let blocks = o.div_ceil(OUT_BLOCK);
    let ob_len = o.div_ceil(blocks);
    // The transformed weights as the products' left operands: packed[ob][ξ] is position ξ
    // of the transformed kernels of output block ob (ob_len × C).
    let packed: Vec<Vec<PackedA>> = (0..blocks)
        .map(|ob| {
            let o0 = ob * ob_len;
            let m = ob_len.min(o - o0);
            PackedA::pack_panels(P, m, c, |ip, panels| {
                let panel = sgemm::MR * c;
                for r in 0..sgemm::MR {
                    let i = ip * sgemm::MR + r;
                    for ci in 0..c {
                        let u = if i < m {
                            let at = ((o0 + i) * c + ci) * 9;
                            weight_transform(&w[at..at + 9])
                        } else {
                            [0.0; P]
                        };
                        for (xi, v) in u.iter().enumerate() {
                            panels[xi * panel + ci * sgemm::MR + r] = *v;
                        }
                    }
                }
            })
        })
        .collect();
    let mut tasks = Vec::new();
    for image in 0..b {
        for ty0 in (0..th).step_by(band) {
            for tx0 in (0..twp).step_by(run) {
                for ob in 0..blocks {
                    tasks.push(Task {
                        image,
                        ty0,
                        rows: band.min(th - ty0),
                        tx0,
                        cols: run.min(twp - tx0),
                        ob,
                    });
                }
            }
        }
    }
    let depth = DEPTH.min(c);
    let y_ptr = SendPtr::allocation(&mut y);
    tasks.into_par_iter().for_each_init(
        || {
            (
                // The four column phases of the M·band + 2 input rows of one channel.
                vec![0.0f32; (M * band + 2) * M * (run + 1)],
                // The P right operands (packed, depth `depth`, run·band columns).
                vec![0.0f32; P * sgemm::packed_b_len(depth, run * band)],
                // The P products (ob_len × run·band each).
                vec![0.0f32; P * ob_len * run * band],
            )
        },
        |(ph, vp, mt), t| {
            let n = t.rows * t.cols;
            let o0 = t.ob * ob_len;
            let m = ob_len.min(o - o0);
            let xb = &x[t.image * c * hw..(t.image + 1) * c * hw];
            let norm = f.norm.map(|st| st.of_image(t.image, c));
            for c0 in (0..c).step_by(depth) {
                let c1 = (c0 + depth).min(c);
                let kd = c1 - c0;
                let vp_stride = sgemm::packed_b_len(kd, n);
                for ci in c0..c1 {
                    // The next channel's rows load while this one is transformed.
                    if ci + 1 < c {
                        prefetch_rows(&xb[(ci + 1) * hw..(ci + 2) * hw], h, wd, &t);
                    }
                    let plane = &xb[ci * hw..(ci + 1) * hw];
                    let nm = norm.map_or((0.0, 1.0), |(mu, s)| (mu[ci], s[ci]));
                    split_rows(plane, h, wd, &t, nm, ph);
                    transform_channel(ph, &t, kd, ci - c0, vp_stride, vp);
                }
                for xi in 0..P {
                    let b_xi = &vp[xi * vp_stride..xi * vp_stride + vp_stride];
                    // SAFETY: mt holds P products of m × n (row stride n); the panels
                    // cover n columns, a multiple of NR.
                    unsafe {
                        sgemm::gemm(
                            &packed[t.ob][xi],
                            c0..c1,
                            b_xi,
                            n,
                            mt.as_mut_ptr().add(xi * m * n),
                            n,
                            c0 > 0,
                            0..n / NR,
                        );
                    }
                }
            }
            let out = y_ptr.at((t.image * o + o0) * hw);
            let bias = f.bias.map(|bv| &bv[o0..o0 + m]);
            // SAFETY: output channels o0..o0 + m of image t.image are m × H × W floats of
            // `y`; under SendPtr's invariant this task owns its (image, tiles, channel block),
            // which no other task's overlaps.
            unsafe { untransform(&mt[..P * m * n], m, n, &t, h, wd, bias, f.relu, out) };
        },
    );
    // SAFETY: y's allocation holds `len` floats, and the tasks wrote all of them: every
    // (image, output block) has tasks for all th × twp tiles, and `untransform` writes each
    // tile's pixels inside the image (rows yy < H, columns x0 .. x0 + nx ≤ W).
    unsafe { y.set_len(len) };
    y
}

/// Asks the CPU to bring the input rows a task reads from `plane` into cache.
fn prefetch_rows(plane: &[f32], h: usize, wd: usize, t: &Task) {
    #[cfg(target_arch = "x86_64")]
    {
        let x0 = (M * t.tx0).saturating_sub(1).min(wd);
        let x1 = (M * (t.tx0 + t.cols) + 3).min(wd);
        for r in 0..M * t.rows + 2 {
            let y = (M * t.ty0 + r).wrapping_sub(1);
            if y >= h || x0 >= x1 {
                continue;
            }
            let row = &plane[y * wd + x0..y * wd + x1];
            for i in (0..row.len()).step_by(16).chain([row.len() - 1]) {
                // SAFETY: a prefetch of an address inside `plane`; it reads nothing.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        row.as_ptr().add(i) as *const i8,
                    )
                };
            }
        }
    }
}

lanes_dispatch! {
    /// Fills `ph` with the four column phases of the input rows a task's tiles read from one
    /// channel plane (H × W), normalised by `(mean, 1 / std)`: for local input row r (image
    /// row M·ty0 + r − 1), phase k < 4 and j in 0..=cols, `ph[(4r + k)·(cols + 1) + j]` is
    /// column 4·(tx0 + j) − 1 + k; zero outside the image (the convolution pads the
    /// normalised input with zeros).
    fn split_rows(
        plane: &[f32],
        h: usize,
        wd: usize,
        t: &Task,
        norm: (f32, f32),
        ph: &mut [f32],
    ) {
        let len = t.cols + 1;
        let (mu, s) = norm;
        // The j whose four columns are all inside the image: [.., inner); from j_lo on the
        // first of them (column 4·(tx0 + j) − 1) is inside too.
        let inner = ((wd + 1).saturating_sub(M * t.tx0) / M).min(len);
        let j_lo = usize::from(t.tx0 == 0).min(inner);
        for r in 0..M * t.rows + 2 {
            let rows = &mut ph[M * r * len..M * (r + 1) * len];
            let y = (M * t.ty0 + r).wrapping_sub(1);
            if y >= h {
                rows.fill(0.0);
                continue;
            }
            let row = &plane[y * wd..(y + 1) * wd];
            let px = |x: usize| if x < wd { (row[x] - mu) * s } else { 0.0 };
            for j in (0..j_lo).chain(inner..len) {
                let x0 = (M * (t.tx0 + j)).wrapping_sub(1);
                for k in 0..M {
                    rows[k * len + j] = px(x0.wrapping_add(k));
                }
            }
            // The four columns of the inner j, eight j at a time (fixed-size copies the
            // compiler turns into shuffles).
            let mut j = j_lo;
            while j + 8 <= inner {
                let src = M * (t.tx0 + j) - 1;
                let quads: &[f32; 32] = row[src..src + 32].try_into().expect("32 values");
                let mut q = [[0.0f32; 8]; M];
                for i in 0..8 {
                    for (k, q) in q.iter_mut().enumerate() {
                        q[i] = (quads[M * i + k] - mu) * s;
                    }
                }
                for (k, q) in q.iter().enumerate() {
                    rows[k * len + j..k * len + j + 8].copy_from_slice(q);
                }
                j += 8;
            }
            for j in j..inner {
                let src = M * (t.tx0 + j) - 1;
                for k in 0..M {
                    rows[k * len + j] = (row[src + k] - mu) * s;
                }
            }
        }
    }
}

lanes_dispatch! {
    /// Writes the P transformed windows `Bᵀ d B` of every tile of one channel (row `p` of the
    /// products' depth `kd`) into the packed right operands `vp`, one of `stride` floats per
    /// position ξ.
    fn transform_channel(
        ph: &[f32],
        t: &Task,
        kd: usize,
        p: usize,
        stride: usize,
        vp: &mut [f32],
    ) {
        let len = t.cols + 1;
        // Input columns 4tx − 1 … 4tx + 4 of L tiles: phases 0–3 at tile column j, then phases
        // 0 and 1 at j + 1.
        let offsets = [0, len, 2 * len, 3 * len, 1, len + 1];
        let mut rows = [[[0.0f32; L]; W]; W];
        for ty in 0..t.rows {
            for j in (0..t.cols).step_by(L) {
                // d · B row by row, then Bᵀ · (d B) column by column.
                for (a, row) in rows.iter_mut().enumerate() {
                    let b = M * (M * ty + a) * len + j;
                    bt::<L>(|k| load(ph, b + offsets[k]), |k, v| row[k] = v);
                }
                let at = sgemm::b_index(kd, p, ty * t.cols + j);
                // Column jj of every row: the closures index across the rows.
                #[allow(clippy::needless_range_loop)]
                for jj in 0..W {
                    bt::<L>(
                        |a| rows[a][jj],
                        |ii, v| {
                            let d = (ii * W + jj) * stride + at;
                            vp[d..d + L].copy_from_slice(&v);
                        },
                    );
                }
            }
        }
    }
}

lanes_dispatch! {
    /// Output transform of a task: from the P products `mt` (m × n each) to the output
    /// channels at `out` (m × H × W) at the task's tiles, with bias and ReLU.
    ///
    /// # Safety
    /// `out` points to m × H × W writable floats whose pixels at this task's tiles nobody
    /// else reads or writes meanwhile.
    unsafe fn untransform(
        mt: &[f32],
        m: usize,
        n: usize,
        t: &Task,
        h: usize,
        wd: usize,
        bias: Option<&[f32]>,
        relu: bool,
        out: *mut f32,
    ) {
        let hw = h * wd;
        let step = W * m * n;
        let mut cols = [[[0.0f32; L]; M]; W];
        let mut phases = [[0.0f32; L]; M];
        for oi in 0..m {
            let bv = bias.map_or(0.0, |b| b[oi]);
            for ty in 0..t.rows {
                for j in (0..t.cols).step_by(L) {
                    let x0 = M * (t.tx0 + j);
                    if x0 >= wd {
                        break;
                    }
                    let col = ty * t.cols + j;
                    // Aᵀ · m column by column, then (Aᵀ m) · A row by row.
                    for (jj, c) in cols.iter_mut().enumerate() {
                        let base = (jj * m + oi) * n + col;
                        at::<L>(|ii| load(mt, base + ii * step), |r, v| c[r] = v);
                    }
                    let nx = (M * L).min(wd - x0);
                    // Row r of every column: the closure indexes across the columns.
                    #[allow(clippy::needless_range_loop)]
                    for r in 0..M {
                        let yy = M * (t.ty0 + ty) + r;
                        if yy >= h {
                            break;
                        }
                        at::<L>(|jj| cols[jj][r], |q, v| phases[q] = v);
                        // Output pixel x0 + 4i + q is lane i of phase q.
                        let mut line = [[0.0f32; M]; L];
                        for (i, px) in line.iter_mut().enumerate() {
                            for (q, v) in px.iter_mut().enumerate() {
                                let a = phases[q][i] + bv;
                                *v = if relu { a.max(0.0) } else { a };
                            }
                        }
                        let line = line.as_flattened();
                        let d = oi * hw + yy * wd + x0;
                        // SAFETY: pixels (yy, x0..x0 + nx) of channel oi lie in this task's
                        // tiles and within the image (yy < H, x0 + nx ≤ W): the caller's.
                        let dst = unsafe { std::slice::from_raw_parts_mut(out.add(d), nx) };
                        if nx == M * L {
                            // A copy of a length known at compile time: vector moves.
                            dst[..M * L].copy_from_slice(&line[..M * L]);
                        } else {
                            dst.copy_from_slice(&line[..nx]);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct convolution in f64.
    fn direct(x: &[f32], w: &[f32], b: usize, c: usize, h: usize, wd: usize, o: usize) -> Vec<f64> {
        let mut y = vec![0.0f64; b * o * h * wd];
        for bi in 0..b {
            for oi in 0..o {
                for yy in 0..h {
                    for xx in 0..wd {
                        let mut s = 0.0f64;
                        for ci in 0..c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (sy, sx) =
                                        ((yy + ky).wrapping_sub(1), (xx + kx).wrapping_sub(1));
                                    if sy < h && sx < wd {
                                        s += x[((bi * c + ci) * h + sy) * wd + sx] as f64
                                            * w[(oi * c + ci) * 9 + ky * 3 + kx] as f64;
                                    }
                                }
                            }
                        }
                        y[((bi * o + oi) * h + yy) * wd + xx] = s;
                    }
                }
            }
        }
        y
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_the_direct_convolution() {
        // Odd and even sizes, widths below, at and above one run of tiles, several depth and
        // output blocks, batches.
        for &(b, c, h, wd, o) in &[
            (1, 16, 8, 8, 16),
            (2, 17, 7, 9, 19),
            (1, 20, 5, 70, 16),
            (1, 130, 6, 6, 140),
            (1, 16, 3, 290, 16),
            (1, 16, 1, 1, 16),
        ] {
            let x = values(b * c * h * wd, 1);
            let w = values(o * c * 9, 2);
            let want = direct(&x, &w, b, c, h, wd, o);
            let got = forward(&x, &w, b, c, h, wd, o, Fused::default());
            let tol = 1e-5 * ((c * 9) as f64).sqrt();
            for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - e).abs() <= tol * (1.0 + e.abs()),
                    "{b}x{c}x{h}x{wd}->{o} at {i}: {g} vs {e}"
                );
            }
        }
    }

    /// Every lane path this CPU has (AVX-512F with 16 lanes, AVX2 with 8, the portable loops)
    /// gives the same result as the f64 direct sum, with InstanceNorm, bias and ReLU fused.
    #[test]
    fn every_lane_path_matches_the_direct_convolution() {
        use crate::fused::Stats;
        use std::sync::atomic::Ordering;
        let (b, c, h, wd, o) = (2, 24, 9, 70, 20);
        let x = values(b * c * h * wd, 4);
        let w = values(o * c * 9, 5);
        let bias = values(o, 6);
        let stats = Stats::of(&x, h * wd, 1e-5);
        let f = Fused {
            norm: Some(&stats),
            bias: Some(&bias),
            relu: true,
            winograd: true,
        };
        // The direct sum of the normalised input, in f64.
        let mut xn = x.clone();
        for (i, plane) in xn.chunks_mut(h * wd).enumerate() {
            let (mu, s) = stats.of_image(i / c, c);
            for v in plane {
                *v = (*v - mu[i % c]) * s[i % c];
            }
        }
        let want: Vec<f64> = direct(&xn, &w, b, c, h, wd, o)
            .iter()
            .enumerate()
            .map(|(i, &v)| (v + bias[(i / (h * wd)) % o] as f64).max(0.0))
            .collect();
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for width in [16, 8, 0] {
            PINNED.store(width, Ordering::Relaxed);
            let got = forward(&x, &w, b, c, h, wd, o, f);
            PINNED.store(16, Ordering::Relaxed);
            let err = got
                .iter()
                .zip(&want)
                .fold(0.0f64, |m, (&g, &e)| m.max((g as f64 - e).abs()));
            assert!(
                err <= 1e-5 * scale,
                "{width} lanes: error {err} at scale {scale}"
            );
        }
    }

    #[test]
    fn pays_where_channels_and_rows_fill_the_runs() {
        let widths: Vec<usize> = (1..=100).filter(|&w| pays(64, 64, w)).collect();
        let want: Vec<usize> = (45..=64).chain(93..=100).collect();
        assert_eq!(widths, want);
        assert!(pays(40, 40, 512) && pays(128, 64, 512));
        assert!(!pays(32, 32, 512) && !pays(16, 1024, 512) && !pays(1024, 16, 512));
        // The shapes conv.rs compares with candle's conv2d on this path, both directions.
        assert!(pays(40, 48, 53) && pays(48, 40, 53) && pays(48, 41, 97) && pays(41, 48, 97));
    }

    #[test]
    fn transforms_are_exact_on_one_tap() {
        // A kernel with a single 1 at (ky, kx) shifts the input: every output equals an input
        // pixel (or 0 at the border), which the transforms must reproduce to rounding: the
        // transformed window's values reach 10² times the input's and Aᵀ·A multiplies by up to
        // 64 what G g Gᵀ divided by 36, so rounding leaves some 1e-5 of the input's scale.
        let (c, h, wd) = (16, 6, 40);
        let x = values(c * h * wd, 3);
        for tap in 0..9 {
            let mut w = vec![0.0f32; 16 * c * 9];
            for oi in 0..16 {
                w[(oi * c + oi) * 9 + tap] = 1.0;
            }
            let y = forward(&x, &w, 1, c, h, wd, 16, Fused::default());
            let (dy, dx) = (tap / 3, tap % 3);
            for oi in 0..16 {
                for yy in 0..h {
                    for xx in 0..wd {
                        let (sy, sx) = ((yy + dy).wrapping_sub(1), (xx + dx).wrapping_sub(1));
                        let want = if sy < h && sx < wd {
                            x[(oi * h + sy) * wd + sx]
                        } else {
                            0.0
                        };
                        let got = y[(oi * h + yy) * wd + xx];
                        assert!(
                            (got - want).abs() <= 3e-5,
                            "tap {tap} at ({oi},{yy},{xx}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

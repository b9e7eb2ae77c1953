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

use crate::fused::{Fused, Stats};
use crate::sgemm::{self, dot, PackedA, NR};
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

/// A value on a 64-byte boundary: the transforms' local arrays of vectors, so that their
/// vector loads and stores do not straddle cache lines (the arrays' place on the stack
/// otherwise follows the code around them).
#[repr(C, align(64))]
struct Aligned<T>(T);

impl<T> std::ops::Deref for Aligned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// L lanes (one vector of the path that runs): the transforms run on L tiles at once, in
/// loops the compiler vectorises.
type V<const L: usize> = [f32; L];

#[inline(always)]
fn load<const L: usize>(s: &[f32], at: usize) -> V<L> {
    s[at..at + L].try_into().expect("L lanes")
}

/// Writes L lanes at `s[at..]`: the counterpart of [`load`].
#[inline(always)]
fn store<const L: usize>(s: &mut [f32], at: usize, v: V<L>) {
    let dst: &mut V<L> = (&mut s[at..at + L]).try_into().expect("L lanes");
    *dst = v;
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

/// The rows of `G` (6 × 3) in `G g Gᵀ`, the transform of a 3 × 3 kernel g.
const G: [[f64; 3]; W] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// `G v` of three values on L lanes (of f64).
#[inline(always)]
fn g3<const L: usize>(v: [&[f64; L]; 3]) -> [[f64; L]; W] {
    std::array::from_fn(|k| {
        let g = G[k];
        std::array::from_fn(|l| g[0] * v[0][l] + g[1] * v[1][l] + g[2] * v[2][l])
    })
}

lanes_dispatch! {
    /// Writes the transforms `G g Gᵀ` (in f64, rounded once) of the 3 × 3 kernels of output
    /// channels `first..first + rows` (rows ≤ MR; the panel's other rows zero) and all `c` input
    /// channels of `w` (O, C, 3, 3) into `panels`: P panels of MR · c floats, one per position
    /// of the 6 × 6 transform, each in the packed product's order (input channel-major, then
    /// the MR rows). L input channels at a time, on lanes; each panel gets a contiguous run of
    /// L · MR floats per step.
    fn transform_weights(w: &[f32], c: usize, first: usize, rows: usize, panels: &mut [f32]) {
        let panel = sgemm::MR * c;
        // Rows from `rows` on stay zero: only the rows below it are written.
        let mut u = [[[0.0f32; L]; P]; sgemm::MR];
        for ci0 in (0..c).step_by(L) {
            let n = L.min(c - ci0);
            for (r, ur) in u.iter_mut().enumerate().take(rows) {
                let at = ((first + r) * c + ci0) * 9;
                let k = &w[at..at + n * 9];
                let g: [[f64; L]; 9] = std::array::from_fn(|e| {
                    std::array::from_fn(|l| if l < n { k[l * 9 + e] as f64 } else { 0.0 })
                });
                // G g along each column of g, then (G g) Gᵀ along each row of G g.
                let cols: [[[f64; L]; W]; 3] =
                    std::array::from_fn(|j| g3([&g[j], &g[3 + j], &g[6 + j]]));
                for i in 0..W {
                    let row = g3([&cols[0][i], &cols[1][i], &cols[2][i]]);
                    for (j, v) in row.iter().enumerate() {
                        ur[i * W + j] = std::array::from_fn(|l| v[l] as f32);
                    }
                }
            }
            for xi in 0..P {
                let dst = &mut panels[xi * panel + ci0 * sgemm::MR..][..n * sgemm::MR];
                for (l, d) in dst.chunks_exact_mut(sgemm::MR).enumerate() {
                    for (r, v) in d.iter_mut().enumerate() {
                        *v = u[r][xi][l];
                    }
                }
            }
        }
    }
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
                let first = ip * sgemm::MR;
                transform_weights(w, c, o0 + first, sgemm::MR.min(m - first), panels)
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
                    transform_channel(ph, &t, kd, ci - c0, vp_stride, true, vp);
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
                    store::<8>(rows, k * len + j, *q);
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
    /// Writes the P transformed windows `Bᵀ d B` of every tile of one channel into `vp`, one
    /// block of `stride` floats per position ξ: with `packed`, as row `p` of the products'
    /// packed right operands of depth `kd`; otherwise as one row of the task's tiles (tile
    /// (ty, j) at ty·cols + j).
    fn transform_channel(
        ph: &[f32],
        t: &Task,
        kd: usize,
        p: usize,
        stride: usize,
        packed: bool,
        vp: &mut [f32],
    ) {
        let len = t.cols + 1;
        // Input columns 4tx − 1 … 4tx + 4 of L tiles: phases 0–3 at tile column j, then phases
        // 0 and 1 at j + 1.
        let offsets = [0, len, 2 * len, 3 * len, 1, len + 1];
        let mut rows = Aligned([[[0.0f32; L]; W]; W]);
        for ty in 0..t.rows {
            for j in (0..t.cols).step_by(L) {
                // d · B row by row, then Bᵀ · (d B) column by column.
                for (a, row) in rows.iter_mut().enumerate() {
                    let b = M * (M * ty + a) * len + j;
                    bt::<L>(|k| load(ph, b + offsets[k]), |k, v| row[k] = v);
                }
                let tile = ty * t.cols + j;
                let at = if packed { sgemm::b_index(kd, p, tile) } else { tile };
                // Column jj of every row: the closures index across the rows.
                #[allow(clippy::needless_range_loop)]
                for jj in 0..W {
                    bt::<L>(
                        |a| rows[a][jj],
                        |ii, v| {
                            let d = (ii * W + jj) * stride + at;
                            store(vp, d, v);
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
        let mut cols = Aligned([[[0.0f32; L]; M]; W]);
        let mut phases = Aligned([[0.0f32; L]; M]);
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

/// One dimension of `A y Aᵀ` on L lanes (the output gradient's transform; A is the transpose
/// of [`at`]'s Aᵀ), from `y(k)` (k < 4) into `out(k, ·)` (k < 6): `(y0, y0 + y1 + y2 + y3,
/// y0 − y1 + y2 − y3, y0 + 2y1 + 4y2 + 8y3, y0 − 2y1 + 4y2 − 8y3, y3)`.
#[inline(always)]
fn a6<const L: usize>(y: impl Fn(usize) -> V<L>, mut out: impl FnMut(usize, V<L>)) {
    let [y0, y1, y2, y3] = [y(0), y(1), y(2), y(3)];
    let mut m = [[0.0f32; L]; W];
    for i in 0..L {
        let (even, odd) = (y0[i] + y2[i], y1[i] + y3[i]);
        let (even4, odd4) = (y0[i] + 4.0 * y2[i], 2.0 * y1[i] + 8.0 * y3[i]);
        m[0][i] = y0[i];
        m[1][i] = even + odd;
        m[2][i] = even - odd;
        m[3][i] = even4 + odd4;
        m[4][i] = even4 - odd4;
        m[5][i] = y3[i];
    }
    for (k, m) in m.iter().enumerate() {
        out(k, *m);
    }
}

lanes_dispatch! {
    /// Writes the P transformed output-gradient tiles `A dy Aᵀ` of one output channel into
    /// `mt`, one row of the task's tiles (tile (ty, j) at ty·cols + j) per position ξ,
    /// `stride` floats apart, from the column phases `ph` of its rows ([`split_rows`]: local
    /// row r is image row M·ty0 + r − 1, so a tile's four rows follow its first local row).
    fn transform_gradient(ph: &[f32], t: &Task, stride: usize, mt: &mut [f32]) {
        let len = t.cols + 1;
        // Columns 4tx … 4tx + 3 of L tiles: phases 1–3 at tile column j, phase 0 at j + 1.
        let offsets = [len, 2 * len, 3 * len, 1];
        let mut rows = Aligned([[[0.0f32; L]; W]; M]);
        for ty in 0..t.rows {
            for j in (0..t.cols).step_by(L) {
                // dy · Aᵀ row by row, then A · (dy Aᵀ) column by column.
                for (a, row) in rows.iter_mut().enumerate() {
                    let b = M * (M * ty + a + 1) * len + j;
                    a6::<L>(|k| load(ph, b + offsets[k]), |k, v| row[k] = v);
                }
                let at = ty * t.cols + j;
                // Column jj of every row: the closures index across the rows.
                #[allow(clippy::needless_range_loop)]
                for jj in 0..W {
                    a6::<L>(
                        |a| rows[a][jj],
                        |ii, v| {
                            let d = (ii * W + jj) * stride + at;
                            store(mt, d, v);
                        },
                    );
                }
            }
        }
    }
}

/// `Gᵀ u G` of one transformed kernel gradient (P values, row-major), in f64: the gradient of
/// the 3 × 3 kernel whose transform `G g Gᵀ` ([`transform_weights`]) had gradient u.
fn weight_untransform(u: &[f64; P]) -> [f32; 9] {
    // u G (6 × 3), then Gᵀ (u G).
    let mut ug = [[0.0f64; 3]; W];
    for (a, row) in ug.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = (0..W).map(|b| u[a * W + b] * G[b][j]).sum();
        }
    }
    std::array::from_fn(|e| {
        let (i, j) = (e / 3, e % 3);
        (0..W).map(|a| G[a][i] * ug[a][j]).sum::<f64>() as f32
    })
}

/// Tiles per weight-gradient chunk, about (whole tile rows, equal chunks): its transforms take
/// (C + O)·36·K floats (9.4 MB at 64 channels in and out), which can stay in the last-level
/// cache between the transforms and the products, while dot products along K = 512 tiles are
/// long enough for their sums across lanes to cost little. On a 2 × 64 × 512² input (a
/// scratch harness timing the weight gradient alone, one process per measurement, AMD EPYC)
/// 512 tiles took 83–98 ms where chunks of about 64 MB of transforms took 130–162 ms. About
/// one process in three ran it at 160–200 ms throughout, the extra time in the transforms,
/// also with address randomisation off; the cause was not found.
const GRAD_CHUNK_TILES: usize = 512;
/// Floats of the input channels' rows one pass of [`products`] keeps in L2 (128 KB) while the
/// output channels' rows stream past.
const PRODUCT_BLOCK_FLOATS: usize = 32 << 10;

/// Whether the Winograd weight gradient pays for `c` input and `o` output channels on images
/// of `h` × `w`: the channels as for [`pays`], image rows that fill its rows of [`NR`] tiles
/// to three quarters at least, and either c·o/(c + o) ≥ 64 or images of 160² pixels or more.
/// Its transforms write every tile's 36 values of every channel and read them back once, so
/// with few channels they cost as much as the products: in a scratch harness timing the
/// weight gradient alone (batch 2) the direct form was faster at 64 channels on 96² and 128²
/// images and slower on 192²; at 32 pixels wide (half-full rows of tiles) this form took
/// about twice as long.
pub(crate) fn grad_pays(c: usize, o: usize, h: usize, w: usize) -> bool {
    let tw = w.div_ceil(M);
    let pair = c * o / (c + o).max(1);
    pair >= 20 && 4 * tw >= 3 * tw.next_multiple_of(NR) && (pair >= 64 || h * w >= 160 * 160)
}

/// The weight gradient of [`forward`]: gw (O, C, 3, 3) = Σ over images and pixels of
/// gy[o](y, x) · x̂[c](y + ky − 1, x + kx − 1), with x̂ the input (normalised when `norm` is
/// given) and zero outside the image. In Winograd's form the forward is
/// `Aᵀ [Σ_c U ⊙ V] A` per tile, so the gradient of U at position ξ is a sum over tiles,
/// `dU_ξ[o, c] = Σ_tiles (A dy Aᵀ)_ξ[o] · V_ξ[c]` (36 multiply-adds per channel pair and tile
/// where the direct sum takes 144), and `gw = Gᵀ dU G`. The tiles are taken in chunks of tile
/// rows: each input and output channel's transforms of a chunk go into rows of its tiles (in
/// parallel over the channels), then the 36 positions' products run in parallel, each adding
/// to its own part of dU, so the sums' order is fixed by the sizes alone.
#[allow(clippy::too_many_arguments)]
pub(crate) fn weight_grad(
    x: &[f32],
    gy: &[f32],
    b: usize,
    c: usize,
    h: usize,
    wd: usize,
    o: usize,
    norm: Option<&Stats>,
) -> Vec<f32> {
    weight_grad_in(x, gy, b, c, h, wd, o, norm, GRAD_CHUNK_TILES)
}

/// [`weight_grad`] in chunks of about `chunk_tiles` tiles.
#[allow(clippy::too_many_arguments)]
fn weight_grad_in(
    x: &[f32],
    gy: &[f32],
    b: usize,
    c: usize,
    h: usize,
    wd: usize,
    o: usize,
    norm: Option<&Stats>,
    chunk_tiles: usize,
) -> Vec<f32> {
    let hw = h * wd;
    let (th, tw) = (h.div_ceil(M), wd.div_ceil(M));
    let cols = tw.next_multiple_of(NR);
    let total = b * th;
    if total == 0 || c == 0 || o == 0 {
        return vec![0.0; o * c * 9];
    }
    // Equal chunks of about `chunk_tiles` tiles, in whole tile rows.
    let most = chunk_tiles.div_ceil(cols).clamp(1, total);
    let rows = total.div_ceil(total.div_ceil(most));
    // A row's stride: K and NR more, so that rows of K a multiple of 1024 floats do not all
    // fall into the same cache sets.
    let ld_max = rows * cols + NR;
    let mut vt = vec![0.0f32; c * P * ld_max];
    let mut mt = vec![0.0f32; o * P * ld_max];
    let mut du = vec![0.0f32; P * o * c];
    let ph_len = (M * rows + 2) * M * (cols + 1);
    for g0 in (0..total).step_by(rows) {
        let g1 = (g0 + rows).min(total);
        let k = (g1 - g0) * cols;
        let ld = k + NR;
        // The chunk's tile rows in pieces within one image: (task, first tile in the chunk).
        let mut pieces = Vec::new();
        let mut g = g0;
        while g < g1 {
            let (image, ty0) = (g / th, g % th);
            let n = (th - ty0).min(g1 - g);
            let task = Task {
                image,
                ty0,
                rows: n,
                tx0: 0,
                cols,
                ob: 0,
            };
            pieces.push((task, (g - g0) * cols));
            g += n;
        }
        vt[..c * P * ld]
            .par_chunks_mut(P * ld)
            .chain(mt[..o * P * ld].par_chunks_mut(P * ld))
            .enumerate()
            .for_each_init(
                || vec![0.0f32; ph_len],
                |ph, (i, out)| {
                    for (t, at) in &pieces {
                        if i < c {
                            let plane = &x[(t.image * c + i) * hw..][..hw];
                            let nm = norm.map_or((0.0, 1.0), |st| {
                                let (mu, s) = st.of_image(t.image, c);
                                (mu[i], s[i])
                            });
                            split_rows(plane, h, wd, t, nm, ph);
                            transform_channel(ph, t, 0, 0, ld, false, &mut out[*at..]);
                        } else {
                            let plane = &gy[(t.image * o + i - c) * hw..][..hw];
                            split_rows(plane, h, wd, t, (0.0, 1.0), ph);
                            transform_gradient(ph, t, ld, &mut out[*at..]);
                        }
                    }
                },
            );
        du.par_chunks_mut(o * c)
            .enumerate()
            .for_each(|(xi, d)| products(&mt, &vt, k, ld, xi, o, c, d));
    }
    let mut gw = vec![0.0f32; o * c * 9];
    gw.par_chunks_mut(9).enumerate().for_each(|(oc, g)| {
        let u: [f64; P] = std::array::from_fn(|xi| du[xi * o * c + oc] as f64);
        g.copy_from_slice(&weight_untransform(&u));
    });
    gw
}

/// `du[i·c + j] += Σ_{t < k} mt_i[t] · vt_j[t]` for output channels i < o and input channels
/// j < c, with mt_i output channel i's row of position ξ (k values at `(i·P + ξ)·ld`) and
/// vt_j input channel j's ([`weight_grad_in`]'s layouts); `k` is a multiple of [`NR`].
#[allow(clippy::too_many_arguments)]
fn products(
    mt: &[f32],
    vt: &[f32],
    k: usize,
    ld: usize,
    xi: usize,
    o: usize,
    c: usize,
    du: &mut [f32],
) {
    let row_m = |i: usize| &mt[(i * P + xi) * ld..][..k];
    let row_v = |j: usize| &vt[(j * P + xi) * ld..][..k];
    let block = (PRODUCT_BLOCK_FLOATS / k).max(4) / 4 * 4;
    for j0 in (0..c).step_by(block) {
        let j1 = (j0 + block).min(c);
        for i0 in (0..o).step_by(4) {
            let ni = (o - i0).min(4);
            let mut j = j0;
            if ni == 4 {
                let a = [row_m(i0), row_m(i0 + 1), row_m(i0 + 2), row_m(i0 + 3)];
                while j + 4 <= j1 {
                    let s = dot4x4(a, [row_v(j), row_v(j + 1), row_v(j + 2), row_v(j + 3)], k);
                    for (r, s) in s.chunks_exact(4).enumerate() {
                        for (d, s) in du[(i0 + r) * c + j..][..4].iter_mut().zip(s) {
                            *d += s;
                        }
                    }
                    j += 4;
                }
            }
            // The channels left over (counts not multiples of four).
            for i in i0..i0 + ni {
                for jj in if ni == 4 { j..j1 } else { j0..j1 } {
                    du[i * c + jj] += dot(row_m(i), row_v(jj));
                }
            }
        }
    }
}

/// `Σ_{t < k} a_i[t] · b_j[t]` for i, j < 4 (entry 4i + j); `k` is a multiple of 16.
fn dot4x4(a: [&[f32]; 4], b: [&[f32]; 4], k: usize) -> [f32; 16] {
    assert!(
        k.is_multiple_of(16) && a.iter().chain(&b).all(|r| r.len() >= k),
        "dot4x4 operands too short"
    );
    #[cfg(target_arch = "x86_64")]
    if lanes(16) {
        // SAFETY: the CPU has AVX-512F; every row holds k floats (checked above).
        return unsafe { dot4x4_avx512(a.map(<[f32]>::as_ptr), b.map(<[f32]>::as_ptr), k) };
    }
    #[cfg(target_arch = "x86_64")]
    if lanes(8) {
        let (a, lo, hi) = (a.map(<[f32]>::as_ptr), [b[0], b[1]], [b[2], b[3]]);
        // SAFETY: the CPU has AVX2 and FMA; every row holds k floats (checked above).
        let (lo, hi) = unsafe {
            (
                dot4x2_avx2(a, lo.map(<[f32]>::as_ptr), k),
                dot4x2_avx2(a, hi.map(<[f32]>::as_ptr), k),
            )
        };
        return std::array::from_fn(|e| {
            let (i, j) = (e / 4, e % 4);
            if j < 2 {
                lo[i * 2 + j]
            } else {
                hi[i * 2 + j - 2]
            }
        });
    }
    std::array::from_fn(|e| dot(&a[e / 4][..k], &b[e % 4][..k]))
}

/// [`dot4x4`] with sixteen AVX-512 accumulators (four loads of each operand and sixteen FMAs
/// per sixteen values of t), summed across lanes by a tree of shuffles into one vector.
///
/// # Safety
/// The CPU has AVX-512F; every row holds k readable floats, k a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot4x4_avx512(a: [*const f32; 4], b: [*const f32; 4], k: usize) -> [f32; 16] {
    // SAFETY: the caller keeps this function's contract (its # Safety section).
    unsafe {
        use std::arch::x86_64::*;
        let mut acc = [_mm512_setzero_ps(); 16];
        for t in (0..k).step_by(16) {
            let bv = b.map(|r| _mm512_loadu_ps(r.add(t)));
            for (i, r) in a.iter().enumerate() {
                let av = _mm512_loadu_ps(r.add(t));
                for (j, bv) in bv.iter().enumerate() {
                    acc[i * 4 + j] = _mm512_fmadd_ps(av, *bv, acc[i * 4 + j]);
                }
            }
        }
        // Pairs: per 128-bit lane, [x0 + x2, y0 + y2, x1 + x3, y1 + y3].
        let s1: [__m512; 8] = std::array::from_fn(|p| {
            let (x, y) = (acc[2 * p], acc[2 * p + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y))
        });
        // Quads: per 128-bit lane, the lane's sums of accumulators 4q … 4q + 3.
        let s2: [__m512; 4] = std::array::from_fn(|q| {
            let (x, y) = (_mm512_castps_pd(s1[2 * q]), _mm512_castps_pd(s1[2 * q + 1]));
            _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
            )
        });
        // 128-bit lanes: [s(L0 + L1), s(L2 + L3), s'(L0 + L1), s'(L2 + L3)] of two quads.
        let halves = |x: __m512, y: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(x, y),
                _mm512_shuffle_f32x4::<0xDD>(x, y),
            )
        };
        let (h0, h1) = (halves(s2[0], s2[1]), halves(s2[2], s2[3]));
        // Lane e: the whole sum of accumulator e.
        let sums = halves(h0, h1);
        let mut out = [0.0f32; 16];
        _mm512_storeu_ps(out.as_mut_ptr(), sums);
        out
    }
}

/// `Σ_{t < k} a_i[t] · b_j[t]` for i < 4, j < 2 (entry 2i + j) with eight AVX2 accumulators.
///
/// # Safety
/// The CPU has AVX2 and FMA; every row holds k readable floats, k a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4x2_avx2(a: [*const f32; 4], b: [*const f32; 2], k: usize) -> [f32; 8] {
    // SAFETY: the caller keeps this function's contract (its # Safety section).
    unsafe {
        use std::arch::x86_64::*;
        let mut acc = [_mm256_setzero_ps(); 8];
        for t in (0..k).step_by(8) {
            let bv = b.map(|r| _mm256_loadu_ps(r.add(t)));
            for (i, r) in a.iter().enumerate() {
                let av = _mm256_loadu_ps(r.add(t));
                for (j, bv) in bv.iter().enumerate() {
                    acc[i * 2 + j] = _mm256_fmadd_ps(av, *bv, acc[i * 2 + j]);
                }
            }
        }
        acc.map(|a| sgemm::lane_sum256(a))
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

    /// The packed transforms equal `G g Gᵀ` summed in f64 from the matrix's definition, at every
    /// position, input channel (fewer than, as many as and more than a vector's lanes) and
    /// panel row, with the rows past the last output channel zero; on every lane path.
    #[test]
    fn packed_weight_transforms_match_the_definition() {
        use std::sync::atomic::Ordering;
        let (o, c) = (8, 37);
        let w = values(o * c * 9, 3);
        let panel = sgemm::MR * c;
        for width in [16, 8, 0] {
            for (first, rows) in [(0, sgemm::MR), (5, 3), (7, 1)] {
                let mut panels = vec![f32::NAN; P * panel];
                PINNED.store(width, Ordering::Relaxed);
                transform_weights(&w, c, first, rows, &mut panels);
                PINNED.store(16, Ordering::Relaxed);
                for r in 0..sgemm::MR {
                    for ci in 0..c {
                        let g = if r < rows {
                            &w[((first + r) * c + ci) * 9..][..9]
                        } else {
                            &[]
                        };
                        for (xi, gp) in G
                            .iter()
                            .flat_map(|a| G.iter().map(move |b| (a, b)))
                            .enumerate()
                        {
                            let mut want = 0.0f64;
                            for (k, &v) in g.iter().enumerate() {
                                want += gp.0[k / 3] * gp.1[k % 3] * v as f64;
                            }
                            let got = panels[xi * panel + ci * sgemm::MR + r] as f64;
                            assert!(
                                (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                                "{width} lanes, row {r}, channel {ci}, position {xi}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
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

    /// The weight gradient in f64: Σ over images and pixels of gy[o] · x[c] shifted by the tap.
    #[allow(clippy::too_many_arguments)]
    fn direct_weight_grad(
        x: &[f32],
        gy: &[f32],
        b: usize,
        c: usize,
        h: usize,
        wd: usize,
        o: usize,
    ) -> Vec<f64> {
        let mut gw = vec![0.0f64; o * c * 9];
        for bi in 0..b {
            for oi in 0..o {
                for ci in 0..c {
                    for tap in 0..9 {
                        let (ky, kx) = (tap / 3, tap % 3);
                        let mut s = 0.0f64;
                        for yy in 0..h {
                            for xx in 0..wd {
                                let (sy, sx) =
                                    ((yy + ky).wrapping_sub(1), (xx + kx).wrapping_sub(1));
                                if sy < h && sx < wd {
                                    s += gy[((bi * o + oi) * h + yy) * wd + xx] as f64
                                        * x[((bi * c + ci) * h + sy) * wd + sx] as f64;
                                }
                            }
                        }
                        gw[(oi * c + ci) * 9 + tap] += s;
                    }
                }
            }
        }
        gw
    }

    /// The Winograd weight gradient against the f64 direct sum: odd sizes (partial tiles at
    /// the right and bottom), channel counts that are not multiples of four, batches, chunks
    /// of one tile row and chunks spanning two images, on every lane path, with and without
    /// the InstanceNorm of the input.
    #[test]
    fn weight_gradient_matches_the_direct_sum() {
        use crate::fused::Stats;
        use std::sync::atomic::Ordering;
        for &(b, c, h, wd, o, chunk) in &[
            (1, 16, 8, 8, 16, GRAD_CHUNK_TILES),
            (2, 17, 7, 9, 19, GRAD_CHUNK_TILES),
            (2, 20, 9, 70, 24, 1),
            (3, 8, 10, 21, 6, 32),
            (1, 4, 1, 1, 4, GRAD_CHUNK_TILES),
        ] {
            let x = values(b * c * h * wd, 7);
            let gy = values(b * o * h * wd, 8);
            let stats = Stats::of(&x, h * wd, 1e-5);
            let mut xn = x.clone();
            for (i, plane) in xn.chunks_mut(h * wd).enumerate() {
                let (mu, s) = stats.of_image(i / c, c);
                for v in plane {
                    *v = (*v - mu[i % c]) * s[i % c];
                }
            }
            for (norm, xs) in [(None, &x), (Some(&stats), &xn)] {
                let want = direct_weight_grad(xs, &gy, b, c, h, wd, o);
                let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                for width in [16, 8, 0] {
                    PINNED.store(width, Ordering::Relaxed);
                    let got = weight_grad_in(&x, &gy, b, c, h, wd, o, norm, chunk);
                    PINNED.store(16, Ordering::Relaxed);
                    let err = got
                        .iter()
                        .zip(&want)
                        .fold(0.0f64, |m, (&g, &e)| m.max((g as f64 - e).abs()));
                    assert!(
                        err <= 1e-5 * scale,
                        "{b}x{c}x{h}x{wd}->{o}, chunk {chunk}, norm {}, {width} lanes: \
                         error {err} at scale {scale}",
                        norm.is_some()
                    );
                }
            }
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

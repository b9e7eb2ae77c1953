//! 3×3 / stride 1 / padding 1 convolutions by Winograd's minimal filtering F(2×2, 3×3)
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016).
//!
//! Each 2 × 2 block of output pixels (a tile) of one output channel is
//! `Aᵀ [Σ_c (G g G ᵀ) ⊙ (Bᵀ d B)] A`, with d the 4 × 4 input window of the tile in channel c and
//! g the 3 × 3 kernel of (output channel, c). For each of the 16 positions ξ of the transformed
//! 4 × 4 window the sum over channels is a matrix product, (O × C) · (C × tiles), so the
//! convolution becomes 16 products with 16 · 2 multiply-adds per channel pair and tile where
//! the direct convolution needs 36: 2.25× fewer. The transforms only add and subtract (and
//! halve, in G, computed in f64), so the result stays close to the direct sum: the tests hold
//! it to 1e-5 relative (against f64 sums, candle's conv2d and the direct form).
//!
//! Tiles are grouped in runs of [`sgemm::NR`] along x (a run is one packed panel of the
//! products' right operands): the input transform of one channel computes eight tiles per
//! step from de-interleaved even / odd columns and writes them straight into those panels,
//! and the output transform reads eight tiles of each product per step and writes two
//! interleaved output rows. Work is split into tasks of (image, block of tile rows, run of
//! tile columns, block of output channels), each with its own buffers, so tasks write
//! disjoint parts of the output.

use crate::fused::Fused;
use crate::sgemm::{self, PackedA, NR};
use crate::SendPtr;
use rayon::prelude::*;

/// Tiles per task, about (the product's n).
const TILES: usize = 128;
/// Input channels per product (its depth; one depth block of the product).
const DEPTH: usize = 128;
/// Output channels per task at most (the product's m).
const OUT_BLOCK: usize = 128;

/// Eight lanes of the transforms (one AVX2 register): the transforms run on eight tiles at
/// once, in loops the compiler vectorises.
type F8 = [f32; 8];

#[inline(always)]
fn load(s: &[f32], at: usize) -> F8 {
    s[at..at + 8].try_into().expect("8 lanes")
}

#[inline(always)]
fn add(a: F8, b: F8) -> F8 {
    let mut r = a;
    for (r, b) in r.iter_mut().zip(b) {
        *r += b;
    }
    r
}

#[inline(always)]
fn sub(a: F8, b: F8) -> F8 {
    let mut r = a;
    for (r, b) in r.iter_mut().zip(b) {
        *r -= b;
    }
    r
}

/// `(d0 − d2, d1 + d2, d2 − d1, d1 − d3)`: one dimension of `Bᵀ d B`.
#[inline(always)]
fn bt(d: [F8; 4]) -> [F8; 4] {
    [
        sub(d[0], d[2]),
        add(d[1], d[2]),
        sub(d[2], d[1]),
        sub(d[1], d[3]),
    ]
}

/// `(m0 + m1 + m2, m1 − m2 − m3)`: one dimension of `Aᵀ m A`.
#[inline(always)]
fn at(m: [F8; 4]) -> [F8; 2] {
    [add(add(m[0], m[1]), m[2]), sub(sub(m[1], m[2]), m[3])]
}

/// Defines `$name`, which runs its body compiled for AVX2 + FMA where the CPU has them (the
/// lane loops then vectorise eight wide) and as it is elsewhere.
macro_rules! avx2_or_portable {
    ($(#[$m:meta])* fn $name:ident($($a:ident : $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($a: $t),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn fast($($a: $t),*) {
                body($($a),*)
            }
            #[cfg(target_arch = "x86_64")]
            if sgemm::simd() {
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { fast($($a),*) };
            }
            body($($a),*)
        }
    };
    ($(#[$m:meta])* unsafe fn $name:ident($($a:ident : $t:ty),* $(,)?) { $($body:tt)* }) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name($($a: $t),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn body($($a: $t),*) { $($body)* }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn fast($($a: $t),*) {
                // SAFETY: the caller keeps `$name`'s contract.
                unsafe { body($($a),*) }
            }
            #[cfg(target_arch = "x86_64")]
            if sgemm::simd() {
                // SAFETY: the CPU has AVX2 and FMA; the caller keeps `$name`'s contract.
                return unsafe { fast($($a),*) };
            }
            // SAFETY: the caller keeps `$name`'s contract.
            unsafe { body($($a),*) }
        }
    };
}

/// `G g Gᵀ` of one 3 × 3 kernel (row-major), in f64 and rounded once.
fn weight_transform(g: &[f32]) -> [f32; 16] {
    let t = |v: [f64; 3]| {
        [
            v[0],
            (v[0] + v[1] + v[2]) / 2.0,
            (v[0] - v[1] + v[2]) / 2.0,
            v[2],
        ]
    };
    let g: [[f64; 3]; 3] = std::array::from_fn(|r| std::array::from_fn(|c| g[r * 3 + c] as f64));
    // G g: along each column of g.
    let cols: [[f64; 4]; 3] = std::array::from_fn(|c| t([g[0][c], g[1][c], g[2][c]]));
    // (G g) Gᵀ: along each row of G g.
    let mut u = [0.0f32; 16];
    for i in 0..4 {
        for (j, v) in t([cols[0][i], cols[1][i], cols[2][i]])
            .into_iter()
            .enumerate()
        {
            u[i * 4 + j] = v as f32;
        }
    }
    u
}

/// Whether the Winograd form pays for a convolution of `c` input and `o` output channels on
/// images `w` pixels wide. It saves 20 of 36 multiply-adds per channel pair and tile but
/// transforms every input and output channel of a tile: with c·o/(c + o) below 20 (both
/// below 40) the transforms cost more than the products save (the thresholds come from
/// timing both forms on the quick profile's 16- to 64-channel shapes). And runs of NR tiles
/// per image row must be three quarters full at least (a 16-pixel-wide image has 8 tiles per
/// row in a run of 16).
pub(crate) fn pays(c: usize, o: usize, w: usize) -> bool {
    let tw = w.div_ceil(2);
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
    let mut y = vec![0.0f32; b * o * hw];
    if y.is_empty() {
        return y;
    }
    // Tiles: th × tw cover the image; runs of NR tile columns cover tw.
    let (th, tw) = (h.div_ceil(2), wd.div_ceil(2));
    let twp = tw.div_ceil(NR) * NR;
    let run = twp.min((TILES / NR).max(1) * NR);
    let band = (TILES / run).clamp(1, th);
    let blocks = o.div_ceil(OUT_BLOCK);
    let ob_len = o.div_ceil(blocks);
    // The transformed weights, packed per (position ξ, output block): A of one product.
    // u[(oi·16 + ξ)·C + ci]: position ξ of the transformed kernel (oi, ci), so that each
    // product's rows are contiguous.
    let mut u = vec![0.0f32; o * 16 * c];
    u.par_chunks_mut(16 * c)
        .zip(w.par_chunks(9 * c))
        .for_each(|(uo, wo)| {
            for (ci, g) in wo.chunks_exact(9).enumerate() {
                for (xi, v) in weight_transform(g).into_iter().enumerate() {
                    uo[xi * c + ci] = v;
                }
            }
        });
    let packed: Vec<PackedA> = (0..16 * blocks)
        .into_par_iter()
        .map(|q| {
            let (xi, ob) = (q / blocks, q % blocks);
            let o0 = ob * ob_len;
            let m = ob_len.min(o - o0);
            PackedA::from_rows(m, c, |i, row| {
                let at = ((o0 + i) * 16 + xi) * c;
                row.copy_from_slice(&u[at..at + c]);
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
    let y_ptr = SendPtr::new(&mut y);
    tasks.into_par_iter().for_each_init(
        || {
            (
                // Even and odd columns of the 2·band + 2 input rows of one channel.
                vec![0.0f32; (2 * band + 2) * 2 * (run + 1)],
                // The 16 right operands (packed, depth `depth`, run·band columns).
                vec![0.0f32; 16 * sgemm::packed_b_len(depth, run * band)],
                // The 16 products (ob_len × run·band each).
                vec![0.0f32; 16 * ob_len * run * band],
            )
        },
        |(eo, vp, mt), t| {
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
                    split_rows(plane, h, wd, &t, nm, eo);
                    transform_channel(eo, &t, kd, ci - c0, vp_stride, vp);
                }
                for xi in 0..16 {
                    let b_xi = &vp[xi * vp_stride..xi * vp_stride + vp_stride];
                    // SAFETY: mt holds 16 products of m × n (row stride n); the panels
                    // cover n columns, a multiple of NR.
                    unsafe {
                        sgemm::gemm(
                            &packed[xi * blocks + t.ob],
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
            unsafe { untransform(&mt[..16 * m * n], m, n, &t, h, wd, bias, f.relu, out) };
        },
    );
    y
}

/// Asks the CPU to bring the input rows a task reads from `plane` into cache.
fn prefetch_rows(plane: &[f32], h: usize, wd: usize, t: &Task) {
    #[cfg(target_arch = "x86_64")]
    {
        let x0 = (2 * t.tx0).saturating_sub(1).min(wd);
        let x1 = (2 * (t.tx0 + t.cols) + 1).min(wd);
        for r in 0..2 * t.rows + 2 {
            let y = (2 * t.ty0 + r).wrapping_sub(1);
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

avx2_or_portable! {
    /// Fills `eo` with the even and odd columns of the input rows a task's tiles read from
    /// one channel plane (H × W), normalised by `(mean, 1 / std)`: for local input row r
    /// (image row 2·ty0 + r − 1) and j in 0..=cols, `eo[(2r)·(cols+1) + j]` is column
    /// 2·(tx0 + j) − 1 and `eo[(2r+1)·(cols+1) + j]` column 2·(tx0 + j); zero outside the
    /// image (the convolution pads the normalised input with zeros).
    fn split_rows(
        plane: &[f32],
        h: usize,
        wd: usize,
        t: &Task,
        norm: (f32, f32),
        eo: &mut [f32],
    ) {
        let len = t.cols + 1;
        let (mu, s) = norm;
        // The j whose odd column 2·(tx0 + j) is inside the image: [.., inner); from j_lo on the
        // even column 2·(tx0 + j) − 1 is inside too.
        let inner = wd.saturating_sub(2 * t.tx0).div_ceil(2).min(len);
        let j_lo = usize::from(t.tx0 == 0).min(inner);
        for r in 0..2 * t.rows + 2 {
            let (ev, od) = eo[2 * r * len..(2 * r + 2) * len].split_at_mut(len);
            let y = (2 * t.ty0 + r).wrapping_sub(1);
            if y >= h {
                ev.fill(0.0);
                od.fill(0.0);
                continue;
            }
            let row = &plane[y * wd..(y + 1) * wd];
            let px = |x: usize| if x < wd { (row[x] - mu) * s } else { 0.0 };
            for j in (0..j_lo).chain(inner..len) {
                let x0 = 2 * (t.tx0 + j);
                ev[j] = px(x0.wrapping_sub(1));
                od[j] = px(x0);
            }
            // Columns 2·(tx0 + j) − 1 and 2·(tx0 + j) of the inner j, in pairs, eight j at a
            // time (fixed-size copies the compiler turns into shuffles).
            let first = 2 * (t.tx0 + j_lo);
            let mut j = j_lo;
            while j + 8 <= inner {
                let src = first - 1 + 2 * (j - j_lo);
                let pairs: &[f32; 16] = row[src..src + 16].try_into().expect("16 values");
                let (mut e, mut o) = ([0.0f32; 8], [0.0f32; 8]);
                for i in 0..8 {
                    e[i] = (pairs[2 * i] - mu) * s;
                    o[i] = (pairs[2 * i + 1] - mu) * s;
                }
                ev[j..j + 8].copy_from_slice(&e);
                od[j..j + 8].copy_from_slice(&o);
                j += 8;
            }
            for j in j..inner {
                let x0 = 2 * (t.tx0 + j);
                ev[j] = (row[x0 - 1] - mu) * s;
                od[j] = (row[x0] - mu) * s;
            }
        }
    }
}

/// Row a of the transformed windows (`d · B`) of eight tiles from their input row `r`
/// (local) at tile column j: input columns 2tx − 1, 2tx, 2tx + 1, 2tx + 2.
#[inline(always)]
fn window_row(eo: &[f32], len: usize, r: usize, j: usize) -> [F8; 4] {
    let (e, o) = (2 * r * len + j, (2 * r + 1) * len + j);
    bt([load(eo, e), load(eo, o), load(eo, e + 1), load(eo, o + 1)])
}

avx2_or_portable! {
    /// Writes the 16 transformed windows `Bᵀ d B` of every tile of one channel (row `p` of the
    /// products' depth `kd`) into the packed right operands `vp`, one of `stride` floats per
    /// position ξ.
    fn transform_channel(
        eo: &[f32],
        t: &Task,
        kd: usize,
        p: usize,
        stride: usize,
        vp: &mut [f32],
    ) {
        let len = t.cols + 1;
        for ty in 0..t.rows {
            for j in (0..t.cols).step_by(8) {
                // d · B row by row, then Bᵀ · (d B) column by column.
                let r0 = window_row(eo, len, 2 * ty, j);
                let r1 = window_row(eo, len, 2 * ty + 1, j);
                let r2 = window_row(eo, len, 2 * ty + 2, j);
                let r3 = window_row(eo, len, 2 * ty + 3, j);
                let at = sgemm::b_index(kd, p, ty * t.cols + j);
                for jj in 0..4 {
                    let v = bt([r0[jj], r1[jj], r2[jj], r3[jj]]);
                    for (ii, v) in v.iter().enumerate() {
                        let d = (ii * 4 + jj) * stride + at;
                        let dst: &mut F8 = (&mut vp[d..d + 8]).try_into().expect("8 lanes");
                        *dst = *v;
                    }
                }
            }
        }
    }
}

avx2_or_portable! {
    /// Output transform of a task: from the 16 products `mt` (m × n each) to the output
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
        for oi in 0..m {
            let bv = bias.map_or(0.0, |b| b[oi]);
            for ty in 0..t.rows {
                for j in (0..t.cols).step_by(8) {
                    let x0 = 2 * (t.tx0 + j);
                    if x0 >= wd {
                        break;
                    }
                    let col = ty * t.cols + j;
                    // Aᵀ · m column by column, then (Aᵀ m) · A row by row.
                    let mut cols = [[[0.0f32; 8]; 2]; 4];
                    for (jj, c) in cols.iter_mut().enumerate() {
                        let base = (jj * m + oi) * n + col;
                        let step = 4 * m * n;
                        *c = at([
                            load(mt, base),
                            load(mt, base + step),
                            load(mt, base + 2 * step),
                            load(mt, base + 3 * step),
                        ]);
                    }
                    let nx = 16.min(wd - x0);
                    let [c0, c1, c2, c3] = cols;
                    let out_rows = [
                        at([c0[0], c1[0], c2[0], c3[0]]),
                        at([c0[1], c1[1], c2[1], c3[1]]),
                    ];
                    for (r, [y0, y1]) in out_rows.into_iter().enumerate() {
                        let yy = 2 * (t.ty0 + ty) + r;
                        if yy >= h {
                            break;
                        }
                        let mut line = [0.0f32; 16];
                        for i in 0..8 {
                            let (a, b) = (y0[i] + bv, y1[i] + bv);
                            line[2 * i] = if relu { a.max(0.0) } else { a };
                            line[2 * i + 1] = if relu { b.max(0.0) } else { b };
                        }
                        let d = oi * hw + yy * wd + x0;
                        // SAFETY: pixels (yy, x0..x0 + nx) of channel oi lie in this task's
                        // tiles and within the image (yy < H, x0 + nx ≤ W): the caller's.
                        let dst = unsafe { std::slice::from_raw_parts_mut(out.add(d), nx) };
                        if let Ok(dst) = <&mut [f32; 16]>::try_from(&mut *dst) {
                            *dst = line;
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

    #[test]
    fn pays_where_channels_and_rows_fill_the_runs() {
        let widths: Vec<usize> = (1..=100).filter(|&w| pays(64, 64, w)).collect();
        let want: Vec<usize> = (23..=32).chain(47..=64).chain(71..=100).collect();
        assert_eq!(widths, want);
        assert!(pays(40, 40, 512) && pays(128, 64, 512));
        assert!(!pays(32, 32, 512) && !pays(16, 1024, 512) && !pays(1024, 16, 512));
        // The shapes conv.rs compares with candle's conv2d on this path, both directions.
        assert!(pays(40, 48, 24) && pays(48, 40, 24) && pays(48, 41, 97) && pays(41, 48, 97));
    }

    #[test]
    fn transforms_are_exact_on_one_tap() {
        // A kernel with a single 1 at (ky, kx) shifts the input: every output equals an input
        // pixel (or 0 at the border), which the transforms must reproduce to rounding.
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
                            (got - want).abs() <= 2e-6,
                            "tap {tap} at ({oi},{yy},{xx}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

//! The single-precision matrix product behind the CPU convolutions and attention tiles:
//! `C (m × n) (+)= A · B` with A packed into the micro-kernel's order by the caller (a weight
//! matrix is packed once per call for all bands) or read where it lies, row by row at any
//! offsets and step ([`gemm_in_place`]: an operand used once, whose packing copy would cost
//! as much as a good part of the product), and B either packed by the caller too (an im2col
//! writes its columns straight into packed panels, no separate packing copy) or read in
//! place, one offset per row, from memory where each row's columns are contiguous
//! ([`gemm_gathered`]: a convolution's shifted input rows).
//!
//! A is packed in panels of [`MR`] rows (each panel `k × MR`, k-major), B in panels of [`NR`]
//! columns (each `k × NR`, k-major). The product runs in blocks of [`KC`] along k and [`MC`]
//! rows of A; for each B micro-panel (kept in L1) it sweeps the A panels of the block (kept
//! in L2). The micro-kernel keeps a 6 × 16 tile of C in twelve AVX2 registers and issues
//! twelve FMAs per step of k; without AVX2 and FMA a portable kernel of the same shape runs.
//! Where the CPU has AVX-512F, a wide micro-kernel takes [`WIDE`] B panels at once (a 6 × 64
//! tile of C in 24 of its 32 registers, 24 FMAs per step of k) wherever whole groups of panels
//! fit, and the AVX2 kernel the panels left over.

/// Rows of a micro-tile (A panel height).
pub const MR: usize = 6;
/// Columns of a micro-tile (B panel width).
pub const NR: usize = 16;
/// Block length along k (a B micro-panel of 128 × 16 floats, 8 KB, stays in L1).
const KC: usize = 128;
/// Rows of A per block (a multiple of MR): 72 × 128 floats = 36 KB stay in L2.
const MC: usize = 72;
/// B panels of the wide (AVX-512) micro-kernel: their 128 × 64 floats (32 KB) stay in L1.
const WIDE: usize = 4;

/// A (m × k) packed in panels of MR rows, each k × MR (k-major), zero beyond row m.
#[derive(Debug, Clone)]
pub struct PackedA {
    data: Vec<f32>,
    m: usize,
    k: usize,
}

impl PackedA {
    /// Packs A with element (i, p) at `a[i·rs + p·cs]`.
    pub fn pack(a: &[f32], m: usize, k: usize, rs: usize, cs: usize) -> PackedA {
        let mut data = vec![0.0f32; m.div_ceil(MR) * MR * k];
        for (ip, panel) in data.chunks_mut(MR * k).enumerate() {
            let rows = MR.min(m - ip * MR);
            if cs == 1 {
                for r in 0..rows {
                    let row = (ip * MR + r) * rs;
                    for (p, &v) in a[row..row + k].iter().enumerate() {
                        panel[p * MR + r] = v;
                    }
                }
            } else {
                // Along k in the outer loop: a panel's rows are close together in `a` when
                // rows are the short stride (a transposed operand).
                let first = ip * MR * rs;
                for (p, dst) in panel.chunks_exact_mut(MR).enumerate() {
                    for (r, d) in dst[..rows].iter_mut().enumerate() {
                        *d = a[first + r * rs + p * cs];
                    }
                }
            }
        }
        PackedA { data, m, k }
    }

    /// Rows of A (m).
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Its panels from step `ks.start` on, for [`gemm_with`].
    fn packed(&self, ks: std::ops::Range<usize>) -> impl Fn(usize, usize) -> PackedCols + '_ {
        let (data, k) = (self.data.as_ptr(), self.k);
        move |ip, q0| PackedCols(data.wrapping_add(ip * MR * k + (ks.start + q0) * MR))
    }

    /// Packs A (m × k) row by row: `fill(i, row)` writes row i's k values into `row`.
    pub fn from_rows(m: usize, k: usize, mut fill: impl FnMut(usize, &mut [f32])) -> PackedA {
        let mut data = vec![0.0f32; m.div_ceil(MR) * MR * k];
        let mut line = vec![0.0f32; k];
        for (ip, panel) in data.chunks_mut(MR * k).enumerate() {
            for r in 0..MR.min(m - ip * MR) {
                fill(ip * MR + r, &mut line);
                for (p, &v) in line.iter().enumerate() {
                    panel[p * MR + r] = v;
                }
            }
        }
        PackedA { data, m, k }
    }

    /// `count` matrices of m × k each, packed at once, panel by panel on rayon's threads:
    /// `fill(ip, panels)` writes panel ip (rows ip·MR … ip·MR + MR − 1) of every matrix into
    /// `panels`, matrix q's at `q·MR·k`, k-major (row r's element p at `p·MR + r`). It must
    /// write every value, zeros for rows beyond m: `panels` holds what the last call wrote.
    /// Unlike [`PackedA::from_rows`] the matrices are never zero-filled first, and one pass
    /// over a source (a kernel's transform) can fill many matrices.
    pub fn pack_panels(
        count: usize,
        m: usize,
        k: usize,
        fill: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Vec<PackedA> {
        use rayon::prelude::*;
        let (panels, panel) = (m.div_ceil(MR), MR * k);
        let len = panels * panel;
        let mut data: Vec<Vec<f32>> = (0..count).map(|_| Vec::with_capacity(len)).collect();
        let dst: Vec<crate::SendPtr> = data.iter_mut().map(crate::SendPtr::allocation).collect();
        (0..panels).into_par_iter().for_each_init(
            || vec![0.0f32; count * panel],
            |buf, ip| {
                fill(ip, buf);
                for (d, src) in dst.iter().zip(buf.chunks_exact(panel)) {
                    // SAFETY: each matrix's allocation holds `len` floats; panel ip's
                    // `panel` floats from ip·panel on are written by this task alone.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), d.at(ip * panel), panel) };
                }
            },
        );
        data.into_iter()
            .map(|mut d| {
                // SAFETY: the loop above wrote panels 0..panels of every matrix, all `len`
                // floats of its allocation.
                unsafe { d.set_len(len) };
                PackedA { data: d, m, k }
            })
            .collect()
    }
}

/// Floats from one packed B panel of depth `k` to the next.
#[inline(always)]
fn panel_stride(k: usize) -> usize {
    k * NR
}

/// Floats of a packed B of `k` rows and `n` columns.
pub fn packed_b_len(k: usize, n: usize) -> usize {
    n.div_ceil(NR) * panel_stride(k)
}

/// Index of B's element (row p, column j) in its packed form of depth `k`.
#[inline(always)]
pub fn b_index(k: usize, p: usize, j: usize) -> usize {
    (j / NR) * panel_stride(k) + p * NR + j % NR
}

/// `Σ a_i b_i` in eight partial sums (so that it vectorises), any length.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// The sum of a vector's eight lanes.
///
/// # Safety
/// The CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
pub(crate) unsafe fn lane_sum256(a: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)))
}

/// Whether the AVX2 + FMA micro-kernel runs on this CPU.
pub fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the wide AVX-512F micro-kernel runs on this CPU (beside the AVX2 one).
pub fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        simd() && std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Where a micro-kernel finds row p of its B panel (NR floats), and the same row of the
/// panels after it.
trait Rows: Copy {
    /// # Safety
    /// p is below the depth the panel was made for.
    unsafe fn row(self, p: usize) -> *const f32;

    /// Floats from a row of this panel to the same row of the next panel.
    fn step(self) -> usize;
}

/// A packed panel: rows NR floats apart, panels `step` floats apart.
#[derive(Clone, Copy)]
struct Packed {
    ptr: *const f32,
    step: usize,
}

impl Rows for Packed {
    #[inline(always)]
    unsafe fn row(self, p: usize) -> *const f32 {
        // SAFETY: the caller keeps this function's contract (its # Safety section).
        unsafe { self.ptr.add(p * NR) }
    }

    #[inline(always)]
    fn step(self) -> usize {
        self.step
    }
}

/// Rows read in place: row p starts `offsets[p]` floats after `base`.
#[derive(Clone, Copy)]
struct Gathered {
    base: *const f32,
    offsets: *const usize,
}

impl Rows for Gathered {
    #[inline(always)]
    unsafe fn row(self, p: usize) -> *const f32 {
        // SAFETY: the caller keeps this function's contract (its # Safety section).
        unsafe { self.base.add(*self.offsets.add(p)) }
    }

    #[inline(always)]
    fn step(self) -> usize {
        NR
    }
}

/// Where a micro-kernel finds element (row i, step p) of its A panel (MR rows).
trait Cols: Copy {
    /// # Safety
    /// p is below the depth the panel was made for, i below MR.
    unsafe fn at(self, p: usize, i: usize) -> *const f32;
}

/// A packed panel: step p's MR values contiguous.
#[derive(Clone, Copy)]
struct PackedCols(*const f32);

impl Cols for PackedCols {
    #[inline(always)]
    unsafe fn at(self, p: usize, i: usize) -> *const f32 {
        // SAFETY: the caller keeps this function's contract (its # Safety section).
        unsafe { self.0.add(p * MR + i) }
    }
}

/// A panel read in place: row i's step p at `rows[i] + p·step`.
#[derive(Clone, Copy)]
struct InPlace {
    rows: [*const f32; MR],
    step: usize,
}

impl Cols for InPlace {
    #[inline(always)]
    unsafe fn at(self, p: usize, i: usize) -> *const f32 {
        // SAFETY: the caller keeps this function's contract (its # Safety section).
        unsafe { self.rows[i].add(p * self.step) }
    }
}

type Kernel<A, R> = unsafe fn(usize, A, R, *mut f32, usize, bool);

/// The micro-kernels one product runs: `tile` for single panels, `wide` (if any) for groups of
/// [`WIDE`] panels (a MR × WIDE·NR tile of C).
#[derive(Clone, Copy)]
struct MicroKernels<A, R> {
    tile: Kernel<A, R>,
    wide: Option<Kernel<A, R>>,
}

/// `C (MR × NR, row stride ldc) (+)= Σ_p A(i, p) · b.row(p)[j]`, portable.
///
/// # Safety
/// `a` has kc readable steps of MR rows, `b` has kc rows of NR readable floats, and C's MR
/// rows of NR floats at stride `ldc` are writable.
unsafe fn kernel_portable<A: Cols, R: Rows>(
    kc: usize,
    a: A,
    b: R,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    // SAFETY: the caller keeps this function's contract (its # Safety section).
    unsafe {
        let mut t = [[0.0f32; NR]; MR];
        for p in 0..kc {
            let bp = std::slice::from_raw_parts(b.row(p), NR);
            for (i, row) in t.iter_mut().enumerate() {
                let av = *a.at(p, i);
                for (v, &bv) in row.iter_mut().zip(bp) {
                    *v += av * bv;
                }
            }
        }
        for (i, row) in t.iter().enumerate() {
            let dst = std::slice::from_raw_parts_mut(c.add(i * ldc), NR);
            for (d, &v) in dst.iter_mut().zip(row) {
                *d = if acc { *d + v } else { v };
            }
        }
    }
}

/// The AVX2 + FMA form of [`kernel_portable`]: twelve accumulators, two loads of B and six
/// broadcasts of A per step.
///
/// # Safety
/// As [`kernel_portable`]; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2<A: Cols, R: Rows>(kc: usize, a: A, b: R, c: *mut f32, ldc: usize, acc: bool) {
    // SAFETY: the caller keeps this function's contract (its # Safety section).
    unsafe {
        use std::arch::x86_64::*;
        let z = _mm256_setzero_ps();
        let (mut c00, mut c01, mut c10, mut c11, mut c20, mut c21) = (z, z, z, z, z, z);
        let (mut c30, mut c31, mut c40, mut c41, mut c50, mut c51) = (z, z, z, z, z, z);
        for p in 0..kc {
            let b = b.row(p);
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            let a0 = _mm256_broadcast_ss(&*a.at(p, 0));
            c00 = _mm256_fmadd_ps(a0, b0, c00);
            c01 = _mm256_fmadd_ps(a0, b1, c01);
            let a1 = _mm256_broadcast_ss(&*a.at(p, 1));
            c10 = _mm256_fmadd_ps(a1, b0, c10);
            c11 = _mm256_fmadd_ps(a1, b1, c11);
            let a2 = _mm256_broadcast_ss(&*a.at(p, 2));
            c20 = _mm256_fmadd_ps(a2, b0, c20);
            c21 = _mm256_fmadd_ps(a2, b1, c21);
            let a3 = _mm256_broadcast_ss(&*a.at(p, 3));
            c30 = _mm256_fmadd_ps(a3, b0, c30);
            c31 = _mm256_fmadd_ps(a3, b1, c31);
            let a4 = _mm256_broadcast_ss(&*a.at(p, 4));
            c40 = _mm256_fmadd_ps(a4, b0, c40);
            c41 = _mm256_fmadd_ps(a4, b1, c41);
            let a5 = _mm256_broadcast_ss(&*a.at(p, 5));
            c50 = _mm256_fmadd_ps(a5, b0, c50);
            c51 = _mm256_fmadd_ps(a5, b1, c51);
        }
        let rows = [
            (c00, c01),
            (c10, c11),
            (c20, c21),
            (c30, c31),
            (c40, c41),
            (c50, c51),
        ];
        for (i, (lo, hi)) in rows.into_iter().enumerate() {
            let d = c.add(i * ldc);
            if acc {
                _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), lo));
                _mm256_storeu_ps(d.add(8), _mm256_add_ps(_mm256_loadu_ps(d.add(8)), hi));
            } else {
                _mm256_storeu_ps(d, lo);
                _mm256_storeu_ps(d.add(8), hi);
            }
        }
    }
}

/// `C (MR × WIDE·NR, row stride ldc) (+)= Σ_p A(i, p) · B[p][j]` over [`WIDE`] panels
/// of B (panel q's row p at `b.row(p) + q·b.step()`) with AVX-512F: 24 accumulators, four
/// loads of B and six broadcasts of A per step.
///
/// # Safety
/// `a` has kc readable steps of MR rows, each of the WIDE panels has kc rows of NR readable
/// floats, C's MR rows of WIDE·NR floats at stride `ldc` are writable, and the CPU has
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512<A: Cols, R: Rows>(
    kc: usize,
    a: A,
    b: R,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    // SAFETY: the caller keeps this function's contract (its # Safety section).
    unsafe {
        use std::arch::x86_64::*;
        let s = b.step();
        let mut t = [[_mm512_setzero_ps(); WIDE]; MR];
        for p in 0..kc {
            let r = b.row(p);
            let bv = [
                _mm512_loadu_ps(r),
                _mm512_loadu_ps(r.add(s)),
                _mm512_loadu_ps(r.add(2 * s)),
                _mm512_loadu_ps(r.add(3 * s)),
            ];
            for (i, row) in t.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.at(p, i));
                for (v, &bq) in row.iter_mut().zip(&bv) {
                    *v = _mm512_fmadd_ps(av, bq, *v);
                }
            }
        }
        for (i, row) in t.iter().enumerate() {
            for (q, &v) in row.iter().enumerate() {
                let d = c.add(i * ldc + q * NR);
                if acc {
                    _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), v));
                } else {
                    _mm512_storeu_ps(d, v);
                }
            }
        }
    }
}

/// `steps` rounds of twelve independent vector multiply-adds (the micro-kernels' shape) on the
/// widest vectors the CPU has: (floating-point operations done, a value that depends on all of
/// them).
pub(crate) fn fma_chains(steps: usize, seed: f32) -> (f64, f32) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: avx512() checked that the CPU has AVX-512F.
        return unsafe { fma_chains_avx512(steps, seed) };
    }
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: simd() checked that the CPU has AVX2 and FMA.
        return unsafe { fma_chains_avx2(steps, seed) };
    }
    let mut acc = [[seed; 8]; 12];
    let (a, b) = (
        std::hint::black_box(0.999_f32),
        std::hint::black_box(1e-7_f32),
    );
    for _ in 0..steps {
        for lane in acc.iter_mut() {
            for v in lane.iter_mut() {
                *v = v.mul_add(a, b);
            }
        }
    }
    let sum = acc.iter().flatten().sum();
    ((steps * 12 * 8 * 2) as f64, sum)
}

/// [`fma_chains`] with AVX2 + FMA intrinsics.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_avx2(steps: usize, seed: f32) -> (f64, f32) {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(std::hint::black_box(0.999));
    let b = _mm256_set1_ps(std::hint::black_box(1e-7));
    let mut acc = [_mm256_set1_ps(seed); 12];
    for _ in 0..steps {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut out = [0f32; 8];
    let mut sum = 0f32;
    for v in acc {
        // SAFETY: `out` holds 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
        sum += out.iter().sum::<f32>();
    }
    ((steps * 12 * 8 * 2) as f64, sum)
}

/// [`fma_chains`] with AVX-512F intrinsics.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_chains_avx512(steps: usize, seed: f32) -> (f64, f32) {
    use std::arch::x86_64::*;
    let a = _mm512_set1_ps(std::hint::black_box(0.999));
    let b = _mm512_set1_ps(std::hint::black_box(1e-7));
    let mut acc = [_mm512_set1_ps(seed); 12];
    for _ in 0..steps {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    let sum = acc.into_iter().map(|v| _mm512_reduce_add_ps(v)).sum();
    ((steps * 12 * 16 * 2) as f64, sum)
}

/// Every set of micro-kernels this CPU can run, named by path: portable, AVX2 alone, and AVX2
/// with the wide AVX-512 kernel (the last one is what [`kernels`] picks).
fn kernel_paths<A: Cols, R: Rows>() -> Vec<(&'static str, MicroKernels<A, R>)> {
    let mut paths = vec![(
        "portable",
        MicroKernels {
            tile: kernel_portable::<A, R> as Kernel<A, R>,
            wide: None,
        },
    )];
    if simd() {
        let tile = kernels::<A, R>().tile;
        paths.push(("avx2+fma", MicroKernels { tile, wide: None }));
    }
    if avx512() {
        paths.push(("avx512f", kernels::<A, R>()));
    }
    paths
}

/// The micro-kernels for this CPU.
fn kernels<A: Cols, R: Rows>() -> MicroKernels<A, R> {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        return MicroKernels {
            tile: kernel_avx2::<A, R>,
            wide: if avx512() {
                Some(kernel_avx512::<A, R>)
            } else {
                None
            },
        };
    }
    MicroKernels {
        tile: kernel_portable::<A, R>,
        wide: None,
    }
}

/// `C (+)= A[:, ks] · B` for the B panels `panels` (columns `[panels.start·NR,
/// panels.end·NR)`, clipped to `n`), single-threaded: B holds rows `ks` of the full B (its
/// packed depth is `ks.len()`), so that a caller can fill and multiply B one block of rows at
/// a time while the block sits in cache. C's element (i, j) is at `c + i·ldc + j`;
/// `accumulate` adds to C instead of overwriting it.
///
/// # Safety
/// `b` is a packed B of depth `ks.len()` and at least `n` columns, `ks` lies within
/// `0..a.depth()`; C's rows `0..a.rows()`, columns of the panels below `n`, are writable and
/// not written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    a: &PackedA,
    ks: std::ops::Range<usize>,
    b: &[f32],
    n: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    panels: std::ops::Range<usize>,
) {
    // SAFETY: the caller keeps this function's contract (its # Safety section).
    unsafe { gemm_packed(kernels(), a, ks, b, n, c, ldc, accumulate, panels) }
}

/// [`gemm`] with a given micro-kernel.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_packed(
    kern: MicroKernels<PackedCols, Packed>,
    a: &PackedA,
    ks: std::ops::Range<usize>,
    b: &[f32],
    n: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    panels: std::ops::Range<usize>,
) {
    // SAFETY: the caller keeps this function's contract (its # Safety section).
    unsafe {
        assert!(ks.end <= a.k && b.len() >= packed_b_len(ks.len(), n));
        let panel = packed_panels(b, ks.len());
        let (m, ap, depth) = (a.m, a.packed(ks.clone()), ks.len());
        gemm_with(kern, m, ap, depth, panel, n, c, ldc, accumulate, panels)
    }
}

/// A packed B of depth `depth` as [`gemm_with`]'s panels.
fn packed_panels(b: &[f32], depth: usize) -> impl Fn(usize, usize) -> Packed {
    let (b, step) = (b.as_ptr(), panel_stride(depth));
    move |jp, q0| Packed {
        ptr: b.wrapping_add(jp * step + q0 * NR),
        step,
    }
}

/// As [`gemm`] with A read in place instead of packed: A has `rows.len()` rows, and its element
/// (row i, step p) for p in `ks` is `a[rows[i] + p·step]`. A row-major A (row stride lda) has
/// `rows[i] = i·lda` and step 1, a column-major one `rows[i] = i` and step lda, and rows may
/// be gathered from anywhere in `a`. The micro-kernels broadcast A's values from where they
/// lie, so the product costs no packing copy of A (worth it where A is used once: a tile of
/// probabilities).
///
/// # Safety
/// `b` is a packed B of depth `ks.len()` and at least `n` columns; C's rows `0..rows.len()`,
/// columns of the panels below `n`, are writable and not written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_in_place(
    a: &[f32],
    rows: &[usize],
    step: usize,
    ks: std::ops::Range<usize>,
    b: &[f32],
    n: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    panels: std::ops::Range<usize>,
) {
    // SAFETY: the caller keeps this function's contract (its # Safety section).
    unsafe {
        gemm_in_place_with(
            kernels(),
            a,
            rows,
            step,
            ks,
            b,
            n,
            c,
            ldc,
            accumulate,
            panels,
        )
    }
}

/// [`gemm_in_place`] with given micro-kernels.
///
/// # Safety
/// As [`gemm_in_place`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_in_place_with(
    kern: MicroKernels<InPlace, Packed>,
    a: &[f32],
    rows: &[usize],
    step: usize,
    ks: std::ops::Range<usize>,
    b: &[f32],
    n: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    panels: std::ops::Range<usize>,
) {
    let (m, depth) = (rows.len(), ks.len());
    if m == 0 || depth == 0 {
        return;
    }
    let reach = rows.iter().max().copied().unwrap_or(0) + (ks.end - 1) * step;
    assert!(
        reach < a.len() && b.len() >= packed_b_len(depth, n),
        "in-place operand out of bounds"
    );
    let ptr = a.as_ptr();
    let apanel = |ip: usize, q0: usize| InPlace {
        rows: std::array::from_fn(|r| {
            // Rows past m repeat the last one; the tile's copy-out drops them.
            ptr.wrapping_add(rows[(ip * MR + r).min(m - 1)] + (ks.start + q0) * step)
        }),
        step,
    };
    let panel = packed_panels(b, depth);
    // SAFETY: every row's steps in `ks` lie in `a` (asserted), B as in `gemm`, C as the caller
    // promises (this function's # Safety section).
    unsafe { gemm_with(kern, m, apanel, depth, panel, n, c, ldc, accumulate, panels) }
}

/// As [`gemm`] with B read in place instead of packed: B's element (row p, column j) is
/// `b[offsets[p − ks.start] + j]`. The micro-kernel reads whole panels, so columns up to the
/// end of the last panel must be readable; what they hold only reaches columns at or beyond
/// `n`, which are not stored.
///
/// # Safety
/// C as for [`gemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_gathered(
    a: &PackedA,
    ks: std::ops::Range<usize>,
    b: &[f32],
    offsets: &[usize],
    n: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    panels: std::ops::Range<usize>,
) {
    // SAFETY: the caller keeps this function's contract (its # Safety section).
    unsafe { gemm_gathered_with(kernels(), a, ks, b, offsets, n, c, ldc, accumulate, panels) }
}

/// [`gemm_gathered`] with a given micro-kernel.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_gathered_with(
    kern: MicroKernels<PackedCols, Gathered>,
    a: &PackedA,
    ks: std::ops::Range<usize>,
    b: &[f32],
    offsets: &[usize],
    n: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    panels: std::ops::Range<usize>,
) {
    // SAFETY: the caller keeps this function's contract (its # Safety section).
    unsafe {
        let last = offsets.iter().max().copied().unwrap_or(0);
        let cols = panels.end.min(n.div_ceil(NR)) * NR;
        assert!(
            ks.end <= a.k && offsets.len() == ks.len() && last + cols <= b.len(),
            "gathered operand out of bounds"
        );
        let (base, offs) = (b.as_ptr(), offsets.as_ptr());
        let panel = |jp: usize, q0: usize| Gathered {
            base: base.add(jp * NR),
            offsets: offs.add(q0),
        };
        let (m, ap, depth) = (a.m, a.packed(ks.clone()), ks.len());
        gemm_with(kern, m, ap, depth, panel, n, c, ldc, accumulate, panels)
    }
}

/// The blocked loops behind [`gemm`], [`gemm_gathered`] and [`gemm_in_place`] for an A of m
/// rows and `depth` steps: `apanel(ip, q0)` is A panel ip from step q0 of the depth on,
/// `panel(jp, q0)` B panel jp from row q0 on.
///
/// # Safety
/// Every A panel below `m.div_ceil(MR)` has `depth` readable steps of MR rows and every B
/// panel in `panels` (below `n`) `depth` readable rows, from step and row 0 of what the
/// closures give for q0 = 0; C's rows `0..m`, columns of those panels below `n`, are
/// writable at stride `ldc` and not written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_with<A: Cols, R: Rows>(
    kern: MicroKernels<A, R>,
    m: usize,
    apanel: impl Fn(usize, usize) -> A,
    depth: usize,
    panel: impl Fn(usize, usize) -> R,
    n: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    panels: std::ops::Range<usize>,
) {
    // SAFETY: the caller keeps this function's contract (its # Safety section).
    unsafe {
        let mut tile = [0.0f32; MR * NR * WIDE];
        for q0 in (0..depth).step_by(KC) {
            let kc = KC.min(depth - q0);
            let acc = accumulate || q0 > 0;
            for i0 in (0..m).step_by(MC) {
                let i1 = (i0 + MC).min(m);
                let mut jp = panels.start;
                while jp < panels.end && jp * NR < n {
                    let j0 = jp * NR;
                    // A group of WIDE whole panels for the wide kernel, else one panel.
                    let (kern, width) = match kern.wide {
                        Some(wide) if jp + WIDE <= panels.end && j0 + WIDE * NR <= n => {
                            (wide, WIDE * NR)
                        }
                        _ => (kern.tile, NR),
                    };
                    let nj = width.min(n - j0);
                    let bp = panel(jp, q0);
                    for ip in i0 / MR..i1.div_ceil(MR) {
                        let ap = apanel(ip, q0);
                        let mi = MR.min(m - ip * MR);
                        let dst = c.add(ip * MR * ldc + j0);
                        if mi == MR && nj == width {
                            kern(kc, ap, bp, dst, ldc, acc);
                        } else {
                            kern(kc, ap, bp, tile.as_mut_ptr(), width, false);
                            for i in 0..mi {
                                let d = std::slice::from_raw_parts_mut(dst.add(i * ldc), nj);
                                let t = &tile[i * width..i * width + nj];
                                for (d, &t) in d.iter_mut().zip(t) {
                                    *d = if acc { *d + t } else { t };
                                }
                            }
                        }
                    }
                    jp += width / NR;
                }
            }
        }
    }
}

/// The packed product's rate in GFLOP/s on each micro-kernel path this CPU runs (`"portable"`,
/// `"avx2+fma"`, `"avx512f"`), for an m × k by k × n product repeated for about `millis` ms
/// per path on every one of rayon's threads at once (each thread its own C).
pub(crate) fn path_rates(m: usize, n: usize, k: usize, millis: u64) -> Vec<(&'static str, f64)> {
    use rayon::prelude::*;
    let values = |len: usize| -> Vec<f32> { (0..len).map(|i| (i % 7) as f32 - 3.0).collect() };
    let pa = PackedA::pack(&values(m * k), m, k, k, 1);
    let pb = values(packed_b_len(k, n));
    let threads = rayon::current_num_threads();
    kernel_paths::<PackedCols, Packed>()
        .into_iter()
        .map(|(name, kern)| {
            let start = std::time::Instant::now();
            let flops: f64 = (0..threads)
                .into_par_iter()
                .map(|_| {
                    let mut c = vec![0.0f32; m * n];
                    let mut done = 0.0;
                    while start.elapsed().as_millis() < millis as u128 {
                        // SAFETY: `pb` is a packed B of depth k and n columns; `c` holds
                        // m × n floats with row stride n, owned by this thread.
                        unsafe {
                            gemm_packed(
                                kern,
                                &pa,
                                0..k,
                                &pb,
                                n,
                                c.as_mut_ptr(),
                                n,
                                false,
                                0..n.div_ceil(NR),
                            )
                        };
                        done += 2.0 * (m * n * k) as f64;
                    }
                    std::hint::black_box(&c);
                    done
                })
                .sum();
            (name, flops / start.elapsed().as_secs_f64() / 1e9)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::values;

    /// Packs B (k × n) with element (p, j) at `b[p·rs + j·cs]`.
    pub fn pack_b(b: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; packed_b_len(k, n)];
        for p in 0..k {
            for j in 0..n {
                out[b_index(k, p, j)] = b[p * rs + j * cs];
            }
        }
        out
    }

    /// Every element of `c` within 1e-5·scale of `want` + `plus`.
    fn assert_close(c: &[f32], want: &[f64], plus: f64, scale: f64, mnk: (usize, usize, usize)) {
        for (got, want) in c.iter().zip(want) {
            assert!(
                ((*got as f64) - (want + plus)).abs() < 1e-5 * scale,
                "{mnk:?}"
            );
        }
    }

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum();
            }
        }
        c
    }

    /// Both micro-kernels against a naive product: edge tiles in m and n, several k blocks,
    /// transposed packing, accumulation and a range of panels.
    #[test]
    fn packed_product_matches_naive() {
        let kernels: Vec<_> = kernel_paths::<PackedCols, Packed>()
            .into_iter()
            .map(|p| p.1)
            .collect();
        assert_eq!(kernels.len(), 1 + simd() as usize + avx512() as usize);
        for (m, n, k) in [
            (1, 1, 1),
            (6, 16, 3),
            (7, 17, 300),
            (75, 40, 513),
            (64, 33, 9),
            (13, 64, 130),
            (80, 150, 257),
        ] {
            let a = values(m * k, (m + n + k) as u64);
            let b = values(k * n, (m * n * k) as u64);
            let want = naive(&a, &b, m, n, k);
            let scale = want.iter().fold(1.0f64, |s, v| s.max(v.abs()));
            // A packed from its transpose (column-major) must give the same panels.
            let at: Vec<f32> = (0..k * m).map(|q| a[(q % m) * k + q / m]).collect();
            for kern in &kernels {
                for pa in [
                    PackedA::pack(&a, m, k, k, 1),
                    PackedA::pack(&at, m, k, 1, m),
                ] {
                    let pb = pack_b(&b, k, n, n, 1);
                    let mut c = vec![1.0f32; m * n];
                    // SAFETY: c is m × n with ldc n; pb is packed for k × n.
                    unsafe {
                        gemm_packed(
                            *kern,
                            &pa,
                            0..k,
                            &pb,
                            n,
                            c.as_mut_ptr(),
                            n,
                            true,
                            0..n.div_ceil(NR),
                        );
                    }
                    assert_close(&c, &want, 1.0, scale, (m, n, k));
                    // Block by block along k (B filled per block), accumulating.
                    let mut c = vec![0.0f32; m * n];
                    for k0 in (0..k).step_by(100) {
                        let k1 = (k0 + 100).min(k);
                        let pb = pack_b(&b[k0 * n..], k1 - k0, n, n, 1);
                        // SAFETY: as above, B of depth k1 − k0.
                        unsafe {
                            gemm_packed(
                                *kern,
                                &pa,
                                k0..k1,
                                &pb,
                                n,
                                c.as_mut_ptr(),
                                n,
                                k0 > 0,
                                0..n.div_ceil(NR),
                            );
                        }
                    }
                    assert_close(&c, &want, 0.0, scale, (m, n, k));
                    // Overwrite, one panel at a time.
                    let mut c = vec![f32::NAN; m * n];
                    for jp in 0..n.div_ceil(NR) {
                        // SAFETY: as above, one panel's columns.
                        unsafe {
                            gemm_packed(
                                *kern,
                                &pa,
                                0..k,
                                &pb,
                                n,
                                c.as_mut_ptr(),
                                n,
                                false,
                                jp..jp + 1,
                            )
                        };
                    }
                    assert_close(&c, &want, 0.0, scale, (m, n, k));
                    // Overwrite, panels split at an odd panel (wide groups start anywhere).
                    let mut c = vec![f32::NAN; m * n];
                    let np = n.div_ceil(NR);
                    for range in [0..np.min(1), np.min(1)..np] {
                        // SAFETY: as above, a range of panels.
                        unsafe {
                            gemm_packed(*kern, &pa, 0..k, &pb, n, c.as_mut_ptr(), n, false, range)
                        };
                    }
                    assert_close(&c, &want, 0.0, scale, (m, n, k));
                }
            }
        }
    }

    /// A read in place against a naive product: row-major, column-major (a transpose) and rows
    /// gathered out of order from a larger matrix, edge tiles, a depth range that starts past
    /// zero and spans blocks, accumulation, on every micro-kernel path.
    #[test]
    fn product_with_a_in_place_matches_naive() {
        let paths = kernel_paths::<InPlace, Packed>();
        for (m, n, k) in [
            (1, 1, 1),
            (6, 64, 3),
            (7, 17, 300),
            (75, 70, 257),
            (13, 64, 130),
        ] {
            let a = values(m * k, (m + n + k) as u64);
            let b = values(k * n, (m * n * k) as u64);
            let scale = naive(&a, &b, m, n, k)
                .iter()
                .fold(1.0f64, |s, v| s.max(v.abs()));
            // Steps from k0 on: A's columns k0.. against B's rows k0...
            let k0 = k / 3;
            let a_part: Vec<f32> = (0..m * (k - k0))
                .map(|q| a[(q / (k - k0)) * k + k0 + q % (k - k0)])
                .collect();
            let want = naive(&a_part, &b[k0 * n..], m, n, k - k0);
            let pb = pack_b(&b[k0 * n..], k - k0, n, n, 1);
            // Row-major; its transpose (column-major); and row i stored as row (5i + 2) mod
            // (m + 1) of a matrix with a spare row, rows k + 3 floats apart.
            let at: Vec<f32> = (0..k * m).map(|q| a[(q % m) * k + q / m]).collect();
            let ld = k + 3;
            let place = |i: usize| ((5 * i + 2) % (m + 1)) * ld;
            let mut stored = vec![f32::NAN; (m + 1) * ld];
            for i in 0..m {
                stored[place(i)..][..k].copy_from_slice(&a[i * k..][..k]);
            }
            let forms: [(&[f32], Vec<usize>, usize); 3] = [
                (&a, (0..m).map(|i| i * k).collect(), 1),
                (&at, (0..m).collect(), m),
                (&stored, (0..m).map(place).collect(), 1),
            ];
            for (name, kern) in &paths {
                for (form, (data, rows, step)) in forms.iter().enumerate() {
                    let mut c = vec![1.0f32; m * n];
                    // SAFETY: c is m × n with ldc n; pb is packed for (k − k0) × n.
                    unsafe {
                        gemm_in_place_with(
                            *kern,
                            data,
                            rows,
                            *step,
                            k0..k,
                            &pb,
                            n,
                            c.as_mut_ptr(),
                            n,
                            true,
                            0..n.div_ceil(NR),
                        )
                    };
                    assert!(
                        c.iter()
                            .zip(&want)
                            .all(|(got, want)| ((*got as f64) - (want + 1.0)).abs() < 1e-5 * scale),
                        "{name}, form {form}, {:?}",
                        (m, n, k)
                    );
                }
            }
            // The public entry point (this CPU's kernels), row-major, overwriting.
            let mut c = vec![f32::NAN; m * n];
            let rows: Vec<usize> = (0..m).map(|i| i * k).collect();
            // SAFETY: as above.
            unsafe {
                gemm_in_place(
                    &a,
                    &rows,
                    1,
                    k0..k,
                    &pb,
                    n,
                    c.as_mut_ptr(),
                    n,
                    false,
                    0..n.div_ceil(NR),
                )
            };
            assert_close(&c, &want, 0.0, scale, (m, n, k));
        }
    }

    /// The in-place product against a naive one: B's rows taken from a larger matrix in a
    /// shuffled order through their offsets, edge tiles, a depth over one block, panels read
    /// past `n` into other data, accumulation.
    #[test]
    fn gathered_product_matches_naive() {
        let kernels: Vec<_> = kernel_paths::<PackedCols, Gathered>()
            .into_iter()
            .map(|p| p.1)
            .collect();
        for (m, n, k, ld) in [
            (1, 1, 1, 1),
            (6, 16, 3, 16),
            (7, 17, 300, 19),
            (64, 40, 130, 41),
            (20, 100, 140, 113),
        ] {
            let a = values(m * k, (m + n + k) as u64);
            // Stored rows: k + 1 of them, ld apart, and a panel's width beyond; row p of B
            // is stored row (7·p + 1) mod (k + 1), out of the stored order.
            let stored = values((k + 1) * ld + NR, ld as u64);
            let offsets: Vec<usize> = (0..k).map(|p| ((p * 7 + 1) % (k + 1)) * ld).collect();
            let b: Vec<f32> = (0..k * n).map(|q| stored[offsets[q / n] + q % n]).collect();
            let want = naive(&a, &b, m, n, k);
            let scale = want.iter().fold(1.0f64, |s, v| s.max(v.abs()));
            let pa = PackedA::pack(&a, m, k, k, 1);
            for kern in &kernels {
                let mut c = vec![1.0f32; m * n];
                for k0 in (0..k).step_by(128) {
                    let k1 = (k0 + 128).min(k);
                    // SAFETY: c is m × n with ldc n.
                    unsafe {
                        gemm_gathered_with(
                            *kern,
                            &pa,
                            k0..k1,
                            &stored,
                            &offsets[k0..k1],
                            n,
                            c.as_mut_ptr(),
                            n,
                            true,
                            0..n.div_ceil(NR),
                        );
                    }
                }
                assert_close(&c, &want, 1.0, scale, (m, n, k));
            }
        }
    }
}

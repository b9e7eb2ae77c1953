//! The CPU kernels: rayon over (batch, channel) rows, the state of a row kept locally, and only
//! the state at each chunk start saved for the backward pass, which recomputes the states of one
//! chunk at a time (mamba's kernel does the same per chunk of 2048). No (batch, E, L, N) tensor
//! is ever allocated.

// The kernels index several arrays with the same loop variable; iterator chains would hide that.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use crate::float::{sigmoid, softplus, softplus_grad};
use crate::{Float, Result, ScanInputs, ScanShape};

/// Steps per chunk: the backward pass keeps `CHUNK × N` states and decay factors per row.
pub const CHUNK: usize = 256;

/// What the backward pass needs besides the inputs: the state at the start of every chunk of
/// every row, `(batch, E, chunks, N)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved<F> {
    pub chunk_states: Vec<F>,
    pub chunk: usize,
    pub chunks: usize,
}

/// The output `(batch, E, L)` and the saved chunk states.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward<F> {
    pub y: Vec<F>,
    pub saved: Saved<F>,
}

/// Gradients with respect to every input (`None` for absent optional inputs).
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients<F> {
    pub u: Vec<F>,
    pub delta: Vec<F>,
    pub a: Vec<F>,
    pub b: Vec<F>,
    pub c: Vec<F>,
    pub d: Option<Vec<F>>,
    pub z: Option<Vec<F>>,
    pub delta_bias: Option<Vec<F>>,
}

/// Forward pass with the default chunk length.
pub fn forward<F: Float>(shape: ScanShape, inputs: &ScanInputs<F>) -> Result<Forward<F>> {
    forward_chunked(shape, inputs, CHUNK)
}

/// The time step of channel `e` for the raw value `delta` after bias and softplus.
#[inline(always)]
fn step<F: Float>(inputs: &ScanInputs<F>, e: usize, delta: F) -> F {
    let x = delta + inputs.delta_bias.map_or(F::ZERO, |s| s[e]);
    if inputs.delta_softplus {
        softplus(x)
    } else {
        x
    }
}

/// Forward pass saving the state every `chunk` steps (exposed for tests of the chunking).
pub fn forward_chunked<F: Float>(
    shape: ScanShape,
    inputs: &ScanInputs<F>,
    chunk: usize,
) -> Result<Forward<F>> {
    forward_on(kernel_path(), shape, inputs, chunk)
}

/// [`forward_chunked`] on the kernel path `path` (narrowed to what the CPU supports), for
/// comparing paths.
pub fn forward_on<F: Float>(
    path: KernelPath,
    shape: ScanShape,
    inputs: &ScanInputs<F>,
    chunk: usize,
) -> Result<Forward<F>> {
    let path = path.min(KernelPath::best());
    inputs.check(shape)?;
    let ScanShape {
        channels,
        state,
        length,
        ..
    } = shape;
    let chunk = chunk.max(1);
    let chunks = length.div_ceil(chunk).max(1);
    let rows = shape.batch * channels;
    let mut y = vec![F::ZERO; rows * length];
    let mut chunk_states = vec![F::ZERO; rows * chunks * state];
    if length == 0 || rows == 0 {
        return Ok(Forward {
            y,
            saved: Saved {
                chunk_states,
                chunk,
                chunks,
            },
        });
    }
    // B and C as (batch, L, N), in the order of the walk: each step reads its N values
    // contiguously.
    let (bt, ct) = (
        time_major(inputs.b, shape, inputs.reverse),
        time_major(inputs.c, shape, inputs.reverse),
    );
    y.par_chunks_mut(length)
        .zip(chunk_states.par_chunks_mut(chunks * state))
        .enumerate()
        .for_each_init(Vec::new, |buf, (row, (y_row, saved))| {
            let args = RowArgs {
                shape,
                inputs,
                bt: &bt,
                ct: &ct,
                chunk,
                row,
            };
            let series = RowIn::new(inputs, &[], row, length, buf);
            simd::forward_row_on(path, &args, &series, y_row, saved);
            if inputs.reverse {
                y_row.reverse();
            }
        });
    Ok(Forward {
        y,
        saved: Saved {
            chunk_states,
            chunk,
            chunks,
        },
    })
}

/// One (batch, channel) row's series, in the order the scan walks them: the input's order, or
/// reversed copies when the scan runs backwards in time. `go` (the output gradient) is empty in
/// the forward pass.
struct RowIn<'a, F> {
    delta: &'a [F],
    u: &'a [F],
    z: Option<&'a [F]>,
    go: &'a [F],
}

impl<'a, F: Float> RowIn<'a, F> {
    /// Row `row`'s slices of `inputs` (and of `grad_out`); reversed into `buf` when `reverse`.
    fn new(
        inputs: &'a ScanInputs<'a, F>,
        grad_out: &'a [F],
        row: usize,
        length: usize,
        buf: &'a mut Vec<F>,
    ) -> Self {
        let at = row * length..(row + 1) * length;
        let go = if grad_out.is_empty() {
            grad_out
        } else {
            &grad_out[at.clone()]
        };
        let (delta, u, z) = (&inputs.delta[at.clone()], &inputs.u[at.clone()], inputs.z);
        let z = z.map(|z| &z[at]);
        if !inputs.reverse {
            return RowIn { delta, u, z, go };
        }
        buf.clear();
        let parts = [Some(delta), Some(u), z, Some(go)];
        for part in parts.iter().flatten() {
            buf.extend(part.iter().rev());
        }
        let mut rest = buf.as_slice();
        let mut take = |n: usize| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head
        };
        let (delta, u) = (take(length), take(length));
        let z = z.map(|_| take(length));
        let go = take(go.len());
        RowIn { delta, u, z, go }
    }
}

/// What one row's forward pass reads.
struct RowArgs<'a, F> {
    shape: ScanShape,
    inputs: &'a ScanInputs<'a, F>,
    bt: &'a [F],
    ct: &'a [F],
    chunk: usize,
    row: usize,
}

/// The forward pass of one (batch, channel) row; inlined into a plain and an AVX2 copy. Mamba's
/// state sizes 8 and 16 get a version with the state in registers.
#[inline(always)]
fn forward_row<F: Float>(args: &RowArgs<F>, series: &RowIn<F>, y_row: &mut [F], saved: &mut [F]) {
    match args.shape.state {
        16 => forward_row_fixed::<F, 16>(args, series, y_row, saved),
        8 => forward_row_fixed::<F, 8>(args, series, y_row, saved),
        _ => forward_row_any(args, series, y_row, saved),
    }
}

/// [`forward_row`] for a state size known at compile time (a power of two): the time steps of
/// the row are computed first in one vectorisable pass (into `y_row`, overwritten later), the
/// state lives in a fixed array, and `Σ C·h` is summed as a tree, not a serial chain.
#[inline(always)]
fn forward_row_fixed<F: Float, const N: usize>(
    args: &RowArgs<F>,
    series: &RowIn<F>,
    y_row: &mut [F],
    saved: &mut [F],
) {
    let RowArgs {
        shape,
        inputs,
        bt,
        ct,
        chunk,
        row,
    } = *args;
    let ScanShape {
        channels, length, ..
    } = shape;
    let (b, e) = (row / channels, row % channels);
    let mut a = [F::ZERO; N];
    a.copy_from_slice(&inputs.a[e * N..(e + 1) * N]);
    let d = inputs.d.map_or(F::ZERO, |s| s[e]);
    let bias = inputs.delta_bias.map_or(F::ZERO, |s| s[e]);
    let (delta, u) = (series.delta, series.u);
    for (out, &x) in y_row.iter_mut().zip(delta) {
        *out = if inputs.delta_softplus {
            (x + bias).softplus_kernel()
        } else {
            x + bias
        };
    }
    let mut h = [F::ZERO; N];
    let mut start = 0;
    while start < length {
        let c = start / chunk;
        saved[c * N..(c + 1) * N].copy_from_slice(&h);
        let end = (start + chunk).min(length);
        for t in start..end {
            let (dt, ut) = (y_row[t], u[t]);
            let du = dt * ut;
            let bc = (b * length + t) * N;
            let b_t: [F; N] = bt[bc..bc + N].try_into().unwrap();
            let c_t: [F; N] = ct[bc..bc + N].try_into().unwrap();
            let mut p = [F::ZERO; N];
            for n in 0..N {
                h[n] = (dt * a[n]).exp_kernel() * h[n] + du * b_t[n];
                p[n] = c_t[n] * h[n];
            }
            let mut w = N;
            while w > 1 {
                w /= 2;
                for i in 0..w {
                    p[i] += p[i + w];
                }
            }
            y_row[t] = p[0] + d * ut;
        }
        start = end;
    }
    // The gate y·silu(z), in one vectorisable pass.
    if let Some(z) = series.z {
        for (out, &zv) in y_row.iter_mut().zip(z) {
            *out *= zv / (F::ONE + (F::ZERO - zv).exp_kernel());
        }
    }
}

/// [`forward_row`] for any state size.
#[inline(always)]
fn forward_row_any<F: Float>(
    args: &RowArgs<F>,
    series: &RowIn<F>,
    y_row: &mut [F],
    saved: &mut [F],
) {
    let RowArgs {
        shape,
        inputs,
        bt,
        ct,
        chunk,
        row,
    } = *args;
    let ScanShape {
        channels,
        state,
        length,
        ..
    } = shape;
    let (b, e) = (row / channels, row % channels);
    let a = &inputs.a[e * state..(e + 1) * state];
    let d = inputs.d.map_or(F::ZERO, |s| s[e]);
    let mut h = vec![F::ZERO; state];
    for t in 0..length {
        if t % chunk == 0 {
            saved[(t / chunk) * state..(t / chunk + 1) * state].copy_from_slice(&h);
        }
        let (dt, u) = (step(inputs, e, series.delta[t]), series.u[t]);
        let bc = (b * length + t) * state;
        let (b_t, c_t) = (&bt[bc..bc + state], &ct[bc..bc + state]);
        let du = dt * u;
        for n in 0..state {
            h[n] = (dt * a[n]).exp_kernel() * h[n] + du * b_t[n];
        }
        let mut acc = F::ZERO;
        for n in 0..state {
            acc += c_t[n] * h[n];
        }
        let mut out = acc + d * u;
        if let Some(z) = series.z {
            let zv = z[t];
            out *= zv * sigmoid(zv);
        }
        y_row[t] = out;
    }
}

/// The instruction sets the kernels are compiled for, chosen at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelPath {
    /// Plain code for the build's target (SSE2 on x86-64).
    Portable,
    /// AVX2 and FMA: 8 f32 lanes.
    Avx2,
    /// AVX-512 (F, with AVX2 and FMA): 16 f32 lanes, a state of 16 in one register.
    Avx512,
}

impl KernelPath {
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Portable => "portable",
            KernelPath::Avx2 => "avx2+fma",
            KernelPath::Avx512 => "avx512f",
        }
    }

    /// The widest path this CPU supports.
    pub fn best() -> KernelPath {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            if avx2 && std::is_x86_feature_detected!("avx512f") {
                return KernelPath::Avx512;
            }
            if avx2 {
                return KernelPath::Avx2;
            }
        }
        KernelPath::Portable
    }
}

/// The path the kernels take: AVX2 + FMA where the CPU has it (also on AVX-512 CPUs: `cargo
/// bench -p vim-scan` measured the AVX-512 build of these loops 1.3× slower than the AVX2 one
/// on an AVX-512 Xeon), else portable. The environment variable `VIM_SCAN_KERNEL` (`portable`,
/// `avx2`, `avx512`) picks another; a path wider than the CPU supports is never taken.
pub fn kernel_path() -> KernelPath {
    let best = KernelPath::best();
    let asked = match std::env::var("VIM_SCAN_KERNEL").as_deref() {
        Ok("portable") => KernelPath::Portable,
        Ok("avx512") => KernelPath::Avx512,
        _ => KernelPath::Avx2,
    };
    asked.min(best)
}

/// Run-time selected wider vector code: the same row functions compiled for each path.
mod simd {
    use super::{
        backward_row, forward_row, BackArgs, KernelPath, Partial, RowArgs, RowIn, RowScratch,
    };
    use crate::Float;

    pub(super) fn forward_row_on<F: Float>(
        path: KernelPath,
        args: &RowArgs<F>,
        series: &RowIn<F>,
        y_row: &mut [F],
        saved: &mut [F],
    ) {
        #[cfg(target_arch = "x86_64")]
        match path {
            // SAFETY: `path` comes from `kernel_path`, which never exceeds what the CPU has.
            KernelPath::Avx512 => unsafe { forward_avx512(args, series, y_row, saved) },
            // SAFETY: as above.
            KernelPath::Avx2 => unsafe { forward_avx2(args, series, y_row, saved) },
            KernelPath::Portable => forward_row(args, series, y_row, saved),
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = path;
            forward_row(args, series, y_row, saved)
        }
    }

    pub(super) fn backward_row_on<F: Float>(
        path: KernelPath,
        args: &BackArgs<F>,
        series: &RowIn<F>,
        e: usize,
        p: &mut Partial<F>,
        s: &mut RowScratch<F>,
    ) {
        #[cfg(target_arch = "x86_64")]
        match path {
            // SAFETY: `path` comes from `kernel_path`, which never exceeds what the CPU has.
            KernelPath::Avx512 => unsafe { backward_avx512(args, series, e, p, s) },
            // SAFETY: as above.
            KernelPath::Avx2 => unsafe { backward_avx2(args, series, e, p, s) },
            KernelPath::Portable => backward_row(args, series, e, p, s),
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = path;
            backward_row(args, series, e, p, s)
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn forward_avx2<F: Float>(
        args: &RowArgs<F>,
        series: &RowIn<F>,
        y_row: &mut [F],
        saved: &mut [F],
    ) {
        forward_row(args, series, y_row, saved)
    }

    /// # Safety
    /// The CPU must support AVX-512F, AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn forward_avx512<F: Float>(
        args: &RowArgs<F>,
        series: &RowIn<F>,
        y_row: &mut [F],
        saved: &mut [F],
    ) {
        forward_row(args, series, y_row, saved)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn backward_avx2<F: Float>(
        args: &BackArgs<F>,
        series: &RowIn<F>,
        e: usize,
        p: &mut Partial<F>,
        s: &mut RowScratch<F>,
    ) {
        backward_row(args, series, e, p, s)
    }

    /// # Safety
    /// The CPU must support AVX-512F, AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn backward_avx512<F: Float>(
        args: &BackArgs<F>,
        series: &RowIn<F>,
        e: usize,
        p: &mut Partial<F>,
        s: &mut RowScratch<F>,
    ) {
        backward_row(args, series, e, p, s)
    }
}

/// `(batch, N, L)` → `(batch, L, N)`, with time reversed when `reverse`.
fn time_major<F: Float>(x: &[F], shape: ScanShape, reverse: bool) -> Vec<F> {
    let ScanShape {
        batch,
        state,
        length,
        ..
    } = shape;
    let mut out = vec![F::ZERO; x.len()];
    for b in 0..batch {
        for n in 0..state {
            for t in 0..length {
                let to = if reverse { length - 1 - t } else { t };
                out[(b * length + to) * state + n] = x[(b * state + n) * length + t];
            }
        }
    }
    out
}

/// Per-task partial results of the backward pass, reduced afterwards.
struct Partial<F> {
    b: usize,
    e0: usize,
    rows_u: Vec<F>,
    rows_delta: Vec<F>,
    rows_z: Vec<F>,
    a: Vec<F>,
    d: Vec<F>,
    bias: Vec<F>,
    gb: Vec<F>,
    gc: Vec<F>,
}

/// Backward pass: gradients of `Σ grad_out · y` with respect to every input.
pub fn backward<F: Float>(
    shape: ScanShape,
    inputs: &ScanInputs<F>,
    saved: &Saved<F>,
    grad_out: &[F],
) -> Result<Gradients<F>> {
    backward_on(kernel_path(), shape, inputs, saved, grad_out)
}

/// [`backward`] on the kernel path `path` (narrowed to what the CPU supports), for comparing
/// paths.
pub fn backward_on<F: Float>(
    path: KernelPath,
    shape: ScanShape,
    inputs: &ScanInputs<F>,
    saved: &Saved<F>,
    grad_out: &[F],
) -> Result<Gradients<F>> {
    let path = path.min(KernelPath::best());
    inputs.check(shape)?;
    let ScanShape {
        batch,
        channels,
        state,
        length,
    } = shape;
    let rows = batch * channels * length;
    if grad_out.len() != rows {
        return Err(crate::Error::Length {
            name: "grad_out",
            found: grad_out.len(),
            expected: rows,
            shape,
        });
    }
    // B and C as (batch, L, N), and the gradients of B and C accumulated the same way: each
    // step reads and writes its N values contiguously.
    let (bt, ct) = (
        time_major(inputs.b, shape, inputs.reverse),
        time_major(inputs.c, shape, inputs.reverse),
    );
    // Channel blocks per batch: enough tasks for the threads, few partial B/C buffers to reduce.
    let block = channels.div_ceil(4 * rayon::current_num_threads()).max(1);
    let blocks = channels.div_ceil(block);
    let partials: Vec<Partial<F>> = (0..batch * blocks)
        .into_par_iter()
        .map(|task| {
            let (b, e0) = (task / blocks, (task % blocks) * block);
            let e1 = (e0 + block).min(channels);
            let mut p = Partial {
                b,
                e0,
                rows_u: vec![F::ZERO; (e1 - e0) * length],
                rows_delta: vec![F::ZERO; (e1 - e0) * length],
                rows_z: vec![
                    F::ZERO;
                    if inputs.z.is_some() {
                        (e1 - e0) * length
                    } else {
                        0
                    }
                ],
                a: vec![F::ZERO; (e1 - e0) * state],
                d: vec![F::ZERO; e1 - e0],
                bias: vec![F::ZERO; e1 - e0],
                gb: vec![F::ZERO; state * length],
                gc: vec![F::ZERO; state * length],
            };
            let mut scratch = RowScratch::new(saved.chunk, state, length);
            let args = BackArgs {
                shape,
                inputs,
                saved,
                bt: &bt,
                ct: &ct,
                b,
            };
            let mut buf = Vec::new();
            for e in e0..e1 {
                let series = RowIn::new(inputs, grad_out, b * channels + e, length, &mut buf);
                simd::backward_row_on(path, &args, &series, e, &mut p, &mut scratch);
                if inputs.reverse {
                    let at = (e - e0) * length..(e - e0 + 1) * length;
                    p.rows_u[at.clone()].reverse();
                    p.rows_delta[at.clone()].reverse();
                    if inputs.z.is_some() {
                        p.rows_z[at].reverse();
                    }
                }
            }
            p
        })
        .collect();

    let mut g = Gradients {
        u: vec![F::ZERO; rows],
        delta: vec![F::ZERO; rows],
        a: vec![F::ZERO; channels * state],
        b: vec![F::ZERO; batch * state * length],
        c: vec![F::ZERO; batch * state * length],
        d: inputs.d.map(|_| vec![F::ZERO; channels]),
        z: inputs.z.map(|_| vec![F::ZERO; rows]),
        delta_bias: inputs.delta_bias.map(|_| vec![F::ZERO; channels]),
    };
    for p in partials {
        let n_e = p.d.len();
        let rows_at = (p.b * channels + p.e0) * length;
        g.u[rows_at..rows_at + n_e * length].copy_from_slice(&p.rows_u);
        g.delta[rows_at..rows_at + n_e * length].copy_from_slice(&p.rows_delta);
        if let Some(gz) = g.z.as_mut() {
            gz[rows_at..rows_at + n_e * length].copy_from_slice(&p.rows_z);
        }
        for (dst, src) in g.a[p.e0 * state..(p.e0 + n_e) * state].iter_mut().zip(&p.a) {
            *dst += *src;
        }
        if let Some(gd) = g.d.as_mut() {
            gd[p.e0..p.e0 + n_e]
                .iter_mut()
                .zip(&p.d)
                .for_each(|(x, y)| *x += *y);
        }
        if let Some(gbias) = g.delta_bias.as_mut() {
            gbias[p.e0..p.e0 + n_e]
                .iter_mut()
                .zip(&p.bias)
                .for_each(|(x, y)| *x += *y);
        }
        // The partials are (L, N) in the walk's order; the gradients (batch, N, L).
        let at = p.b * state * length;
        for (gb, pb) in [(&mut g.b, &p.gb), (&mut g.c, &p.gc)] {
            let dst = &mut gb[at..at + state * length];
            for (t, src) in pb.chunks_exact(state).enumerate() {
                let t = if inputs.reverse { length - 1 - t } else { t };
                for (n, v) in src.iter().enumerate() {
                    dst[n * length + t] += *v;
                }
            }
        }
    }
    Ok(g)
}

/// Per-row buffers: a chunk's states after each step and decay factors, and the row's steps
/// and gate sigmoids.
struct RowScratch<F> {
    states: Vec<F>,
    decay: Vec<F>,
    steps: Vec<F>,
    gate: Vec<F>,
    gh: Vec<F>,
    h: Vec<F>,
}

impl<F: Float> RowScratch<F> {
    fn new(chunk: usize, state: usize, length: usize) -> Self {
        RowScratch {
            states: vec![F::ZERO; chunk * state],
            decay: vec![F::ZERO; chunk * state],
            steps: vec![F::ZERO; length],
            gate: vec![F::ZERO; length],
            gh: vec![F::ZERO; state],
            h: vec![F::ZERO; state],
        }
    }
}

/// What the backward pass of one row reads.
struct BackArgs<'a, F> {
    shape: ScanShape,
    inputs: &'a ScanInputs<'a, F>,
    saved: &'a Saved<F>,
    /// B and C time-major, (batch, L, N).
    bt: &'a [F],
    ct: &'a [F],
    b: usize,
}

/// The backward pass of row (b, e); inlined into a plain and an AVX2 copy. Mamba's state sizes
/// 8 and 16 get a version with the state in fixed arrays.
#[inline(always)]
fn backward_row<F: Float>(
    args: &BackArgs<F>,
    series: &RowIn<F>,
    e: usize,
    p: &mut Partial<F>,
    s: &mut RowScratch<F>,
) {
    match args.shape.state {
        16 => backward_row_fixed::<F, 16>(args, series, e, p, s),
        8 => backward_row_fixed::<F, 8>(args, series, e, p, s),
        _ => backward_row_any(args, series, e, p, s),
    }
}

/// Sums a fixed array as a tree (not a serial chain).
#[inline(always)]
fn tree_sum<F: Float, const N: usize>(mut v: [F; N]) -> F {
    let mut w = N;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            v[i] += v[i + w];
        }
    }
    v[0]
}

/// [`backward_row`] for a state size known at compile time (a power of two). The row's time
/// steps, and afterwards the softplus and gate derivatives, are computed in vectorisable passes
/// over the whole row; per step, the N-wide updates read and write contiguous (L, N) rows of B,
/// C and their gradients, and the three sums over the state are trees.
#[inline(always)]
fn backward_row_fixed<F: Float, const N: usize>(
    args: &BackArgs<F>,
    series: &RowIn<F>,
    e: usize,
    p: &mut Partial<F>,
    s: &mut RowScratch<F>,
) {
    let BackArgs {
        shape,
        inputs,
        saved,
        bt,
        ct,
        b,
    } = *args;
    let ScanShape {
        channels, length, ..
    } = shape;
    let row = b * channels + e;
    let local = e - p.e0;
    let mut a = [F::ZERO; N];
    a.copy_from_slice(&inputs.a[e * N..(e + 1) * N]);
    let d = inputs.d.map_or(F::ZERO, |v| v[e]);
    let bias = inputs.delta_bias.map_or(F::ZERO, |v| v[e]);
    let (delta, u, go) = (series.delta, series.u, series.go);
    let steps = &mut s.steps[..length];
    for (out, &x) in steps.iter_mut().zip(delta) {
        *out = if inputs.delta_softplus {
            (x + bias).softplus_kernel()
        } else {
            x + bias
        };
    }
    // The gate's sigmoid σ(z), in one vectorisable pass.
    let gate = &mut s.gate[..length];
    if let Some(z) = series.z {
        for (out, &zv) in gate.iter_mut().zip(z) {
            *out = F::ONE / (F::ONE + (F::ZERO - zv).exp_kernel());
        }
    }
    let rows_u = &mut p.rows_u[local * length..(local + 1) * length];
    let rows_delta = &mut p.rows_delta[local * length..(local + 1) * length];
    let start_states = &saved.chunk_states[row * saved.chunks * N..(row + 1) * saved.chunks * N];
    let (mut gh, mut ga) = ([F::ZERO; N], [F::ZERO; N]);
    let mut gd = F::ZERO;
    for k in (0..saved.chunks).rev() {
        let (t0, t1) = (k * saved.chunk, ((k + 1) * saved.chunk).min(length));
        if t0 >= t1 {
            continue;
        }
        // Recompute the chunk's states and decay factors from its saved start.
        let mut h = [F::ZERO; N];
        h.copy_from_slice(&start_states[k * N..(k + 1) * N]);
        for t in t0..t1 {
            let (dt, du) = (steps[t], steps[t] * u[t]);
            let bc = (b * length + t) * N;
            let b_t = &bt[bc..bc + N];
            let i = (t - t0) * N;
            let (dec, st) = (&mut s.decay[i..i + N], &mut s.states[i..i + N]);
            for n in 0..N {
                let decay = (dt * a[n]).exp_kernel();
                h[n] = decay * h[n] + du * b_t[n];
                dec[n] = decay;
                st[n] = h[n];
            }
        }
        // Walk the chunk backwards.
        for t in (t0..t1).rev() {
            let (dt, ut) = (steps[t], u[t]);
            let bc = (b * length + t) * N;
            // Local copies: the N-wide loops then touch only values the compiler knows are not
            // aliased (no bounds checks, no possible overlap with the gradient rows), so they
            // vectorise.
            let b_t: [F; N] = bt[bc..bc + N].try_into().unwrap();
            let c_t: [F; N] = ct[bc..bc + N].try_into().unwrap();
            let i = (t - t0) * N;
            let h_t: [F; N] = s.states[i..i + N].try_into().unwrap();
            let h_prev: [F; N] = if t > t0 {
                &s.states[i - N..i]
            } else {
                &start_states[k * N..(k + 1) * N]
            }
            .try_into()
            .unwrap();
            let dec: [F; N] = s.decay[i..i + N].try_into().unwrap();
            let mut g = go[t];
            if let Some(z) = series.z {
                // The gate's derivative needs the ungated output; y = pre · silu(z).
                let mut ch = [F::ZERO; N];
                for n in 0..N {
                    ch[n] = c_t[n] * h_t[n];
                }
                let pre = tree_sum(ch) + d * ut;
                let (zv, sg) = (z[t], gate[t]);
                p.rows_z[local * length + t] = g * pre * sg * (F::ONE + zv * (F::ONE - sg));
                g = g * zv * sg;
            }
            gd += g * ut;
            let (gb_row, gc_row) = (&mut p.gb[t * N..(t + 1) * N], &mut p.gc[t * N..(t + 1) * N]);
            let mut gb_t: [F; N] = (*gb_row).try_into().unwrap();
            let mut gc_t: [F; N] = (*gc_row).try_into().unwrap();
            let (mut sdt, mut su) = ([F::ZERO; N], [F::ZERO; N]);
            for n in 0..N {
                let decay = dec[n];
                let ghn = gh[n] + g * c_t[n];
                gc_t[n] += g * h_t[n];
                sdt[n] = ghn * (a[n] * decay * h_prev[n] + b_t[n] * ut);
                ga[n] += ghn * dt * decay * h_prev[n];
                gb_t[n] += ghn * dt * ut;
                su[n] = ghn * b_t[n];
                gh[n] = ghn * decay;
            }
            gb_row.copy_from_slice(&gb_t);
            gc_row.copy_from_slice(&gc_t);
            // The step's derivative before softplus; the softplus factor is applied below.
            rows_delta[t] = tree_sum(sdt);
            rows_u[t] = g * d + dt * tree_sum(su);
        }
    }
    // Through softplus (σ(x), 1 past x = 20 as `softplus` is linear there), in one pass.
    let mut gbias = F::ZERO;
    for (gx, &x) in rows_delta.iter_mut().zip(delta) {
        if inputs.delta_softplus {
            let x = x + bias;
            let grad = if x > F::from_f64(20.0) {
                F::ONE
            } else {
                F::ONE / (F::ONE + (F::ZERO - x).exp_kernel())
            };
            *gx *= grad;
        }
        gbias += *gx;
    }
    p.bias[local] += gbias;
    p.d[local] += gd;
    for n in 0..N {
        p.a[local * N + n] += ga[n];
    }
}

fn backward_row_any<F: Float>(
    args: &BackArgs<F>,
    series: &RowIn<F>,
    e: usize,
    p: &mut Partial<F>,
    s: &mut RowScratch<F>,
) {
    let BackArgs {
        shape,
        inputs,
        saved,
        bt,
        ct,
        b,
    } = *args;
    let ScanShape {
        channels,
        state,
        length,
        ..
    } = shape;
    let row = b * channels + e;
    let local = e - p.e0;
    let a = &inputs.a[e * state..(e + 1) * state];
    let d = inputs.d.map_or(F::ZERO, |v| v[e]);
    let start_states =
        &saved.chunk_states[row * saved.chunks * state..(row + 1) * saved.chunks * state];
    s.gh.iter_mut().for_each(|v| *v = F::ZERO);
    for k in (0..saved.chunks).rev() {
        let (t0, t1) = (k * saved.chunk, ((k + 1) * saved.chunk).min(length));
        if t0 >= t1 {
            continue;
        }
        // Recompute the chunk's states from its saved start.
        s.h.copy_from_slice(&start_states[k * state..(k + 1) * state]);
        for t in t0..t1 {
            let (dt, u) = (step(inputs, e, series.delta[t]), series.u[t]);
            s.steps[t - t0] = dt;
            for n in 0..state {
                let bc = (b * length + t) * state + n;
                let decay = (dt * a[n]).exp_kernel();
                s.h[n] = decay * s.h[n] + dt * bt[bc] * u;
                s.decay[(t - t0) * state + n] = decay;
                s.states[(t - t0) * state + n] = s.h[n];
            }
        }
        // Walk the chunk backwards.
        for t in (t0..t1).rev() {
            let (dt, u) = (s.steps[t - t0], series.u[t]);
            let mut g = series.go[t];
            if let Some(z) = series.z {
                let zv = z[t];
                let sg = sigmoid(zv);
                let mut pre = d * u;
                for n in 0..state {
                    pre += ct[(b * length + t) * state + n] * s.states[(t - t0) * state + n];
                }
                p.rows_z[local * length + t] = g * pre * sg * (F::ONE + zv * (F::ONE - sg));
                g = g * zv * sg;
            }
            p.d[local] += g * u;
            let mut gu = g * d;
            let mut gdt = F::ZERO;
            for n in 0..state {
                let bc = (b * length + t) * state + n;
                let i = (t - t0) * state + n;
                let h_t = s.states[i];
                let h_prev = if t > t0 {
                    s.states[i - state]
                } else {
                    start_states[k * state + n]
                };
                let decay = s.decay[i];
                s.gh[n] += g * ct[bc];
                p.gc[t * state + n] += g * h_t;
                let gh = s.gh[n];
                gdt += gh * (a[n] * decay * h_prev + bt[bc] * u);
                p.a[local * state + n] += gh * dt * decay * h_prev;
                p.gb[t * state + n] += gh * dt * u;
                gu += gh * dt * bt[bc];
                s.gh[n] = gh * decay;
            }
            let gx = if inputs.delta_softplus {
                let x = series.delta[t] + inputs.delta_bias.map_or(F::ZERO, |v| v[e]);
                gdt * softplus_grad(x)
            } else {
                gdt
            };
            p.rows_delta[local * length + t] = gx;
            p.bias[local] += gx;
            p.rows_u[local * length + t] = gu;
        }
    }
}

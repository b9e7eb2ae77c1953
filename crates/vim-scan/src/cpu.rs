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

/// The time step of row `row` at `t` after bias and softplus.
#[inline(always)]
fn step<F: Float>(inputs: &ScanInputs<F>, e: usize, at: usize) -> F {
    let x = inputs.delta[at] + inputs.delta_bias.map_or(F::ZERO, |s| s[e]);
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
    // B and C as (batch, L, N): each step reads its N values contiguously.
    let (bt, ct) = (time_major(inputs.b, shape), time_major(inputs.c, shape));
    let avx2 = simd::has_avx2_fma();
    y.par_chunks_mut(length)
        .zip(chunk_states.par_chunks_mut(chunks * state))
        .enumerate()
        .for_each(|(row, (y_row, saved))| {
            let args = RowArgs {
                shape,
                inputs,
                bt: &bt,
                ct: &ct,
                chunk,
                row,
            };
            if avx2 {
                // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    simd::forward_row_avx2(&args, y_row, saved)
                };
                #[cfg(not(target_arch = "x86_64"))]
                forward_row(&args, y_row, saved);
            } else {
                forward_row(&args, y_row, saved);
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
fn forward_row<F: Float>(args: &RowArgs<F>, y_row: &mut [F], saved: &mut [F]) {
    match args.shape.state {
        16 => forward_row_fixed::<F, 16>(args, y_row, saved),
        8 => forward_row_fixed::<F, 8>(args, y_row, saved),
        _ => forward_row_any(args, y_row, saved),
    }
}

/// [`forward_row`] for a state size known at compile time (a power of two): the time steps of
/// the row are computed first in one vectorisable pass (into `y_row`, overwritten later), the
/// state lives in a fixed array, and `Σ C·h` is summed as a tree, not a serial chain.
#[inline(always)]
fn forward_row_fixed<F: Float, const N: usize>(
    args: &RowArgs<F>,
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
    let base = row * length;
    let delta = &inputs.delta[base..base + length];
    let u = &inputs.u[base..base + length];
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
            let (b_t, c_t) = (&bt[bc..bc + N], &ct[bc..bc + N]);
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
    if let Some(z) = inputs.z {
        for (out, &zv) in y_row.iter_mut().zip(&z[base..base + length]) {
            *out *= zv / (F::ONE + (F::ZERO - zv).exp_kernel());
        }
    }
}

/// [`forward_row`] for any state size.
#[inline(always)]
fn forward_row_any<F: Float>(args: &RowArgs<F>, y_row: &mut [F], saved: &mut [F]) {
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
        let at = row * length + t;
        let (dt, u) = (step(inputs, e, at), inputs.u[at]);
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
        if let Some(z) = inputs.z {
            let zv = z[at];
            out *= zv * sigmoid(zv);
        }
        y_row[t] = out;
    }
}

/// Run-time selected wider vector code.
mod simd {
    use super::{forward_row, RowArgs};
    use crate::Float;

    pub(super) fn has_avx2_fma() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward_row_avx2<F: Float>(
        args: &RowArgs<F>,
        y_row: &mut [F],
        saved: &mut [F],
    ) {
        forward_row(args, y_row, saved)
    }
}

/// `(batch, N, L)` → `(batch, L, N)`.
fn time_major<F: Float>(x: &[F], shape: ScanShape) -> Vec<F> {
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
                out[(b * length + t) * state + n] = x[(b * state + n) * length + t];
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
            let mut scratch = RowScratch::new(saved.chunk, state);
            for e in e0..e1 {
                backward_row(shape, inputs, saved, grad_out, b, e, &mut p, &mut scratch);
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
        let at = p.b * state * length;
        g.b[at..at + state * length]
            .iter_mut()
            .zip(&p.gb)
            .for_each(|(x, y)| *x += *y);
        g.c[at..at + state * length]
            .iter_mut()
            .zip(&p.gc)
            .for_each(|(x, y)| *x += *y);
    }
    Ok(g)
}

/// Per-row buffers for one chunk: states after each step and the decay factors.
struct RowScratch<F> {
    states: Vec<F>,
    decay: Vec<F>,
    steps: Vec<F>,
    gh: Vec<F>,
    h: Vec<F>,
}

impl<F: Float> RowScratch<F> {
    fn new(chunk: usize, state: usize) -> Self {
        RowScratch {
            states: vec![F::ZERO; chunk * state],
            decay: vec![F::ZERO; chunk * state],
            steps: vec![F::ZERO; chunk],
            gh: vec![F::ZERO; state],
            h: vec![F::ZERO; state],
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn backward_row<F: Float>(
    shape: ScanShape,
    inputs: &ScanInputs<F>,
    saved: &Saved<F>,
    grad_out: &[F],
    b: usize,
    e: usize,
    p: &mut Partial<F>,
    s: &mut RowScratch<F>,
) {
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
            let at = row * length + t;
            let (dt, u) = (step(inputs, e, at), inputs.u[at]);
            s.steps[t - t0] = dt;
            for n in 0..state {
                let bc = (b * state + n) * length + t;
                let decay = (dt * a[n]).exp_kernel();
                s.h[n] = decay * s.h[n] + dt * inputs.b[bc] * u;
                s.decay[(t - t0) * state + n] = decay;
                s.states[(t - t0) * state + n] = s.h[n];
            }
        }
        // Walk the chunk backwards.
        for t in (t0..t1).rev() {
            let at = row * length + t;
            let (dt, u) = (s.steps[t - t0], inputs.u[at]);
            let mut g = grad_out[at];
            if let Some(z) = inputs.z {
                let zv = z[at];
                let sg = sigmoid(zv);
                let mut pre = d * u;
                for n in 0..state {
                    pre += inputs.c[(b * state + n) * length + t] * s.states[(t - t0) * state + n];
                }
                p.rows_z[local * length + t] = g * pre * sg * (F::ONE + zv * (F::ONE - sg));
                g = g * zv * sg;
            }
            p.d[local] += g * u;
            let mut gu = g * d;
            let mut gdt = F::ZERO;
            for n in 0..state {
                let bc = (b * state + n) * length + t;
                let i = (t - t0) * state + n;
                let h_t = s.states[i];
                let h_prev = if t > t0 {
                    s.states[i - state]
                } else {
                    start_states[k * state + n]
                };
                let decay = s.decay[i];
                s.gh[n] += g * inputs.c[bc];
                p.gc[n * length + t] += g * h_t;
                let gh = s.gh[n];
                gdt += gh * (a[n] * decay * h_prev + inputs.b[bc] * u);
                p.a[local * state + n] += gh * dt * decay * h_prev;
                p.gb[n * length + t] += gh * dt * u;
                gu += gh * dt * inputs.b[bc];
                s.gh[n] = gh * decay;
            }
            let gx = if inputs.delta_softplus {
                let x = inputs.delta[at] + inputs.delta_bias.map_or(F::ZERO, |v| v[e]);
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

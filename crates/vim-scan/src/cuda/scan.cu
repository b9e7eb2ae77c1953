// The selective scan on CUDA, forward and backward, for f32 and f64.
//
// One thread block per (batch, channel) row. The sequence is processed in chunks of
// THREADS * ITEMS steps; within a chunk each thread owns ITEMS consecutive steps and the
// recurrence h[t] = a[t] h[t-1] + b[t] is solved for one state index n at a time with a
// block-wide scan over (a, b) pairs. The state at the start of every chunk is written to
// `states` (rows, chunks, N) by the forward kernel; the backward kernel walks the chunks from
// last to first, recomputes the states of one chunk from that saved state, and runs the
// adjoint recurrence g[t] = a[t+1] g[t+1] + C[t] dy[t] as a reversed block scan. No
// (batch, E, L, N) array is ever stored.
//
// Inputs travel packed exactly as the candle op packs them:
//   x1 = [u; delta; z?]            each (batch, E, L)
//   x2 = [A (E*N); D? (E); bias? (E)]
//   x3 = [B; C]                    each (batch, N, L)
// The backward kernel reads x1 followed by dout (batch, E, L) in `x1g`, and writes the packed
// gradients [du; ddelta; dz?; dA; dD?; dbias?; dB; dC] into `grads`, which must be zeroed
// (dA, dD, dbias, dB and dC are accumulated with atomics across rows).
//
// Compiled at run time with NVRTC (no nvcc is needed to build the crate). THREADS and ITEMS are
// set below; CHUNK must match `CUDA_CHUNK` on the Rust side.

#define THREADS 128
#define ITEMS 8
#define CHUNK (THREADS * ITEMS)

__device__ __forceinline__ float ex(float x) { return expf(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }
__device__ __forceinline__ float lg1p(float x) { return log1pf(x); }
__device__ __forceinline__ double lg1p(double x) { return log1p(x); }

template <typename T> __device__ __forceinline__ T softplus(T x) {
  return x > T(20) ? x : lg1p(ex(x));
}
template <typename T> __device__ __forceinline__ T sigmoid(T x) {
  return T(1) / (T(1) + ex(-x));
}
template <typename T> __device__ __forceinline__ T softplus_grad(T x) {
  return x > T(20) ? T(1) : sigmoid(x);
}

// One step of a linear recurrence: s -> a s + b.
template <typename T> struct Pair {
  T a, b;
};
// `x` applied first, then `y`.
template <typename T> __device__ __forceinline__ Pair<T> compose(Pair<T> x, Pair<T> y) {
  return Pair<T>{x.a * y.a, y.a * x.b + y.b};
}

// Exclusive scan over the block: thread at scan position `pos` (0..THREADS) receives the
// composition of the aggregates of positions 0..pos-1 (identity for position 0).
// Hillis-Steele in shared memory; every thread of the block must call it.
template <typename T>
__device__ Pair<T> block_exclusive(Pair<T> v, int pos, Pair<T> *shm) {
  shm[pos] = v;
  __syncthreads();
  for (int off = 1; off < THREADS; off <<= 1) {
    Pair<T> mine = shm[pos];
    Pair<T> earlier = pos >= off ? shm[pos - off] : Pair<T>{T(1), T(0)};
    __syncthreads();
    if (pos >= off) shm[pos] = compose(earlier, mine);
    __syncthreads();
  }
  Pair<T> out = pos > 0 ? shm[pos - 1] : Pair<T>{T(1), T(0)};
  __syncthreads();
  return out;
}

// The recurrence steps (exp(dt A), dt B u) of this thread's items for one state index, with
// identities past L; returns their composition.
template <typename T>
__device__ __forceinline__ Pair<T> step_pairs(Pair<T> (&pr)[ITEMS], const T (&dt)[ITEMS],
                                              const T (&uu)[ITEMS], const T *b_n, T an, int t0,
                                              int L) {
  Pair<T> agg{T(1), T(0)};
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int t = t0 + k;
    pr[k] = t < L ? Pair<T>{ex(dt[k] * an), dt[k] * b_n[t] * uu[k]} : Pair<T>{T(1), T(0)};
    agg = compose(agg, pr[k]);
  }
  return agg;
}

struct Dims {
  int batch, channels, state, length;
  int has_d, has_z, has_bias, softplus;
};

template <typename T> struct Unpacked {
  const T *u, *delta, *z, *a, *d, *bias, *b, *c;
};

template <typename T>
__device__ Unpacked<T> unpack(const Dims &s, const T *x1, const T *x2, const T *x3) {
  long rows = (long)s.batch * s.channels * s.length;
  long bc = (long)s.batch * s.state * s.length;
  Unpacked<T> p;
  p.u = x1;
  p.delta = x1 + rows;
  p.z = s.has_z ? x1 + 2 * rows : nullptr;
  p.a = x2;
  long at = (long)s.channels * s.state;
  p.d = nullptr;
  p.bias = nullptr;
  if (s.has_d) {
    p.d = x2 + at;
    at += s.channels;
  }
  if (s.has_bias) p.bias = x2 + at;
  p.b = x3;
  p.c = x3 + bc;
  return p;
}

template <typename T>
__device__ void scan_forward(const T *x1, const T *x2, const T *x3, T *out, T *states,
                             Dims s) {
  __shared__ Pair<T> shm[THREADS];
  extern __shared__ __align__(16) unsigned char dyn[];
  T *carry = reinterpret_cast<T *>(dyn);  // N running states
  const int tid = threadIdx.x;
  const int row = blockIdx.x;
  const int be = row / s.channels, e = row % s.channels;
  const int L = s.length, N = s.state;
  const Unpacked<T> p = unpack(s, x1, x2, x3);
  const long base = (long)row * L;
  const T *bb = p.b + (long)be * N * L;
  const T *cc = p.c + (long)be * N * L;
  const T bias = p.bias ? p.bias[e] : T(0);
  const T dd = p.d ? p.d[e] : T(0);
  const int chunks = max(1, (L + CHUNK - 1) / CHUNK);
  for (int n = tid; n < N; n += THREADS) carry[n] = T(0);
  for (int ch = 0; ch < chunks; ++ch) {
    __syncthreads();
    for (int n = tid; n < N; n += THREADS)
      states[((long)row * chunks + ch) * N + n] = carry[n];
    const int t0 = ch * CHUNK + tid * ITEMS;
    T dt[ITEMS], uu[ITEMS], y[ITEMS];
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int t = t0 + k;
      if (t < L) {
        T x = p.delta[base + t] + bias;
        dt[k] = s.softplus ? softplus(x) : x;
        uu[k] = p.u[base + t];
      } else {
        dt[k] = T(0);
        uu[k] = T(0);
      }
      y[k] = dd * uu[k];
    }
    for (int n = 0; n < N; ++n) {
      const T an = p.a[e * N + n];
      const T h0 = carry[n];
      Pair<T> pr[ITEMS];
      const Pair<T> agg = step_pairs(pr, dt, uu, bb + (long)n * L, an, t0, L);
      const Pair<T> before = block_exclusive(agg, tid, shm);
      T h = before.a * h0 + before.b;
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int t = t0 + k;
        h = pr[k].a * h + pr[k].b;
        if (t < L) y[k] += cc[(long)n * L + t] * h;
      }
      // Steps past L are identities, so the last thread ends on the chunk's final state.
      if (tid == THREADS - 1) carry[n] = h;
    }
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int t = t0 + k;
      if (t < L) {
        T v = y[k];
        if (p.z) {
          const T zz = p.z[base + t];
          v *= zz * sigmoid(zz);
        }
        out[base + t] = v;
      }
    }
  }
}

template <typename T>
__device__ void scan_backward(const T *x1g, const T *x2, const T *x3, const T *states,
                              T *grads, Dims s) {
  __shared__ Pair<T> shm[THREADS];
  extern __shared__ __align__(16) unsigned char dyn[];
  T *carry = reinterpret_cast<T *>(dyn);  // N adjoint carries
  T *da_sum = carry + s.state;            // N partial sums of dA for this row
  T *row_sums = da_sum + s.state;         // [dD, dbias] for this row
  const int tid = threadIdx.x;
  const int row = blockIdx.x;
  const int be = row / s.channels, e = row % s.channels;
  const int L = s.length, N = s.state, E = s.channels;
  const Unpacked<T> p = unpack(s, x1g, x2, x3);
  const long rows = (long)s.batch * E * L;
  const long bcn = (long)s.batch * N * L;
  const T *dout = x1g + (s.has_z ? 3 : 2) * rows;
  // Packed gradient layout, as in the file comment.
  T *g_u = grads;
  T *g_delta = grads + rows;
  T *g_z = s.has_z ? grads + 2 * rows : nullptr;
  T *g_a = grads + (s.has_z ? 3 : 2) * rows;
  T *g_d = g_a + (long)E * N;
  T *g_bias = g_d + (s.has_d ? E : 0);
  T *g_b = g_bias + (s.has_bias ? E : 0);
  T *g_c = g_b + bcn;
  const long base = (long)row * L;
  const T *bb = p.b + (long)be * N * L;
  const T *cc = p.c + (long)be * N * L;
  T *gb = g_b + (long)be * N * L;
  T *gc = g_c + (long)be * N * L;
  const T bias = p.bias ? p.bias[e] : T(0);
  const T dd = p.d ? p.d[e] : T(0);
  const int chunks = max(1, (L + CHUNK - 1) / CHUNK);
  for (int n = tid; n < N; n += THREADS) {
    carry[n] = T(0);
    da_sum[n] = T(0);
  }
  if (tid < 2) row_sums[tid] = T(0);
  T sum_dd = T(0), sum_dbias = T(0);
  for (int ch = chunks - 1; ch >= 0; --ch) {
    __syncthreads();
    const int t0 = ch * CHUNK + tid * ITEMS;
    const int end = min(L, (ch + 1) * CHUNK);  // one past the chunk's last valid step
    T raw[ITEMS], dt[ITEMS], uu[ITEMS], dy[ITEMS], yv[ITEMS], du[ITEMS], ddt[ITEMS];
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int t = t0 + k;
      raw[k] = dt[k] = uu[k] = dy[k] = T(0);
      if (t < L) {
        raw[k] = p.delta[base + t] + bias;
        dt[k] = s.softplus ? softplus(raw[k]) : raw[k];
        uu[k] = p.u[base + t];
        T g = dout[base + t];
        if (p.z) {
          const T zz = p.z[base + t];
          g *= zz * sigmoid(zz);
        }
        dy[k] = g;
      }
      yv[k] = dd * uu[k];
      du[k] = dy[k] * dd;
      ddt[k] = T(0);
    }
    for (int n = 0; n < N; ++n) {
      const T an = p.a[e * N + n];
      const T h0 = states[((long)row * chunks + ch) * N + n];
      const T g_next = carry[n];
      // Forward states of this chunk.
      Pair<T> pr[ITEMS];
      const Pair<T> agg = step_pairs(pr, dt, uu, bb + (long)n * L, an, t0, L);
      const Pair<T> before = block_exclusive(agg, tid, shm);
      T hprev[ITEMS];
      T h = before.a * h0 + before.b;
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int t = t0 + k;
        hprev[k] = h;
        h = pr[k].a * h + pr[k].b;
        if (t < L) {
          yv[k] += cc[(long)n * L + t] * h;
          atomicAdd(&gc[(long)n * L + t], dy[k] * h);
        }
      }
      // Adjoint: g[t] = a[t+1] g[t+1] + C[t] dy[t], carried in from the next chunk as
      // a[first of next] * g[first of next].
      Pair<T> rv[ITEMS];
      Pair<T> ragg{T(1), T(0)};
#pragma unroll
      for (int k = ITEMS - 1; k >= 0; --k) {
        const int t = t0 + k;
        T alpha = T(1);
        if (t + 1 < end) {
          if (k + 1 < ITEMS) {
            alpha = pr[k + 1].a;
          } else {
            T x = p.delta[base + t + 1] + bias;
            alpha = ex((s.softplus ? softplus(x) : x) * an);
          }
        }
        rv[k] = Pair<T>{alpha, t < L ? cc[(long)n * L + t] * dy[k] : T(0)};
        ragg = compose(ragg, rv[k]);
      }
      const Pair<T> after = block_exclusive(ragg, THREADS - 1 - tid, shm);
      T g = after.a * g_next + after.b;
      T da_local = T(0);
#pragma unroll
      for (int k = ITEMS - 1; k >= 0; --k) {
        const int t = t0 + k;
        g = rv[k].a * g + rv[k].b;
        if (t < L) {
          const T bn = bb[(long)n * L + t];
          atomicAdd(&gb[(long)n * L + t], g * dt[k] * uu[k]);
          du[k] += g * dt[k] * bn;
          const T hda = g * hprev[k] * pr[k].a;
          ddt[k] += g * bn * uu[k] + hda * an;
          da_local += hda * dt[k];
        }
      }
      if (da_local != T(0)) atomicAdd(&da_sum[n], da_local);
      // The carry for the previous chunk: a[first] * g[first], held by thread 0.
      if (tid == 0) carry[n] = pr[0].a * g;
    }
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int t = t0 + k;
      if (t < L) {
        if (p.z) {
          const T zz = p.z[base + t];
          const T sg = sigmoid(zz);
          g_z[base + t] = dout[base + t] * yv[k] * sg * (T(1) + zz * (T(1) - sg));
        }
        const T gd = s.softplus ? ddt[k] * softplus_grad(raw[k]) : ddt[k];
        g_delta[base + t] = gd;
        g_u[base + t] = du[k];
        sum_dd += dy[k] * uu[k];
        sum_dbias += gd;
      }
    }
  }
  if (s.has_d) atomicAdd(&row_sums[0], sum_dd);
  if (s.has_bias) atomicAdd(&row_sums[1], sum_dbias);
  __syncthreads();
  for (int n = tid; n < N; n += THREADS) atomicAdd(&g_a[e * N + n], da_sum[n]);
  if (tid == 0 && s.has_d) atomicAdd(&g_d[e], row_sums[0]);
  if (tid == 0 && s.has_bias) atomicAdd(&g_bias[e], row_sums[1]);
}

#define ARGS_DIMS                                                                     \
  int batch, int channels, int state, int length, int has_d, int has_z, int has_bias, \
      int softplus
#define DIMS Dims{batch, channels, state, length, has_d, has_z, has_bias, softplus}

extern "C" __global__ void __launch_bounds__(THREADS)
    vim_scan_fwd_f32(const float *x1, const float *x2, const float *x3, float *out,
                     float *states, ARGS_DIMS) {
  scan_forward<float>(x1, x2, x3, out, states, DIMS);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    vim_scan_fwd_f64(const double *x1, const double *x2, const double *x3, double *out,
                     double *states, ARGS_DIMS) {
  scan_forward<double>(x1, x2, x3, out, states, DIMS);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    vim_scan_bwd_f32(const float *x1g, const float *x2, const float *x3, const float *states,
                     float *grads, ARGS_DIMS) {
  scan_backward<float>(x1g, x2, x3, states, grads, DIMS);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    vim_scan_bwd_f64(const double *x1g, const double *x2, const double *x3,
                     const double *states, double *grads, ARGS_DIMS) {
  scan_backward<double>(x1g, x2, x3, states, grads, DIMS);
}

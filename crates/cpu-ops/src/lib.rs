#![doc = include_str!("../README.md")]
#![deny(unsafe_op_in_unsafe_fn)]

#[macro_use]
mod rowpath;
mod attention;
mod conv;
mod conv1d;
mod fused;
mod gelu;
mod linear;
mod matconv;
pub mod memory;
mod norm;
mod pool;
mod resample;
mod rownorm;
mod sgemm;
mod storage;
mod sums;
mod winograd;

pub use attention::{
    grid_attention, rel_pos_attention, rel_pos_attention_parts, rel_pos_attention_vjp,
    AttentionGrads,
};
pub use conv::{
    conv3x3, conv3x3_block, conv3x3_block_cat, conv3x3_block_cat_vjp, conv3x3_block_vjp,
    conv3x3_input_vjp, relu_vjp, relu_vjp_in_place, CatGrads, Conv3x3Block,
};
pub use conv1d::{causal_conv1d_silu, causal_conv1d_silu_reversed};
pub use gelu::bias_gelu;
pub use linear::{
    linear, linear_gelu, linear_gelu_parts, linear_gelu_vjp, linear_vjp, linear_windows,
    linear_windows_vjp,
};
pub use matconv::{conv1x1, conv1x1_served, conv1x1_vjp, conv_transpose2x2, conv_transpose2x2_vjp};
pub use norm::{batch_norm_train, batch_norm_train_vjp, batch_statistics};
pub use pool::max_pool2x2;
pub use resample::{bilinear_matrix, resize_bilinear};
pub use rownorm::{layer_norm, layer_norm_vjp, rms_norm, rope};

use candle_core::{DType, Tensor};

/// A layer's gradients from one of the `*_vjp` functions: its backward pass called as a
/// function, outside candle's autograd, so that a block's hand-written backward can free each
/// tensor as soon as it is past it (candle's autograd keeps a block's whole graph until the
/// end of its backward pass).
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct LayerGrads {
    /// The input's gradient, where it was asked for.
    pub input: Option<Tensor>,
    pub weight: Tensor,
    pub bias: Tensor,
}

/// Which kernels serve the convolutions and resampling of this crate: an explicit value that
/// each call takes (models keep theirs with their layers), never a process-wide switch.
///
/// Whatever the choice, the result is the same convolution to rounding; only the speed
/// differs. The crate's kernels serve f32 tensors on the CPU; everything else (CUDA, f64)
/// always goes to candle's ops.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Kernels {
    /// This crate's kernels wherever a same-run benchmark (`cargo xtask bench conv`) shows
    /// them ahead of candle's ops, and the 3×3 forward, input gradient and weight gradient in
    /// Winograd's F(4×4, 3×3) form where the channel counts and image size make it pay.
    #[default]
    Auto,
    /// As [`Kernels::Auto`], with the 3×3 convolution and its gradients always in the direct
    /// form (implicit products; shifted dot products for the weight gradient).
    Direct,
    /// candle's ops everywhere: conv2d, matrix products and composed ops (the baseline of the
    /// benchmarks).
    Candle,
}

impl Kernels {
    /// Whether this crate's kernels serve `x`: f32, rank 4, on the CPU, and not
    /// [`Kernels::Candle`].
    pub fn serve(self, x: &Tensor) -> bool {
        self != Kernels::Candle && x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 4
    }

    /// Whether this crate's kernels serve all of `tensors`: f32 on the CPU (any rank), and not
    /// [`Kernels::Candle`].
    pub fn serve_all(self, tensors: &[&Tensor]) -> bool {
        self != Kernels::Candle
            && tensors
                .iter()
                .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
    }

    /// The name a benchmark prints.
    pub fn name(self) -> &'static str {
        match self {
            Kernels::Auto => "auto",
            Kernels::Direct => "direct 3×3",
            Kernels::Candle => "candle",
        }
    }
}

/// Which vector path the matrix products take on this CPU: `"avx512f"` (the crate's product
/// with its wide AVX-512 micro-kernel beside the AVX2 one, and candle's product on its
/// AVX-512 kernels), `"avx2+fma"` or `"portable"`.
pub fn simd_path() -> &'static str {
    if sgemm::avx512() {
        "avx512f"
    } else if sgemm::simd() {
        "avx2+fma"
    } else {
        "portable"
    }
}

/// The machine's measured single-precision multiply-add peak in GFLOP/s on all of rayon's
/// threads: each thread runs independent chains of vector FMAs (AVX-512F or AVX2 + FMA where
/// the CPU has them, else the portable loop the compiler vectorises) for about `millis` ms. Benchmarks
/// print their achieved rate beside it.
pub fn fma_peak_gflops(millis: u64) -> f64 {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads();
    let start = std::time::Instant::now();
    let flops: f64 = (0..threads)
        .into_par_iter()
        .map(|t| {
            let mut done = 0f64;
            let mut sink = 0f32;
            while start.elapsed().as_millis() < millis as u128 {
                let (f, s) = sgemm::fma_chains(1 << 16, t as f32 * 1e-9);
                done += f;
                sink += s;
            }
            std::hint::black_box(sink);
            done
        })
        .sum();
    flops / start.elapsed().as_secs_f64() / 1e9
}

/// The crate's packed matrix product (which its convolutions and attention run on) in GFLOP/s
/// on each micro-kernel path this CPU runs (`"portable"`, `"avx2+fma"`, `"avx512f"`), in that
/// order: an m × k by k × n product repeated for about `millis` ms per path on all of rayon's
/// threads at once. Benchmarks print it to show which path pays on the machine.
pub fn product_path_gflops(m: usize, n: usize, k: usize, millis: u64) -> Vec<(&'static str, f64)> {
    sgemm::path_rates(m, n, k, millis)
}

/// The address of an output buffer that the tasks of one parallel loop write through.
///
/// Invariant (the one every use relies on): the buffer outlives the loop, and no two tasks
/// write the same element; each use states which part of the buffer a task owns.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(*mut f32);

// SAFETY: a SendPtr is only dereferenced under its invariant (disjoint writes into a buffer
// that outlives the loop), so sharing the address between threads creates no data race.
unsafe impl Send for SendPtr {}
// SAFETY: as for Send.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(crate) fn new(buffer: &mut [f32]) -> Self {
        SendPtr(buffer.as_mut_ptr())
    }

    /// The start of `buffer`'s allocation, its spare capacity included.
    pub(crate) fn allocation(buffer: &mut Vec<f32>) -> Self {
        SendPtr(buffer.as_mut_ptr())
    }

    /// The element `offset` floats into the buffer (not dereferenced here).
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Makes glibc's `malloc` keep freed memory for reuse instead of handing every large block
/// back to the kernel (`M_MMAP_MAX` 0, `M_TRIM_THRESHOLD` at its maximum). Every candle op
/// allocates its output anew; with glibc's defaults each allocation of more than 32 MB is a
/// fresh `mmap` whose pages fault in one by one on first write, and on a 64 × 512² tensor
/// (64 MB) those page faults, not the arithmetic, dominate an element-wise op. The cost: the
/// process's resident memory stays at its peak. For programs (call it once at start-up, before
/// other threads allocate), not libraries. Returns whether the setting was applied (glibc only).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_MAX: std::ffi::c_int = -4;
        // SAFETY: mallopt only changes allocator parameters; both values are valid for them.
        unsafe {
            mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, std::ffi::c_int::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Test helpers.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::Tensor;

    /// The largest absolute difference of `a` and `b`, relative to `b`'s largest magnitude.
    pub fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let s = b.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-6)
    }

    /// Whether `t`'s CPU buffer holds its values only (a gradient that is a view into a larger
    /// buffer keeps all of it alive).
    pub fn owns_its_buffer(t: &Tensor) -> bool {
        let (s, l) = t.storage_and_layout();
        let len = match &*s {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => v.len(),
            _ => return false,
        };
        len == l.shape().elem_count()
    }

    /// The gradients of `Σ t ∘ weights`: `t`'s gradient is `weights`.
    pub fn weighted_grads(t: &Tensor, weights: &Tensor) -> candle_core::backprop::GradStore {
        (t * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    /// A variable of the given shape holding [`values`] of `seed`.
    pub fn var(shape: &[usize], seed: u64) -> candle_core::Var {
        let n = shape.iter().product();
        let t = Tensor::from_vec(values(n, seed), shape, &candle_core::Device::Cpu).unwrap();
        candle_core::Var::from_tensor(&t).unwrap()
    }

    /// `n` reproducible values, roughly uniform on [-1.7, 1.7] (unit variance): a hash of
    /// the index, enough for kernels whose tests only need varied, sign-mixed operands.
    pub fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let v = ((i as f64 + 0.5) * 12.9898 + seed as f64 * 78.233).sin() * 43758.5453;
                ((v - v.floor()) * 2.0 - 1.0) as f32 * 1.732
            })
            .collect()
    }
}

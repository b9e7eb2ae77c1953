//! The CUDA kernels (feature `cuda`): `cuda/scan.cu`, compiled once per process with NVRTC
//! (so building the crate needs no nvcc) and launched by the candle op's `cuda_fwd`.
//!
//! The kernels read the same packed inputs as the CPU path (see [`crate::op`]): one thread block
//! of [`THREADS`] threads per (batch, channel) row, chunks of [`CHUNK`] steps, a block-wide scan
//! within a chunk, and only the state at every chunk start saved.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};

use crate::ScanShape;

/// The kernel source.
pub const SOURCE: &str = include_str!("cuda/scan.cu");
/// Threads per block (`THREADS` in the source).
pub const THREADS: u32 = 128;
/// Steps per chunk (`THREADS * ITEMS` in the source).
pub const CHUNK: usize = 1024;
const MODULE: &str = "vim_scan";

/// Compiles [`SOURCE`] with NVRTC (once per process) and returns the PTX text.
///
/// # Errors
/// NVRTC's log when compilation fails.
pub fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let opts = CompileOptions {
            // Portable PTX, JIT-compiled by the driver for the device at hand.
            arch: Some("compute_75"),
            name: Some("scan.cu".into()),
            ..Default::default()
        };
        compile_ptx_with_opts(SOURCE, opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("vim-scan: NVRTC failed to compile scan.cu: {e}"))
    })
    .as_ref()
    .map(String::as_str)
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// The scalar types with kernels.
pub(crate) trait Scalar: CudaDType + DeviceRepr + ValidAsZeroBits + Copy + 'static {
    const SUFFIX: &'static str;
}
impl Scalar for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Scalar for f64 {
    const SUFFIX: &'static str = "f64";
}

/// Which optional inputs are present, and softplus.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Flags {
    pub has_d: bool,
    pub has_z: bool,
    pub has_bias: bool,
    pub softplus: bool,
}

fn view<'a, T: Scalar>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => candle_core::bail!("selective_scan: inputs must be contiguous"),
    }
}

fn chunks(shape: ScanShape) -> usize {
    shape.length.div_ceil(CHUNK).max(1)
}

fn config(shape: ScanShape, shared_values: usize, size: usize) -> Result<LaunchConfig> {
    let rows = shape.batch * shape.channels;
    let shared = shared_values * size;
    if shared > 40 * 1024 {
        candle_core::bail!(
            "selective_scan: state size {} is too large for the CUDA kernel",
            shape.state
        );
    }
    Ok(LaunchConfig {
        grid_dim: (u32::try_from(rows).map_err(candle_core::Error::wrap)?, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared as u32,
    })
}

/// Launches the forward kernel; returns `(y, chunk states)`.
fn forward_views<T: Scalar>(
    dev: &CudaDevice,
    x: [&CudaView<'_, T>; 3],
    shape: ScanShape,
    flags: Flags,
) -> Result<(CudaSlice<T>, CudaSlice<T>)> {
    let rows = shape.batch * shape.channels;
    let func =
        dev.get_or_load_custom_func(&format!("vim_scan_fwd_{}", T::SUFFIX), MODULE, ptx()?)?;
    // SAFETY: every element of both buffers is written by the kernel (y for t < L of every
    // row, the states for every chunk of every row).
    let y = unsafe { dev.alloc::<T>(rows * shape.length) }?;
    let states = unsafe { dev.alloc::<T>(rows * chunks(shape) * shape.state) }?;
    let cfg = config(shape, shape.state, std::mem::size_of::<T>())?;
    let dims = dims(shape, flags)?;
    let mut b = func.builder();
    b.arg(x[0]).arg(x[1]).arg(x[2]).arg(&y).arg(&states);
    for d in &dims {
        b.arg(d);
    }
    // SAFETY: the argument list matches `vim_scan_fwd_*` in scan.cu and the buffers have the
    // sizes the kernel indexes (checked by the caller against `shape`).
    unsafe { b.launch(cfg) }.w()?;
    Ok((y, states))
}

fn dims(shape: ScanShape, flags: Flags) -> Result<[i32; 8]> {
    let int = |v: usize| i32::try_from(v).map_err(candle_core::Error::wrap);
    Ok([
        int(shape.batch)?,
        int(shape.channels)?,
        int(shape.state)?,
        int(shape.length)?,
        flags.has_d as i32,
        flags.has_z as i32,
        flags.has_bias as i32,
        flags.softplus as i32,
    ])
}

/// Forward on packed CUDA storages: the output (batch, E, L).
pub(crate) fn forward(
    parts: [(&CudaStorage, &Layout); 3],
    shape: ScanShape,
    flags: Flags,
) -> Result<CudaStorage> {
    fn go<T: Scalar>(
        parts: [(&CudaStorage, &Layout); 3],
        shape: ScanShape,
        flags: Flags,
    ) -> Result<CudaStorage> {
        let dev = parts[0].0.device().clone();
        let [a, b, c] = parts;
        let (x1, x2, x3) = (
            view::<T>(a.0, a.1)?,
            view::<T>(b.0, b.1)?,
            view::<T>(c.0, c.1)?,
        );
        let (y, _) = forward_views(&dev, [&x1, &x2, &x3], shape, flags)?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }
    match parts[0].0.dtype() {
        DType::F32 => go::<f32>(parts, shape, flags),
        DType::F64 => go::<f64>(parts, shape, flags),
        other => candle_core::bail!("selective_scan: {other:?} on CUDA (f32 or f64)"),
    }
}

/// Backward on packed CUDA storages (`[x1; grad]`, x2, x3): the flat packed gradients.
pub(crate) fn backward(
    parts: [(&CudaStorage, &Layout); 3],
    shape: ScanShape,
    flags: Flags,
) -> Result<(CudaStorage, usize)> {
    fn go<T: Scalar>(
        parts: [(&CudaStorage, &Layout); 3],
        shape: ScanShape,
        flags: Flags,
    ) -> Result<(CudaStorage, usize)> {
        let dev = parts[0].0.device().clone();
        let [a, b, c] = parts;
        let (x1g, x2, x3) = (
            view::<T>(a.0, a.1)?,
            view::<T>(b.0, b.1)?,
            view::<T>(c.0, c.1)?,
        );
        let rows = shape.batch * shape.channels * shape.length;
        let total = x1g.len() - rows + x2.len() + x3.len();
        // The forward kernel reads only the leading [u; delta; z?] part of `x1g`.
        let (_, states) = forward_views(&dev, [&x1g, &x2, &x3], shape, flags)?;
        let grads = dev.alloc_zeros::<T>(total)?;
        let func =
            dev.get_or_load_custom_func(&format!("vim_scan_bwd_{}", T::SUFFIX), MODULE, ptx()?)?;
        let cfg = config(shape, 2 * shape.state + 2, std::mem::size_of::<T>())?;
        let dims = dims(shape, flags)?;
        let mut builder = func.builder();
        builder.arg(&x1g).arg(&x2).arg(&x3).arg(&states).arg(&grads);
        for d in &dims {
            builder.arg(d);
        }
        // SAFETY: the argument list matches `vim_scan_bwd_*` in scan.cu; `grads` is zeroed and
        // holds exactly the packed gradients the kernel writes.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(grads, dev), total))
    }
    match parts[0].0.dtype() {
        DType::F32 => go::<f32>(parts, shape, flags),
        DType::F64 => go::<f64>(parts, shape, flags),
        other => candle_core::bail!("selective_scan: {other:?} on CUDA (f32 or f64)"),
    }
}

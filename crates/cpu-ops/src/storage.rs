//! Pieces every CPU op of the crate uses: reading a CPU storage as an f32 slice, and the
//! per-channel sum that is a bias gradient.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

/// The f32 values of a contiguous CPU tensor.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!(
            "CPU kernel: expected a contiguous f32 tensor, got {:?}",
            l.shape()
        ),
    }
}

/// (B, C, H, W) → (C): the sum over images and pixels (a bias gradient).
pub(crate) struct ChannelSum;

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "channel-sum"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let g = slice(s, l)?;
        let planes: Vec<f64> = g
            .par_chunks(h * w)
            .map(|p| p.chunks(256).map(|r| r.iter().sum::<f32>() as f64).sum())
            .collect();
        let sums = (0..c)
            .map(|ci| (0..b).map(|bi| planes[bi * c + ci]).sum::<f64>() as f32)
            .collect();
        Ok((CpuStorage::F32(sums), Shape::from(c)))
    }
}

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
        let planes: Vec<f64> = g.par_chunks(h * w).map(crate::sums::sum).collect();
        let sums = (0..c)
            .map(|ci| (0..b).map(|bi| planes[bi * c + ci]).sum::<f64>() as f32)
            .collect();
        Ok((CpuStorage::F32(sums), Shape::from(c)))
    }
}

/// Rows summed per task of [`RowSum`] (its partial sums are per block of rows).
const ROW_BLOCK: usize = 256;

/// (rows, n) → (n): the sum over rows (a linear layer's bias gradient), in blocks of rows on
/// rayon's threads, each block's partial sums in f32 and the blocks' in f64. candle's
/// `sum(0)` walks the columns one at a time on one thread.
pub(crate) struct RowSum;

impl CustomOp1 for RowSum {
    fn name(&self) -> &'static str {
        "row-sum"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, n) = l.shape().dims2()?;
        let g = slice(s, l)?;
        let sums = if n == 0 {
            Vec::new()
        } else {
            let partial: Vec<Vec<f32>> = g
                .par_chunks(n * ROW_BLOCK)
                .map(|block| {
                    let mut acc = vec![0f32; n];
                    for row in block.chunks_exact(n) {
                        for (a, &v) in acc.iter_mut().zip(row) {
                            *a += v;
                        }
                    }
                    acc
                })
                .collect();
            (0..n)
                .map(|j| partial.iter().map(|p| p[j] as f64).sum::<f64>() as f32)
                .collect()
        };
        Ok((CpuStorage::F32(sums), Shape::from(n)))
    }
}

/// The sum over the rows of a (rows, n) f32 CPU tensor, one op without a gradient of its own.
pub(crate) fn row_sum(t: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    t.contiguous()?.apply_op1_no_bwd(&RowSum)
}

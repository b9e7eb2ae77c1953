//! What a convolution's forward computes around its product: the InstanceNorm of its input
//! (per-plane statistics), a per-channel bias and a ReLU; shared by the direct and the
//! Winograd forms.

use rayon::prelude::*;

/// Per-plane mean and reciprocal standard deviation of an InstanceNorm (biased variance),
/// accumulated in f64 from blocks summed in f32 lanes ([`crate::sums`]).
#[derive(Debug)]
pub(crate) struct Stats {
    pub(crate) mean: Vec<f32>,
    pub(crate) rstd: Vec<f32>,
}

impl Stats {
    pub(crate) fn of(x: &[f32], hw: usize, eps: f64) -> Stats {
        let (mean, rstd) = x
            .par_chunks(hw)
            .map(|plane| {
                let (s, q) = crate::sums::pair_sums(plane, plane, |v, _| (v, v * v));
                let n = plane.len() as f64;
                let m = s / n;
                let var = (q / n - m * m).max(0.0);
                (m as f32, (1.0 / (var + eps).sqrt()) as f32)
            })
            .unzip();
        Stats { mean, rstd }
    }

    /// The per-channel mean and reciprocal standard deviation of image `bi` of `c` channels.
    pub(crate) fn of_image(&self, bi: usize, c: usize) -> (&[f32], &[f32]) {
        (
            &self.mean[bi * c..(bi + 1) * c],
            &self.rstd[bi * c..(bi + 1) * c],
        )
    }
}

/// What the forward computes around the convolution.
#[derive(Clone, Copy, Default)]
pub(crate) struct Fused<'a> {
    /// InstanceNorm of the input (statistics of every (image, channel) plane).
    pub(crate) norm: Option<&'a Stats>,
    /// Per-output-channel bias.
    pub(crate) bias: Option<&'a [f32]>,
    pub(crate) relu: bool,
    /// Take Winograd's form where it pays ([`crate::Kernels::Auto`]); the direct form otherwise.
    pub(crate) winograd: bool,
}

//! How much memory a forward pass or a training step will need, estimated from the model's
//! configuration and the input's shape before anything is allocated, so that a run that cannot
//! fit (a ViM-UNet on the paper's 1024² canvas on a small machine, say) stops with the figures
//! instead of being killed by the system.
//!
//! The estimate counts the weights (and, for training, their gradients and Adam's two moments)
//! exactly, and the activations from the feature-map and token shapes with one coefficient per
//! layer kind: the number of values of that shape the pass holds. The coefficients were
//! measured with `cargo xtask models --train-step` (the heap a training forward keeps, by stage
//! kind, and the peak heap of the step) at 128², 256² and 512²; the same command prints each
//! estimate beside the measured peak. Measured against it: within 25 % for every family at
//! those sizes and at the paper's canvas, in f32 on the CPU kernels, where the ViT/ViM decoder's
//! blocks have backward passes written by hand. Elsewhere (`--precision bf16`, meant for CUDA, or
//! `Kernels::Candle`) that decoder is composed and keeps its blocks' insides, which the estimate
//! does not count.

use crate::{Model, ModelConfig, NetConfig, SamConfig, VimConfig};

/// Which pass to estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// A forward pass without a gradient graph (prediction).
    Inference,
    /// A training step: forward, backward and an Adam update, optionally with activation
    /// checkpointing ([`Model::set_checkpoint_activations`]).
    Training { checkpoint_activations: bool },
}

/// An estimate of the peak memory of one pass, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The weights; for training also their gradients and Adam's two moments.
    pub parameters: u64,
    /// The activations at the peak: what the forward keeps for the backward pass and the
    /// transients of the pass.
    pub activations: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.parameters.saturating_add(self.activations)
    }
}

// Values held per element of a shape, by layer kind (f32). Training, per sample:
/// UNet: per initial feature and input pixel (all levels, encoder and decoder).
const UNET_KEPT: f64 = 14.8;
/// UNETR/ViM decoder: per initial feature and canvas pixel (side branches, conv blocks,
/// upsamplers, output: its blocks' inputs and outputs, with or without activation
/// checkpointing).
const DECODER_KEPT: f64 = 2.9;
/// The maps inside the decoder's blocks that a training forward without activation
/// checkpointing keeps as well (about 7 per initial feature and canvas pixel: the deconv
/// blocks' upsampled maps and convolutions, the conv blocks' first units, the head's three
/// maps), less the head's recomputation in the backward pass that they replace; per initial
/// feature and canvas pixel.
const DECODER_INSIDE: f64 = 4.2;
/// The decoder's backward pass at full resolution (the head's recomputed inside and its
/// gradients), per initial feature and canvas pixel.
const DECODER_TRANSIENT: f64 = 4.0;
/// A ViM Mamba layer: per token and model dimension; under checkpointing.
const MAMBA_KEPT: f64 = 11.85;
const MAMBA_CHECKPOINTED: f64 = 4.9;
/// A SAM block with windowed attention, whose backward pass is written by hand: per token and
/// dimension (the block's output, the residual stream after the attention, and the MLP's
/// hidden layer before and after the GELU: 4 + 4), and per padded token and dimension (the
/// windows' qkv and the attention's output in windows). The norms' outputs are recomputed, and
/// nothing of the attention's size (heads × window² per token) is kept.
const WINDOWED_PER_TOKEN: f64 = 10.0;
const WINDOWED_PER_PADDED: f64 = 4.0;
/// A SAM block with global attention (its attention is never held whole), per token and
/// dimension: as a windowed block's, with its qkv and attention output on the grid.
const GLOBAL_KEPT: f64 = 14.0;
/// Any SAM block under checkpointing: its input and output.
const VIT_CHECKPOINTED: f64 = 2.0;
/// The UNet's backward pass's transients: a copy of the weights plus this share of what the
/// forward kept.
const BACKWARD_TRANSIENT: f64 = 0.35;
/// Inference, per sample: per initial feature and pixel of the full-resolution level (the
/// encoders' blocks are freed as the forward goes; the decoder's full-resolution levels are the
/// peak).
const INFERENCE_PER_FEATURE_PIXEL: f64 = 6.0;

impl Model {
    /// The peak memory of `pass` on a batch of `batch` images of `height` × `width`.
    pub fn memory_estimate(
        &self,
        batch: usize,
        height: usize,
        width: usize,
        pass: Pass,
    ) -> MemoryEstimate {
        self.config
            .memory_estimate(self.parameter_count(), batch, height, width, pass)
    }
}

impl ModelConfig {
    /// [`Model::memory_estimate`] for a model of this configuration with `parameters` values
    /// ([`ModelConfig::parameter_count`]).
    pub fn memory_estimate(
        &self,
        parameters: usize,
        batch: usize,
        height: usize,
        width: usize,
        pass: Pass,
    ) -> MemoryEstimate {
        let weights = parameters as f64 * 4.0;
        let batch = batch as f64;
        // (values kept for the backward pass, values the backward pass holds beside them,
        // values at the inference peak), per sample.
        let (kept, transient, inference) = match &self.net {
            NetConfig::UNet(u) => {
                let m = 1usize << u.depth;
                let pixels = (height.div_ceil(m) * m * width.div_ceil(m) * m) as f64;
                let f = u.initial_features as f64;
                let kept = UNET_KEPT * f * pixels;
                (
                    kept,
                    BACKWARD_TRANSIENT * kept,
                    INFERENCE_PER_FEATURE_PIXEL * f * pixels,
                )
            }
            NetConfig::Unetr {
                encoder,
                decoder,
                canvas,
                ..
            } => {
                let (enc, enc_ckpt) = sam_kept(encoder, canvas.side());
                let dec = decoder_kept(decoder.initial_features, canvas.side());
                checkpointed(pass, enc, enc_ckpt, dec)
            }
            NetConfig::VimUnet {
                encoder,
                decoder,
                canvas,
            } => {
                let (enc, enc_ckpt) = vim_kept(encoder, canvas.side());
                let dec = decoder_kept(decoder.initial_features, canvas.side());
                checkpointed(pass, enc, enc_ckpt, dec)
            }
        };
        // The backward pass's gradients of the weights as candle accumulates them (each a
        // zero-filled tensor added to); UNETR's ViT blocks, whose backward passes are written by
        // hand, hand most of them over without that.
        let hand_written_vit = matches!(
            (&self.net, pass),
            (NetConfig::Unetr { .. }, Pass::Training { .. })
        );
        let weights = if hand_written_vit { 0.0 } else { weights };
        let bytes = |values: f64| (values * 4.0).ceil() as u64;
        match pass {
            Pass::Inference => MemoryEstimate {
                parameters: bytes(parameters as f64),
                activations: bytes(batch * inference),
            },
            Pass::Training { .. } => MemoryEstimate {
                parameters: bytes(4.0 * parameters as f64),
                activations: (weights + 4.0 * batch * (kept + transient)).ceil() as u64,
            },
        }
    }
}

/// The decoder's values per sample: kept in training, held by its backward pass, at the
/// inference peak, and the encoder's input on the canvas.
struct DecoderValues {
    kept: f64,
    /// Kept as well without activation checkpointing.
    inside: f64,
    transient: f64,
    inference: f64,
    input: f64,
}

fn decoder_kept(features: usize, canvas: usize) -> DecoderValues {
    let f = features as f64;
    let pixels = (canvas * canvas) as f64;
    DecoderValues {
        kept: DECODER_KEPT * f * pixels,
        inside: DECODER_INSIDE * f * pixels,
        transient: DECODER_TRANSIENT * f * pixels,
        inference: INFERENCE_PER_FEATURE_PIXEL * f * pixels,
        // The 3-channel input on the canvas.
        input: 3.0 * pixels,
    }
}

/// (kept, transient, inference) for a ViT/ViM model from its encoder's values (plain and
/// checkpointed) and its decoder's.
fn checkpointed(pass: Pass, enc: f64, enc_ckpt: f64, dec: DecoderValues) -> (f64, f64, f64) {
    let inference = dec.inference + dec.input;
    let kept = match pass {
        Pass::Training {
            checkpoint_activations: true,
        } => enc_ckpt + dec.kept,
        _ => enc + dec.kept + dec.inside,
    };
    (kept + dec.input, dec.transient, inference)
}

/// A SAM encoder's kept values per sample: (plain, checkpointed).
fn sam_kept(c: &SamConfig, canvas: usize) -> (f64, f64) {
    let grid = canvas / c.patch_size;
    let tokens = (grid * grid) as f64;
    let d = c.embed_dim as f64;
    let window = c.window_size.min(grid).max(1);
    let padded_side = grid.div_ceil(window) * window;
    let padded = (padded_side * padded_side) as f64;
    let windowed = WINDOWED_PER_TOKEN * d * tokens + WINDOWED_PER_PADDED * d * padded;
    let global = GLOBAL_KEPT * d * tokens;
    let n_global = c.global_attn_indexes.len().min(c.depth);
    let blocks = n_global as f64 * global + (c.depth - n_global) as f64 * windowed;
    // The patch embedding's output and its input's patches.
    let embed = 3.0 * d * tokens;
    (
        blocks + embed,
        VIT_CHECKPOINTED * d * tokens * c.depth as f64 + embed,
    )
}

/// A ViM encoder's kept values per sample: (plain, checkpointed).
fn vim_kept(c: &VimConfig, canvas: usize) -> (f64, f64) {
    let grid = canvas / c.patch_size;
    // The class token.
    let tokens = (grid * grid + 1) as f64;
    let d = c.embed_dim as f64;
    let embed = 3.0 * d * tokens;
    let layers = c.depth as f64;
    (
        MAMBA_KEPT * d * tokens * layers + embed,
        MAMBA_CHECKPOINTED * d * tokens * layers + embed,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Canvas, ModelKind, PresetOptions};

    fn preset(kind: ModelKind, canvas: Canvas) -> ModelConfig {
        let o = PresetOptions {
            canvas,
            ..Default::default()
        };
        ModelConfig::preset(kind, 2, &o)
    }

    const GIB: f64 = (1u64 << 30) as f64;

    /// The estimates against the peak heap that `cargo xtask models --train-step` measured (2
    /// threads, f32; the coefficients were fitted to most of these): all within 25 % (seen:
    /// 0.93–1.23).
    #[test]
    fn estimates_are_within_a_quarter_of_the_measured_peaks() {
        let train = Pass::Training {
            checkpoint_activations: false,
        };
        let ckpt = Pass::Training {
            checkpoint_activations: true,
        };
        // (model, canvas, side, batch, pass, parameters, measured peak GiB)
        let cases = [
            (
                ModelKind::UNet,
                Canvas::Paper,
                128,
                2,
                train,
                31_030_658,
                0.70,
            ),
            (
                ModelKind::UNet,
                Canvas::Paper,
                256,
                2,
                train,
                31_030_658,
                1.08,
            ),
            (
                ModelKind::VimUnetT,
                Canvas::Native(256),
                256,
                2,
                train,
                17_762_410,
                0.72,
            ),
            (
                ModelKind::VimUnetT,
                Canvas::Native(512),
                512,
                2,
                train,
                17_909_866,
                2.13,
            ),
            (
                ModelKind::VimUnetT,
                Canvas::Paper,
                512,
                2,
                train,
                18_499_690,
                7.68,
            ),
            (
                ModelKind::VimUnetT,
                Canvas::Paper,
                512,
                2,
                ckpt,
                18_499_690,
                4.56,
            ),
            (
                ModelKind::VimUnetT,
                Canvas::Native(256),
                256,
                2,
                ckpt,
                17_762_410,
                0.48,
            ),
            (
                ModelKind::UnetrB,
                Canvas::Native(256),
                256,
                2,
                train,
                101_109_378,
                1.84,
            ),
            (
                ModelKind::UnetrB,
                Canvas::Native(512),
                512,
                2,
                train,
                101_715_586,
                3.74,
            ),
            (
                ModelKind::UnetrB,
                Canvas::Native(256),
                256,
                2,
                ckpt,
                101_109_378,
                1.66,
            ),
            (
                ModelKind::UNet,
                Canvas::Paper,
                512,
                1,
                Pass::Inference,
                31_030_658,
                0.42,
            ),
            (
                ModelKind::VimUnetT,
                Canvas::Paper,
                512,
                1,
                Pass::Inference,
                18_499_690,
                1.38,
            ),
            (
                ModelKind::UnetrB,
                Canvas::Paper,
                512,
                1,
                Pass::Inference,
                104_107_650,
                1.74,
            ),
            (
                ModelKind::UnetrB,
                Canvas::Native(512),
                512,
                1,
                Pass::Inference,
                101_715_586,
                0.72,
            ),
            (
                ModelKind::UnetrB,
                Canvas::Paper,
                512,
                2,
                train,
                104_107_650,
                11.05,
            ),
            (
                ModelKind::UnetrB,
                Canvas::Paper,
                512,
                2,
                ckpt,
                104_107_650,
                5.15,
            ),
        ];
        for (kind, canvas, side, batch, pass, parameters, measured) in cases {
            let e = preset(kind, canvas).memory_estimate(parameters, batch, side, side, pass);
            let ratio = e.total() as f64 / GIB / measured;
            assert!(
                (0.75..=1.25).contains(&ratio),
                "{kind:?} {canvas:?} {side} {pass:?}: estimate {:.2} GiB, measured {measured} \
                 GiB",
                e.total() as f64 / GIB
            );
        }
    }

    #[test]
    fn estimates_grow_with_batch_canvas_and_model() {
        let train = Pass::Training {
            checkpoint_activations: false,
        };
        let t = preset(ModelKind::VimUnetT, Canvas::Paper);
        let one = t.memory_estimate(18_000_000, 1, 512, 512, train).total();
        let two = t.memory_estimate(18_000_000, 2, 512, 512, train).total();
        assert!(two > one && two < 2 * one + 1);
        let native = preset(ModelKind::VimUnetT, Canvas::Native(512))
            .memory_estimate(18_000_000, 2, 512, 512, train)
            .total();
        assert!(
            native * 3 < two,
            "the native canvas holds a quarter of the pixels"
        );
        let inference = t
            .memory_estimate(18_000_000, 2, 512, 512, Pass::Inference)
            .total();
        assert!(inference < two, "a training step holds more than a forward");
        // A UNet's estimate follows its input, a ViT/ViM model's its canvas.
        let u = preset(ModelKind::UNet, Canvas::Paper);
        assert!(
            u.memory_estimate(31_000_000, 1, 1024, 1024, train)
                .activations
                > 3 * u
                    .memory_estimate(31_000_000, 1, 512, 512, train)
                    .activations
        );
        assert_eq!(
            t.memory_estimate(18_000_000, 1, 256, 256, train),
            t.memory_estimate(18_000_000, 1, 512, 512, train)
        );
    }
}

//! The convolutional decoder that torch-em's `UNETR` puts behind a ViT or Vision Mamba
//! encoder (shared by UNETR and ViM-UNet).

use candle_core::Tensor;

use crate::checkpoint::{maybe, stage, Stash};
use crate::layers::{sigmoid, BatchNorm, Conv2d, ConvBlock, ConvTranspose2x2, Upsampler};
use crate::params::Scope;
use crate::Result;

/// `Deconv2DBlock`: transposed conv ×2 → 3×3 conv → BatchNorm → ReLU
/// (keys `block.0.block`, `block.1.block`, `block.2`).
#[derive(Debug, Clone)]
pub struct DeconvBlock {
    up: ConvTranspose2x2,
    conv: Conv2d,
    bn: BatchNorm,
}

impl DeconvBlock {
    pub fn new(s: &Scope, inp: usize, out: usize) -> Result<Self> {
        let b = s.pp("block");
        Ok(DeconvBlock {
            up: ConvTranspose2x2::new(&b.pp(0).pp("block"), inp, out)?,
            conv: Conv2d::new(&b.pp(1).pp("block"), out, out, 3, 1, 1, true)?,
            bn: BatchNorm::new(&b.pp(2), out)?,
        })
    }
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv.forward(&self.up.forward(x)?)?;
        self.bn.forward_relu(&y, train)
    }

    /// The training forward, for checkpointing.
    fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        self.forward(x, true)
    }
}

#[derive(Debug, Clone)]
enum SideBranches {
    /// z9, z6, z3, z0 from a chain of deconv blocks on the final encoder map (the paper's runs).
    Chain(Box<[DeconvBlock; 4]>),
    /// z9, z6, z3 from the encoder's intermediate maps, z0 from a conv block on the input
    /// (torch-em's `use_skip_connection=True`).
    Skips(Box<SkipBranches>),
}

#[derive(Debug, Clone)]
struct SkipBranches {
    deconv1: DeconvBlock,
    deconv2: [DeconvBlock; 2],
    deconv3: [DeconvBlock; 3],
    deconv4: ConvBlock,
}

/// The decoder of torch-em's `UNETR` (depth 3, `features = [8f, 4f, 2f, f]`).
#[derive(Debug, Clone)]
pub struct UnetrDecoder {
    side: SideBranches,
    base: ConvBlock,
    blocks: Vec<ConvBlock>,
    samplers: Vec<Upsampler>,
    deconv_out: Upsampler,
    decoder_head: ConvBlock,
    out_conv: Conv2d,
    sigmoid: bool,
}

/// The decoder's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DecoderConfig {
    /// The encoder's width D.
    pub embed_dim: usize,
    /// The channels of the (3-channel) encoder input, for `deconv4` with skip connections.
    pub in_chans: usize,
    pub out_channels: usize,
    /// f: the decoder's features are `[8f, 4f, 2f, f]` (torch-em: 64).
    pub initial_features: usize,
    pub skip_connections: bool,
    pub conv_transpose: bool,
    pub sigmoid: bool,
}

impl UnetrDecoder {
    pub fn new(s: &Scope, cfg: &DecoderConfig) -> Result<Self> {
        let f = cfg.initial_features;
        let feats = [8 * f, 4 * f, 2 * f, f];
        let d = cfg.embed_dim;
        let side = if cfg.skip_connections {
            let d2 = s.pp("deconv2");
            let d3 = s.pp("deconv3");
            SideBranches::Skips(Box::new(SkipBranches {
                deconv1: DeconvBlock::new(&s.pp("deconv1"), d, feats[0])?,
                deconv2: [
                    DeconvBlock::new(&d2.pp(0), d, feats[0])?,
                    DeconvBlock::new(&d2.pp(1), feats[0], feats[1])?,
                ],
                deconv3: [
                    DeconvBlock::new(&d3.pp(0), d, feats[0])?,
                    DeconvBlock::new(&d3.pp(1), feats[0], feats[1])?,
                    DeconvBlock::new(&d3.pp(2), feats[1], feats[2])?,
                ],
                deconv4: ConvBlock::new(&s.pp("deconv4"), cfg.in_chans, feats[3])?,
            }))
        } else {
            SideBranches::Chain(Box::new([
                DeconvBlock::new(&s.pp("deconv1"), d, feats[0])?,
                DeconvBlock::new(&s.pp("deconv2"), feats[0], feats[1])?,
                DeconvBlock::new(&s.pp("deconv3"), feats[1], feats[2])?,
                DeconvBlock::new(&s.pp("deconv4"), feats[2], feats[3])?,
            ]))
        };
        let base = ConvBlock::new(&s.pp("base"), d, feats[0])?;
        let mut blocks = Vec::new();
        let mut samplers = Vec::new();
        for i in 0..3 {
            blocks.push(ConvBlock::new(
                &s.pp("decoder").pp("blocks").pp(i),
                feats[i],
                feats[i + 1],
            )?);
            samplers.push(Upsampler::new(
                &s.pp("decoder").pp("samplers").pp(i),
                feats[i],
                feats[i + 1],
                cfg.conv_transpose,
            )?);
        }
        Ok(UnetrDecoder {
            side,
            base,
            blocks,
            samplers,
            deconv_out: Upsampler::new(&s.pp("deconv_out"), f, f, cfg.conv_transpose)?,
            decoder_head: ConvBlock::new(&s.pp("decoder_head"), 2 * f, f)?,
            out_conv: Conv2d::new(&s.pp("out_conv"), f, cfg.out_channels, 1, 1, 0, true)?,
            sigmoid: cfg.sigmoid,
        })
    }

    /// `z12`: the encoder map (B, D, g, g); `intermediates`: the first three global-attention
    /// outputs (only with skip connections); `input`: the preprocessed encoder input.
    pub fn forward(
        &self,
        z12: &Tensor,
        intermediates: &[Tensor],
        input: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_checkpointed(z12, intermediates, input, train, None)
    }

    /// [`UnetrDecoder::forward`] with the deconv blocks (and with skip connections `deconv4`)
    /// checkpointed when `stash` is given.
    pub fn forward_checkpointed(
        &self,
        z12: &Tensor,
        intermediates: &[Tensor],
        input: &Tensor,
        train: bool,
        stash: Option<&Stash>,
    ) -> Result<Tensor> {
        let (z9, z6, z3, z0) = match &self.side {
            SideBranches::Chain(chain) => {
                let [d1, d2, d3, d4] = chain.as_ref();
                // A stash is given in training only, where the deconv blocks are checkpointed
                // in their training form (BatchNorm's running statistics update once).
                let deconv = |b: &DeconvBlock, x: &Tensor| match stash {
                    Some(_) => maybe(x, stash, b, DeconvBlock::forward_train),
                    None => b.forward(x, train),
                };
                let z9 = deconv(d1, z12)?;
                let z6 = deconv(d2, &z9)?;
                let z3 = deconv(d3, &z6)?;
                let z0 = deconv(d4, &z3)?;
                (z9, z6, z3, z0)
            }
            SideBranches::Skips(skips) => {
                let SkipBranches {
                    deconv1,
                    deconv2,
                    deconv3,
                    deconv4,
                } = skips.as_ref();
                if intermediates.len() < 3 {
                    return Err(crate::Error::Config {
                        option: "skip_connections",
                        value: "true".into(),
                        problem: format!(
                            "need three intermediate encoder maps, got {}",
                            intermediates.len()
                        ),
                    });
                }
                let z9 = deconv1.forward(&intermediates[2], train)?;
                let mut z6 = intermediates[1].clone();
                for b in deconv2 {
                    z6 = b.forward(&z6, train)?;
                }
                let mut z3 = intermediates[0].clone();
                for b in deconv3 {
                    z3 = b.forward(&z3, train)?;
                }
                let z0 = maybe(input, stash, deconv4, ConvBlock::forward)?;
                (z9, z6, z3, z0)
            }
        };
        stage("decoder: deconv side branches");
        let mut y = maybe(z12, stash, &self.base, ConvBlock::forward)?;
        stage("decoder: conv block");
        for ((block, sampler), skip) in self.blocks.iter().zip(&self.samplers).zip([&z9, &z6, &z3])
        {
            y = sampler.forward(&y)?;
            stage("decoder: upsampler");
            // The decoder's conv blocks are neither segments nor checkpointed: the peak of a
            // training step is in the backward pass of its full-resolution levels, where a
            // recomputation's transients (a copy of the inputs, the concatenation, the block's
            // inside and their gradients) measured more than keeping the level.
            y = block.forward_skip(&y, skip)?;
            stage("decoder: conv block");
        }
        y = self.deconv_out.forward(&y)?;
        stage("decoder: upsampler");
        y = self.decoder_head.forward_cat(&y, &z0)?;
        stage("decoder: conv block");
        let y = self.out_conv.forward(&y)?;
        stage("output");
        if self.sigmoid {
            sigmoid(&y)
        } else {
            Ok(y)
        }
    }
}

//! torch-em's `UNet2d`.

use candle_core::Tensor;

use crate::checkpoint::{maybe, maybe2, stage, Stash};
use crate::layers::{max_pool2, sigmoid, Conv2d, ConvBlock, Upsampler};
use crate::params::Scope;
use crate::{Error, Result};

/// `UNet2d(in_channels, out_channels, depth, initial_features, gain)` with InstanceNorm conv
/// blocks, max-pooling, transposed-conv or bilinear upsampling and an optional sigmoid.
#[derive(Debug, Clone)]
pub struct UNet {
    encoder: Vec<ConvBlock>,
    base: ConvBlock,
    blocks: Vec<ConvBlock>,
    samplers: Vec<Upsampler>,
    out_conv: Conv2d,
    depth: usize,
    sigmoid: bool,
}

/// The configuration of a [`UNet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub depth: usize,
    pub initial_features: usize,
    pub gain: usize,
    /// Transposed-conv upsampling (the paper's runs) or bilinear + 1×1 conv (torch-em's default).
    pub conv_transpose: bool,
    pub sigmoid: bool,
}

impl UNet {
    pub fn new(s: &Scope, cfg: &UNetConfig) -> Result<Self> {
        let f = |i: usize| cfg.initial_features * cfg.gain.pow(i as u32);
        let mut encoder = Vec::new();
        let mut inp = cfg.in_channels;
        for i in 0..cfg.depth {
            encoder.push(ConvBlock::new(
                &s.pp("encoder").pp("blocks").pp(i),
                inp,
                f(i),
            )?);
            inp = f(i);
        }
        let base = ConvBlock::new(&s.pp("base"), f(cfg.depth - 1), f(cfg.depth))?;
        let mut blocks = Vec::new();
        let mut samplers = Vec::new();
        for i in 0..cfg.depth {
            let (a, b) = (f(cfg.depth - i), f(cfg.depth - i - 1));
            blocks.push(ConvBlock::new(&s.pp("decoder").pp("blocks").pp(i), a, b)?);
            samplers.push(Upsampler::new(
                &s.pp("decoder").pp("samplers").pp(i),
                a,
                b,
                cfg.conv_transpose,
            )?);
        }
        let out_conv = Conv2d::new(&s.pp("out_conv"), f(0), cfg.out_channels, 1, 1, 0, true)?;
        Ok(UNet {
            encoder,
            base,
            blocks,
            samplers,
            out_conv,
            depth: cfg.depth,
            sigmoid: cfg.sigmoid,
        })
    }

    /// (B, C_in, H, W) → (B, C_out, H, W); H and W must be multiples of 2^depth.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_checkpointed(x, None)
    }

    /// [`UNet::forward`] with the conv blocks checkpointed when `stash` is given.
    pub fn forward_checkpointed(&self, x: &Tensor, stash: Option<&Stash>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let m = 1usize << self.depth;
        if h % m != 0 || w % m != 0 {
            return Err(Error::Input {
                shape: x.dims().to_vec(),
                problem: format!(
                    "a UNet of depth {} needs sides divisible by {m}, not {h}×{w}: pad it, e.g. \
                     with seg_train's prediction helpers",
                    self.depth
                ),
            });
        }
        let mut skips = Vec::new();
        let mut y = x.clone();
        for block in &self.encoder {
            y = maybe(&y, stash, block, ConvBlock::forward)?;
            stage("UNet: conv block");
            skips.push(y.clone());
            y = max_pool2(&y, block.conv2.kernels)?;
            stage("UNet: pooling");
        }
        y = maybe(&y, stash, &self.base, ConvBlock::forward)?;
        stage("UNet: conv block");
        for ((block, sampler), skip) in self
            .blocks
            .iter()
            .zip(&self.samplers)
            .zip(skips.iter().rev())
        {
            y = sampler.forward(&y)?;
            stage("UNet: upsampler");
            y = maybe2(&y, skip, stash, block, ConvBlock::forward_skip)?;
            stage("UNet: conv block");
        }
        let y = self.out_conv.forward(&y)?;
        stage("output");
        if self.sigmoid {
            sigmoid(&y)
        } else {
            Ok(y)
        }
    }
}

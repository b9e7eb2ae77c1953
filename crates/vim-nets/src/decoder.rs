//! The convolutional decoder that torch-em's `UNETR` puts behind a ViT or Vision Mamba
//! encoder (shared by UNETR and ViM-UNet).

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::checkpoint::{by_hand, maybe, maybe2, stage, HandGrads, Saved, Stash};
use crate::layers::{
    compute_dtype, crop_like, p, sigmoid, BatchNorm, Conv2d, ConvBlock, ConvTranspose2x2, Upsampler,
};
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
        let u = self.up.forward(x)?;
        if !train {
            if let Some(y) = self.conv_bn_relu_folded(&u)? {
                return Ok(y);
            }
        }
        let y = self.conv.forward(&u)?;
        self.bn.forward_relu(&y, train)
    }

    /// In evaluation, the convolution with the BatchNorm folded into its weight and bias
    /// ([`BatchNorm::folded_into`]) and the ReLU in its output pass: one map written where the
    /// composed form writes five. `None` where the CPU kernels do not serve the layer.
    fn conv_bn_relu_folded(&self, u: &Tensor) -> Result<Option<Tensor>> {
        let Some(bias) = &self.conv.bias else {
            return Ok(None);
        };
        let k = self.conv.kernels;
        let shape = (self.conv.kernel, self.conv.stride, self.conv.padding);
        if shape != (3, 1, 1) || !k.serve(u) {
            return Ok(None);
        }
        let (w, b) = self.bn.folded_into(&p(&self.conv.weight), &p(bias))?;
        let relu = cpu_ops::Conv3x3Block::new(None, true);
        Ok(cpu_ops::conv3x3_block(u, &w, &b, relu, k)?)
    }

    /// The training forward, for checkpointing.
    fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        self.forward(x, true)
    }

    /// The training forward with the backward pass written by hand ([`DeconvBlock::backward`]),
    /// keeping the input, the output and the two maps inside ([`crate::checkpoint::by_hand`];
    /// the input and the output only under checkpointing), where the crate's CPU kernels serve
    /// every layer; `None` elsewhere.
    fn forward_by_hand(&self, x: &Tensor, stash: Option<&Stash>) -> Result<Option<Tensor>> {
        let k = self.conv.kernels;
        let served = k.serve(x)
            && compute_dtype() == DType::F32
            && (self.conv.kernel, self.conv.stride, self.conv.padding) == (3, 1, 1)
            && self.conv.bias.is_some();
        if !served {
            return Ok(None);
        }
        let (fwd, bwd) = (self.clone(), self.clone());
        by_hand(
            &[x],
            stash,
            move |xs| {
                let [u, c] = fwd.inside(&xs[0])?;
                let y = fwd.bn.forward_relu(&c, true)?;
                Ok((y, vec![u, c]))
            },
            Arc::new(move |saved, g| bwd.backward(saved, g)),
        )
    }

    /// The upsampled map and the convolution's output (before the BatchNorm).
    fn inside(&self, x: &Tensor) -> Result<[Tensor; 2]> {
        let u = self.up.forward(x)?;
        let c = self.conv.forward(&u)?;
        Ok([u, c])
    }

    /// The gradients of input and parameters from the input and the output gradient: the
    /// upsampled map and the convolution as the forward kept them (recomputed under
    /// activation checkpointing), each freed once its layer's gradients are taken.
    fn backward(&self, mut saved: Saved, g: &Tensor) -> Result<HandGrads> {
        let k = self.conv.kernels;
        let missing = || crate::checkpoint::unserved(k, "a deconv block");
        let [u, c] = saved.inside_or(|xs| self.inside(&xs[0]))?;
        let x = &saved.xs[0];
        let (bw, bb) = (&self.bn.weight, &self.bn.bias);
        let mut bn =
            cpu_ops::batch_norm_train_vjp(&c, bw, bb, 1e-5, true, g, k)?.ok_or_else(missing)?;
        drop(c);
        let gc = bn.input.take().ok_or_else(missing)?;
        let plain = cpu_ops::Conv3x3Block::new(None, false);
        let conv = cpu_ops::conv3x3_block_vjp(&u, &self.conv.weight, plain, &u, &gc, false, k)?
            .ok_or_else(missing)?;
        drop(u);
        // The input's gradient, with the input gone.
        let gu = cpu_ops::conv3x3_input_vjp(&gc, &self.conv.weight, k)?;
        drop(gc);
        let up = cpu_ops::conv_transpose2x2_vjp(x, &self.up.weight, &gu, true, k)?
            .ok_or_else(missing)?;
        drop(gu);
        let conv_bias = self.conv.bias.clone().ok_or_else(missing)?;
        Ok((
            vec![up.input],
            vec![
                (self.up.weight.clone(), up.weight),
                (self.up.bias.clone(), up.bias),
                (self.conv.weight.clone(), conv.weight),
                (conv_bias, conv.bias),
                (bw.clone(), bn.weight),
                (bb.clone(), bn.bias),
            ],
        ))
    }
}

/// The decoder's transposed-convolution upsampler `deconv_out` (the head's hand-written
/// backward pass serves no other).
fn up_of(d: &UnetrDecoder) -> Result<&ConvTranspose2x2> {
    match &d.deconv_out {
        Upsampler::Transposed(up) => Ok(up),
        Upsampler::Bilinear(c) => Err(crate::checkpoint::unserved(c.kernels, "the decoder head")),
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

    /// The head (the upsampler `deconv_out` of `y`, the conv block on its output and `z0`, and
    /// the output convolution) with its backward pass written by hand
    /// ([`UnetrDecoder::head_backward`]), keeping its inputs, its output and the three maps
    /// inside ([`crate::checkpoint::by_hand`]; the inputs and the output only under
    /// checkpointing), where the crate's CPU kernels serve every layer (a
    /// transposed-convolution upsampler); `None` elsewhere. Taking the upsampler in means its
    /// input's gradient, a quarter of its output's size, is the one that leaves the head.
    fn head_by_hand(
        &self,
        y: &Tensor,
        z0: &Tensor,
        stash: Option<&Stash>,
    ) -> Result<Option<Tensor>> {
        let (out, Upsampler::Transposed(up)) = (&self.out_conv, &self.deconv_out) else {
            return Ok(None);
        };
        let (_, _, h, w) = y.dims4()?;
        let (_, _, h0, w0) = z0.dims4()?;
        let served = up.kernels.serve(y)
            && (h0, w0) == (2 * h, 2 * w)
            && self.decoder_head.by_hand_serves(z0, z0)?
            && out.bias.is_some()
            && cpu_ops::conv1x1_served(z0, &out.weight, out.kernels)?;
        if !served {
            return Ok(None);
        }
        let (fwd, bwd) = (self.clone(), self.clone());
        by_hand(
            &[y, z0],
            stash,
            move |xs| {
                let [y_up, mid, top] = fwd.head_inside(xs)?;
                Ok((fwd.out_conv.forward(&top)?, vec![y_up, mid, top]))
            },
            Arc::new(move |saved, g| bwd.head_backward(up_of(&bwd)?, saved, g)),
        )
    }

    /// The head's inside on its inputs `[y, z0]`: the upsampled map, the conv block's first
    /// unit's output and the block's output.
    fn head_inside(&self, xs: &[Tensor]) -> Result<[Tensor; 3]> {
        let y_up = self.deconv_out.forward(&xs[0])?;
        let [mid, top] = self.decoder_head.recompute_cat(&y_up, &xs[1])?;
        Ok([y_up, mid, top])
    }

    /// The head's gradients from its inputs, the maps inside it as the forward kept them
    /// (recomputed under activation checkpointing) and the output gradient, each map freed
    /// once its layer's gradients are taken.
    fn head_backward(
        &self,
        up: &ConvTranspose2x2,
        mut saved: Saved,
        g: &Tensor,
    ) -> Result<HandGrads> {
        let oc = &self.out_conv;
        let missing = || crate::checkpoint::unserved(oc.kernels, "the decoder head");
        let [y_up, mid, top] = saved.inside_or(|xs| self.head_inside(xs))?;
        let (y, z0) = (&saved.xs[0], &saved.xs[1]);
        let mut out =
            cpu_ops::conv1x1_vjp(&top, &oc.weight, g, true, oc.kernels)?.ok_or_else(missing)?;
        let g_top = out.input.take().ok_or_else(missing)?;
        cpu_ops::relu_vjp_in_place(&g_top, &top)?;
        drop(top);
        let (mut grads, mut params) = self.decoder_head.backward_cat(&y_up, z0, mid, g_top)?;
        drop(y_up);
        let g_up = grads[0].take().ok_or_else(missing)?;
        let up_grads = cpu_ops::conv_transpose2x2_vjp(y, &up.weight, &g_up, true, up.kernels)?
            .ok_or_else(missing)?;
        drop(g_up);
        grads[0] = up_grads.input;
        params.push((oc.weight.clone(), out.weight));
        params.push((oc.bias.clone().ok_or_else(missing)?, out.bias));
        params.push((up.weight.clone(), up_grads.weight));
        params.push((up.bias.clone(), up_grads.bias));
        Ok((grads, params))
    }

    /// [`UnetrDecoder::forward`] with the deconv blocks (and with skip connections `deconv4`)
    /// checkpointed when `stash` is given. In training on the CPU kernels (f32) the chain's
    /// deconv blocks, the conv blocks and the head have backward passes written by hand; they
    /// keep the maps inside them without `stash`, and their inputs and outputs only with it.
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
                let deconv = |b: &DeconvBlock, x: &Tensor| {
                    if train {
                        if let Some(y) = b.forward_by_hand(x, stash)? {
                            return Ok(y);
                        }
                    }
                    match stash {
                        Some(_) => maybe(x, stash, b, DeconvBlock::forward_train),
                        None => b.forward(x, train),
                    }
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
            // In training the block's backward pass is written by hand (recomputing it under
            // autograd instead held a copy of the inputs, the concatenation, the block's inside
            // and their gradients at once, more than keeping the level); composed where the
            // CPU kernels do not serve.
            y = match block.forward_cat_by_hand(&y, &crop_like(skip, &y)?, stash)? {
                Some(y) => y,
                None => maybe2(&y, skip, stash, block, ConvBlock::forward_skip)?,
            };
            stage("decoder: conv block");
        }
        let by_hand = match train {
            true => self.head_by_hand(&y, &z0, stash)?,
            false => None,
        };
        let y = match by_hand {
            Some(y) => y,
            None => {
                let y = self.deconv_out.forward(&y)?;
                stage("decoder: upsampler");
                let y = self.decoder_head.forward_cat(&y, &z0)?;
                stage("decoder: conv block");
                self.out_conv.forward(&y)?
            }
        };
        stage("output");
        if self.sigmoid {
            sigmoid(&y)
        } else {
            Ok(y)
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::params::Params;

    /// In evaluation the deconv block folds its BatchNorm into the 3 × 3 convolution: the
    /// output equals the composed convolution, BatchNorm (running statistics away from 0 and
    /// 1, affine parameters away from 1 and 0) and ReLU.
    #[test]
    fn the_folded_evaluation_block_equals_the_composed_one() {
        let dev = Device::Cpu;
        let params = Params::new(&dev, 7);
        let block = DeconvBlock::new(&params.root(), 6, 5).unwrap();
        let channel = |lo: f32, step: f32| {
            let v: Vec<f32> = (0..5).map(|i| lo + step * i as f32).collect();
            Tensor::new(v, &dev).unwrap()
        };
        block.bn.running_mean.set(&channel(-0.3, 0.2)).unwrap();
        block.bn.running_var.set(&channel(0.4, 0.5)).unwrap();
        let bn = BatchNorm {
            weight: channel(1.5, -0.4),
            bias: channel(-0.2, 0.15),
            ..block.bn.clone()
        };
        let block = DeconvBlock { bn, ..block };
        let x = Tensor::randn(0f32, 1.0, (2, 6, 7, 9), &dev).unwrap();
        let u = block.up.forward(&x).unwrap();
        let folded = block.conv_bn_relu_folded(&u).unwrap().expect("served");
        let composed = block
            .bn
            .forward_relu(&block.conv.forward(&u).unwrap(), false)
            .unwrap();
        assert_eq!(block.forward(&x, false).unwrap().dims(), composed.dims());
        let scale = composed.abs().unwrap().max_all().unwrap();
        let diff = (&folded - &composed)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        let (diff, scale) = (
            diff.to_scalar::<f32>().unwrap(),
            scale.to_scalar::<f32>().unwrap(),
        );
        assert!(scale > 0.1, "the outputs are not all zero: {scale}");
        assert!(
            diff <= 1e-5 * scale,
            "folded against composed: {diff} of {scale}"
        );
        // Some outputs are clipped by the ReLU, some pass.
        let zeros = composed.eq(0f32).unwrap().to_dtype(DType::F32).unwrap();
        let zeros = zeros.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(zeros > 0.05 && zeros < 0.95, "share of zeros {zeros}");
    }
}

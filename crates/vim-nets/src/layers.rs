//! Layers and functions shared by the three architectures, written with candle ops whose
//! gradients are correct (no `max_pool2d`, no fused norms, no `softmax_last_dim`).

use candle_core::{DType, Device, Tensor, Var, D};

use cpu_ops::Kernels;

use crate::params::{Init, Scope};
use crate::Result;

thread_local! {
    static GRAD: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
    static COMPUTE: std::cell::Cell<DType> = const { std::cell::Cell::new(DType::F32) };
}

/// Mixed precision, like PyTorch's autocast: while alive, parameters enter computations in
/// `dtype` (bf16 or f16) and models cast their input to it, so matrix products and convolutions
/// run in that precision; normalisations, softmax, the selective scan and the model output are
/// computed in f32. Weights, gradients and optimiser state stay f32 (the casts are
/// differentiable, so gradients arrive in f32).
pub struct Autocast {
    previous: DType,
}

impl Autocast {
    /// # Errors
    /// For dtypes other than f32, bf16 and f16.
    pub fn new(dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(crate::Error::Config {
                option: "precision",
                value: format!("{dtype:?}"),
                problem: "mixed precision runs in f32, bf16 or f16".into(),
            });
        }
        Ok(Autocast {
            previous: COMPUTE.with(|c| c.replace(dtype)),
        })
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        COMPUTE.with(|c| c.set(self.previous));
    }
}

/// The dtype computations run in on this thread (f32 unless an [`Autocast`] is alive).
pub fn compute_dtype() -> DType {
    COMPUTE.with(|c| c.get())
}

/// Runs `f` on `xs` cast to f32 and casts the result back to the dtype of `xs[0]`: the
/// numerically sensitive steps under [`Autocast`].
pub fn in_f32(xs: &[&Tensor], f: impl FnOnce(&[Tensor]) -> Result<Tensor>) -> Result<Tensor> {
    let dtype = xs[0].dtype();
    let wide = xs
        .iter()
        .map(|x| Ok(x.to_dtype(DType::F32)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(f(&wide)?.to_dtype(dtype)?)
}

/// While alive, parameters enter the computation detached, so no gradient graph is recorded
/// and every intermediate is freed as soon as it is used (PyTorch's `no_grad`). Models use it
/// for evaluation-mode forwards.
pub struct NoGrad(#[allow(dead_code)] GradMode);

impl NoGrad {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        NoGrad(GradMode::set(false))
    }
}

/// Sets whether parameters enter computations with their gradient graph ([`NoGrad`] sets
/// false) until the guard is dropped.
pub(crate) struct GradMode {
    previous: bool,
}

impl GradMode {
    pub(crate) fn set(on: bool) -> Self {
        GradMode {
            previous: GRAD.with(|g| g.replace(on)),
        }
    }

    /// Whether parameters currently enter computations with their graph.
    pub(crate) fn on() -> bool {
        GRAD.with(|g| g.get())
    }
}

impl Drop for GradMode {
    fn drop(&mut self) {
        GRAD.with(|g| g.set(self.previous));
    }
}

/// A parameter as it enters a computation: itself, or detached under [`NoGrad`].
/// Under [`Autocast`] it is cast to the compute dtype.
pub fn p(t: &Tensor) -> Tensor {
    let t = if GRAD.with(|g| g.get()) {
        t.clone()
    } else {
        t.detach()
    };
    let dtype = compute_dtype();
    if t.dtype() == dtype || !t.dtype().is_float() {
        return t;
    }
    // A cast between float dtypes of a valid tensor does not fail.
    t.to_dtype(dtype).unwrap_or(t)
}

/// [`p`] for an optional parameter.
pub fn p_opt(t: &Option<Tensor>) -> Option<Tensor> {
    t.as_ref().map(p)
}

/// `x @ w.T (+ b)` for `x` of any rank ≥ 2 (last axis = features), `w`: (out, in).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let last = *dims.last().expect("linear needs a non-scalar input");
    let rows = x.elem_count() / last.max(1);
    let (out, _) = w.dims2()?;
    let y = x.reshape((rows, last))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims;
    *out_dims.last_mut().expect("non-empty") = out;
    Ok(y.reshape(out_dims)?)
}

/// A `Linear` layer (PyTorch layout, weight `out × in`).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// The kernels that serve this layer (from its [`Scope`]): with a bias, the product and
    /// the bias are one op ([`cpu_ops::linear`]) where they serve the tensors.
    pub kernels: Kernels,
}

impl Linear {
    /// PyTorch's default initialisation (uniform ±1/√in for weight and bias).
    pub fn new(s: &Scope, inp: usize, out: usize, bias: bool) -> Result<Self> {
        Ok(Linear {
            weight: s.param("weight", &[out, inp], Init::FanIn(inp))?,
            bias: if bias {
                Some(s.param("bias", &[out], Init::FanIn(inp))?)
            } else {
                None
            },
            kernels: s.kernels(),
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (p(&self.weight), p_opt(&self.bias));
        if let Some(b) = &b {
            if let Some(y) = cpu_ops::linear(x, &w, b, self.kernels)? {
                return Ok(y);
            }
        }
        linear(x, &w, b.as_ref())
    }

    /// The weight and the bias as computations take them ([`p`]); an error for a layer
    /// without a bias.
    pub(crate) fn weight_bias(&self) -> Result<(Tensor, Tensor)> {
        match &self.bias {
            Some(b) => Ok((p(&self.weight), p(b))),
            None => Err(crate::Error::Config {
                option: "bias",
                value: "none".into(),
                problem: "this path needs a linear layer with a bias".into(),
            }),
        }
    }

    /// `gelu(forward(x))` with the exact (erf) GELU: the product, the bias and the GELU as
    /// one op ([`cpu_ops::linear_gelu`]) where the layer's kernels serve the tensors.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(b) = p_opt(&self.bias) {
            let w = p(&self.weight);
            if let Some(out) = cpu_ops::linear_gelu(x, &w, &b, self.kernels)? {
                return Ok(out);
            }
            return Ok(linear(x, &w, Some(&b))?.gelu_erf()?);
        }
        Ok(self.forward(x)?.gelu_erf()?)
    }
}

fn add_channel_bias(y: Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    Ok(match b {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?,
        None => y,
    })
}

/// A 2-D convolution, `weight` (out, in, k, k). 1×1, 3×3 / stride 1 / padding 1 and
/// non-overlapping (kernel = stride, no padding) convolutions run on [`cpu_ops`] (its kernels
/// on the CPU in f32 as the layer's [`Kernels`] allow, candle's ops otherwise); the rest on
/// candle's conv2d.
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    /// The kernels that serve this layer (from its [`Scope`]).
    pub kernels: Kernels,
}

impl Conv2d {
    pub fn new(
        s: &Scope,
        inp: usize,
        out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Self> {
        let fan_in = inp * kernel * kernel;
        Ok(Conv2d {
            weight: s.param("weight", &[out, inp, kernel, kernel], Init::FanIn(fan_in))?,
            bias: if bias {
                Some(s.param("bias", &[out], Init::FanIn(fan_in))?)
            } else {
                None
            },
            kernel,
            stride,
            padding,
            kernels: s.kernels(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (weight, bias) = (p(&self.weight), p_opt(&self.bias));
        let k = weight.dim(2)?;
        if k == 1 && self.stride == 1 && self.padding == 0 {
            return Ok(cpu_ops::conv1x1(x, &weight, bias.as_ref(), self.kernels)?);
        }
        if k == self.stride && self.padding == 0 && h % k == 0 && w % k == 0 {
            let (b, _, _, _) = x.dims4()?;
            let o = weight.dim(0)?;
            return Ok(patch_tokens(x, self)?
                .reshape((b, h / k, w / k, o))?
                .permute((0, 3, 1, 2))?);
        }
        let y = if k == 3 && self.stride == 1 && self.padding == 1 {
            if let Some(b) = &bias {
                // The bias added in the convolution's output pass: no second map.
                let plain = cpu_ops::Conv3x3Block::new(None, false);
                if let Some(y) = cpu_ops::conv3x3_block(x, &weight, b, plain, self.kernels)? {
                    return Ok(y);
                }
            }
            cpu_ops::conv3x3(x, &weight, self.kernels)?
        } else {
            x.conv2d(&weight, self.padding, self.stride, 1, 1)?
        };
        add_channel_bias(y, bias.as_ref())
    }
}

impl Conv2d {
    /// `relu(conv(InstanceNorm(x)))` (eps 1e-5, no affine parameters): one fused op on the
    /// CPU for a 3×3 / stride 1 / padding 1 convolution with bias
    /// ([`cpu_ops::conv3x3_block`]), composed otherwise.
    pub fn norm_conv_relu(&self, x: &Tensor) -> Result<Tensor> {
        if let (3, 1, 1, Some(bias)) = (self.kernel, self.stride, self.padding, &self.bias) {
            let unit = cpu_ops::Conv3x3Block::torch_em();
            if let Some(y) =
                cpu_ops::conv3x3_block(x, &p(&self.weight), &p(bias), unit, self.kernels)?
            {
                return Ok(y);
            }
        }
        Ok(self.forward(&instance_norm(x, 1e-5)?)?.relu()?)
    }

    /// [`Conv2d::norm_conv_relu`] on the concatenation of `xs` along channels: on the CPU
    /// without writing the concatenation where no gradient is tracked
    /// ([`cpu_ops::conv3x3_block_cat`]).
    pub fn norm_conv_relu_cat(&self, xs: &[&Tensor]) -> Result<Tensor> {
        if let (3, 1, 1, Some(bias)) = (self.kernel, self.stride, self.padding, &self.bias) {
            let unit = cpu_ops::Conv3x3Block::torch_em();
            let (w, b) = (p(&self.weight), p(bias));
            if let Some(y) = cpu_ops::conv3x3_block_cat(xs, &w, &b, unit, self.kernels)? {
                return Ok(y);
            }
        }
        self.norm_conv_relu(&Tensor::cat(xs, 1)?)
    }
}

/// The patch embedding of a ViT / ViM encoder: `conv` (kernel = stride = k, no padding) of
/// (B, C, H, W) as (B, (H/k)·(W/k), D) tokens in row-major grid order: one matrix product of
/// the patch matrix (a hand-written CPU op for it measured slower, see `cpu-ops`).
pub fn patch_tokens(x: &Tensor, conv: &Conv2d) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (weight, bias) = (p(&conv.weight), p_opt(&conv.bias));
    let (d, k) = (weight.dim(0)?, conv.kernel);
    if k == 0 || h % k != 0 || w % k != 0 {
        return Err(crate::Error::Input {
            shape: x.dims().to_vec(),
            problem: format!("not a multiple of the patch size {k}"),
        });
    }
    let (gh, gw) = (h / k, w / k);
    let patches = x
        .reshape((b, c, gh, k, gw, k))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b * gh * gw, c * k * k))?;
    let tokens = linear(&patches, &weight.reshape((d, c * k * k))?, bias.as_ref())?;
    Ok(tokens.reshape((b, gh * gw, d))?)
}

/// `ConvTranspose2d(kernel 2, stride 2)`, weight (in, out, 2, 2)
/// ([`cpu_ops::conv_transpose2x2`]).
#[derive(Debug, Clone)]
pub struct ConvTranspose2x2 {
    pub weight: Tensor,
    pub bias: Tensor,
    /// The kernels that serve this layer (from its [`Scope`]).
    pub kernels: Kernels,
}

impl ConvTranspose2x2 {
    pub fn new(s: &Scope, inp: usize, out: usize) -> Result<Self> {
        // PyTorch computes fan_in of a transposed conv from weight.size(1) = out.
        let fan_in = out * 4;
        Ok(ConvTranspose2x2 {
            weight: s.param("weight", &[inp, out, 2, 2], Init::FanIn(fan_in))?,
            bias: s.param("bias", &[out], Init::FanIn(fan_in))?,
            kernels: s.kernels(),
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (weight, bias) = (p(&self.weight), p(&self.bias));
        Ok(cpu_ops::conv_transpose2x2(x, &weight, &bias, self.kernels)?)
    }
}

/// The mean over the two spatial axes of (B, C, H, W), kept as (B, C, 1, 1). Summing rows
/// first, then the row sums, keeps the f32 rounding error of a 1024² mean near PyTorch's
/// (a single running sum over a million pixels drifts by ~1e-5 relative).
fn spatial_mean(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    Ok((x.sum_keepdim(3)?.sum_keepdim(2)? / (h * w) as f64)?)
}

/// `InstanceNorm2d` without affine parameters (biased variance per sample and channel).
pub fn instance_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    in_f32(&[x], |v| {
        let mean = spatial_mean(&v[0])?;
        let centred = v[0].broadcast_sub(&mean)?;
        let var = spatial_mean(&centred.sqr()?)?;
        Ok(centred.broadcast_div(&(var + eps)?.sqrt()?)?)
    })
}

/// LayerNorm over the last axis, differentiable in x, weight and bias: one op
/// ([`cpu_ops::layer_norm`]) where `kernels` serve the tensors, composed of candle's ops
/// otherwise.
pub fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    kernels: cpu_ops::Kernels,
) -> Result<Tensor> {
    if let Some(y) = cpu_ops::layer_norm(x, w, b, eps, kernels)? {
        return Ok(y);
    }
    in_f32(&[x, w, b], |v| {
        let mean = v[0].mean_keepdim(D::Minus1)?;
        let centred = v[0].broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let y = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
        Ok(y.broadcast_mul(&v[1])?.broadcast_add(&v[2])?)
    })
}

/// RMSNorm over the last axis: `x · rsqrt(mean(x²) + eps) · w`; one op
/// ([`cpu_ops::rms_norm`]) where `kernels` serve the tensors, composed otherwise.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, kernels: cpu_ops::Kernels) -> Result<Tensor> {
    if let Some(y) = cpu_ops::rms_norm(x, w, eps, kernels)? {
        return Ok(y);
    }
    in_f32(&[x, w], |v| {
        let ms = v[0].sqr()?.mean_keepdim(D::Minus1)?;
        Ok(v[0]
            .broadcast_div(&(ms + eps)?.sqrt()?)?
            .broadcast_mul(&v[1])?)
    })
}

/// 2×2 max pooling with stride 2 (exact gradient, unlike candle's `max_pool2d`): one op
/// ([`cpu_ops::max_pool2x2`]) where `kernels` serve x, else a reshape and two max reductions.
pub fn max_pool2(x: &Tensor, kernels: Kernels) -> Result<Tensor> {
    if let Some(y) = cpu_ops::max_pool2x2(x, kernels)? {
        return Ok(y);
    }
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3)?)
}

pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::sigmoid(x)?)
}

/// Bilinear resize of (B, C, H, W) to (B, C, out_h, out_w), differentiable (unlike candle's
/// `upsample_bilinear2d`): [`cpu_ops::resize_bilinear`].
pub fn resize_bilinear(
    x: &Tensor,
    out_h: usize,
    out_w: usize,
    antialias: bool,
    kernels: Kernels,
) -> Result<Tensor> {
    Ok(cpu_ops::resize_bilinear(
        x, out_h, out_w, antialias, kernels,
    )?)
}

/// torch-em's `ConvBlock2d`: InstanceNorm → 3×3 conv → ReLU → InstanceNorm → 3×3 conv → ReLU
/// (keys `block.1`, `block.4`).
#[derive(Debug, Clone)]
pub struct ConvBlock {
    pub conv1: Conv2d,
    pub conv2: Conv2d,
}

impl ConvBlock {
    pub fn new(s: &Scope, inp: usize, out: usize) -> Result<Self> {
        let b = s.pp("block");
        Ok(ConvBlock {
            conv1: Conv2d::new(&b.pp(1), inp, out, 3, 1, 1, true)?,
            conv2: Conv2d::new(&b.pp(4), out, out, 3, 1, 1, true)?,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv1.norm_conv_relu(x)?;
        self.conv2.norm_conv_relu(&y)
    }

    /// The block on [`crop_concat`]`(x, skip)`: a decoder level.
    pub fn forward_skip(&self, x: &Tensor, skip: &Tensor) -> Result<Tensor> {
        self.forward_cat(x, &crop_like(skip, x)?)
    }

    /// The block on `cat[x, y]` along channels (without writing the concatenation where no
    /// gradient is tracked: [`Conv2d::norm_conv_relu_cat`]).
    pub fn forward_cat(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let mid = self.conv1.norm_conv_relu_cat(&[x, y])?;
        self.conv2.norm_conv_relu(&mid)
    }

    /// Whether [`ConvBlock::backward_cat`] serves the block on `cat[a, b]`: both units fused
    /// on the crate's CPU kernels in f32, and `a` and `b` of one size.
    pub(crate) fn by_hand_serves(&self, a: &Tensor, b: &Tensor) -> Result<bool> {
        let unit =
            |c: &Conv2d| (c.kernel, c.stride, c.padding, c.bias.is_some()) == (3, 1, 1, true);
        let k = self.conv1.kernels;
        Ok(k.serve(a)
            && k.serve(b)
            && compute_dtype() == DType::F32
            && unit(&self.conv1)
            && unit(&self.conv2)
            && a.dims()[2..] == b.dims()[2..])
    }

    /// The block's inside on `cat[a, b]` without a graph (so the concatenation is not
    /// written): the first unit's output and the block's output.
    pub(crate) fn recompute_cat(&self, a: &Tensor, b: &Tensor) -> Result<[Tensor; 2]> {
        let mid = self.conv1.norm_conv_relu_cat(&[a, b])?;
        let top = self.conv2.norm_conv_relu(&mid)?;
        Ok([mid, top])
    }

    /// The block's backward pass on `cat[a, b]` written by hand, from `a`, `b`, the
    /// recomputed first unit's output and `g_top`, the gradient of the block's output with
    /// its ReLU already applied: the gradients of `a` and `b` (tensors of their own) and of
    /// the parameters. Each unit's ReLU is applied to the gradient before its convolution's
    /// gradients are taken, so that each map goes as soon as it can.
    pub(crate) fn backward_cat(
        &self,
        a: &Tensor,
        b: &Tensor,
        mid: Tensor,
        g_top: Tensor,
    ) -> Result<crate::checkpoint::HandGrads> {
        let k = self.conv1.kernels;
        let missing = || crate::checkpoint::unserved(k, "a conv block");
        let bias = |c: &Conv2d| c.bias.clone().ok_or_else(missing);
        let unit = cpu_ops::Conv3x3Block::new(cpu_ops::Conv3x3Block::torch_em().norm_eps, false);
        let (c1, c2) = (&self.conv1, &self.conv2);
        let mut second = cpu_ops::conv3x3_block_vjp(&mid, &c2.weight, unit, &mid, &g_top, true, k)?
            .ok_or_else(missing)?;
        drop(g_top);
        let g_mid = second.input.take().ok_or_else(missing)?;
        cpu_ops::relu_vjp_in_place(&g_mid, &mid)?;
        drop(mid);
        let first =
            cpu_ops::conv3x3_block_cat_vjp(&[a, b], &c1.weight, unit, &g_mid, &g_mid, true, k)?
                .ok_or_else(missing)?;
        Ok((
            first.inputs.into_iter().map(Some).collect(),
            vec![
                (c1.weight.clone(), first.weight),
                (bias(c1)?, first.bias),
                (c2.weight.clone(), second.weight),
                (bias(c2)?, second.bias),
            ],
        ))
    }

    /// The block on `cat[a, b]` in a training forward with its backward pass written by hand
    /// ([`ConvBlock::backward_cat`]), keeping its inputs, its output and its first unit's
    /// output (not under checkpointing); `None` where that does not serve (see
    /// [`crate::checkpoint::by_hand`]).
    pub(crate) fn forward_cat_by_hand(
        &self,
        a: &Tensor,
        b: &Tensor,
        stash: Option<&crate::checkpoint::Stash>,
    ) -> Result<Option<Tensor>> {
        if !self.by_hand_serves(a, b)? {
            return Ok(None);
        }
        let (fwd, bwd) = (self.clone(), self.clone());
        crate::checkpoint::by_hand(
            &[a, b],
            stash,
            move |xs| {
                let [mid, top] = fwd.recompute_cat(&xs[0], &xs[1])?;
                Ok((top, vec![mid]))
            },
            std::sync::Arc::new(move |mut saved, g| {
                // The block's output is the op's; its first unit's output as the forward kept
                // it (recomputed under activation checkpointing).
                let [mid] = saved
                    .inside_or(|xs| Ok([bwd.conv1.norm_conv_relu_cat(&[&xs[0], &xs[1]])?]))?;
                let g_top = cpu_ops::relu_vjp(g, &saved.out)?;
                let (a, b) = (&saved.xs[0], &saved.xs[1]);
                bwd.backward_cat(a, b, mid, g_top)
            }),
        )
    }
}

/// `BatchNorm2d` (affine, running statistics with momentum 0.1, eps 1e-5).
#[derive(Debug, Clone)]
pub struct BatchNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Var,
    pub running_var: Var,
    pub kernels: Kernels,
}

impl BatchNorm {
    pub fn new(s: &Scope, c: usize) -> Result<Self> {
        Ok(BatchNorm {
            weight: s.param("weight", &[c], Init::Ones)?,
            bias: s.param("bias", &[c], Init::Zeros)?,
            running_mean: s.buffer("running_mean", &[c], Init::Zeros)?,
            running_var: s.buffer("running_var", &[c], Init::Ones)?,
            kernels: s.kernels(),
        })
    }

    /// In training the batch statistics normalise and update the running ones (unbiased
    /// variance, momentum 0.1); in evaluation the running statistics normalise.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // Statistics in f32 under mixed precision.
        let dtype = x.dtype();
        let x = &x.to_dtype(DType::F32)?;
        let (b, c, h, w) = x.dims4()?;
        let shape = (1, c, 1, 1);
        let (mean, var) = if train {
            let flat = x.transpose(0, 1)?.reshape((c, b * h * w))?;
            let mean = flat.mean_keepdim(1)?;
            let centred = flat.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean_keepdim(1)?;
            let n = (b * h * w) as f64;
            let unbiased = if n > 1.0 {
                (var.detach() * (n / (n - 1.0)))?
            } else {
                var.detach()
            };
            if !crate::checkpoint::recomputing() {
                self.update_running(&mean, &unbiased)?;
            }
            (mean.reshape(shape)?, var.reshape(shape)?)
        } else {
            (
                self.running_mean.as_tensor().detach().reshape(shape)?,
                self.running_var.as_tensor().detach().reshape(shape)?,
            )
        };
        let y = x
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        let weight = p(&self.weight).to_dtype(DType::F32)?;
        let bias = p(&self.bias).to_dtype(DType::F32)?;
        Ok(y.broadcast_mul(&weight.reshape(shape)?)?
            .broadcast_add(&bias.reshape(shape)?)?
            .to_dtype(dtype)?)
    }

    /// `relu(forward(x))`. In training on the CPU in f32 this is
    /// [`cpu_ops::batch_norm_train`] (its backward is written by hand and keeps only `x`);
    /// elsewhere a segment of the composed layer.
    pub fn forward_relu(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            let (weight, bias) = (p(&self.weight), p(&self.bias));
            if let Some(y) = cpu_ops::batch_norm_train(x, &weight, &bias, 1e-5, true, self.kernels)?
            {
                if !crate::checkpoint::recomputing() {
                    let (mean, unbiased) = match cpu_ops::batch_statistics(x, self.kernels)? {
                        Some(moments) => moments,
                        None => {
                            let (b, c, h, w) = x.dims4()?;
                            let flat = x.detach().transpose(0, 1)?.reshape((c, b * h * w))?;
                            let mean = flat.mean_keepdim(1)?;
                            let var = flat.broadcast_sub(&mean)?.sqr()?.mean_keepdim(1)?;
                            let n = (b * h * w) as f64;
                            let unbiased = if n > 1.0 {
                                (var * (n / (n - 1.0)))?
                            } else {
                                var
                            };
                            (mean, unbiased)
                        }
                    };
                    self.update_running(&mean, &unbiased)?;
                }
                return Ok(y);
            }
        }
        let bn = self.clone();
        crate::checkpoint::segment(x, move |x| Ok(bn.forward(x, train)?.relu()?))
    }

    /// The evaluation form folded into the convolution before it: `relu(bn(conv(x; w) + b))`
    /// is `relu(conv(x; w·s) + (b − mean)·s + β)` with `s = γ / √(running var + eps)` per
    /// output channel, so the normalised map is never written apart from the convolution's
    /// output. The folded weight (out, …) and bias (out), in f32.
    pub fn folded_into(&self, weight: &Tensor, bias: &Tensor) -> Result<(Tensor, Tensor)> {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let var = f32(&self.running_var.as_tensor().detach())?;
        let mean = f32(&self.running_mean.as_tensor().detach())?;
        let scale = f32(&p(&self.weight))?.div(&(var + 1e-5)?.sqrt()?)?;
        let rest = vec![1; weight.rank().saturating_sub(1)];
        let shape: Vec<usize> = [scale.elem_count()].into_iter().chain(rest).collect();
        let w = f32(weight)?.broadcast_mul(&scale.reshape(shape)?)?;
        let b = ((f32(bias)? - mean)? * scale)?.add(&f32(&p(&self.bias))?)?;
        Ok((w, b))
    }

    /// Momentum 0.1 towards the batch's mean and unbiased variance.
    fn update_running(&self, mean: &Tensor, unbiased: &Tensor) -> Result<()> {
        let m = 0.1;
        let new_mean =
            ((self.running_mean.as_tensor() * (1.0 - m))? + (mean.detach().flatten_all()? * m)?)?;
        let new_var =
            ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased.flatten_all()? * m)?)?;
        self.running_mean.set(&new_mean)?;
        self.running_var.set(&new_var)?;
        Ok(())
    }
}

/// An ×2 upsampler: transposed conv (key `block`) or bilinear + 1×1 conv (key `conv`).
#[derive(Debug, Clone)]
pub enum Upsampler {
    Transposed(ConvTranspose2x2),
    Bilinear(Conv2d),
}

impl Upsampler {
    pub fn new(s: &Scope, inp: usize, out: usize, transposed: bool) -> Result<Self> {
        Ok(if transposed {
            Upsampler::Transposed(ConvTranspose2x2::new(&s.pp("block"), inp, out)?)
        } else {
            Upsampler::Bilinear(Conv2d::new(&s.pp("conv"), inp, out, 1, 1, 0, true)?)
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Upsampler::Transposed(t) => t.forward(x),
            Upsampler::Bilinear(c) => {
                // torch-em resizes, then applies the 1×1 conv; both are linear and act on
                // different axes (the resize's weights sum to one, so the bias passes through
                // too), so the conv runs first, on a quarter of the pixels, and the resize on
                // the conv's fewer channels. Same values up to f32 rounding.
                let (_, _, h, w) = x.dims4()?;
                resize_bilinear(&c.forward(x)?, 2 * h, 2 * w, false, c.kernels)
            }
        }
    }
}

/// torch-em's `Decoder._crop`: centre-crop `skip` to `like`'s shape in every axis (channels
/// included), then `cat[x, skip]` along channels.
pub fn crop_concat(x: &Tensor, skip: &Tensor) -> Result<Tensor> {
    Ok(Tensor::cat(&[x, &crop_like(skip, x)?], 1)?)
}

/// `skip` cropped to `x`'s shape on every axis where it is larger (centred), as
/// [`crop_concat`] crops it.
pub fn crop_like(skip: &Tensor, x: &Tensor) -> Result<Tensor> {
    let mut s = skip.clone();
    for (axis, (&have, &want)) in skip.dims().iter().zip(x.dims()).enumerate() {
        if have != want {
            let off = (have - want) / 2;
            s = s.narrow(axis, off, have - 2 * off)?;
        }
    }
    Ok(s)
}

/// Stochastic depth: each sample's branch is dropped with probability `p` and the kept ones
/// scaled by 1/(1-p). `keep` holds one uniform draw per sample.
pub fn drop_path(x: &Tensor, p: f64, draws: &[f64]) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let b = x.dim(0)?;
    let mask: Vec<f32> = (0..b)
        .map(|i| {
            if draws[i] >= p {
                (1.0 / (1.0 - p)) as f32
            } else {
                0.0
            }
        })
        .collect();
    let mut shape = vec![b];
    shape.extend(std::iter::repeat_n(1, x.rank() - 1));
    let mask = Tensor::from_vec(mask, shape, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_mul(&mask)?)
}

/// A constant f32 tensor.
pub fn constant(values: Vec<f32>, shape: &[usize], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(values, shape, dev)?.to_dtype(DType::F32)?)
}

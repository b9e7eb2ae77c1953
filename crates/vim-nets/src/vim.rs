//! The Vision Mamba encoder with bidirectional ("v2") Mamba mixers.

use std::sync::Mutex;

use candle_core::Tensor;

use crate::checkpoint::{detail, maybe, segment, stage, Stash};
use crate::layers::{drop_path, p as param, rms_norm, Conv2d};
use crate::params::{model_rng, Init, Rng, Scope};
use crate::Result;

/// Which Vim code the encoder follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VimPreset {
    /// The code behind the paper's numbers (hustvl/Vim 1b0df4d): class token first, RoPE on
    /// hidden states and residual before every layer, the two directions summed.
    Paper,
    /// torch-em's current wrapper: class token in the middle (and token 0 dropped anyway),
    /// no RoPE, the two directions halved.
    TorchEmCurrent,
}

/// The encoder's hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VimConfig {
    pub embed_dim: usize,
    pub depth: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub expand: usize,
    pub patch_size: usize,
    pub num_classes: usize,
    pub drop_path_rate: f64,
    pub preset: VimPreset,
}

impl VimConfig {
    pub fn tiny(preset: VimPreset) -> Self {
        Self::with_width(192, preset)
    }
    pub fn small(preset: VimPreset) -> Self {
        Self::with_width(384, preset)
    }
    fn with_width(embed_dim: usize, preset: VimPreset) -> Self {
        VimConfig {
            embed_dim,
            depth: 24,
            d_state: 16,
            d_conv: 4,
            expand: 2,
            patch_size: 16,
            num_classes: 1000,
            drop_path_rate: 0.1,
            preset,
        }
    }
    pub fn dt_rank(&self) -> usize {
        self.embed_dim.div_ceil(16)
    }
}

/// The mixer's causal depthwise conv1d with bias, then SiLU: x (B, E, L), the parameters
/// weight (E, 1, k) and bias (E) → (B, E, L); with `reverse`, backwards in time (the backward
/// direction's conv on the unflipped tokens: flip, conv, flip). One op
/// ([`cpu_ops::causal_conv1d_silu`] or its reversed form) where `kernels` serve the tensors;
/// otherwise (and as the benchmarks' baseline) k shifted products of candle's ops, as a
/// segment, between flips when reversed.
pub fn causal_conv_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    kernels: cpu_ops::Kernels,
    reverse: bool,
) -> Result<Tensor> {
    let fused = if reverse {
        cpu_ops::causal_conv1d_silu_reversed(x, &param(weight), &param(bias), kernels)?
    } else {
        cpu_ops::causal_conv1d_silu(x, &param(weight), &param(bias), kernels)?
    };
    if let Some(u) = fused {
        return Ok(u);
    }
    if reverse {
        let y = causal_conv_silu(&x.flip(&[2])?, weight, bias, kernels, false)?;
        return Ok(y.flip(&[2])?);
    }
    let (_, e, l) = x.dims3()?;
    let (weight, bias) = (weight.clone(), bias.clone());
    // The parameters are taken inside the segment, so that its recomputation sees them.
    segment(x, move |x| {
        let (weight, bias) = (param(&weight), param(&bias));
        let k = weight.dim(2)?;
        let xp = x.pad_with_zeros(2, k - 1, 0)?;
        let w = weight.reshape((e, k))?;
        let mut acc = bias
            .reshape((1, e, 1))?
            .broadcast_as(x.dims())?
            .contiguous()?;
        for j in 0..k {
            let wj = w.narrow(1, j, 1)?.reshape((1, e, 1))?;
            acc = (acc + xp.narrow(2, j, l)?.broadcast_mul(&wj)?)?;
        }
        Ok(acc.silu()?)
    })
}

#[derive(Debug, Clone)]
struct Direction {
    conv_w: Tensor,
    conv_b: Tensor,
    x_proj: Tensor,
    dt_w: Tensor,
    dt_b: Tensor,
    a_log: Tensor,
    d: Tensor,
}

/// One bidirectional v2 Mamba mixer (keys as in Vim: `in_proj`, `conv1d`, `x_proj`,
/// `dt_proj`, `A_log`, `D`, the `_b` copies, `out_proj`).
#[derive(Debug, Clone)]
pub struct Mixer {
    in_proj: Tensor,
    fwd: Direction,
    bwd: Direction,
    out_proj: Tensor,
    dt_rank: usize,
    d_state: usize,
    halve: bool,
    kernels: cpu_ops::Kernels,
}

impl Mixer {
    /// Parameters with the paper-era initialisation (Mamba's own init, then Vim's
    /// `segm_init_weights` and `_init_weights(n_layer)`).
    pub fn new(s: &Scope, d_model: usize, cfg: &VimConfig, halve: bool) -> Result<Self> {
        let e = cfg.expand * d_model;
        let n = cfg.d_state;
        let r = d_model.div_ceil(16);
        let k = cfg.d_conv;
        let a_init: Vec<f32> = (0..e)
            .flat_map(|_| (0..n).map(|i| ((i + 1) as f32).ln()))
            .collect();
        let dir = |conv: &str, xp: &str, dt: &str, a: &str, dd: &str| -> Result<Direction> {
            Ok(Direction {
                conv_w: s.pp(conv).param("weight", &[e, 1, k], Init::FanIn(k))?,
                conv_b: s.pp(conv).param("bias", &[e], Init::FanIn(k))?,
                x_proj: s
                    .pp(xp)
                    .param("weight", &[r + 2 * n, e], Init::TruncNormal(0.02))?,
                dt_w: s.pp(dt).param("weight", &[e, r], Init::TruncNormal(0.02))?,
                dt_b: s.pp(dt).param("bias", &[e], Init::Zeros)?,
                a_log: s.param(a, &[e, n], Init::Values(a_init.clone()))?,
                d: s.param(dd, &[e], Init::Ones)?,
            })
        };
        let in_proj =
            s.pp("in_proj")
                .param("weight", &[2 * e, d_model], Init::TruncNormal(0.02))?;
        let fwd = dir("conv1d", "x_proj", "dt_proj", "A_log", "D")?;
        let bwd = dir("conv1d_b", "x_proj_b", "dt_proj_b", "A_b_log", "D_b")?;
        let bound = 1.0 / (e as f64).sqrt() / (cfg.depth as f64).sqrt();
        let out_proj =
            s.pp("out_proj")
                .param("weight", &[d_model, e], Init::Uniform(-bound, bound))?;
        Ok(Mixer {
            in_proj,
            fwd,
            bwd,
            out_proj,
            dt_rank: r,
            d_state: n,
            halve,
            kernels: s.kernels(),
        })
    }

    /// One direction on x, z: (B, E, L); `reverse` for the backward direction, which runs its
    /// conv and scan backwards in time on the tokens in their order (no flipped copies).
    fn direction(&self, p: &Direction, x: &Tensor, z: &Tensor, reverse: bool) -> Result<Tensor> {
        let u = causal_conv_silu(x, &p.conv_w, &p.conv_b, self.kernels, reverse)?;
        detail("Mamba: causal conv1d + SiLU");
        let p = &Direction {
            conv_w: param(&p.conv_w),
            conv_b: param(&p.conv_b),
            x_proj: param(&p.x_proj),
            dt_w: param(&p.dt_w),
            dt_b: param(&p.dt_b),
            a_log: param(&p.a_log),
            d: param(&p.d),
        };
        let (r, n) = (self.dt_rank, self.d_state);
        // The projections multiply from the left, so that their outputs come out in the scan's
        // (B, channels, L) layout with no transposed copies.
        let x_dbl = p.x_proj.broadcast_matmul(&u)?; // (B, R + 2N, L)
        let delta = p.dt_w.broadcast_matmul(&x_dbl.narrow(1, 0, r)?)?; // (B, E, L)
        let bm = x_dbl.narrow(1, r, n)?.contiguous()?;
        let cm = x_dbl.narrow(1, r + n, n)?.contiguous()?;
        let a = p.a_log.exp()?.neg()?;
        let z = z.contiguous()?;
        detail("Mamba: x/dt projections");
        let scan = if reverse {
            vim_scan::selective_scan_reversed
        } else {
            vim_scan::selective_scan
        };
        let y = scan(
            &u,
            &delta,
            &a,
            &bm,
            &cm,
            Some(&p.d),
            Some(&z),
            Some(&p.dt_b),
            true,
        )?;
        detail("Mamba: selective scans");
        Ok(y)
    }

    /// (B, L, D) → (B, L, D). Between the two projections the mixer is a segment: training
    /// keeps the in-projection's output and the directions' sum, and recomputes the
    /// convolutions, projections and scans in the backward pass (whose scan recomputes its
    /// states anyway).
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        // The in projection from the left gives x and z in the scans' (B, 2E, L) layout; the out
        // projection reads the directions' sum through a transposed view: no transposed copies.
        let xz = param(&self.in_proj).broadcast_matmul(&h.transpose(1, 2)?)?; // (B, 2E, L)
        detail("Mamba: in projection");
        let mixer = self.clone();
        let y = segment(&xz, move |xz| mixer.directions(xz))?; // (B, E, L)
        detail("Mamba: x/z split, direction sum");
        let out = y
            .transpose(1, 2)?
            .broadcast_matmul(&param(&self.out_proj).t()?);
        detail("Mamba: out projection");
        Ok(out?)
    }

    /// (B, 2E, L) → the directions' sum (B, E, L).
    fn directions(&self, xz: &Tensor) -> Result<Tensor> {
        let e = self.in_proj.dim(0)? / 2;
        let x = xz.narrow(1, 0, e)?.contiguous()?;
        let z = xz.narrow(1, e, e)?.contiguous()?;
        detail("Mamba: x/z split, direction sum");
        let yf = self.direction(&self.fwd, &x, &z, false)?;
        let yb = self.direction(&self.bwd, &x, &z, true)?;
        let mut y = (yf + yb)?;
        if self.halve {
            y = (y * 0.5)?;
        }
        Ok(y)
    }
}

/// The 2-D RoPE tables of Vim (`VisionRotaryEmbeddingFast(dim = D/2, pt_seq_len = 14,
/// ft_seq_len = grid)`): (grid², D) cosines and sines.
pub fn rope_tables(embed_dim: usize, grid: usize) -> (Vec<f32>, Vec<f32>) {
    let dim = embed_dim / 2;
    let freqs: Vec<f32> = (0..dim / 2)
        .map(|k| 1.0 / 10000f32.powf((2 * k) as f32 / dim as f32))
        .collect();
    let pos: Vec<f32> = (0..grid).map(|i| i as f32 / grid as f32 * 14.0).collect();
    let mut cos = Vec::with_capacity(grid * grid * embed_dim);
    let mut sin = Vec::with_capacity(grid * grid * embed_dim);
    for i in 0..grid {
        for j in 0..grid {
            for p in [pos[i], pos[j]] {
                for f in &freqs {
                    let a = p * f;
                    for _ in 0..2 {
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                }
            }
        }
    }
    (cos, sin)
}

/// Applies RoPE to tokens (B, L, D) whose last `cos.dims()[0]` tokens are the patches, composed
/// of candle's ops (the form [`cpu_ops::rope`] is tested against).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, l, d) = x.dims3()?;
    let n = cos.dim(0)?;
    let head = l - n;
    let t = x.narrow(1, head, n)?;
    let pairs = t.reshape((b, n, d / 2, 2))?;
    let x0 = pairs.narrow(3, 0, 1)?;
    let x1 = pairs.narrow(3, 1, 1)?;
    let rot = Tensor::cat(&[&x1.neg()?, &x0], 3)?.reshape((b, n, d))?;
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    let y = (t.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?;
    if head == 0 {
        Ok(y)
    } else {
        Ok(Tensor::cat(&[&x.narrow(1, 0, head)?, &y], 1)?)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    norm: Tensor,
    mixer: Mixer,
    drop: f64,
}

impl Layer {
    /// RMSNorm → mixer on the residual stream. The norm is one op where the kernels serve the
    /// tensors (its graph keeps only the input and the weight), else composed as a segment.
    fn mix(&self, r: &Tensor) -> Result<Tensor> {
        let kernels = self.mixer.kernels;
        let h = if kernels.serve_all(&[r, &self.norm]) {
            rms_norm(r, &param(&self.norm), 1e-5, kernels)?
        } else {
            let norm = self.norm.clone();
            segment(r, move |r| rms_norm(r, &param(&norm), 1e-5, kernels))?
        };
        detail("Mamba: RoPE, residual, RMSNorm");
        self.mixer.forward(&h)
    }
}

/// The Vision Mamba encoder.
#[derive(Debug)]
pub struct VimEncoder {
    patch_embed: Conv2d,
    cls_token: Tensor,
    pos_embed: Tensor,
    layers: Vec<Layer>,
    norm_f: Tensor,
    final_drop: f64,
    rope: Option<(Tensor, Tensor)>,
    preset: VimPreset,
    grid: usize,
    patch: usize,
    rng: Mutex<Rng>,
    kernels: cpu_ops::Kernels,
}

impl VimEncoder {
    /// `grid`: tokens per side (1024 / 16 = 64 for the paper's canvas).
    pub fn new(s: &Scope, cfg: &VimConfig, in_chans: usize, grid: usize) -> Result<Self> {
        let d = cfg.embed_dim;
        let p = cfg.patch_size;
        let patch_embed = Conv2d::new(&s.pp("patch_embed").pp("proj"), in_chans, d, p, p, 0, true)?;
        let cls_token = s.param("cls_token", &[1, 1, d], Init::Zeros)?;
        let pos_embed = s.param(
            "pos_embed",
            &[1, grid * grid + 1, d],
            Init::TruncNormal(0.02),
        )?;
        let halve = cfg.preset == VimPreset::TorchEmCurrent;
        // Stochastic depth: layer i uses [0] + linspace(0, rate, depth) at index i.
        let dpr: Vec<f64> = (0..cfg.depth)
            .map(|i| {
                if cfg.depth > 1 {
                    cfg.drop_path_rate * i as f64 / (cfg.depth - 1) as f64
                } else {
                    0.0
                }
            })
            .collect();
        let mut layers = Vec::new();
        for i in 0..cfg.depth {
            let ls = s.pp("layers").pp(i);
            layers.push(Layer {
                norm: ls.pp("norm").param("weight", &[d], Init::Ones)?,
                mixer: Mixer::new(&ls.pp("mixer"), d, cfg, halve)?,
                drop: if i == 0 { 0.0 } else { dpr[i - 1] },
            });
        }
        let norm_f = s.pp("norm_f").param("weight", &[d], Init::Ones)?;
        // The classification head: built (counted, loaded) but unused, as in torch-em.
        let head = s.pp("head");
        head.param("weight", &[cfg.num_classes, d], Init::TruncNormal(0.02))?;
        head.param("bias", &[cfg.num_classes], Init::Zeros)?;
        let rope = if cfg.preset == VimPreset::Paper {
            let (c, sn) = rope_tables(d, grid);
            Some((
                Tensor::from_vec(c, (grid * grid, d), s.device())?,
                Tensor::from_vec(sn, (grid * grid, d), s.device())?,
            ))
        } else {
            None
        };
        let seed = s.with_rng(|r| r.next_u64());
        Ok(VimEncoder {
            patch_embed,
            cls_token,
            pos_embed,
            layers,
            norm_f,
            final_drop: cfg.drop_path_rate,
            rope,
            preset: cfg.preset,
            grid,
            patch: p,
            rng: Mutex::new(model_rng(seed)),
            kernels: s.kernels(),
        })
    }

    /// Restarts the stochastic-depth generator from `seed`.
    pub fn reseed(&self, seed: u64) {
        *self.rng.lock().unwrap_or_else(|e| e.into_inner()) = model_rng(seed);
    }

    fn drop(&self, x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
        if !train || p <= 0.0 {
            return Ok(x.clone());
        }
        let b = x.dim(0)?;
        let draws: Vec<f64> = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            (0..b).map(|_| rng.uniform()).collect()
        };
        drop_path(x, p, &draws)
    }

    /// (B, 3, S, S) → (B, D, S/16, S/16).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_checkpointed(x, train, None)
    }

    /// [`VimEncoder::forward`] with each layer's norm and mixer checkpointed when `stash` is
    /// given (stochastic depth acts outside them, on the residual stream).
    pub fn forward_checkpointed(
        &self,
        x: &Tensor,
        train: bool,
        stash: Option<&Stash>,
    ) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let (gh, gw) = (h / self.patch, w / self.patch);
        if gh != self.grid || gw != self.grid {
            return Err(crate::Error::Input {
                shape: x.dims().to_vec(),
                problem: format!(
                    "the encoder's canvas is {0}×{0} tokens, the input gives {gh}×{gw}",
                    self.grid
                ),
            });
        }
        let d = self.norm_f.dim(0)?;
        let n = gh * gw;
        let tokens = crate::layers::patch_tokens(x, &self.patch_embed)?;
        let cls = param(&self.cls_token).broadcast_as((b, 1, d))?;
        let cls_at = match self.preset {
            VimPreset::Paper => 0,
            VimPreset::TorchEmCurrent => n / 2,
        };
        let t = Tensor::cat(
            &[
                &tokens.narrow(1, 0, cls_at)?,
                &cls,
                &tokens.narrow(1, cls_at, n - cls_at)?,
            ],
            1,
        )?
        .broadcast_add(&param(&self.pos_embed))?;
        stage("patch embedding");
        let mut hidden = t;
        let mut residual: Option<Tensor> = None;
        for layer in &self.layers {
            if let Some((cos, sin)) = &self.rope {
                // One op where the kernels serve the tensors, else a segment: the rotation's
                // pieces are not kept for the backward pass.
                let rope = |x: &Tensor| -> Result<Tensor> {
                    if let Some(y) = cpu_ops::rope(x, cos, sin, self.kernels)? {
                        return Ok(y);
                    }
                    let (cos, sin) = (cos.clone(), sin.clone());
                    segment(x, move |x| apply_rope(x, &cos, &sin))
                };
                hidden = rope(&hidden)?;
                if let Some(r) = &residual {
                    residual = Some(rope(r)?);
                }
            }
            let r = match residual {
                None => hidden.clone(),
                Some(r) => (r + self.drop(&hidden, layer.drop, train)?)?,
            };
            hidden = maybe(&r, stash, layer, Layer::mix)?;
            residual = Some(r);
            stage("Mamba layer");
        }
        let r = match residual {
            Some(r) => (r + self.drop(&hidden, self.final_drop, train)?)?,
            None => hidden,
        };
        let out = rms_norm(&r, &param(&self.norm_f), 1e-5, self.kernels)?;
        // torch-em drops token 0 in both presets (the class token only in `paper`).
        let out = out.narrow(1, 1, n)?;
        Ok(out
            .reshape((b, gh, gw, d))?
            .permute((0, 3, 1, 2))?
            .contiguous()?)
    }
}

//! The SAM ViT image encoder (as torch-em's `ViT_Sam` uses it: the neck is built but not
//! applied).

use std::sync::Arc;

use candle_core::{DType, Tensor, D};

use crate::checkpoint::{
    by_hand, detail, maybe, segment, stage, unserved, HandGrads, Saved, Stash,
};
use crate::layers::{compute_dtype, layer_norm, p, Conv2d, GradMode, Linear};
use crate::params::{Init, Scope};
use crate::Result;

/// The SAM ViT's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SamConfig {
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub global_attn_indexes: Vec<usize>,
    pub window_size: usize,
    pub patch_size: usize,
    pub mlp_ratio: usize,
    /// The output channels of the (unused) neck (SAM: 256).
    pub neck_chans: usize,
}

impl SamConfig {
    pub fn vit_b() -> Self {
        Self::sam(768, 12, 12, vec![2, 5, 8, 11])
    }
    pub fn vit_l() -> Self {
        Self::sam(1024, 24, 16, vec![5, 11, 17, 23])
    }
    pub fn vit_h() -> Self {
        Self::sam(1280, 32, 16, vec![7, 15, 23, 31])
    }
    fn sam(embed_dim: usize, depth: usize, num_heads: usize, global: Vec<usize>) -> Self {
        SamConfig {
            embed_dim,
            depth,
            num_heads,
            global_attn_indexes: global,
            window_size: 14,
            patch_size: 16,
            mlp_ratio: 4,
            neck_chans: 256,
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
    heads: usize,
    kernels: cpu_ops::Kernels,
}

/// `index[i·k + j] = i − j + k − 1`: the relative-position rows for a q × k grid axis.
fn rel_pos_rows(table: &Tensor, size: usize) -> Result<Tensor> {
    let (rows, hd) = table.dims2()?;
    if rows != 2 * size - 1 {
        return Err(crate::Error::Config {
            option: "relative position table rows",
            value: rows.to_string(),
            problem: format!("a {size}-token axis needs {}", 2 * size - 1),
        });
    }
    let idx: Vec<u32> = (0..size)
        .flat_map(|i| (0..size).map(move |j| (i + size - 1 - j) as u32))
        .collect();
    let idx = Tensor::from_vec(idx, size * size, table.device())?;
    Ok(table.index_select(&idx, 0)?.reshape((size, size, hd))?)
}

/// For `windows` windows of `(wh, ww)` tokens cut from images of `(h, w)` tokens (in
/// [`partition`]'s order) and `heads` heads each, the rows × columns of each window and head
/// that lie on the image, not its padding.
pub fn window_queries(
    windows: usize,
    (wh, ww): (usize, usize),
    (h, w): (usize, usize),
    heads: usize,
) -> Vec<(usize, usize)> {
    let (nh, nw) = (h.div_ceil(wh), w.div_ceil(ww));
    (0..windows)
        .flat_map(|i| {
            let (wy, wx) = ((i / nw) % nh, i % nw);
            let rect = ((h - wy * wh).min(wh), (w - wx * ww).min(ww));
            std::iter::repeat_n(rect, heads)
        })
        .collect()
}

/// At most this many bytes of one attention matrix (all images, a chunk of heads) at a time.
const ATTENTION_CHUNK_BYTES: usize = 128 << 20;

impl Attention {
    /// x: (B, h, w, D) → (B, h, w, D): qkv, [`attention`], the output projection.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(&self.heads(&self.qkv.forward(x)?, None)?)
    }

    /// qkv (B, h, w, 3D) → [`attention`]'s output (B, h, w, D), before the projection; for
    /// windows, `image` is the (height, width) of the token grid they were cut from: the
    /// queries on its padding are not computed.
    ///
    /// Where the kernels serve the tensors this is one op on the tokens as they are
    /// ([`cpu_ops::rel_pos_attention`]), the decomposed bias computed inside it.
    fn heads(&self, qkv: &Tensor, image: Option<(usize, usize)>) -> Result<Tensor> {
        let (b, h, w, d3) = qkv.dims4()?;
        let d = d3 / 3;
        let queries = image.map(|image| window_queries(b, (h, w), image, self.heads));
        let scale = self.scale(d);
        let (th, tw) = (p(&self.rel_pos_h), p(&self.rel_pos_w));
        let q = queries.as_deref();
        if let Some(y) =
            cpu_ops::rel_pos_attention(qkv, &th, &tw, self.heads, scale, q, self.kernels)?
        {
            return Ok(y);
        }
        let qkv = qkv.reshape((b, h * w, 3, self.heads, d / self.heads))?;
        let y = attention(
            &qkv,
            &p(&self.rel_pos_h),
            &p(&self.rel_pos_w),
            (h, w),
            queries.as_deref(),
            self.kernels,
        )?;
        Ok(y.reshape((b, h, w, d))?)
    }
}

impl Attention {
    /// The score scale 1/√hd for a model width `d`.
    fn scale(&self, d: usize) -> f32 {
        ((d / self.heads) as f64).powf(-0.5) as f32
    }
}

/// Softmax attention with SAM's decomposed relative-position bias: qkv (B, h·w, 3, n, hd) →
/// (B, h·w, n, hd), with the relative-position tables (2·h − 1, hd) and (2·w − 1, hd).
/// `queries`, where given, holds each image's and head's rectangle of wanted queries (see
/// [`cpu_ops::grid_attention`]): the op skips the others and gives them zero, the composed
/// form computes them all.
///
/// Where `kernels` serve the tensors (f32 on the CPU), one tiled op
/// ([`cpu_ops::grid_attention`]) for all heads: it never holds an L × L matrix and keeps for
/// the backward only q, k, v, the bias and the output. Otherwise (and as the benchmarks'
/// baseline) it is composed of candle's ops, the heads in chunks whose score matrices stay
/// under [`ATTENTION_CHUNK_BYTES`], each a segment: training keeps q, k, v and the chunk's
/// output, not its L × L matrices.
pub fn attention(
    qkv: &Tensor,
    rel_pos_h: &Tensor,
    rel_pos_w: &Tensor,
    grid: (usize, usize),
    queries: Option<&[(usize, usize)]>,
    kernels: cpu_ops::Kernels,
) -> Result<Tensor> {
    let served = kernels != cpu_ops::Kernels::Candle
        && qkv.device().is_cpu()
        && qkv.dtype() == candle_core::DType::F32;
    if served {
        return attend(qkv, rel_pos_h, rel_pos_w, grid, queries, kernels);
    }
    let (b, l, _, heads, _) = qkv.dims5()?;
    let per_head = b * l * l * 4;
    let chunk = (ATTENTION_CHUNK_BYTES / per_head.max(1)).clamp(1, heads);
    let mut outs = Vec::new();
    for h0 in (0..heads).step_by(chunk) {
        let part = qkv.narrow(3, h0, chunk.min(heads - h0))?;
        let (rel_pos_h, rel_pos_w) = (rel_pos_h.clone(), rel_pos_w.clone());
        outs.push(segment(&part, move |part| {
            let composed = cpu_ops::Kernels::Candle;
            attend(part, &rel_pos_h, &rel_pos_w, grid, None, composed)
        })?);
    }
    Ok(Tensor::cat(&outs, 2)?)
}

/// [`attention`] of one chunk of heads.
fn attend(
    qkv: &Tensor,
    rel_pos_h: &Tensor,
    rel_pos_w: &Tensor,
    grid: (usize, usize),
    queries: Option<&[(usize, usize)]>,
    kernels: cpu_ops::Kernels,
) -> Result<Tensor> {
    let (h, w) = grid;
    let (b, l, _, heads, hd) = qkv.dims5()?;
    let bh = b * heads;
    let qkv = qkv.permute((2, 0, 3, 1, 4))?.reshape((3, bh, l, hd))?;
    let q = qkv.get(0)?.contiguous()?;
    let scale = (hd as f64).powf(-0.5);
    // Decomposed relative positions, with the unscaled q.
    let rh = rel_pos_rows(rel_pos_h, h)?; // (h, h, hd)
    let rw = rel_pos_rows(rel_pos_w, w)?; // (w, w, hd)
    let rq = q.reshape((bh, h, w, hd))?;
    let rel_h = rq
        .permute((1, 0, 2, 3))?
        .reshape((h, bh * w, hd))?
        .matmul(&rh.transpose(1, 2)?)?
        .reshape((h, bh, w, h))?
        .permute((1, 0, 2, 3))?;
    let rel_w = rq
        .permute((2, 0, 1, 3))?
        .reshape((w, bh * h, hd))?
        .matmul(&rw.transpose(1, 2)?)?
        .reshape((w, bh, h, w))?
        .permute((1, 2, 0, 3))?;
    if let Some(out) = cpu_ops::grid_attention(
        &qkv,
        &rel_h.reshape((bh, l, h))?,
        &rel_w.reshape((bh, l, w))?,
        grid,
        scale as f32,
        queries,
        kernels,
    )? {
        return Ok(out
            .reshape((b, heads, l, hd))?
            .permute((0, 2, 1, 3))?
            .contiguous()?);
    }
    let (k, v) = (qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
    let attn = (&q * scale)?.matmul(&k.t()?)?;
    let attn = attn
        .reshape((bh, h, w, h, w))?
        .broadcast_add(&rel_h.unsqueeze(4)?)?
        .broadcast_add(&rel_w.unsqueeze(3)?)?
        .reshape((bh, h * w, h * w))?;
    let attn = crate::layers::in_f32(&[&attn], |v| Ok(candle_nn::ops::softmax(&v[0], D::Minus1)?))?;
    Ok(attn
        .matmul(&v)?
        .reshape((b, heads, l, hd))?
        .permute((0, 2, 1, 3))?
        .contiguous()?)
}

#[derive(Debug, Clone)]
struct Block {
    norm1: (Tensor, Tensor),
    norm2: (Tensor, Tensor),
    attn: Attention,
    lin1: Linear,
    lin2: Linear,
    window: usize,
}

/// SAM's LayerNorm eps.
const LN_EPS: f64 = 1e-6;

/// LayerNorm (eps [`LN_EPS`]): the one op where `kernels` serve the tensors (its graph keeps the
/// input and the parameters), else the composed form as a segment.
fn norm(x: &Tensor, (w, b): &(Tensor, Tensor), kernels: cpu_ops::Kernels) -> Result<Tensor> {
    if kernels.serve_all(&[x, w, b]) {
        return layer_norm(x, &p(w), &p(b), LN_EPS, kernels);
    }
    let (w, b) = (w.clone(), b.clone());
    segment(x, move |x| layer_norm(x, &p(&w), &p(&b), LN_EPS, kernels))
}

fn norm_params(s: &Scope, d: usize) -> Result<(Tensor, Tensor)> {
    Ok((
        s.param("weight", &[d], Init::Ones)?,
        s.param("bias", &[d], Init::Zeros)?,
    ))
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, d) = x.dims4()?;
        let y = if self.window > 0 {
            let ws = self.window;
            let qkv = &self.attn.qkv;
            // A padded token's qkv is the bias alone (its input is zero): where the CPU
            // kernels serve, the product runs on the image's tokens and writes them out in
            // windows, the padding filled with the bias.
            let served = match &qkv.bias {
                Some(bias) if qkv.kernels.serve_all(&[x]) => {
                    let t = norm(x, &self.norm1, qkv.kernels)?;
                    detail(NORMS);
                    let (w, bias) = (p(&qkv.weight), p(bias));
                    cpu_ops::linear_windows(&t, &w, &bias, ws, qkv.kernels)?
                }
                _ => None,
            };
            let qkv = match served {
                Some(qkv) => qkv,
                None => {
                    // The norm and the window partition are one segment: the padded and
                    // permuted copies between them are recomputed, not kept.
                    let (nw, nb) = (self.norm1.0.clone(), self.norm1.1.clone());
                    let kernels = self.lin1.kernels;
                    let windows = segment(x, move |x| {
                        partition(&layer_norm(x, &p(&nw), &p(&nb), LN_EPS, kernels)?, ws)
                    })?;
                    detail(NORMS);
                    qkv.forward(&windows)?
                }
            };
            // The way back is a segment too, and the projection (per token) runs on the
            // image's tokens only: the padding's outputs are cut off.
            let out = self.attn.heads(&qkv, Some((h, w)))?;
            let out = segment(&out, move |out| unpartition(out, (b, h, w, d), ws))?;
            self.attn.proj.forward(&out)?
        } else {
            let y = norm(x, &self.norm1, self.lin1.kernels)?;
            detail(NORMS);
            self.attn.forward(&y)?
        };
        detail(self.attention_kind());
        let x = (x + y)?;
        let m = norm(&x, &self.norm2, self.lin1.kernels)?;
        detail(NORMS);
        let m = self.lin2.forward(&self.lin1.forward_gelu(&m)?)?;
        detail(MLP);
        Ok((x + m)?)
    }
}

/// Profile marks of a block's parts.
const NORMS: &str = "ViT: LayerNorms, residuals, window partition";
const MLP: &str = "ViT: MLP (linear, GELU, linear)";

impl Block {
    fn attention_kind(&self) -> &'static str {
        if self.window > 0 {
            "ViT: attention, windowed (qkv, scores, softmax, proj)"
        } else {
            "ViT: attention, global (qkv, scores, softmax, proj)"
        }
    }

    /// The training forward with the backward pass written by hand ([`Block::backward`]),
    /// where the crate's CPU kernels serve every layer (f32, biases on all four linear
    /// layers); `None` elsewhere and outside training. It keeps qkv, the attention's output
    /// and log-sum-exp, the residual stream after the attention, and the MLP's pre-activation
    /// and hidden map, and recomputes the norms' outputs and the windows put back in place.
    /// candle's autograd would keep those too, and would zero-fill and add a gradient of the
    /// size of every one of them in the backward pass. Under activation checkpointing (`stash`)
    /// it keeps its input and output only, and the backward pass recomputes the rest.
    fn forward_by_hand(&self, x: &Tensor, stash: Option<&Stash>) -> Result<Option<Tensor>> {
        let k = self.attn.kernels;
        let linears = [&self.attn.qkv, &self.attn.proj, &self.lin1, &self.lin2];
        let served = GradMode::on()
            && k.serve_all(&[x])
            && compute_dtype() == DType::F32
            && linears.iter().all(|l| l.bias.is_some() && l.kernels == k);
        if !served {
            return Ok(None);
        }
        let (fwd, bwd) = (self.clone(), self.clone());
        by_hand(
            &[x],
            stash,
            move |xs| {
                let inside = fwd.inside(&xs[0], true)?;
                let [.., x2, _, h] = &inside;
                let (w2, b2) = fwd.lin2.weight_bias()?;
                let m =
                    cpu_ops::linear(h, &w2, &b2, k)?.ok_or_else(|| unserved(k, "a ViT block"))?;
                detail(MLP);
                Ok(((x2 + m)?, inside.to_vec()))
            },
            Arc::new(move |saved, g| bwd.backward(saved, g)),
        )
    }

    /// The sizes of x's token grid and the attention's query rectangles (windows only).
    fn queries(&self, x: &Tensor) -> Result<Option<Vec<(usize, usize)>>> {
        let (b, h, w, _) = x.dims4()?;
        let ws = self.window;
        Ok((ws > 0).then(|| {
            let windows = b * h.div_ceil(ws) * w.div_ceil(ws);
            window_queries(windows, (ws, ws), (h, w), self.attn.heads)
        }))
    }

    /// The block's inside for x (B, h, w, D), without a graph: qkv (windowed where the block
    /// is), the attention's output and log-sum-exp, the residual stream x2 after the
    /// attention, and the MLP's pre-activation and hidden map (the block's output is
    /// `x2 + lin2(hidden)`). With `marks`, the profile's marks.
    fn inside(&self, x: &Tensor, marks: bool) -> Result<[Tensor; 6]> {
        let k = self.attn.kernels;
        let missing = || unserved(k, "a ViT block");
        let mark = |kind| {
            if marks {
                detail(kind)
            }
        };
        let (b, h, w, d) = x.dims4()?;
        let t = norm(x, &self.norm1, k)?;
        mark(NORMS);
        let (wq, bq) = self.attn.qkv.weight_bias()?;
        let qkv = match self.window {
            0 => cpu_ops::linear(&t, &wq, &bq, k)?,
            ws => cpu_ops::linear_windows(&t, &wq, &bq, ws, k)?,
        }
        .ok_or_else(missing)?;
        drop(t);
        let queries = self.queries(x)?;
        let (th, tw) = (p(&self.attn.rel_pos_h), p(&self.attn.rel_pos_w));
        let scale = self.attn.scale(d);
        let (a, lse) = cpu_ops::rel_pos_attention_parts(
            &qkv,
            &th,
            &tw,
            self.attn.heads,
            scale,
            queries.as_deref(),
            k,
        )?
        .ok_or_else(missing)?;
        let placed = match self.window {
            0 => a.clone(),
            ws => unpartition(&a, (b, h, w, d), ws)?,
        };
        let (wp, bp) = self.attn.proj.weight_bias()?;
        let y = cpu_ops::linear(&placed, &wp, &bp, k)?.ok_or_else(missing)?;
        drop(placed);
        mark(self.attention_kind());
        let x2 = (x + y)?;
        let t2 = norm(&x2, &self.norm2, k)?;
        mark(NORMS);
        let (w1, b1) = self.lin1.weight_bias()?;
        let (pre, hidden) = cpu_ops::linear_gelu_parts(&t2, &w1, &b1, k)?.ok_or_else(missing)?;
        Ok([qkv, a, lse, x2, pre, hidden])
    }

    /// The block's gradients from its input, the maps inside it as the forward kept them
    /// (recomputed under activation checkpointing) and the output's gradient, each map freed
    /// once its layer's gradients are taken.
    fn backward(&self, mut saved: Saved, g: &Tensor) -> Result<HandGrads> {
        let k = self.attn.kernels;
        let missing = || unserved(k, "a ViT block");
        let [qkv, a, lse, x2, pre, hidden] = saved.inside_or(|xs| self.inside(&xs[0], false))?;
        let x = &saved.xs[0];
        let (b, h, w, d) = x.dims4()?;
        let (n1, n2) = (&self.norm1, &self.norm2);
        let mut params = Vec::new();
        let mut keep = |layer: &Linear, grads: &cpu_ops::LayerGrads| -> Result<()> {
            let bias = layer.bias.clone().ok_or_else(missing)?;
            params.push((layer.weight.clone(), grads.weight.clone()));
            params.push((bias, grads.bias.clone()));
            Ok(())
        };
        // The MLP and the second norm.
        let (w2, _) = self.lin2.weight_bias()?;
        let l2 = cpu_ops::linear_vjp(&hidden, &w2, g, true)?;
        keep(&self.lin2, &l2)?;
        drop(hidden);
        let dh = l2.input.ok_or_else(missing)?;
        let t2 = norm(&x2, n2, k)?;
        let (w1, _) = self.lin1.weight_bias()?;
        let l1 = cpu_ops::linear_gelu_vjp(&t2, &w1, &pre, &dh, true)?;
        keep(&self.lin1, &l1)?;
        drop((t2, pre, dh));
        let dt2 = l1.input.ok_or_else(missing)?;
        let g2 = cpu_ops::layer_norm_vjp(&x2, &p(&n2.0), &p(&n2.1), LN_EPS, &dt2, k)?
            .ok_or_else(missing)?;
        drop((x2, dt2));
        let dx2 = (g + g2.input.as_ref().ok_or_else(missing)?)?;
        // The attention and the first norm.
        let placed = match self.window {
            0 => a.clone(),
            ws => unpartition(&a, (b, h, w, d), ws)?,
        };
        let (wp, _) = self.attn.proj.weight_bias()?;
        let lp = cpu_ops::linear_vjp(&placed, &wp, &dx2, true)?;
        keep(&self.attn.proj, &lp)?;
        drop(placed);
        let da = lp.input.ok_or_else(missing)?;
        let da = match self.window {
            0 => da,
            ws => partition(&da, ws)?,
        };
        let queries = self.queries(x)?;
        let (th, tw) = (p(&self.attn.rel_pos_h), p(&self.attn.rel_pos_w));
        let scale = self.attn.scale(d);
        let heads = self.attn.heads;
        let q = queries.as_deref();
        let at =
            cpu_ops::rel_pos_attention_vjp(&qkv, &th, &tw, heads, scale, q, (&a, &lse), &da, k)?
                .ok_or_else(missing)?;
        drop((qkv, a, lse, da));
        let t1 = norm(x, n1, k)?;
        let (wq, _) = self.attn.qkv.weight_bias()?;
        let lq = match self.window {
            0 => cpu_ops::linear_vjp(&t1, &wq, &at.qkv, true)?,
            ws => cpu_ops::linear_windows_vjp(&t1, &wq, ws, &at.qkv, true)?,
        };
        keep(&self.attn.qkv, &lq)?;
        drop(t1);
        let dt1 = lq.input.ok_or_else(missing)?;
        let g1 = cpu_ops::layer_norm_vjp(x, &p(&n1.0), &p(&n1.1), LN_EPS, &dt1, k)?
            .ok_or_else(missing)?;
        let dx = (dx2 + g1.input.as_ref().ok_or_else(missing)?)?;
        params.push((self.attn.rel_pos_h.clone(), at.table_h));
        params.push((self.attn.rel_pos_w.clone(), at.table_w));
        for ((w, b), grads) in [(n1, g1), (n2, g2)] {
            params.push((w.clone(), grads.weight));
            params.push((b.clone(), grads.bias));
        }
        Ok((vec![Some(dx)], params))
    }
}

/// (B, H, W, D) → (B·nh·nw, ws, ws, D): zero-padded to multiples of `ws`, cut into windows.
fn partition(y: &Tensor, ws: usize) -> Result<Tensor> {
    let (b, h, w, d) = y.dims4()?;
    let (hp, wp) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
    let padded = y
        .pad_with_zeros(1, 0, hp - h)?
        .pad_with_zeros(2, 0, wp - w)?;
    Ok(padded
        .reshape((b, hp / ws, ws, wp / ws, ws, d))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((b * (hp / ws) * (wp / ws), ws, ws, d))?)
}

/// The inverse of [`partition`] for an image of `(b, h, w, d)`: windows back in place, the
/// padding cut off.
fn unpartition(
    out: &Tensor,
    (b, h, w, d): (usize, usize, usize, usize),
    ws: usize,
) -> Result<Tensor> {
    let (nh, nw) = (h.div_ceil(ws), w.div_ceil(ws));
    Ok(out
        .reshape((b, nh, nw, ws, ws, d))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((b, nh * ws, nw * ws, d))?
        .narrow(1, 0, h)?
        .narrow(2, 0, w)?
        .contiguous()?)
}

/// The SAM ViT encoder.
#[derive(Debug, Clone)]
pub struct SamEncoder {
    patch_embed: Conv2d,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    global: Vec<usize>,
    patch: usize,
}

impl SamEncoder {
    /// `grid`: tokens per side (SAM: 1024 / 16 = 64). Position embeddings and the
    /// global blocks' relative-position tables are sized for it.
    pub fn new(s: &Scope, cfg: &SamConfig, in_chans: usize, grid: usize) -> Result<Self> {
        let d = cfg.embed_dim;
        let p = cfg.patch_size;
        let patch_embed = Conv2d::new(&s.pp("patch_embed").pp("proj"), in_chans, d, p, p, 0, true)?;
        let pos_embed = s.param("pos_embed", &[1, grid, grid, d], Init::Zeros)?;
        let hd = d / cfg.num_heads;
        // On a canvas smaller than a window (native canvases of small patches) a window would
        // be mostly zero padding: it shrinks to the grid, i.e. those blocks attend globally.
        let window_size = cfg.window_size.min(grid);
        let mut blocks = Vec::new();
        for i in 0..cfg.depth {
            let bs = s.pp("blocks").pp(i);
            let global = cfg.global_attn_indexes.contains(&i);
            let size = if global { grid } else { window_size };
            let a = bs.pp("attn");
            blocks.push(Block {
                norm1: norm_params(&bs.pp("norm1"), d)?,
                attn: Attention {
                    qkv: Linear::new(&a.pp("qkv"), d, 3 * d, true)?,
                    proj: Linear::new(&a.pp("proj"), d, d, true)?,
                    rel_pos_h: a.param("rel_pos_h", &[2 * size - 1, hd], Init::Zeros)?,
                    rel_pos_w: a.param("rel_pos_w", &[2 * size - 1, hd], Init::Zeros)?,
                    heads: cfg.num_heads,
                    kernels: s.kernels(),
                },
                norm2: norm_params(&bs.pp("norm2"), d)?,
                lin1: Linear::new(&bs.pp("mlp").pp("lin1"), d, cfg.mlp_ratio * d, true)?,
                lin2: Linear::new(&bs.pp("mlp").pp("lin2"), cfg.mlp_ratio * d, d, true)?,
                window: if global { 0 } else { window_size },
            });
        }
        // The neck: built (its parameters count and load) but not applied, as in torch-em.
        let neck = s.pp("neck");
        Conv2d::new(&neck.pp(0), d, cfg.neck_chans, 1, 1, 0, false)?;
        norm_params(&neck.pp(1), cfg.neck_chans)?;
        Conv2d::new(&neck.pp(2), cfg.neck_chans, cfg.neck_chans, 3, 1, 1, false)?;
        norm_params(&neck.pp(3), cfg.neck_chans)?;
        Ok(SamEncoder {
            patch_embed,
            pos_embed,
            blocks,
            global: cfg.global_attn_indexes.clone(),
            patch: p,
        })
    }

    /// (B, 3, S, S) → the final map (B, D, S/16, S/16) and the outputs of the first three
    /// global-attention blocks (same shape).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        self.forward_checkpointed(x, None)
    }

    /// [`SamEncoder::forward`] with each block checkpointed when `stash` is given.
    pub fn forward_checkpointed(
        &self,
        x: &Tensor,
        stash: Option<&Stash>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (b, _, h, w) = x.dims4()?;
        let (gh, gw) = (h / self.patch, w / self.patch);
        let d = self.pos_embed.dim(3)?;
        let pe = self.pos_embed.dims();
        if pe[1] != gh || pe[2] != gw {
            return Err(crate::Error::Input {
                shape: x.dims().to_vec(),
                problem: format!(
                    "the encoder's canvas is {}×{} tokens, the input gives {gh}×{gw}",
                    pe[1], pe[2]
                ),
            });
        }
        let mut t = crate::layers::patch_tokens(x, &self.patch_embed)?
            .reshape((b, gh, gw, d))?
            .broadcast_add(&p(&self.pos_embed))?;
        stage("patch embedding");
        let mut inter = Vec::new();
        for (i, blk) in self.blocks.iter().enumerate() {
            t = match blk.forward_by_hand(&t, stash)? {
                Some(y) => y,
                None => maybe(&t, stash, blk, Block::forward)?,
            };
            stage(if blk.window > 0 {
                "ViT block, windowed attention"
            } else {
                "ViT block, global attention"
            });
            if self.global.contains(&i) && inter.len() < 3 {
                inter.push(t.permute((0, 3, 1, 2))?);
            }
        }
        Ok((t.permute((0, 3, 1, 2))?.contiguous()?, inter))
    }
}

#!/usr/bin/env python3
"""PyTorch's side of `cargo xtask bench models`: one of the paper's three models (C = 2) on the
CPU in f32 — a forward of one 512² image (eval, no_grad; UNETR and ViM-UNet on the paper's
1024² canvas, or with --canvas native on one the input's size) and a training step at batch 2 (Dice loss, Adam) — with the process's peak
resident memory. One model per process, so that the peak is that model's.

    python3 scripts/bench_pytorch_models.py --model vim-unet-t [--canvas paper|native]
        [--threads 2] [--steps 1]

Prints one JSON line. Needs only PyTorch: the models are written out here from the spec, and
their parameter counts are checked against torch-em's (UNet 31,030,658; UNETR-B 104,107,650;
ViM-UNet-T 18,499,690). ViM-UNet's selective scan is Mamba's reference scan in plain PyTorch
(`selective_scan_ref`: the (B, E, L, N) discretisation tensors, then one step per token), as
mamba_ssm's fused kernel exists only for CUDA.
"""

import argparse
import json
import math
import os
import resource
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pytorch import ConvBlock, UNet2d, dice_loss, median_ms  # noqa: E402

# torch-em's counts on the paper's 1024² canvas; on a native 512² canvas (smaller position
# tables) the counts of this project's models, which load the same weights.
COUNTS = {
    "paper": {"unet": 31_030_658, "unetr-b": 104_107_650, "vim-unet-t": 18_499_690},
    "native": {"unet": 31_030_658, "unetr-b": 101_715_586, "vim-unet-t": 17_909_866},
}


# --- the decoder of torch-em's UNETR (no skip connections, transposed convolutions) ---------

class Deconv2DBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, 2, stride=2), nn.Conv2d(cout, cout, 3, padding=1),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.block(x)


def crop(x, shape):
    """torch-em's Decoder._crop: centre-crop every axis (channels too) to `shape`."""
    idx = tuple(slice((h - w) // 2, (h - w) // 2 + w) for h, w in zip(x.shape, shape))
    return x[idx]


class Decoder(nn.Module):
    def __init__(self, embed_dim, cout=2, f=64):
        super().__init__()
        feats = [8 * f, 4 * f, 2 * f, f]
        self.deconvs = nn.ModuleList([
            Deconv2DBlock(embed_dim, feats[0]), Deconv2DBlock(feats[0], feats[1]),
            Deconv2DBlock(feats[1], feats[2]), Deconv2DBlock(feats[2], feats[3])])
        self.base = ConvBlock(embed_dim, feats[0])
        self.blocks = nn.ModuleList(ConvBlock(feats[i], feats[i + 1]) for i in range(3))
        self.samplers = nn.ModuleList(
            nn.ConvTranspose2d(feats[i], feats[i + 1], 2, stride=2) for i in range(3))
        self.deconv_out = nn.ConvTranspose2d(f, f, 2, stride=2)
        self.head = ConvBlock(2 * f, f)
        self.out = nn.Conv2d(f, cout, 1)

    def forward(self, z12):
        skips = []
        z = z12
        for d in self.deconvs:
            z = d(z)
            skips.append(z)
        z9, z6, z3, z0 = skips
        y = self.base(z12)
        for sampler, block, skip in zip(self.samplers, self.blocks, [z9, z6, z3]):
            y = sampler(y)
            y = block(torch.cat([y, crop(skip, y.shape)], 1))
        y = self.head(torch.cat([self.deconv_out(y), z0], 1))
        return torch.sigmoid(self.out(y))


# --- SAM's ViT-B image encoder ---------------------------------------------------------------

def rel_pos_rows(table, size):
    idx = torch.arange(size)[:, None] - torch.arange(size)[None, :] + size - 1
    return table[idx]


class Attention(nn.Module):
    def __init__(self, dim, heads, size):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        hd = dim // heads
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, hd))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, hd))

    def forward(self, x):
        b, h, w, d = x.shape
        hd = d // self.heads
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.heads, h * w, hd).unbind(0)
        attn = (q * hd ** -0.5) @ k.transpose(-2, -1)
        rq = q.reshape(b * self.heads, h, w, hd)
        rel_h = torch.einsum("bhwc,hkc->bhwk", rq, rel_pos_rows(self.rel_pos_h, h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", rq, rel_pos_rows(self.rel_pos_w, w))
        attn = (attn.view(-1, h, w, h, w) + rel_h[:, :, :, :, None]
                + rel_w[:, :, :, None, :]).view(-1, h * w, h * w)
        y = (attn.softmax(dim=-1) @ v).view(b, self.heads, h, w, hd)
        return self.proj(y.permute(0, 2, 3, 1, 4).reshape(b, h, w, d))


class Block(nn.Module):
    def __init__(self, dim, heads, window, grid):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, window if window > 0 else grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.window = window

    def forward(self, x):
        b, h, w, d = x.shape
        y = self.norm1(x)
        if self.window > 0:
            ws = self.window
            ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
            y = F.pad(y, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            y = y.view(b, hp // ws, ws, wp // ws, ws, d).permute(0, 1, 3, 2, 4, 5)
            y = self.attn(y.reshape(-1, ws, ws, d))
            y = y.view(b, hp // ws, wp // ws, ws, ws, d).permute(0, 1, 3, 2, 4, 5)
            y = y.reshape(b, hp, wp, d)[:, :h, :w]
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class LayerNorm2d(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))


class SamVitB(nn.Module):
    def __init__(self, dim=768, depth=12, heads=12, grid=64, glob=(2, 5, 8, 11)):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 16, stride=16)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, dim))
        self.blocks = nn.ModuleList(
            Block(dim, heads, 0 if i in glob else 14, grid) for i in range(depth))
        # The neck: built, not applied (torch-em's ViT_Sam).
        self.neck = nn.ModuleList([nn.Conv2d(dim, 256, 1, bias=False), LayerNorm2d(256),
                                   nn.Conv2d(256, 256, 3, padding=1, bias=False),
                                   LayerNorm2d(256)])

    def forward(self, x):
        t = self.patch_embed(x).permute(0, 2, 3, 1) + self.pos_embed
        for blk in self.blocks:
            t = blk(t)
        return t.permute(0, 3, 1, 2)


# --- Vision Mamba Tiny (the paper's preset: class token first, RoPE, directions summed) ------

def selective_scan_ref(u, delta, A, B, C, D, z, delta_bias):
    delta = F.softplus(delta + delta_bias[None, :, None])
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    y = torch.stack(ys, dim=2) + u * D[None, :, None]
    return y * F.silu(z)


class Direction(nn.Module):
    def __init__(self, e, r, n, k):
        super().__init__()
        self.conv1d = nn.Conv1d(e, e, k, groups=e, padding=k - 1)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1).float()).repeat(e, 1))
        self.D = nn.Parameter(torch.ones(e))
        self.r, self.n = r, n

    def forward(self, x, z):
        u = F.silu(self.conv1d(x)[..., :x.shape[-1]])
        x_dbl = self.x_proj(u.transpose(1, 2))
        dt, bm, cm = x_dbl.split([self.r, self.n, self.n], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)
        return selective_scan_ref(u, delta, -torch.exp(self.A_log), bm.transpose(1, 2),
                                  cm.transpose(1, 2), self.D, z, self.dt_proj.bias)


class Mixer(nn.Module):
    def __init__(self, d, expand=2, n=16, k=4):
        super().__init__()
        e, r = expand * d, math.ceil(d / 16)
        self.in_proj = nn.Linear(d, 2 * e, bias=False)
        self.fwd = Direction(e, r, n, k)
        self.bwd = Direction(e, r, n, k)
        self.out_proj = nn.Linear(e, d, bias=False)

    def forward(self, h):
        x, z = self.in_proj(h).transpose(1, 2).chunk(2, dim=1)
        yf = self.fwd(x, z)
        yb = self.bwd(x.flip(-1), z.flip(-1)).flip(-1)
        return self.out_proj((yf + yb).transpose(1, 2))


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


def rope(grid, dim):
    freqs = 1.0 / 10000 ** (torch.arange(0, dim // 2, 2).float() / (dim // 2))
    pos = torch.arange(grid).float() / grid * 14
    f = torch.einsum("i,j->ij", pos, freqs).repeat_interleave(2, -1)
    f = torch.cat([f[:, None, :].expand(grid, grid, -1), f[None, :, :].expand(grid, grid, -1)],
                  -1).reshape(grid * grid, dim)
    return f.cos(), f.sin()


def apply_rope(x, cos, sin):
    t = x[:, 1:]
    pairs = t.unflatten(-1, (-1, 2))
    rot = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    return torch.cat([x[:, :1], t * cos + rot * sin], 1)


class VimTiny(nn.Module):
    def __init__(self, d=192, depth=24, grid=64, drop_path=0.1):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, 16, stride=16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, d))
        self.norms = nn.ModuleList(RMSNorm(d) for _ in range(depth))
        self.mixers = nn.ModuleList(Mixer(d) for _ in range(depth))
        self.norm_f = RMSNorm(d)
        self.head = nn.Linear(d, 1000)  # built, not applied
        cos, sin = rope(grid, d)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.drops = [0.0] + [drop_path * i / (depth - 1) for i in range(depth - 1)]
        self.final_drop = drop_path
        self.grid = grid

    def drop(self, x, p):
        if not self.training or p == 0:
            return x
        keep = (torch.rand(x.shape[0], 1, 1) >= p).float() / (1 - p)
        return x * keep

    def forward(self, x):
        b = x.shape[0]
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        hidden = torch.cat([self.cls_token.expand(b, -1, -1), t], 1) + self.pos_embed
        residual = None
        for norm, mixer, p in zip(self.norms, self.mixers, self.drops):
            hidden = apply_rope(hidden, self.cos, self.sin)
            if residual is None:
                residual = hidden
            else:
                residual = apply_rope(residual, self.cos, self.sin) + self.drop(hidden, p)
            hidden = mixer(norm(residual))
        out = self.norm_f(residual + self.drop(hidden, self.final_drop))[:, 1:]
        return out.transpose(1, 2).reshape(b, -1, self.grid, self.grid)


class EncoderDecoder(nn.Module):
    """torch-em's UNETR pre- and post-processing around an encoder and the decoder."""

    def __init__(self, encoder, embed_dim, resize, canvas):
        super().__init__()
        self.encoder = encoder
        self.decoder = Decoder(embed_dim)
        self.resize = resize
        self.canvas = canvas

    def forward(self, x):
        h, w = x.shape[-2:]
        x = x.expand(-1, 3, -1, -1)
        if self.resize:
            s = self.canvas / max(h, w)
            x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear",
                              antialias=True, align_corners=False)
        nh, nw = x.shape[-2:]
        x = F.pad(x, (0, self.canvas - nw, 0, self.canvas - nh))
        y = self.decoder(self.encoder(x))[..., :nh, :nw]
        return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)


def build(name, canvas=1024):
    grid = canvas // 16
    if name == "unet":
        return UNet2d()
    if name == "unetr-b":
        return EncoderDecoder(SamVitB(grid=grid), 768, resize=True, canvas=canvas)
    if name == "vim-unet-t":
        return EncoderDecoder(VimTiny(grid=grid), 192, resize=False, canvas=canvas)
    raise SystemExit(f"unknown model {name!r}: unet, unetr-b or vim-unet-t")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up")
    ap.add_argument("--canvas", choices=["paper", "native"], default="paper",
                    help="UNETR/ViM-UNet canvas: 1024² (paper) or the input size (native)")
    ap.add_argument("--no-train", action="store_true", help="forward only")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build(a.model, 1024 if a.canvas == "paper" else a.size)
    n = sum(p.numel() for p in model.parameters())
    if a.canvas == "paper" or a.size == 512:
        want = COUNTS[a.canvas][a.model]
        assert n == want, f"{a.model}: {n:,} parameters, expected {want:,}"
    s = a.size
    x = torch.randn(1, 1, s, s)
    model.eval()

    def forward():
        with torch.no_grad():
            model(x)

    result = {"model": a.model, "parameters": n, "torch": torch.__version__,
              "threads": a.threads, "size": s, "canvas": a.canvas, "forward_ms": median_ms(forward, a.steps)}
    if not a.no_train:
        model.train()
        x2 = torch.randn(2, 1, s, s)
        target = torch.zeros(2, 2, s, s)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad()
            dice_loss(model(x2), target).backward()
            opt.step()

        result["step_ms"] = median_ms(step, a.steps)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


if __name__ == "__main__":
    main()

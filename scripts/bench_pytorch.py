#!/usr/bin/env python3
"""PyTorch's side of `cargo xtask bench conv`: the same 3x3 convolution shapes (forward;
forward + backward of sum(conv(x, w))), the same ConvBlock2d units, bilinear x2 upsamplings and
1x1 / 2x2 transposed / 16x16 patch convolutions, a torch-em UNet2d forward at 512² (eval, no_grad) and a
training step (batch 2, 256², Dice loss, Adam), f32 on the CPU, median of N after a warm-up.

    python3 scripts/bench_pytorch.py [--threads 2] [--reps 3]

Needs only PyTorch. The UNet is written out here from the spec (torch-em UNet2d: depth 4, 64
initial features, InstanceNorm before each 3x3 conv, max-pool, 2x2 transposed-conv upsampling,
sigmoid output, C = 2) so that torch-em need not be installed; its parameter count is checked
against torch-em's (31,030,658).
"""

import argparse
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.block = nn.Sequential(
            nn.InstanceNorm2d(cin), nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
            nn.InstanceNorm2d(cout), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.block(x)


class UNet2d(nn.Module):
    def __init__(self, cin=1, cout=2, f=64, depth=4):
        super().__init__()
        enc = [cin] + [f * 2**i for i in range(depth)]
        self.encoder = nn.ModuleList(ConvBlock(a, b) for a, b in zip(enc[:-1], enc[1:]))
        self.base = ConvBlock(enc[-1], enc[-1] * 2)
        dec = [enc[-1] * 2] + enc[::-1][:-1]
        self.samplers = nn.ModuleList(
            nn.ConvTranspose2d(a, b, 2, stride=2) for a, b in zip(dec[:-1], dec[1:]))
        self.decoder = nn.ModuleList(ConvBlock(2 * b, b) for b in dec[1:])
        self.out = nn.Conv2d(dec[-1], cout, 1)

    def forward(self, x):
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.base(x)
        for sampler, block, skip in zip(self.samplers, self.decoder, reversed(skips)):
            x = block(torch.cat([sampler(x), skip], 1))
        return torch.sigmoid(self.out(x))


def dice_loss(p, g, eps=1e-7):
    dims = (0, 2, 3)
    num = 2 * (p * g).sum(dims)
    den = torch.clamp((p * p).sum(dims) + (g * g).sum(dims), min=eps)
    return (1 - num / den).sum()


def median_ms(f, reps):
    f()  # warm-up
    t = []
    for _ in range(reps):
        s = time.perf_counter()
        f()
        t.append((time.perf_counter() - s) * 1e3)
    return statistics.median(t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kernels-only", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"PyTorch {torch.__version__} on {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; median of {a.reps} after a warm-up")
    print("\n3×3 conv, stride 1, pad 1 (f32, no bias)")
    print("| B×C×H×W → O | fwd ms | GFLOP/s | fwd+bwd ms |")
    print("|---|---:|---:|---:|")
    for b, c, h, w, o in [(1, 1, 512, 512, 64), (1, 64, 512, 512, 64), (2, 64, 256, 256, 64),
                          (1, 128, 256, 256, 128), (1, 256, 128, 128, 256),
                          (1, 512, 64, 64, 512), (1, 1024, 32, 32, 1024)]:
        x = torch.randn(b, c, h, w, requires_grad=True)
        k = (torch.randn(o, c, 3, 3) * 0.05).requires_grad_()

        def fwd():
            with torch.no_grad():
                F.conv2d(x, k, padding=1)

        def fwd_bwd():
            F.conv2d(x, k, padding=1).sum().backward()

        f_ms, b_ms = median_ms(fwd, a.reps), median_ms(fwd_bwd, a.reps)
        flops = 2.0 * b * o * h * w * c * 9
        print(f"| {b}×{c}×{h}×{w} → {o} | {f_ms:.1f} | {flops / f_ms / 1e6:.0f} | {b_ms:.1f} |")
    print("\nInstanceNorm2d → 3×3 conv + bias → ReLU (one ConvBlock2d unit, f32)")
    print("| B×C×H×W → O | fwd ms | fwd+bwd ms |")
    print("|---|---:|---:|")
    for b, c, h, w, o in [(1, 64, 512, 512, 64), (1, 128, 512, 512, 64), (2, 64, 256, 256, 64),
                          (1, 512, 64, 64, 512)]:
        x = torch.randn(b, c, h, w, requires_grad=True)
        unit = nn.Sequential(nn.InstanceNorm2d(c), nn.Conv2d(c, o, 3, padding=1), nn.ReLU())

        def fwd():
            with torch.no_grad():
                unit(x)

        def fwd_bwd():
            unit(x).sum().backward()

        print(f"| {b}×{c}×{h}×{w} → {o} | {median_ms(fwd, a.reps):.1f} | "
              f"{median_ms(fwd_bwd, a.reps):.1f} |")
    print("\nBilinear ×2 upsampling (align_corners=False), f32")
    print("| B×C×H×W → 2H×2W | fwd ms | fwd+bwd ms |")
    print("|---|---:|---:|")
    for b, c, h, w in [(1, 64, 256, 256), (2, 128, 128, 128), (1, 512, 32, 32)]:
        x = torch.randn(b, c, h, w, requires_grad=True)

        def up():
            return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

        def fwd():
            with torch.no_grad():
                up()

        print(f"| {b}×{c}×{h}×{w} | {median_ms(fwd, a.reps):.1f} | "
              f"{median_ms(lambda: up().sum().backward(), a.reps):.1f} |")
    print("\n1×1, 2×2 stride-2 transposed and 16×16 stride-16 convolutions with bias (f32)")
    print("| conv | B×C×H×W → O | fwd ms | GFLOP/s | fwd+bwd ms |")
    print("|---|---|---:|---:|---:|")
    for kind, b, c, h, w in [("1×1", 1, 128, 256, 256), ("1×1", 1, 1024, 32, 32),
                             ("2×2 transposed", 1, 128, 256, 256),
                             ("2×2 transposed", 1, 1024, 32, 32),
                             ("16×16 patch", 1, 3, 1024, 1024)]:
        x = torch.randn(b, c, h, w, requires_grad=True)
        if kind == "2×2 transposed":
            o, k, layer, pixels = c // 2, 2, nn.ConvTranspose2d(c, c // 2, 2, stride=2), h * w
        elif kind == "1×1":
            o, k, layer, pixels = c // 2, 1, nn.Conv2d(c, c // 2, 1), h * w
        else:
            o, k, layer, pixels = 768, 16, nn.Conv2d(c, 768, 16, stride=16), h * w // 256

        def fwd():
            with torch.no_grad():
                layer(x)

        f_ms = median_ms(fwd, a.reps)
        b_ms = median_ms(lambda: layer(x).sum().backward(), a.reps)
        flops = 2.0 * b * o * c * k * k * pixels
        print(f"| {kind} | {b}×{c}×{h}×{w} → {o} | {f_ms:.1f} | {flops / f_ms / 1e6:.0f} | "
              f"{b_ms:.1f} |")
    if a.kernels_only:
        return
    model = UNet2d()
    n = sum(p.numel() for p in model.parameters())
    assert n == 31_030_658, n
    print(f"\nUNet2d (depth 4, 64 features, C = 2, {n:,} parameters)")
    print("| measurement | ms |")
    print("|---|---:|")
    x = torch.randn(1, 1, 512, 512)
    model.eval()

    def forward():
        with torch.no_grad():
            model(x)

    print(f"| forward 1×1×512² | {median_ms(forward, a.reps):.0f} |")
    model.train()
    x2 = torch.randn(2, 1, 256, 256)
    target = torch.zeros(2, 2, 256, 256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        dice_loss(model(x2), target).backward()
        opt.step()

    print(f"| training step 2×1×256² (Adam) | {median_ms(step, a.reps):.0f} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Convert a torch-em checkpoint (or any PyTorch state dict) to safetensors for vim-nets.

    python scripts/torch_to_safetensors.py checkpoints/vimunet/best.pt vimunet.safetensors

Accepts a torch-em trainer checkpoint (`{"model_state": ...}`), a Vim/timm checkpoint
(`{"model": ...}`), a bare state dict, or a pickled `nn.Module`. Keys are kept exactly as
PyTorch names them (`encoder.blocks.0.attn.qkv.weight`, ...), which are the names
`vim_nets::Model::load` expects. Floating tensors are written as float32, integer buffers
(BatchNorm's `num_batches_tracked`) as they are. Needs `torch` and `safetensors`.
"""
import argparse
import sys


def state_dict_of(obj):
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("model_state", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        return obj
    raise SystemExit(f"error: no state dict found in an object of type {type(obj).__name__}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .pt/.pth file")
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--prefix", default="", help="keep only keys under this prefix and strip it")
    args = parser.parse_args()
    try:
        import torch
        from safetensors.torch import save_file
    except ImportError as e:
        sys.exit(f"error: this script needs PyTorch and safetensors ({e})")

    obj = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    state = state_dict_of(obj)
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if args.prefix:
            if not key.startswith(args.prefix):
                continue
            key = key[len(args.prefix):]
        if key.startswith("module."):  # DataParallel
            key = key[len("module."):]
        value = value.detach().contiguous()
        if value.is_floating_point():
            value = value.float()
        out[key] = value.clone()
    if not out:
        sys.exit(f"error: {args.checkpoint} holds no tensors" + (f" under {args.prefix!r}" if args.prefix else ""))
    save_file(out, args.output, metadata={"source": args.checkpoint})
    n = sum(v.numel() for v in out.values())
    print(f"wrote {len(out)} tensors ({n:,} elements) to {args.output}")


if __name__ == "__main__":
    main()

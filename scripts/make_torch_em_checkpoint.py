"""Writes test checkpoints in torch-em's layout, for crates/vim-nets/tests/torch_em.rs.

    python scripts/make_torch_em_checkpoint.py crates/vim-nets/tests/fixtures

Reads `torch_em_unet.safetensors` and `torch_em_vimunet.safetensors` (state dicts with torch-em's
key names) and writes:

- `torch_em_unet.pt`: the dict torch-em's `DefaultTrainer.save_checkpoint` saves (iteration,
  epoch, best_epoch, best_metric, current_metric, model_state, optimizer_state, init, train_time,
  timestamp, scheduler_state), with an `init` record as its serializer builds it: model_class,
  model_kwargs (class references for conv_block_impl, pooler_impl and sampler_impl), a pickled
  dataset object and loader kwargs. torch-em itself is not needed: its classes are stand-ins
  registered under torch-em's module names, which is all pickle stores of them.
- `torch_em_vimunet.pt`: the same layout for a small ViM-UNet as `get_vimunet_model` builds it
  (`UNETR` with a `ViM` encoder object in `model_kwargs`; torch-em's current ViM variant).
- `torch_em_malicious.pt`: the same with a model_state entry whose unpickling would call
  `os.system` (never loaded by Python here; the Rust reader must refuse it).

Needs torch and safetensors.
"""

import collections
import os
import sys
import types

import torch
from safetensors.torch import load_file


def stand_in(module_name, class_name, base=object):
    parts = module_name.split(".")
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        sys.modules.setdefault(parent, types.ModuleType(parent))
    module = sys.modules.get(module_name)
    if module is None:
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
    cls = type(class_name, (base,), {})
    cls.__module__ = module_name
    setattr(module, class_name, cls)
    return cls


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def load_state(folder, name):
    return collections.OrderedDict(
        (k, v) for k, v in sorted(load_file(os.path.join(folder, name)).items())
    )


def torch_em_checkpoint(state, name, model_class, model_kwargs, optimizer_step=True):
    """The dict torch-em's DefaultTrainer.save_checkpoint saves, around `state` (without
    `optimizer_step`, Adam's state is that before its first step: no moments, a smaller file)."""
    dataset_class = stand_in("torch_em.data.segmentation_dataset", "SegmentationDataset")
    dataset = dataset_class()
    dataset.raw_path = "data/cremi/sampleA.h5"
    dataset.patch_shape = (1, 512, 512)
    params = [torch.nn.Parameter(v.clone()) for v in state.values() if v.dtype.is_floating_point]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    if optimizer_step:
        for p in params:
            p.grad = torch.ones_like(p) * 1e-3
        optimizer.step()
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.9, patience=10)
    return {
        "iteration": 40,
        "epoch": 8,
        "best_epoch": 7,
        "best_metric": 0.25,
        "current_metric": 0.26,
        "model_state": state,
        "optimizer_state": optimizer.state_dict(),
        "init": {
            "name": name,
            "train_dataset": dataset,
            "train_loader_kwargs": {"batch_size": 2, "shuffle": True, "num_workers": 4},
            "model_class": model_class,
            "model_kwargs": model_kwargs,
            "optimizer_class": "torch.optim.adam.Adam",
            "optimizer_kwargs": {"lr": 1e-4},
            "device": "cpu",
            "mixed_precision": True,
        },
        "train_time": 12.5,
        "timestamp": "03-12-2026 (19:50:00)",
        "scheduler_state": scheduler.state_dict(),
    }


def main(folder):
    state = load_state(folder, "torch_em_unet.safetensors")
    conv_block = stand_in("torch_em.model.unet", "ConvBlock2d")
    deconv = stand_in("torch_em.model.unetr", "SingleDeconv2DBlock")
    checkpoint = torch_em_checkpoint(state, "cremi-unet", "torch_em.model.unet.UNet2d", {
        "in_channels": 1,
        "out_channels": 2,
        "depth": 2,
        "initial_features": 4,
        "gain": 2,
        "final_activation": "Sigmoid",
        "return_side_outputs": False,
        "conv_block_impl": conv_block,
        "pooler_impl": torch.nn.MaxPool2d,
        "sampler_impl": deconv,
        "postprocessing": None,
        "check_shape": True,
    })
    torch.save(checkpoint, os.path.join(folder, "torch_em_unet.pt"))
    malicious = dict(checkpoint)
    malicious["model_state"] = collections.OrderedDict(state)
    malicious["model_state"]["encoder.blocks.0.block.0.weight"] = Exploit()
    torch.save(malicious, os.path.join(folder, "torch_em_malicious.pt"))

    # A ViM-UNet as get_vimunet_model builds it: UNETR whose encoder is a ViM module object,
    # which torch-em's serializer records in model_kwargs as the object itself.
    vim_class = stand_in("torch_em.model.vim", "ViM")
    encoder = vim_class()
    encoder.img_size = 64
    encoder.patch_size = 16
    encoder.embed_dim = 64
    checkpoint = torch_em_checkpoint(
        load_state(folder, "torch_em_vimunet.safetensors"),
        "cremi-vimunet",
        "torch_em.model.unetr.UNETR",
        {
            "encoder": encoder,
            "out_channels": 2,
            "resize_input": False,
            "use_skip_connection": False,
            "final_activation": "Sigmoid",
        },
        optimizer_step=False,
    )
    torch.save(checkpoint, os.path.join(folder, "torch_em_vimunet.pt"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "crates/vim-nets/tests/fixtures")

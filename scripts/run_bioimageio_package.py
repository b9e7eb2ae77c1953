"""Runs an unpacked bioimage.io package written by `vimseg export` in PyTorch with torch-em.

    python scripts/run_bioimageio_package.py UNPACKED_PACKAGE_DIR

Builds the network with the package's `architecture.py` and its kwargs (torch-em's own classes),
loads `weights.pt` strictly, standardises the test input as `rdf.yaml` declares and prints the
largest difference to the test output. Needs torch, numpy, pyyaml and torch-em importable
(torch-em's own imports need imageio, scikit-image, matplotlib, tqdm, torchvision, kornia;
UNETR also segment-anything). python-elf, which torch-em imports at package level but the
networks do not use, is replaced by an empty stand-in when it is not installed.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import numpy as np
import torch
import yaml


class _ElfStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "elf" or name.startswith("elf."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def attribute(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return lambda *args, **kwargs: None

        module.__getattr__ = attribute
        return module

    def exec_module(self, module):
        pass


def main(folder):
    try:
        import elf.io  # noqa: F401
    except ImportError:
        for name in [n for n in sys.modules if n == "elf" or n.startswith("elf.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _ElfStandIn())
    with open(f"{folder}/rdf.yaml") as f:
        rdf = yaml.safe_load(f)
    weights = rdf["weights"]["pytorch_state_dict"]
    arch = weights["architecture"]
    spec = importlib.util.spec_from_file_location("architecture", f"{folder}/{arch['source']}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = getattr(module, arch["callable"])(**arch["kwargs"])
    state = torch.load(f"{folder}/{weights['source']}", weights_only=True)
    print(model.load_state_dict(state, strict=True))
    model.eval()
    x = np.load(f"{folder}/{rdf['inputs'][0]['test_tensor']['source']}")
    expected = np.load(f"{folder}/{rdf['outputs'][0]['test_tensor']['source']}")
    for step in rdf["inputs"][0].get("preprocessing", []):
        if step["id"] == "zero_mean_unit_variance":
            x = (x - x.mean()) / (x.std() + float(step["kwargs"].get("eps", 1e-6)))
    with torch.no_grad():
        y = model(torch.from_numpy(x.astype(np.float32))).numpy()
    print(f"output {y.shape}, test output {expected.shape}: max abs difference "
          f"{float(np.abs(y - expected).max()):.3g} (largest value {float(np.abs(expected).max()):.3g})")


if __name__ == "__main__":
    main(sys.argv[1])

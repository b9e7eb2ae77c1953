#!/usr/bin/env python3
"""Cross-check `watershed::seeded_watershed` against scikit-image, label for label.

Optional (needs numpy, scikit-image, tifffile). Runs the crate's `watershed_tiff` example on
random height maps — continuous, quantised to a few levels (plateaus and ties), and binary —
with random markers (single pixels and blobs, some touching) and random masks, in 2-D and 3-D,
face and full connectivity, and compares with skimage.segmentation.watershed. The flooding
order is chosen from the installed scikit-image: `Classic` for <= 0.24, `Monotone` for >= 0.25.2.

Usage: python3 scripts/crosscheck_watershed.py [--cases N] [--seed S]
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import skimage
import tifffile
from skimage.segmentation import watershed

ROOT = Path(__file__).resolve().parent.parent
EXE = ROOT / "target" / "release" / "examples" / "watershed_tiff"


def random_case(rng, i):
    ndim = 3 if i % 5 == 4 else 2
    shape = tuple(rng.integers(1, 8, size=1)) + tuple(rng.integers(4, 40, size=2)) if ndim == 3 \
        else tuple(rng.integers(1, 60, size=2))
    kind = i % 3
    heights = rng.random(shape).astype("float32")
    if kind == 1:
        heights = (np.floor(heights * 4) / 4).astype("float32")  # 4 levels: plateaus
    elif kind == 2:
        heights = (heights > 0.7).astype("float32")  # binary boundaries
    markers = np.zeros(shape, dtype="uint32")
    n = int(rng.integers(1, 12))
    for k in range(n):
        idx = tuple(int(rng.integers(0, s)) for s in shape)
        markers[idx] = rng.integers(1, 2**31)
        if rng.random() < 0.5:  # grow into a small blob (may touch other markers)
            sl = tuple(slice(max(j - 1, 0), j + 2) for j in idx)
            markers[sl] = markers[idx]
    mask = None
    if rng.random() < 0.5:
        mask = rng.random(shape) > 0.2
    return heights, markers, mask, bool(rng.random() < 0.3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    monotone = tuple(int(x) for x in skimage.__version__.split(".")[:3]) >= (0, 25, 2)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "watershed", "--example", "watershed_tiff"],
                   cwd=ROOT, check=True)
    rng = np.random.default_rng(args.seed)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(args.cases):
            heights, markers, mask, full = random_case(rng, i)
            tifffile.imwrite(tmp / "h.tif", heights, photometric="minisblack")
            tifffile.imwrite(tmp / "m.tif", markers, photometric="minisblack")
            cmd = [str(EXE), str(tmp / "h.tif"), str(tmp / "m.tif"), str(tmp / "o.tif")]
            if mask is not None:
                tifffile.imwrite(tmp / "mask.tif", mask.astype("uint8"), photometric="minisblack")
                cmd += ["--mask", str(tmp / "mask.tif")]
            if full:
                cmd.append("--full")
            if monotone:
                cmd.append("--monotone")
            subprocess.run(cmd, check=True)
            ours = tifffile.imread(tmp / "o.tif").reshape(heights.shape)
            ref = watershed(heights, markers, mask=mask, connectivity=heights.ndim if full else 1)
            if not np.array_equal(ours, ref):
                bad += 1
                print(f"case {i}: shape {heights.shape}, kind {i % 3}, full {full}: "
                      f"{np.count_nonzero(ours != ref)} pixels differ")
    order = "Monotone" if monotone else "Classic"
    print(f"scikit-image {skimage.__version__} ({order}): {args.cases - bad}/{args.cases} cases identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

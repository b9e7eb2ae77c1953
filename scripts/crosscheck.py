#!/usr/bin/env python3
"""Cross-check vimseg's targets and metric against the Python reference stack.

Optional (needs numpy, scipy, scikit-image, tifffile): generates random instance label images,
runs `vimseg targets` and `vimseg evaluate` (through `cargo run --release -p vimseg`), and compares with
  - skimage.segmentation.find_boundaries (thick, connectivity 1) for the boundary targets,
  - torch-em's PerObjectDistanceTransform recipe (re-stated with skimage + scipy's exact EDT),
  - elf's mean_segmentation_accuracy recipe (dense table + scipy linear_sum_assignment).

Usage: python3 scripts/crosscheck.py [--images N] [--seed S]
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from skimage.measure import label, regionprops
from skimage.segmentation import find_boundaries

ROOT = Path(__file__).resolve().parent.parent


def vimseg(*args):
    subprocess.run(["cargo", "run", "--release", "-q", "-p", "vimseg", "--", *map(str, args)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def random_labels(rng, shape=(96, 128), n=25):
    """Overlapping random ellipses painted in order (later ones win), some touching."""
    seg = np.zeros(shape, dtype="uint32")
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i in range(1, n + 1):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        ry, rx = rng.uniform(3, 14), rng.uniform(3, 14)
        seg[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = rng.integers(1, 2**31)
    return seg


def per_object_distances(labels, min_size=25, eps=1e-7):
    labels = label(labels).astype("uint32")
    ids, sizes = np.unique(labels, return_counts=True)
    labels[np.isin(labels, ids[sizes < min_size])] = 0
    labels = _relabel(labels)
    boundaries = find_boundaries(labels, mode="inner").astype("uint32")
    out = np.full((2,) + labels.shape, 1.0, dtype="float32")
    for prop in regionprops(labels):
        bb = tuple(slice(prop.bbox[i], prop.bbox[i + 2]) for i in range(2))
        mask = labels[bb] == prop.label
        center = tuple(int(c) - b.start for c, b in zip(np.round(prop.centroid), bb))
        bd = ndimage.distance_transform_edt(boundaries[bb] == 0).astype("float32")
        bd[~mask] = 0
        peak = np.unravel_index(np.argmax(bd), bd.shape)
        if not mask[center]:
            center = peak
        yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
        dc = np.sqrt((yy - center[0]) ** 2 + (xx - center[1]) ** 2).astype("float32")
        db = bd[peak] - bd
        dc[~mask] = 0
        db[~mask] = 0
        dc /= np.abs(dc).max() + eps
        db /= np.abs(db).max() + eps
        out[0][bb][mask] = dc[mask]
        out[1][bb][mask] = db[mask]
    return (labels > 0).astype("float32"), out


def _relabel(labels):
    ids = np.unique(labels)
    ids = ids[ids != 0]
    lut = np.zeros(labels.max() + 1, dtype="uint32")
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[labels]


def elf_msa(seg, gt):
    pids, pinv = np.unique(seg, return_inverse=True)
    gids, ginv = np.unique(gt, return_inverse=True)
    table = np.zeros((len(pids), len(gids)))
    np.add.at(table, (pinv.ravel(), ginv.ravel()), 1)
    iou = table / np.maximum(table.sum(1, keepdims=True) + table.sum(0, keepdims=True) - table, 1e-7)
    if 0 in pids:
        iou = np.delete(iou, np.searchsorted(pids, 0), axis=0)
    if 0 in gids:
        iou = np.delete(iou, np.searchsorted(gids, 0), axis=1)
    n_pred, n_true = iou.shape
    n_matched = min(n_pred, n_true)
    accs = []
    for t in np.arange(0.5, 1.0, 0.05):
        tp = 0
        if n_matched > 0 and np.any(iou >= t):
            r, c = linear_sum_assignment(-(iou >= t).astype(float) - iou / (2 * n_matched))
            tp = int(np.count_nonzero(iou[r, c] >= t))
        accs.append(tp / (n_pred + n_true - tp) if tp > 0 else 0.0)
    return float(np.mean(accs)), accs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    worst = {"boundaries": 0, "cremi": 0, "distances": 0.0, "msa": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "gt").mkdir()
        (tmp / "pred").mkdir()
        expected = {}
        for i in range(args.images):
            gt = random_labels(rng)
            pred = random_labels(rng) if i % 2 else np.where(rng.random(gt.shape) < 0.02, 0, gt)
            name = f"img{i:03d}.tif"
            tifffile.imwrite(tmp / "gt" / name, gt)
            tifffile.imwrite(tmp / "pred" / name, pred)
            expected[name] = elf_msa(pred, gt)

            vimseg("targets", "--labels", tmp / "gt" / name, "--setting", "livecell-boundaries", "--out", tmp / "b.tif")
            ours = tifffile.imread(tmp / "b.tif")
            ref = np.stack([(gt != 0), find_boundaries(gt, mode="thick")]).astype("float32")
            worst["boundaries"] += int(np.count_nonzero(ours != ref))

            vimseg("targets", "--labels", tmp / "gt" / name, "--setting", "cremi", "--out", tmp / "c.tif")
            ours = tifffile.imread(tmp / "c.tif")
            worst["cremi"] += int(np.count_nonzero(ours != find_boundaries(gt, mode="thick")))

            vimseg("targets", "--labels", tmp / "gt" / name, "--setting", "livecell-distances", "--out", tmp / "d.tif")
            ours = tifffile.imread(tmp / "d.tif")
            fg, dist = per_object_distances(gt)
            assert np.array_equal(ours[0], fg), f"{name}: foreground differs"
            worst["distances"] = max(worst["distances"], float(np.abs(ours[1:] - dist).max()))

        out = subprocess.run(["cargo", "run", "--release", "-q", "-p", "vimseg", "--", "evaluate", "--gt", tmp / "gt", "--pred", tmp / "pred", "--json"],
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout
        for image in json.loads(out)["images"]:
            ref, accs = expected[image["name"]]
            worst["msa"] = max(worst["msa"], abs(image["msa"] - ref))
    print(f"{args.images} random images, seed {args.seed}")
    print(f"  livecell-boundaries: pixels differing from skimage find_boundaries + fg: {worst['boundaries']}")
    print(f"  cremi:               pixels differing from skimage find_boundaries:      {worst['cremi']}")
    print(f"  livecell-distances:  max |difference| to the torch-em recipe (scipy EDT): {worst['distances']:.2e}")
    print(f"  evaluate:            max |mSA difference| to elf's recipe:                {worst['msa']:.2e}")
    ok = worst["boundaries"] == 0 and worst["cremi"] == 0 and worst["distances"] < 1e-5 and worst["msa"] < 1e-12
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

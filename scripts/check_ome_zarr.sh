#!/usr/bin/env bash
# Reads OME-Zarr outputs the way viewers do: ome-zarr-py's reader (what napari's OME-Zarr
# plugin calls) and ome-zarr-models' validation of the metadata, both from PyPI, in a private
# virtual environment.
#
#   scripts/check_ome_zarr.sh V3_GROUP V2_GROUP [V3_GROUP V2_GROUP ...]
#
# Each pair is one output written as Zarr v3 (OME-Zarr 0.5) and as Zarr v2 (OME-Zarr 0.4): each
# group must validate as its version, open in the reader as a multiscale image (and as labels
# when it declares `image-label`), and the two must hold equal arrays. Exits 1 otherwise.
# Where Python cannot make a virtual environment or the packages cannot be installed (no
# network), it says "skipped: ..." and exits 0.
set -euo pipefail
[ "$#" -ge 2 ] && [ $(($# % 2)) = 0 ] || { echo "usage: $0 V3_GROUP V2_GROUP..." >&2; exit 2; }
venv="${OME_ZARR_VENV:-${TMPDIR:-/tmp}/vimseg-ome-zarr-venv}"
. "$(dirname "$0")/python-venv.sh"
ensure_venv "$venv" "import ome_zarr, ome_zarr_models" "ome-zarr>=0.11" "ome-zarr-models>=1.0"
"$venv/bin/python" - "$@" <<'PY'
import json
import sys
from pathlib import Path

import numpy as np
import ome_zarr
import ome_zarr_models
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Reader
from ome_zarr_models import open_ome_zarr

failed = False


def fail(msg):
    global failed
    failed = True
    print(f"  FAILED: {msg}")


def attributes(group: Path) -> dict:
    if (group / "zarr.json").is_file():
        return json.loads((group / "zarr.json").read_text())["attributes"]["ome"]
    return json.loads((group / ".zattrs").read_text())


def check(group: Path, version: str):
    print(f"{group}:")
    try:
        model = open_ome_zarr(str(group), version=version)
        print(f"  ome-zarr-models {ome_zarr_models.__version__}: valid OME-Zarr {version} "
              f"({type(model).__module__}.{type(model).__name__})")
    except Exception as e:  # the validator's own message says what is wrong
        fail(f"not valid OME-Zarr {version}: {str(e)[:400]}")
    wants_labels = "image-label" in attributes(group)
    nodes = list(Reader(parse_url(str(group)))())
    if not nodes:
        fail("ome-zarr-py's reader found nothing")
        return None
    specs = [type(s).__name__ for s in nodes[0].specs]
    print(f"  ome-zarr-py {ome_zarr.__version__} reader: {', '.join(specs)}")
    if not any(isinstance(s, Multiscales) for s in nodes[0].specs):
        fail("not read as a multiscale image")
    if wants_labels != any(isinstance(s, Label) for s in nodes[0].specs):
        fail(f"image-label declared: {wants_labels}, read as labels: {not wants_labels}")
    data = np.asarray(nodes[0].data[0])
    print(f"  array {data.shape} {data.dtype}, {len(np.unique(data))} distinct values, "
          f"axes {[a['name'] for a in nodes[0].metadata.get('axes', [])]}"
          + (", labels" if wants_labels else ""))
    return data


args = [Path(p) for p in sys.argv[1:]]
for v3, v2 in zip(args[::2], args[1::2]):
    a = check(v3, "0.5")
    b = check(v2, "0.4")
    if a is not None and b is not None:
        if a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b):
            print(f"  {v3.name} and {v2.name} hold equal arrays")
        else:
            fail(f"{v3} and {v2} differ")
sys.exit(1 if failed else 0)
PY

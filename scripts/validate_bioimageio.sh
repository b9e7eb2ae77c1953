#!/usr/bin/env bash
# Validates bioimage.io model packages with bioimageio.spec, installed from PyPI into a private
# virtual environment.
#
#   scripts/validate_bioimageio.sh model.zip [more.zip ...]
#
# Exits 1 when a package is invalid. Where Python cannot make a virtual environment or the
# package cannot be installed (no network), it says "skipped: ..." and exits 0.
set -euo pipefail
[ "$#" -ge 1 ] || { echo "usage: $0 PACKAGE.zip..." >&2; exit 2; }
venv="${BIOIMAGEIO_VENV:-${TMPDIR:-/tmp}/vimseg-bioimageio-venv}"
. "$(dirname "$0")/python-venv.sh"
ensure_venv "$venv" "import bioimageio.spec" "bioimageio.spec>=0.5.4,<0.6"
"$venv/bin/python" - "$@" <<'PY'
import sys

import bioimageio.spec
from bioimageio.spec import load_description

failed = False
for path in sys.argv[1:]:
    summary = load_description(path, perform_io_checks=True).validation_summary
    print(f"{path}: {summary.status} (bioimageio.spec {bioimageio.spec.__version__}, "
          f"format {summary.format_version})")
    for detail in summary.details:
        for e in detail.errors:
            print(f"  error at {'.'.join(map(str, e.loc))}: {e.msg[:300]}")
        for w in detail.warnings:
            print(f"  warning at {'.'.join(map(str, w.loc))}: {w.msg}")
    failed |= summary.status not in ("valid-format", "passed")
sys.exit(1 if failed else 0)
PY

#!/usr/bin/env bash
# The GPU check: runs on a machine with an NVIDIA GPU from an xtask binary built elsewhere with
#   eval "$(bash scripts/cuda-toolchain.sh)"
#   cargo build --release -p xtask --features cuda      # -> target/cuda/release/xtask
# The GPU machine needs no Rust toolchain and no network: only the CUDA 13 driver and the CUDA 13
# libraries the binary links (libnvrtc.so.13, libcublas(Lt).so.13, libcurand.so.10,
# libcudart.so.13), found in python3's nvidia-* wheels, in /usr/local/cuda, or on the loader path.
#
# Usage: bash scripts/gpu-check.sh [BINARY or BINARY.xz from scripts/gpu-pack.sh] [OUT_DIR]
# Writes OUT_DIR/gpu-check.jsonl (see `xtask gpu-check --help`), the logs (at most 8 files,
# scratch data goes to $WORK, default /tmp/vimseg-gpu-work), and with
# EXPERIMENT_SECONDS > 0 (default 240) also runs `experiment cremi --profile quick` on the GPU
# within that many seconds.
set -uo pipefail
bin="${1:-target/cuda/release/xtask}"
out="${2:-gpu-check-out}"
mkdir -p "$out"
log="$out/gpu-check.jsonl"
started=$(date +%s)

note() { printf '{"check":"script","%s":%s}\n' "$1" "$2" | tee -a "$log"; }

# A packed binary (scripts/gpu-pack.sh) is unpacked first.
if [[ "$bin" == *.xz ]]; then
  unpacked="${TMPDIR:-/tmp}/vimseg-xtask"
  if command -v xz >/dev/null; then
    xz -dc "$bin" > "$unpacked"
  else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$bin" "$unpacked"
  fi
  chmod +x "$unpacked"
  bin="$unpacked"
fi
if [[ ! -x "$bin" ]]; then
  note error "\"$bin is not an executable; build it with --features cuda first\""
  exit 1
fi

# The CUDA 13 user-space libraries: pip wheels of the Python environment first.
libdirs=$(python3 - 2>/dev/null <<'PY'
import glob, os
dirs = set()
try:
    import nvidia
    for root in nvidia.__path__:
        for so in glob.glob(os.path.join(root, "**", "lib*.so*"), recursive=True):
            dirs.add(os.path.dirname(so))
except Exception:
    pass
print(":".join(sorted(dirs)))
PY
)
for d in /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [[ -d "$d" ]] && libdirs="${libdirs:+$libdirs:}$d"
done
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
  > "$out/nvidia-smi.txt" 2>&1 || true
ldd "$bin" > "$out/ldd.txt" 2>&1 || true
if grep -q "not found" "$out/ldd.txt"; then
  missing=$(grep "not found" "$out/ldd.txt" | awk '{print $1}' | paste -sd, -)
  note error "\"libraries not found: $missing (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)\""
  exit 1
fi
note libraries "\"$(grep -E 'cuda|nvrtc|cublas|curand' "$out/ldd.txt" | awk '{print $1 "=" $3}' | paste -sd' ' -)\""

status=0
work="${WORK:-/tmp/vimseg-gpu-work}"
"$bin" gpu-check --out "$out" --work "$work" 2>&1 | tee "$out/gpu-check.log" || status=1
note gpu_check_seconds "$(( $(date +%s) - started ))"

budget="${EXPERIMENT_SECONDS:-240}"
if (( budget > 0 )); then
  t0=$(date +%s)
  timeout "$budget" "$bin" experiment cremi --device cuda --out "$work/experiment" \
    > "$out/experiment.log" 2>&1
  rc=$?
  note experiment "{\"exit\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}"
  # The report's tables, for the record.
  for d in "$work"/experiment/cremi-quick-*/; do
    [[ -f "$d/results.md" ]] && cp "$d/results.md" "$out/experiment-results.md"
    [[ -f "$d/msa.png" ]] && cp "$d/msa.png" "$out/experiment-msa.png"
  done
fi
note total_seconds "$(( $(date +%s) - started ))"
exit $status

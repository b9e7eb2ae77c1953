#!/usr/bin/env bash
# Installs a project-local CUDA 13.0 toolchain (compiler, runtime, NVRTC, cuBLAS,
# cuRAND) from PyPI wheels into .cuda/ and prints the environment for
#   cargo build --release -p xtask --features cuda
# Idempotent: a second run only prints the environment.
#
# The toolkit is pinned to 13.0 so that the PTX it writes loads on a CUDA 13.0
# driver (R580). The wheels carry no driver, so .cuda/link/ also gets a stub
# libcuda.so.1 whose every entry point returns CUDA_ERROR_NO_DEVICE: it lets the
# binary link and start on a machine without a GPU; on a GPU machine the real
# driver's libcuda.so.1 is found first (see scripts/gpu-check.sh).
#
# Usage: eval "$(bash scripts/cuda-toolchain.sh)"
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.cuda"
cu="$dest/wheels/nvidia/cu13"
link="$dest/link"

packages=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
)
stamp="$dest/installed-$(printf '%s\n' "${packages[@]}" | sha256sum | cut -c1-16)"

if [[ ! -f "$stamp" ]]; then
  echo "installing CUDA 13.0 wheels into $dest/wheels (about 1.2 GB)" >&2
  rm -rf "$dest/wheels"
  mkdir -p "$dest"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$dest/wheels" "${packages[@]}" >&2
  [[ -x "$cu/bin/nvcc" ]] || { echo "error: $cu/bin/nvcc missing after install" >&2; exit 1; }
  touch "$stamp"
fi

if [[ ! -f "$link/libcuda.so.1" ]]; then
  mkdir -p "$link"
  # Unversioned names for the linker (the wheels ship only .so.N).
  for l in nvrtc:libnvrtc.so.13 curand:libcurand.so.10 cublas:libcublas.so.13 \
           cublasLt:libcublasLt.so.13 cudart:libcudart.so.13; do
    target="$cu/lib/${l#*:}"
    [[ -e "$target" ]] || { echo "error: $target missing" >&2; exit 1; }
    ln -sf "$target" "$link/lib${l%%:*}.so"
  done
  # Driver stub: one function per cu* entry point declared in the toolkit's
  # driver headers (a superset of what cudarc references).
  headers=()
  for h in cuda.h cudaGL.h cudaEGL.h cudaVDPAU.h cudaProfiler.h; do
    [[ -f "$cu/include/$h" ]] && headers+=("$cu/include/$h")
  done
  { grep -hoE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' "${headers[@]}" || true; } \
    | sed -E 's/\s*\($//' > "$link/symbols.txt"
  # cuda.h maps many names to _v2/_v3/_ptds variants with #define; stub those too.
  { grep -hoE '#define\s+cu[A-Z][A-Za-z0-9_]*\s+cu[A-Z][A-Za-z0-9_]*' "${headers[@]}" || true; } \
    | awk '{print $2; print $3}' >> "$link/symbols.txt"
  sort -u -o "$link/symbols.txt" "$link/symbols.txt"
  awk '{print "int " $1 "(void) { return 100; }"}' "$link/symbols.txt" > "$link/stub.c"
  cc -shared -fPIC -o "$link/libcuda.so.1" "$link/stub.c" -Wl,-soname,libcuda.so.1
  ln -sf libcuda.so.1 "$link/libcuda.so"
fi

cat <<ENV
export CUDA_HOME="$cu" CUDA_PATH="$cu" PATH="$cu/bin:\$PATH"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13000
export CARGO_TARGET_DIR="$root/target/cuda"
export RUSTFLAGS="\${RUSTFLAGS:-} -L native=$link"
export RUSTDOCFLAGS="\${RUSTDOCFLAGS:-} -L native=$link"
export LD_LIBRARY_PATH="$link:$cu/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
ENV

#!/usr/bin/env bash
# Builds `lcm` with the `cuda` feature on a machine with no CUDA toolkit and no GPU.
#
# nvcc, the CUDA headers and the libraries candle links against (cudart, cuBLAS, cuRAND, NVRTC)
# come from NVIDIA's PyPI wheels, pinned to CUDA 13.0: the PTX it emits is accepted by driver 580
# (CUDA 13.0), and the library sonames (libcublas.so.13, libcudart.so.13, libnvrtc.so.13,
# libcurand.so.10) are the ones PyTorch's cu130 wheels put on a GPU machine.
#
#   scripts/build-cuda.sh                 # target/cuda/release/lcm + the GPU parity test binary
#   CUDA_COMPUTE_CAP=89 scripts/build-cuda.sh   # another GPU generation (default 90: H100/H200)
#
# Environment: LCM_CUDA_HOME (where the toolkit is assembled, default ~/.cache/lcm-cuda),
# PYTHON (a Python with pip, default python3), CARGO_TARGET_DIR (default target/cuda).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
home="${LCM_CUDA_HOME:-$HOME/.cache/lcm-cuda}"
python="${PYTHON:-python3}"
site="$home/site"
root="$site/nvidia/cu13"      # the wheels unpack into one toolkit-shaped tree: bin include lib nvvm

wheels=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-cccl==13.0.85"
  "nvidia-cuda-nvrtc==13.0.88"
  "nvidia-cublas==13.0.2.14"
  "nvidia-curand==10.4.0.35"
)

stamp="$home/wheels.txt"
if [[ ! -x "$root/bin/nvcc" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "${wheels[*]}" ]]; then
  echo "fetching CUDA 13.0 from PyPI into $site" >&2
  rm -rf "$site"
  mkdir -p "$site"
  "$python" -m pip install --quiet --no-deps --only-binary=:all: --target "$site" "${wheels[@]}"
  echo "${wheels[*]}" >"$stamp"
fi

# The wheels ship versioned sonames only; the linker's -lcublas needs the unversioned names.
lib="$root/lib"
for so in "$lib"/lib*.so.*; do
  base="${so%%.so.*}.so"
  [[ -e "$base" ]] || ln -s "$(basename "$so")" "$base"
done

# libcuda.so comes with the GPU driver, not with any wheel. Linking needs a stub that names
# every driver function the binary calls and carries the driver's soname (libcuda.so.1); at run
# time the real driver library is loaded in its place (what the toolkit's lib/stubs is for).
stub="$lib/stubs/libcuda.so"
if [[ ! -e "$stub" ]]; then
  mkdir -p "$lib/stubs"
  cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort -V | tail -1)"
  if [[ -z "$cudarc" ]]; then
    (cd "$repo" && cargo fetch --quiet)
    cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1)"
  fi
  grep -hoE 'pub unsafe fn cu[A-Za-z0-9_]+' "$cudarc/src/driver/sys/mod.rs" | sed 's/pub unsafe fn //' | sort -u |
    awk '{ print "void " $1 "(void) {}" }' >"$lib/stubs/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$lib/stubs/libcuda_stub.c"
fi

export CUDA_ROOT="$root" CUDA_PATH="$root"
export PATH="$root/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$lib:$lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target/cuda}"
nvcc --version | tail -2 >&2

cd "$repo"
cargo build --release --features cuda --bin lcm "$@"
# The engine tests (tests/engine/, whose `device::` module is the GPU parity check) as one
# executable, for scripts/device-check.sh.
tests_exe="$(cargo test --release --features cuda --test engine --no-run --message-format=json "$@" |
  "$python" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "engine":
        print(m["executable"])' | tail -1)"
echo "built $CARGO_TARGET_DIR/release/lcm and $tests_exe (CUDA 13.0, sm_$CUDA_COMPUTE_CAP)" >&2

# What a GPU machine with no network needs (scripts/device-check.sh; copy dist/ along with the
# checkout): both executables stripped and xz-compressed, and the diffusers wheel (pure Python;
# the GPU image has PyTorch but not diffusers). dist/ is git-ignored.
if [[ "${LCM_CUDA_DIST:-1}" == 1 ]]; then
  dist="$repo/dist/cuda"
  rm -rf "$dist" && mkdir -p "$dist/wheels"
  for exe in "$CARGO_TARGET_DIR/release/lcm:lcm" "$tests_exe:device-tests"; do
    strip -o "$dist/${exe##*:}" "${exe%%:*}"
    xz -T0 -6 "$dist/${exe##*:}"
  done
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dist/wheels" \
    "diffusers==0.42.1" "importlib_metadata==8.7.0" "zipp==3.23.0"
  echo "packed $(du -sh "$dist" | cut -f1) into $dist" >&2
fi

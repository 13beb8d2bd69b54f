#!/usr/bin/env bash
# The GPU check of CUDA support, for a machine with an NVIDIA GPU, PyTorch (CUDA 13 wheels) and no
# network. Everything it needs travels with the checkout. Build first (no GPU needed) with
#   scripts/build-cuda.sh            # writes dist/cuda/{lcm.xz, device-tests.xz, wheels/}
# then copy the checkout with its dist/ to the GPU machine and run this in its root:
#   scripts/device-check.sh [sd15|sdxl|parity ...]     # default: parity sd15 sdxl
# Within 10 minutes (times estimated, not yet measured): `parity sd15` (SD1.5's 4 GB of random
# weights are written first), then `sdxl` (14 GB) in a second run on the same machine.
# Results go to $OUT (default /tmp/lcm-device-check): gpu.txt, rng.txt, parity.txt, and per model
# lcm_<model>.json (lcm bench) and <model>.md (lcm vs diffusers, same card, same weights).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/lcm-device-check}"
mkdir -p "$out"
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(parity sd15 sdxl)
status=0
note() { echo "== $* ($(date +%T))" | tee -a "$out/summary.txt"; }

# Executables built elsewhere, unpacked outside the checkout.
bin=/tmp/lcm-bin
mkdir -p "$bin"
for exe in lcm device-tests; do
  xz -dc "dist/cuda/$exe.xz" >"$bin/$exe" && chmod +x "$bin/$exe" || { echo "dist/cuda/$exe.xz missing: run scripts/build-cuda.sh and carry dist"; exit 2; }
done

# CUDA libraries: the driver's libcuda; cuBLAS, cuRAND, cudart, NVRTC from PyTorch's cu13 wheels.
libs="$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for f in glob.glob(os.path.join(sp, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)"
export LD_LIBRARY_PATH="$libs:/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)'; } >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
if ldd "$bin/lcm" | grep "not found"; then
  echo "missing CUDA libraries (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"; exit 2
fi

# diffusers is not in the GPU image: install the carried wheel.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lcm-site dist/cuda/wheels/*.whl && export PYTHONPATH=/tmp/lcm-site

# Seeds: this machine's PyTorch draws float16 / bfloat16 noise as the committed references say
# (which lcm reproduces bit for bit, tests/rng.rs).
note "rng: which committed half-precision draws (tests/fixtures/reference/rng_half_torch*) this PyTorch makes"
python3 tests/fixtures/make_rng_half_fixtures.py --check 2>&1 | tee "$out/rng.txt" || status=1

for step in "${steps[@]}"; do
  case "$step" in
    parity)
      note "parity: tests/engine/device.rs on cuda (f16) vs diffusers float16 images"
      LCM_TEST_DEVICE=cuda LCM_FIXTURES="$PWD/tests/fixtures" timeout 180 "$bin/device-tests" device:: --nocapture 2>&1 | tee "$out/parity.txt"
      [[ ${PIPESTATUS[0]} == 0 ]] || status=1
      ;;
    sd15 | sdxl)
      note "$step: lcm bench --device cuda (f16), then diffusers fp16 on the same weights"
      # Random weights at the real configs, written once to local disk (no download).
      timeout 300 "$bin/lcm" bench --model "$step" --device cuda --dir "/tmp/lcm-bench-$step" --warmup 1 --runs 3 --json >"$out/lcm_$step.json" || status=1
      timeout 300 python3 benches/bench_diffusers.py "$out/lcm_$step.json" 2>&1 | grep -v "it/s" | tee "$out/$step.md" || status=1
      ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
done
note "done, status $status"
exit $status

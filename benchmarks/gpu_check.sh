#!/usr/bin/env bash
# Proof on a GPU machine, in one command (the lent H200: Python 3.12 as python3, torch preinstalled,
# no network): builds the extension in place for sm_90 against the installed torch (installs
# nothing), runs the CUDA tests and the GPU benchmark, and writes everything under ${OUT:-gpu-results}/.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
log="$out/gpu_check.log"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
{
  echo "== $(date -u) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
  # Build in place, against the torch already installed (no isolated build environment, no index).
  python3 setup.py build_ext --inplace 2>&1 | tail -3
  python3 -m peagle_ext info
  echo "== CUDA tests"
  python3 -m pytest -q -rs tests/mask/test_cuda.py tests/draft/test_draft_gpu.py tests/mask/test_exactness.py \
    tests/mask/test_flex_output.py tests/mask/test_validation.py
  echo "== GPU benchmark"
  python3 -m peagle_ext bench --device cuda --compiled --compiled-max-len 65536 \
    --lengths 4096 8192 16384 32768 65536 --json "$out/bench-gpu.json"
} 2>&1 | tee "$log"

#!/usr/bin/env bash
# Proof on a GPU machine, in one command (fits in 8 minutes on an H200):
# builds the extension for sm_90, runs the CUDA tests and the GPU benchmark (lengths 4K to 64K,
# with compiled create_block_mask), and writes everything under ${OUT:-gpu-results}/.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
log="$out/gpu_check.log"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
{
  echo "== $(date -u) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
  python -m pip install -q "torch==2.14.1" ninja pybind11 setuptools wheel pytest hypothesis safetensors
  # Build in place, against the torch already installed (no isolated build environment).
  python setup.py build_ext --inplace 2>&1 | tail -3
  python -m peagle_ext info
  echo "== CUDA tests"
  python -m pytest -q -rs tests/test_cuda.py tests/test_draft_gpu.py
  python -m pytest -q -rs tests/test_exactness.py tests/test_flex_output.py tests/test_validation.py -k cuda
  echo "== GPU benchmark"
  python -m peagle_ext bench --device cuda --compiled --compiled-max-len 65536 \
    --lengths 4096 8192 16384 32768 65536 --json "$out/bench-gpu.json"
} 2>&1 | tee "$log"

#!/usr/bin/env bash
# The CUDA kernel's proof on a GPU machine, in one command of at most 8 minutes on an H200, the
# build included. It installs nothing and needs no network: python3 with torch (2.10 or later) and
# pytest already installed, nvcc on the PATH or under CUDA_HOME.
#
#   bash benchmarks/gpu_check.sh
#
# 1. builds the extension in place for sm_90 against the installed torch (python3 setup.py build_ext --inplace);
# 2. runs the CUDA tests: exactness against create_block_mask on the GPU for every GPU backend, the
#    emulated pipeline's bytes, CUDA-graph capture and replay, no host sync under
#    set_sync_debug_mode("error"), the launch count, CUDA vs CPU at N up to 200K (tests/mask/test_cuda.py);
#    the interval engine's CUDA kernel against the CPU kernel, captured in a graph (tests/mask/test_intervals.py);
# 3. the GPU benchmark: CUDA events, S = 4K..64K, 8 depths, ours against compiled and eager
#    create_block_mask, peak CUDA memory, host syncs, one table, written to
#    benchmarks/results/<card>.md (h100, h200, ...) with the raw figures in <card>.json, and each target
#    met or missed appended to it (benchmarks/targets.py);
#    then where a build's time goes: host time per build against throughput, and the profiler's
#    table of ops and kernels (benchmarks/profile_build.py);
# 4. compiled flex_attention forward and backward in bf16 through the draft model, our mask equal
#    to the oracle's (tests/draft/test_draft_gpu.py);
# 5. compute-sanitizer memcheck and racecheck over one small build, where the tool works;
# 6. the rest of the mask suite on this machine (the CUDA backend joins the exactness suite).
# Each stage gets what is left of the 8 minutes (capped per stage); the summary at the end lists
# each stage's exit status and time. The log goes to ${OUT:-benchmarks/results}/gpu_check.log, and
# where $OUT is set (a folder collected after the run) the results are copied there too.
set -uo pipefail
cd "$(dirname "$0")/.."
results=benchmarks/results
mkdir -p "$results"
log_dir="${OUT:-$results}"
mkdir -p "$log_dir"
log="$log_dir/gpu_check.log"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
# The checkout's package and its in-place build, also for scripts run by path (whose own folder
# would come first on sys.path): nothing is installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-8}"
# Result files are named after the card that produced them (h100.json, h200.json, ...).
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o -i -E 'h100|h200|b200|a100|l40s|l4' | head -1 | tr '[:upper:]' '[:lower:]')
card=${card:-gpu}
budget=${GPU_CHECK_SECONDS:-470}  # of the 480 s allowed: the summary and copies need a few
summary=()
status=0

# stage NAME CAP_SECONDS COMMAND...: run COMMAND under what is left of the budget (at most CAP).
stage() {
  local name=$1 cap=$2
  shift 2
  local left=$((budget - SECONDS))
  if ((left < 20)); then
    summary+=("$name: not run (no time left)")
    status=1
    return 1
  fi
  local limit=$((left < cap ? left : cap)) start=$SECONDS rc
  echo "== $name (at most ${limit} s)"
  timeout --kill-after=5 "$limit" "$@"
  rc=$?
  ((rc == 124)) && echo "== $name: stopped at its ${limit} s limit"
  summary+=("$name: exit $rc, $((SECONDS - start)) s")
  ((rc != 0)) && status=1
  return "$rc"
}

# compute-sanitizer over one small build on the GPU; its verdict goes into the log.
sanitize() {
  local tool=$1
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found"; return 0; }
  compute-sanitizer --tool "$tool" --error-exitcode 3 python3 -c "
import torch, peagle_ext
a, d = peagle_ext.generate_cod_sample_indices(1500, torch.ones(1500), generator=torch.Generator().manual_seed(0))
m = peagle_ext.build_block_mask(a.cuda(), d.cuda(), torch.tensor([700, 800]).cuda(), 1500, backend='cuda',
                                sliding_window=100, BLOCK_SIZE=(128, 64), validate=False)
c = peagle_ext.build_block_mask(a, d, torch.tensor([700, 800]), 1500, backend='cpu', sliding_window=100, BLOCK_SIZE=(128, 64))
peagle_ext.assert_block_masks_equal(m, c); print('$tool: build ran, mask equals the CPU kernel')"
}
export -f sanitize

{
  echo "== $(date -u) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
  echo "== python3 $(python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda)')"
  # Build in place against the torch already installed: no isolated build environment, no index.
  stage build 200 bash -c "python3 setup.py build_ext --inplace > '$log_dir/build.log' 2>&1; rc=\$?; tail -3 '$log_dir/build.log'; exit \$rc"
  python3 -m peagle_ext info
  # A build that fell back to the CPU kernel alone would let every CUDA test skip: stop here instead.
  stage cuda-runs 30 python3 -c "from peagle_ext import _native; s = _native.native_status(); assert s['cuda'] is None, s" ||
    { printf '  %s\n' "${summary[@]}"; exit 1; }
  export PEAGLE_EXT_REQUIRE_NATIVE=1
  stage cuda-tests 150 python3 -m pytest -q -rs -p no:cacheprovider tests/mask/test_cuda.py tests/mask/test_intervals.py
  stage benchmark 170 python3 -m peagle_ext bench --device cuda --compiled --compiled-max-len 65536 \
    --lengths 4096 8192 16384 32768 65536 --depths 8 --repeats 50 --budget-s 2 \
    --json "$results/$card.json" --markdown "$results/$card.md"
  stage targets 10 python3 benchmarks/targets.py "$results/$card.json" --markdown "$results/$card.md"
  # Now, not at the end: a run stopped later (by a limit outside this script) still leaves them in $OUT.
  [[ -n "${OUT:-}" ]] && cp -f "$results/$card.md" "$results/$card.json" "$OUT"/ 2>/dev/null
  stage profile 40 python3 benchmarks/profile_build.py --device cuda --lengths 8192 65536
  stage draft-gpu-tests 150 python3 -m pytest -q -rs -p no:cacheprovider tests/draft/test_draft_gpu.py
  stage memcheck 45 bash -c "sanitize memcheck"
  stage racecheck 45 bash -c "sanitize racecheck"
  stage mask-suite 90 python3 -m pytest -q -rs -p no:cacheprovider tests/mask/test_exactness.py \
    tests/mask/test_flex_output.py tests/mask/test_validation.py tests/mask/test_native.py
  echo "== summary ($SECONDS s in all)"
  printf '  %s\n' "${summary[@]}"
  exit "$status"
} 2>&1 | tee "$log"

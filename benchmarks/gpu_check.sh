#!/usr/bin/env bash
# Everything that needs a GPU, in one command: build the CUDA library, run the `cuda` tests, run the CUDA
# kernels under compute-sanitizer (memcheck, racecheck, synccheck, initcheck) and the benchmarks.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default OUT_DIR: benchmarks/results)
#
# PY selects the Python that has torch (default: .venv/bin/python if present, else python3); STEPS selects the
# steps (default "build kernels test sanitize bench"; kernels: the device time of every kernel of each fused
# op at its benchmark shape, benchmarks/kernel_times.py, Triton at its fixed configs); TEST_ARGS and
# BENCH_ARGS replace the pytest arguments of the test and bench steps (e.g. a -k selection), SANITIZE_TOOLS
# the compute-sanitizer tools and SANITIZE_ARGS the arguments of benchmarks/sanitize.py (e.g. "--ops
# masked_attention"). Time limits in seconds: STEP_TIMEOUT for every step, BUILD_TIMEOUT, KERNELS_TIMEOUT,
# TEST_TIMEOUT, SANITIZE_TIMEOUT and BENCH_TIMEOUT for one step, DEADLINE for the whole script (a step gets at
# most what is left of it; a step with under 10 s left is skipped and counted as failed). The tests run on
# TEST_WORKERS processes (default: up to 8 where pytest-xdist is installed), each result printed as it comes,
# so a step cut off by its limit still shows what passed. They run the Triton kernels at their fixed configs
# (TEST_TRITON_AUTOTUNE=1 autotunes them, seconds per shape); the benchmarks always autotune. QUICK=1 fits a
# 10-minute command (DEADLINE 560 s): the kernel times (45 s at most), then the benchmarks: the point-loss
# benchmarks, the host-time profile of an op call, the masked-attention ones at 50 % density (forward +
# backward; float32, and bfloat16 at K=1024) and the MaskedMultiheadAttention module against
# nn.MultiheadAttention (260 s: on a fresh H200 they ran 55 s once compiled, and over 180 s compiling Triton's
# autotune configs and FlexAttention), then the cuda tests of the masked-attention and point-loss ops, the nn
# modules and the deformable-attention ops in that order (130 s; on an H200 with 8 processes they took 80-115
# s), and memcheck with the time left (140 s on the H200). The full run's tests add the transformers
# integration.
# The build step runs `setup.py build_ext --inplace`, or where the Python's setuptools is older than 77 (too
# old for pyproject.toml) benchmarks/build_inplace.py, which builds the same library without reading it, with
# the CUDA toolkit that torch finds (CUDA_HOME, else the nvcc on PATH, else /usr/local/cuda), and fails unless
# the library has the CUDA kernels. Later
# steps never build the library on first use (M2F_KERNELS_NO_JIT=1): a build cut off by a step's timeout
# would leave a lock that every later step waits on.
# Logs and the results JSON go to OUT_DIR, named after the device and the commit (M2F_BENCH_COMMIT if
# set), with "-quick" added for QUICK runs; the script goes on after a failing step and exits non-zero if
# any step failed. compute-sanitizer runs with PyTorch's caching allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1),
# which would otherwise hide overruns inside its cached blocks; SANITIZER names the binary (default: the one
# on PATH, else $CUDA_HOME/bin/compute-sanitizer).
set -u
OUT_DIR=${1:+$(realpath -m -- "$1")}  # a relative OUT_DIR is where the script was started from
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-benchmarks/results}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ "${QUICK:-0}" = 1 ]; then
  STEPS=${STEPS:-build kernels bench test sanitize}
  TEST_ARGS=${TEST_ARGS:-tests/ops/test_masked_attention_backends.py tests/ops/test_point_mask_loss_backends.py \
    tests/ops/test_pairwise_mask_cost_backends.py tests/ops/test_point_sample_backends.py \
    tests/ops/test_sample_uncertain_points.py tests/nn tests/ops/test_ms_deform_attn_backends.py \
    tests/ops/test_ms_deform_attn_fused_backends.py}
  SANITIZE_TOOLS=${SANITIZE_TOOLS:-memcheck}
  BENCH_ARGS=${BENCH_ARGS:-benchmarks/bench_point_loss.py benchmarks/bench_call_overhead.py benchmarks/bench_masked_attention.py -k \"host_profile or point or module or (density50 and full and (float32 or K1024))\"}
  DEADLINE=${DEADLINE:-560}
  BUILD_TIMEOUT=${BUILD_TIMEOUT:-200}
  KERNELS_TIMEOUT=${KERNELS_TIMEOUT:-45}
  BENCH_TIMEOUT=${BENCH_TIMEOUT:-260}
  TEST_TIMEOUT=${TEST_TIMEOUT:-130}
fi
STEPS=${STEPS:-build kernels test sanitize bench}
export M2F_KERNELS_NO_JIT=${M2F_KERNELS_NO_JIT:-1}
if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: $PY sees no CUDA GPU" >&2
  exit 2
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
device=$($PY -c 'import re, torch; print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower())')
commit=${M2F_BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
commit=${commit:0:7}
prefix="$OUT_DIR/$device-$commit$([ "${QUICK:-0}" = 1 ] && echo -quick)"
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
failed=""

step_limit() {  # step_limit NAME: seconds NAME may run (0: no limit), from its own limit and the deadline
  local var="${1%%-*}"
  var="${var^^}_TIMEOUT"
  local limit=${!var:-${STEP_TIMEOUT:-0}}
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - SECONDS))
    if [ "$limit" = 0 ] || [ "$left" -lt "$limit" ]; then limit=$left; fi
  fi
  echo "$limit"
}

step() {  # step NAME COMMAND...: runs COMMAND, logs to $prefix-NAME.log, records a failure; returns its status
  local name=$1 status=0 limit
  shift
  limit=$(step_limit "$name")
  if [ -n "${DEADLINE:-}" ] && [ $((DEADLINE - SECONDS)) -lt 10 ]; then
    failed="$failed $name"
    echo "== $name: skipped, $((DEADLINE - SECONDS)) s left before the deadline"
    return 1
  fi
  echo "== $name (limit ${limit} s): $*"
  # SIGKILL 10 s after SIGTERM, for a process that ignores it (a hung compute-sanitizer)
  timeout -k 10 "$limit" "$@" >"$prefix-$name.log" 2>&1 || status=$?
  if [ "$status" != 0 ]; then
    failed="$failed $name"
    echo "   FAILED (status $status, $SECONDS s in; see $prefix-$name.log)"
  fi
  tail -n 3 "$prefix-$name.log"
  return "$status"
}

for s in $STEPS; do
  case $s in
    build)
      if $PY -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)'; then
        step build $PY setup.py build_ext --inplace
      else
        step build $PY benchmarks/build_inplace.py
      fi
      # A build that found no CUDA toolkit makes a CPU-only library, and every cuda test would then skip.
      step build-has-cuda $PY -c 'import m2f_kernels, sys; names = m2f_kernels.available_backends(); print(names)
sys.exit(0 if "cuda" in names else "no cuda backend: the build found no CUDA toolkit (set CUDA_HOME)")'
      ;;
    kernels)
      step kernels env M2F_KERNELS_TRITON_AUTOTUNE=0 $PY -m benchmarks.kernel_times --out "$prefix-kernels.json"
      ;;
    test)
      eval "args=(${TEST_ARGS:-tests/ops tests/nn tests/integrations})"
      workers=${TEST_WORKERS:-$($PY -c 'import os, xdist; print(min(8, os.cpu_count()))' 2>/dev/null || echo 0)}
      [ "$workers" -gt 0 ] && args=(-n "$workers" "${args[@]}")
      step test env M2F_KERNELS_TRITON_AUTOTUNE="${TEST_TRITON_AUTOTUNE:-0}" \
        $PY -m pytest -v -rfE --continue-on-collection-errors -m cuda "${args[@]}"
      ;;
    sanitize)
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}; do
        step "sanitize-$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
          "$SANITIZER" --tool "$tool" --error-exitcode 1 $PY -m benchmarks.sanitize ${SANITIZE_ARGS:-}
      done
      ;;
    bench)
      eval "args=(${BENCH_ARGS:-benchmarks})"
      step bench env M2F_BENCH_OUT="$prefix.json" $PY -m pytest -q --continue-on-collection-errors "${args[@]}"
      ;;
    *) echo "unknown step $s" && exit 2 ;;
  esac
done
if [ -n "$failed" ]; then
  echo "failed steps:$failed"
  exit 1
fi
echo "all steps passed; results in $prefix.json"

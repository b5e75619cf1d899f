#!/usr/bin/env bash
# The one script a lent GPU machine runs (README: "GPU runs"). A lease is 15 minutes in all, a machine start
# included, so this run must not waste it: imports are checked before anything is built, every step has its
# own time limit, the output goes straight into $OUT as it is printed (a killed run still returns it), and the
# most valuable results come first: build, a one-case smoke test per path, the benchmarks, then the full
# tests, then compute-sanitizer. Optional steps run only while the budget has room for them.
#
#   bench/fetch_device_wheels.sh              # here, once: wheels the device lacks (zstandard, nvCOMP), into .whl/
#   run (carry .whl): bash bench/device_check.sh [--quick]
#   bash bench/device_check.sh --dry-run      # here, no GPU: every step's selection and arguments, checked
#
# --quick aims at 3 minutes (build, smoke, one benchmark shape), the default at 7: optional steps run only
# while their expected time fits, and every step is cut off 90 s past the budget at most. Writes under $OUT
# at most 8 files: device_check.log, build.log, perf_model.md (the predictions, written before anything
# runs), gemm_cuda.{json,md}, gemm_multi_cuda.{json,md}, and serve_cuda.{json,md} where vLLM is installed.
set -uo pipefail
MODE=full
for arg in "$@"; do
  case "$arg" in
    --quick) MODE=quick ;;
    --dry-run) MODE=dry ;;
    *) echo "usage: bash bench/device_check.sh [--quick | --dry-run]"; exit 2 ;;
  esac
done
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
exec > >(tee -a "$OUT/device_check.log") 2>&1  # every line reaches $OUT as it is printed
TEE_PID=$!
finish() {  # the log's last lines are written before the script ends
  exec >&- 2>&-
  wait "$TEE_PID" 2> /dev/null
}
trap finish EXIT
export PYTHONUNBUFFERED=1
# Seconds for the whole run (a lease is 15 minutes with a machine start, so a rerun must still fit).
BUDGET=${DEVICE_CHECK_BUDGET:-$([ "$MODE" = quick ] && echo 175 || echo 420)}
status=0
PYTEST=(python3 -m pytest -q -p no:cacheprovider)
[ "$MODE" = dry ] && PYTEST+=(--collect-only)

# step NAME EXPECTED_S LIMIT_S [optional]: announce a step; an optional one is skipped when the budget has no
# room for its expected time.
step() {
  local name=$1 expected=$2 limit=$3 optional=${4:-}
  if [ -n "$optional" ] && [ "$MODE" != dry ] && [ $((SECONDS + expected)) -gt "$BUDGET" ]; then
    echo "== $name: skipped (${SECONDS}s used, ${expected}s expected, budget ${BUDGET}s)"
    return 1
  fi
  # No step may run past the budget by more than 90 s: the whole run stays inside one call's 10 minutes.
  local left=$((BUDGET + 90 - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$((left > 30 ? left : 30))
  echo "== $name ($(date +%T), ${SECONDS}s used; expected ${expected}s, limit ${limit}s)"
  LIMIT=$limit
}
# run CMD...: one command under the current step's time limit; a failure marks the run failed.
run() {
  if [ "$MODE" = dry ] && [ "${1:-}" = compute-sanitizer ]; then echo "dry run: would run: $*"; return 0; fi
  timeout --kill-after=10 "$LIMIT" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "!! timed out after ${LIMIT}s: $*"
  [ $rc -ne 0 ] && status=1
  return $rc
}
# selected FILE... -k EXPR: pytest on a selection; a selection of no tests is an error (the review found a
# memcheck filter that chose 2 tests of 334 by ids that did not exist).
selected() {
  local n
  n=$(python3 -m pytest -q -p no:cacheprovider --collect-only "$@" 2>/dev/null | grep -c "::")
  if [ "$n" -eq 0 ]; then echo "!! no test matches: $*"; status=1; return 1; fi
  echo "($n tests)"
}

step "environment and imports" 10 60
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not here"
nvcc --version 2>&1 | tail -n 1
if ls .whl/*.whl > /dev/null 2>&1 && [ "$MODE" != dry ]; then  # zstandard and nvCOMP, which the image lacks
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_check: installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
# Everything the run imports, before minutes go into a build: a missing one fails here in seconds.
python3 - "$MODE" <<'EOF' || { echo "device_check: a required import failed (carry .whl: bench/fetch_device_wheels.sh)"; exit 1; }
import sys
import torch, zstandard, safetensors, numpy  # noqa: F401,E401
print("torch", torch.__version__, "CUDA", torch.version.cuda, "zstandard", zstandard.__version__)
if sys.argv[1] != "dry":
    assert torch.cuda.is_available(), "torch sees no CUDA GPU"
    print("GPU:", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
try:
    from nvidia import nvcomp
    print("nvCOMP", nvcomp.__version__)
except ImportError:
    print("nvCOMP: not importable (the nvCOMP tests skip; the unfused baseline decodes on the CPU)")
EOF
python3 bench/perf_model.py --device "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | grep -q H100 && echo h100 || echo h200)" \
  > "$OUT/perf_model.md" 2>&1 && echo "predictions: perf_model.md" || status=1

step "build (sm_90a, the device's own torch)" 100 330
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
if [ "$MODE" = dry ] && python3 -c "import xorgemm._native" 2> /dev/null; then
  echo "dry run: the extension here is already built"
elif ! run python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log"
  echo "device_check: the build failed"
  exit 1
fi
[ "$MODE" = dry ] || python3 -c "import xorgemm._native as n; assert n.CUDA is not None, 'no _C_cuda'" || exit 1

# One case per path, stop at the first failure: the fused kernel (one fine-tune, 4096x4096, M 1 and 16, both
# delta kinds), backward, per-row fine-tunes, both paths forced, the sanitizer's small cases, the error word.
SMOKE=(tests/test_cuda_xor_linear.py tests/test_cuda_grouped.py tests/test_cuda_slots.py tests/test_xor_linear.py tests/test_cuda.py -k
  "(test_forward_against_cpu_and_float64 and bf16 and 4096x4096 and (sparse or dense) and (m1] or m16])) or test_mixed_rows_and_backward or (test_grouped_matches_cpu_and_dense and zipf and (d-4- or d-16-)) or (test_both_paths_forward_and_backward and m33) or test_small_paths or test_grouped_split_k_small or test_rows_do_not_depend_on_their_batch or test_cuda_graph_replays or test_slot_table_gives_the_bits or inf_weight_reaches or test_output_is_fully_written or test_bad_inputs_are_clear_errors or (cuda and (test_op_validates_its_arguments or test_opcheck)) or (test_gpu_apply_matches_cpu and bf16 and 130x70)")
if [ "$MODE" = quick ]; then
  SMOKE=(tests/test_cuda_xor_linear.py tests/test_cuda_grouped.py tests/test_cuda_slots.py -k
    "(test_forward_against_cpu_and_float64 and bf16 and 4096x4096 and (sparse or dense) and (m1] or m16])) or (test_grouped_matches_cpu_and_dense and zipf and d-16-) or test_small_paths or test_grouped_split_k_small or test_cuda_graph_replays")
fi
step "smoke: one case per path" $([ "$MODE" = quick ] && echo 25 || echo 45) 150
selected "${SMOKE[@]}" && run "${PYTEST[@]}" -x "${SMOKE[@]}"

GEMM=(--shapes 4096x4096 14336x4096 4096x14336 --m 1 16 2048 --kinds sparse dense)
MULTI=(--shapes 4096x4096 14336x4096 --d 16 --dists distinct zipf --kinds small dense --m 16 64)
if [ "$MODE" = quick ]; then
  GEMM=(--shapes 4096x4096 --m 1 16 --kinds sparse dense --reps 20)
  MULTI=(--shapes 4096x4096 --d 16 --dists distinct --kinds small --m 16 --reps 10)
fi
BENCH_DEVICE=cuda
if [ "$MODE" = dry ]; then  # the same scripts and options on the CPU op, on small shapes
  BENCH_DEVICE=cpu
  GEMM=(--shapes 256x256 --m 1 16 --kinds sparse dense --reps 2)
  MULTI=(--shapes 256x256 --d 4 --dists distinct --kinds small --m 8 --reps 2)
fi
step "benchmark: one fine-tune, bf16 (bench/gemm.py)" $([ "$MODE" = quick ] && echo 35 || echo 80) 200
run python3 bench/gemm.py --device $BENCH_DEVICE --dtypes bf16 "${GEMM[@]}" --out "$OUT/gemm_$BENCH_DEVICE"
step "benchmark: 16 fine-tunes per batch (bench/gemm_multi.py)" $([ "$MODE" = quick ] && echo 30 || echo 45) 150 optional \
  && run python3 bench/gemm_multi.py --device $BENCH_DEVICE "${MULTI[@]}" --out "$OUT/gemm_multi_$BENCH_DEVICE"

if [ "$MODE" != quick ] && step "benchmark: serving through vLLM (bench/serve.py)" 90 150 optional; then
  if python3 -c "import vllm" > /dev/null 2>&1 && [ "$MODE" != dry ]; then
    run python3 bench/serve.py --device cuda --hidden 2048 --inter 5632 --layers 4 --vocab 16384 --requests 64 \
      --out "$OUT/serve_cuda"
  else  # the device image has no vLLM and no index to install it from; its wheel is more than a run carries
    echo "skipped: vLLM is not installed here"
  fi
fi

if [ "$MODE" != quick ] && step "all CUDA tests" 120 240 optional; then
  # -k cuda: the test_cuda*.py files (marked cuda) and the [cuda] cases of the device-parametrized tests
  run "${PYTEST[@]}" --durations=5 tests/test_cuda.py tests/test_cuda_xor_linear.py tests/test_cuda_grouped.py \
    tests/test_cuda_slots.py tests/test_xor_linear.py tests/test_slots.py -k cuda
fi

# compute-sanitizer on real small cases, with the caching allocator off so an overrun inside a pooled block is
# seen: memcheck on the fused, grouped, backward and apply paths; racecheck and synccheck on the smallest.
MEMCHECK=(tests/test_cuda_xor_linear.py tests/test_cuda.py -k
  "test_small_paths or test_grouped_split_k_small or (test_both_paths_forward_and_backward and m33 and bf16) or (test_forward_against_cpu_and_float64 and bf16 and 130x70 and m7]) or (test_gpu_apply_matches_cpu and bf16 and 130x70)")
SMALL=(tests/test_cuda_xor_linear.py -k "test_small_paths or test_grouped_split_k_small")
# compute-sanitizer refuses the device on some machines (gVisor: "Device not supported"): probed once, and
# then its steps are skipped, not failed.
SANITIZER=yes
if [ "$MODE" = full ] && ! timeout 60 compute-sanitizer --error-exitcode 9 python3 -c \
  "import torch; torch.ones(1, device='cuda').sum().item()" > /dev/null 2>&1; then
  echo "== compute-sanitizer does not run on this machine: its steps are skipped"
  SANITIZER=no
fi
if [ "$MODE" != quick ] && [ $SANITIZER = yes ] && step "compute-sanitizer memcheck" 60 120 optional \
  && selected "${MEMCHECK[@]}"; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run compute-sanitizer --tool memcheck --error-exitcode 9 "${PYTEST[@]}" "${MEMCHECK[@]}"
fi
for tool in racecheck synccheck; do
  if [ "$MODE" != quick ] && [ $SANITIZER = yes ] && step "compute-sanitizer $tool" 40 90 optional \
    && selected "${SMALL[@]}"; then
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run compute-sanitizer --tool $tool --error-exitcode 9 "${PYTEST[@]}" "${SMALL[@]}"
  fi
done

echo "== done in ${SECONDS}s (status $status; mode $MODE)"
exit $status

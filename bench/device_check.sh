#!/usr/bin/env bash
# The one script a lent GPU machine runs (see "GPU runs" in README.md): it builds the extensions there,
# runs the CUDA tests, compute-sanitizer memcheck on small cases, and the GPU benchmarks, and writes under
# $OUT at most 10 files: device_check.log (every step's output), build.log, and the benchmarks' results
# (gemm_cuda.{json,md}, gemm_multi_cuda.{json,md}, serve_cuda.{json,md} where vLLM is installed), which are
# what bench/results/ receives. Meant to finish inside 8 minutes.
#
#   bench/fetch_device_wheels.sh        # here, once: wheels the device lacks (zstandard, nvCOMP), into .whl/
#   run (carry .whl): bash bench/device_check.sh
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
LOGS=$(mktemp -d)
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
status=0
step() { echo "== $* ($(date +%T))" | tee -a "$LOGS/steps.log"; }
collect() {  # one log file back, whatever happened
  for f in steps env pytest memcheck bench bench_multi serve; do
    [ -f "$LOGS/$f.log" ] && { echo "######## $f.log"; cat "$LOGS/$f.log"; }
  done > "$OUT/device_check.log" 2>&1
}
trap collect EXIT

step "environment"
if ls .whl/*.whl > /dev/null 2>&1; then  # zstandard and nvCOMP, which the image lacks
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_check: installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -n 1
  python3 -c "from nvidia import nvcomp; print('nvcomp', nvcomp.__version__)" || echo "nvcomp: not importable"
} 2>&1 | tee "$LOGS/env.log"

step "build (sm_90a; the device's own torch)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
if ! python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log" | tee -a "$LOGS/steps.log"
  echo "device_check: the build failed" | tee -a "$LOGS/steps.log"
  exit 1
fi
python3 -c "import xorgemm._native as n; assert n.CUDA is not None, 'no _C_cuda'" 2>&1 | tee -a "$LOGS/steps.log" || exit 1

step "CUDA and CPU-reference tests"
python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_cuda.py tests/test_cuda_xor_linear.py \
  tests/test_cuda_grouped.py tests/test_xor_linear.py tests/test_codec.py tests/test_resident.py \
  > "$LOGS/pytest.log" 2>&1 || status=1
grep -E "passed|failed|Error" "$LOGS/pytest.log" | tail -n 8

step "compute-sanitizer memcheck, small cases"
compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider \
  tests/test_cuda.py tests/test_cuda_xor_linear.py -k "(test_gpu_apply_matches_cpu and 130 and bfloat16) or test_small_paths" \
  > "$LOGS/memcheck.log" 2>&1 || status=1
tail -n 5 "$LOGS/memcheck.log"

step "benchmark: one fine-tune"
python3 bench/gemm.py --device cuda --shapes 4096x4096 14336x4096 --m 1 16 256 2048 --dtypes bf16 \
  --kinds sparse dense --out "$OUT/gemm_cuda" > "$LOGS/bench.log" 2>&1 || status=1
tail -n 20 "$LOGS/bench.log"

step "benchmark: many fine-tunes per batch"
python3 bench/gemm_multi.py --device cuda --shapes 4096x4096 14336x4096 --d 16 --dists distinct zipf skewed \
  --kinds small seed --model --out "$OUT/gemm_multi_cuda" > "$LOGS/bench_multi.log" 2>&1 || status=1
tail -n 30 "$LOGS/bench_multi.log"

step "benchmark: serving through vLLM"
if python3 -c "import vllm" > /dev/null 2>&1; then
  python3 bench/serve.py --device cuda --hidden 2048 --inter 5632 --layers 4 --vocab 16384 --requests 64 \
    --out "$OUT/serve_cuda" > "$LOGS/serve.log" 2>&1 || status=1
  tail -n 12 "$LOGS/serve.log"
else  # the device image has no vLLM and no index to install it from; its wheel is more than a run carries
  echo "skipped: vLLM is not installed on this machine" | tee "$LOGS/serve.log"
fi

step "done (status $status)"
exit $status

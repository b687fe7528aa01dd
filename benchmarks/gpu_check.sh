#!/usr/bin/env bash
# GPU check: one command on a CUDA machine with no network.
#   1. use the kernel libraries built elsewhere (staged into python/nolabels/ by
#      scripts/stage_libs.sh) or build them here with pip --no-build-isolation;
#   2. run the GPU tests (pytest -m gpu; Triton compiled, not interpreted);
#   3. run every benchmark at GPU sizes;
#   4. write JSON results and logs into $OUT (default benchmarks/results/gpu-run).
# Target: under 10 minutes on one H100 (the per-step timeouts add up to ~9.5; the
# launch-plan sweep, without the simulator, takes ~3 s of its 20).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
echo "== gpu_check $(date -Is)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true

status=0
if [ -f python/nolabels/_C.so ]; then
  echo "== using staged libraries in python/nolabels/"
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "== building with pip install --no-build-isolation"
  $PY -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -20 || status=1
fi
$PY -m nolabels info --json > "$OUT/info.json"; $PY -m nolabels info || status=1

echo "== launch-plan sweep (every kernel's grid/block/smem against the GPU's limits; CPU only)"
timeout 20 $PY -m pytest -q -ra tests/test_launch_plans.py -k "fit or has_more_rows or violations" -p no:cacheprovider 2>&1 | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== GPU tests (include test_launch_plans.py's big-N coder_class_scores, N = 70,000)"
NOLABELS_TEST_GPU=1 timeout 150 $PY -m pytest -q -m gpu -ra \
  --junitxml="$OUT/gpu_tests.xml" tests 2>&1 | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

run_bench() {  # name, timeout, args...
  local name=$1 t=$2; shift 2
  echo "== bench $name $*"
  timeout "$t" $PY "benchmarks/$name.py" "$@" 2>&1 | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
# Issue targets: H100 bf16 N=1e6, C=1000, D=512 (cuda/triton >= 2x reference, >= 70% of matmul).
run_bench bench_pseudo_label 100 --device cuda --dtype bfloat16 --n 1000000 --c 1000 --d 512 --topk 3 \
  --out "$OUT/pseudo_label-bf16.json"
run_bench bench_pseudo_label 50 --device cuda --dtype float32 --n 200000 --c 1000 --d 512 --topk 3 \
  --no-memory --out "$OUT/pseudo_label-fp32.json"
# Each step has its own timeout so the whole script stays under 10 minutes.
[ -f benchmarks/bench_coder.py ] && run_bench bench_coder 100 --device cuda --out "$OUT/bench_coder.json"
[ -f benchmarks/bench_attention.py ] && run_bench bench_attention 150 --device cuda --budget-s 100 \
  --out "$OUT/bench_attention.json"
# $OUT holds 7 files (log, info, junit, 4 JSON): the device tool returns at most 8,
# so nothing else is copied there.
echo "== gpu_check finished with status $status"
exit $status

#!/usr/bin/env bash
# `make gpu-check`: on a GPU machine with its own torch/triton/timm and no network, after the
# in-place build: the whole test suite on the GPU, the two ceilings, the op benchmarks and the
# model benchmark. Logs and JSON go to benchmarks/results/ and, when $OUT is set, to $OUT too.
#   COMPILE_MODE   torch.compile mode for the timm baseline (default max-autotune)
#   MODEL_BATCHES  batch sizes of the model benchmark (default "1 32 256")
#   BENCH_ARGS     extra pytest-benchmark suite options (default: --bench-model convnext_tiny, since
#                  every max-autotune compile of every model, mode and batch takes over an hour)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
RESULTS=benchmarks/results
OUTDIR=${OUT:-$RESULTS}
mkdir -p "$RESULTS" "$OUTDIR"
COMPILE_MODE=${COMPILE_MODE:-max-autotune}
MODEL_BATCHES=${MODEL_BATCHES:-1 32 256}
status=0
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }
exec > >(tee "$OUTDIR/gpu_check.log") 2>&1

step "device and versions"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || status=1
python -m convnext_fast info || status=1

step "test suite on the GPU"
python -m pytest tests -q -ra -p no:cacheprovider || status=1

step "ceilings"
python -m convnext_fast bench --ceilings --device cuda --dtype bf16 --json "$OUTDIR/ceilings.json" || status=1

step "op and model benchmarks (pytest-benchmark)"
python -m pytest benchmarks --benchmark -q -p no:cacheprovider ${BENCH_ARGS:---bench-model convnext_tiny} \
  --benchmark-json="$OUTDIR/bench_pytest.json" --benchmark-columns=median,iqr,rounds || status=1

for dtype in bf16 fp32; do
  step "model benchmark $dtype (timm compile mode: $COMPILE_MODE)"
  python -m convnext_fast bench --device cuda --dtype "$dtype" --batch $MODEL_BATCHES \
    --warmup 5 --iters 20 --compile-mode "$COMPILE_MODE" --json "$OUTDIR/model_${dtype}.json" || status=1
done
step "done: status $status"

if [ "$OUTDIR" != "$RESULTS" ]; then
  cp "$OUTDIR"/*.json "$OUTDIR"/gpu_check.log "$RESULTS"/ 2>/dev/null || true
fi
exit $status

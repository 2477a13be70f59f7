#!/usr/bin/env bash
# One prepared GPU run, at most 480 s on one H200 (the device tool allows 600 s a command): the GPU
# tests first, then forward+backward benchmarks of crossent beside torch eager, torch.compile,
# Liger-Kernel and Cut Cross-Entropy. Results land in $OUT (the device tool) or
# benchmarks/results/gpu/: gpu_machine.txt, gpu_tests.txt, gpu_bench.csv (every benchmark row),
# gpu_check.log (everything printed).
#
#   bash benchmarks/gpu_check.sh                  # GPU_CHECK_BUDGET=480 (seconds) by default
#
# The GPU machine reaches no registry: Liger-Kernel and Cut Cross-Entropy travel as wheels in .whl/
# (ignored by git; see the device README), fetched once on a machine with pip:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       liger-kernel cut-cross-entropy
# and carried with the call (carry: [".whl"]). Without them those peers are skipped, with a note.
#
# Every step has its own timeout, cut so that the whole script ends within the budget; a step that
# would start with under 20 s left is skipped and says so. The time floors the kernels are held
# against are in docs/kernels.md (benchmarks/kernel_resources.py).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-benchmarks/results/gpu}
BUDGET=${GPU_CHECK_BUDGET:-480}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# triton's caches, shared by the benchmark processes: kernels compiled once, and the linear
# kernels' autotuning results kept too (each benchmark case runs in a fresh process)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache} TRITON_CACHE_AUTOTUNING=1
T0=$SECONDS

left() { echo $(( BUDGET - (SECONDS - T0) )); }

# step NAME CAP CMD...: run CMD with a timeout of CAP seconds, less if the budget has less left
step() {
  local name=$1 cap=$2 r t rc
  shift 2
  r=$(left)
  if (( r < 20 )); then
    echo "== skipped (out of time, ${r}s left): $name" | tee -a "$OUT/gpu_tests.txt"
    return 99
  fi
  t=$(( r - 5 < cap ? r - 5 : cap ))
  echo "== $name (timeout ${t}s, $(( SECONDS - T0 ))s elapsed)"
  timeout -k 5 "$t" "$@"
  rc=$?
  if (( rc == 124 || rc == 137 )); then
    echo "== timed out after ${t}s: $name" | tee -a "$OUT/gpu_tests.txt"
  fi
  return "$rc"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  step "install the carried wheels" 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  for m in liger_kernel cut_cross_entropy; do
    "$PY" -c "import importlib.metadata as im; print('$m', im.version('${m//_/-}'))" 2>/dev/null \
      || echo "$m: not installed (carry its wheel in .whl/)"
  done
} 2>&1 | tee "$OUT/gpu_machine.txt"

step "GPU tests" 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -25 \
  | tee -a "$OUT/gpu_tests.txt"

peers=""
"$PY" -c "import liger_kernel" 2>/dev/null && peers="$peers,liger"
lpeers=$peers
"$PY" -c "import cut_cross_entropy" 2>/dev/null && lpeers="$lpeers,cce_cce"
n=0
# bench NAME CAP ARGS...: one `python -m crossent.bench` run writing its own CSV
bench() {
  local name=$1 cap=$2
  shift 2
  n=$(( n + 1 ))
  step "$name" "$cap" "$PY" -m crossent.bench --device cuda "$@" --csv "$OUT/bench_$n.csv" 2>&1 | tail -14
}

# linear_cross_entropy, bfloat16: the Llama-3 shape (goal: >= 65% of bf16 peak at 6 N H V flops),
# then Cut Cross-Entropy's own setting in its three phases (loss, gradient, loss+gradient)
bench "linear N=8192 H=4096 V=128256 bf16" 170 --kinds linear --dtype bfloat16 --N 8192 --H 4096 --V 128256 \
  --impls "torch,compile,triton$lpeers" --reps 5
bench "linear N=8192 H=2304 V=256000 bf16 (phases)" 120 --kinds linear:loss,linear:grad,linear --dtype bfloat16 \
  --N 8192 --H 2304 --V 256000 --impls "torch,triton$lpeers" --reps 5
# cross_entropy on given logits
for shape in "bfloat16 8192 128256" "bfloat16 32768 32000" "float32 8192 128256"; do
  read -r dt N V <<<"$shape"
  bench "cross_entropy [$N, $V] $dt" 75 --kinds index --dtype "$dt" --N "$N" --V "$V" \
    --impls "torch,compile,triton,triton_inplace$peers" --reps 10
done

# one CSV (the device tool brings back at most 8 files): the first header, then every row
csvs=("$OUT"/bench_*.csv)
if [[ -e ${csvs[0]} ]]; then
  { head -n 1 "${csvs[0]}"; for f in "${csvs[@]}"; do tail -n +2 "$f"; done; } >"$OUT/gpu_bench.csv" \
    && rm -f "${csvs[@]}"
  cat "$OUT/gpu_bench.csv"
else
  echo "no benchmark wrote a CSV" | tee -a "$OUT/gpu_tests.txt"
fi
echo "== done in $(( SECONDS - T0 ))s"

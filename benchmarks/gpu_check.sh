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

have_liger=0 have_cce=0
"$PY" -c "import liger_kernel" 2>/dev/null && have_liger=1
"$PY" -c "import cut_cross_entropy" 2>/dev/null && have_cce=1
n=0
# bench NAME CAP IMPLS ARGS...: one `python -m crossent.tools.bench` run per impl (a fresh process each, as
# crossent.tools.bench does anyway), each with its own CSV and timeout, so that a slow impl (a compile, an
# autotune) costs only its own row; impls whose package is missing are dropped
bench() {
  local name=$1 cap=$2 impls=$3 impl
  shift 3
  for impl in ${impls//,/ }; do
    case $impl in
      liger) (( have_liger )) || { echo "== $name: liger skipped (not installed)"; continue; } ;;
      cce*) (( have_cce )) || { echo "== $name: $impl skipped (not installed)"; continue; } ;;
    esac
    n=$(( n + 1 ))
    step "$name: $impl" "$cap" "$PY" -m crossent.tools.bench --device cuda "$@" --impls "$impl" \
      --csv "$OUT/bench_$(printf %02d "$n").csv" 2>&1 | tail -6
  done
}

# most important first: what does not fit in the budget is skipped, and says so.
# linear_cross_entropy, bfloat16, the Llama-3 shape (goal: >= 65% of bf16 peak at 6 N H V flops)
bench "linear N=8192 H=4096 V=128256 bf16" 120 "triton,cce_cce,liger,torch,compile" \
  --kinds linear --dtype bfloat16 --N 8192 --H 4096 --V 128256 --reps 5
# cross_entropy on given logits, the two benchmark shapes
bench "cross_entropy [8192, 128256] bf16" 45 "triton,triton_inplace,liger,torch,compile" \
  --kinds index --dtype bfloat16 --N 8192 --V 128256 --reps 10
bench "cross_entropy [32768, 32000] bf16" 45 "triton,triton_inplace,liger,torch,compile" \
  --kinds index --dtype bfloat16 --N 32768 --V 32000 --reps 10
# Cut Cross-Entropy's own setting in its three phases (loss, gradient, loss+gradient)
bench "linear N=8192 H=2304 V=256000 bf16 (phases)" 90 "triton,cce_cce,liger,torch" \
  --kinds linear:loss,linear:grad,linear --dtype bfloat16 --N 8192 --H 2304 --V 256000 --reps 5
bench "cross_entropy [8192, 128256] fp32" 45 "triton,liger,torch,compile" \
  --kinds index --dtype float32 --N 8192 --V 128256 --reps 10

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
sleep 1  # let tee write the log's last lines

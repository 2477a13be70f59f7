#!/usr/bin/env bash
# One prepared GPU run (well under 10 minutes on an H200): the GPU test subset,
# then forward+backward benchmarks beside torch eager, torch.compile and
# Liger-Kernel. Results land in $OUT (the device tool) or benchmarks/results/.
#
#   bash benchmarks/gpu_check.sh
#
# Liger-Kernel travels as a wheel in .whl/ (see the device README); the script
# installs whatever wheels are there into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu_machine.txt"

# the device tool allows 600 s a command: stop starting new benchmarks after 480 s
left() { if (( SECONDS > 480 )); then echo "skipped (time): $1" | tee -a "$OUT/gpu_tests.txt"; return 1; fi; }
# a step's timeout: its own cap, cut so that the whole script ends by 570 s
cap() { local r=$(( 570 - SECONDS )); echo $(( r < $1 ? r : $1 )); }

echo "== GPU tests"
timeout 180 python3 -m pytest -q -x tests/test_gpu.py 2>&1 | tail -15 | tee -a "$OUT/gpu_tests.txt"

echo "== linear_cross_entropy (Cut Cross-Entropy's setting, then a Llama-3 shape), bfloat16"
limpls="torch,triton,chunked"
python3 -c "import cut_cross_entropy" 2>/dev/null && limpls="$limpls,cce_cce"
python3 -c "import liger_kernel" 2>/dev/null && limpls="$limpls,liger"
# Cut Cross-Entropy's own setting in its three phases (loss, gradient, loss+gradient); the Llama-3
# shape (goal: >= 65% of bf16 peak at 6 N H V flops) in loss+gradient
for shape in "8192 2304 256000 linear:loss,linear:grad,linear" "8192 4096 128256 linear"; do
  set -- $shape
  left "linear $shape" || break
  timeout "$(cap 240)" python3 -m crossent.bench --kinds "$4" --dtype bfloat16 --N "$1" --H "$2" --V "$3" --device cuda \
    --impls "$limpls" --reps 5 --csv "$OUT/gpu_ce_linear_${1}x${2}x${3}.csv" 2>&1 | tail -16
done


echo "== benchmarks"
impls="torch,compile,triton,triton_inplace"
python3 -c "import liger_kernel" 2>/dev/null && impls="$impls,liger"
for shape in "bfloat16 8192 128256" "float32 8192 128256" "float32 16384 131072" \
             "bfloat16 32768 4096" "bfloat16 32768 32768" "bfloat16 16384 131072"; do
  set -- $shape
  left "CE $shape" || break
  timeout "$(cap 120)" python3 -m crossent.bench --dtype "$1" --N "$2" --V "$3" --device cuda --kinds index \
    --impls "$impls" --reps 10 --csv "$OUT/gpu_ce_${1}_${2}x${3}.csv" 2>&1 | tail -12
done

# one CSV for all shapes (the device tool brings back at most 8 files)
{ head -n1 "$(ls "$OUT"/gpu_ce_*.csv | head -n1)"; for f in "$OUT"/gpu_ce_*.csv; do tail -n +2 "$f"; done; } \
  > "$OUT/gpu_cross_entropy.csv" && rm -f "$OUT"/gpu_ce_*.csv
cat "$OUT/gpu_cross_entropy.csv"

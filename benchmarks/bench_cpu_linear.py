"""CPU benchmark of issue 4: linear_cross_entropy (chunked) beside torch eager
(materialized logits), torch.compile of it, and Cut Cross-Entropy's
torch_compile impl, forward+backward, N=2048, H=512, V=32000 float32; then the
peak memory at N=8192, H=1024, V=128256 (one step each).
Writes benchmarks/results/cpu_linear_cross_entropy*.csv.

Cut Cross-Entropy: `pip install --no-deps cut-cross-entropy` (its triton
kernels are not needed for the torch_compile impl).
"""

import argparse
import os

import torch

from crossent.tools import bench

HERE = os.path.dirname(os.path.abspath(__file__))
# results of CPUs without AVX-512 (where oneDNN gains nothing over MKL) are kept apart from the reference host's
HOST = "" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "_avx2_host"

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-large", action="store_true")
    a = ap.parse_args()
    # chunked: the default chunk (memory first); chunked@256: larger chunks trade memory for matmul
    # speed; chunked_mm: the default chunk with torch.mm (MKL) instead of oneDNN
    impls = ["torch", "compile", "cce_torch_compile", "chunked", "chunked@256", "chunked_mm"]
    rows = bench.compare(impls, ["linear"], 2048, 32000, "float32", "cpu", a.reps, H=512,
                         progress=lambda s: print(f"measuring {s} ...", flush=True))
    bench.print_table(rows, "linear_cross_entropy forward+backward, N=2048 H=512 V=32000 float32, CPU")
    bench.write_csv(rows, os.path.join(HERE, "results", "cpu_linear_cross_entropy" + HOST + ".csv"))
    if not a.skip_large:
        rows = bench.compare(["torch", "chunked"], ["linear"], 8192, 128256, "float32", "cpu", 1, H=1024, warmup=0,
                             progress=lambda s: print(f"measuring (large) {s} ...", flush=True))
        bench.print_table(rows, "linear_cross_entropy, N=8192 H=1024 V=128256 float32, CPU (one step)")
        bench.write_csv(rows, os.path.join(HERE, "results", "cpu_linear_cross_entropy_large" + HOST + ".csv"))

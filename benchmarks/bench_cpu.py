"""CPU benchmark of issue 2: crossent's chunked impl beside torch eager and
torch.compile on [4096, 32000] float32 logits, forward+backward, index and
probability targets. Each case runs in a fresh process (median of 7 steps);
peak memory is beyond the inputs. Writes benchmarks/results/cpu_cross_entropy.csv.

    python benchmarks/bench_cpu.py [--N 4096 --V 32000 --reps 7]
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
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    rows = bench.compare(["torch", "compile", "chunked", "chunked_inplace"], ["index", "probs"], a.N, a.V,
                         "float32", "cpu", a.reps, progress=lambda s: print(f"measuring {s} ...", flush=True))
    bench.print_table(rows, f"cross_entropy forward+backward, [{a.N}, {a.V}] float32, CPU")
    bench.write_csv(rows, os.path.join(HERE, "results", "cpu_cross_entropy" + HOST + ".csv"))

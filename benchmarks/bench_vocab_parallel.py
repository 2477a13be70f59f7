"""CPU benchmark of vocab-parallel cross_entropy: 2 gloo ranks, each with half the vocabulary, against
1 process with the whole vocabulary (crossent's chunked impl, and torch eager), forward+backward,
[N, V] float32 logits. Time is the median step; peak memory is the rise of the process's peak
resident set over the step, per rank. Writes benchmarks/results/cpu_vocab_parallel.csv.

``--linear``: linear_cross_entropy instead, hidden states [N, H] and a [V, H] head (each rank its
[V/2, H] rows), against torch eager (logits built) and crossent chunked on one process. Writes
benchmarks/results/cpu_vocab_parallel_linear.csv.

    python benchmarks/bench_vocab_parallel.py [--N 2048 --V 32000 --reps 5] [--linear --H 512]
"""

import argparse
import csv
import datetime
import os
import resource
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import crossent
from crossent.tools.machine import machine

HERE = os.path.dirname(os.path.abspath(__file__))


def _measure(step, reps: int):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the inputs are resident already
    step()  # warm-up (its peak counts: later steps reuse the allocator's memory)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return statistics.median(times) * 1000, peak / 1024  # ms, MB (ru_maxrss is in KiB)


def _inputs(N: int, V: int, lo: int, hi: int, H: int = 0):
    """``(leaves, target)``: the [N, V_r] logits shard, or (H > 0) hidden states and the head's rows."""
    g = torch.Generator().manual_seed(0)
    if H:
        h = torch.randn(N, H, generator=g)
        w = (torch.randn(V, H, generator=g) / H ** 0.5)[lo:hi].clone()  # only this shard stays resident
        leaves = [h.requires_grad_(True), w.requires_grad_(True)]
    else:
        leaves = [torch.randn(N, hi - lo, generator=g).requires_grad_(True)]
    return leaves, torch.randint(0, V, (N,), generator=g)


def _loss(impl: str, leaves, t, group=None):
    if len(leaves) == 2:
        h, w = leaves
        if impl == "torch eager":
            return torch.nn.functional.cross_entropy(h @ w.T, t)
        return crossent.linear_cross_entropy(h, w, t, impl="chunked", process_group=group)
    if impl == "torch eager":
        return torch.nn.functional.cross_entropy(leaves[0], t)
    return crossent.cross_entropy(leaves[0], t, impl="chunked", process_group=group)


def _rank(rank: int, world: int, port: int, N: int, V: int, H: int, reps: int, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    lo, hi = V * rank // world, V * (rank + 1) // world
    leaves, t = _inputs(N, V, lo, hi, H)

    def step():
        for leaf in leaves:
            leaf.grad = None
        with crossent.checks(False):
            _loss("crossent", leaves, t, dist.group.WORLD).backward()

    ms, mb = _measure(step, reps)
    out.put((rank, ms, mb))
    dist.destroy_process_group()


def _single(impl: str, N: int, V: int, H: int, reps: int, out):
    leaves, t = _inputs(N, V, 0, V, H)

    def step():
        for leaf in leaves:
            leaf.grad = None
        _loss(impl, leaves, t).backward()

    out.put((impl,) + _measure(step, reps))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=2048)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--linear", action="store_true", help="linear_cross_entropy (hidden states and a head)")
    ap.add_argument("--H", type=int, default=512, help="hidden size with --linear")
    a = ap.parse_args()
    H = a.H if a.linear else 0
    torch.set_num_threads(1)  # 2 ranks on 2 cores: one thread each, and the same for the single process
    ctx = mp.get_context("spawn")
    rows = []
    for impl in ("torch eager", "crossent chunked"):
        q = ctx.Queue()
        p = ctx.Process(target=_single, args=(impl, a.N, a.V, H, a.reps, q))
        p.start()
        name, ms, mb = q.get(timeout=600)
        p.join()
        rows.append(dict(setup=f"1 process, V={a.V}", impl=name, rank=0, time_ms=round(ms, 1), peak_mb=round(mb, 1)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, a.N, a.V, H, a.reps, q)) for r in range(2)]
    for p in procs:
        p.start()
    for _ in procs:
        rank, ms, mb = q.get(timeout=600)
        rows.append(dict(setup=f"2 gloo ranks, V/2={a.V // 2} each", impl="crossent vocab-parallel", rank=rank,
                         time_ms=round(ms, 1), peak_mb=round(mb, 1)))
    for p in procs:
        p.join()
    base = rows[0]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    for r in rows:
        r.update(time_ratio=round(r["time_ms"] / base["time_ms"], 3), mem_ratio=round(r["peak_mb"] / base["peak_mb"], 3),
                 N=a.N, V=a.V, H=H or "", machine=machine() + ", 1 thread per process", date=stamp)
        print(f"{r['setup']:<32} {r['impl']:<24} rank {r['rank']}  {r['time_ms']:>8.1f} ms ({r['time_ratio']:.2f}x)"
              f"  {r['peak_mb']:>7.1f} MB ({r['mem_ratio']:.2f}x)")
    path = os.path.join(HERE, "results", "cpu_vocab_parallel_linear.csv" if a.linear else "cpu_vocab_parallel.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("machine:", rows[0]["machine"], "->", path)


if __name__ == "__main__":
    main()

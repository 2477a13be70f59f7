"""CPU benchmark of vocab-parallel cross_entropy: 2 gloo ranks, each with half the vocabulary, against
1 process with the whole vocabulary (crossent's chunked impl, and torch eager), forward+backward,
[N, V] float32 logits. Time is the median step; peak memory is the rise of the process's peak
resident set over the step, per rank. Writes benchmarks/results/cpu_vocab_parallel.csv.

    python benchmarks/bench_vocab_parallel.py [--N 2048 --V 32000 --reps 5]
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
from crossent.bench import machine

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


def _inputs(N: int, V: int, lo: int, hi: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, hi - lo, generator=g).requires_grad_(True)  # only this shard is ever resident
    t = torch.randint(0, V, (N,), generator=g)
    return x, t


def _rank(rank: int, world: int, port: int, N: int, V: int, reps: int, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    lo, hi = V * rank // world, V * (rank + 1) // world
    x, t = _inputs(N, V, lo, hi)

    def step():
        x.grad = None
        with crossent.checks(False):
            crossent.cross_entropy(x, t, process_group=dist.group.WORLD).backward()

    ms, mb = _measure(step, reps)
    out.put((rank, ms, mb))
    dist.destroy_process_group()


def _single(impl: str, N: int, V: int, reps: int, out):
    x, t = _inputs(N, V, 0, V)

    def step():
        x.grad = None
        if impl == "torch eager":
            torch.nn.functional.cross_entropy(x, t).backward()
        else:
            crossent.cross_entropy(x, t, impl="chunked").backward()

    out.put((impl,) + _measure(step, reps))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=2048)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)  # 2 ranks on 2 cores: one thread each, and the same for the single process
    ctx = mp.get_context("spawn")
    rows = []
    for impl in ("torch eager", "crossent chunked"):
        q = ctx.Queue()
        p = ctx.Process(target=_single, args=(impl, a.N, a.V, a.reps, q))
        p.start()
        name, ms, mb = q.get(timeout=600)
        p.join()
        rows.append(dict(setup=f"1 process, V={a.V}", impl=name, rank=0, time_ms=round(ms, 1), peak_mb=round(mb, 1)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, a.N, a.V, a.reps, q)) for r in range(2)]
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
                 N=a.N, V=a.V, machine=machine() + ", 1 thread per process", date=stamp)
        print(f"{r['setup']:<32} {r['impl']:<24} rank {r['rank']}  {r['time_ms']:>8.1f} ms ({r['time_ratio']:.2f}x)"
              f"  {r['peak_mb']:>7.1f} MB ({r['mem_ratio']:.2f}x)")
    path = os.path.join(HERE, "results", "cpu_vocab_parallel.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("machine:", rows[0]["machine"], "->", path)


if __name__ == "__main__":
    main()

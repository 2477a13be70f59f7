"""CPU benchmark of crossent's Hugging Face integration under torch FSDP2: a tiny LlamaForCausalLM
(built from a config, no download), 2 gloo ranks, data parallel (each rank its own random batch),
`fully_shard` on each decoder layer, on `model.lm_head` alone, then on the root. Three variants,
each on its own freshly built and sharded model (same seed, same data), forward+backward:

  stock          model(input_ids=ids, labels=ids).loss.backward(): logits + transformers' loss
  loss_function  crossent.integrations.transformers.apply(model, mode="loss_function"): logits +
                 crossent's fused cross-entropy
  linear         crossent.integrations.transformers.apply(model): no logits; the loss runs inside
                 the FSDP-wrapped head's forward

Applied after sharding. Time is the median step (after warm-up steps; gradients set to None
between steps, outside the timing); the timed steps of the three variants take turns, so a slow
spell of a shared machine hits all three alike, and the CSV records the share of the cores that
other processes used during the run (others_cpu_share). Peak memory is one more step's peak of
torch's CPU allocations beyond those alive before it (`crossent.tools.demo_lm.peak_alloc_bytes`: the
running sum of the allocation events of torch.profiler with profile_memory=True), per rank; it
includes the gradients and FSDP's all-gathered parameters. The three variants' losses and local
gradient norms on the same data must agree (relative difference < 1e-4), or the script fails.
Writes benchmarks/results/cpu_fsdp.csv.

    python benchmarks/bench_fsdp.py [--batch 2 --seq 1024 --V 32000 --hidden 256 --layers 2 --warmup 2 --reps 5]
"""

import argparse
import csv
import datetime
import gc
import os
import queue
import resource
import socket
import statistics
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crossent.tools.machine import machine

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("stock", "loss_function", "linear")
WORLD = 2


def _model(a):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=a.V, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                                   num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                   num_key_value_heads=a.heads, max_position_embeddings=max(a.seq, 2048),
                                   tie_word_embeddings=False, attn_implementation="eager",
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)  # every variant starts from the same weights
    return transformers.LlamaForCausalLM(cfg).float().train()


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.lm_head)
    fully_shard(model)
    return model


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


class _Variant:
    """One variant's freshly built and sharded model and its forward+backward step on ``ids``."""

    def __init__(self, name, a, ids):
        from crossent.integrations import transformers as ct

        self.name, self.ids = name, ids
        self.model = _shard(_model(a))
        if name == "loss_function":
            ct.apply(self.model, mode="loss_function")
            assert self.model.loss_function is ct.causal_lm_loss
        elif name == "linear":
            ct.apply(self.model)
        self.losses, self.times = [], []

    def step(self):
        out = self.model(input_ids=self.ids, labels=self.ids)
        # the linear mode builds no logits; the other two do: else the variant is not what we measure
        assert (out.logits is None) == (self.name == "linear"), (self.name, type(out.logits))
        out.loss.backward()
        self.losses.append(float(out.loss.detach()))

    def fresh(self):
        self.model.zero_grad(set_to_none=True)
        gc.collect()
        dist.barrier()  # ranks start each step together: no rank's time includes waiting for the other

    def timed(self):
        self.fresh()
        t0 = time.perf_counter()
        self.step()
        self.times.append(time.perf_counter() - t0)

    def grad_norm(self):
        local = [_local(p.grad).double().norm() for p in self.model.parameters() if p.grad is not None]
        return float(torch.stack(local).norm())


def _rank(rank, port, a, out):
    try:
        from crossent.tools.demo_lm import peak_alloc_bytes

        torch.set_num_threads(1)  # 2 ranks on 2 cores: one thread each
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=a.timeout))
        g = torch.Generator().manual_seed(1000 + rank)  # data parallel: each rank its own batch
        ids = torch.randint(3, a.V, (a.batch, a.seq), generator=g)
        runs = [_Variant(name, a, ids) for name in VARIANTS]  # same seed: the same weights in all three
        grad_norms = {}
        for v in runs:
            v.fresh()
            v.step()  # warm-up; its loss and gradients are the ones compared across variants
            grad_norms[v.name] = v.grad_norm()
            for _ in range(a.warmup - 1):  # the first steps after a model is built are slower (page faults)
                v.fresh()
                v.step()
        for _ in range(a.reps):  # round-robin: a slow spell of the machine hits every variant alike
            for v in runs:
                v.timed()
        for v in runs:
            v.fresh()
            peak = peak_alloc_bytes(v.step)  # beyond what is alive: this model's shards, the other models
            out.put(("ok", rank, v.name, dict(loss=v.losses[0], grad_norm=grad_norms[v.name],
                                              ms=statistics.median(v.times) * 1000,
                                              ms_all=[round(t * 1000) for t in v.times], peak=peak)))
        dist.barrier()
        dist.destroy_process_group()
        out.put(("done", rank, None, None))
    except BaseException:
        out.put(("error", rank, None, traceback.format_exc()))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collect(a):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, a, q)) for r in range(WORLD)]
    results, done = {}, 0
    deadline = time.monotonic() + a.deadline
    for p in procs:
        p.start()
    try:
        while done < WORLD:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ranks still running after {a.deadline} s (a hang?)")
            try:
                kind, rank, variant, r = q.get(timeout=min(left, 5))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a rank died (exit code {dead[0].exitcode}) without a report")
                continue
            if kind == "error":
                raise RuntimeError(f"rank {rank} failed:\n{r}")
            if kind == "done":
                done += 1
                continue
            results[variant, rank] = r
            print(f"  rank {rank} {variant:<13} loss {r['loss']:.6f}  {r['ms']:8.1f} ms (reps {r['ms_all']})  "
                  f"peak +{(r['peak'] or float('nan')) / 2**20:.1f} MiB", flush=True)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return results


def _cpu_seconds():
    """(seconds of CPU the whole machine has been busy, all cores, from /proc/stat; those of this process and
    its reaped children, the ranks), or None where /proc/stat cannot be read."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    ours = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))
    return busy, ours


def _others_share(before, wall):
    """The share of the machine's cores that other processes used over the ``wall`` seconds since ``before``
    (a shared machine's other work slows every step down)."""
    after = _cpu_seconds()
    if before is None or after is None:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / (wall * os.cpu_count()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256, help="intermediate size is 2x this")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=300, help="seconds a collective may wait (gloo)")
    ap.add_argument("--deadline", type=float, default=900, help="seconds for the whole run before it is killed")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu_fsdp.csv"))
    a = ap.parse_args()
    if a.warmup < 1 or a.reps < 1:
        ap.error("--warmup and --reps must be at least 1")
    print(f"LlamaForCausalLM V={a.V} hidden={a.hidden} layers={a.layers}, {WORLD} gloo ranks x "
          f"{a.batch}x{a.seq} tokens, FSDP2 per layer + lm_head + root, {a.warmup} warm-up + {a.reps} reps", flush=True)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    res = _collect(a)
    wall = time.perf_counter() - t0
    others = _others_share(cpu0, wall)
    print(f"total {wall:.0f} s; other processes' share of the {os.cpu_count()} cores during the run: "
          + ("unknown" if others is None else f"{others:.0%}"))
    if others is not None and others > 0.05:
        print("WARNING: other processes used the cores during the run: the times are not a quiet machine's "
              "(the variants' timed steps take turns, so the ratios suffer less than the times)")

    # the three variants on the same weights and data: the same loss and gradients, or nothing was measured
    bad = []
    for rank in range(WORLD):
        ref = res["stock", rank]
        for v in VARIANTS[1:]:
            for key in ("loss", "grad_norm"):
                rel = abs(res[v, rank][key] - ref[key]) / abs(ref[key])
                res[v, rank][key + "_rel_diff"] = rel
                if rel >= 1e-4:
                    bad.append(f"rank {rank} {v} {key} {res[v, rank][key]:.8g} vs stock {ref[key]:.8g} ({rel:.2e})")
        ref["loss_rel_diff"] = ref["grad_norm_rel_diff"] = 0.0

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mach = machine() + f", {WORLD} gloo ranks, 1 thread per rank"
    rows = []
    for v in VARIANTS:
        per = [res[v, r] for r in range(WORLD)]
        entries = [(str(r), per[r]["ms"], per[r]["peak"], per[r]) for r in range(WORLD)]
        peaks = [p["peak"] for p in per]
        entries.append(("max", max(p["ms"] for p in per), None if None in peaks else max(peaks), None))
        for rank, ms, peak, r in entries:
            base_rank = rank if rank != "max" else None
            if base_rank is None:
                b_ms = max(res["stock", i]["ms"] for i in range(WORLD))
                b_pk = [res["stock", i]["peak"] for i in range(WORLD)]
                b_pk = None if None in b_pk else max(b_pk)
            else:
                b_ms, b_pk = res["stock", int(rank)]["ms"], res["stock", int(rank)]["peak"]
            rows.append(dict(
                variant=v, rank=rank, time_ms=round(ms, 1),
                peak_extra_mib=None if peak is None else round(peak / 2**20, 1),
                time_ratio=round(ms / b_ms, 3),
                mem_ratio=None if peak is None or not b_pk else round(peak / b_pk, 3),
                loss=None if r is None else round(r["loss"], 7),
                loss_rel_diff=None if r is None else f"{r['loss_rel_diff']:.1e}",
                grad_norm_rel_diff=None if r is None else f"{r['grad_norm_rel_diff']:.1e}",
                tokens_per_rank=a.batch * a.seq, batch=a.batch, seq=a.seq, V=a.V, hidden=a.hidden,
                layers=a.layers, warmup=a.warmup, reps=a.reps,
                others_cpu_share=None if others is None else round(others, 3), machine=mach, date=stamp))
    print(f"\n{'variant':<14} {'rank':>4} {'ms/step':>9} {'x stock':>8} {'peak MiB':>9} {'x stock':>8}  "
          f"{'loss':>10} {'loss rel':>8} {'|g| rel':>8}")
    for r in rows:
        pk = "n/a" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}"
        mr = "n/a" if r["mem_ratio"] is None else f"{r['mem_ratio']:.3f}"
        loss = "" if r["loss"] is None else f"{r['loss']:.6f}"
        print(f"{r['variant']:<14} {r['rank']:>4} {r['time_ms']:>9.1f} {r['time_ratio']:>8.3f} {pk:>9} {mr:>8}  "
              f"{loss:>10} {r['loss_rel_diff'] or '':>8} {r['grad_norm_rel_diff'] or '':>8}")
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("machine:", mach, "->", a.out)
    if bad:
        raise SystemExit("the variants disagree (the benchmark measured something broken):\n  " + "\n  ".join(bad))


if __name__ == "__main__":
    main()

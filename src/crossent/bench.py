"""Side-by-side benchmarks: each (case, impl) in a fresh process, median time of
forward+backward (or of either alone), and peak memory beyond the inputs.

Peak memory on CPU: after a warm-up step, the process's high-water mark is
reset (``/proc/self/clear_refs``) and ``VmHWM`` minus the resident size just
before the measured step is the peak extra memory. On CUDA:
``torch.cuda.max_memory_allocated`` minus the allocated bytes before the step.

Used by ``crossent bench`` and by the scripts in ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- memory


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine() -> str:
    """One line naming the machine: CPU model and cores, or the GPU; torch version."""
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name()
    else:
        model = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        dev = f"{model}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"
    return f"{dev}; torch {torch.__version__}; python {platform.python_version()}"


# --------------------------------------------------------------------------- cases


def _make_step(impl: str, kind: str, N: int, V: int, dtype: torch.dtype, device: str):
    """Inputs and a forward+backward step for one (impl, target kind)."""
    import crossent

    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = (torch.randn(N, V, generator=g, dtype=torch.float32) * 2).to(device=device, dtype=dtype)
    if kind == "index":
        target = torch.randint(0, V, (N,), generator=g).to(device)
    else:
        target = torch.softmax(torch.randn(N, V, generator=g) * 2, 1).to(device=device, dtype=dtype)
    x = x0.clone().requires_grad_(True)
    inplace = impl.endswith("_inplace")
    base = impl.removesuffix("_inplace")
    if base == "torch":
        fn = F.cross_entropy
    elif base == "compile":
        fn = torch.compile(F.cross_entropy)
    elif base in ("chunked", "triton", "auto"):
        def fn(a, t):
            return crossent.cross_entropy(a, t, impl=base, inplace_backward=inplace)
    elif base == "liger":
        from liger_kernel.transformers import LigerCrossEntropyLoss  # type: ignore

        fn = LigerCrossEntropyLoss()
    else:
        raise ValueError(f"unknown impl {impl!r}")

    if not inplace:
        def reset():
            x.grad = None

        return (lambda: fn(x, target)), reset, (x, x0, target)

    # inplace_backward writes over the logits, which must be an operation's output (as a model's
    # are), not a leaf: a layer that hands out the refilled buffer and drops its gradient stands in
    anchor = torch.zeros(1, requires_grad=True)
    held = {}

    def reset():
        with torch.no_grad():
            x.copy_(x0)  # the previous step wrote its gradient over the logits
        held["logits"] = _ModelOutput.apply(anchor, x.detach())

    return (lambda: fn(held["logits"], target)), reset, (x, x0, target)


class _ModelOutput(torch.autograd.Function):
    """The logits as the output of an operation (for inplace_backward); its backward ends there."""

    @staticmethod
    def forward(ctx, anchor, logits):
        return logits

    @staticmethod
    def backward(ctx, grad):
        return None, None


def _make_linear_step(impl: str, N: int, H: int, V: int, dtype: torch.dtype, device: str):
    """Inputs and a forward+backward step of linear + cross-entropy (index targets)."""
    import crossent

    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(N, H, generator=g) / H**0.25).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(V, H, generator=g) / H**0.25).to(device=device, dtype=dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g).to(device)

    def eager(x, w, t):
        return F.cross_entropy(x @ w.t(), t)

    if impl == "torch":
        fn = eager
    elif impl == "compile":
        fn = torch.compile(eager)
    elif impl.startswith("cce"):  # Cut Cross-Entropy, e.g. cce_torch_compile or cce_cce
        from cut_cross_entropy import linear_cross_entropy as cce  # type: ignore

        which = impl.split("_", 1)[1]

        def fn(x, w, t):
            return cce(x, w, t, impl=which)
    elif impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # type: ignore

        lf = LigerFusedLinearCrossEntropyLoss()

        def fn(x, w, t):
            return lf(w, x, t)
    elif impl.split("@")[0] in ("chunked", "chunked_mm", "triton", "auto"):  # "chunked@256": chunk_size=256
        name, _, rows = impl.partition("@")
        if name == "chunked_mm":  # the chunked impl with torch.mm (MKL) instead of oneDNN on CPU
            crossent.config.CONFIG.onednn, name = False, "chunked"  # this worker process only
        chunk = int(rows) if rows else None

        def fn(x, w, t):
            return crossent.linear_cross_entropy(x, w, t, impl=name, chunk_size=chunk)
    else:
        raise ValueError(f"unknown impl {impl!r}")

    def reset():
        x.grad = w.grad = None

    return (lambda: fn(x, w, t)), reset, (x, w, t)


PHASES = {"": "loss+gradient", "loss": "loss", "grad": "gradient"}


def _timed_step(forward: Callable, reset: Callable, phase: str, sync: Callable) -> Callable[[], float]:
    """One step of ``phase`` returning its seconds: ``""`` forward+backward, ``"loss"`` the forward
    alone (no autograd graph), ``"grad"`` the backward alone (after an untimed forward)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}: use one of {sorted(PHASES)}")

    def step() -> float:
        reset()
        if phase == "loss":
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                forward()
        elif phase == "grad":
            loss = forward()
            sync()
            t0 = time.perf_counter()
            loss.backward()
        else:
            sync()
            t0 = time.perf_counter()
            forward().backward()
        sync()
        return time.perf_counter() - t0

    return step


def run_worker(impl: str, kind: str, N: int, V: int, dtype: str, device: str, reps: int, H: int = 0,
               warmup: int = 2) -> Dict:
    """One measurement in this process. ``kind`` is ``index``, ``probs`` or ``linear``, optionally
    with a phase: ``linear:loss`` times the forward alone, ``linear:grad`` the backward alone."""
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    base_kind, _, phase = kind.partition(":")
    if base_kind == "linear":
        forward, reset, keep = _make_linear_step(impl, N, H, V, dt, device)
    else:
        forward, reset, keep = _make_step(impl, base_kind, N, V, dt, device)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step = _timed_step(forward, reset, phase, sync)
    for _ in range(warmup):
        step()
    sync()
    times = [step() for _ in range(reps)]
    for k in keep:
        k.grad = None
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss_kb("VmRSS") * 1024
        ok = _reset_hwm()
        step()
        peak = _rss_kb("VmHWM") * 1024 - before if ok else float("nan")
    return {"impl": impl, "kind": kind, "N": N, "H": H, "V": V, "dtype": dtype, "device": device,
            "time_ms": statistics.median(times) * 1e3 if times else float("nan"), "peak_mb": peak / 2**20,
            # achieved bandwidth counting one read of the logits and one write of the gradient
            "gbps": 2 * N * V * dt.itemsize / statistics.median(times) / 1e9 if times else float("nan"),
            # linear + cross-entropy: 6 N H V flops (logits, input gradient, weight gradient); the
            # forward alone 2 N H V, the backward alone 4 N H V
            "tflops": {"loss": 2, "grad": 4}.get(phase, 6) * N * H * V / statistics.median(times) / 1e12
            if times and H else float("nan"),
            "logits_mb": N * V * dt.itemsize / 2**20}


def _worker(impl, kind, N, V, dtype, device, reps, H, warmup, env=None) -> Optional[Dict]:
    cmd = [sys.executable, "-m", "crossent.bench", "--worker", impl, kind, str(N), str(V), dtype, device, str(reps),
           str(H), str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(f"[{impl} {kind}] failed:\n{proc.stderr[-2000:]}\n")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_case(impl: str, kind: str, N: int, V: int, dtype: str, device: str, reps: int, H: int = 0,
             warmup: int = 2) -> Optional[Dict]:
    """One measurement in fresh Python processes (no allocator or cache state carried over).

    On CPU the peak memory comes from a second process in which glibc's mmap
    threshold is fixed at 64 KiB: otherwise buffers below its dynamic
    threshold (up to 32 MiB) are recycled from a heap that the warm-up step
    already made resident, and would not show in the measured step's peak.
    """
    r = _worker(impl, kind, N, V, dtype, device, reps, H, warmup)
    if r is None or device.startswith("cuda"):
        return r
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    m = _worker(impl, kind, N, V, dtype, device, 0, H, 1, env)
    if m is not None:
        r["peak_mb"] = m["peak_mb"]
    return r


def compare(impls: List[str], kinds: List[str], N: int, V: int, dtype: str = "float32", device: str = "cpu",
            reps: int = 7, baseline: str = "torch", progress: Optional[Callable[[str], None]] = None,
            H: int = 0, warmup: int = 2, on_row: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    """Measure every (kind, impl) and add ratios against ``baseline`` of the same kind.
    ``on_row(rows)`` is called after each measurement (a caller under a time limit keeps what it has)."""
    rows = []
    for kind in kinds:
        base = None
        for impl in impls:
            if progress:
                progress(f"{kind} / {impl}")
            r = run_case(impl, kind, N, V, dtype, device, reps, H, warmup)
            if r is None:
                continue
            if impl == baseline:
                base = r
            rows.append(r)
            if on_row:
                on_row(rows)
        for r in rows:
            if r["kind"] == kind and base is not None:
                r["time_ratio"] = r["time_ms"] / base["time_ms"]
                r["mem_ratio"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else float("nan")
    return rows


def write_csv(rows: List[Dict], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    fields = ["kind", "impl", "N", "H", "V", "dtype", "device", "time_ms", "gbps", "tflops", "peak_mb", "time_ratio", "mem_ratio",
              "logits_mb", "machine", "date"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()},
                        "machine": machine(), "date": stamp})


def print_table(rows: List[Dict], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is an extra: fall back to plain text
        for r in rows:
            print(r)
        return
    t = Table(title=title)
    for col in ("target", "impl", "time ms", "x torch", "peak extra MB", "x torch"):
        t.add_column(col, justify="right" if col not in ("target", "impl") else "left")
    for r in rows:
        t.add_row(r["kind"], r["impl"], f"{r['time_ms']:.1f}", f"{r.get('time_ratio', float('nan')):.2f}",
                  f"{r['peak_mb']:.0f}", f"{r.get('mem_ratio', float('nan')):.2f}")
    Console().print(t)
    Console().print(f"machine: {machine()}")


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="crossent bench", description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=9, help=argparse.SUPPRESS)
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--impls", default="torch,compile,auto,auto_inplace")
    ap.add_argument("--kinds", default="index,probs",
                    help="index, probs, linear; a ':loss' or ':grad' suffix times the forward or the backward alone")
    ap.add_argument("--H", type=int, default=0, help="hidden size: with --kinds linear, linear_cross_entropy")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--csv", default=None, help="write the rows to this CSV file")
    a = ap.parse_args(argv)
    if a.worker:
        impl, kind, N, V, dtype, device, reps, H, warmup = a.worker
        print(json.dumps(run_worker(impl, kind, int(N), int(V), dtype, device, int(reps), int(H), int(warmup))))
        return
    rows = compare(a.impls.split(","), a.kinds.split(","), a.N, a.V, a.dtype, a.device, a.reps,
                   progress=lambda s: print(f"measuring {s} ...", file=sys.stderr, flush=True), H=a.H,
                   warmup=a.warmup, on_row=(lambda rs: write_csv(rs, a.csv)) if a.csv else None)
    print_table(rows, f"cross_entropy forward+backward, [{a.N}, {a.V}] {a.dtype} on {a.device}")
    if a.csv:
        write_csv(rows, a.csv)


if __name__ == "__main__":
    main()

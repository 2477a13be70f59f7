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
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .machine import machine

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


def _setup(impl: str, kind: str, N: int, V: int, dtype: str, device: str, H: int):
    """The step of one case: ``(step, sync, keep)`` (see :func:`_timed_step`; ``keep`` holds the inputs)."""
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    base_kind, _, phase = kind.partition(":")
    if base_kind == "linear":
        forward, reset, keep = _make_linear_step(impl, N, H, V, dt, device)
    else:
        forward, reset, keep = _make_step(impl, base_kind, N, V, dt, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return _timed_step(forward, reset, phase, sync), sync, keep


def _times(step: Callable[[], float], sync: Callable, reps: int, warmup: int) -> List[float]:
    for _ in range(warmup):
        step()
    sync()
    return [step() for _ in range(reps)]


def _peak_bytes(step: Callable[[], float], keep, device: str) -> float:
    """Peak memory of one more step beyond what is allocated (CUDA) or resident (CPU) before it."""
    for k in keep:
        k.grad = None
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = _rss_kb("VmRSS") * 1024
    ok = _reset_hwm()
    step()
    return _rss_kb("VmHWM") * 1024 - before if ok else float("nan")


def _row(impl: str, kind: str, N: int, V: int, dtype: str, device: str, H: int, times: List[float],
         peak: float) -> Dict:
    dt = getattr(torch, dtype)
    phase = kind.partition(":")[2]
    med = statistics.median(times) if times else float("nan")
    return {"impl": impl, "kind": kind, "N": N, "H": H, "V": V, "dtype": dtype, "device": device,
            "time_ms": med * 1e3, "peak_mb": peak / 2**20,
            # achieved bandwidth counting one read of the logits and one write of the gradient
            "gbps": 2 * N * V * dt.itemsize / med / 1e9 if times else float("nan"),
            # linear + cross-entropy: 6 N H V flops (logits, input gradient, weight gradient); the
            # forward alone 2 N H V, the backward alone 4 N H V
            "tflops": {"loss": 2, "grad": 4}.get(phase, 6) * N * H * V / med / 1e12 if times and H else float("nan"),
            "logits_mb": N * V * dt.itemsize / 2**20}


def run_worker(impl: str, kind: str, N: int, V: int, dtype: str, device: str, reps: int, H: int = 0,
               warmup: int = 2) -> Dict:
    """One measurement in this process. ``kind`` is ``index``, ``probs`` or ``linear``, optionally
    with a phase: ``linear:loss`` times the forward alone, ``linear:grad`` the backward alone."""
    step, sync, keep = _setup(impl, kind, N, V, dtype, device, H)
    times = _times(step, sync, reps, warmup)
    return _row(impl, kind, N, V, dtype, device, H, times, _peak_bytes(step, keep, device))


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's mmap and trim thresholds (``mallopt``) and give back the free heap
    (``malloc_trim``). ``False`` where this is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(-3, mmap_threshold) == 1 and libc.mallopt(-1, trim_threshold) == 1
        libc.malloc_trim(0)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def sweep_worker(impl: str, kind: str, N: int, Vs: List[int], dtype: str, device: str, reps: int, H: int = 0,
                 warmup: int = 1, emit: Callable[[Dict], None] = lambda r: None) -> List[Dict]:
    """Every vocabulary size of one (impl, kind) in this process, memory first, then times.

    On CPU, the peak memory of each size (one warm-up step, then the measured
    one) is taken with glibc mapping every buffer over 64 KiB on its own, as
    :func:`run_case`'s memory process does through its environment; the
    thresholds are then set to those that glibc's own rule reaches once large
    buffers have been freed (32 MiB, trim 64 MiB), and the times of every size
    are taken (``warmup`` untimed steps, ``reps`` timed). ``emit`` is called with
    ``{"phase": "memory" | "time", "V": V}`` after each measurement.
    """
    cpu = not device.startswith("cuda")
    if cpu:
        _mallopt(65536, 0)
    peaks = {}
    for V in Vs:
        step, sync, keep = _setup(impl, kind, N, V, dtype, device, H)
        _times(step, sync, 0, 1)
        peaks[V] = _peak_bytes(step, keep, device)
        del step, keep
        gc.collect()
        emit({"phase": "memory", "V": V})
    if cpu:
        _mallopt(32 << 20, 64 << 20)
    rows = []
    for V in Vs:
        step, sync, keep = _setup(impl, kind, N, V, dtype, device, H)
        rows.append(_row(impl, kind, N, V, dtype, device, H, _times(step, sync, reps, warmup), peaks[V]))
        del step, keep
        gc.collect()
        emit({"phase": "time", "V": V})
    return rows


def _worker(impl, kind, N, V, dtype, device, reps, H, warmup, env=None) -> Optional[Dict]:
    cmd = [sys.executable, "-m", "crossent.tools.bench", "--worker", impl, kind, str(N), str(V), dtype, device, str(reps),
           str(H), str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(f"[{impl} {kind}] failed:\n{proc.stderr[-2000:]}\n")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_case(impl: str, kind: str, N: int, V: int, dtype: str, device: str, reps: int, H: int = 0,
             warmup: int = 2, threads: Optional[int] = None) -> Optional[Dict]:
    """One measurement in fresh Python processes (no allocator or cache state carried over).

    On CPU the peak memory comes from a second process in which glibc's mmap
    threshold is fixed at 64 KiB: otherwise buffers below its dynamic
    threshold (up to 32 MiB) are recycled from a heap that the warm-up step
    already made resident, and would not show in the measured step's peak.
    ``threads`` sets the workers' ``OMP_NUM_THREADS`` (torch's CPU threads).
    """
    base = _thread_env(threads)
    r = _worker(impl, kind, N, V, dtype, device, reps, H, warmup, base)
    if r is None or device.startswith("cuda"):
        return r
    env = dict(base or os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    m = _worker(impl, kind, N, V, dtype, device, 0, H, 1, env)
    if m is not None:
        r["peak_mb"] = m["peak_mb"]
    return r


def _thread_env(threads: Optional[int]) -> Optional[Dict[str, str]]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None


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


# --------------------------------------------------------------------------- peers and names

KINDS = ("index", "probs", "linear")
PHASE_NAMES = {"": "forward+backward", "loss": "forward only", "grad": "backward only"}
#: impl names of --impls; "chunked@ROWS" (linear, a chunk of ROWS rows) is accepted as well
IMPLS = {
    "torch": "torch eager (PyTorch's F.cross_entropy; linear: the logits materialised)",
    "compile": "torch.compile of the eager computation",
    "auto": "crossent, impl='auto' (triton on CUDA, else chunked)",
    "chunked": "crossent, impl='chunked'",
    "triton": "crossent, impl='triton' (CUDA)",
    "auto_inplace": "crossent auto with inplace_backward=True (cross_entropy only)",
    "chunked_inplace": "crossent chunked with inplace_backward=True (cross_entropy only)",
    "triton_inplace": "crossent triton with inplace_backward=True (cross_entropy only)",
    "chunked_mm": "crossent chunked with torch.mm (MKL) instead of oneDNN (linear only)",
    "liger": "Liger-Kernel (CUDA only)",
    "cce": "Cut Cross-Entropy (linear only): its 'cce' kernels on CUDA, 'torch_compile' on CPU",
    "cce_cce": "Cut Cross-Entropy, impl='cce' (CUDA)",
    "cce_torch_compile": "Cut Cross-Entropy, impl='torch_compile'",
}
LABELS = {"torch": "torch eager", "compile": "torch.compile", "auto": "crossent (auto)", "chunked": "crossent chunked",
          "triton": "crossent triton", "auto_inplace": "crossent (auto, inplace_backward)",
          "chunked_inplace": "crossent chunked, inplace_backward", "triton_inplace": "crossent triton, inplace_backward",
          "chunked_mm": "crossent chunked, MKL", "liger": "Liger-Kernel", "cce_cce": "Cut Cross-Entropy (cce)",
          "cce_torch_compile": "Cut Cross-Entropy (torch_compile)"}
PEERS = {"liger": ("liger_kernel", "Liger-Kernel", "pip install liger-kernel"),
         "cce": ("cut_cross_entropy", "Cut Cross-Entropy", "pip install cut-cross-entropy")}


def check_impl(name: str) -> None:
    """Raise ``ValueError`` naming an unknown impl and the known ones."""
    base, at, rows = name.partition("@")
    if name in IMPLS or (base == "chunked" and at and rows.isdigit() and int(rows) > 0):
        return
    raise ValueError(f"unknown impl {name!r}: use any of {', '.join(IMPLS)}, or chunked@ROWS (e.g. chunked@256)")


def resolve_impl(name: str, device: str) -> str:
    """``cce`` becomes the Cut Cross-Entropy impl that runs on ``device``; other names stay."""
    if name == "cce":
        return "cce_cce" if device.startswith("cuda") else "cce_torch_compile"
    return name


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def skip_reason(impl: str, kind: str, device: str) -> Optional[str]:
    """Why ``impl`` cannot be measured for ``kind`` on ``device`` here, or ``None`` if it can."""
    base = kind.partition(":")[0]
    cuda = device.startswith("cuda")
    if impl.startswith("cce"):
        if not _installed("cut_cross_entropy"):
            return "Cut Cross-Entropy is not installed (pip install cut-cross-entropy)"
        if base != "linear":
            return "Cut Cross-Entropy has only a linear + cross-entropy (--kinds linear)"
        if impl == "cce_cce" and not cuda:
            return "Cut Cross-Entropy's 'cce' kernels need CUDA; on CPU only cce_torch_compile runs"
    if impl == "liger":
        if not _installed("liger_kernel"):
            return "Liger-Kernel is not installed (pip install liger-kernel)"
        if not cuda:
            return "Liger-Kernel's triton kernels need CUDA"
        if base == "probs":
            return "Liger-Kernel takes class indices only"
    if impl.startswith("triton") and not cuda:
        from ..config import triton_interpreted

        if not triton_interpreted():
            return "crossent's triton kernels need CUDA (or TRITON_INTERPRET=1)"
    if impl.endswith("_inplace") and base == "linear":
        return "inplace_backward is a cross_entropy option: linear_cross_entropy has no logits to overwrite"
    if (impl.startswith("chunked@") or impl == "chunked_mm") and base != "linear":
        return f"{impl} is a linear_cross_entropy setting (--kinds linear)"
    return None


# --------------------------------------------------------------------------- sweeps


def _skipped(impl: str, kind: str, N: int, H: int, V: int, dtype: str, device: str, note: str) -> Dict:
    nan = float("nan")
    return {"impl": impl, "kind": kind, "N": N, "H": H, "V": V, "dtype": dtype, "device": device, "time_ms": nan,
            "peak_mb": nan, "gbps": nan, "tflops": nan, "logits_mb": N * V * getattr(torch, dtype).itemsize / 2**20,
            "note": note}


def _sweep_process(impl, kind, N, Vs, dtype, device, reps, H, warmup, tick, threads=None) -> Dict[int, Dict]:
    """:func:`sweep_worker` in a fresh process; ``tick()`` after each of its measurements.
    Returns the rows by V; a size that failed has a row with ``note`` saying why."""
    cmd = [sys.executable, "-m", "crossent.tools.bench", "--sweep-worker", impl, kind, str(N), ",".join(map(str, Vs)),
           dtype, device, str(reps), str(H), str(warmup)]
    rows: Dict[int, Dict] = {}
    with tempfile.TemporaryFile("w+") as errf:  # a file, not a pipe: a chatty worker cannot block on it
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, text=True, env=_thread_env(threads))
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and "phase" in msg:
                tick()
            elif isinstance(msg, dict) and "impl" in msg:
                rows[msg["V"]] = msg
        proc.wait()
        errf.seek(0)
        err = errf.read()
    if proc.returncode != 0 or len(rows) < len(Vs):
        why = _last_error(err) or f"exit status {proc.returncode}"
        for V in Vs:
            rows.setdefault(V, _skipped(impl, kind, N, H, V, dtype, device, f"failed: {why}"))
    return rows


def _last_error(stderr: str) -> str:
    lines = [l.strip() for l in stderr.strip().splitlines() if l.strip()]
    for l in reversed(lines):
        if "Error" in l or "error" in l:
            return l[:300]
    return lines[-1][:300] if lines else ""


def add_ratios(rows: List[Dict], baseline: str = "torch") -> None:
    """``time_ratio`` and ``mem_ratio`` of each row against the ``baseline`` row of the same kind and V
    (NaN where that row is missing, skipped or failed)."""
    base = {(r["kind"], r["V"]): r for r in rows if r["impl"] == baseline and not r.get("note")}
    nan = float("nan")
    for r in rows:
        b = base.get((r["kind"], r["V"]))
        r["time_ratio"] = r["time_ms"] / b["time_ms"] if b and b["time_ms"] > 0 else nan
        r["mem_ratio"] = r["peak_mb"] / b["peak_mb"] if b and b["peak_mb"] > 0 else nan


def sweep(impls: List[str], kinds: List[str], N: int, Vs: List[int], dtype: str = "float32", device: str = "cpu",
          reps: int = 7, H: int = 0, warmup: int = 2, per: str = "case", baseline: str = "torch",
          threads: Optional[int] = None, progress: Optional[Callable[[str, float], None]] = None,
          on_row: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    """Measure every (kind, impl, V); skip, with a note, what cannot run here.

    Args:
        impls, kinds (list of str): see ``crossent bench --help``; ``cce`` picks
            Cut Cross-Entropy's impl for ``device``.
        N, H (int): rows, and the hidden size of ``linear`` kinds.
        Vs (list of int): vocabulary sizes.
        per (str): ``"case"``: each (kind, impl, V) in fresh processes (:func:`run_case`);
            ``"impl"``: one process per (kind, impl) measures every V (:func:`sweep_worker`).
        threads (int, optional): torch's CPU threads in the workers (``OMP_NUM_THREADS``).
        progress (callable, optional): ``progress(description, advance)``; a
            case advances by 1 in all.
        on_row (callable, optional): called with the rows so far after each
            measurement (a caller under a time limit keeps what it has).

    Returns:
        One row per (kind, impl, V), ordered that way, with ``time_ratio`` and
        ``mem_ratio`` against ``baseline``; skipped and failed rows have NaN
        times and a ``note``.
    """
    if per not in ("case", "impl"):
        raise ValueError(f"per={per!r}: use 'case' or 'impl'")
    rows: List[Dict] = []
    progress = progress or (lambda desc, adv: None)

    def done(new: List[Dict]) -> None:
        rows.extend(new)
        add_ratios(rows, baseline)
        if on_row:
            on_row(rows)

    for kind in kinds:
        for name in impls:
            impl = resolve_impl(name, device)
            why = skip_reason(impl, kind, device)
            if why:
                progress(f"{kind} {impl}: skipped", len(Vs))
                done([_skipped(impl, kind, N, H, V, dtype, device, f"skipped: {why}") for V in Vs])
                continue
            if per == "impl":
                progress(f"{kind} {impl}", 0)
                by_v = _sweep_process(impl, kind, N, Vs, dtype, device, reps, H, warmup,
                                      lambda: progress(f"{kind} {impl}", 0.5), threads)
                done([by_v[V] for V in Vs])
                continue
            for V in Vs:
                progress(f"{kind} {impl} V={V}", 0)
                r = run_case(impl, kind, N, V, dtype, device, reps, H, warmup, threads)
                progress(f"{kind} {impl} V={V}", 1)
                done([r if r is not None else _skipped(impl, kind, N, H, V, dtype, device,
                                                       "failed: the worker process failed (its error is above)")])
    order = {(k, resolve_impl(i, device)): n for n, (k, i) in enumerate((k, i) for k in kinds for i in impls)}
    rows.sort(key=lambda r: (order.get((r["kind"], r["impl"]), 0) // max(1, len(impls)), r["V"],
                             order.get((r["kind"], r["impl"]), 0)))
    return rows


# --------------------------------------------------------------------------- output

CSV_FIELDS = ["kind", "impl", "N", "H", "V", "dtype", "device", "time_ms", "gbps", "tflops", "peak_mb", "time_ratio",
              "mem_ratio", "logits_mb", "note", "machine", "date"]


def write_csv(rows: List[Dict], path: str) -> None:
    """Write ``rows`` to ``path`` (folders made), with the machine and the date on every row.
    Numbers have 4 significant digits; a skipped or failed row has empty numbers and a ``note``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def fmt(v):
        if isinstance(v, float):
            return "" if v != v else f"{v:.4g}"
        return v

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**{k: fmt(v) for k, v in r.items()}, "machine": machine(), "date": stamp})


def _kind_title(kind: str) -> str:
    base, _, phase = kind.partition(":")
    what = {"index": "cross_entropy, class indices", "probs": "cross_entropy, probabilities",
            "linear": "linear_cross_entropy"}.get(base, base)
    return f"{what}, {PHASE_NAMES.get(phase, phase)}"


def _num(v: float, fmt: str) -> str:
    return "-" if v != v else format(v, fmt)


def print_table(rows: List[Dict], title: str, console=None) -> None:
    """The rows as a rich table (plain lines without rich): time, peak memory, and both as ratios
    of torch eager's, the machine below; skipped and failed impls once each, with the reason."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is an extra: fall back to plain text
        for r in rows:
            print(r)
        print(f"machine: {machine()}")
        return
    console = console or Console()
    sweep_v = len({r["V"] for r in rows}) > 1
    many_kinds = len({r["kind"] for r in rows}) > 1
    t = Table(title=title, caption=f"machine: {machine()}")
    cols = (["kind"] if many_kinds else []) + (["V"] if sweep_v else []) + ["impl", "time ms", "x torch",
                                                                           "peak MB", "x torch"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("kind", "impl") else "right", no_wrap=col in ("impl", "time ms"))
    notes: Dict = {}
    for r in rows:
        if r.get("note"):  # listed once per (kind, impl, reason), after the measurements
            notes.setdefault((r["kind"], r["impl"], r["note"]), len(notes) + 1)
            continue
        t.add_row(*([r["kind"]] if many_kinds else []), *([str(r["V"])] if sweep_v else []), r["impl"],
                  _num(r["time_ms"], ".1f"), _num(r.get("time_ratio", float("nan")), ".2f"),
                  _num(r["peak_mb"], ".1f"), _num(r.get("mem_ratio", float("nan")), ".2f"))
    for (kind, impl, note), n in notes.items():
        t.add_row(*([kind] if many_kinds else []), *(["all"] if sweep_v else []), impl,
                  f"[yellow]{note.split(':')[0]} ({n})[/yellow]", "", "", "")
    console.print(t)
    for (kind, impl, note), n in notes.items():
        console.print(f"({n}) {impl}{' / ' + kind if many_kinds else ''}: {note}", highlight=False)


def plot(rows: List[Dict], path: str, title: str) -> None:
    """Time and peak memory against the vocabulary size, one line per impl and one row of two
    panels per kind, written as a PNG (matplotlib, Agg backend). Skipped impls are listed below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, axes = plt.subplots(len(kinds), 2, figsize=(12, 4.2 * len(kinds) + 1.2), squeeze=False)
    Vs = sorted({r["V"] for r in rows})
    notes = []
    for ax_t, ax_m, kind in ((a[0], a[1], k) for a, k in zip(axes, kinds)):
        for impl in dict.fromkeys(r["impl"] for r in rows if r["kind"] == kind):
            pts = sorted((r["V"], r["time_ms"], r["peak_mb"]) for r in rows
                         if r["kind"] == kind and r["impl"] == impl and not r.get("note"))
            skipped = [r["note"] for r in rows if r["kind"] == kind and r["impl"] == impl and r.get("note")]
            if skipped:
                notes.append(f"{kind} / {impl}: {skipped[0]}")
            if not pts:
                continue
            v, tm, mb = zip(*pts)
            label = LABELS.get(impl, impl)
            ax_t.plot(v, tm, marker="o", label=label)
            ax_m.plot(v, mb, marker="o", label=label)
        for ax, what, head in ((ax_t, "median time per step (ms)", "time"),
                               (ax_m, "peak memory beyond the inputs (MB)", "peak memory")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(Vs)
            ax.set_xticklabels([f"{v // 1024}k" if v % 1024 == 0 else str(v) for v in Vs])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.set_xlabel("vocabulary size V (classes)")
            ax.set_ylabel(what)
            ax.set_title(f"{head}: {_kind_title(kind)}" if len(kinds) > 1 else head, fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{title}\n{machine()}", fontsize=11)
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=8, va="bottom", color="0.35")
    fig.tight_layout(rect=(0, 0.03 * (1 + len(notes)) / len(kinds), 1, 1))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- command line

#: defaults, and those of --quick (a sweep of small linear_cross_entropy cases, about a minute on 2 CPU cores)
DEFAULTS = {"N": 4096, "H": 0, "V": "32000", "impls": "torch,compile,auto,auto_inplace,liger,cce",
            "kinds": "index,probs", "reps": 7, "warmup": 2, "per": "case", "threads": None}
QUICK = {"N": 256, "H": 128, "V": "2048,8192,32768", "impls": "torch,auto,cce,liger", "kinds": "linear",
         "reps": 3, "warmup": 0, "per": "impl", "threads": 1}
DTYPES = ("float32", "float16", "bfloat16", "float64")


def _default_out_dir() -> str:
    here = os.path.join("benchmarks", "results")
    return here if os.path.isdir(here) else "."


def _parser() -> argparse.ArgumentParser:
    def d(key):
        return f"(default: {DEFAULTS[key]}; with --quick: {QUICK[key]})"

    fill = textwrap.TextWrapper(width=min(100, shutil.get_terminal_size((100, 24)).columns - 2)).fill
    ap = argparse.ArgumentParser(
        prog="crossent bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=fill(
            "Time and peak memory of cross-entropy implementations, side by side: crossent beside torch eager, "
            "torch.compile, Liger-Kernel and Cut Cross-Entropy. A peer is measured where it is installed and "
            "can run, and listed as skipped, with the reason, where not. Prints a table with the ratios to torch "
            "eager and the machine, and writes a CSV and a PNG plot of time and peak memory against the "
            "vocabulary size."),
        epilog="\n\n".join([
            fill("Peak memory is what a step adds beyond its inputs: on CUDA torch's max_memory_allocated; on "
                 "CPU the process's resident high-water mark (Linux VmHWM), with glibc set to map every buffer "
                 "over 64 KiB on its own, so that freed memory is not reused unseen. The kernel counts resident "
                 "memory in pages and in batches: below about a megabyte the CPU figures mean little."),
            fill("Output files: with neither --csv nor --png, both go to --out-dir, named "
                 "bench_quick_DEVICE.csv/.png with --quick and bench_KINDS_DTYPE_DEVICE_NN.csv/.png otherwise. "
                 "--csv alone writes only that CSV, after each measurement (a run cut short keeps what it "
                 "measured)."),
            "examples:\n"
            "  crossent bench --quick                  # about a minute on 2 CPU cores\n"
            "  crossent bench --kinds linear --N 2048 --H 512 --V 8192,32000 --impls torch,compile,auto,cce\n"
            "  crossent bench --kinds index --N 8192 --V 128256 --dtype bfloat16 --device cuda --csv ce.csv"]))
    ap.add_argument("--worker", nargs=9, help=argparse.SUPPRESS)
    ap.add_argument("--sweep-worker", nargs=9, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true",
                    help=f"a quick sweep: linear_cross_entropy, N={QUICK['N']} H={QUICK['H']} "
                         f"V={QUICK['V']}, {QUICK['reps']} timed steps, one process per impl; options given "
                         f"explicitly still apply")
    ap.add_argument("--kinds", help="comma-separated: index (class-index targets), probs (probability "
                    "targets), linear (linear_cross_entropy, needs --H); a ':loss' or ':grad' suffix times the "
                    "forward or the backward alone " + d("kinds"))
    ap.add_argument("--impls", help="comma-separated, from: " + ", ".join(IMPLS) + ", chunked@ROWS. "
                    "Peers that are not installed or cannot run here are listed as skipped " + d("impls"))
    ap.add_argument("--N", type=int, help="rows (tokens) per step " + d("N"))
    ap.add_argument("--V", help="vocabulary size (classes); comma-separated for a sweep, e.g. 8192,32000 "
                    + d("V"))
    ap.add_argument("--H", type=int, help="hidden size, needed by the linear kinds (linear_cross_entropy's "
                    "input is [N, H], its weight [V, H]) " + d("H"))
    ap.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the logits or of the hidden "
                    "states and weight (default: float32)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda or cuda:K (default: cuda when available, else cpu; here: %(default)s)")
    ap.add_argument("--reps", type=int, help="timed steps per case; the median is reported " + d("reps"))
    ap.add_argument("--warmup", type=int, help="untimed steps before them " + d("warmup"))
    ap.add_argument("--per", choices=("case", "impl"), help="case: each (kind, impl, V) in fresh processes, "
                    "its memory measured in a second one; impl: one process per (kind, impl) measures every V, "
                    "memory first (two steps per V, which also warm it up), then times (faster) " + d("per"))
    ap.add_argument("--threads", type=int, help="torch's CPU threads in the measuring processes "
                    "(OMP_NUM_THREADS). On a CPU shared with other work, 1 avoids threads that wait on each "
                    "other (default: torch's own choice; with --quick on CPU: 1)")
    ap.add_argument("--out-dir", help="folder of the CSV and PNG when --csv and --png are not given (default: "
                    "benchmarks/results when the current folder has one, else the current folder)")
    ap.add_argument("--csv", help="write the rows to this CSV file (then no PNG unless --png is given)")
    ap.add_argument("--png", help="write the plot to this PNG file")
    return ap


def _settings(ap: argparse.ArgumentParser, a: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults (--quick's or the plain ones) and check every value, with an error naming
    the option, the value and the fix."""
    preset = QUICK if a.quick else DEFAULTS
    for key, value in preset.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.device.startswith("cuda") and a.threads == QUICK["threads"] and a.quick:
        a.threads = None  # the GPU does the work
    for key in ("N", "reps"):
        if getattr(a, key) < 1:
            ap.error(f"--{key} {getattr(a, key)}: pass a positive integer, e.g. --{key} {QUICK[key]}")
    if a.threads is not None and a.threads < 1:
        ap.error(f"--threads {a.threads}: pass a positive number of threads, e.g. --threads 1")
    if a.warmup < 0:
        ap.error(f"--warmup {a.warmup}: pass 0 or more untimed steps, e.g. --warmup 1")
    Vs = []
    for part in str(a.V).split(","):
        if not part.strip().isdigit() or int(part) < 2:
            ap.error(f"--V {a.V!r}: {part!r} is not a vocabulary size; pass integers of at least 2, "
                     "comma-separated, e.g. --V 8192,32000")
        Vs.append(int(part))
    a.Vs = sorted(dict.fromkeys(Vs))
    a.kind_list = [k.strip() for k in a.kinds.split(",") if k.strip()]
    for k in a.kind_list:
        base, _, phase = k.partition(":")
        if base not in KINDS or phase not in PHASES:
            ap.error(f"--kinds: {k!r} is not a kind; use index, probs or linear, optionally with :loss or :grad "
                     "(e.g. --kinds index,linear:loss)")
    if any(k.startswith("linear") for k in a.kind_list) and a.H < 1:
        ap.error(f"--kinds {a.kinds} measures linear_cross_entropy, which needs a hidden size: add --H, "
                 "e.g. --H 512")
    a.impl_list = [i.strip() for i in a.impls.split(",") if i.strip()]
    if not a.impl_list or not a.kind_list:
        ap.error("--impls and --kinds need at least one name each")
    for i in a.impl_list:
        try:
            check_impl(i)
        except ValueError as e:
            ap.error(f"--impls: {e}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: CUDA is not available here; use --device cpu")
    if not (a.device == "cpu" or a.device.startswith("cuda")):
        ap.error(f"--device {a.device!r}: use cpu, cuda or cuda:K")
    _outputs(ap, a)
    return a


def _output_problem(path: str, ext: Optional[str]) -> Optional[Tuple[str, str]]:
    """``(what is wrong, the fix)`` where ``path`` cannot be written as a file (``ext``: ``".csv"``,
    ``".png"``) or made or used as a folder (``ext=None``); ``None`` if it can. Nothing is created."""
    kind = "folder" if ext is None else "file"
    if not path:
        return "is empty", f"pass a {kind} path, e.g. bench{ext or '_results'}"
    if ext and path.endswith(("/", os.sep)):
        return "ends in a path separator, which names a folder", f"pass a file path, e.g. {path.rstrip('/')}{ext}"
    if os.path.lexists(path):
        if os.path.isdir(path) and ext:
            return "is an existing folder, not a file", f"pass a file path, e.g. {os.path.join(path, 'bench' + ext)}"
        if not os.path.isdir(path) and not ext:
            return "is an existing file, not a folder", "pass a folder (new or existing)"
        if not os.access(path, os.W_OK | (os.X_OK if ext is None else 0)):
            return "is not writable", f"pass a {kind} you can write to, or change its permissions"
        return None
    top = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(top):
        top = os.path.dirname(top)
    if not os.path.isdir(top):
        return f"cannot be created: {top} is a file, not a folder", "pass a path under a folder"
    if not os.access(top, os.W_OK | os.X_OK):
        return f"cannot be created: the folder {top} is not writable", "pass a path under a folder you can write to"
    return None


def _outputs(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Set ``a.csv`` and ``a.png`` (both in --out-dir when neither is given) and check every path the
    run will write, before anything is measured: a usage error (exit status 2) naming the option, the
    path, what is wrong and the fix."""
    if a.csv is None and a.png is None:
        out = a.out_dir or _default_out_dir()
        if a.quick:
            stem = f"bench_quick_{a.device.replace(':', '')}"
        else:
            kinds = "-".join(k.replace(":", "_") for k in a.kind_list)
            stem = f"bench_{kinds}_{a.dtype}_{a.device.replace(':', '')}_N{a.N}"
        a.csv, a.png = os.path.join(out, stem + ".csv"), os.path.join(out, stem + ".png")
        opt = f"--out-dir {shlex.quote(out)}" + ("" if a.out_dir else " (the default)")
        checks = [(opt, out, None, None)] + [
            (f"{opt}: its {ext[1:].upper()} {shlex.quote(p)}", p, ext,
             "remove it, or pass another --out-dir, or --csv/--png") for p, ext in ((a.csv, ".csv"), (a.png, ".png"))]
    else:
        checks = [(f"--{ext[1:]} {shlex.quote(p)}", p, ext, None)
                  for p, ext in ((a.csv, ".csv"), (a.png, ".png")) if p is not None]
    for where, path, ext, fix in checks:
        problem = _output_problem(path, ext)
        if problem:
            ap.error(f"{where} {problem[0]}; {fix or problem[1]}")
    if a.csv and a.png and os.path.abspath(a.csv) == os.path.abspath(a.png):
        ap.error(f"--csv and --png both name {a.csv}: the plot would overwrite the CSV; pass two paths, "
                 "e.g. --csv bench.csv --png bench.png")


def _title(a: argparse.Namespace) -> str:
    what = ", ".join(dict.fromkeys(_kind_title(k) for k in a.kind_list))
    shape = f"N={a.N}" + (f", H={a.H}" if any(k.startswith("linear") for k in a.kind_list) else "")
    vs = f"V={a.Vs[0]}" if len(a.Vs) == 1 else f"V in {{{', '.join(map(str, a.Vs))}}}"
    threads = f", {a.threads} thread{'s' if a.threads > 1 else ''}" if a.threads and a.device == "cpu" else ""
    return f"{what}; {shape}, {vs}, {a.dtype} on {a.device}{threads}"


def main(argv: Optional[List[str]] = None) -> None:
    """``crossent bench`` (see ``crossent bench --help``)."""
    ap = _parser()
    a = ap.parse_args(argv)
    if a.worker:
        impl, kind, N, V, dtype, device, reps, H, warmup = a.worker
        print(json.dumps(run_worker(impl, kind, int(N), int(V), dtype, device, int(reps), int(H), int(warmup))))
        return
    if a.sweep_worker:
        impl, kind, N, Vs, dtype, device, reps, H, warmup = a.sweep_worker

        def emit(msg):
            print(json.dumps(msg), flush=True)

        for r in sweep_worker(impl, kind, int(N), [int(v) for v in Vs.split(",")], dtype, device, int(reps),
                              int(H), int(warmup), emit):
            emit(r)
        return
    a = _settings(ap, a)
    title = _title(a)
    t0 = time.perf_counter()
    write = (lambda rs: write_csv(rs, a.csv)) if a.csv else None
    try:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:  # rich is an extra
        rows = sweep(a.impl_list, a.kind_list, a.N, a.Vs, a.dtype, a.device, a.reps, a.H, a.warmup, a.per, "torch", a.threads,
                     progress=lambda s, adv: adv == 0 and print(f"measuring {s} ...", file=sys.stderr, flush=True),
                     on_row=write)
        console = None
    else:
        console = Console()
        total = len(a.kind_list) * len(a.impl_list) * len(a.Vs)
        with Progress(TextColumn("[bold]measuring[/bold] {task.description}"), BarColumn(),
                      TextColumn("{task.completed:.0f}/{task.total} cases"), TimeElapsedColumn(),
                      console=Console(stderr=True)) as bar:
            task = bar.add_task("", total=total)
            rows = sweep(a.impl_list, a.kind_list, a.N, a.Vs, a.dtype, a.device, a.reps, a.H, a.warmup, a.per, "torch", a.threads,
                         progress=lambda s, adv: bar.update(task, description=s, advance=adv), on_row=write)
    print_table(rows, title, console)
    if a.csv:
        write_csv(rows, a.csv)
    if a.png:
        plot(rows, a.png, title)
    wrote = " and ".join(p for p in (a.csv, a.png) if p)
    msg = f"wrote {wrote} in {time.perf_counter() - t0:.0f} s"
    (console.print(msg) if console else print(msg))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Compile every triton kernel of crossent for real GPUs on any machine (no GPU needed), and write
the resource table and the time floors to ``docs/kernels.md``.

    python benchmarks/kernel_resources.py             # compile, write docs/kernels.md
    python benchmarks/kernel_resources.py --check     # compile, print failures; exit 1 on any
    python benchmarks/kernel_resources.py --json F    # also dump every result as JSON

How the specialisations are found: the real entry points (``crossent.cross_entropy`` /
``crossent.linear_cross_entropy`` with ``impl="triton"``) run on small CPU tensors while a
compile-only stand-in driver reports a CUDA target, and triton's ``jit_cache_hook`` records what
each launch would compile (signature, constexprs, divisibility attributes, ``num_warps`` /
``num_stages``) and stops it there, so nothing is launched. The linear kernels run through
``build_kernels(True, ...)``, the autotuner of the launcher, with a timer that picks nothing:
every candidate of the dtype's lists (``CONFIG.triton_fwd_configs`` / ``triton_bwd_configs``, or
their ``_fp32`` twins for float32) is recorded. Shapes are
small but have the divisibility of the benchmark shapes (every size a multiple of 16), which is
all that triton specialises on besides the constexprs.

Each recorded specialisation is then compiled with ``triton.compile`` for sm_80, sm_90 and sm_100
(ptxas from the triton wheel), in parallel processes. Registers and spills come from ptxas's own
report (``-v``), shared memory from triton's metadata. Results are cached under
``$CROSSENT_AOT_CACHE`` (default ``~/.cache/crossent/aot``), one file per triton compile key: the
same key triton's own cache uses (kernel source and the source of every function it calls, triton
and ptxas versions, target, options, constexprs, attributes), so an edit to a kernel recompiles
exactly what it touches. Compile errors are never cached. A table run also writes every result to
``benchmarks/results/aot_cache.json`` (committed), which a clean clone reads by the same keys.

Which specialisations (the reduction from the full cross product, see ``cases``):

* every dtype (float32, bfloat16, float16) x every autotune config (linear forward and backward)
  or class tile (cross-entropy: every ``BLOCK`` that ``class_block`` can return, with its
  ``num_warps``) x every target, in the benchmark's specialisation (index targets, no options,
  gradient wanted): these are what the benchmarks run, and where spills matter;
* the optional flags: their code is elementwise work on the same tiles, the same IR at every tile
  size and dtype, and each flag only adds live values, so for each target kind (index, probs,
  top-k) the specialisation with every flag on bounds the register pressure of any subset. It is
  compiled for every dtype at the benchmark tile (cross-entropy), and at the first config of each
  autotune list (linear: index targets in every dtype, probs and top-k in bfloat16);
* what changes addressing rather than flags: a class dim that is not the last (``dim=1`` with
  trailing dims, strided classes), class counts and hidden sizes that are not multiples of 16 (no
  divisibility hints), a hidden size below 64 (the merging kernel's narrower ``BK``), only one of
  the input and weight gradients, and ``reduction="none"`` (the backward's per-row scale).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = (80, 90, 100)  # A100, H100/H200, B200
# the most shared memory one program may use (opt-in), bytes: A100, H100/H200, B200
SMEM_LIMIT = {80: 166912, 90: 232448, 100: 232448}
KERNEL_MODULES = ("crossent.impl.triton.kernels", "crossent.impl.triton.linear_kernels")

# --------------------------------------------------------------------------- specialisations


@dataclass
class Spec:
    """One specialisation of one kernel, as the launcher would compile it."""

    kernel: str  # "module:name"
    signature: Dict[str, str]
    constants: Dict[tuple, object]
    attrs: Dict[tuple, list]
    num_warps: int
    num_stages: int
    cases: List[str] = field(default_factory=list)  # the calls that produce it
    bench: bool = False  # produced by a benchmark call

    @property
    def name(self) -> str:
        return self.kernel.split(":")[1]

    def const(self, name: str):
        sig = list(self.signature)
        return self.constants.get((sig.index(name),)) if name in sig else None

    def named_constants(self) -> dict:
        """The constexprs by parameter name (JSON-friendly)."""
        sig = list(self.signature)
        return {sig[k[0]]: v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
                for k, v in self.constants.items() if len(k) == 1}

    @property
    def dtype(self) -> str:
        return self.signature["X"].lstrip("*")

    def ident(self) -> str:
        return repr((self.kernel, sorted(self.signature.items()), sorted(self.constants.items(), key=str),
                     sorted(self.attrs.items(), key=str), self.num_warps, self.num_stages))

    @property
    def config(self) -> str:
        """The tile config: ``BLOCK/warps`` (cross-entropy) or ``BMxBVxBK/warps/stages``."""
        if self.name == "ce_fwd_kernel":
            return f"{self.const('BLOCK')}/w{self.num_warps}"
        if self.name == "lce_fin_kernel":
            return f"{self.const('BM')}xK{self.const('KP')}x{self.const('BK')}/w{self.num_warps}"
        return f"{self.const('BM')}x{self.const('BV')}x{self.const('BK')}/w{self.num_warps}/s{self.num_stages}"

    @property
    def flags(self) -> str:
        """The specialisation in short: target kind, then each flag that is on."""
        sig = list(self.signature)
        on = [sig[i] for (i,), v in self.constants.items() if v is True and sig[i] != "IS_PROBS"]
        kind = "probs" if self.const("IS_PROBS") else ("top-k" if (self.const("KP") or 1) > 1 else "index")
        short = [re.sub(r"^(HAS|WANT|NEED)_", "", n) for n in on]
        if self.name == "ce_fwd_kernel":
            if self.signature["sxc"] != "constexpr":
                short.append("strided classes")
            if not self.attrs.get((sig.index("C"),)):
                short.append("C%16!=0")
        elif "H" in sig and not self.attrs.get((sig.index("H"),)):
            short.append("H%16!=0")
        return kind + (" " + ",".join(short) if short else "")


def _driver(cap: int):
    import torch
    from triton.backends.compiler import GPUTarget

    class CompileOnlyDriver:
        """Reports a CUDA target; the jit_cache_hook stops every launch before it compiles."""

        def get_current_target(self):
            return GPUTarget("cuda", cap, 32)

        def get_current_device(self):
            return cap

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def get_benchmarker(self):
            raise RuntimeError("compile-only driver: no benchmarker")

        def map_python_to_cpp_type(self, ty):
            return ty

        def is_active(self):
            return True

        class launcher_cls:
            def __init__(self, src, metadata):
                raise RuntimeError("compile-only driver: no GPU to launch on")

    return CompileOnlyDriver()


def _ce_case(dtype, C, kind="index", full=False, grad=True, kdim=False, N=4):
    """A ``crossent.cross_entropy`` call: ``full`` turns every option on."""
    import torch

    import crossent

    g = torch.Generator().manual_seed(0)
    shape = (N, C, 3) if kdim else (N, C)
    x = torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)
    tshape = (N, 3) if kdim else (N,)
    if kind == "index":
        t = torch.randint(0, C, tshape, generator=g)
    elif kind == "probs":
        t = torch.rand(*shape, generator=g).to(dtype).softmax(1)
    else:
        t = crossent.SparseTarget(torch.randint(0, C, tshape + (3,), generator=g),
                                  torch.rand(*tshape, 3, generator=g).to(dtype))  # float32 values promote
    kw = dict(weight=torch.rand(C, generator=g) + 0.5, label_smoothing=0.1, z_loss=1e-4, softcap=30.0,
              return_extras=True) if full else {}

    def call():
        out = crossent.cross_entropy(x, t, impl="triton", **kw)
        loss = out[0] if isinstance(out, tuple) else out
        if grad:
            loss.backward()
    return call


def _linear_case(dtype, full=False, kind="index", grads=(True, True), H=64, V=512, N=64, none=False):
    """A ``crossent.linear_cross_entropy`` call (``full``: bias, shift, every option on)."""
    import torch

    import crossent

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, N // 2 + 1, H, generator=g) if full else torch.randn(N, H, generator=g)).to(dtype)
    w = torch.randn(V, H, generator=g).to(dtype)
    x.requires_grad_(grads[0])
    w.requires_grad_(grads[1])
    b = torch.randn(V, generator=g).to(dtype).requires_grad_(True) if full else None
    tshape = x.shape[:-1]
    if kind == "index":
        t = torch.randint(0, V, tshape, generator=g)
    elif kind == "probs":
        t = torch.rand(*tshape, V, generator=g).softmax(-1).to(dtype)
    else:
        t = crossent.SparseTarget(torch.randint(0, V, tshape + (3,), generator=g),
                                  torch.rand(*tshape, 3, generator=g).to(dtype))
    kw = dict(weight=torch.rand(V, generator=g) + 0.5, label_smoothing=0.1, z_loss=1e-4, softcap=30.0,
              return_extras=True, filter_eps=1e-6, shift=kind != "probs") if full else {}
    if none:
        kw["reduction"] = "none"

    def call():
        out = crossent.linear_cross_entropy(x, w, t, b, impl="triton", **kw)
        loss = out[0] if isinstance(out, tuple) else out
        if any(grads) or b is not None:
            loss.sum().backward()
    return call


def cases(configs=None) -> List[Tuple[str, bool, Optional[tuple], Callable]]:
    """``(name, is_benchmark, (fwd_configs, bwd_configs) or None for all, call)``: the calls whose
    launches are recorded (the reduction is argued in the module's docstring)."""
    import torch

    from crossent.config import CONFIG
    from crossent.impl.triton.cross_entropy import class_block

    dts = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    blocks = sorted({class_block(2 ** k) for k in range(0, 20)})
    from crossent.impl.triton.linear import config_lists

    def first(dtype):  # the first candidate of the dtype's lists
        fwd, bwd = config_lists(dtype)
        return fwd[:1], bwd[:1]

    out = []
    for dn, dt in dts.items():
        # the benchmarks (benchmarks/gpu_check.sh) run cross_entropy in bfloat16 and float32 at
        # C = 128256 and 32000 (the widest tile), linear_cross_entropy in bfloat16
        ce_bench = dn in ("bfloat16", "float32")
        for blk in blocks:  # every class tile (C = the tile), benchmark specialisation
            out.append((f"ce {dn} C={blk}", ce_bench and blk == blocks[-1], None, _ce_case(dt, blk)))
        out.append((f"ce {dn} C=128256", ce_bench, None, _ce_case(dt, 128256)))
        for kind in ("index", "probs", "topk"):
            out.append((f"ce {dn} {kind} all options", False, None, _ce_case(dt, 128256, kind, full=True)))
        out.append((f"linear {dn}", dn == "bfloat16", None, _linear_case(dt)))
    bf = torch.bfloat16
    out += [
        ("ce bfloat16 loss only", False, None, _ce_case(bf, 128256, grad=False)),
        ("ce bfloat16 C=50257 (not a multiple of 16)", False, None, _ce_case(bf, 50257)),
        ("ce bfloat16 dim=1 with a trailing dim", False, None, _ce_case(bf, 32000, kdim=True)),
        ("ce bfloat16 probs dim=1 with a trailing dim", False, None, _ce_case(bf, 32000, "probs", kdim=True)),
        ("ce bfloat16 top-k all options, C=16", False, None, _ce_case(bf, 16, "topk", full=True)),
        ("linear bfloat16 all options", False, first(bf), _linear_case(bf, full=True)),
        ("linear bfloat16 probs all options", False, first(bf), _linear_case(bf, full=True, kind="probs")),
        ("linear bfloat16 top-k all options", False, first(bf), _linear_case(bf, full=True, kind="topk")),
        ("linear bfloat16 input gradient only, H=40, V=500 (not multiples of 16)", False, first(bf),
         _linear_case(bf, grads=(True, False), H=40, V=500)),
        ("linear bfloat16 weight gradient only, H=32", False, first(bf), _linear_case(bf, grads=(False, True), H=32)),
        ("linear bfloat16 reduction='none'", False, first(bf), _linear_case(bf, none=True)),
        ("linear float32 all options", False, first(torch.float32), _linear_case(torch.float32, full=True)),
        ("linear float16 all options", False, first(torch.float16), _linear_case(torch.float16, full=True)),
    ]
    return out


def capture(cap: int = 90) -> List[Spec]:
    """Run every case under a compile-only driver for ``sm_<cap>``; the specialisations launched."""
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, os.path.join(ROOT, "src"))
    import triton
    from triton import knobs
    from triton.runtime import driver

    import crossent.impl.registry as registry
    from crossent.config import CONFIG

    from crossent.impl.triton.kernels import ce_fwd_kernel

    if not isinstance(ce_fwd_kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError("the kernels were defined under TRITON_INTERPRET=1: run this in a fresh process")
    lin = sys.modules["crossent.impl.triton.linear"] if "crossent.impl.triton.linear" in sys.modules else None
    if lin is None:
        import crossent.impl.triton.linear  # noqa: F401  (the package re-exports shadow the module name)
        lin = sys.modules["crossent.impl.triton.linear"]

    specs: Dict[str, Spec] = {}
    current = {}

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002
        jit = fn.jit_function
        s = Spec(kernel=f"{jit.fn.__module__}:{jit.fn.__name__}", signature=dict(compile["signature"]),
                 constants=dict(compile["constants"]), attrs=dict(compile["configs"][0]),
                 num_warps=compile["num_warps"], num_stages=compile["num_stages"])
        s = specs.setdefault(s.ident(), s)
        if current["name"] not in s.cases:
            s.cases.append(current["name"])
        s.bench |= current["bench"]
        return True  # do not compile here, do not launch

    def timer(call, quantiles=None, **_):
        call()
        return [1.0, 1.0, 1.0]

    old_driver, old_hook, old_interp = driver._active, knobs.runtime.jit_cache_hook, registry.triton_interpreted
    old_kernels = lin._kernels
    driver.set_active(_driver(cap))
    knobs.runtime.jit_cache_hook = hook
    registry.triton_interpreted = lambda: True  # the registry lets impl="triton" run on CPU tensors
    try:
        for name, bench, cfgs, call in cases():
            built = {}

            def fresh(dtype=None, cfgs=cfgs, built=built):
                """Fresh autotuners over the dtype's lists (or the case's): every config is tried."""
                fwd_c, bwd_c = cfgs or lin.config_lists(dtype)
                if (fwd_c, bwd_c) not in built:
                    built[fwd_c, bwd_c] = lin.build_kernels(True, do_bench=timer, fwd_configs=fwd_c,
                                                            bwd_configs=bwd_c)
                return built[fwd_c, bwd_c]
            lin._kernels = fresh
            current.update(name=name, bench=bench)
            call()
    finally:
        driver._active = old_driver  # (None: the default driver, created when first asked for)
        knobs.runtime.jit_cache_hook = old_hook
        registry.triton_interpreted = old_interp
        lin._kernels = old_kernels
    return list(specs.values())


# --------------------------------------------------------------------------- compiling

_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def cache_dir() -> str:
    return os.environ.get("CROSSENT_AOT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "crossent", "aot")


SEED = os.path.join(ROOT, "benchmarks", "results", "aot_cache.json")
_SEED: Dict[str, dict] = {}


def _seed() -> Dict[str, dict]:
    """The results recorded by the last table run (``SEED``, in the repository), by triton compile key:
    a clean clone starts warm. A key covers the kernel's source, everything it calls, the options,
    the target and triton itself, so a changed kernel or another triton misses and compiles."""
    if not _SEED:
        try:
            with open(SEED) as f:
                _SEED.update(json.load(f))
        except (OSError, ValueError):
            _SEED["\0"] = {}  # nothing recorded: do not look again
    return _SEED


def _kernel(spec: Spec):
    import importlib

    mod, name = spec.kernel.split(":")
    return getattr(importlib.import_module(mod), name)


def _source(spec: Spec, cap: int):
    """``(ASTSource, target, options dict, triton's compile key)``."""
    import triton  # noqa: F401
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import get_cache_key

    src = ASTSource(_kernel(spec), spec.signature, spec.constants, spec.attrs)
    target = GPUTarget("cuda", cap, 32)
    opts = dict(num_warps=spec.num_warps, num_stages=spec.num_stages)
    backend = make_backend(target)
    options = backend.parse_options(dict(opts, **src.parse_options()))
    key = get_cache_key(src, backend, options, env_vars=get_cache_invalidating_env_vars())
    return src, target, opts, hashlib.sha256(key.encode()).hexdigest()


def compile_one(spec: Spec, cap: int, use_cache: bool = True) -> dict:
    """Compile ``spec`` for ``sm_<cap>``: ``{regs, spill_stores, spill_loads, stack, shared, ptx_mma,
    seconds, cached, error}`` (``error`` None when it compiled)."""
    import triton
    from triton import knobs

    t0 = time.time()
    try:
        src, target, opts, key = _source(spec, cap)
    except Exception as e:  # noqa: BLE001  a source that does not even parse
        return dict(error=f"{type(e).__name__}: {e}"[:4000], seconds=time.time() - t0, cached=False)
    path = os.path.join(cache_dir(), f"{key}.json")
    if use_cache and os.path.exists(path):
        try:
            with open(path) as f:
                return dict(json.load(f), cached=True, seconds=time.time() - t0, key=key)
        except (OSError, ValueError):
            pass
    if use_cache and key in _seed():
        return dict(_seed()[key], cached=True, seconds=time.time() - t0, key=key)
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report is printed: registers, stack, spills
    knobs.compilation.always_compile = True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=target, options=opts)
    except Exception as e:  # noqa: BLE001  every compile error is a result
        return dict(error=f"{type(e).__name__}: {e}"[:4000], seconds=time.time() - t0, cached=False)
    text = log.getvalue()
    m, r = _PTXAS.search(text), _REGS.search(text)
    if m is None or r is None:
        return dict(error=f"no ptxas report in the compile log: {text[-2000:]}", seconds=time.time() - t0,
                    cached=False)
    ptx = k.asm.get("ptx", "")
    res = dict(regs=int(r.group(1)), stack=int(m.group(1)), spill_stores=int(m.group(2)),
               spill_loads=int(m.group(3)), shared=int(k.metadata.shared), threads=32 * spec.num_warps,
               mma="wgmma" if "wgmma" in ptx else ("tcgen05" if "tcgen05" in ptx else ("mma" if "mma.sync" in ptx
                                                                                      else "")),
               error=None)
    if use_cache:
        try:
            os.makedirs(cache_dir(), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(res, f)
            os.replace(tmp, path)
        except OSError:  # a cache that cannot be written costs time, not results
            pass
    return dict(res, seconds=time.time() - t0, cached=False, key=key)


def _work(args):
    i, spec, cap, use_cache = args
    return i, cap, compile_one(spec, cap, use_cache)


def compile_all(specs: List[Spec], caps=TARGETS, jobs: Optional[int] = None, use_cache: bool = True,
                progress: bool = False) -> Dict[Tuple[int, int], dict]:
    """Compile every spec for every target: ``{(spec index, cap): result}``. Compiles run in
    ``jobs`` processes (default: the CPUs this process may use); cached results are read here."""
    tmp = tempfile.mkdtemp(prefix="crossent-aot-")
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = tmp  # triton's own cache: thrown away, the results are kept
    todo, out = [], {}
    try:
        for i, s in enumerate(specs):
            for cap in caps:
                todo.append((i, s, cap, use_cache))
        jobs = jobs or len(os.sched_getaffinity(0))
        if jobs > 1 and len(todo) > 1:
            # heavy kernels first, so that the pool ends together
            todo.sort(key=lambda a: (a[1].name == "ce_fwd_kernel", -a[1].num_warps))
            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                for n, (i, cap, r) in enumerate(pool.imap_unordered(_work, todo)):
                    out[(i, cap)] = r
                    if progress and not r["cached"]:
                        s = specs[i]
                        what = r["error"].splitlines()[0][:200] if r.get("error") else \
                            f"{r['regs']} regs, spills {r['spill_stores']}/{r['spill_loads']} B, smem {r['shared']}"
                        print(f"  [{n + 1}/{len(todo)}] sm_{cap} {s.name} {s.dtype} {s.config} {s.flags}: {what} "
                              f"({r['seconds']:.1f}s)", file=sys.stderr)
        else:
            for a in todo:
                i, cap, r = _work(a)
                out[(i, cap)] = r
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old
    return out


def supported_targets() -> Tuple[int, ...]:
    """The targets of ``TARGETS`` this triton can compile for (its NVIDIA backend's ptxas knows them)."""
    from triton.backends import backends

    if "nvidia" not in backends:
        return ()
    from triton.backends.nvidia.compiler import get_ptxas

    out = []
    for cap in TARGETS:
        try:
            if get_ptxas(cap).path:
                out.append(cap)
        except Exception:  # noqa: BLE001
            pass
    return tuple(out)


# --------------------------------------------------------------------------- floors

HBM = 4.8e12  # H200, bytes/s
PEAK_BF16 = 989e12  # dense bf16 tensor-core flop/s, on paper
REACHED_BF16 = 790e12  # what a large dense bf16 GEMM reaches in practice
SFU = 132 * 16 * 1.98e9  # exp2 per second: 132 SMs x 16 MUFU ops per clock x 1.98 GHz (an assumption)
L2 = 60e6  # bytes of L2 on an H200 (as PyTorch reports it)
SMS = 132

CE_SHAPES = [(8192, 128256), (32768, 32000)]
LINEAR_SHAPES = [(8192, 4096, 128256), (8192, 2304, 256000)]


def _ce_programs_in_flight(C: int) -> int:
    """Rows in flight at once: programs per SM (registers and warps of the benchmark tile) x SMs."""
    from crossent.impl.triton.cross_entropy import class_block

    warps = 8 if class_block(C) >= 2048 else 4
    regs = 64  # what ptxas gives the benchmark specialisation on sm_90 (table above)
    return SMS * min(64 // warps, 65536 // (regs * 32 * warps))


def floors() -> List[dict]:
    """Bytes, flops and the H200 time floor of one call of each kernel, for the benchmark shapes.
    ``need``: the bytes that must cross HBM; ``issued``: what the kernels load and store as
    launched (from L2 where they hit); ``floor``: the larger of need / HBM, tensor flops / 790 T
    and exps / MUFU rate."""
    import triton

    from crossent.config import CONFIG

    rows = []
    for N, C in CE_SHAPES:
        for dt, e in (("bfloat16", 2), ("float32", 4)):
            row_bytes = 24  # per row: label (8), mass (4), validity (4), loss and lse out (4 + 4)
            fly = _ce_programs_in_flight(C) * C * e
            need = 2 * N * C * e + row_bytes * N  # read the logits once, write the gradient
            issued = 3 * N * C * e + row_bytes * N  # pass 2 re-reads each row
            exps = 2 * N * C
            likely = issued if fly > L2 else need
            rows.append(dict(kernel="ce_fwd_kernel, loss + gradient", shape=f"[{N}, {C}] {dt}", need=need,
                             issued=issued, tflops=0, exps=exps, floor=max(need / HBM, exps / SFU),
                             note=f"HBM-bound; rows in flight {fly / 1e6:.0f} MB vs 60 MB L2: pass 2's re-read "
                                  + ("misses L2" if fly > L2 else "can hit L2")
                                  + f", expect {likely / HBM * 1e3:.2f} ms as designed"))
            need1 = N * C * e + row_bytes * N
            rows.append(dict(kernel="ce_fwd_kernel, loss only", shape=f"[{N}, {C}] {dt}", need=need1,
                             issued=need1, tflops=0, exps=N * C, floor=max(need1 / HBM, N * C / SFU),
                             note="HBM-bound"))
    e = 2
    for N, H, V in LINEAR_SHAPES:
        shape = f"N={N} H={H} V={V} bf16"
        fwd_cfg, bwd_cfg = CONFIG.triton_fwd_configs, CONFIG.triton_bwd_configs
        fl = 2 * N * H * V
        need = (N * H + V * H) * e
        iss = [N * V * H * e * (1 / bv + 1 / bm) for bm, bv, _, _, _ in fwd_cfg]
        rows.append(dict(kernel="lce_fwd_kernel", shape=shape, need=need, issued=(min(iss), max(iss)),
                         tflops=fl, exps=N * V, floor=max(need / HBM, fl / REACHED_BF16),
                         note="tensor-core-bound (a GEMM with the same tiles issues the same loads)"))
        S = max(1, min(triton.cdiv(2 * SMS, triton.cdiv(N, 128)), V // 1024))
        S = triton.cdiv(V, triton.cdiv(triton.cdiv(V, S), CONFIG.triton_split_grain) * CONFIG.triton_split_grain)
        fin = 2 * S * N * 4 + 2 * N * H * e + 16 * N + 16 * N
        rows.append(dict(kernel="lce_fin_kernel", shape=shape, need=fin, issued=fin, tflops=0, exps=S * N,
                         floor=fin / HBM, note=f"HBM-bound; {S} vocabulary splits; the target logits are a "
                                               "row of X and of W per position"))
        flb = 6 * N * H * V
        needb = (N * H + V * H) * e + (N * H + V * H) * 4 * 2  # read X, W; float32 dX, dW read-modify-written
        issb = [N * V * H * 2 * e * (1 / bv + 1 / bm) for bm, bv, _, _, _ in bwd_cfg]
        atom = [N * V * H * 4 * (1 / bv + 1 / bm) for bm, bv, _, _, _ in bwd_cfg]
        rows.append(dict(kernel="lce_bwd_kernel", shape=shape, need=needb, issued=(min(issb), max(issb)),
                         atomics=(min(atom), max(atom)), tflops=flb, exps=N * V,
                         floor=max(needb / HBM, flb / REACHED_BF16),
                         note=f"tensor-core floor; float32 atomics {min(atom) / 1e9:.0f}-{max(atom) / 1e9:.0f} GB "
                              "(reduced in L2) may bound it instead"))
        tot = 8 * N * H * V
        rows.append(dict(kernel="the three, loss + gradients", shape=shape, need=need + fin + needb, issued=None,
                         tflops=tot, exps=2 * N * V, floor=max((need + fin + needb) / HBM, tot / REACHED_BF16),
                         note=f"8 N H V flops (the backward recomputes the logits); at 6 N H V: "
                              f"{6 * N * H * V / REACHED_BF16 * 1e3:.1f} ms, and 65% of the paper peak is "
                              f"{6 * N * H * V / (0.65 * PEAK_BF16) * 1e3:.1f} ms"))
    return rows


# --------------------------------------------------------------------------- report

def _kb(n: int) -> str:
    return f"{n / 1024:.0f} KB" if n >= 1024 else f"{n} B"


def table(specs: List[Spec], results, caps) -> List[str]:
    """Markdown rows: one per (kernel, dtype, config, flags), a column group per target."""
    head = "| kernel | dtype | config | specialisation | " + " | ".join(
        f"sm_{c} regs | sm_{c} spills | sm_{c} smem" for c in caps) + " |"
    lines = [head, "|" + "---|" * (4 + 3 * len(caps))]
    order = {"ce_fwd_kernel": 0, "lce_fwd_kernel": 1, "lce_fin_kernel": 2, "lce_bwd_kernel": 3}

    def key(i):
        s = specs[i]
        blocks = tuple(s.const(k) or 0 for k in ("BLOCK", "BM", "BV", "BK", "KP"))
        return (order.get(s.name, 9), not s.bench, s.dtype, len(s.flags), blocks, s.num_warps, s.num_stages, s.flags)

    for i in sorted(range(len(specs)), key=key):
        s = specs[i]
        cells = []
        for c in caps:
            r = results[(i, c)]
            if r.get("error"):
                cells += ["**error**", "", ""]
                continue
            sp = r["spill_stores"] + r["spill_loads"]
            over = " **over limit**" if r["shared"] > SMEM_LIMIT[c] else ""
            cells += [str(r["regs"]), f"**{r['spill_stores']}/{r['spill_loads']} B**" if sp else "0",
                      _kb(r["shared"]) + over]
        flags = s.flags + (" (benchmark)" if s.bench else "")
        lines.append(f"| {s.name} | {s.dtype} | {s.config} | {flags} | " + " | ".join(cells) + " |")
    return lines


def _fmt_count(n) -> str:
    return f"{n / 1e9:.3g} G" if n >= 1e8 else f"{n / 1e6:.3g} M"


def _fmt_bytes(b) -> str:
    if b is None:
        return "-"
    if isinstance(b, tuple):
        return f"{b[0] / 1e9:.1f}-{b[1] / 1e9:.1f} GB"
    return f"{b / 1e9:.3g} GB" if b >= 1e8 else f"{b / 1e6:.3g} MB"


def write_markdown(path: str, specs, results, caps, seconds: float) -> None:
    import torch
    import triton

    from crossent.config import CONFIG

    errors = [(specs[i], c, r) for (i, c), r in results.items() if r.get("error")]
    spills = [(specs[i], c, r) for (i, c), r in results.items() if not r.get("error")
              and (r["spill_stores"] or r["spill_loads"])]
    bench_spills = [x for x in spills if x[0].bench]
    regs = max((r["regs"] for r in results.values() if not r.get("error")), default=0)
    L = [
        "# Kernel resources and time floors",
        "",
        "Written by `python benchmarks/kernel_resources.py` "
        f"({datetime.date.today().isoformat()}, triton {triton.__version__}, torch {torch.__version__}); "
        "do not edit by hand. Every triton kernel of crossent is compiled, on a machine without a GPU, in "
        "every specialisation its launchers produce for the calls listed in the script (`cases`), for "
        + ", ".join(f"sm_{c}" for c in caps) + ". Registers per thread and spills (bytes stored / loaded) "
        "are ptxas's report; shared memory is what the kernel asks for at launch (limits: "
        + ", ".join(f"sm_{c} {SMEM_LIMIT[c] // 1024} KB" for c in caps) + "). "
        "`tests/test_aot_kernels.py` compiles the same set in the test suite. Another triton version "
        "generates other code: on a GPU machine with another triton, rerun the script there (it needs no "
        "GPU) before reading its registers off this table.",
        "",
        f"{len(specs)} specialisations x {len(caps)} targets = {len(results)} compiles, "
        f"{len(errors)} errors, the most registers {regs}, "
        f"{len(spills)} with spills ({len(bench_spills)} in the benchmark specialisations).",
        "",
        "Autotune lists (`crossent.config.CONFIG`, `(BM, BV, BK, num_warps, num_stages)`): forward "
        f"`{list(CONFIG.triton_fwd_configs)}`, backward `{list(CONFIG.triton_bwd_configs)}` (16-bit "
        f"inputs); float32 forward `{list(CONFIG.triton_fwd_configs_fp32)}`, backward "
        f"`{list(CONFIG.triton_bwd_configs_fp32)}`. The "
        "cross-entropy kernel's tile is `class_block(C)` (the next power of two of C, at most "
        f"`triton_max_block` = {CONFIG.triton_max_block}), with 8 warps from 2048 up, else 4; the benchmark "
        "shapes (C = 128256 and 32000) take the widest tile. The merging kernel (`lce_fin_kernel`) has "
        "fixed blocks.",
        "",
        "Specialisation: the target kind, then the flags that are on (`W` class weights, `RV` row "
        "validity, `LS` label smoothing, `CAP` softcap, `Z` z-loss, `PRED` argmax, `GRAD` gradient, "
        "`RID` shifted rows, `B` bias, `CW` class weights, `RS` per-row scale, `DX`/`DW`/`DB` gradients, "
        "`FILTER`); `(benchmark)` marks those the benchmarks run.",
        "",
    ]
    if spills or any(r["shared"] > SMEM_LIMIT[c] for (i, c), r in results.items() if not r.get("error")):
        L += ["Outside the benchmark specialisations (grouped by kernel, dtype and specialisation; configs "
              "x targets that spill, of those compiled, and the most bytes stored):", ""]
        groups: Dict[tuple, list] = {}
        for s, c, r in spills:
            groups.setdefault((s.name, s.dtype, s.flags), []).append((r["spill_stores"], c, s.config))
        total = {}
        for (i, c), r in results.items():
            total[(specs[i].name, specs[i].dtype, specs[i].flags)] = total.get(
                (specs[i].name, specs[i].dtype, specs[i].flags), 0) + 1
        for k, v in sorted(groups.items()):
            worst = max(v)
            L.append(f"- {k[0]} {k[1]} {k[2]}: {len(v)} of {total[k]}, up to {worst[0]} B "
                     f"({worst[2]} on sm_{worst[1]})")
        over = [(specs[i], c, r) for (i, c), r in results.items() if not r.get("error")
                and r["shared"] > SMEM_LIMIT[c]]
        for s, c, r in over:
            L.append(f"- shared memory over the limit: {s.name} {s.dtype} {s.config} {s.flags} on sm_{c} "
                     f"({_kb(r['shared'])}): cannot launch there; the autotuner skips it")
        L.append("")
    L += table(specs, results, caps)
    if errors:
        L += ["", "## Compile errors", ""]
        for s, c, r in errors:
            L.append(f"- sm_{c} {s.name} {s.dtype} {s.config} {s.flags}: `{r['error'].splitlines()[0][:300]}`")
    L += [
        "",
        "## Time floors on an H200",
        "",
        f"H200: {HBM / 1e12:.1f} TB/s HBM, 60 MB L2, 132 SMs; dense bf16 tensor cores {PEAK_BF16 / 1e12:.0f} "
        f"TFLOP/s on paper, about {REACHED_BF16 / 1e12:.0f} reached by large GEMMs; exp: {SFU / 1e12:.1f} T/s "
        "(132 SMs x 16 MUFU ex2 per clock x 1.98 GHz, an assumption). A kernel's floor is the largest of "
        "the bytes that must cross HBM over 4.8 TB/s, its tensor-core flops over 790 TFLOP/s and its exps "
        "over the MUFU rate: a GPU run of the kernel is held against it. Computed by the same script, "
        "from the launch parameters (N rows, C or V classes, H hidden, e bytes per element; the configs "
        "are the autotune lists above):",
        "",
        "- `ce_fwd_kernel`, one program per row, tile `class_block(C)`: must move 2 N C e (read the "
        "logits, write the gradient) + 24 N (label, mass, validity, loss, lse); as launched, pass 2 "
        "re-reads the row: 3 N C e issued, from L2 only while the rows in flight (programs per SM x 132 "
        "x C e) fit in it; 2 N C exps. Loss only: N C e, N C exps.",
        "- `lce_fwd_kernel`: 2 N H V tensor-core flops (the logits, tile by tile); must read X and W "
        "once, (N H + V H) e; issued loads N V H e (1/BV + 1/BM) (range over the configs).",
        "- `lce_fin_kernel`: merges S vocabulary splits (S = min(ceil(264 / ceil(N / 128)), V / 1024), "
        "rounded to the split grain): 2 S N float32 partials, a row of X and of W per position (the "
        "target logit: 2 N H e, 2 N H flops), O(N) labels and outputs.",
        "- `lce_bwd_kernel`: recomputes the logits (2 N H V), then dX += dl W and dW += dl^T X (4 N H V): "
        "6 N H V tensor-core flops; must read X and W and read-modify-write float32 dX and dW: "
        "(N H + V H)(e + 8); issued loads 2 N V H e (1/BV + 1/BM); float32 atomic adds 4 N V H "
        "(1/BV + 1/BM) bytes (each program adds a [BM, H] block of dX and a [BV, H] block of dW).",
        "- One linear CE step runs the three: 8 N H V flops, since the backward recomputes the "
        "logits; the usual count is 6 N H V.",
        "",
        "| kernel | shape | must move | issued | tensor flops | exps | floor | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in floors():
        L.append(f"| {r['kernel']} | {r['shape']} | {_fmt_bytes(r['need'])} | {_fmt_bytes(r['issued'])} | "
                 f"{r['tflops'] / 1e12:.3g} T | {_fmt_count(r['exps'])} | **{r['floor'] * 1e3:.3g} ms** | "
                 f"{r['note']} |")
    L += ["", "float32 linear kernels run their dots in IEEE float32 (`input_precision=\"ieee\"`, as torch's "
          "float32 matmul): CUDA cores, not tensor cores, about 67 TFLOP/s on an H200, so 12x the bf16 floors "
          "above; they are not a benchmark shape.", ""]
    with open(path, "w") as f:
        f.write("\n".join(L))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compile and report failures only (no docs)")
    ap.add_argument("--json", help="write every result here as JSON")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "kernels.md"))
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--targets", default=None, help="comma-separated capabilities (default: 80,90,100)")
    args = ap.parse_args(argv)
    caps = supported_targets()
    if not caps:
        print("this triton has no NVIDIA backend: nothing to compile", file=sys.stderr)
        return 2
    if args.targets:
        caps = tuple(int(c) for c in args.targets.split(",") if int(c) in caps)
    t0 = time.time()
    specs = capture()
    t1 = time.time()
    results = compile_all(specs, caps, jobs=args.jobs, use_cache=not args.no_cache, progress=True)
    t2 = time.time()
    fresh = sum(not r["cached"] for r in results.values())
    print(f"{len(specs)} specialisations captured in {t1 - t0:.1f}s; {len(results)} compiles "
          f"({fresh} fresh) in {t2 - t1:.1f}s", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(kernel=specs[i].name, dtype=specs[i].dtype, config=specs[i].config,
                            flags=specs[i].flags, bench=specs[i].bench, cases=specs[i].cases, cap=c,
                            num_warps=specs[i].num_warps, num_stages=specs[i].num_stages,
                            constants=specs[i].named_constants(), **r)
                       for (i, c), r in sorted(results.items())], f, indent=1)
    bad = [(specs[i], c, r) for (i, c), r in results.items() if r.get("error")]
    for s, c, r in bad:
        print(f"FAILED sm_{c} {s.name} {s.dtype} {s.config} {s.flags} ({'; '.join(s.cases)}):\n"
              f"{r['error'][:1500]}", file=sys.stderr)
    if not args.check:
        write_markdown(args.out, specs, results, caps, t2 - t0)
        print(f"wrote {args.out}", file=sys.stderr)
        keep = ("regs", "stack", "spill_stores", "spill_loads", "shared", "threads", "mma", "error")
        with open(SEED, "w") as f:  # the next clean clone starts warm (errors are never recorded)
            json.dump({r["key"]: {k: r[k] for k in keep} for r in sorted(results.values(), key=lambda r: r["key"])
                       if not r.get("error") and "key" in r}, f, indent=0, sort_keys=True)
        print(f"wrote {SEED}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

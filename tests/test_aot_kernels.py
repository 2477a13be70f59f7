"""Every triton kernel of crossent compiles for real GPUs (sm_80, sm_90, sm_100), with no GPU here.

``benchmarks/kernel_resources.py`` records the specialisations the launchers produce (every
autotune config and class tile, every dtype, the flag combinations argued in its docstring) and
compiles each with triton's NVIDIA backend (ptxas included in the wheel). It runs in a subprocess:
the test suite runs under ``TRITON_INTERPRET=1``, where triton hands out interpreter functions
instead of compilable kernels. Results are cached per triton compile key (see the script), and the
last table run's results are in the repository (``benchmarks/results/aot_cache.json``): a clean
clone with the same triton starts warm (about 10 s) and compiles only kernels whose source,
options or toolchain changed (cold, everything: about 4 minutes on 2 cores). The deliberately
broken kernels below always compile fresh.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "kernel_resources.py")


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


needs_nvidia = pytest.mark.skipif(not _nvidia_backend(),
                                  reason="this triton wheel has no NVIDIA backend (no ptxas): nothing to compile with")


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compilable kernels, not interpreter functions
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "src"), os.path.join(ROOT, "benchmarks"),
                                         env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every specialisation x target, compiled (``--check``): ``(exit status, stderr, results)``."""
    out = tmp_path_factory.mktemp("aot") / "results.json"
    p = subprocess.run([sys.executable, SCRIPT, "--check", "--json", str(out)], env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=3600)
    results = json.loads(out.read_text()) if out.exists() else []
    return p.returncode, p.stderr, results


@needs_nvidia
def test_every_kernel_compiles_for_every_target(compiled):
    rc, err, results = compiled
    failed = [r for r in results if r["error"]]
    assert not failed, "\n\n".join(f"sm_{r['cap']} {r['kernel']} {r['dtype']} {r['config']} {r['flags']} "
                                   f"({'; '.join(r['cases'])}):\n{r['error'][:3000]}" for r in failed)
    assert rc == 0 and results, err[-5000:]
    assert {80, 90} <= {r["cap"] for r in results}  # and sm_100 where this triton's ptxas has it


@needs_nvidia
def test_every_config_target_and_dtype_is_covered(compiled):
    """Each autotune config, each class tile and the merging kernel, in every dtype, for every
    target: compiled at least once (in the benchmark's specialisation)."""
    _, _, results = compiled
    import torch

    from crossent.impl.triton.cross_entropy import class_block
    from crossent.impl.triton.linear import config_lists

    seen = set()
    for r in results:
        if r["error"]:
            continue
        c = r["constants"]
        if r["kernel"] == "ce_fwd_kernel":
            seen.add((r["kernel"], r["dtype"], r["cap"], c["BLOCK"]))
        elif r["kernel"] in ("lce_fwd_kernel", "lce_bwd_kernel"):
            seen.add((r["kernel"], r["dtype"], r["cap"], (c["BM"], c["BV"], c["BK"], r["num_warps"], r["num_stages"])))
        else:
            seen.add((r["kernel"], r["dtype"], r["cap"]))
    want = []
    for cap in sorted({r["cap"] for r in results}):
        for dt in ("fp32", "bf16", "fp16"):
            want += [("ce_fwd_kernel", dt, cap, blk) for blk in sorted({class_block(2 ** k) for k in range(20)})]
            fwd, bwd = config_lists({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dt])
            want += [(kernel, dt, cap, tuple(cfg)) for kernel, cfgs in (("lce_fwd_kernel", fwd), ("lce_bwd_kernel", bwd))
                     for cfg in cfgs]
            want.append(("lce_fin_kernel", dt, cap))
    missing = [w for w in want if w not in seen]
    assert not missing, missing


@needs_nvidia
def test_benchmark_specialisations_neither_spill_nor_overflow_shared_memory(compiled):
    """What the benchmarks run (every autotune candidate, since any can win, on every target): no
    register spills, and shared memory within what one program may have.
    Elsewhere, a kernel with fixed blocks must fit in shared memory in every specialisation, and an
    autotuned one must have a candidate that fits (the autotuner skips those that cannot launch)."""
    _, _, results = compiled
    limits = {80: 166912, 90: 232448, 100: 232448}
    ok = [r for r in results if not r["error"]]
    assert all(0 < r["regs"] <= 255 and r["regs"] * r["threads"] <= 65536 for r in ok)
    bench = [r for r in ok if r["bench"]]
    assert {r["kernel"] for r in bench} == {"ce_fwd_kernel", "lce_fwd_kernel", "lce_fin_kernel", "lce_bwd_kernel"}
    spills = [r for r in bench if r["spill_stores"] or r["spill_loads"]]
    assert not spills, [(r["cap"], r["kernel"], r["dtype"], r["config"], r["spill_stores"]) for r in spills]
    fits = {}
    for r in ok:
        fits.setdefault((r["cap"], r["kernel"], r["dtype"], r["flags"], r["kernel"] in ("lce_fwd_kernel",
                                                                                        "lce_bwd_kernel")), []) \
            .append((r["shared"] <= limits[r["cap"]], r["config"], r["shared"]))
    bad = [(k, v) for k, v in fits.items() if not (any(f for f, _, _ in v) if k[4] else all(f for f, _, _ in v))]
    bad += [((r["cap"], r["kernel"], r["config"]), r["shared"]) for r in bench if r["shared"] > limits[r["cap"]]]
    assert not bad, bad


BROKEN = '''
import triton
import triton.language as tl


@triton.jit
def good_kernel(X, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N)
    tl.store(X + offs, x * 2.0, mask=offs < N)


@triton.jit
def type_error_kernel(X, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N)
    tl.store(X + offs, tl.dot(x, x), mask=offs < N)  # a dot of two vectors: refused by triton


@triton.jit
def ptxas_error_kernel(X, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N)
    y = tl.inline_asm_elementwise("no.such.instruction.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                  is_pure=True, pack=1)  # passes triton and LLVM, refused by ptxas
    tl.store(X + offs, y, mask=offs < N)
'''


@needs_nvidia
def test_a_kernel_that_does_not_compile_fails_the_check(tmp_path):
    """The check above is real: the same machinery, given kernels that fail in triton's front end
    and in ptxas, reports both and exits 1; their correct twin compiles."""
    (tmp_path / "broken_kernels.py").write_text(BROKEN)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import kernel_resources as kr

        def spec(name):
            return kr.Spec(kernel="broken_kernels:" + name, signature={{"X": "*fp32", "N": "i32", "BLOCK": "constexpr"}},
                           constants={{(2,): 128}}, attrs={{}}, num_warps=4, num_stages=1, cases=[name])

        kr.capture = lambda: [spec("good_kernel"), spec("type_error_kernel"), spec("ptxas_error_kernel")]
        sys.exit(kr.main(["--check", "--no-cache", "--targets", "90", "--jobs", "1", "--json", {str(tmp_path / "r.json")!r}]))
    """)
    p = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]
    res = {r["kernel"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert res["good_kernel"]["error"] is None and res["good_kernel"]["regs"] > 0
    assert "dot" in res["type_error_kernel"]["error"].lower() or "shape" in res["type_error_kernel"]["error"].lower()
    assert "ptxas" in res["ptxas_error_kernel"]["error"].lower(), res["ptxas_error_kernel"]["error"][:2000]
    assert "FAILED sm_90 type_error_kernel" in p.stderr and "FAILED sm_90 ptxas_error_kernel" in p.stderr


def test_gpu_check_script_parses_and_uses_existing_bench_options():
    """``benchmarks/gpu_check.sh`` cannot run here (no GPU): it parses, and every option it gives
    ``python -m crossent.tools.bench`` exists."""
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    p = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    text = open(script).read().replace("\\\n", " ")
    used = set()
    for line in text.splitlines():
        if "crossent.tools.bench" in line or line.lstrip().startswith("bench "):
            used |= set(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", line))
    assert {"--kinds", "--dtype", "--N", "--V", "--impls", "--csv"} <= used, used
    h = subprocess.run([sys.executable, "-m", "crossent.tools.bench", "--help"], env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert h.returncode == 0, h.stderr[-2000:]
    missing = [o for o in sorted(used) if not re.search(rf"(?<![\w-]){re.escape(o)}\b", h.stdout)]
    assert not missing, f"gpu_check.sh gives crossent.tools.bench options it does not have: {missing}"

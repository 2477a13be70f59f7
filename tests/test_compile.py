"""torch.compile with default settings (value checks on): fullgraph, no graph break, at most two
compiles across varying sizes (one with dynamic=True), the float64 oracle's results, NaN at a bad
value's position, and opcheck on every registered op.

Most grids run the ``aot_eager`` backend (AOTAutograd, the fake functions and the registered
autograd of the ops, without inductor's C++ compile); one test per public entry point runs
inductor. The triton impl runs under ``TRITON_INTERPRET=1`` through its opaque op (the
``triton_op``, which inductor sees into, needs a GPU: tests/test_gpu.py).
"""

import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import crossent
from crossent import SparseTarget
from crossent.functional import _Logits
from crossent.ops.custom import OPS, _pack
from crossent.options import make_options
from crossent.reduction import plan_reduction
from crossent.targets import normalize_target
from oracle import assert_close, torch_loss

F = torch.nn.functional
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["chunked"] + (["triton"] if INTERPRETED else [])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    assert crossent.checks_enabled(), "the compile tests run with the default settings: value checks on"
    yield
    torch._dynamo.reset()


def _target(kind, shape, C, dtype=torch.float32, g=None):
    """A target of ``kind`` for positions ``shape`` over ``C`` classes (classes last)."""
    if kind == "index":
        t = torch.randint(0, C, shape, generator=g)
        t.view(-1)[0] = -100
        return t
    if kind == "one_hot":
        return F.one_hot(torch.randint(0, C, shape, generator=g), C)
    if kind == "probs":
        return torch.softmax(torch.randn(*shape, C, generator=g, dtype=dtype), -1)
    idx = torch.randint(0, C, (*shape, 3), generator=g)
    return SparseTarget(idx, torch.rand(*shape, 3, generator=g, dtype=dtype))


def _compiles(cnt: CompileCounterWithBackend) -> int:
    """Graphs compiled (dynamo may also hand the backend an empty graph for a frame with no tensor op)."""
    return sum(1 for gm in cnt.graphs if len(gm.graph.nodes))


def _grads(fn, *inputs):
    """``(out, *grads)`` with an incoming gradient of ones (a fixed non-uniform one for a vector)."""
    ins = [i.detach().clone().requires_grad_(True) for i in inputs]
    out = fn(*ins)
    go = torch.ones_like(out) if out.dim() == 0 else torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
    grads = torch.autograd.grad(out, ins, go.to(out.dtype))
    return (out.detach(), *grads)


OPTION_SETS = [dict(), dict(label_smoothing=0.1, z_loss=1e-3), dict(reduction="none", softcap=3.0),
               dict(reduction="sum", weight=True), dict(num_items=7, return_extras=True)]


def _ce_call(kind, opts, impl, C):
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = torch.linspace(0.5, 2.0, C)
    extras = kw.get("return_extras", False)

    def f(x, t):
        out = crossent.cross_entropy(x, t, dim=-1, impl=impl, **kw)
        return out[0] + 0 * out[1]["lse"].sum() if extras else out

    def oracle(x, t):
        o = {k: v for k, v in kw.items() if k != "return_extras"}
        if "weight" in o:
            o["weight"] = o["weight"].double()
        tt = t.to_dense(C).double() if isinstance(t, SparseTarget) else \
            (t.argmax(-1) if t.dtype == torch.long and t.dim() == x.dim() else t.double() if t.is_floating_point() else t)
        return torch_loss(x.double(), tt, dim=-1, **o)
    return f, oracle


# each target kind with its own option sets (every option appears; the grid stays small: each
# compile costs seconds)
KIND_OPTIONS = {"index": [0, 1], "one_hot": [3], "probs": [2], "sparse": [4]}
CE_CASES = [("chunked", k, d) for k in KIND_OPTIONS for d in (None, True)] + \
    ([("triton", "index", None), ("triton", "probs", True)] if INTERPRETED else [])


@pytest.mark.parametrize("impl,kind,dynamic", CE_CASES)
def test_cross_entropy_fullgraph_varying_sizes(impl, kind, dynamic):
    """Every target kind and option: no graph break with checks on, the float64 oracle's loss and
    gradient at every size, at most two compiles (dynamic=None: static, then dynamic) or one."""
    C = 11
    g = torch.Generator().manual_seed(0)
    for opts in [OPTION_SETS[i] for i in KIND_OPTIONS[kind]]:
        torch._dynamo.reset()
        f, oracle = _ce_call(kind, opts, impl, C)
        cnt = CompileCounterWithBackend("aot_eager")
        cf = torch.compile(f, backend=cnt, fullgraph=True, dynamic=dynamic)
        for T in (5, 6, 9):
            x = torch.randn(2, T, C, generator=g)
            t = _target(kind, (2, T), C, g=g)
            got = _grads(lambda a: cf(a, t), x)
            ref = _grads(lambda a: oracle(a, t), x.double())
            for a, b in zip(got, ref):
                assert_close(a, b, torch.float32, f"{kind} {opts} T={T}")
        assert _compiles(cnt) <= (1 if dynamic else 2), f"{opts}: {_compiles(cnt)} compiles"


LCE_CASES = [("chunked", k, r) for k in ("index", "probs", "sparse") for r in ("mean", "none")] + \
    ([("triton", "index", "mean")] if INTERPRETED else [])


@pytest.mark.parametrize("impl,kind,reduction", LCE_CASES)
def test_linear_cross_entropy_fullgraph_varying_sizes(impl, kind, reduction):
    """shift=True, a bias, z-loss and smoothing; the float64 oracle's loss and input, weight and
    bias gradients; at most two compiles across four sequence lengths."""
    V, H = 13, 8
    g = torch.Generator().manual_seed(1)
    W, b = torch.randn(V, H, generator=g), torch.randn(V, generator=g)

    def f(h, W, b, t):
        return crossent.linear_cross_entropy(h, W, t, b, shift=True, z_loss=1e-3, label_smoothing=0.1,
                                             reduction=reduction, impl=impl)

    def oracle(h, W, b, t):
        logits = (h[:, :-1] @ W.T + b)
        tt = t.to_dense(V).double()[:, 1:] if isinstance(t, SparseTarget) else \
            (t.double()[:, 1:] if t.is_floating_point() else t[:, 1:])
        return torch_loss(logits, tt, dim=-1, z_loss=1e-3, label_smoothing=0.1, reduction=reduction)

    cnt = CompileCounterWithBackend("aot_eager")
    cf = torch.compile(f, backend=cnt, fullgraph=True)
    for T in (4, 5, 7):
        h = torch.randn(2, T, H, generator=g)
        t = _target(kind, (2, T), V, g=g)
        got = _grads(lambda h, W, b: cf(h, W, b, t), h, W, b)
        ref = _grads(lambda h, W, b: oracle(h, W, b, t), h.double(), W.double(), b.double())
        for a, r in zip(got, ref):
            assert_close(a, r, torch.float32, f"{kind} T={T}")
    assert _compiles(cnt) <= 2


def test_inductor_each_public_entry_point():
    """Inductor, fullgraph, checks on: cross_entropy, linear_cross_entropy and both modules in one
    training step whose batch size varies; two compiles at most; the float64 oracle's gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh())
    head = torch.nn.Linear(16, 9, bias=False)
    ce_mod = crossent.CrossEntropyLoss(label_smoothing=0.1)
    lce_mod = crossent.LinearCrossEntropyLoss(z_loss=1e-3)

    def step(x, y, y1h):
        h = model(x)
        return (crossent.cross_entropy(head(h), y) + ce_mod(head(h), y1h)
                + crossent.linear_cross_entropy(h, head.weight, y, label_smoothing=0.2) + lce_mod(h, head.weight, y))

    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=cnt, fullgraph=True)
    params = list(model.parameters()) + list(head.parameters())
    for n in (8, 11, 13):
        x, y = torch.randn(n, 5), torch.randint(0, 9, (n,))
        y[0] = -100
        y1h = F.one_hot(y.clamp(min=0), 9)
        loss = compiled(x, y, y1h)
        got = torch.autograd.grad(loss, params)
        # the oracle: the same model in float64 with torch's own losses
        p64 = [p.detach().double().requires_grad_(True) for p in params]
        h = torch.tanh(x.double() @ p64[0].T + p64[1])
        logits = h @ p64[2].T
        ref = (F.cross_entropy(logits, y) + F.cross_entropy(logits, y.clamp(min=0), label_smoothing=0.1)
               + F.cross_entropy(logits, y, label_smoothing=0.2) + torch_loss(logits, y, z_loss=1e-3))
        ref_g = torch.autograd.grad(ref, p64)
        assert_close(loss.detach(), ref.detach(), torch.float32, f"n={n} loss")
        for a, b in zip(got, ref_g):
            assert_close(a, b, torch.float32, f"n={n} grad")
    assert _compiles(cnt) <= 2


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_values_give_nan_at_their_position_under_compile(impl):
    """Under compile the value checks cannot read the data: a bad value gives NaN at its position
    (never a graph break, never an error, never an assert) and leaves the other positions right.
    The same calls raise in eager, where the checks run."""
    C = 5
    x = torch.randn(6, C)
    cases = {
        "index out of range": torch.tensor([0, 1, 7, 2, 3, 4]),
        "negative index": torch.tensor([0, 1, -3, 2, 3, 4]),
        "multi-hot row": F.one_hot(torch.tensor([0, 1, 2, 2, 3, 4]), C).index_put_((torch.tensor([2]), torch.tensor([0])), torch.tensor(1)),
        "NaN probability": torch.softmax(torch.randn(6, C), -1).index_put_((torch.tensor([2]), torch.tensor([1])), torch.tensor(float("nan"))),
        "top-k index out of range": SparseTarget(torch.tensor([[0, 1]] * 2 + [[9, 1]] + [[2, 3]] * 3), torch.full((6, 2), 0.5)),
    }
    for what, t in cases.items():
        with pytest.raises(ValueError):
            crossent.cross_entropy(x, t, impl=impl)
        torch._dynamo.reset()
        f = torch.compile(lambda a: crossent.cross_entropy(a, t, reduction="none", impl=impl), backend="aot_eager",
                          fullgraph=True)
        per_pos = f(x)
        assert torch.isnan(per_pos[2]), what
        good = [0, 1, 3, 4, 5]
        with crossent.checks(False):
            eager = crossent.cross_entropy(x, t, reduction="none", impl="torch")
        torch.testing.assert_close(per_pos[good], eager[good], msg=what)
        mean = torch.compile(lambda a: crossent.cross_entropy(a, t, impl=impl), backend="aot_eager", fullgraph=True)
        assert torch.isnan(mean(x)), what


def test_inplace_backward_is_ignored_under_compile():
    """Traced, nothing is written in place: the logits keep their values, the gradient is right."""
    x = torch.randn(6, 7)
    t = torch.randint(0, 7, (6,))

    def f(a):
        logits = a * 2
        loss = crossent.cross_entropy(logits, t, inplace_backward=True)
        return loss, logits

    xa = x.clone().requires_grad_(True)
    loss, logits = torch.compile(f, backend="aot_eager", fullgraph=True)(xa)
    loss.backward()
    torch.testing.assert_close(logits.detach(), x * 2)
    xb = x.clone().requires_grad_(True)
    F.cross_entropy(xb * 2, t).backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_extras_under_compile():
    x = torch.randn(3, 4, 6)
    t = torch.randint(0, 6, (3, 4))
    f = torch.compile(lambda a: crossent.cross_entropy(a, t, dim=-1, z_loss=1e-2, return_extras=True),
                      backend="aot_eager", fullgraph=True)
    _, got = f(x)
    _, ref = crossent.cross_entropy(x, t, dim=-1, z_loss=1e-2, return_extras=True)
    for k in ("lse", "z_loss", "predicted"):
        assert got[k].shape == (3, 4)
        torch.testing.assert_close(got[k], ref[k])


# ----------------------------------------------------------------- opcheck on the registered ops

def _ce_op_args(kind, reduction, weight):
    C = 5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, C, 2, generator=g, requires_grad=True)
    t = _target(kind, (3, 2), C, g=g)
    if kind in ("probs", "one_hot"):
        t = t.movedim(-1, 1)
    w = torch.linspace(0.5, 2, C) if weight else None
    opts = make_options(classes=C, device=x.device, weight=w, reduction=reduction, label_smoothing=0.1,
                        z_loss=1e-2, softcap=2.0, return_extras=True)
    tgt = normalize_target(t, x, 1, "auto", -100)
    red = plan_reduction(tgt, opts, torch.float32, x.device, torch.Size([3, 2]), torch.float32)
    return (x,), dict(**_pack(tgt, opts, red), want_grad=True)


def _lce_op_args(kind, reduction, bias):
    V, H = 5, 8
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, H, generator=g, requires_grad=True)
    W = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True) if bias else None
    t = _target(kind, (6,), V, g=g)
    opts = make_options(classes=V, device=x.device, reduction=reduction, label_smoothing=0.1, z_loss=1e-2,
                        softcap=2.0, return_extras=True)
    tgt = normalize_target(t, _Logits((6, V), x.device), 1, "auto", -100)
    red = plan_reduction(tgt, opts, torch.float32, x.device, torch.Size([6]), torch.float32)
    return (x, W, b, None), dict(**_pack(tgt, opts, red), chunk_size=None, filter_eps=None, want_dx=True,
                                 want_dw=True, want_db=bias, row_scale=None)


@pytest.mark.parametrize("suffix", ["chunked"] + (["triton_interpreted"] if INTERPRETED else []))
def test_opcheck(suffix):
    """``torch.library.opcheck``: schema, fake functions, autograd registration and AOT dispatch
    (static and dynamic) of each op, for every target kind and reduction (fewer on the interpreter)."""
    interpreted = suffix == "triton_interpreted"  # slow: fewer cases
    for kind in ("index", "sparse") if interpreted else ("index", "one_hot", "probs", "sparse"):
        for reduction in ("mean", "none") if interpreted else ("mean", "none", "sum"):
            args, kw = _ce_op_args(kind, reduction, weight=reduction == "sum")
            torch.library.opcheck(OPS[f"cross_entropy_{suffix}"], args, kw)
            if kind == "one_hot":
                continue
            args, kw = _lce_op_args(kind, reduction, bias=reduction != "sum")
            torch.library.opcheck(OPS[f"linear_cross_entropy_{suffix}"], args, kw)


@pytest.mark.parametrize("suffix", ["chunked"] + (["triton_interpreted"] if INTERPRETED else []))
def test_opcheck_non_contiguous_inputs(suffix):
    """Logits with classes not innermost (``x.transpose(1, 2)``, channels_last), hidden states and a
    weight stored transposed: the fake functions promise the layout the ops return (inductor asserts
    it; a mismatch was a crash, or with its size asserts off a wrong gradient)."""
    C = 5
    x = torch.randn(2, 3, C).transpose(1, 2).requires_grad_(True)  # [P, C, Q], stride 1 along C
    t = torch.randint(0, C, (2, 3))
    opts = make_options(classes=C, device=x.device, label_smoothing=0.1)
    tgt = normalize_target(t, x, 1, "auto", -100)
    red = plan_reduction(tgt, opts, torch.float32, x.device, torch.Size([2, 3]), torch.float32)
    torch.library.opcheck(OPS[f"cross_entropy_{suffix}"], (x,), dict(**_pack(tgt, opts, red), want_grad=True))
    for reduction in ("mean", "none"):
        h = torch.randn(8, 6).t().requires_grad_(True)  # [6, 8], column-major
        W = torch.randn(8, C).t().requires_grad_(True)  # [C, 8], column-major
        b = torch.randn(2 * C)[::2].requires_grad_(True)  # strided bias
        t = torch.randint(0, C, (6,))
        opts = make_options(classes=C, device=h.device, reduction=reduction)
        tgt = normalize_target(t, _Logits((6, C), h.device), 1, "auto", -100)
        red = plan_reduction(tgt, opts, torch.float32, h.device, torch.Size([6]), torch.float32)
        torch.library.opcheck(OPS[f"linear_cross_entropy_{suffix}"], (h, W, b, None),
                              dict(**_pack(tgt, opts, red), chunk_size=None, filter_eps=None, want_dx=True,
                                   want_dw=True, want_db=True, row_scale=None))


def test_ops_mutate_nothing():
    """The ops are functional: their schemas name no mutated argument (Cut Cross-Entropy's and quack's
    registered ops name what they write; ours write nothing they were given)."""
    for name, op in OPS.items():
        schema = op._opoverload._schema
        assert not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments), name


def test_a_bad_argument_still_names_itself_under_compile():
    """Arguments (not data) are still checked while tracing: the error reaches the user with crossent's
    message (dynamo wraps it under fullgraph; without fullgraph the ValueError itself propagates)."""
    x, t = torch.randn(4, 5), torch.randint(0, 5, (4,))
    with pytest.raises(Exception, match=r"label_smoothing=2\.0 must be a number in \[0, 1\]"):
        torch.compile(lambda a: crossent.cross_entropy(a, t, label_smoothing=2.0), backend="aot_eager",
                      fullgraph=True)(x)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=r"label_smoothing=2\.0 must be a number in \[0, 1\]"):
        torch.compile(lambda a: crossent.cross_entropy(a, t, label_smoothing=2.0), backend="aot_eager")(x)


_TRACE_TRITON_OP = r'''
import torch, crossent
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounterWithBackend
from crossent.functional import _Logits
from crossent.ops.custom import OPS, _pack
from crossent.options import make_options
from crossent.reduction import plan_reduction
from crossent.targets import normalize_target

graphs = []
def compile_only(gm, example_inputs):  # no GPU here: keep the graph, run nothing
    graphs.append(gm.code)
    def run(*args):
        raise RuntimeError("compile only")
    return run

def ce(x, t):
    opts = make_options(classes=x.shape[1], device=x.device, label_smoothing=0.1, z_loss=1e-3)
    tgt = normalize_target(t, x, 1, "auto", -100)
    red = plan_reduction(tgt, opts, torch.float32, x.device, t.shape, torch.float32)
    return OPS["cross_entropy_triton"](x.unsqueeze(2), **_pack(tgt, opts, red), want_grad=True)[0]

def lce(h, W, t):
    opts = make_options(classes=W.shape[0], device=h.device, label_smoothing=0.1, z_loss=1e-3)
    tgt = normalize_target(t, _Logits((h.shape[0], W.shape[0]), h.device), 1, "auto", -100)
    red = plan_reduction(tgt, opts, torch.float32, h.device, t.shape, torch.float32)
    return OPS["linear_cross_entropy_triton"](h, W, None, None, **_pack(tgt, opts, red), chunk_size=None,
                                              filter_eps=None, want_dx=True, want_dw=True, want_db=False,
                                              row_scale=None)[0]

for name, fn, make in (("ce", ce, lambda n: (torch.randn(n, 300, requires_grad=True), torch.randint(0, 300, (n,)))),
                       ("lce", lce, lambda n: (torch.randn(n, 48, requires_grad=True),
                                               torch.randn(300, 48, requires_grad=True), torch.randint(0, 300, (n,))))):
    torch._dynamo.reset()
    graphs.clear()
    cnt = CompileCounterWithBackend(aot_autograd(fw_compiler=compile_only, bw_compiler=compile_only))
    f = torch.compile(fn, backend=cnt, fullgraph=True)
    for n in (64, 80, 1000):
        try:
            f(*make(n))
        except RuntimeError as e:
            if "compile only" not in str(e):
                raise
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    idx = {int(line.split("kernel_idx = ")[1].split(",")[0]) for g in graphs for line in g.splitlines()
           if "triton_kernel_wrapper_functional(" in line}
    names = sorted({getattr(kernel_side_table.get_kernel(i), "fn", kernel_side_table.get_kernel(i)).__name__
                    for i in idx})
    print(name, "frames", cnt.frame_count, "kernels", ",".join(names))
'''


def test_triton_op_traces_its_kernels(tmp_path):
    """The ``triton_op``s (what a GPU compiles), traced on the CPU without running: AOTAutograd's
    forward graph calls crossent's kernels through ``triton_kernel_wrapper_functional`` (inductor
    sees them), and three sizes compile twice. A fresh process without ``TRITON_INTERPRET`` (under
    the interpreter ``wrap_triton`` hands back the bare kernel); the graphs are kept, not run."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "trace_triton_op.py"
    script.write_text(_TRACE_TRITON_OP)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert lines["ce"] == "frames 2 kernels ce_fwd_kernel", out.stdout
    assert lines["lce"] == "frames 2 kernels lce_bwd_kernel,lce_fin_kernel,lce_fwd_kernel", out.stdout

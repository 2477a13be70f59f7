"""linear_cross_entropy against cross_entropy on materialized logits."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import crossent
from crossent import SparseTarget
from oracle import EXACT_DTYPE, assert_close, assert_close64, torch_loss

LIN_IMPLS = ["torch", "chunked", "triton"]


def grads(fn, tensors, go_shape_from_loss=True, seed=0):
    ts = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    loss = fn(*ts)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype)  # same draw for every dtype
    out = torch.autograd.grad(loss, [t for t in ts if t is not None], go)
    return loss.detach(), out


@st.composite
def lin_problems(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 6))
    H = draw(st.integers(1, 9))
    V = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 10**6))
    g = torch.Generator().manual_seed(seed)
    shift = draw(st.booleans()) and T >= 2
    x = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.5, 2.0]))
    b = torch.randn(V, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    kind = draw(st.sampled_from(["index", "sparse", "probs"]))
    ignore_index = -100
    if kind == "index":
        ignore_index = draw(st.sampled_from([-100, 0]))
        t = torch.randint(0, V, (B, T), generator=g)
        t[torch.rand(B, T, generator=g) < 0.2] = ignore_index
    elif kind == "sparse":
        k = draw(st.integers(1, 4))
        idx = torch.randint(0, V, (B, T, k), generator=g)
        idx[torch.rand(B, T, k, generator=g) < 0.2] = -100
        t = SparseTarget(idx, torch.rand(B, T, k, generator=g, dtype=torch.float64))
    else:
        t = torch.softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    return dict(x=x, W=W, b=b, t=t, kind=kind, shift=shift, ignore_index=ignore_index, V=V,
                reduction=draw(st.sampled_from(["none", "mean", "sum"])),
                ls=draw(st.sampled_from([0.0, 0.2])),
                weight=torch.rand(V, generator=g, dtype=torch.float64) + 0.1 if draw(st.booleans()) else None,
                z=draw(st.sampled_from([0.0, 0.01])), cap=draw(st.sampled_from([None, 4.0])),
                chunk=draw(st.sampled_from([None, 1, 3, 7])))


def materialized(p, x, W, b):
    """The oracle: PyTorch's cross_entropy on the full logits."""
    t = p["t"]
    if p["shift"]:
        x = x[:, :-1]
        if isinstance(t, SparseTarget):
            t = SparseTarget(t.indices[:, 1:], t.values[:, 1:])
        else:
            t = t[:, 1:]
    logits = F.linear(x, W, b)
    if isinstance(t, SparseTarget):
        t = t.to_dense(p["V"])
    return torch_loss(logits, t, p["weight"], p["ignore_index"], p["reduction"], p["ls"], dim=-1, z_loss=p["z"],
                      softcap=p["cap"])


@pytest.mark.parametrize("impl,dt", [(i, EXACT_DTYPE[i]) for i in LIN_IMPLS] + [("chunked", torch.float32)])
@given(p=lin_problems())
def test_linear_matches_materialized_logits(impl, dt, p):
    """float64 for torch/chunked, float32 for triton (the interpreter) and for chunked (its CPU
    float32 GEMMs run on oneDNN), against the float64 oracle."""
    t = p["t"]
    if isinstance(t, SparseTarget):
        t = SparseTarget(t.indices, t.values.to(dt))
    elif t.dtype.is_floating_point:
        t = t.to(dt)
    cw = None if p["weight"] is None else p["weight"].to(dt)

    def ours(x, W, b=None):
        return crossent.linear_cross_entropy(x, W, t, b, cw, p["ignore_index"], p["reduction"], p["ls"],
                                             shift=p["shift"], z_loss=p["z"], softcap=p["cap"], impl=impl,
                                             chunk_size=p["chunk"] if impl != "triton" else None)

    cast = [None if a is None else a.to(dt) for a in (p["x"], p["W"], p["b"])]
    lo, go = grads(ours, cast)
    le, ge = grads(lambda x, W, b=None: materialized(p, x, W, b), [p["x"], p["W"], p["b"]])
    assert lo.shape == le.shape
    assert_close(lo, le, dt)
    for a, e in zip(go, ge):
        assert_close(a, e, dt, "grad")


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float32_no_worse_than_torch_and_n1(reduction, onednn, monkeypatch):
    # CPU float32 chunk GEMMs go through oneDNN by default; torch.mm when it is off
    monkeypatch.setattr(crossent.config.CONFIG, "onednn", onednn)
    for N, V, tied in ((1, 7, False), (33, 1001, False), (40, 300, True)):
        g = torch.Generator().manual_seed(N)
        x = torch.randn(N, 24, generator=g)
        W = torch.randn(V, 24, generator=g) / 4
        if tied:  # a transposed view, as a tied embedding stored [H, V] gives
            W = W.t().contiguous().t()
        b = torch.randn(V, generator=g)
        t = torch.randint(0, V, (N,), generator=g)
        lo, go = grads(lambda x, W, b: crossent.linear_cross_entropy(x, W, t, b, reduction=reduction, chunk_size=5),
                       [x, W, b])
        le, ge = grads(lambda x, W, b: F.cross_entropy(F.linear(x, W, b), t, reduction=reduction),
                       [x.double(), W.double(), b.double()])
        lt, gt = grads(lambda x, W, b: F.cross_entropy(F.linear(x, W, b), t, reduction=reduction), [x, W, b])
        from oracle import assert_no_worse

        assert_no_worse(lo, lt, le, torch.float32, factor=3)
        for a, th, e in zip(go, gt, ge):
            assert_no_worse(a, th, e, torch.float32, "grad", factor=3)


def test_never_builds_full_logits():
    from torch.utils._python_dispatch import TorchDispatchMode

    N, H, V = 64, 8, 500
    biggest = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    biggest.append(o.numel())
            return out

    x = torch.randn(N, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    t = torch.randint(0, V, (N,))
    with Watch():
        crossent.linear_cross_entropy(x, W, t, chunk_size=8).backward()
    assert max(biggest) <= max(8 * V, V * H), max(biggest)
    assert max(biggest) < N * V


def test_retain_graph_and_reuse():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(20, 6, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 20, (10,), generator=g)
    loss = crossent.linear_cross_entropy(x, W, t, chunk_size=3)
    loss.backward(retain_graph=True)
    g1 = (x.grad.clone(), W.grad.clone())
    loss.backward()
    assert torch.equal(x.grad, 2 * g1[0]) and torch.equal(W.grad, 2 * g1[1])
    ref = F.cross_entropy(x.detach() @ W.detach().T, t)
    assert_close64(loss.detach(), ref)


def test_only_some_inputs_require_grad():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(9, 4, dtype=torch.float64)
    t = torch.randint(0, 9, (5,))
    crossent.linear_cross_entropy(x, W, t).backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.cross_entropy(x2 @ W.T, t).backward()
    assert_close64(x.grad, x2.grad)
    with torch.no_grad():
        assert_close64(crossent.linear_cross_entropy(x, W, t), F.cross_entropy(x @ W.T, t))


def test_extras_and_module():
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    W = torch.randn(9, 4, dtype=torch.float64)
    t = torch.randint(0, 9, (2, 5))
    m = crossent.LinearCrossEntropyLoss(shift=True, z_loss=0.1, return_extras=True)
    loss, ex = m(x, W, t)
    logits = x[:, :-1] @ W.T
    assert ex["lse"].shape == (2, 4)
    assert_close64(ex["lse"], torch.logsumexp(logits, -1))
    assert torch.equal(ex["predicted"], logits.argmax(-1))
    assert_close64(loss, torch_loss(logits, t[:, 1:], dim=-1, z_loss=0.1))


def test_errors():
    x, W, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="transpose"):
        crossent.linear_cross_entropy(x, W.T, t)
    with pytest.raises(TypeError, match="cast"):
        crossent.linear_cross_entropy(x, W.double(), t)
    with pytest.raises(ValueError, match="linear_bias"):
        crossent.linear_cross_entropy(x, W, t, torch.randn(3))
    with pytest.raises(ValueError, match="chunk_size"):
        crossent.linear_cross_entropy(x, W, t, chunk_size=0)
    with pytest.raises(ValueError, match="target 12"):
        crossent.linear_cross_entropy(x, W, torch.tensor([0, 1, 12, 2]))
    with pytest.raises(ValueError, match="shift"):
        crossent.linear_cross_entropy(x, W, torch.randint(0, 10, (3,)), shift=True)


def test_triton_filter_eps():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g)
    W = torch.randn(300, 16, generator=g)
    t = torch.randint(0, 300, (40,), generator=g)
    exact = grads(lambda x, W: crossent.linear_cross_entropy(x, W, t, impl="triton"), [x, W])
    zero = grads(lambda x, W: crossent.linear_cross_entropy(x, W, t, impl="triton", filter_eps=0.0), [x, W])
    approx = grads(lambda x, W: crossent.linear_cross_entropy(x, W, t, impl="triton", filter_eps=1e-3), [x, W])
    ref = grads(lambda x, W: F.cross_entropy(x @ W.T, t), [x.double(), W.double()])
    assert torch.equal(exact[0], zero[0]) and all(torch.equal(a, b) for a, b in zip(exact[1], zero[1]))
    for a, e in zip(approx[1], ref[1]):
        assert torch.allclose(a.double(), e, atol=2e-3)
    with pytest.raises(ValueError, match="filter_eps"):
        crossent.linear_cross_entropy(x, W, t, impl="chunked", filter_eps=1e-3)


@pytest.mark.parametrize("impl", LIN_IMPLS)
def test_empty_batch_gives_zero_gradients(impl):
    x = torch.randn(0, 4, requires_grad=True)
    W = torch.randn(5, 4, requires_grad=True)
    loss = crossent.linear_cross_entropy(x, W, torch.zeros(0, dtype=torch.long), reduction="sum", impl=impl)
    loss.backward()
    assert loss.item() == 0 and W.grad is not None and not W.grad.any()


def test_default_chunk_rows_follow_device_and_free_memory(monkeypatch):
    from crossent.impl import chunked

    V = 32000
    assert chunked.linear_chunk_rows(2048, V) == (8 << 20) // (4 * V) == 65
    assert chunked.linear_chunk_rows(10, V) == 10 and chunked.linear_chunk_rows(2048, V, 7) == 7
    assert chunked.linear_chunk_rows(4096, 10**7) == 32  # never below 32 rows
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 << 30, 140 << 30))
    assert chunked.linear_chunk_rows(8192, V, device=cuda) == (512 << 20) // (4 * V)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (256 << 20, 140 << 30))
    assert chunked.linear_chunk_rows(8192, V, device=cuda) == (32 << 20) // (4 * V)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_float16_inputs_accumulate_in_float32(impl):
    # half-precision hidden states and weights (the interpreter has no bf16): the loss and every
    # gradient no worse than PyTorch's own half-precision computation, against float64
    from oracle import assert_no_worse

    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 24, generator=g)
    W = torch.randn(301, 24, generator=g) / 2
    b = torch.randn(301, generator=g)
    t = torch.randint(0, 301, (37,), generator=g)
    t[4] = -100
    half = [a.half() for a in (x, W, b)]
    lo, go = grads(lambda x, W, b: crossent.linear_cross_entropy(x, W, t, b, label_smoothing=0.1, impl=impl), half)
    assert lo.dtype == torch.float16 and all(a.dtype == torch.float16 for a in go)

    def eager(x, W, b):
        return F.cross_entropy(F.linear(x, W, b), t, label_smoothing=0.1)

    le, ge = grads(eager, [a.double() for a in (x, W, b)])
    lt, gt = grads(eager, half)
    assert_no_worse(lo, lt, le, torch.float16, factor=3)
    for a, th, e in zip(go, gt, ge):
        assert_no_worse(a, th, e, torch.float16, "grad", factor=3)


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("kind", ["index", "sparse", "probs"])
def test_triton_forward_vocabulary_splits_merge_exactly(splits, kind, monkeypatch):
    # on a GPU the forward splits the vocabulary across programs when rows are few; force that
    # here (16-wide tiles, 2/3/7 splits) and compare loss, extras and gradients with float64
    from crossent.impl.triton import linear as tl_linear

    monkeypatch.setattr(crossent.config.CONFIG, "triton_linear_blocks", (64, 16, 64))
    monkeypatch.setattr(crossent.config.CONFIG, "triton_fwd_splits", splits)
    g = torch.Generator().manual_seed(splits)
    N, H, V = 9, 12, 101
    x = torch.randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g)
    W[70] = W[5]  # an exact tie between classes in different splits: predicted keeps the first
    x[0] = W[5] * 3
    b = torch.randn(V, generator=g)
    b[70] = b[5]
    cw = torch.rand(V, generator=g) + 0.1
    if kind == "index":
        t = torch.randint(0, V, (N,), generator=g)
        t[2] = -100
    elif kind == "sparse":
        t = SparseTarget(torch.randint(0, V, (N, 3), generator=g), torch.rand(N, 3, generator=g))
    else:
        t = torch.softmax(torch.randn(N, V, generator=g), -1)
    kw = dict(label_smoothing=0.1, z_loss=0.01, softcap=6.0)
    if kind != "sparse":
        kw["weight"] = cw

    xs = [a.clone().requires_grad_(True) for a in (x, W, b)]
    lo, ex = crossent.linear_cross_entropy(*xs[:2], t, xs[2], impl="triton", return_extras=True, **kw)
    go = torch.autograd.grad(lo, xs)
    p = dict(t=t.double() if kind == "probs" else t, shift=False, V=V, ignore_index=-100, reduction="mean",
             ls=0.1, z=0.01, cap=6.0, weight=kw["weight"].double() if "weight" in kw else None)
    xd = [a.double().requires_grad_(True) for a in (x, W, b)]
    le = materialized(p, *xd)
    ge = torch.autograd.grad(le, xd)
    capped = 6.0 * torch.tanh(F.linear(*[a.double() for a in (x, W, b)]) / 6.0)
    assert_close(lo, le.detach(), torch.float32)
    for a_, e in zip(go, ge):
        assert_close(a_, e, torch.float32, "grad")
    assert_close(ex["lse"], torch.logsumexp(capped, -1), torch.float32)
    assert torch.equal(ex["predicted"], capped.argmax(-1)) and int(ex["predicted"][0]) == 5


def test_triton_autotuned_launch_path(monkeypatch):
    # the GPU launches through triton.autotune (blocks from the chosen config, the backward's
    # atomic outputs zeroed before each trial); run that path on the interpreter with small
    # configs and a timer that calls each trial several times, so a missing reset would show
    from crossent.impl.triton import linear as tl_linear

    configs = ((16, 32, 16, 4, 3), (32, 16, 16, 4, 3))
    monkeypatch.setattr(crossent.config.CONFIG, "triton_fwd_configs", configs)
    monkeypatch.setattr(crossent.config.CONFIG, "triton_bwd_configs", configs)
    monkeypatch.setattr(crossent.config.CONFIG, "triton_split_grain", 32)
    monkeypatch.setattr(crossent.config.CONFIG, "triton_fwd_splits", 3)

    def timer(call, quantiles=None, **_):
        for _ in range(3):
            call()
        return [1.0, 1.0, 1.0]

    kernels = tl_linear.build_kernels(True, do_bench=timer)
    monkeypatch.setattr(tl_linear, "_kernels", lambda dtype=None: kernels)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 20, generator=g)
    W = torch.randn(300, 20, generator=g)
    b = torch.randn(300, generator=g)
    t = torch.randint(0, 300, (37,), generator=g)
    for _ in range(2):  # the first call tunes, the second uses the cached choice
        lo, go = grads(lambda x, W, b: crossent.linear_cross_entropy(x, W, t, b, label_smoothing=0.1, impl="triton"),
                       [x, W, b])
        le, ge = grads(lambda x, W, b: F.cross_entropy(F.linear(x, W, b), t, label_smoothing=0.1),
                       [x.double(), W.double(), b.double()])
        assert_close(lo, le, torch.float32)
        for a, e in zip(go, ge):
            assert_close(a, e, torch.float32, "grad")


@pytest.mark.parametrize("impl", ["torch", "chunked", "triton"])
def test_shift_past_the_sequence_gives_no_position(impl):
    """``shift >= T`` leaves no position: PyTorch's loss over the empty shifted logits (mean NaN, sum 0,
    none empty) and zero gradients, as the stock Hugging Face loss gives for a one-token batch."""
    for T, shift in ((1, 1), (2, 3)):
        for reduction in ("mean", "sum", "none"):
            h = torch.randn(2, T, 4, requires_grad=True)
            W = torch.randn(7, 4, requires_grad=True)
            t = torch.randint(0, 7, (2, T))
            loss = crossent.linear_cross_entropy(h, W, t, shift=shift, reduction=reduction, impl=impl)
            ref = F.cross_entropy(torch.zeros(0, 7), torch.zeros(0, dtype=torch.long), reduction=reduction)
            if reduction == "none":
                assert loss.shape == (2, 0)
            else:
                torch.testing.assert_close(loss, ref, equal_nan=True)
            loss.sum().backward()
            assert not h.grad.any() and not W.grad.any()


def test_k_dim_linear_weight_with_options_warns_and_ignores_them_as_torch():
    """torch ignores LinearCrossEntropyOptions for a K-dimensional linear_weight (with a warning):
    crossent too, with torch's result (was a ValueError)."""
    import warnings

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 3, (5, 2, 4), generator=g)
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours = crossent.linear_cross_entropy(x, W, y, options=opts)
    assert any("ignored" in str(w.message) for w in seen)
    ref = torch.nn.functional.linear_cross_entropy(x, W, y)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    ga = torch.autograd.grad(ours, (x, W))
    gb = torch.autograd.grad(ref, (x, W))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

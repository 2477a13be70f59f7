"""Property tests: every call PyTorch's cross_entropy accepts gives the same loss
and gradients, per impl (float64 to 1e-10; lower precisions no worse than
PyTorch's own error against a float64 oracle)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import crossent
from oracle import EXACT_DTYPE, IMPLS, assert_close, assert_close64, assert_no_worse, f64, loss_and_grad, torch_loss


@st.composite
def problems(draw, dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16)):
    layout = draw(st.sampled_from(["2d", "unbatched", "kdim", "last"]))
    C = draw(st.integers(1, 9))
    N = draw(st.integers(1, 6))
    if layout == "2d":
        shape, dim = (N, C), 1
    elif layout == "unbatched":
        shape, dim = (C,), 1
    elif layout == "kdim":
        extra = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
        shape, dim = (N, C, *extra), 1
    else:
        T = draw(st.integers(1, 4))
        shape, dim = (N, T, C), -1
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1.0, 5.0, 30.0]))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    cdim = 0 if len(shape) == 1 else dim % len(shape)
    pos_shape = shape[:cdim] + shape[cdim + 1:]
    kind = draw(st.sampled_from(["index", "probs"]))
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    ls = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5]))
    weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.1 if draw(st.booleans()) else None
    ignore_index = -100
    if kind == "index":
        ignore_index = draw(st.sampled_from([-100, -1, 0, C - 1, 7]))
        t = torch.randint(0, C, pos_shape, generator=g)
        if draw(st.booleans()):
            mask = torch.rand(pos_shape, generator=g) < 0.3
            t = torch.where(mask, torch.full_like(t, ignore_index), t)
        if ignore_index < 0 and draw(st.booleans()):
            pass
        itype = draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]))
        if itype == torch.uint8 and ignore_index < 0:
            itype = torch.int64
        t = t.to(itype)
    else:
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 2, dim=cdim)
    grad_out = torch.randn(pos_shape, generator=g, dtype=torch.float64) if reduction == "none" else None
    return dict(x=x, t=t, dim=dim, dtype=dtype, kind=kind, reduction=reduction, ls=ls, weight=weight,
                ignore_index=ignore_index, grad_out=grad_out)


def _run(p, impl, **extra):
    dtype = p["dtype"]
    t = p["t"].to(dtype) if p["kind"] == "probs" else p["t"]
    w = None if p["weight"] is None else p["weight"].to(dtype if dtype != torch.float16 else torch.float32)

    def ours(x):
        return crossent.cross_entropy(x, t, w, p["ignore_index"], p["reduction"], p["ls"], dim=p["dim"],
                                      impl=impl, **extra)

    def theirs(x):
        return torch_loss(x, t, w, p["ignore_index"], p["reduction"], p["ls"], dim=p["dim"])

    def exact(x):
        return torch_loss(x, f64(t) if p["kind"] == "probs" else t, f64(w), p["ignore_index"], p["reduction"],
                          p["ls"], dim=p["dim"])

    x = p["x"].to(dtype)
    go = p["grad_out"]
    lo, go_ = loss_and_grad(ours, x, None if go is None else go.to(dtype))
    lt, gt = loss_and_grad(theirs, x, None if go is None else go.to(dtype))
    le, ge = loss_and_grad(exact, f64(x), go)
    return (lo, go_), (lt, gt), (le, ge)


@pytest.mark.parametrize("impl", IMPLS)
@given(p=problems())
def test_parity_with_pytorch(impl, p):
    if impl == "triton" and p["dtype"] in (torch.float64, torch.bfloat16):  # the interpreter has no bfloat16
        p["dtype"] = {torch.float64: torch.float32, torch.bfloat16: torch.float16}[p["dtype"]]
    (lo, go), (lt, gt), (le, ge) = _run(p, impl)
    assert lo.dtype == lt.dtype and lo.shape == lt.shape
    assert go.dtype == gt.dtype and go.shape == gt.shape
    if p["dtype"] == torch.float64:
        assert_close64(lo, le, "loss")
        assert_close64(go, ge, "grad")
    else:
        assert_no_worse(lo, lt, le, p["dtype"], "loss")
        assert_no_worse(go, gt, ge, p["dtype"], "grad")


@pytest.mark.parametrize("impl", IMPLS)
@given(p=problems(dtypes=(torch.float64,)), z=st.sampled_from([0.0, 1e-3, 0.5]),
       cap=st.sampled_from([None, 3.0, 30.0]), use_num_items=st.booleans())
def test_extras_against_composed_torch(impl, p, z, cap, use_num_items):
    """z_loss, softcap and num_items against PyTorch ops composed by hand (float64; float32 for triton)."""
    dt = EXACT_DTYPE[impl]
    num_items = None
    if use_num_items and p["reduction"] != "none":
        num_items = 7
    t = p["t"]

    tt = t.to(dt) if t.dtype.is_floating_point else t
    wt = None if p["weight"] is None else p["weight"].to(dt)

    def ours(x):
        return crossent.cross_entropy(x, tt, wt, p["ignore_index"], p["reduction"], p["ls"], dim=p["dim"],
                                      z_loss=z, softcap=cap, num_items=num_items, impl=impl)

    def exact(x):
        return torch_loss(x, t, p["weight"], p["ignore_index"], p["reduction"], p["ls"], dim=p["dim"], z_loss=z,
                          softcap=cap, num_items=num_items)

    go_ = None if p["grad_out"] is None else p["grad_out"].to(dt)
    lo, go = loss_and_grad(ours, p["x"].to(dt), go_)
    le, ge = loss_and_grad(exact, p["x"], p["grad_out"])
    assert_close(lo, le, dt, "loss")
    assert_close(go, ge, dt, "grad")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ignore_index", [-100, 1, -7])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_named_cases(impl, ignore_index, reduction):
    """Weights + label smoothing + ignore_index together, each reduction, float64."""
    dt = EXACT_DTYPE[impl]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 5, dtype=torch.float64, generator=g) * 3
    t = torch.randint(0, 5, (10,), generator=g)
    t[::3] = ignore_index
    w = torch.rand(5, dtype=torch.float64, generator=g) + 0.2
    go = torch.randn(10, dtype=torch.float64, generator=g) if reduction == "none" else None
    for ls in (0.0, 0.2):
        lo, go_ = loss_and_grad(lambda x: crossent.cross_entropy(x, t, w.to(dt), ignore_index, reduction, ls,
                                                                 impl=impl), x.to(dt), None if go is None else go.to(dt))
        le, ge = loss_and_grad(lambda x: torch_loss(x, t, w, ignore_index, reduction, ls), x, go)
        assert_close(lo, le, dt)
        assert_close(go_, ge, dt)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored_mean_is_nan_with_zero_grad(impl, ls, weighted):
    x = torch.randn(4, 3, dtype=EXACT_DTYPE[impl])
    t = torch.full((4,), -100)
    w = torch.rand(3, dtype=x.dtype) if weighted else None
    lo, go = loss_and_grad(lambda x: crossent.cross_entropy(x, t, w, label_smoothing=ls, impl=impl), x)
    lt, gt = loss_and_grad(lambda x: torch.nn.functional.cross_entropy(x, t, w, label_smoothing=ls), x)
    assert torch.isnan(lo) and torch.isnan(lt)
    assert torch.equal(go, gt) and not go.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    x = torch.randn(0, 4, dtype=torch.float64, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    for red in ("mean", "sum", "none"):
        a = crossent.cross_entropy(x, t, reduction=red, impl=impl)
        b = torch.nn.functional.cross_entropy(x, t, reduction=red)
        assert a.shape == b.shape
        assert torch.equal(a.isnan(), b.isnan())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("C", [1, 3, 31, 507, 4097])
def test_odd_class_counts_float32(impl, C):
    g = torch.Generator().manual_seed(C)
    x = torch.randn(37, C, generator=g) * 4
    t = torch.randint(0, C, (37,), generator=g)
    lo, go = loss_and_grad(lambda x: crossent.cross_entropy(x, t, impl=impl, label_smoothing=0.1), x)
    lt, gt = loss_and_grad(lambda x: torch.nn.functional.cross_entropy(x, t, label_smoothing=0.1), x)
    le, ge = loss_and_grad(lambda x: torch.nn.functional.cross_entropy(x, t, label_smoothing=0.1), x.double())
    assert_no_worse(lo, lt, le, torch.float32)
    assert_no_worse(go, gt, ge, torch.float32, "grad")


@pytest.mark.parametrize("impl", IMPLS)
def test_confident_float16_no_worse_than_torch(impl):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 50, generator=g) * 2
    t = torch.randint(0, 50, (64,), generator=g)
    x[torch.arange(64), t] += 20  # very confident, right
    x16 = x.half()
    lo, go = loss_and_grad(lambda x: crossent.cross_entropy(x, t, impl=impl), x16)
    lt, gt = loss_and_grad(lambda x: torch.nn.functional.cross_entropy(x, t), x16)
    le, ge = loss_and_grad(lambda x: torch.nn.functional.cross_entropy(x, t), x16.double())
    assert_no_worse(lo, lt, le, torch.float16)
    assert_no_worse(go, gt, ge, torch.float16, "grad")


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_logits_and_minus_inf(impl):
    x = torch.tensor([[1e4, 0.0, -1e4], [float("-inf"), float("-inf"), 2.0], [-3e38, 3e38, 0.0]])
    t = torch.tensor([0, 2, 1])
    lo, go = loss_and_grad(lambda x: crossent.cross_entropy(x, t, reduction="none", impl=impl), x)
    le, ge = loss_and_grad(lambda x: torch.nn.functional.cross_entropy(x, t, reduction="none"), x.double())
    assert torch.isfinite(lo).all() and torch.isfinite(go).all()
    assert torch.allclose(lo.double(), le, atol=1e-6) and torch.allclose(go.double(), ge, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_minus_inf_logit_with_zero_soft_target_is_finite(impl):
    """PyTorch gives NaN here (0 * -inf); the math gives a finite loss: 0 log 0 = 0."""
    dt = EXACT_DTYPE[impl]
    x = torch.tensor([[0.0, float("-inf"), 1.0]], dtype=dt)
    p = torch.tensor([[0.5, 0.0, 0.5]], dtype=dt)
    lo, go = loss_and_grad(lambda x: crossent.cross_entropy(x, p, impl=impl), x)
    finite = x[:, [0, 2]].double()
    le, ge = loss_and_grad(lambda f: torch.nn.functional.cross_entropy(f, p[:, [0, 2]].double()), finite)
    assert_close(lo, le, dt)
    assert_close(go[:, [0, 2]], ge, dt)
    assert go[0, 1] == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_target_in_a_late_tile_of_a_mostly_minus_inf_row(impl, monkeypatch):
    """Rows that are -inf except a few late classes; the triton kernel is forced to 16-wide tiles."""
    monkeypatch.setattr(crossent.config.CONFIG, "triton_max_block", 16)
    C = 100
    x = torch.full((4, C), float("-inf"))
    x[0, 97] = 1.0
    x[1, [5, 90]] = torch.tensor([0.5, 2.0])
    x[2, 60:] = torch.randn(40)
    x[3] = torch.randn(C)
    t = torch.tensor([97, 90, 99, 3])
    for kw in ({}, {"z_loss": 1e-2}, {"reduction": "none"}):
        lo, go = loss_and_grad(lambda x: crossent.cross_entropy(x, t, impl=impl, **kw), x)
        le, ge = loss_and_grad(lambda x: torch_loss(x, t, **kw), x.double())
        assert torch.isfinite(lo).all() and torch.isfinite(go).all()
        assert_close(lo, le, torch.float32)
        assert_close(go, ge, torch.float32, "grad")
        _, ex = crossent.cross_entropy(x, t, impl=impl, return_extras=True)
        assert torch.equal(ex["predicted"], x.argmax(1))

"""Regression tests for the defects of the issue (numbered d01..d19), public API only,
PyTorch as the oracle. Each test names its defect number."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import SparseTarget
from oracle import EXACT_DTYPE, assert_close, err, loss_and_grad

IMPLS = ["torch", "chunked", "triton"]
FUSED = ["chunked", "triton"]
INF = float("inf")
NAN = float("nan")


@pytest.fixture
def checks_off():
    prev = crossent.set_checks(False)
    try:
        yield
    finally:
        crossent.set_checks(prev)


def grad_of(fn, *tensors):
    """(loss, grads) of fn on fresh leaf copies of tensors."""
    ts = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*ts)
    gs = torch.autograd.grad(loss, ts, torch.ones_like(loss), allow_unused=True)
    return loss.detach(), gs


def same_nan_pattern(a, b):
    return torch.equal(torch.isnan(a), torch.isnan(b))


# ---------------------------------------------------------------- d01
@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("view", [False, True])
def test_d01_inplace_backward_on_parameter_refused(impl, view):
    p = torch.nn.Parameter(torch.randn(3, 4))
    before = p.detach().clone()
    logits = p[:2] if view else p
    t = torch.tensor([0, 1, 2])[: logits.shape[0]]
    with pytest.raises((ValueError, RuntimeError), match="inplace_backward"):
        crossent.cross_entropy(logits, t, impl=impl, inplace_backward=True)
    assert torch.equal(p.detach(), before), "the parameter was overwritten"


@pytest.mark.parametrize("impl", FUSED)
def test_d01_inplace_backward_on_non_leaf_still_works(impl):
    dt = EXACT_DTYPE[impl]
    p0 = torch.randn(3, 4, dtype=torch.float64).to(dt)
    t = torch.tensor([0, 3, 2])
    p = torch.nn.Parameter(p0.clone())
    loss = crossent.cross_entropy(p * 1, t, impl=impl, inplace_backward=True)
    loss.backward()
    q = p0.double().requires_grad_()
    ref = F.cross_entropy(q, t)
    ref.backward()
    assert_close(loss.detach(), ref.detach(), dt)
    assert_close(p.grad, q.grad, dt, "grad")


# ---------------------------------------------------------------- d02
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("row0", [[-INF, 1.0, 2.0], [-INF, -INF, -INF]], ids=["some_neg_inf", "all_neg_inf"])
@pytest.mark.parametrize("opt", ["label_smoothing", "z_loss"])
def test_d02_ignored_row_neg_inf_label_smoothing_or_z_loss(impl, row0, opt):
    dt = EXACT_DTYPE[impl]
    x = torch.tensor([row0, [0.0, 1.0, 2.0], [0.5, -1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([-100, 1, 0])
    ls, z = (0.1, 0.0) if opt == "label_smoothing" else (0.0, 0.1)

    def ref(xx):
        loss = F.cross_entropy(xx, t, label_smoothing=ls)
        if z:
            valid = t != -100
            lse = torch.logsumexp(xx, 1)
            loss = loss + z * torch.where(valid, lse, torch.zeros_like(lse)).square().sum() / valid.sum()
        return loss

    ref_loss, (ref_g,) = grad_of(ref, x)
    assert torch.isfinite(ref_loss)
    loss, (g,) = grad_of(lambda xx: crossent.cross_entropy(xx, t, impl=impl, label_smoothing=ls, z_loss=z), x.to(dt))
    assert torch.isfinite(loss), f"loss {loss} where torch gives {ref_loss}"
    assert_close(loss, ref_loss, dt)
    if row0[1] == 1.0:  # torch's own gradient is finite (zero on the ignored row)
        assert torch.isfinite(g).all()
        assert_close(g, ref_g, dt, "grad")
    else:  # torch gives NaN on the ignored all -inf row: compare the other rows
        assert torch.isfinite(g[1:]).all()
        assert_close(g[1:], ref_g[1:], dt, "grad")


def _lin_ref(x, W, b, t, ls=0.0, z=0.0):
    logits = F.linear(x, W, b)
    loss = F.cross_entropy(logits, t, label_smoothing=ls)
    if z:
        valid = t != -100
        lse = torch.logsumexp(logits, 1)
        loss = loss + z * torch.where(valid, lse, torch.zeros_like(lse)).square().sum() / valid.sum()
    return loss


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ls,z", [(0.1, 0.0), (0.0, 0.1), (0.1, 0.1)])
def test_d02_linear_ignored_row_all_neg_inf_logits(impl, ls, z):
    """An ignored position whose logits are all -inf (hidden state -inf against a positive weight)."""
    dt = EXACT_DTYPE[impl]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, generator=g, dtype=torch.float64)
    x[1] = torch.tensor([-INF, 0.0])
    W = torch.rand(6, 2, generator=g, dtype=torch.float64) + 0.1
    t = torch.tensor([1, -100, 4])
    ref = _lin_ref(x, W, None, t, ls, z)
    assert torch.isfinite(ref)
    loss = crossent.linear_cross_entropy(x.to(dt), W.to(dt), t, impl=impl, label_smoothing=ls, z_loss=z)
    assert torch.isfinite(loss), f"loss {loss} where torch gives {ref}"
    assert_close(loss, ref, dt)


def _padded_vocab():
    """Hidden states, projection and a bias of -inf on the last two (padded) vocabulary entries, labels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    W = torch.randn(8, 5, generator=g, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    b[-2:] = -INF
    return x, W, b, torch.tensor([0, 3, -100, 5])


@pytest.mark.parametrize("impl", IMPLS)
def test_d02_linear_padded_vocab_neg_inf_bias_z_loss(impl):
    """Bias -inf on padded vocab entries with z_loss: finite, equal to torch (loss and gradients)."""
    dt = EXACT_DTYPE[impl]
    x, W, b, t = _padded_vocab()
    ref, ref_g = grad_of(lambda *a: _lin_ref(*a, t, z=0.1), x, W, b)
    loss, gs = grad_of(lambda xx, ww, bb: crossent.linear_cross_entropy(xx, ww, t, bb, impl=impl, z_loss=0.1),
                       x.to(dt), W.to(dt), b.to(dt))
    assert_close(loss, ref, dt)
    for name, a, r in zip(["input", "weight", "bias"], gs, ref_g):
        assert torch.isfinite(a).all(), name
        assert_close(a, r, dt, name)


@pytest.mark.parametrize("impl", IMPLS)
def test_d02_linear_padded_vocab_neg_inf_bias_label_smoothing_is_inf_like_torch(impl):
    """Extra: label smoothing puts mass on the -inf padded entries; torch gives +inf (not NaN)."""
    dt = EXACT_DTYPE[impl]
    x, W, b, t = _padded_vocab()
    ref = _lin_ref(x, W, b, t, ls=0.1)
    loss = crossent.linear_cross_entropy(x.to(dt), W.to(dt), t, b.to(dt), impl=impl, label_smoothing=0.1)
    assert ref.item() == INF
    assert loss.item() == ref.item(), f"{loss.item()} vs torch {ref.item()}"


# ---------------------------------------------------------------- d03
def _overlap_cases():
    base = torch.randn(1, 5, generator=torch.Generator().manual_seed(3))
    flat = torch.randn(10, generator=torch.Generator().manual_seed(4))
    return {
        "expand": (base, lambda leaf: (leaf * 1).expand(4, 5)),
        "as_strided": (flat, lambda leaf: torch.as_strided(leaf * 1, (4, 5), (1, 1))),
    }


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("case", ["expand", "as_strided"])
def test_d03_inplace_backward_self_overlapping_logits(impl, case):
    src, make = _overlap_cases()[case]
    t = torch.tensor([0, 1, 2, 3])
    dt = EXACT_DTYPE[impl]
    ref_leaf = src.double().requires_grad_()
    ref = F.cross_entropy(make(ref_leaf), t)
    ref.backward()
    leaf = src.to(dt).requires_grad_()
    try:
        loss = crossent.cross_entropy(make(leaf), t, impl=impl, inplace_backward=True)
    except ValueError as e:
        assert "overlap" in str(e) or "inplace_backward" in str(e), str(e)
        return
    loss.backward()
    assert_close(loss.detach(), ref.detach(), dt)
    assert_close(leaf.grad, ref_leaf.grad, dt, "grad")


# ---------------------------------------------------------------- d04
@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("second", ["mul_sum", "crossent", "torch_ce"])
def test_d04_second_use_after_inplace_backward_fails_loudly(impl, second):
    x = torch.randn(3, 4, requires_grad=True)
    t = torch.tensor([0, 1, 2])
    xx = x * 1
    l1 = crossent.cross_entropy(xx, t, impl=impl, inplace_backward=True)
    with pytest.raises((RuntimeError, ValueError)):  # at the second use or at the backward
        if second == "mul_sum":
            l2 = (xx * 2).sum()
        elif second == "crossent":
            l2 = crossent.cross_entropy(xx, t, impl=impl)
        else:
            l2 = F.cross_entropy(xx, t)
        (l1 + l2).backward()


@pytest.mark.parametrize("impl", FUSED)
def test_d04_nan_probs_refused_before_logits_overwritten(impl):
    x = torch.randn(3, 4, requires_grad=True)
    xx = x * 1
    before = xx.detach().clone()
    p = torch.rand(3, 4)
    p[1, 2] = NAN
    with pytest.raises(ValueError, match="NaN"):
        crossent.cross_entropy(xx, p, impl=impl, inplace_backward=True)
    assert torch.equal(xx.detach(), before), "the logits were overwritten before the NaN check"


# ---------------------------------------------------------------- d05
@pytest.mark.parametrize("impl", IMPLS + ["module"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_d05_autocast_loss_dtype_like_torch(impl, dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, generator=g).to(dtype)
    t = torch.tensor([0, 1, 5, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(x, t)
        if impl == "module":
            ours = crossent.CrossEntropyLoss()(x, t)
        else:
            ours = crossent.cross_entropy(x, t, impl=impl)
    assert ref.dtype == torch.float32
    assert ours.dtype == ref.dtype, f"{ours.dtype} under autocast, torch gives {ref.dtype}"
    assert abs(ours.item() - ref.item()) <= 1e-3 * abs(ref.item())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_d05_autocast_linear_loss_dtype_like_torch(impl, dtype):
    g = torch.Generator().manual_seed(6)
    h = torch.randn(4, 8, generator=g).to(dtype)
    W = torch.randn(6, 8, generator=g).to(dtype)
    t = torch.tensor([0, 1, 5, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, W), t)
        ours = crossent.linear_cross_entropy(h, W, t, impl=impl)
    assert ours.dtype == ref.dtype, f"{ours.dtype} under autocast, torch gives {ref.dtype}"
    assert abs(ours.item() - ref.item()) <= 2e-2 * abs(ref.item())


# ---------------------------------------------------------------- d06
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [[1, 1, 0], [2, 0, 0], [-1, 0, 0], [0, -1, 1]], ids=str)
def test_d06_checks_off_bad_one_hot_row_gives_nan(impl, bad, checks_off):
    oh = torch.tensor([[0, 1, 0], bad, [0, 0, 1]])
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(7))
    loss = crossent.cross_entropy(x, oh, reduction="none", impl=impl)
    assert torch.isnan(loss[1]), f"bad one-hot row {bad} gave {loss[1].item()}, not NaN"
    assert torch.isfinite(loss[[0, 2]]).all()


# ---------------------------------------------------------------- d07
@pytest.mark.parametrize("impl", IMPLS)
def test_d07_zero_total_weight_mean_nan_loss_and_grad(impl):
    dt = EXACT_DTYPE[impl]
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([0, 1, 1])
    w = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    ref, (ref_g,) = grad_of(lambda xx: F.cross_entropy(xx, t, w), x)
    loss, (g,) = grad_of(lambda xx: crossent.cross_entropy(xx, t, w.to(dt), impl=impl), x.to(dt))
    assert torch.isnan(ref) and torch.isnan(loss)
    assert same_nan_pattern(g, ref_g), f"grad {g} vs torch {ref_g}"


# ---------------------------------------------------------------- d08
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("label,dtype,ignore_index", [(156, torch.uint8, -100), (-56, torch.int8, 200)])
def test_d08_narrow_dtype_out_of_range_label(impl, label, dtype, ignore_index):
    x = torch.randn(3, 10)
    with pytest.raises(IndexError):  # torch refuses the same int64 label
        F.cross_entropy(x, torch.tensor([0, label, 1]), ignore_index=ignore_index)
    with pytest.raises(ValueError, match=f"target {label} .*out of range"):
        crossent.cross_entropy(x, torch.tensor([0, label, 1]), ignore_index=ignore_index, impl=impl)
    with pytest.raises(ValueError, match=f"target {label} .*out of range"):
        crossent.cross_entropy(x, torch.tensor([0, label, 1], dtype=dtype), ignore_index=ignore_index, impl=impl)


# ---------------------------------------------------------------- d09
@pytest.mark.parametrize("impl", IMPLS)
def test_d09_probs_with_ignore_index_like_torch(impl):
    dt = EXACT_DTYPE[impl]
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    p = torch.rand(3, 5, generator=g, dtype=torch.float64).softmax(1)
    ref = F.cross_entropy(x, p, ignore_index=-1)
    assert_close(crossent.cross_entropy(x.to(dt), p.to(dt), ignore_index=-1, impl=impl), ref, dt)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["np_int64", "tensor0d"])
def test_d09_ignore_index_numpy_or_0d_tensor(impl, kind):
    dt = EXACT_DTYPE[impl]
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    t = torch.tensor([0, -1, 2])
    ii = np.int64(-1) if kind == "np_int64" else torch.tensor(-1)
    ref = F.cross_entropy(x, t, ignore_index=-1)
    assert_close(crossent.cross_entropy(x.to(dt), t, ignore_index=ii, impl=impl), ref, dt)
    assert_close(crossent.CrossEntropyLoss(ignore_index=ii)(x.to(dt), t), ref, dt)


@pytest.mark.parametrize("impl", IMPLS)
def test_d09_label_smoothing_0d_tensor(impl):
    dt = EXACT_DTYPE[impl]
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    t = torch.tensor([0, 4, 2])
    ref = F.cross_entropy(x, t, label_smoothing=torch.tensor(0.1))  # float32 0.1 (torch accepts the tensor)
    assert abs(ref.item() - F.cross_entropy(x, t, label_smoothing=0.1).item()) < 1e-7
    ours = crossent.cross_entropy(x.to(dt), t, label_smoothing=torch.tensor(0.1), impl=impl)
    assert_close(ours, ref, dt)
    assert_close(crossent.CrossEntropyLoss(label_smoothing=torch.tensor(0.1))(x.to(dt), t), ref, dt)


# ---------------------------------------------------------------- d10
@pytest.mark.parametrize("impl", FUSED)
def test_d10_requires_grad_target_and_weight_under_no_grad(impl):
    dt = EXACT_DTYPE[impl]
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    p = torch.rand(3, 5, generator=g, dtype=torch.float64).softmax(1).to(dt).requires_grad_()
    w = (torch.rand(5, generator=g, dtype=torch.float64) + 0.1).to(dt).requires_grad_()
    t = torch.tensor([0, 4, 2])
    with torch.no_grad():
        ref_p = F.cross_entropy(x, p.double(), w.double())
        ref_t = F.cross_entropy(x, t, w.double())
        assert_close(crossent.cross_entropy(x.to(dt), p, w, impl=impl), ref_p, dt)
        assert_close(crossent.cross_entropy(x.to(dt), t, w, impl=impl), ref_t, dt)


# ---------------------------------------------------------------- d11
_D11 = """
import torch, crossent
try:
    crossent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), impl="triton")
    print("NO ERROR")
except (ValueError, RuntimeError) as e:
    print("ERROR", type(e).__name__, e)
"""


@pytest.mark.parametrize("interp", [None, "0"])
def test_d11_triton_on_cpu_without_interpreter_clear_error(interp):
    pytest.importorskip("triton")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interp is not None:
        env["TRITON_INTERPRET"] = interp
    r = subprocess.run([sys.executable, "-c", _D11], env=env, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert "ERROR" in r.stdout and "NO ERROR" not in r.stdout, out[-2000:]
    assert "active drivers" not in out, out[-2000:]
    assert "TRITON_INTERPRET" in r.stdout or "CUDA" in r.stdout, out[-2000:]


# ---------------------------------------------------------------- d12
@pytest.mark.parametrize("bad", [-3.0, 0.0])
def test_d12_num_items_tensor_validated(bad):
    x, t = torch.randn(3, 5), torch.tensor([0, 4, 2])
    with pytest.raises(ValueError, match="num_items"):
        crossent.cross_entropy(x, t, num_items=torch.tensor(bad))


def test_d12_num_items_tensor_ok():
    x = torch.randn(3, 5, dtype=torch.float64)
    t = torch.tensor([0, 4, 2])
    ref = F.cross_entropy(x, t, reduction="sum") / 4
    for impl in IMPLS:
        assert_close(crossent.cross_entropy(x, t, num_items=torch.tensor(4.0), impl=impl), ref, torch.float64)


# ---------------------------------------------------------------- d13
def test_d13_triton_bf16_gradient_rounded_to_nearest():
    g = torch.Generator().manual_seed(13)
    x = (torch.randn(8, 64, generator=g) * 3).to(torch.bfloat16)
    t = torch.randint(0, 64, (8,), generator=g)
    ref, (exact,) = grad_of(lambda xx: F.cross_entropy(xx, t), x.double())
    loss, (ours,) = grad_of(lambda xx: crossent.cross_entropy(xx, t, impl="triton"), x)
    assert ours.dtype == torch.bfloat16
    rounded = exact.to(torch.bfloat16).float()
    diff = (ours.float() - rounded).abs()
    assert (diff <= rounded.abs() * 2.0**-7).all(), "gradient off by more than one bf16 ulp"
    frac = float((diff > 0).float().mean())
    assert frac <= 0.1, f"{frac:.0%} of the bf16 gradient is not float64's rounded to nearest"
    assert abs(loss.float().item() - ref.item()) <= 2.0**-7 * abs(ref.item())


def test_d13_triton_linear_bf16_right_or_refused():
    g = torch.Generator().manual_seed(14)
    h = torch.randn(8, 16, generator=g).to(torch.bfloat16)
    W = torch.randn(64, 16, generator=g).to(torch.bfloat16)
    t = torch.randint(0, 64, (8,), generator=g)
    ref = F.cross_entropy(F.linear(h.double(), W.double()), t)
    try:
        loss = crossent.linear_cross_entropy(h, W, t, impl="triton")
    except (ValueError, TypeError, RuntimeError) as e:
        assert "bfloat16" in str(e) or "bf16" in str(e), str(e)
        return
    assert abs(loss.float().item() - ref.item()) <= 2e-2 * abs(ref.item()), f"{loss.item()} vs {ref.item()}"


# ---------------------------------------------------------------- d15
@pytest.mark.parametrize("impl", IMPLS)
def test_d15_extras_lse_of_infinite_rows(impl):
    x = torch.tensor([[-INF] * 4, [0.0, INF, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0]])
    _, extras = crossent.cross_entropy(x, torch.tensor([-100, -100, 1]), impl=impl, return_extras=True)
    ref = torch.logsumexp(x, 1)
    assert err(extras["lse"], ref) <= 1e-6, f"lse {extras['lse']} vs torch.logsumexp {ref}"


@pytest.mark.parametrize("impl", IMPLS)
def test_d15_extras_predicted_picks_nan_like_argmax(impl):
    x = torch.tensor([[0.0, NAN, 1.0, 2.0], [0.0, 1.0, 5.0, 3.0]])
    _, extras = crossent.cross_entropy(x, torch.tensor([-100, 1]), impl=impl, return_extras=True)
    assert torch.equal(extras["predicted"].long(), torch.argmax(x, 1))


@pytest.mark.parametrize("impl", IMPLS)
def test_d15_sparse_nan_in_padding_slot(impl):
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(15))
    idx = torch.tensor([[1, 2], [0, -100]])
    clean = crossent.cross_entropy(x, SparseTarget(idx, torch.tensor([[0.8, 0.2], [1.0, 0.0]])), impl=impl)
    dirty = crossent.cross_entropy(x, SparseTarget(idx, torch.tensor([[0.8, 0.2], [1.0, NAN]])), impl=impl)
    assert torch.equal(dirty, clean)


# ---------------------------------------------------------------- d16
@pytest.mark.parametrize("tshape,shift,probs", [
    ((2, 4), False, False), ((2, 6), False, False), ((5, 2), False, False), ((10,), False, False),
    ((2, 5, 3), False, False), ((2, 4, 10), False, True), ((2, 5, 9), True, True), ((3, 5), True, False),
], ids=str)
def test_d16_linear_shape_error_names_hidden_states(tshape, shift, probs):
    h, W = torch.randn(2, 5, 16), torch.randn(10, 16)
    t = torch.rand(tshape) if probs else torch.randint(0, 10, tshape)
    with pytest.raises(ValueError) as info:
        crossent.linear_cross_entropy(h, W, t, shift=shift)
    msg = str(info.value)
    assert "[2, 5, 16]" in msg or "[2, 5]" in msg, msg
    for internal in ("input is [2, 5, 10]", "input [2, 5, 10]", "input is [2, 4, 10]", "class dim 2", "dim=2"):
        assert internal not in msg, f"message describes the internal logits: {msg}"


def test_d16_linear_sparse_shape_error_names_hidden_states():
    h, W = torch.randn(2, 5, 16), torch.randn(10, 16)
    st = SparseTarget(torch.zeros(2, 4, 3, dtype=torch.long), torch.ones(2, 4, 3) / 3)
    with pytest.raises(ValueError) as info:
        crossent.linear_cross_entropy(h, W, st)
    msg = str(info.value)
    assert "[2, 5, 16]" in msg or "[2, 5" in msg, msg
    for internal in ("input is [2, 5, 10]", "input [2, 5, 10]", "class dim"):
        assert internal not in msg, f"message describes the internal logits: {msg}"


# ---------------------------------------------------------------- d17
@pytest.mark.parametrize("impl", IMPLS)
def test_d17_float32_logits_float64_probs_promote(impl):
    g = torch.Generator().manual_seed(17)
    x = torch.randn(3, 5, generator=g)
    p = torch.rand(3, 5, generator=g, dtype=torch.float64).softmax(1)
    ref = F.cross_entropy(x, p)
    ours = crossent.cross_entropy(x, p, impl=impl)
    assert ref.dtype == torch.float64
    assert ours.dtype == torch.float64, f"loss is {ours.dtype}, torch gives float64"
    assert abs(ours.item() - ref.item()) <= 1e-6 * abs(ref.item())


# ---------------------------------------------------------------- d18
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "index_ii", "probs"])
def test_d18_linear_cross_entropy_torch_signature(impl, reduction, kind):
    g = torch.Generator().manual_seed(18)
    d, dt = torch.float64, EXACT_DTYPE[impl]  # float64 on triton runs chunked: float32 there
    x = torch.randn(4, 6, generator=g, dtype=d)
    W = torch.randn(5, 6, generator=g, dtype=d)
    b = torch.randn(5, generator=g, dtype=d)
    w = torch.rand(5, generator=g, dtype=d) + 0.1
    ii = None
    if kind == "probs":
        t = torch.rand(4, 5, generator=g, dtype=d).softmax(1)
    else:
        t = torch.tensor([0, 4, -100, 2])
        if kind == "index_ii":
            t, ii = torch.tensor([0, 4, -1, 2]), -1
    kw = dict(reduction=reduction, ignore_index=ii, label_smoothing=0.1, options=None)
    ref, ref_g = grad_of(lambda xx, ww, bb: F.linear_cross_entropy(xx, ww, t, linear_bias=bb, weight=w, **kw), x, W, b)
    t_ = t.to(dt) if kind == "probs" else t
    ours, gs = grad_of(lambda xx, ww, bb: crossent.linear_cross_entropy(xx, ww, t_, linear_bias=bb, weight=w.to(dt),
                                                                        impl=impl, **kw), x.to(dt), W.to(dt), b.to(dt))
    assert ours.shape == ref.shape
    assert_close(ours, ref, dt)
    for name, a, r in zip(["input", "linear_weight", "linear_bias"], gs, ref_g):
        assert_close(a, r, dt, name)


@pytest.mark.parametrize("case", ["index", "bias", "probs"])
def test_d18_linear_k_dim_weight_torch_result_or_clear_error(case):
    """torch: weight (C, d1, H), input (N, H) -> logits (N, C, d1), classes at dim 1, target (N, d1)."""
    g = torch.Generator().manual_seed(19)
    d = torch.float64
    x = torch.randn(4, 6, generator=g, dtype=d)
    W = torch.randn(5, 3, 6, generator=g, dtype=d)
    b = torch.randn(5, 3, generator=g, dtype=d) if case == "bias" else None
    t = torch.rand(4, 5, 3, generator=g, dtype=d).softmax(1) if case == "probs" else torch.randint(0, 5, (4, 3),
                                                                                                 generator=g)
    ref = F.linear_cross_entropy(x, W, t, linear_bias=b)
    manual = F.cross_entropy(F.linear(x, W.reshape(15, 6), None if b is None else b.reshape(15)).reshape(4, 5, 3), t)
    assert_close(ref, manual, d)  # what torch computes
    try:
        ours = crossent.linear_cross_entropy(x, W, t, linear_bias=b)
    except ValueError as e:
        assert "linear_weight" in str(e), str(e)
        return
    assert_close(ours, ref, d)


def test_d18_linear_k_dim_weight_unbatched_refused():
    x, W, t = torch.randn(6), torch.randn(5, 3, 6), torch.randint(0, 5, (3,))
    with pytest.raises(RuntimeError, match="batched"):
        F.linear_cross_entropy(x, W, t)
    with pytest.raises((ValueError, RuntimeError), match="linear_weight"):
        crossent.linear_cross_entropy(x, W, t)


# ---------------------------------------------------------------- d19
@pytest.mark.parametrize("impl", IMPLS)
def test_d19_linear_integer_shift(impl):
    dt = EXACT_DTYPE[impl]
    g = torch.Generator().manual_seed(20)
    h = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    W = torch.randn(10, 16, generator=g, dtype=torch.float64)
    t = torch.randint(0, 10, (2, 5), generator=g)
    logits = F.linear(h, W)

    def shifted(s):
        return F.cross_entropy(logits[:, :-s].reshape(-1, 10), t[:, s:].reshape(-1))

    assert_close(crossent.linear_cross_entropy(h.to(dt), W.to(dt), t, shift=True, impl=impl), shifted(1), dt)
    try:
        two = crossent.linear_cross_entropy(h.to(dt), W.to(dt), t, shift=2, impl=impl)
    except (ValueError, TypeError) as e:
        assert "shift" in str(e), str(e)
        return
    assert abs(two.item() - shifted(1).item()) > 1e-3, "shift=2 was taken as shift by 1"
    assert_close(two, shifted(2), dt)


# --------------------------------------------------------------------------- found by a second hostile probe


@pytest.mark.parametrize("second", ["same", "detach", "slice", "no_grad"])
def test_p01_second_crossent_call_on_overwritten_logits_raises(second):
    h = torch.randn(6, 8, requires_grad=True)
    W = torch.randn(10, 8, requires_grad=True)
    y = torch.randint(0, 10, (6,))
    lg = h @ W.t()
    crossent.cross_entropy(lg, y, impl="chunked", inplace_backward=True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        if second == "same":
            crossent.cross_entropy(lg, y)
        elif second == "detach":
            crossent.cross_entropy(lg.detach(), y, impl="torch")
        elif second == "slice":
            crossent.cross_entropy(lg[:3], y[:3])
        else:
            with torch.no_grad():
                crossent.cross_entropy(lg, y)
    lg.detach().copy_(torch.randn(6, 10))  # refilled: logits again, no error
    crossent.cross_entropy(lg.detach(), y)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("layout", ["view", "reshape", "transpose_dim", "btv_dim"])
def test_p02_inplace_backward_on_views_of_non_leaf_logits(impl, layout):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    W = torch.randn(5, 4, generator=g)
    t = torch.randint(0, 5, (6,), generator=g)
    cases = {
        "view": (lambda a: a.view(6, 5), t, 1),
        "reshape": (lambda a: a.reshape(-1, 5), t, 1),
        "transpose_dim": (lambda a: a.transpose(1, 2), t.view(2, 3), 1),
        "btv_dim": (lambda a: a, t.view(2, 3), -1),
    }
    shape, tgt, dim = cases[layout]

    def ours(h):
        return crossent.cross_entropy(shape(F.linear(h, W)), tgt, dim=dim, impl=impl, inplace_backward=True)

    def ref(h):
        return crossent.cross_entropy(shape(F.linear(h, W)), tgt, dim=dim, impl="torch")

    lo, go = loss_and_grad(ours, h)
    le, ge = loss_and_grad(ref, h)
    assert torch.allclose(lo, le, atol=1e-5) and torch.allclose(go, ge, atol=1e-5)


@pytest.mark.parametrize("impl", FUSED)
def test_p08_sliced_views_are_written_in_place_not_refused(impl):
    h = torch.randn(2, 4, 8, requires_grad=True)
    lg = F.linear(h, torch.randn(10, 8))
    lab = torch.randint(0, 10, (2, 4))
    ref = F.cross_entropy(lg.detach()[:, :-1].reshape(-1, 10), lab[:, 1:].reshape(-1))
    got = crossent.cross_entropy(lg[:, :-1], lab[:, 1:], dim=-1, impl=impl, inplace_backward=True)
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_p04_predicted_is_the_argmax_of_the_raw_logits_under_softcap(impl):
    x = torch.tensor([[20.0, 30.0, 0.0], [-5.0, 40.0, 39.0]])
    _, ex = crossent.cross_entropy(x, torch.tensor([1, 1]), softcap=1.0, return_extras=True, impl=impl)
    assert ex["predicted"].tolist() == [1, 1]
    W = torch.eye(3)
    _, ex = crossent.linear_cross_entropy(x, W, torch.tensor([1, 1]), softcap=1.0, return_extras=True, impl=impl)
    assert ex["predicted"].tolist() == [1, 1]


@pytest.mark.parametrize("impl", IMPLS)
def test_p05_p06_degenerate_denominators_agree_with_torch(impl):
    dt = torch.float64 if impl != "triton" else torch.float32
    x = torch.randn(3, 4, dtype=dt)
    t = torch.tensor([1, 2, 3])
    w = torch.tensor([1.0, 0, 0, 0], dtype=dt)
    ours = crossent.cross_entropy(x, t, weight=w, label_smoothing=0.3, impl=impl)
    assert torch.isnan(ours) and torch.isnan(F.cross_entropy(x, t, weight=w, label_smoothing=0.3))
    prev = crossent.set_checks(False)
    try:
        grads = []
        for name in ("torch", impl):
            xx = x.clone().requires_grad_(True)
            loss = crossent.cross_entropy(xx, t, num_items=torch.tensor(0), impl=name)
            loss.backward()
            assert torch.isinf(loss)
            grads.append(xx.grad)
        assert torch.equal(torch.isfinite(grads[0]), torch.isfinite(grads[1]))
    finally:
        crossent.set_checks(prev)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_p03_linear_float64_is_left_alone_by_autocast(impl):
    h = torch.randn(2, 3, dtype=torch.float64)
    W = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, W), y)
        got = crossent.linear_cross_entropy(h, W, y, impl=impl)
    assert got.dtype == ref.dtype == torch.float64
    assert torch.allclose(got, ref, rtol=1e-12)


def test_p07_linear_hidden_size_zero_like_torch():
    got = crossent.linear_cross_entropy(torch.randn(3, 0), torch.randn(5, 0), torch.tensor([0, 1, 2]))
    assert torch.allclose(got, F.cross_entropy(torch.zeros(3, 5), torch.tensor([0, 1, 2])))


@pytest.mark.parametrize("call, match", [
    (lambda: crossent.linear_cross_entropy(torch.tensor(1.0), torch.randn(3, 1), torch.tensor(0)), "0-dim"),
    (lambda: crossent.set_checks("false"), "True or False"),
    (lambda: crossent.CrossEntropyLoss(ignore_index=1.5), "ignore_index"),
    (lambda: crossent.LinearCrossEntropyLoss(shift=-1), "shift"),
    (lambda: crossent.CrossEntropyLoss(impl="foo"), "impl"),
])
def test_p09_clear_errors_at_the_right_time(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_p10_arguments_torch_takes():
    x, t = torch.randn(3, 4), torch.tensor([1, 2, 3])
    assert torch.allclose(crossent.cross_entropy(x, t, label_smoothing=True),
                          F.cross_entropy(x, t, label_smoothing=True))
    with pytest.warns(DeprecationWarning):
        assert torch.allclose(crossent.cross_entropy(x, t, reduction="elementwise_mean"), F.cross_entropy(x, t))
    xb = torch.randn(2, 3, 4)
    tb = torch.randint(0, 4, (2, 3))
    assert torch.allclose(crossent.cross_entropy(xb, tb, dim=np.int64(-1)), F.cross_entropy(xb.transpose(1, 2), tb))
    h, W, lab = torch.randn(2, 5, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 5))
    assert torch.allclose(crossent.linear_cross_entropy(h, W, lab, shift=np.int64(2), chunk_size=np.int64(3)),
                          crossent.linear_cross_entropy(h, W, lab, shift=2))


@pytest.mark.parametrize("impl", IMPLS)
def test_p11_sparse_values_promote_like_dense_probabilities(impl):
    x = torch.randn(2, 3)
    st = crossent.SparseTarget(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0.5, 0.5], [0.3, 0.7]], dtype=torch.float64))
    got = crossent.cross_entropy(x, st, impl=impl)
    ref = F.cross_entropy(x.double(), st.to_dense(3))
    assert got.dtype == torch.float64
    assert torch.allclose(got, ref, rtol=1e-12 if impl != "triton" else 1e-6)


def test_p12_reference_soft_target_gradient_at_zero_mass_like_torch():
    x = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]], dtype=torch.float64)
    grads = []
    for f in (lambda x, q: crossent.cross_entropy(x, q, impl="torch"), F.cross_entropy):
        qq = q.clone().requires_grad_()
        grads.append(torch.autograd.grad(f(x, qq), qq)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-12)


# --------------------------------------------------------------------------- found by a third hostile probe


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", ["expanded", "strided"])
def test_p13_non_contiguous_linear_bias(impl, bias):
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(2, 5, 8, generator=g), torch.randn(24, 8, generator=g) / 2
    t = torch.randint(0, 24, (2, 5), generator=g)
    b = torch.tensor([-1.3]).expand(24) if bias == "expanded" else torch.randn(48, generator=g)[::2]
    ref = F.cross_entropy(F.linear(x, W, b).reshape(-1, 24), t.reshape(-1))
    assert torch.allclose(crossent.linear_cross_entropy(x, W, t, b, impl=impl), ref, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_p14_lse_of_rows_holding_nan_is_nan_like_logsumexp(impl):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[nan, inf, 0.0, 0.0], [-inf, nan, -inf, -inf], [nan, -inf, -inf, -inf], [inf, 0, 0, 0],
                      [-inf, -inf, -inf, -inf], [1.0, 2, 3, 4]])
    _, ex = crossent.cross_entropy(x, torch.tensor([0, 1, 2, 1, 0, 3]), reduction="none", impl=impl,
                                   return_extras=True, z_loss=1e-3)
    ref = torch.logsumexp(x, 1)
    assert torch.equal(torch.isnan(ex["lse"]), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    assert torch.allclose(ex["lse"][ok], ref[ok])
    h = torch.randn(3, 4)
    h[0, 1] = nan
    _, ex = crossent.linear_cross_entropy(h, torch.randn(6, 4), torch.tensor([0, 1, 2]), impl=impl,
                                          reduction="none", return_extras=True)
    assert torch.isnan(ex["lse"][0]) and torch.isfinite(ex["lse"][1:]).all()


def test_p15_diagnose_never_raises():
    assert crossent.diagnose(torch.randn(0, 5), torch.zeros(0, 5, dtype=torch.long)) == []
    assert crossent.diagnose(torch.randn(0, 5), torch.zeros(0, 5), target_format="one_hot") == []
    found = crossent.diagnose(torch.randn(3, 4, device="meta"), torch.zeros(3, dtype=torch.long))
    assert len(found) == 1 and "could not" in found[0]
    assert any("1 class" in f for f in crossent.diagnose(torch.randn(4, 1), torch.zeros(4, dtype=torch.long)))
    seg = crossent.diagnose(torch.randn(4, 3), torch.tensor([0, 255, 1, 255]))
    assert any("ignore_index=255" in f for f in seg)


def test_p16_torchscript_is_refused_clearly():
    with pytest.raises(RuntimeError, match="TorchScript"):
        torch.jit.trace(crossent.CrossEntropyLoss(), (torch.randn(4, 5), torch.randint(0, 5, (4,))))


@pytest.mark.parametrize("kw, exc", [(dict(options="garbage"), TypeError), (dict(chunk_size=-3), ValueError)])
def test_p17_k_dim_linear_weight_validates_the_2d_options(kw, exc):
    x, W, t = torch.randn(5, 4), torch.randn(6, 3, 4), torch.randint(0, 6, (5, 3))
    with pytest.raises(exc):
        crossent.linear_cross_entropy(x, W, t, **kw)


@pytest.mark.parametrize("kw", [dict(chunk_size=2), dict(filter_eps=1e-3)])
def test_p17_k_dim_linear_weight_ignores_valid_2d_options_with_a_warning_as_torch(kw):
    """Issue 18: torch ignores its options for a K-dimensional linear_weight, with a warning; so does crossent
    (it refused them before), and the loss is torch's."""
    x, W, t = torch.randn(5, 4), torch.randn(6, 3, 4), torch.randint(0, 6, (5, 3))
    with pytest.warns(UserWarning, match="ignored"):
        got = crossent.linear_cross_entropy(x, W, t, **kw)
    torch.testing.assert_close(got, torch.nn.functional.linear_cross_entropy(x, W, t))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: crossent.LinearCrossEntropyLoss(chunk_size=0), ValueError, "chunk_size"),
    (lambda: crossent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), ignore_index=2**70), ValueError,
     "ignore_index"),
    (lambda: crossent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]),
                                    label_smoothing=torch.tensor(0.1, requires_grad=True)), TypeError, "label_smoothing"),
    (lambda: crossent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), num_items=True), ValueError, "num_items"),
])
def test_p18_argument_checks(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("impl", ["torch", "chunked", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_issue18_zero_classes_with_probabilities_are_torch_s(impl, reduction):
    """Issue 18: logits and probabilities with 0 classes give PyTorch's result (NaN mean, 0 sum, zeros),
    on every impl, with an empty gradient; class indices cannot be in range and are refused."""
    x = torch.randn(5, 0, dtype=torch.float64, requires_grad=True)
    q = torch.rand(5, 0, dtype=torch.float64)
    got = crossent.cross_entropy(x, q, impl=impl, reduction=reduction)
    ref = torch.nn.functional.cross_entropy(x, q, reduction=reduction)
    assert got.shape == ref.shape and torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.equal(got.nan_to_num(), ref.nan_to_num().abs())
    got.sum().backward()
    assert x.grad.shape == (5, 0)
    loss = crossent.CrossEntropyLoss(reduction=reduction, impl=impl)(torch.randn(3, 0, 4), torch.rand(3, 0, 4))
    assert loss.shape == torch.nn.functional.cross_entropy(torch.randn(3, 0, 4), torch.rand(3, 0, 4),
                                                           reduction=reduction).shape
    with pytest.raises(ValueError, match="0 classes"):
        crossent.cross_entropy(x, torch.zeros(5, dtype=torch.long), impl=impl)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("case", ["ce-none", "ce-sum", "ce-mean", "linear-sum", "linear-mean"])
def test_issue18_batched_gradients_over_the_fused_backward(impl, case):
    """Issue 18 item 4: vmap over the backward (is_grads_batched, as check_batched_grad does) reads no value
    of the incoming gradient on the host: each batched gradient equals the one computed alone."""
    kind, red = case.split("-")
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 6, (4,), generator=g)
    if kind == "ce":
        ins = [torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)]
        loss = crossent.cross_entropy(ins[0], y, impl=impl, reduction=red)
    else:
        ins = [torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True),
               torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)]
        loss = crossent.linear_cross_entropy(ins[0], ins[1], y, impl=impl, reduction=red)
    go = torch.randn((3,) + loss.shape, dtype=torch.float64, generator=g)
    batched = torch.autograd.grad(loss, ins, go, is_grads_batched=True, retain_graph=True)
    for j, b in enumerate(batched):
        alone = torch.stack([torch.autograd.grad(loss, ins, go[i], retain_graph=True)[j] for i in range(3)])
        torch.testing.assert_close(b, alone, rtol=1e-12, atol=1e-14)

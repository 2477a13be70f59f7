"""Target encodings: index, one-hot, probs, SparseTarget and auto detection."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import crossent
from crossent import SparseTarget
from oracle import EXACT_DTYPE, IMPLS, assert_close, assert_close64, loss_and_grad, torch_loss


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float64])
def test_seed_example_indices_and_one_hot_agree(impl, dtype):
    """Four images (no dog nor cat, dog, cat, cat): indices and one-hot give the same loss and grads."""
    dt = EXACT_DTYPE[impl]
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [-0.4, 0.2, 2.2], [0.0, 0.0, 0.5]], dtype=torch.float64)
    idx = torch.tensor([0, 1, 2, 2])
    one_hot = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]).to(dtype)
    fmt = "one_hot" if dtype.is_floating_point else "auto"
    w = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    for weight in (None, w):
        wt = None if weight is None else weight.to(dt)
        for ls in (0.0, 0.1):
            la, ga = loss_and_grad(lambda x: crossent.cross_entropy(x, idx, wt, label_smoothing=ls, impl=impl),
                                   logits.to(dt))
            lb, gb = loss_and_grad(lambda x: crossent.cross_entropy(x, one_hot, wt, label_smoothing=ls,
                                                                    target_format=fmt, impl=impl), logits.to(dt))
            le, ge = loss_and_grad(lambda x: torch.nn.functional.cross_entropy(x, idx, weight, label_smoothing=ls), logits)
            assert_close(la, le, dt)
            assert_close(lb, le, dt)
            assert_close(ga, ge, dt)
            assert_close(gb, ge, dt)
            assert torch.equal(la, lb) and torch.equal(ga, gb)


def test_float_one_hot_auto_is_probs_like_pytorch():
    """PyTorch's rule: a float target of the input's shape is probabilities (mean divides by N)."""
    x = torch.randn(4, 3, dtype=torch.float64)
    oh = torch.eye(3, dtype=torch.float64)[torch.tensor([0, 1, 2, 2])]
    w = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    a = crossent.cross_entropy(x, oh, w)
    assert_close64(a, torch.nn.functional.cross_entropy(x, oh, w))
    b = crossent.cross_entropy(x, oh, w, target_format="one_hot")
    assert_close64(b, torch.nn.functional.cross_entropy(x, torch.tensor([0, 1, 2, 2]), w))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_zero_one_hot_row_is_ignored(impl):
    dt = EXACT_DTYPE[impl]
    x = torch.randn(5, 4, dtype=torch.float64)
    oh = torch.zeros(5, 4, dtype=torch.long)
    oh[0, 1] = oh[2, 3] = oh[4, 0] = 1
    idx = torch.tensor([1, -100, 3, -100, 0])
    w = torch.rand(4, dtype=torch.float64) + 0.1
    for red in ("mean", "sum", "none"):
        la, ga = loss_and_grad(lambda x: crossent.cross_entropy(x, oh, w.to(dt), reduction=red, impl=impl), x.to(dt))
        le, ge = loss_and_grad(lambda x: torch.nn.functional.cross_entropy(x, idx, w, reduction=red), x)
        assert_close(la, le, dt)
        assert_close(ga, ge, dt)


@pytest.mark.parametrize("impl", IMPLS)
@given(N=st.integers(1, 6), C=st.integers(1, 12), k=st.integers(1, 4), ls=st.sampled_from([0.0, 0.2]),
       weighted=st.booleans(), reduction=st.sampled_from(["none", "mean", "sum"]), seed=st.integers(0, 10**6),
       layout=st.sampled_from(["2d", "last", "kdim"]))
def test_sparse_matches_dense_probs(impl, N, C, k, ls, weighted, reduction, seed, layout):
    g = torch.Generator().manual_seed(seed)
    if layout == "2d":
        shape, dim = (N, C), 1
    elif layout == "last":
        shape, dim = (N, 2, C), -1
    else:
        shape, dim = (N, C, 3), 1
    cdim = dim % len(shape)
    pos = shape[:cdim] + shape[cdim + 1:]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    idx = torch.randint(0, C, (*pos, k), generator=g)
    val = torch.rand((*pos, k), generator=g, dtype=torch.float64)
    pad = torch.rand((*pos, k), generator=g) < 0.25
    idx = torch.where(pad, torch.full_like(idx, -100), idx)
    dense = SparseTarget(idx, val).to_dense(C, dim=cdim)
    dt = EXACT_DTYPE[impl]
    st_ = SparseTarget(idx, val.to(dt))
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    go = torch.randn(pos, generator=g, dtype=torch.float64) if reduction == "none" else None
    la, ga = loss_and_grad(lambda x: crossent.cross_entropy(x, st_, None if w is None else w.to(dt),
                                                            reduction=reduction, label_smoothing=ls, dim=dim,
                                                            impl=impl), x.to(dt), None if go is None else go.to(dt))
    le, ge = loss_and_grad(lambda x: torch_loss(x, dense, w, reduction=reduction, label_smoothing=ls, dim=dim), x, go)
    assert_close(la, le, dt)
    assert_close(ga, ge, dt)


def test_sparse_custom_padding_index():
    x = torch.randn(3, 5, dtype=torch.float64)
    st_ = SparseTarget(torch.tensor([[0, 2], [1, -1], [-1, -1]]), torch.tensor([[0.5, 0.5], [1.0, 9.0], [3.0, 3.0]],
                                                                               dtype=torch.float64))
    dense = st_.to_dense(5, ignore_index=-1)
    assert_close64(crossent.cross_entropy(x, st_, ignore_index=-1, reduction="none"),
                   torch.nn.functional.cross_entropy(x, dense, reduction="none"))


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_is_never_densified(impl):
    """A huge class count with k=2 entries: a dense [N, C] target would not fit in the tracked budget."""
    from torch.utils._python_dispatch import TorchDispatchMode

    big = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor) and o.numel() >= 4 * 1000 and o.dtype.is_floating_point:
                    big.append(str(func))
            return out

    x = torch.randn(4, 1000, dtype=torch.float64)
    st_ = SparseTarget(torch.tensor([[1, 2]] * 4), torch.tensor([[0.5, 0.5]] * 4, dtype=torch.float64))
    with Watch():
        crossent.cross_entropy(x, st_, impl=impl)
    # whatever [N, C] tensors exist are the logits' own derived buffers, never a scatter of the target
    assert not any("scatter" in b or "zeros" in b for b in big), big


def test_auto_detection_rules():
    x = torch.randn(4, 3)
    from crossent.targets import normalize_target
    assert normalize_target(torch.tensor([0, 1, 2, 0]), x, 1, "auto", -100).source == "index"
    assert normalize_target(torch.rand(4, 3), x, 1, "auto", -100).source == "probs"
    assert normalize_target(torch.eye(3)[[0, 1, 2, 0]].long(), x, 1, "auto", -100).source == "one_hot"
    assert normalize_target(torch.eye(3)[[0, 1, 2, 0]].bool(), x, 1, "auto", -100).source == "one_hot"
    st_ = SparseTarget(torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1))
    assert normalize_target(st_, x, 1, "auto", -100).source == "sparse"
    # unbatched
    assert normalize_target(torch.tensor(2), x[0], 0, "auto", -100).source == "index"
    assert normalize_target(torch.tensor([0, 0, 1]), x[0], 0, "auto", -100).source == "one_hot"


@pytest.mark.parametrize("impl", IMPLS)
def test_dim_last_takes_btv_without_transpose_copy(impl):
    """[B, T, V] logits with [B, T] targets and dim=-1: same as PyTorch on the transposed input, no [B, T, V] copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    dt = EXACT_DTYPE[impl]
    x = torch.randn(2, 3, 50, dtype=torch.float64)
    t = torch.randint(0, 50, (2, 3))
    lo, go = loss_and_grad(lambda x: crossent.cross_entropy(x, t, dim=-1, impl=impl), x.to(dt))
    le, ge = loss_and_grad(lambda x: torch.nn.functional.cross_entropy(x.transpose(1, 2), t), x)
    assert_close(lo, le, dt)
    assert_close(go, ge, dt)

    copies = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if any(s in name for s in ("clone", "contiguous", "copy_", "_to_copy")):
                for a in args:
                    if isinstance(a, torch.Tensor) and a.numel() == x.numel():
                        copies.append(name)
            return func(*args, **(kwargs or {}))

    xr = x.to(dt).requires_grad_(True)
    with Watch():
        crossent.cross_entropy(xr, t, dim=-1, impl=impl).backward()
    assert not copies, copies


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_and_kdim_input(impl):
    """A non-contiguous [N, C] view and K-dimensional (N, C, d1, d2) input, against PyTorch."""
    dt = EXACT_DTYPE[impl]
    base = torch.randn(6, 20, dtype=torch.float64)
    x = base[:, ::2]  # class stride 2
    t = torch.randint(0, 10, (6,))
    lo, go = loss_and_grad(lambda a: crossent.cross_entropy(a[:, ::2], t, impl=impl, label_smoothing=0.1), base.to(dt))
    le, ge = loss_and_grad(lambda a: torch.nn.functional.cross_entropy(a[:, ::2], t, label_smoothing=0.1), base)
    assert_close(lo, le, dt)
    assert_close(go, ge, dt)
    xk = torch.randn(3, 5, 2, 4, dtype=torch.float64)
    tk = torch.randint(0, 5, (3, 2, 4))
    tk[0, 1, 2] = -100
    go_ = torch.randn(3, 2, 4, dtype=torch.float64)
    lo, go = loss_and_grad(lambda a: crossent.cross_entropy(a, tk, reduction="none", impl=impl, z_loss=0.1),
                           xk.to(dt), go_.to(dt))
    le, ge = loss_and_grad(lambda a: torch_loss(a, tk, reduction="none", z_loss=0.1), xk, go_)
    assert_close(lo, le, dt)
    assert_close(go, ge, dt)
    assert x.shape == (6, 10)


def test_sparse_target_to_moves_both_and_casts_values_only():
    st_ = SparseTarget(torch.tensor([[1, 2]]), torch.tensor([[0.25, 0.75]]))
    moved = st_.to("cpu", torch.float64)
    assert moved.indices.dtype == torch.int64 and moved.values.dtype == torch.float64
    assert torch.equal(moved.indices, st_.indices)
    assert st_.to(dtype=torch.float16).values.dtype == torch.float16
    assert torch.equal(st_.to_dense(4), torch.tensor([[0.0, 0.25, 0.75, 0.0]]))

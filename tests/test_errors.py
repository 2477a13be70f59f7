"""Errors that teach: ValueError/TypeError naming the argument, the values and the fix."""

import pytest
import torch

import crossent
from crossent import SparseTarget
from oracle import IMPLS


def raises(exc, *words, **call):
    fn = call.pop("fn", crossent.cross_entropy)
    args = call.pop("args")
    with pytest.raises(exc) as info:
        fn(*args, **call)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_index(impl):
    x = torch.randn(4, 3)
    raises(ValueError, "target 7", "position (2,)", "3 classes", args=(x, torch.tensor([0, 1, 7, 2])), impl=impl)
    raises(ValueError, "target -1", "position (0, 1)", "ignore_index=-1",
           args=(torch.randn(2, 3, 4), torch.tensor([[0, -1, 1, 2], [0, 0, 0, 0]])), impl=impl)


def test_float_targets_of_index_shape():
    raises(TypeError, "float32", "target.long()", args=(torch.randn(4, 3), torch.tensor([0.0, 1.0, 2.0, 2.0])))


def test_btc_logits_with_bt_targets():
    msg = raises(ValueError, "[8, 5, 100]", "[8, 5]", "pass dim=-1",
                 args=(torch.randn(8, 5, 100), torch.randint(0, 100, (8, 5))))
    assert "last dim" in msg


def test_multi_hot_one_hot():
    oh = torch.tensor([[1, 0, 0], [0, 1, 1]])
    raises(ValueError, "multi-label", "binary_cross_entropy_with_logits", "probs", "position (1,)",
           args=(torch.randn(2, 3), oh))
    raises(ValueError, "value 2", "0 and 1", args=(torch.randn(2, 3), torch.tensor([[2, 0, 0], [0, 1, 0]])))


@pytest.mark.parametrize("ls", [-0.1, 1.5, float("nan")])
def test_label_smoothing_range(ls):
    raises(ValueError, "label_smoothing", "[0, 1]", args=(torch.randn(2, 3), torch.tensor([0, 1])), label_smoothing=ls)


def test_unknown_reduction_and_format_and_impl():
    x, t = torch.randn(2, 3), torch.tensor([0, 1])
    raises(ValueError, "reduction='avg'", "'mean'", args=(x, t), reduction="avg")
    raises(ValueError, "target_format='onehot'", "'one_hot'", args=(x, t), target_format="onehot")
    raises(ValueError, "impl='cuda'", "'chunked'", args=(x, t), impl="cuda")


def test_weight_wrong_length_dtype_device():
    x, t = torch.randn(2, 3), torch.tensor([0, 1])
    raises(ValueError, "weight", "[4]", "3 classes", "length 3", args=(x, t), weight=torch.ones(4))
    raises(TypeError, "weight", "float()", args=(x, t), weight=torch.ones(3, dtype=torch.long))
    raises(ValueError, "weight", "meta", "input.device", args=(x, t), weight=torch.ones(3, device="meta"))


def test_ignore_index_with_probs():
    raises(ValueError, "ignore_index=0", "probability", args=(torch.randn(2, 3), torch.rand(2, 3)), ignore_index=0)


def test_nan_in_targets():
    p = torch.rand(2, 3)
    p[1, 2] = float("nan")
    raises(ValueError, "NaN", "(1, 2)", args=(torch.randn(2, 3), p))
    st_ = SparseTarget(torch.tensor([[0], [1]]), torch.tensor([[float("nan")], [1.0]]))
    raises(ValueError, "NaN", args=(torch.randn(2, 3), st_))


def test_other_bad_arguments():
    x, t = torch.randn(2, 3), torch.tensor([0, 1])
    raises(TypeError, "floating", args=(torch.tensor([[1, 2, 3]]), torch.tensor([0])))
    raises(ValueError, "z_loss", args=(x, t), z_loss=-1.0)
    raises(ValueError, "softcap", args=(x, t), softcap=0.0)
    raises(ValueError, "num_items", "'none'", args=(x, t), num_items=3, reduction="none")
    raises(ValueError, "num_items", args=(x, t), num_items=0)
    raises(ValueError, "dim=3", args=(x, t), dim=3)
    raises(ValueError, "inplace_backward", "impl='torch'", args=(x, t), impl="torch", inplace_backward=True)
    raises(ValueError, "SparseTarget", "[2, 3]", args=(x, SparseTarget(torch.zeros(3, 1).long(), torch.ones(3, 1))))
    raises(TypeError, "SparseTarget", args=(x, t), target_format="sparse")
    raises(TypeError, "integer", fn=SparseTarget, args=(torch.zeros(2, 1), torch.ones(2, 1)))
    raises(ValueError, "same shape", fn=SparseTarget, args=(torch.zeros(2, 1).long(), torch.ones(2, 2)))


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_targets_and_weights_that_require_grad_are_differentiated_not_refused(impl):
    """Issue 18 item 3: torch differentiates probability targets; such a call (and class weights that
    require grad) runs the reference, which differentiates them: the fused impls' refusal is gone."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    q = torch.softmax(torch.randn(4, 6, dtype=torch.float64, generator=g), 1).requires_grad_(True)
    got = torch.autograd.grad(crossent.cross_entropy(x, q, impl=impl, label_smoothing=0.1), (x, q))
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(x, q, label_smoothing=0.1), (x, q))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    w = torch.rand(6, dtype=torch.float64, generator=g).requires_grad_(True)
    y = torch.randint(0, 6, (4,), generator=g)
    got = torch.autograd.grad(crossent.cross_entropy(x, y, weight=w, impl=impl), (x, w))
    ref = torch.autograd.grad(crossent.cross_entropy(x, y, weight=w, impl="torch"), (x, w))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    h = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    got = torch.autograd.grad(crossent.linear_cross_entropy(h, W, q, impl=impl), (h, W, q))
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(h @ W.T, q), (h, W, q))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # in place cannot be had there: the error says why the reference runs
    with pytest.raises(ValueError, match="inplace_backward.*targets that require grad"):
        crossent.cross_entropy(x * 1.0, q, impl=impl, inplace_backward=True)


def test_never_mutates_inputs():
    x = torch.randn(6, 5, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 4, -100])
    p = torch.rand(6, 5)
    w = torch.rand(5)
    before = [x.detach().clone(), t.clone(), p.clone(), w.clone()]
    for impl in IMPLS:
        crossent.cross_entropy(x, t, w, impl=impl, label_smoothing=0.1, z_loss=0.1, softcap=2.0).backward()
        crossent.cross_entropy(x, p, w, impl=impl, label_smoothing=0.1).backward()
        crossent.cross_entropy(x, p, impl=impl).backward()
        if impl != "torch":
            x0 = x.detach().clone().requires_grad_()  # a leaf is refused: the logits are an operation's output
            crossent.cross_entropy(x0 * 1, p, impl=impl, inplace_backward=True).backward()
    for a, b in zip(before, [x.detach(), t, p, w]):
        assert torch.equal(a, b)


def test_no_assert_in_library_code():
    import pathlib
    import re

    root = pathlib.Path(crossent.__file__).parent
    for f in root.rglob("*.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            assert not re.match(r"\s*assert\b", line), f"{f}:{i} uses assert"


def test_checks_off_gives_nan_not_crash():
    prev = crossent.set_checks(False)
    try:
        for impl in IMPLS:
            loss = crossent.cross_entropy(torch.randn(3, 4), torch.tensor([0, 9, 1]), reduction="none", impl=impl)
            assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    finally:
        crossent.set_checks(prev)


@pytest.mark.parametrize("case", ["oob", "negative", "batch", "probs_shape", "float_index_shape", "weight_len",
                                  "label_smoothing", "int_input", "zero_dim", "k_dim"])
def test_errors_are_also_the_type_torch_raises(case):
    """Issue 18 item 6: code written for torch (``except RuntimeError:``, ``except IndexError:``) keeps
    working: each error is crossent's ValueError/TypeError and an instance of what torch raises there."""
    x, t, kw = torch.randn(3, 5), torch.tensor([0, 1, 2]), {}
    if case == "oob":
        t = torch.tensor([0, 1, 7])
    elif case == "negative":
        t = torch.tensor([0, 1, -3])
    elif case == "batch":
        t = torch.tensor([0, 1])
    elif case == "probs_shape":
        t = torch.rand(3, 4)
    elif case == "float_index_shape":
        t = torch.rand(3)
    elif case == "weight_len":
        kw = dict(weight=torch.ones(4))
    elif case == "label_smoothing":
        kw = dict(label_smoothing=1.2)  # raised at call time, as torch does
    elif case == "int_input":
        x = torch.randint(0, 3, (3, 5))
    elif case == "zero_dim":
        x, t = torch.tensor(1.0), torch.tensor(0)
    else:
        x, t = torch.randn(2, 5, 4), torch.randint(0, 5, (2, 3))
    with pytest.raises(Exception) as theirs:
        torch.nn.functional.cross_entropy(x, t, **kw)
    with pytest.raises((ValueError, TypeError)) as ours:
        crossent.cross_entropy(x, t, **kw)
    assert isinstance(ours.value, type(theirs.value)), (type(ours.value).__mro__, type(theirs.value))

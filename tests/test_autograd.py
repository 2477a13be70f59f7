"""Backward of the fused impls: scaling only, right for any grad_output, a loss
used twice, retain_graph, inplace_backward; second derivatives."""

import pytest
import torch
import torch.nn.functional as F

import crossent
from oracle import EXACT_DTYPE, IMPLS, assert_close, assert_close64


def _data(seed=0, N=12, C=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, dtype=dtype, generator=g) * 2
    t = torch.randint(0, C, (N,), generator=g)
    t[3] = -100
    return x, t


@pytest.mark.parametrize("impl", IMPLS)
def test_retain_graph_twice_gives_same_gradient(impl):
    dt = EXACT_DTYPE[impl]
    x, t = _data(dtype=dt)
    x.requires_grad_(True)
    loss = crossent.cross_entropy(x, t, impl=impl, label_smoothing=0.1)
    loss.backward(retain_graph=True)
    g1 = x.grad.clone()
    loss.backward()
    assert torch.equal(x.grad, 2 * g1)
    ref = x.detach().double().requires_grad_(True)
    torch.nn.functional.cross_entropy(ref, t, label_smoothing=0.1).backward()
    assert_close(g1, ref.grad, dt)


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_used_twice_and_scaled(impl):
    dt = EXACT_DTYPE[impl]
    x, t = _data(1, dtype=dt)
    x.requires_grad_(True)
    loss = crossent.cross_entropy(x, t, impl=impl)
    (3 * loss + loss * loss).backward()
    ref = x.detach().double().requires_grad_(True)
    lr = torch.nn.functional.cross_entropy(ref, t)
    (3 * lr + lr * lr).backward()
    assert_close(x.grad, ref.grad, dt)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("inplace", [False, True])
def test_reduction_none_non_uniform_grad(impl, inplace):
    dt = EXACT_DTYPE[impl]
    x, t = _data(2)
    go = torch.randn(12, dtype=torch.float64)
    a = x.to(dt, copy=True).requires_grad_(True)
    (crossent.cross_entropy(a * 1, t, reduction="none", impl=impl, inplace_backward=inplace) * go.to(dt)).sum().backward()
    b = x.clone().requires_grad_(True)
    (torch.nn.functional.cross_entropy(b, t, reduction="none") * go).sum().backward()
    assert_close(a.grad, b.grad, dt)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("kind", ["index", "probs", "sparse"])
def test_inplace_backward_writes_into_input_storage(impl, kind):
    x, t = _data(3, dtype=torch.float32)
    if kind == "probs":
        t = torch.softmax(torch.randn(12, 7), 1)
    elif kind == "sparse":
        t = crossent.SparseTarget(torch.stack([t.clamp(min=0), (t + 1).clamp(0, 6)], 1), torch.full((12, 2), 0.5))
    leaf = x.clone().requires_grad_(True)
    logits = leaf * 2  # a non-leaf activation, as in a model
    ptr = logits.data_ptr()
    loss = crossent.cross_entropy(logits, t, impl=impl, inplace_backward=True, label_smoothing=0.1, softcap=5.0)
    assert not torch.equal(logits.detach(), x * 2)  # the logits now hold the gradient
    loss.backward()
    ref = x.clone().requires_grad_(True)
    crossent.cross_entropy(ref * 2, t, impl="torch", label_smoothing=0.1, softcap=5.0).backward()
    assert torch.allclose(leaf.grad, ref.grad, atol=1e-6)
    assert logits.data_ptr() == ptr


def test_inplace_backward_errors_loudly_if_logits_were_saved():
    x, t = _data(4)
    leaf = x.clone().requires_grad_(True)
    logits = leaf * 1
    other = logits.exp()  # exp saves its output, not logits; square saves its input
    sq = logits.square()
    loss = crossent.cross_entropy(logits, t, impl="chunked", inplace_backward=True) + sq.sum() + other.sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_without_inplace_input_untouched_and_grad_not_aliased():
    x, t = _data(5)
    leaf = x.clone().requires_grad_(True)
    crossent.cross_entropy(leaf, t, impl="chunked").backward()
    assert torch.equal(leaf.detach(), x)
    assert leaf.grad.data_ptr() != leaf.data_ptr()


def test_create_graph_fused_raises_clearly_and_torch_impl_is_right():
    x, t = _data(6)
    for impl in ("chunked", "triton"):
        a = x.float().requires_grad_(True)
        loss = crossent.cross_entropy(a, t, impl=impl)
        with pytest.raises(RuntimeError, match="create_graph"):
            torch.autograd.grad(loss, a, create_graph=True)
    a = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(crossent.cross_entropy(a, t, impl="torch", label_smoothing=0.1), a, create_graph=True)
    (h,) = torch.autograd.grad(g.square().sum(), a)
    b = x.clone().requires_grad_(True)
    (gb,) = torch.autograd.grad(torch.nn.functional.cross_entropy(b, t, label_smoothing=0.1), b, create_graph=True)
    (hb,) = torch.autograd.grad(gb.square().sum(), b)
    assert_close64(h, hb)


def test_torch_impl_differentiates_weights_and_soft_targets():
    x, t = _data(7)
    w = (torch.rand(7, dtype=torch.float64) + 0.1).requires_grad_(True)
    p = torch.softmax(torch.randn(12, 7, dtype=torch.float64), 1).requires_grad_(True)
    (gw,) = torch.autograd.grad(crossent.cross_entropy(x, t, w, impl="torch"), w)
    w2 = w.detach().clone().requires_grad_(True)  # PyTorch does not differentiate weights: write it out
    valid = t != -100
    nll = -torch.log_softmax(x, 1)[valid].gather(1, t[valid, None]).squeeze(1)
    (gw2,) = torch.autograd.grad((w2[t[valid]] * nll).sum() / w2[t[valid]].sum(), w2)
    assert_close64(gw, gw2)
    (gp,) = torch.autograd.grad(crossent.cross_entropy(x, p, impl="torch"), p)
    p2 = p.detach().clone().requires_grad_(True)
    (gp2,) = torch.autograd.grad(torch.nn.functional.cross_entropy(x, p2), p2)
    assert_close64(gp, gp2)


@pytest.mark.parametrize("impl", IMPLS)
def test_num_items_all_ignored_microbatch(impl):
    x, _ = _data(8, dtype=EXACT_DTYPE[impl])
    x.requires_grad_(True)
    t = torch.full((12,), -100)
    loss = crossent.cross_entropy(x, t, num_items=5, impl=impl, z_loss=1e-3)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x.grad).all() and not x.grad.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_accumulation_with_num_items_equals_full_batch(impl):
    dt = EXACT_DTYPE[impl]
    x, t = _data(9, N=20)
    t[[0, 5, 6, 17]] = -100
    total = int((t != -100).sum())
    a = x.to(dt, copy=True).requires_grad_(True)
    for sl in (slice(0, 7), slice(7, 20)):
        crossent.cross_entropy(a[sl], t[sl], num_items=torch.tensor(total), impl=impl).backward()
    b = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(b, t).backward()
    assert_close(a.grad, b.grad, dt)


@pytest.mark.parametrize("impl", IMPLS)
def test_return_extras(impl):
    dt = EXACT_DTYPE[impl]
    x, t = _data(10)
    x = x.reshape(3, 4, 7)
    t = t.reshape(3, 4)
    loss, ex = crossent.cross_entropy(x.to(dt), t, dim=-1, z_loss=0.01, softcap=5.0, return_extras=True, impl=impl)
    capped = 5.0 * torch.tanh(x / 5.0)
    lse = torch.logsumexp(capped, -1)
    assert_close(ex["lse"], lse, dt)
    assert torch.equal(ex["predicted"], x.argmax(-1))
    assert_close(ex["z_loss"], 0.01 * lse.square() * (t != -100), dt)
    assert ex["lse"].shape == t.shape and not ex["lse"].requires_grad


def test_module_used_in_a_training_step_matches_torch():
    torch.manual_seed(0)
    net = torch.nn.Linear(10, 4).double()
    ref = torch.nn.Linear(10, 4).double()
    ref.load_state_dict(net.state_dict())
    x = torch.randn(16, 10, dtype=torch.float64)
    t = torch.randint(0, 4, (16,))
    crossent.CrossEntropyLoss(label_smoothing=0.1)(net(x), t).backward()
    torch.nn.CrossEntropyLoss(label_smoothing=0.1)(ref(x), t).backward()
    assert_close64(net.weight.grad, ref.weight.grad)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_no_grad_does_no_gradient_work(impl, monkeypatch):
    # under torch.no_grad a leaf that requires grad gets no gradient: the fused forward must not
    # form one (no [N, C] buffer, no matmuls for dX/dW), nor write over the logits with inplace_backward
    x = torch.randn(6, 9, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    before = x.detach().clone()
    with torch.no_grad():
        got = crossent.cross_entropy(x, t, impl=impl, inplace_backward=True)
    assert torch.equal(x.detach(), before)
    assert_close(got, F.cross_entropy(x.detach().double(), t), torch.float32)
    if impl != "chunked":
        return
    import crossent.impl.chunked as chunked

    seen = []
    real = chunked.linear_cross_entropy

    def spy(x2, row_ids, lw, lb, tgt, opts, red, want_grads, row_scale=None):
        seen.append(want_grads)
        return real(x2, row_ids, lw, lb, tgt, opts, red, want_grads, row_scale)

    monkeypatch.setattr(chunked, "linear_cross_entropy", spy)
    W = torch.randn(13, 9, requires_grad=True)
    with torch.no_grad():
        lo = crossent.linear_cross_entropy(x, W, t, impl="chunked")
    assert seen == [(False, False, False)]
    assert_close(lo, F.cross_entropy(x.detach().double() @ W.detach().double().T, t), torch.float32)
    crossent.linear_cross_entropy(x, W, t, impl="chunked").backward()
    assert seen[-1] == (True, True, False) and x.grad is not None and W.grad is not None

"""torch.compile: the fused autograd functions trace without a graph break and
give the eager gradients (CPU, chunked impl; aot_eager keeps the test fast)."""

import pytest
import torch
import torch._dynamo

import crossent
from oracle import assert_close


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    prev = crossent.set_checks(False)  # value checks read the data: a graph break by design
    yield
    crossent.set_checks(prev)
    torch._dynamo.reset()


def _grads(fn, *inputs, go=None):
    ins = [i.detach().clone().requires_grad_(True) for i in inputs]
    out = fn(*ins)
    grads = torch.autograd.grad(out, ins, torch.ones_like(out) if go is None else go)
    return (out.detach(), *grads)


@pytest.mark.parametrize("kw", [dict(label_smoothing=0.1, weight=torch.rand(7) + 0.1),
                                dict(z_loss=1e-3, reduction="none", softcap=3.0),
                                dict(inplace_backward=True, num_items=9)])
def test_cross_entropy_fullgraph(kw):
    x = torch.randn(6, 4, 7)
    t = torch.randint(0, 7, (6, 4))
    t[0, 0] = -100

    def f(x):
        return crossent.cross_entropy(x * 1, t, dim=-1, impl="chunked", **kw)

    explain = torch._dynamo.explain(f)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = _grads(torch.compile(f, backend="aot_eager", fullgraph=True), x)
    eager_kw = {k: v for k, v in kw.items() if k != "inplace_backward"}
    ref = _grads(lambda a: crossent.cross_entropy(a * 1, t, dim=-1, impl="torch", **eager_kw), x)
    for a, b in zip(compiled, ref):
        assert_close(a, b.double(), torch.float32)


def test_linear_cross_entropy_fullgraph_and_none():
    h = torch.randn(2, 6, 8)
    W = torch.randn(11, 8)
    t = torch.randint(0, 11, (2, 6))
    for reduction, fullgraph in (("mean", True), ("none", False)):
        def f(h, W):
            return crossent.linear_cross_entropy(h, W, t, shift=True, label_smoothing=0.1, reduction=reduction,
                                                 impl="chunked").sum()

        compiled = _grads(torch.compile(f, backend="aot_eager", fullgraph=fullgraph), h, W)
        ref = _grads(lambda h, W: crossent.linear_cross_entropy(h, W, t, shift=True, label_smoothing=0.1,
                                                                reduction=reduction, impl="torch").sum(), h, W)
        for a, b in zip(compiled, ref):
            assert_close(a, b.double(), torch.float32)


def test_inductor_compiles_a_model_with_the_loss():
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    loss_fn = crossent.CrossEntropyLoss(label_smoothing=0.1, impl="chunked")
    x = torch.randn(32, 5)
    t = torch.nn.functional.one_hot(torch.randint(0, 4, (32,)), 4)

    def step(x):
        return loss_fn(model(x), t)

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), t.argmax(1), label_smoothing=0.1).backward()
    for a, p in zip(got, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_inductor_compiles_linear_cross_entropy():
    # eager CPU float32 routes the chunk GEMMs through oneDNN; inductor must get plain matmuls
    x = torch.randn(70, 16, requires_grad=True)
    W = torch.randn(301, 16, requires_grad=True)
    t = torch.randint(0, 301, (70,))
    compiled = torch.compile(lambda x, W: crossent.linear_cross_entropy(x, W, t, impl="chunked", chunk_size=32),
                             fullgraph=True)
    got = _grads(compiled, x, W)
    ref = _grads(lambda x, W: torch.nn.functional.cross_entropy(x.double() @ W.double().T, t), x, W)
    for a, b in zip(got, ref):
        assert_close(a, b, torch.float32)

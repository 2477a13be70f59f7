"""GPU checks (skipped without CUDA): the triton impl against a float64 oracle
in bfloat16, float16 and float32, no host sync with checks off, large shapes."""

import pytest
import torch

import crossent
from oracle import assert_no_worse, loss_and_grad, torch_loss

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["index", "probs", "sparse"])
@pytest.mark.parametrize("C", [3, 507, 4097, 32000])
def test_triton_no_worse_than_torch(dtype, kind, C):
    g = torch.Generator().manual_seed(C)
    x = (torch.randn(257, C, generator=g) * 4).cuda()
    if kind == "index":
        t = torch.randint(0, C, (257,), generator=g).cuda()
        t[::7] = -100
        t_exact = t
    elif kind == "probs":
        t = torch.softmax(torch.randn(257, C, generator=g).cuda() * 3, 1)
        t_exact = t.double()
        t = t.to(dtype)
    else:
        k = min(8, C)
        idx = torch.randint(0, C, (257, k), generator=g).cuda()
        val = torch.rand(257, k, generator=g).cuda()
        t = crossent.SparseTarget(idx, val)
        t_exact = t.to_dense(C).double()
    w = (torch.rand(C, generator=g) + 0.1).cuda()
    kw = dict(label_smoothing=0.1, weight=w)
    xd = x.to(dtype)
    lo, go = loss_and_grad(lambda a: crossent.cross_entropy(a, t, impl="triton", **kw), xd)
    tt = t if kind != "sparse" else t.to_dense(C).to(dtype)
    lt, gt = loss_and_grad(lambda a: torch_loss(a, tt, **kw), xd)
    le, ge = loss_and_grad(lambda a: torch_loss(a, t_exact, w.double(), label_smoothing=0.1), xd.double())
    assert_no_worse(lo, lt, le, dtype, "loss")
    assert_no_worse(go, gt, ge, dtype, "grad")


@cuda
def test_no_host_sync_with_checks_off():
    x = torch.randn(512, 1000, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (512,), device="cuda")
    p = torch.softmax(torch.randn(512, 1000, device="cuda"), 1)
    W = torch.randn(1000, 64, device="cuda", requires_grad=True)
    h = torch.randn(4, 128, 64, device="cuda", requires_grad=True)
    calls = [
        lambda: crossent.cross_entropy(x, t, impl="triton", z_loss=1e-4, label_smoothing=0.1),
        lambda: crossent.cross_entropy(x, t, impl="triton", num_items=700),
        lambda: crossent.cross_entropy(x, p, impl="triton"),
        lambda: crossent.linear_cross_entropy(h, W, t.reshape(4, 128), impl="triton", shift=True),
    ]
    prev = crossent.set_checks(False)
    try:
        for call in calls:  # compile the kernels first
            call().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for call in calls:
                call().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        crossent.set_checks(prev)


@cuda
def test_out_of_range_with_checks_off_is_nan_not_device_assert():
    prev = crossent.set_checks(False)
    try:
        loss = crossent.cross_entropy(torch.randn(3, 5, device="cuda"), torch.tensor([0, 9, 1], device="cuda"),
                                      reduction="none", impl="triton")
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    finally:
        crossent.set_checks(prev)


@cuda
def test_int64_offsets_past_2_31():
    N, C = 16400, 131072  # N*C > 2**31
    x = torch.randn(N, C, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, C, (N,), device="cuda")
    a = crossent.cross_entropy(x, t, impl="triton", reduction="none")
    b = torch.nn.functional.cross_entropy(x.float(), t, reduction="none")
    assert torch.allclose(a.float(), b, atol=2e-2)
    del x


@cuda
def test_auto_picks_triton_on_cuda():
    from crossent.impl.registry import resolve

    assert resolve("auto", torch.device("cuda"), torch.float32).name == "triton"
    assert resolve("auto", torch.device("cuda"), torch.float64).name == "chunked"


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_linear_no_worse_than_torch(dtype):
    g = torch.Generator().manual_seed(0)
    N, H, V = 300, 256, 5000
    x = (torch.randn(N, H, generator=g) / 4).cuda()
    W = (torch.randn(V, H, generator=g) / 4).cuda()
    t = torch.randint(0, V, (N,), generator=g).cuda()
    t[::9] = -100

    def run(fn, *ts):
        ts = [a.detach().clone().requires_grad_(True) for a in ts]
        loss = fn(*ts)
        return (loss.detach(), *torch.autograd.grad(loss, ts))

    ours = run(lambda a, b: crossent.linear_cross_entropy(a, b, t, impl="triton", label_smoothing=0.1),
               x.to(dtype), W.to(dtype))
    theirs = run(lambda a, b: torch.nn.functional.cross_entropy(a @ b.T, t, label_smoothing=0.1),
                 x.to(dtype), W.to(dtype))
    exact = run(lambda a, b: torch.nn.functional.cross_entropy(a @ b.T, t, label_smoothing=0.1),
                x.double(), W.double())
    for o, th, e in zip(ours, theirs, exact):
        assert_no_worse(o, th, e, dtype, factor=4)


@cuda
@pytest.mark.parametrize("dynamic", [None, True])
def test_inductor_sees_the_triton_kernels(dynamic):
    """torch.compile(fullgraph=True) with checks on, through the ``triton_op``s: inductor's graph calls
    crossent's kernels (no opaque op), bf16 loss and gradients within torch's error, varying N."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    V, H = 4096, 256
    W = (torch.randn(V, H, device="cuda") / 16).bfloat16().requires_grad_(True)

    def step(h, y):
        logits = h @ W.T
        return crossent.cross_entropy(logits, y, label_smoothing=0.1, impl="triton") + \
            crossent.linear_cross_entropy(h, W, y, z_loss=1e-4, impl="triton")

    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=cnt, fullgraph=True, dynamic=dynamic)
    for n in (512, 640, 1000):
        h = torch.randn(n, H, device="cuda").bfloat16().requires_grad_(True)
        y = torch.randint(0, V, (n,), device="cuda")
        lo, go = loss_and_grad(lambda a: compiled(a, y), h)
        le, ge = loss_and_grad(lambda a: torch_loss(a @ W.double().T, y, label_smoothing=0.1)
                               + torch_loss(a @ W.double().T, y, z_loss=1e-4), h.double())
        lt, gt = loss_and_grad(lambda a: torch_loss(a @ W.T, y, label_smoothing=0.1)
                               + torch_loss(a @ W.T, y, z_loss=1e-4), h)
        assert_no_worse(lo, lt, le, torch.bfloat16, f"n={n} loss", factor=4.0)
        assert_no_worse(go, gt, ge, torch.bfloat16, f"n={n} grad", factor=4.0)
    assert sum(1 for g in cnt.graphs if len(g.graph.nodes)) <= (1 if dynamic else 2)
    from torch._inductor.utils import run_and_get_code

    _, code = run_and_get_code(compiled, h, y)
    assert any("ce_fwd_kernel" in c for c in code) and any("lce_fwd_kernel" in c for c in code)
    torch._dynamo.reset()


@cuda
def test_opcheck_triton_ops():
    """``torch.library.opcheck`` on the traced triton ops (fake = the launcher under fake tensors)."""
    from crossent.functional import _Logits
    from crossent.ops.custom import OPS, _pack
    from crossent.options import make_options
    from crossent.reduction import plan_reduction
    from crossent.targets import normalize_target

    for reduction in ("mean", "none"):
        x = torch.randn(64, 300, device="cuda", requires_grad=True)
        t = torch.randint(0, 300, (64,), device="cuda")
        opts = make_options(classes=300, device=x.device, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                            return_extras=True)
        tgt = normalize_target(t, x, 1, "auto", -100)
        red = plan_reduction(tgt, opts, torch.float32, x.device, torch.Size([64]), torch.float32)
        torch.library.opcheck(OPS["cross_entropy_triton"], (x.reshape(64, 300, 1),), dict(**_pack(tgt, opts, red),
                                                                                         want_grad=True))
        h = torch.randn(64, 128, device="cuda", requires_grad=True)
        W = torch.randn(300, 128, device="cuda", requires_grad=True)
        tgt = normalize_target(t, _Logits((64, 300), h.device), 1, "auto", -100)
        torch.library.opcheck(OPS["linear_cross_entropy_triton"], (h, W, None, None),
                              dict(**_pack(tgt, opts, red), chunk_size=None, filter_eps=None, want_dx=True,
                                   want_dw=True, want_db=False, row_scale=None))

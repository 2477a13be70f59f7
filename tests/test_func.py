"""torch.func: grad, vmap, jacrev, jacfwd, hessian and their compositions give PyTorch's results on
every impl (under a transform every impl resolves to the reference, which the transforms can see
into), for both functions, every target kind, in float64."""

import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, vmap

import crossent
from crossent import SparseTarget
from crossent.impl.registry import resolve
from oracle import assert_close64

F = torch.nn.functional
D = torch.float64
C = 6


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, C, generator=g, dtype=D)
    t = torch.randint(0, C, (4,), generator=g)
    t[1] = -100
    p = torch.softmax(torch.randn(4, C, generator=g, dtype=D), -1)
    idx = torch.randint(0, C, (4, 2), generator=g)
    sp = SparseTarget(idx, torch.rand(4, 2, generator=g, dtype=D))
    w = torch.linspace(0.5, 2.0, C, dtype=D)
    return x, t, p, sp, w


def _cases():
    x, t, p, sp, w = _data()
    dense_sp = sp.to_dense(C)
    tc = t.clamp(min=0)
    Wl = x.T @ x / 4  # a [C, C] projection
    # (name, ours(impl) -> tensor, torch's)
    return [
        ("grad index smoothing weight",
         lambda impl: grad(lambda a: crossent.cross_entropy(a, t, w, label_smoothing=0.1, impl=impl))(x),
         grad(lambda a: F.cross_entropy(a, t, w, label_smoothing=0.1))(x)),
        ("grad probs", lambda impl: grad(lambda a: crossent.cross_entropy(a, p, impl=impl))(x),
         grad(lambda a: F.cross_entropy(a, p))(x)),
        ("grad sparse", lambda impl: grad(lambda a: crossent.cross_entropy(a, sp, impl=impl))(x),
         grad(lambda a: F.cross_entropy(a, dense_sp))(x)),
        ("grad one-hot", lambda impl: grad(lambda a: crossent.cross_entropy(a, F.one_hot(tc, C), impl=impl))(x),
         grad(lambda a: F.cross_entropy(a, tc))(x)),
        ("vmap per-sample loss", lambda impl: vmap(lambda a, b: crossent.cross_entropy(a, b, impl=impl))(x, tc),
         vmap(lambda a, b: F.cross_entropy(a, b))(x, tc)),
        ("vmap probs", lambda impl: vmap(lambda a, b: crossent.cross_entropy(a, b, impl=impl, label_smoothing=0.2))(x, p),
         vmap(lambda a, b: F.cross_entropy(a, b, label_smoothing=0.2))(x, p)),
        ("vmap(grad) per-sample gradients",
         lambda impl: vmap(grad(lambda a, b: crossent.cross_entropy(a, b, impl=impl)))(x, tc),
         vmap(grad(lambda a, b: F.cross_entropy(a, b)))(x, tc)),
        ("jacrev reduction none",
         lambda impl: jacrev(lambda a: crossent.cross_entropy(a, t, reduction="none", impl=impl))(x),
         jacrev(lambda a: F.cross_entropy(a, t, reduction="none"))(x)),
        ("jacfwd mean", lambda impl: jacfwd(lambda a: crossent.cross_entropy(a, t, w, impl=impl))(x),
         jacfwd(lambda a: F.cross_entropy(a, t, w))(x)),
        ("hessian probs", lambda impl: hessian(lambda a: crossent.cross_entropy(a, p[:2], impl=impl))(x[:2]),
         hessian(lambda a: F.cross_entropy(a, p[:2]))(x[:2])),
        ("grad of the target (soft labels)",
         lambda impl: grad(lambda q: crossent.cross_entropy(x, q, impl=impl), argnums=0)(p),
         grad(lambda q: F.cross_entropy(x, q))(p)),
        ("grad linear_cross_entropy in hidden and weight",
         lambda impl: torch.cat([g.reshape(-1) for g in grad(
             lambda h, W: crossent.linear_cross_entropy(h, W, t, label_smoothing=0.1, impl=impl), argnums=(0, 1))(
             x, x.T @ x / 4)]),
         torch.cat([g.reshape(-1) for g in grad(
             lambda h, W: F.cross_entropy(h @ W.T, t, label_smoothing=0.1), argnums=(0, 1))(x, x.T @ x / 4)])),
        ("vmap linear_cross_entropy over sequences",
         lambda impl: vmap(lambda h, y: crossent.linear_cross_entropy(h, Wl, y, shift=True, impl=impl))(
             x.reshape(2, 2, C), tc.reshape(2, 2)),
         vmap(lambda h, y: F.cross_entropy(h[:-1] @ Wl.T, y[1:]))(x.reshape(2, 2, C), tc.reshape(2, 2))),
        ("jacrev linear_cross_entropy z-loss",
         lambda impl: jacrev(lambda h: crossent.linear_cross_entropy(h, torch.eye(C, dtype=D), t, z_loss=1e-2,
                                                                     reduction="none", impl=impl))(x),
         jacrev(lambda h: F.cross_entropy(h, t, reduction="none")
                + 1e-2 * torch.logsumexp(h, -1).square() * (t != -100))(x)),
    ]


@pytest.mark.parametrize("impl", ["auto", "torch", "chunked", "triton"])
def test_transforms_match_torch(impl):
    for name, ours, theirs in _cases():
        assert_close64(ours(impl), theirs, name)


def test_inplace_backward_under_vmap_is_ignored():
    """Under a transform nothing is written in place (the reference runs): the input keeps its values."""
    x, t, *_ = _data()
    t = t.clamp(min=0)
    before = x.clone()
    got = vmap(grad(lambda a, b: crossent.cross_entropy(a * 1, b, inplace_backward=True)))(x, t)
    assert torch.equal(x, before)
    assert_close64(got, vmap(grad(lambda a, b: F.cross_entropy(a, b)))(x, t))


def test_a_bad_label_under_vmap_is_nan_not_an_error():
    """The value checks cannot read a batched tensor: a bad label gives NaN at its position."""
    x, *_ = _data()
    bad = torch.tensor([0, 9, 2, 3])
    got = vmap(lambda a, b: crossent.cross_entropy(a, b))(x, bad)
    assert torch.isnan(got[1]) and torch.isfinite(got[[0, 2, 3]]).all()
    with pytest.raises(ValueError, match="out of range"):
        crossent.cross_entropy(x, bad)


def test_registry_names_the_transform():
    seen = []
    grad(lambda a: seen.append(resolve("chunked", a.device, a.dtype)) or a.sum())(torch.ones(2))
    assert seen[0].name == "torch" and seen[0].transformed and "torch.func" in seen[0].reason
    assert resolve("chunked", torch.device("cpu"), D).name == "chunked"  # outside a transform: as asked


@pytest.mark.parametrize("impl", ["auto", "chunked", "torch"])
def test_forward_mode_ad(impl):
    """``torch.autograd.forward_ad`` (dual tensors): the reference runs, torch's tangents."""
    import torch.autograd.forward_ad as fwAD

    x, t, p, _, w = _data()
    v = torch.linspace(-1, 1, x.numel(), dtype=D).reshape(x.shape)
    W = x.T @ x / 4
    with fwAD.dual_level():
        d = fwAD.make_dual(x, v)
        for ours, theirs in ((crossent.cross_entropy(d, t, w, label_smoothing=0.1, impl=impl),
                              F.cross_entropy(d, t, w, label_smoothing=0.1)),
                             (crossent.cross_entropy(d, p, impl=impl), F.cross_entropy(d, p)),
                             (crossent.linear_cross_entropy(d, W, t, impl=impl), F.cross_entropy(d @ W.T, t))):
            assert_close64(fwAD.unpack_dual(ours).tangent, fwAD.unpack_dual(theirs).tangent, "tangent")
            assert_close64(fwAD.unpack_dual(ours).primal, fwAD.unpack_dual(theirs).primal, "primal")


def test_overwritten_logits_are_refused_under_a_transform():
    """Logits that an eager ``inplace_backward`` call overwrote hold a gradient: a later call under
    ``grad`` (which sees them through its wrapper) raises as an eager call does."""
    x, t, *_ = _data()
    y = x.clone().requires_grad_(True) * 1
    crossent.cross_entropy(y, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        grad(lambda a: crossent.cross_entropy(a, t))(y.detach())

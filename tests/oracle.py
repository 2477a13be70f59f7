"""Independent oracles: PyTorch's own cross_entropy in float64, composed for
what PyTorch lacks (one-hot, sparse, z-loss, softcap, num_items)."""

import torch
import torch.nn.functional as F


def f64(t):
    return None if t is None else t.detach().double()


def torch_loss(x, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, dim=1,
               z_loss=0.0, softcap=None, num_items=None):
    """The loss by PyTorch ops on x (differentiable in x), classes at ``dim``."""
    cdim = 0 if x.dim() == 1 else dim % x.dim()
    xm = x.movedim(cdim, 1) if x.dim() > 1 else x
    if softcap is not None:
        xm = softcap * torch.tanh(xm / softcap)
    tm = target
    if target.dtype.is_floating_point and target.dim() > 1:
        tm = target.movedim(cdim, 1)
    elif not target.dtype.is_floating_point:
        tm = target.long()
    red = "sum" if num_items is not None else reduction
    w = None if weight is None else weight.to(xm.dtype)
    loss = F.cross_entropy(xm, tm, weight=w, ignore_index=ignore_index, reduction=red,
                           label_smoothing=label_smoothing)
    if z_loss:
        lse = torch.logsumexp(xm, dim=1 if x.dim() > 1 else 0)
        if target.dtype.is_floating_point:
            valid = torch.ones_like(lse, dtype=torch.bool)
        else:
            valid = tm != ignore_index
        z = z_loss * lse.square() * valid
        if reduction == "none" and num_items is None:
            loss = loss + z
        elif num_items is not None or reduction == "sum":
            loss = loss + z.sum()
        else:
            loss = loss + z.sum() / valid.sum().clamp(min=1)  # all ignored: the CE part is NaN already
    if num_items is not None:
        loss = loss / num_items
    return loss


def loss_and_grad(fn, x, grad_out=None):
    """(loss, d loss / d x) with an optional incoming gradient."""
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    (g,) = torch.autograd.grad(loss, x, go)
    return loss.detach(), g


def err(a, b):
    """Max absolute error of a against the float64 oracle b (NaN-aware: NaN matches NaN)."""
    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    same_inf = torch.isinf(a) & (a == b)
    d = (a - b).abs()
    d = torch.where(both_nan | same_inf, torch.zeros_like(d), d)
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    return float(d.max()) if d.numel() else 0.0


EPS = {torch.float64: 2.2e-16, torch.float32: 1.2e-7, torch.float16: 9.8e-4, torch.bfloat16: 7.8e-3}


def assert_no_worse(ours, theirs, exact, dtype, what="loss", factor=2.0):
    """ours' error against the float64 oracle is at most ``factor`` times PyTorch's (plus a few ulps)."""
    e_ours, e_theirs = err(ours, exact), err(theirs, exact)
    scale = float(exact.double().abs().nan_to_num(0, 0, 0).max()) if exact.numel() else 0.0
    slack = 8 * EPS[dtype] * max(1.0, scale)
    assert e_ours <= factor * e_theirs + slack, f"{what}: ours err {e_ours:.3g} vs torch err {e_theirs:.3g} (slack {slack:.3g})"


def assert_close64(ours, exact, what="loss", rtol=1e-10):
    ours, exact = ours.double(), exact.double()
    scale = float(exact.abs().nan_to_num(0, 0, 0).max()) if exact.numel() else 0.0
    e = err(ours, exact)
    assert e <= rtol * max(1.0, scale), f"{what}: error {e:.3g} exceeds {rtol} x {max(1.0, scale):.3g}"


IMPLS = ["torch", "chunked", "triton"]
# The triton kernels accumulate in float32 (float64 input is routed to chunked), and the
# interpreter has no float64 math worth testing: their exactness tests run in float32.
EXACT_DTYPE = {"torch": torch.float64, "chunked": torch.float64, "triton": torch.float32}
RTOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 3e-2}


def assert_close(ours, exact, dtype, what="loss"):
    """float64: 1e-10 relative to the largest magnitude; float32: a few hundred ulps."""
    assert_close64(ours, exact, what, rtol=RTOL[dtype])

"""Autograd for the fused impls: the forward computes the gradient, the
backward only scales it by the incoming gradient.

Memory: the saved gradient is the only ``[N, C]`` tensor. When autograd will
free the graph after this backward (the usual ``loss.backward()``), the
gradient is scaled in place and handed on, so no second ``[N, C]`` buffer is
made; with ``retain_graph=True`` it is kept intact and a scaled copy is
returned, so a second backward is still right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .._reduce import reduce_rows
from ..impl._terms import host_reads_free


def keep_graph() -> bool:
    """Whether the running backward keeps the graph (``retain_graph``); True if unknown."""
    if torch.compiler.is_compiling():
        return True
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if getter is None:
        return True
    try:
        return bool(getter())
    except RuntimeError:
        return True


_HUGE_MIN_BYTES = 64 << 20


def _advise_huge_pages(t: Tensor) -> None:
    """Ask Linux for transparent huge pages on a large fresh CPU buffer.

    A new ``[N, C]`` gradient is first touched page by page; with 4 KiB pages
    those faults cost as much as the softmax itself. Where THP is in
    ``madvise`` mode, 2 MiB pages cut them 512-fold. Harmless elsewhere.
    """
    if t.device.type != "cpu" or t.numel() * t.element_size() < _HUGE_MIN_BYTES or not _libc():
        return
    huge = 2 << 20
    start = (t.data_ptr() + huge - 1) // huge * huge
    end = (t.data_ptr() + t.numel() * t.element_size()) // huge * huge
    if end > start:
        _libc().madvise(start, end - start, 14)  # MADV_HUGEPAGE


_LIBC = []


def _libc():
    if not _LIBC:
        lib = None
        try:
            import ctypes
            import sys

            if sys.platform.startswith("linux"):
                lib = ctypes.CDLL(None, use_errno=True)
                lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                lib.madvise.restype = ctypes.c_int
        except (OSError, AttributeError):
            lib = None
        _LIBC.append(lib)
    return _LIBC[0]


@dataclass
class FusedCall:
    """Everything the fused forward needs besides the logits."""

    kernel: Callable  # (x3, grad3 or None) -> (ce, z, lse, predicted)
    shape3: tuple  # (P, C, Q)
    reduction: str
    ce_denom: Optional[Tensor]
    z_denom: Optional[Tensor]
    pos_shape: torch.Size
    cdim: int
    inplace: bool
    impl_name: str
    grad_enabled: bool = True  # torch.is_grad_enabled() at the call: no gradient work under no_grad


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, call: FusedCall):
        x3 = input.reshape(call.shape3)
        grad = grad3 = None
        traced = torch.compiler.is_compiling()
        if ctx.needs_input_grad[0] and call.grad_enabled:
            if call.inplace and not traced and x3.untyped_storage().data_ptr() == input.untyped_storage().data_ptr():
                grad, grad3 = input.detach(), x3  # x3 is a view of the input: write the gradient over it
            else:
                grad = torch.empty(input.shape, dtype=input.dtype, device=input.device)
                if not traced:
                    _advise_huge_pages(grad)
                grad3 = grad.view(call.shape3)
        ce, z, lse, pred = call.kernel(x3, grad3)
        loss = reduce_rows(ce, z, call.reduction, call.ce_denom, call.z_denom, call.pos_shape, input.dtype)
        if grad3 is x3:
            torch.autograd.graph.increment_version(input)  # anything that saved the logits now errors, not misleads
        save_gradients(ctx, "grad", grad)
        ctx.call = call
        return with_extras(ctx, loss, lse, z, pred)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        call: FusedCall = ctx.call
        refuse_double_backward(f"impl={call.impl_name!r}")
        go = grad_loss
        if call.reduction == "none" and call.ce_denom is None and go.dim() > 0:
            go = go.unsqueeze(call.cdim)
        (grad,) = release_scaled(ctx, "grad", go)
        return grad, None


def with_extras(ctx, loss: Tensor, lse: Tensor, z: Optional[Tensor], pred: Optional[Tensor]):
    """The forward's outputs: the loss, then the per-position extras (not differentiable)."""
    zrows = z if z is not None else torch.zeros_like(lse)
    ctx.mark_non_differentiable(lse, zrows, *(() if pred is None else (pred,)))
    return loss, lse, zrows, pred


def refuse_double_backward(what: str) -> None:
    """The fused impls form their gradient in the forward: no second derivative."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"crossent: {what} computes its gradient during the forward and cannot give a second derivative "
            "(backward with create_graph=True); use impl='torch' for double backward")


def save_gradients(ctx, attr: str, grads) -> None:
    """Keep the gradients formed in the forward for the backward.

    Eagerly they are a plain attribute, so that the backward can release them
    and scale them in place (no second copy). Under torch.compile they are
    saved tensors, which the compiler traces and plans memory for.
    """
    if torch.compiler.is_compiling():
        ctx.save_for_backward(*(grads if isinstance(grads, list) else [grads]))
        setattr(ctx, attr, "saved")
    else:
        setattr(ctx, attr, grads)


def release_scaled(ctx, attr: str, go: Tensor):
    """The gradients saved as ``ctx.<attr>`` times the incoming gradient ``go``.

    When autograd frees the graph after this backward they are scaled in place
    and handed on (no second copy); with ``retain_graph`` they stay intact and
    scaled copies are returned. ``go == 1`` on the CPU skips the multiply.
    """
    grads = getattr(ctx, attr)
    if isinstance(grads, str):  # traced by torch.compile: functional scaling
        return [None if g is None else g * go.to(g.dtype) for g in ctx.saved_tensors]
    if grads is None:
        raise RuntimeError("crossent: this loss's saved gradient was already released; call backward with "
                           "retain_graph=True the first time to run backward through it twice")
    if isinstance(grads, Tensor):
        grads = [grads]
    one = go.dim() == 0 and host_reads_free(go) and float(go) == 1.0
    if keep_graph():
        return [None if g is None else (g.clone() if one else g * go.to(g.dtype)) for g in grads]
    setattr(ctx, attr, None)
    return [None if g is None else (g if one else g.mul_(go.to(g.dtype))) for g in grads]


def fused_cross_entropy(input: Tensor, call: FusedCall):
    """``(loss, lse, z, predicted)`` through the fused autograd function."""
    return _FusedCrossEntropy.apply(input, call)

"""What both fused autograd Functions do with the gradients they form in the forward."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ..impl.common import RowTerms, host_reads_free


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


def outputs(ctx, loss: Tensor, terms: RowTerms):
    """The forward's outputs: the loss, then the per-position extras (not differentiable)."""
    zrows = terms.z if terms.z is not None else torch.zeros_like(terms.lse)
    ctx.mark_non_differentiable(terms.lse, zrows, *(() if terms.predicted is None else (terms.predicted,)))
    return loss, terms.lse, zrows, terms.predicted


def save_gradients(ctx, grads: Sequence[Optional[Tensor]]) -> None:
    """Keep the gradients formed in the forward for the backward.

    Eagerly they are a plain attribute, so that the backward can release them
    and scale them in place (no second copy). Under torch.compile they are
    saved tensors, which the compiler traces and plans memory for.
    """
    if torch.compiler.is_compiling():
        ctx.save_for_backward(*grads)
        ctx.grads = "saved"
    else:
        ctx.grads = list(grads)


def release_scaled(ctx, go: Tensor) -> List[Optional[Tensor]]:
    """The gradients saved by :func:`save_gradients` times the incoming gradient ``go``.

    When autograd frees the graph after this backward they are scaled in place
    and handed on (no second copy); with ``retain_graph`` they stay intact and
    scaled copies are returned. ``go == 1`` on the CPU skips the multiply. A batched ``go`` (vmap over
    the backward) is read by no host sync and scales functionally.
    """
    grads = ctx.grads
    if isinstance(grads, str):  # traced by torch.compile: functional scaling
        return [None if g is None else g * go.to(g.dtype) for g in ctx.saved_tensors]
    if grads is None:
        raise RuntimeError("crossent: this loss's saved gradient was already released; call backward with "
                           "retain_graph=True the first time to run backward through it twice")
    try:
        one = go.dim() == 0 and host_reads_free(go) and float(go) == 1.0
    except RuntimeError:  # vmap over the backward (is_grads_batched, check_batched_grad): go has no value to
        # read; scale functionally (the saved gradient is not batched, so nothing in place) and keep it
        return [None if g is None else g * go.to(g.dtype) for g in grads]
    if keep_graph():
        return [None if g is None else (g.clone() if one else g * go.to(g.dtype)) for g in grads]
    ctx.grads = None
    return [None if g is None else (g if one else g.mul_(go.to(g.dtype))) for g in grads]

"""Autograd for the fused cross-entropy: the forward computes the gradient, the
backward only scales it by the incoming gradient.

Memory: the saved gradient is the only ``[N, C]`` tensor. When autograd will
free the graph after this backward (the usual ``loss.backward()``), the
gradient is scaled in place and handed on, so no second ``[N, C]`` buffer is
made; with ``retain_graph=True`` it is kept intact and a scaled copy is
returned, so a second backward is still right. With ``inplace_backward`` the
gradient is written over the logits themselves (see :func:`check_inplace`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from types import ModuleType
from typing import Dict, Tuple

import torch
from torch import Tensor

from ..impl.common import empty_gradient
from ..options import Options
from ..reduction import Reduction
from ..targets import Target
from .custom import compiled_cross_entropy, has_compiled_op
from ..impl.common import refuse_double_backward
from ._grads import outputs, release_scaled, save_gradients

__all__ = ["FusedCall", "fused_cross_entropy", "check_inplace", "check_not_overwritten", "mark_overwritten"]


@dataclass(frozen=True, eq=False)
class FusedCall:
    """Everything the fused forward needs besides the logits."""

    impl: ModuleType  # exposes cross_entropy(x3, tgt, opts, red, grad3)
    target: Target
    opts: Options
    red: Reduction
    shape3: Tuple[int, int, int]  # (P, C, Q)
    cdim: int
    grad_enabled: bool  # torch.is_grad_enabled() at the call: no gradient work under no_grad


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, call: FusedCall):
        x3 = input.reshape(call.shape3)
        grad = grad3 = None
        traced = torch.compiler.is_compiling()
        if ctx.needs_input_grad[0] and call.grad_enabled:
            if call.opts.inplace_backward and not traced and x3.data_ptr() == input.data_ptr() \
                    and x3.untyped_storage().data_ptr() == input.untyped_storage().data_ptr():
                grad, grad3 = input.detach(), x3  # x3 is a view of the input: write the gradient over it
            else:
                grad = empty_gradient(input)
                grad3 = grad.view(call.shape3)
        terms = call.impl.cross_entropy(x3, call.target, call.opts, call.red, grad3)
        loss = call.red.reduce(terms.ce, terms.z)
        overwritten = None
        if grad3 is x3:
            # anything that saved the logits now errors at its backward, not misleads; and (unless
            # they are a view, which autograd allows only for single-output functions) the logits
            # become an output of this function, so a gradient reaching them later raises (see backward)
            torch.autograd.graph.increment_version(input)
            if input._base is None:
                ctx.mark_dirty(input)
                overwritten = input
        ctx.set_materialize_grads(False)
        save_gradients(ctx, [grad])
        ctx.call = call
        return (*outputs(ctx, loss, terms), overwritten)

    @staticmethod
    def backward(ctx, grad_loss, _lse, _z, _pred, grad_overwritten):
        call: FusedCall = ctx.call
        if grad_overwritten is not None:
            raise RuntimeError(
                "crossent: logits that a cross_entropy call with inplace_backward=True overwrote with its "
                "gradient were used afterwards by something that needs their gradient: compute every other use "
                "of the logits before the loss with inplace_backward (or drop inplace_backward)")
        if grad_loss is None:
            return None, None
        refuse_double_backward(f"impl={call.impl.NAME!r}")
        go = grad_loss
        if not call.red.scalar and go.dim() > 0:
            go = go.unsqueeze(call.cdim)
        (grad,) = release_scaled(ctx, go)
        return grad, None


def fused_cross_entropy(input: Tensor, call: FusedCall):
    """``(loss, lse, z, predicted)`` through the fused autograd function (eager), or through the impl's
    registered op while torch.compile traces (:mod:`crossent.ops.custom`)."""
    if torch.compiler.is_compiling() and has_compiled_op(call.impl):
        return compiled_cross_entropy(input, call)
    return _FusedCrossEntropy.apply(input, call)[:4]


# Logits overwritten by inplace_backward: storage address -> (the tensor, its version after the write).
_OVERWRITTEN: Dict[int, Tuple[weakref.ref, int]] = {}


def mark_overwritten(t: Tensor) -> None:
    """Remember that ``t`` (as it is now, its version included) holds a gradient, not logits."""
    key = t.untyped_storage().data_ptr()
    # held by the base tensor, which owns the memory: a temporary view (x.view(...), a DTensor's
    # to_local()) may die at once while the gradient it wrote stays in the base
    owner = t._base if t._base is not None else t
    _OVERWRITTEN[key] = (weakref.ref(owner, lambda _: _OVERWRITTEN.pop(key, None)), t._version)


def check_not_overwritten(input: Tensor) -> None:
    """Raise if ``input`` still holds the gradient an earlier ``inplace_backward=True`` call wrote
    over it (a second loss would silently read the gradient as logits)."""
    entry = _OVERWRITTEN.get(input.untyped_storage().data_ptr()) if _OVERWRITTEN else None
    if entry is None or entry[0]() is None or input._version != entry[1]:
        return
    raise RuntimeError(
        "input holds the gradient that an earlier crossent call with inplace_backward=True wrote over these "
        "logits, not logits: compute every other loss from the logits before the one with inplace_backward "
        "(or drop inplace_backward)")


def check_inplace(input: Tensor) -> None:
    """Refuse logits that ``inplace_backward=True`` must not write over, as torch refuses such in-place ops."""
    base = input._base if input._base is not None else input
    if base.is_leaf and base.requires_grad and torch.is_grad_enabled():
        what = "a leaf tensor that requires grad (a parameter?)" if base is input else \
            "a view of a leaf tensor that requires grad (a parameter?)"
        raise ValueError(
            f"inplace_backward=True would write the gradient over the input, which is {what}: its values (and "
            "its .grad, which shares them) would be destroyed. Pass the output of an operation (logits = model(x)) "
            "or drop inplace_backward")
    if _may_overlap(input):
        raise ValueError(
            f"inplace_backward=True cannot write the gradient over an input whose elements overlap in memory "
            f"(strides {list(input.stride())}, e.g. from expand() or as_strided()): pass input.contiguous() "
            "or drop inplace_backward")


def _may_overlap(t: Tensor) -> bool:
    """Whether two elements of ``t`` may share memory: a stride-0 dim, or strides that do not nest
    (dims of size > 1 sorted by stride, each stride at least the span of the dims below it). Sliced
    views (``x[:, :-1]``) nest; ``expand`` and overlapping ``as_strided`` do not."""
    if torch._debug_has_internal_overlap(t) == 1:
        return True
    span = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride < span:
            return True
        span = stride * size
    return False

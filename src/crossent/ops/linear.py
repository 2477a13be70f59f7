"""Autograd for linear + cross-entropy by the fused impls.

With a scalar loss (``mean``, ``sum``, ``num_items``) the forward forms the
input, weight and bias gradients chunk by chunk, and the backward only scales
them (in place unless the graph is kept, as for cross-entropy). With
``reduction='none'`` the incoming gradient differs per position, so the weight
gradient cannot be finished in the forward: the forward keeps nothing but its
inputs and the backward recomputes the logits chunk by chunk with the
incoming gradient folded in.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from ..options import Options
from ..reduction import Reduction
from ..targets import Target
from .custom import compiled_linear_cross_entropy, has_compiled_op
from ..impl.common import refuse_double_backward
from ._grads import outputs, release_scaled, save_gradients

__all__ = ["LinearCall", "fused_linear_cross_entropy"]


@dataclass(frozen=True, eq=False)
class LinearCall:
    """Everything the fused linear forward needs besides the hidden states, weight and bias."""

    impl: ModuleType  # exposes linear_cross_entropy(x2, row_ids, W, b, tgt, opts, red, want_grads, row_scale)
    row_ids: Optional[Tensor]
    target: Target
    opts: Options
    red: Reduction
    grad_enabled: bool  # torch.is_grad_enabled() at the call: no gradient work under no_grad

    def run(self, x2: Tensor, lw: Tensor, lb: Optional[Tensor], want, row_scale: Optional[Tensor] = None):
        return self.impl.linear_cross_entropy(x2, self.row_ids, lw, lb, self.target, self.opts, self.red, want,
                                              row_scale)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2: Tensor, lw: Tensor, lb: Optional[Tensor], call: LinearCall):
        want = tuple(bool(n) and call.grad_enabled for n in ctx.needs_input_grad[:3])
        fused = call.red.scalar and any(want)
        res = call.run(x2, lw, lb, want if fused else (False, False, False))
        loss = call.red.reduce(res.terms.ce, res.terms.z)
        ctx.call, ctx.fused, ctx.want = call, fused, want
        if fused:
            save_gradients(ctx, [res.dx, res.dw, res.db])
        else:
            ctx.save_for_backward(x2, lw, lb)
        return outputs(ctx, loss, res.terms)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        call: LinearCall = ctx.call
        refuse_double_backward(f"linear_cross_entropy with impl={call.impl.NAME!r}")
        if not ctx.fused:
            x2, lw, lb = ctx.saved_tensors
            res = call.run(x2, lw, lb, ctx.want, grad_loss.reshape(-1))
            return res.dx, res.dw, res.db, None
        dx, dw, db = release_scaled(ctx, grad_loss)
        return dx, dw, db, None


def fused_linear_cross_entropy(x2: Tensor, lw: Tensor, lb: Optional[Tensor], call: LinearCall):
    """``(loss, lse, z, predicted)`` through the fused linear autograd function (``lw``, ``lb``: the
    projection's weight and bias); the impl's registered op while torch.compile traces."""
    if torch.compiler.is_compiling() and has_compiled_op(call.impl):
        return compiled_linear_cross_entropy(x2, lw, lb, call)
    return _FusedLinearCrossEntropy.apply(x2, lw, lb, call)

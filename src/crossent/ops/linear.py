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
from typing import Callable, Optional

import torch
from torch import Tensor

from .._reduce import reduce_rows
from .cross_entropy import refuse_double_backward, release_scaled, save_gradients, with_extras


@dataclass
class LinearCall:
    kernel: Callable  # (x2, W, b, row_scale, want_grads) -> (ce, z, lse, predicted, dx, dW, db)
    reduction: str
    ce_denom: Optional[Tensor]
    z_denom: Optional[Tensor]
    pos_shape: torch.Size
    impl_name: str
    grad_enabled: bool = True  # torch.is_grad_enabled() at the call: no gradient work under no_grad


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2: Tensor, w: Tensor, b: Optional[Tensor], call: LinearCall):
        want = tuple(bool(n) and call.grad_enabled for n in ctx.needs_input_grad[:3])
        scalar = not (call.reduction == "none" and call.ce_denom is None)
        fused = scalar and any(want)
        ce, z, lse, pred, dx, dw, db = call.kernel(x2, w, b, None, want if fused else (False, False, False))
        loss = reduce_rows(ce, z, call.reduction, call.ce_denom, call.z_denom, call.pos_shape, x2.dtype)
        ctx.call, ctx.fused, ctx.want = call, fused, want
        if fused:
            save_gradients(ctx, "grads", [dx, dw, db])
        else:
            ctx.save_for_backward(x2, w, b)
        return with_extras(ctx, loss, lse, z, pred)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        call: LinearCall = ctx.call
        refuse_double_backward(f"linear_cross_entropy with impl={call.impl_name!r}")
        if not ctx.fused:
            x2, w, b = ctx.saved_tensors
            _, _, _, _, dx, dw, db = call.kernel(x2, w, b, grad_loss.reshape(-1), ctx.want)
            return dx, dw, db, None
        dx, dw, db = release_scaled(ctx, "grads", grad_loss)
        return dx, dw, db, None


def fused_linear_cross_entropy(x2: Tensor, w: Tensor, b: Optional[Tensor], call: LinearCall):
    """``(loss, lse, z, predicted)`` through the fused linear autograd function."""
    if call.reduction == "none" and call.ce_denom is None:
        return _eager_apply(x2, w, b, call)
    return _FusedLinearCrossEntropy.apply(x2, w, b, call)


@torch.compiler.disable
def _eager_apply(x2: Tensor, w: Tensor, b: Optional[Tensor], call: LinearCall):
    """reduction='none' recomputes in its backward, which torch.compile cannot trace: one graph break."""
    return _FusedLinearCrossEntropy.apply(x2, w, b, call)

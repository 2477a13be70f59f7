"""Reference implementation: plain differentiable torch ops, any dtype.

Readable first, the test oracle beside PyTorch. Autograd differentiates it, so
it also gives second derivatives and gradients for class weights and soft
targets.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..targets import Target


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cross_entropy_rows(x3: Tensor, tgt: Target, weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
                       softcap: Optional[float], z_loss: float
                       ) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """Per-position ``(ce, z, lse, predicted)`` for logits ``x3`` ``[P, C, Q]``.

    ``ce`` and ``z`` are differentiable; ``lse`` and ``predicted`` are detached.
    """
    acc = acc_dtype(x3.dtype)
    x = x3.transpose(1, 2).to(acc)  # [P, Q, C]
    C = x.shape[-1]
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    logp = torch.log_softmax(x, -1)
    lse = torch.logsumexp(x, -1)
    w = None if weight is None else weight.to(acc)
    ls = label_smoothing
    zero = x.new_zeros(())

    def smooth() -> Tensor:  # sum_c w_c * (-log p_c)
        return -(logp * w).sum(-1) if w is not None else -logp.sum(-1)

    if tgt.kind == "index":
        y = tgt.index
        valid = y != ignore_index
        in_range = (y >= 0) & (y < C)
        yc = torch.where(in_range, y, torch.zeros_like(y))
        nll = -logp.gather(-1, yc.unsqueeze(-1)).squeeze(-1)
        wy = w[yc] if w is not None else torch.ones_like(nll)
        ce = wy * nll
        if ls > 0:
            ce = (1 - ls) * ce + (ls / C) * smooth()
        ce = torch.where(valid, ce, zero)
        ce = torch.where(valid & ~in_range, torch.full_like(ce, float("nan")), ce)
        row_valid = valid
    elif tgt.kind == "probs":
        p = tgt.probs.transpose(1, 2).to(acc)
        q = (1 - ls) * p + ls / C if ls > 0 else p
        if w is not None:
            q = q * w
        ce = -torch.where(q == 0, zero, q * logp).sum(-1)
        row_valid = None
    else:  # sparse
        idx, val = tgt.sp_index, tgt.sp_values.to(acc)
        pad = idx == ignore_index
        in_range = (idx >= 0) & (idx < C)
        idc = torch.where(in_range, idx, torch.zeros_like(idx))
        v = torch.where(pad, zero, val)
        v = torch.where(~pad & ~in_range, torch.full_like(v, float("nan")), v)
        q = (1 - ls) * v
        if w is not None:
            q = q * w[idc]
        lp = logp.gather(-1, idc)
        ce = -torch.where(q == 0, zero, q * lp).sum(-1)
        if ls > 0:
            ce = ce + (ls / C) * smooth()
        row_valid = None

    z = None
    if z_loss:
        z = z_loss * lse.square()
        if row_valid is not None:
            z = torch.where(row_valid, z, zero)
        z = z.reshape(-1)
    return ce.reshape(-1), z, lse.detach().reshape(-1), x.detach().argmax(-1).reshape(-1)

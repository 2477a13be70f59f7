"""Reference implementation (``impl="torch"``): plain differentiable torch ops, any dtype.

Readable first, the test oracle beside PyTorch. Autograd differentiates it, so
it also gives second derivatives and gradients for class weights and soft
targets. Same entry points as every impl; ``grad3`` / ``want_grads`` are
never used (autograd forms the gradients).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..options import Options
from ..reduction import Reduction
from ..targets import IndexTarget, ProbsTarget, Target
from .common import LinearResult, RowTerms, acc_dtype

NAME = "torch"


def cross_entropy(x3: Tensor, tgt: Target, opts: Options, red: Reduction, grad3: Optional[Tensor] = None) -> RowTerms:
    """Per-position ``(ce, z, lse, predicted)`` for logits ``x3`` ``[P, C, Q]``; ``ce`` and ``z`` are
    differentiable, ``lse`` and ``predicted`` detached."""
    acc = acc_dtype(x3.dtype)
    x = x3.transpose(1, 2).to(acc)  # [P, Q, C]
    predicted = x.detach().argmax(-1).reshape(-1)  # of the raw logits (softcap's tanh may saturate into ties)
    C = x.shape[-1]
    if opts.softcap is not None:
        x = opts.softcap * torch.tanh(x / opts.softcap)
    logp = torch.log_softmax(x, -1)
    lse = torch.logsumexp(x, -1)
    w = opts.class_weight(acc)
    ls = opts.label_smoothing
    zero = x.new_zeros(())

    def smooth() -> Tensor:  # sum_c w_c * (-log p_c)
        return -(logp * w).sum(-1) if w is not None else -logp.sum(-1)

    row_valid = None
    if isinstance(tgt, IndexTarget):
        y = tgt.index
        row_valid = tgt.valid
        in_range = (y >= 0) & (y < C)
        yc = torch.where(in_range, y, torch.zeros_like(y))
        nll = -logp.gather(-1, yc.unsqueeze(-1)).squeeze(-1)
        ce = w[yc] * nll if w is not None else nll
        if ls > 0:
            ce = (1 - ls) * ce + (ls / C) * smooth()
        ce = torch.where(row_valid, ce, zero)
        ce = torch.where(row_valid & ~in_range, torch.full_like(ce, float("nan")), ce)
    elif isinstance(tgt, ProbsTarget):
        p = tgt.probs.transpose(1, 2).to(acc)
        q = (1 - ls) * p + ls / C if ls > 0 else p
        if w is not None:
            q = q * w
        ce = -(q * _zero_mass_safe(q, logp)).sum(-1)
    else:  # TopKTarget
        idx, pad = tgt.indices, tgt.padding
        in_range = (idx >= 0) & (idx < C)
        idc = torch.where(in_range, idx, torch.zeros_like(idx))
        v = torch.where(pad, zero, tgt.values.to(acc))
        v = torch.where(~pad & ~in_range, torch.full_like(v, float("nan")), v)
        q = (1 - ls) * v
        if w is not None:
            q = q * w[idc]
        ce = -(q * _zero_mass_safe(q, logp.gather(-1, idc))).sum(-1)
        if ls > 0:
            ce = ce + (ls / C) * smooth()

    z = None
    if opts.z_loss:
        z = opts.z_loss * lse.square()
        if row_valid is not None:
            z = torch.where(row_valid, z, zero)
        z = z.reshape(-1)
    return RowTerms(ce.reshape(-1), z, lse.detach().reshape(-1), predicted)


def _zero_mass_safe(q: Tensor, logp: Tensor) -> Tensor:
    """``logp`` with 0 where the target mass is 0 and ``logp`` is infinite: ``q * log p`` is then 0
    (not ``0 * -inf``), with no NaN in either gradient, and the gradient in ``q`` stays ``log p``
    wherever that is finite (a soft target's gradient at a zero mass is not 0)."""
    return torch.where((q == 0) & torch.isinf(logp), torch.zeros_like(logp), logp)


def linear_cross_entropy(x2: Tensor, row_ids: Optional[Tensor], linear_weight: Tensor, linear_bias: Optional[Tensor],
                         tgt: Target, opts: Options, red: Reduction, want_grads=None,
                         row_scale: Optional[Tensor] = None) -> LinearResult:
    """The logits built in full (``[M, V]``), then :func:`cross_entropy`; differentiable."""
    x = x2 if row_ids is None else x2.index_select(0, row_ids)
    logits = torch.nn.functional.linear(x, linear_weight, linear_bias)
    return LinearResult(cross_entropy(logits.unsqueeze(2), tgt, opts, red), None, None, None)

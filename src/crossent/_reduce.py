"""Reduction shared by every impl: denominators, gradient scales, the reduced loss.

The loss is ``sum_i ce_i / ce_denom + sum_i z_i / z_denom`` (``mean``, or
``num_items``), the plain sums (``sum``), or ``ce_i + z_i`` per position
(``none``). Denominators are tensors, so nothing here syncs with the device.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .targets import Target

REDUCTIONS = ("none", "mean", "sum")


def denominators(tgt: Target, weight: Optional[Tensor], reduction: str, num_items, ignore_index: int,
                 acc: torch.dtype, device: torch.device) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(ce_denom, z_denom)``: what the summed CE and z-loss are divided by (None: 1).

    ``mean`` with index targets divides the CE by the summed class weights of
    the non-ignored positions (PyTorch's rule) and the z-loss by their count;
    with probability or sparse targets both divide by the number of positions.
    ``num_items`` replaces both.
    """
    if num_items is not None:
        # a Python count becomes a device fill, not a host-to-device copy (which would sync on CUDA)
        d = (num_items.to(device=device, dtype=acc).reshape(()) if isinstance(num_items, Tensor)
             else torch.full((), float(num_items), dtype=acc, device=device))
        return d, d
    if reduction != "mean":
        return None, None
    if tgt.kind == "index":
        valid = tgt.index != ignore_index
        count = valid.sum().to(acc)
        if weight is None:
            return count, count
        w = weight[tgt.index.clamp(0, weight.numel() - 1)] * valid
        return w.sum(), count
    m = tgt.probs.shape[0] * tgt.probs.shape[2] if tgt.kind == "probs" else tgt.sp_index.shape[0] * tgt.sp_index.shape[1]
    d = torch.full((), float(m), dtype=acc, device=device)
    return d, d


def grad_scale(denom: Optional[Tensor], acc: torch.dtype, device: torch.device) -> Tensor:
    """``1 / denom`` for the gradient, 0 where the denominator is 0.

    An all-ignored ``mean`` has loss 0/0 = NaN (as in PyTorch) but a zero
    gradient (as in PyTorch), not NaN.
    """
    if denom is None:
        return torch.ones((), dtype=acc, device=device)
    return torch.where(denom == 0, torch.zeros_like(denom), 1.0 / denom)


def reduce_rows(ce_rows: Tensor, z_rows: Optional[Tensor], reduction: str, ce_denom: Optional[Tensor],
                z_denom: Optional[Tensor], pos_shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """The loss from per-position terms (differentiable: the torch impl relies on it)."""
    if reduction == "none" and ce_denom is None:
        out = ce_rows if z_rows is None else ce_rows + z_rows
        return out.reshape(pos_shape).to(dtype)
    loss = ce_rows.sum()
    if ce_denom is not None:
        loss = loss / ce_denom
    if z_rows is not None:
        z = z_rows.sum()
        loss = loss + (z / z_denom if z_denom is not None else z)
    return loss.to(dtype)

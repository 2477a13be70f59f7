"""The reduction, shared by every impl: denominators, gradient scales, the reduced loss.

The loss is ``sum_i ce_i / ce_denom + sum_i z_i / z_denom`` (``mean``, or
``num_items``), the plain sums (``sum``), or ``ce_i + z_i`` per position
(``none``). Denominators are tensors, so nothing here syncs with the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .options import Options
from .targets import IndexTarget, Target

__all__ = ["Reduction", "plan_reduction"]


@dataclass(frozen=True, eq=False)
class Reduction:
    """How per-position terms become the loss, and the scales of its gradient.

    ``ce_scale`` / ``z_scale`` multiply the gradient of the summed CE / z-loss
    terms: ``1 / denom``, 0 where nothing counts (an all-ignored ``mean``: NaN
    loss but a zero gradient, as in PyTorch), NaN where positions count but
    their class weights sum to 0 (NaN loss and gradient, as in PyTorch).
    """

    mode: str  # "none" | "mean" | "sum"
    ce_denom: Optional[Tensor]  # None: divide by 1
    z_denom: Optional[Tensor]
    ce_scale: Tensor
    z_scale: Tensor
    pos_shape: torch.Size  # the shape of the per-position loss
    out_dtype: torch.dtype  # the loss's dtype
    nan_at_zero: bool = False  # a weighted mean over nothing is NaN, as PyTorch's 0/0 (smoothing included)

    @property
    def scalar(self) -> bool:
        """Whether the loss is one number (the gradient can be finished in the forward)."""
        return self.mode != "none" or self.ce_denom is not None

    def reduce(self, ce_rows: Tensor, z_rows: Optional[Tensor]) -> Tensor:
        """The loss from per-position terms (differentiable: the reference impl relies on it)."""
        if not self.scalar:
            out = ce_rows if z_rows is None else ce_rows + z_rows
            return out.reshape(self.pos_shape).to(self.out_dtype)
        loss = ce_rows.sum()
        if self.ce_denom is not None:
            loss = loss / self.ce_denom
            if self.nan_at_zero:
                loss = torch.where(self.ce_denom == 0, torch.full_like(loss, float("nan")), loss)
        if z_rows is not None:
            z = z_rows.sum()
            loss = loss + (z / self.z_denom if self.z_denom is not None else z)
        return loss.to(self.out_dtype)


def plan_reduction(tgt: Target, opts: Options, acc: torch.dtype, device: torch.device, pos_shape: torch.Size,
                   out_dtype: torch.dtype, weight_sum: Optional[Tensor] = None) -> Reduction:
    """The :class:`Reduction` of a call.

    ``mean`` with index targets divides the CE by the summed class weights of
    the non-ignored positions (PyTorch's rule) and the z-loss by their count;
    with probability or top-k targets both divide by the number of positions.
    ``num_items`` replaces both. ``weight_sum`` gives the summed class weights of the counted
    positions where they are not all here (vocab-parallel: each rank owns some labels' weights).
    """
    ce_denom = z_denom = count = None
    nan_at_zero = False
    if opts.num_items is not None:
        # a Python count becomes a device fill, not a host-to-device copy (which would sync on CUDA)
        n = opts.num_items
        ce_denom = z_denom = (n.detach().to(device=device, dtype=acc).reshape(()) if isinstance(n, Tensor)
                              else torch.full((), float(n), dtype=acc, device=device))
    elif opts.reduction == "mean":
        if isinstance(tgt, IndexTarget):
            valid = tgt.valid
            count = valid.sum().to(acc)
            w = opts.class_weight(acc)
            if weight_sum is not None:
                ce_denom = weight_sum.to(acc)
            else:
                ce_denom = count if w is None else (w[tgt.index.clamp(0, w.numel() - 1)] * valid).sum()
            z_denom = count
            nan_at_zero = True
        else:
            ce_denom = z_denom = torch.full((), float(tgt.positions), dtype=acc, device=device)
    if opts.num_items is not None:  # the caller's count: divided by as given (0 gives inf, as in every impl)
        ce_scale = z_scale = 1.0 / ce_denom
    else:
        ce_scale, z_scale = _scale(ce_denom, count, acc, device), _scale(z_denom, None, acc, device)
    return Reduction(opts.reduction, ce_denom, z_denom, ce_scale, z_scale, pos_shape, out_dtype, nan_at_zero)


def _scale(denom: Optional[Tensor], count: Optional[Tensor], acc: torch.dtype, device: torch.device) -> Tensor:
    """``1 / denom``; where ``denom`` is 0: 0 if no position counts (``count`` 0 or unknown), else NaN."""
    if denom is None:
        return torch.ones((), dtype=acc, device=device)
    zero = torch.zeros_like(denom)
    at_zero = zero if count is None else torch.where(count == 0, zero, torch.full_like(denom, float("nan")))
    return torch.where(denom == 0, at_zero, 1.0 / denom)

"""Launcher of the cross-entropy kernel: same contract as
:func:`crossent.impl.chunked.cross_entropy_forward`.

float64 logits are routed to the chunked impl (Triton's float64 math would
gain nothing on a GPU); every other dtype accumulates in float32.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...targets import Target
from .. import chunked
from .._terms import sparse_terms

# Largest class tile. Rows longer than this stream through several tiles.
MAX_BLOCK = 8192


def _block(C: int) -> int:
    return max(16, min(MAX_BLOCK, 1 << (max(C, 1) - 1).bit_length()))


def cross_entropy_forward(x3: Tensor, tgt: Target, weight: Optional[Tensor], ignore_index: int,
                          label_smoothing: float, softcap: Optional[float], z_loss: float,
                          ce_gscale: Tensor, z_gscale: Tensor, grad3: Optional[Tensor], want_predicted: bool
                          ) -> Tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
    if x3.dtype == torch.float64:
        return chunked.cross_entropy_forward(x3, tgt, weight, ignore_index, label_smoothing, softcap, z_loss,
                                             ce_gscale, z_gscale, grad3, want_predicted)
    from .kernels import ce_fwd_kernel

    P, C, Q = x3.shape
    M = P * Q
    dev = x3.device
    f32 = torch.float32
    ls = float(label_smoothing)
    w = None if weight is None else weight.to(f32).contiguous()
    probs = tgt.kind == "probs"
    dummy = torch.empty(1, dtype=f32, device=dev)
    ce = torch.empty(M, dtype=f32, device=dev)
    lse = torch.empty(M, dtype=f32, device=dev)
    z = torch.empty(M, dtype=f32, device=dev) if z_loss else None
    pred = torch.empty(M, dtype=torch.long, device=dev) if want_predicted else None
    if M == 0:
        return ce, z, lse, pred
    if probs:
        prob, idx, vals, rv, K = tgt.probs, dummy, dummy, None, 1
    else:
        cols, vals, rv = sparse_terms(tgt, w, ls, ignore_index, C, f32)
        idx, vals, prob, K = cols.contiguous(), vals.contiguous(), x3, cols.shape[1]
    g = grad3 if grad3 is not None else x3
    wsum = w.sum().reshape(1) if w is not None else dummy
    ce_fwd_kernel[(M,)](
        x3, x3.stride(0), x3.stride(1), x3.stride(2),
        g, g.stride(0), g.stride(1), g.stride(2),
        prob, prob.stride(0), prob.stride(1), prob.stride(2),
        idx, vals, K,
        rv if rv is not None else dummy,
        w if w is not None else dummy, wsum,
        ce_gscale.to(f32).reshape(1), z_gscale.to(f32).reshape(1),
        ce, z if z is not None else dummy, lse, pred if pred is not None else dummy,
        Q, C, ls, float(softcap) if softcap is not None else 1.0, float(z_loss),
        IS_PROBS=probs, HAS_W=w is not None, HAS_RV=rv is not None, HAS_LS=ls > 0, HAS_CAP=softcap is not None,
        HAS_Z=bool(z_loss), WANT_GRAD=grad3 is not None, WANT_PRED=want_predicted,
        KP=max(1, 1 << (K - 1).bit_length()), BLOCK=_block(C),
        num_warps=8 if _block(C) >= 2048 else 4,
    )
    return ce, z, lse, pred

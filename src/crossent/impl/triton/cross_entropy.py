"""Launcher of the cross-entropy kernel: the ``cross_entropy`` entry point of the triton impl.

Every dtype but float64 accumulates in float32 (the registry sends float64 to
the chunked impl).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...config import CONFIG, triton_interpreted
from ...options import Options
from ...reduction import Reduction
from ...targets import ProbsTarget, Target
from ..common import RowTerms
from .launch import hint, launch


def class_block(C: int) -> int:
    """The class tile: the next power of two of ``C``, at most the ``triton_max_block`` knob."""
    import triton

    return max(16, min(CONFIG.triton_max_block, triton.next_power_of_2(max(C, 1))))


def cross_entropy(x3: Tensor, tgt: Target, opts: Options, red: Reduction, grad3: Optional[Tensor] = None) -> RowTerms:
    """Same contract as :func:`crossent.impl.chunked.cross_entropy`."""
    import triton

    from .kernels import ce_fwd_kernel

    P, C, Q = x3.shape
    M, dev, f32 = P * Q, x3.device, torch.float32
    ls, softcap, want_pred = opts.label_smoothing, opts.softcap, opts.return_extras
    w = opts.class_weight(f32)
    w = None if w is None else w.contiguous()
    dummy = torch.empty(1, dtype=f32, device=dev)
    ce = torch.empty(M, dtype=f32, device=dev)
    lse = torch.empty(M, dtype=f32, device=dev)
    z = torch.empty(M, dtype=f32, device=dev) if opts.z_loss else None
    pred = torch.empty(M, dtype=torch.long, device=dev) if want_pred else None
    if M == 0:
        return RowTerms(ce, z, lse, pred)
    probs = isinstance(tgt, ProbsTarget)
    if probs:
        prob, idx, vals, rv, K = tgt.probs, dummy, dummy, None, 1
    else:
        cols, vals, rv = tgt.class_terms(w, ls, C, f32)
        idx, vals, prob, K = cols.contiguous(), vals.contiguous(), x3, cols.shape[1]
    g = grad3 if grad3 is not None else x3
    block = class_block(hint(C))  # the kernel loops over C in tiles: any tile is right
    launch(ce_fwd_kernel)[(M,)](
        x3, x3.stride(0), x3.stride(1), x3.stride(2),
        g, g.stride(0), g.stride(1), g.stride(2),
        prob, prob.stride(0), prob.stride(1), prob.stride(2),
        idx, vals, K,
        rv if rv is not None else dummy,
        w if w is not None else dummy, w.sum().reshape(1) if w is not None else dummy,
        red.ce_scale.to(f32).reshape(1), red.z_scale.to(f32).reshape(1),
        ce, z if z is not None else dummy, lse, pred if pred is not None else dummy,
        Q, C, ls, float(softcap) if softcap is not None else 1.0, float(opts.z_loss),
        IS_PROBS=probs, HAS_W=w is not None, HAS_RV=rv is not None, HAS_LS=ls > 0, HAS_CAP=softcap is not None,
        HAS_Z=bool(opts.z_loss), WANT_GRAD=grad3 is not None, WANT_PRED=want_pred,
        KP=triton.next_power_of_2(K), BLOCK=block,
        EMULATE_RTNE=triton_interpreted() and g.dtype == torch.bfloat16,
        num_warps=8 if block >= 2048 else 4,
    )
    return RowTerms(ce, z, lse, pred)

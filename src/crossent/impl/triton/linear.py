"""Launcher of the linear + cross-entropy kernels: same contract as
:func:`crossent.impl.chunked.linear_cross_entropy_forward` (float64 is routed
there). ``chunk_size`` does not apply: the kernels tile rows and vocabulary
themselves and never hold more than a tile of logits."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...targets import Target
from .. import chunked
from .._terms import sparse_terms

BLOCK_M, BLOCK_V, BLOCK_K = 64, 128, 64


def _pow2(n: int, lo: int = 16, hi: int = 1 << 30) -> int:
    return max(lo, min(hi, 1 << (max(n, 1) - 1).bit_length()))


def linear_cross_entropy_forward(x2: Tensor, row_ids: Optional[Tensor], weight_v: Tensor, bias: Optional[Tensor],
                                 tgt: Target, class_weight: Optional[Tensor], ignore_index: int,
                                 label_smoothing: float, softcap: Optional[float], z_loss: float,
                                 ce_gscale: Tensor, z_gscale: Tensor, want_grads: Tuple[bool, bool, bool],
                                 want_predicted: bool, chunk_size: Optional[int] = None,
                                 row_scale: Optional[Tensor] = None, filter_eps: Optional[float] = None):
    if x2.dtype == torch.float64:
        return chunked.linear_cross_entropy_forward(x2, row_ids, weight_v, bias, tgt, class_weight, ignore_index,
                                                    label_smoothing, softcap, z_loss, ce_gscale, z_gscale,
                                                    want_grads, want_predicted, chunk_size, row_scale)
    from .linear_kernels import lce_bwd_kernel, lce_fwd_kernel

    f32 = torch.float32
    dev = x2.device
    V, H = weight_v.shape
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    w = weight_v if weight_v.stride(-1) == 1 else weight_v.contiguous()
    ls = float(label_smoothing)
    cw = None if class_weight is None else class_weight.to(f32).contiguous()
    probs = tgt.kind == "probs"
    dummy = torch.zeros(1, dtype=f32, device=dev)
    if probs:
        prob = tgt.probs[:, :, 0]
        M = prob.shape[0]
        idx, vals, rv, K = dummy, dummy, None, 1
    else:
        cols, vals, rv = sparse_terms(tgt, cw, ls, ignore_index, V, f32)
        idx, vals, K = cols.contiguous(), vals.contiguous(), cols.shape[1]
        M = idx.shape[0]
        prob = dummy.reshape(1, 1)
    mx, logs, ce, mass = (torch.empty(M, dtype=f32, device=dev) for _ in range(4))
    z = torch.empty(M, dtype=f32, device=dev) if z_loss else None
    pred = torch.empty(M, dtype=torch.long, device=dev) if want_predicted else None
    need_dx, need_dw, need_db = want_grads
    dx = dw = db = None
    if M == 0:
        return ce, z, mx, pred, (torch.zeros_like(x2) if need_dx else None), \
            (torch.zeros_like(weight_v) if need_dw else None), (torch.zeros_like(bias) if need_db else None)
    rid = row_ids if row_ids is not None else dummy
    bm, bv, bk = _pow2(M, hi=BLOCK_M), _pow2(V, hi=BLOCK_V), _pow2(H, hi=BLOCK_K)
    prec = "ieee" if x2.dtype == f32 else "tf32"
    common = dict(IS_PROBS=probs, HAS_RID=row_ids is not None, HAS_B=bias is not None, HAS_CW=cw is not None,
                  HAS_RV=rv is not None, HAS_LS=ls > 0, HAS_CAP=softcap is not None, HAS_Z=bool(z_loss),
                  KP=_pow2(K, lo=1), BM=bm, BV=bv, BK=bk, PREC=prec)
    cap = float(softcap) if softcap is not None else 1.0
    lce_fwd_kernel[(triton_cdiv(M, bm),)](
        x2, x2.stride(0), rid, w, w.stride(0), bias if bias is not None else dummy,
        prob, prob.stride(0), prob.stride(1),
        idx, vals, K, rv if rv is not None else dummy,
        cw if cw is not None else dummy, cw.sum().reshape(1) if cw is not None else dummy,
        mx, logs, ce, z if z is not None else dummy, pred if pred is not None else dummy, mass,
        M, V, H, ls, cap, float(z_loss), WANT_PRED=want_predicted, **common)
    lse = mx + logs
    if any(want_grads):
        dx = torch.zeros(x2.shape, dtype=f32, device=dev) if need_dx else dummy
        dw = torch.zeros((V, H), dtype=f32, device=dev) if need_dw else dummy
        db = torch.zeros(V, dtype=f32, device=dev) if need_db else dummy
        lce_bwd_kernel[(triton_cdiv(M, bm), triton_cdiv(V, bv))](
            x2, x2.stride(0), rid, w, w.stride(0), bias if bias is not None else dummy,
            prob, prob.stride(0), prob.stride(1),
            idx, vals, K, rv if rv is not None else dummy,
            cw if cw is not None else dummy, mx, logs, mass,
            row_scale.to(f32).contiguous() if row_scale is not None else dummy,
            ce_gscale.to(f32).reshape(1), z_gscale.to(f32).reshape(1),
            dx, dw, db, M, V, H, ls, cap, float(z_loss), float(filter_eps or 0.0),
            HAS_RS=row_scale is not None, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
            FILTER=filter_eps is not None, **common)
        dx = dx.to(x2.dtype) if need_dx else None
        dw = dw.to(weight_v.dtype) if need_dw else None
        db = db.to(bias.dtype) if need_db else None
    return ce, z, lse, pred, dx, dw, db


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b

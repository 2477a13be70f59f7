"""Launcher of the linear + cross-entropy kernels: same contract as
:func:`crossent.impl.chunked.linear_cross_entropy_forward` (float64 is routed
there). ``chunk_size`` does not apply: the kernels tile rows and vocabulary
themselves and never hold more than a tile of logits."""

from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from ...targets import Target
from .. import chunked
from .._terms import sparse_terms

# Largest blocks for the interpreter's launches (fitted to the problem); on a GPU the autotuner
# picks among _FWD_CONFIGS / _BWD_CONFIGS, once per (V, H, power-of-two bucket of rows, dtypes).
BLOCK_M, BLOCK_V, BLOCK_K = 64, 128, 64
FIN_BM = 64  # rows per program of the kernel that merges the vocabulary splits
SPLIT_GRAIN = 256  # vocabulary splits are multiples of every autotuned BV
FWD_SPLITS: Optional[int] = None  # force the number of vocabulary splits (tests); None: from the GPU's size


def _configs(shapes):
    import triton

    return [triton.Config(dict(BM=bm, BV=bv, BK=bk), num_warps=w, num_stages=st) for bm, bv, bk, w, st in shapes]


_FWD_CONFIGS = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 4, 3), (64, 128, 64, 4, 4),
                (128, 128, 32, 4, 4), (256, 128, 64, 8, 3)]
_BWD_CONFIGS = [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 3), (64, 256, 64, 8, 3),
                (128, 256, 32, 8, 3)]


@functools.lru_cache(maxsize=None)
def _kernels():
    """``(forward, finish, backward, autotuned)``: under ``TRITON_INTERPRET=1`` the plain kernels
    (the launcher passes block sizes fitted to the problem), else autotuned ones."""
    return build_kernels(os.environ.get("TRITON_INTERPRET", "0") != "1")


def build_kernels(tuned: bool, do_bench=None):
    """The kernels, autotuned over ``_FWD_CONFIGS`` / ``_BWD_CONFIGS`` when ``tuned``. The backward
    accumulates with atomics, so its outputs are zeroed before every trial (and before the real
    run). ``do_bench`` replaces the autotuner's timer (tests run it on the interpreter)."""
    import triton

    from .linear_kernels import lce_bwd_kernel, lce_fin_kernel, lce_fwd_kernel

    if not tuned:
        return lce_fwd_kernel, lce_fin_kernel, lce_bwd_kernel, False
    key = ["V", "H", "MB"]
    extra = {} if do_bench is None else {"do_bench": do_bench}
    fwd = triton.autotune(_configs(_FWD_CONFIGS), key=key, **extra)(lce_fwd_kernel)
    bwd = triton.autotune(_configs(_BWD_CONFIGS), key=key, reset_to_zero=["DX", "DW", "DB"], **extra)(lce_bwd_kernel)
    return fwd, lce_fin_kernel, bwd, True


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_width(M: int, V: int, device: torch.device, grain: int) -> int:
    """Classes per vocabulary split of the forward: enough splits that about two programs per SM
    run when the rows alone give fewer (each split at least 1024 classes), a multiple of ``grain``."""
    if FWD_SPLITS is not None:
        S = FWD_SPLITS
    elif device.type == "cuda":
        S = triton_cdiv(2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()),
                        triton_cdiv(M, 128))
        S = max(1, min(S, V // 1024))
    else:
        S = 1
    return max(grain, triton_cdiv(triton_cdiv(V, max(S, 1)), grain) * grain)


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
    fwd, fin, bwd, tuned = _kernels()
    bm, bv, bk = _pow2(M, hi=BLOCK_M), _pow2(V, hi=BLOCK_V), _pow2(H, hi=BLOCK_K)
    # autotuned launches choose the blocks themselves; the interpreter gets sizes fitted to the problem
    blocks = {} if tuned else dict(BM=bm, BV=bv, BK=bk)
    prec = "ieee" if x2.dtype == f32 else "tf32"
    flags = dict(IS_PROBS=probs, HAS_RID=row_ids is not None, HAS_B=bias is not None, HAS_CW=cw is not None,
                 HAS_LS=ls > 0, HAS_CAP=softcap is not None)
    cap = float(softcap) if softcap is not None else 1.0
    split_v = _split_width(M, V, dev, SPLIT_GRAIN if tuned else bv)
    S = triton_cdiv(V, split_v)
    pm, ps = (torch.empty((S, M), dtype=f32, device=dev) for _ in range(2))
    pd, pt = (torch.empty((S, M), dtype=f32, device=dev) for _ in range(2)) if probs or ls > 0 else (dummy, dummy)
    pb, pbi = (torch.empty((S, M), dtype=f32, device=dev), torch.empty((S, M), dtype=torch.long, device=dev)) \
        if want_predicted else (dummy, dummy)
    fwd[lambda meta: (triton_cdiv(M, meta["BM"]), S)](
        x2, x2.stride(0), rid, w, w.stride(0), bias if bias is not None else dummy,
        prob, prob.stride(0), prob.stride(1), cw if cw is not None else dummy,
        pm, ps, pd, pt, pb, pbi, M, V, H, split_v, ls, cap, _pow2(M),
        WANT_PRED=want_predicted, PREC=prec, **flags, **blocks)
    # the flags of the kernels that form the loss terms (finish) and their gradient (backward)
    flags.update(HAS_RV=rv is not None, HAS_Z=bool(z_loss), KP=_pow2(K, lo=1))
    fin[(triton_cdiv(M, FIN_BM),)](
        x2, x2.stride(0), rid, w, w.stride(0), bias if bias is not None else dummy,
        pm, ps, pd, pt, pb, pbi, S, idx, vals, K, rv if rv is not None else dummy,
        cw.sum().reshape(1) if cw is not None else dummy,
        mx, logs, ce, z if z is not None else dummy, pred if pred is not None else dummy, mass,
        M, V, H, ls, cap, float(z_loss), WANT_PRED=want_predicted, BM=FIN_BM, BK=bk, **flags)
    lse = mx + logs
    if any(want_grads):
        dx = torch.zeros(x2.shape, dtype=f32, device=dev) if need_dx else dummy
        dw = torch.zeros((V, H), dtype=f32, device=dev) if need_dw else dummy
        db = torch.zeros(V, dtype=f32, device=dev) if need_db else dummy
        bwd[lambda meta: (triton_cdiv(M, meta["BM"]), triton_cdiv(V, meta["BV"]))](
            x2, x2.stride(0), rid, w, w.stride(0), bias if bias is not None else dummy,
            prob, prob.stride(0), prob.stride(1),
            idx, vals, K, rv if rv is not None else dummy,
            cw if cw is not None else dummy, mx, logs, mass,
            row_scale.to(f32).contiguous() if row_scale is not None else dummy,
            ce_gscale.to(f32).reshape(1), z_gscale.to(f32).reshape(1),
            dx, dw, db, M, V, H, ls, cap, float(z_loss), float(filter_eps or 0.0), _pow2(M),
            HAS_RS=row_scale is not None, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
            FILTER=filter_eps is not None, PREC=prec, **flags, **blocks)
        dx = dx.to(x2.dtype) if need_dx else None
        dw = dw.to(weight_v.dtype) if need_dw else None
        db = db.to(bias.dtype) if need_db else None
    return ce, z, lse, pred, dx, dw, db


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b

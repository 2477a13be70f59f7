"""Launcher of the linear + cross-entropy kernels: the ``linear_cross_entropy`` entry point of the
triton impl (same contract as :func:`crossent.impl.chunked.linear_cross_entropy`; the registry sends
float64 there). ``chunk_size`` does not apply: the kernels tile rows and vocabulary themselves and
never hold more than a tile of logits. Blocks are autotuned on a GPU (knobs
``triton_fwd_configs`` / ``triton_bwd_configs``); the interpreter gets blocks fitted to the problem.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ...config import CONFIG, triton_interpreted
from ...options import Options
from ...reduction import Reduction
from ...targets import ProbsTarget, Target
from ..common import LinearResult, RowTerms
from .launch import hint, launch

FIN_BM = 64  # rows per program of the kernel that merges the vocabulary splits


def _configs(shapes):
    import triton

    return [triton.Config(dict(BM=bm, BV=bv, BK=bk), num_warps=w, num_stages=st) for bm, bv, bk, w, st in shapes]


def config_lists(dtype: torch.dtype):
    """The autotune candidates ``(forward, backward)`` for inputs of ``dtype``: float32 has its own
    (smaller tiles: its IEEE dots hold more in registers), 16-bit inputs share the others."""
    if dtype == torch.float32:
        return CONFIG.triton_fwd_configs_fp32, CONFIG.triton_bwd_configs_fp32
    return CONFIG.triton_fwd_configs, CONFIG.triton_bwd_configs


def _kernels(dtype: torch.dtype = torch.bfloat16):
    """``(forward, finish, backward, autotuned)`` for inputs of ``dtype``: under ``TRITON_INTERPRET=1``
    (read at every call) the plain kernels (the launcher passes block sizes fitted to the problem),
    else ones autotuned over :func:`config_lists`."""
    return _built(not triton_interpreted(), *config_lists(dtype))


@functools.lru_cache(maxsize=None)
def _built(tuned: bool, fwd_configs, bwd_configs):
    return build_kernels(tuned, fwd_configs=fwd_configs, bwd_configs=bwd_configs)


def build_kernels(tuned: bool, do_bench=None, fwd_configs=None, bwd_configs=None):
    """The kernels, autotuned over ``_FWD_CONFIGS`` / ``_BWD_CONFIGS`` when ``tuned``. The backward
    accumulates with atomics, so its outputs are zeroed before every trial (and before the real
    run). ``do_bench`` replaces the autotuner's timer (tests run it on the interpreter)."""
    import triton

    from .linear_kernels import lce_bwd_kernel, lce_fin_kernel, lce_fwd_kernel

    if not tuned:
        return lce_fwd_kernel, lce_fin_kernel, lce_bwd_kernel, False
    key = ["V", "H", "MB"]
    extra = {} if do_bench is None else {"do_bench": do_bench}
    fwd = triton.autotune(_configs(fwd_configs or CONFIG.triton_fwd_configs), key=key, **extra)(lce_fwd_kernel)
    bwd = triton.autotune(_configs(bwd_configs or CONFIG.triton_bwd_configs), key=key,
                          reset_to_zero=["DX", "DW", "DB"], **extra)(lce_bwd_kernel)
    return fwd, lce_fin_kernel, bwd, True


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_width(M: int, V: int, device: torch.device, grain: int) -> int:
    """Classes per vocabulary split of the forward: enough splits that about two programs per SM
    run when the rows alone give fewer (each split at least 1024 classes), a multiple of ``grain``
    (knob ``triton_fwd_splits`` forces the number of splits)."""
    import triton

    S = CONFIG.triton_fwd_splits
    if S is None and device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        S = max(1, min(triton.cdiv(2 * sms, triton.cdiv(M, 128)), V // 1024))
    return max(grain, triton.cdiv(triton.cdiv(V, max(S or 1, 1)), grain) * grain)


def _pow2(n: int, lo: int = 16, hi: int = 1 << 30) -> int:
    import triton

    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _targets(tgt: Target, w: Optional[Tensor], ls: float, V: int, dummy: Tensor):
    """``(prob, idx, vals, row_valid, K, M)``: the kernels' view of the target."""
    if isinstance(tgt, ProbsTarget):
        prob = tgt.probs[:, :, 0]
        return prob, dummy, dummy, None, 1, prob.shape[0]
    cols, vals, rv = tgt.class_terms(w, ls, V, torch.float32)
    return dummy.reshape(1, 1), cols.contiguous(), vals.contiguous(), rv, cols.shape[1], cols.shape[0]


@dataclass
class _Call:
    """What the three launches of one call share: inputs, target view, flags and blocks."""

    x2: Tensor
    rid: Tensor
    wv: Tensor
    bias: Optional[Tensor]
    cw: Optional[Tensor]
    dummy: Tensor
    prob: Tensor
    idx: Tensor
    vals: Tensor
    rv: Optional[Tensor]
    K: int
    M: int
    opts: Options
    tuned: bool
    blocks: dict  # BM, BV, BK where not autotuned
    dots: dict  # PREC, F32DOT
    flags: dict  # the HAS_* / IS_PROBS constexprs

    @property
    def V(self) -> int:
        return self.wv.shape[0]

    @property
    def H(self) -> int:
        return self.wv.shape[1]

    def ptr(self, t: Optional[Tensor]) -> Tensor:
        return self.dummy if t is None else t

    @property
    def cap(self) -> float:
        return float(self.opts.softcap) if self.opts.softcap is not None else 1.0


def linear_cross_entropy(x2: Tensor, row_ids: Optional[Tensor], linear_weight: Tensor, linear_bias: Optional[Tensor],
                         tgt: Target, opts: Options, red: Reduction, want_grads: Tuple[bool, bool, bool],
                         row_scale: Optional[Tensor] = None) -> LinearResult:
    """Same contract as :func:`crossent.impl.chunked.linear_cross_entropy`."""
    c = _prepare(x2, row_ids, linear_weight, linear_bias, tgt, opts)
    if c.M == 0:
        ce = torch.empty(0, dtype=torch.float32, device=x2.device)
        return LinearResult(RowTerms(ce, ce if opts.z_loss else None, ce,
                                     ce.long() if opts.return_extras else None),
                            torch.zeros_like(x2) if want_grads[0] else None,
                            torch.zeros_like(linear_weight) if want_grads[1] else None,
                            torch.zeros_like(linear_bias) if want_grads[2] else None)
    mx, logs, ce, z, pred, mass = _forward(c)
    lse = torch.where(torch.isinf(mx), mx, mx + logs)
    dx = dw = db = None
    if any(want_grads):
        dx, dw, db = _backward(c, mx, logs, mass, red, want_grads, row_scale)
        dx = dx.to(x2.dtype) if want_grads[0] else None
        dw = dw.to(linear_weight.dtype) if want_grads[1] else None
        db = db.to(linear_bias.dtype) if want_grads[2] else None
    return LinearResult(RowTerms(ce, z, lse, pred), dx, dw, db)


def _prepare(x2, row_ids, linear_weight, linear_bias, tgt: Target, opts: Options) -> _Call:
    f32, dev = torch.float32, x2.device
    V, H = linear_weight.shape
    cw = opts.class_weight(f32)
    cw = None if cw is None else cw.contiguous()
    dummy = torch.zeros(1, dtype=f32, device=dev)
    prob, idx, vals, rv, K, M = _targets(tgt, cw, opts.label_smoothing, V, dummy)
    _, _, _, tuned = _kernels(x2.dtype)
    bm_max, bv_max, bk_max = CONFIG.triton_linear_blocks
    return _Call(
        x2=x2 if x2.stride(-1) == 1 else x2.contiguous(), rid=row_ids if row_ids is not None else dummy,
        wv=linear_weight if linear_weight.stride(-1) == 1 else linear_weight.contiguous(), bias=linear_bias,
        cw=cw, dummy=dummy, prob=prob, idx=idx, vals=vals, rv=rv, K=K, M=M, opts=opts, tuned=tuned,
        # autotuned launches choose the blocks themselves; the interpreter gets sizes fitted to the problem
        blocks={} if tuned else dict(BM=_pow2(hint(M), hi=bm_max), BV=_pow2(hint(V), hi=bv_max),
                                      BK=_pow2(hint(H), hi=bk_max)),
        # the interpreter's tl.dot misreads 16-bit floats: it runs those dots in float32
        dots=dict(PREC="ieee" if x2.dtype == f32 else "tf32", F32DOT=triton_interpreted() and x2.element_size() < 4),
        flags=dict(IS_PROBS=isinstance(tgt, ProbsTarget), HAS_RID=row_ids is not None, HAS_B=linear_bias is not None,
                   HAS_CW=cw is not None, HAS_LS=opts.label_smoothing > 0, HAS_CAP=opts.softcap is not None))


def _forward(c: _Call):
    """Per-split online statistics (forward kernel), merged into the loss terms (finish kernel)."""
    import triton

    fwd, fin, _, _ = _kernels(c.x2.dtype)
    f32, dev, M, V, H = torch.float32, c.x2.device, c.M, c.V, c.H
    ls, want_pred = c.opts.label_smoothing, c.opts.return_extras
    split_v = _split_width(hint(M), hint(V), dev, CONFIG.triton_split_grain if c.tuned else c.blocks["BV"])
    S = triton.cdiv(V, split_v)
    pm, ps = (torch.empty((S, M), dtype=f32, device=dev) for _ in range(2))
    pd, pt = (torch.empty((S, M), dtype=f32, device=dev) for _ in range(2)) \
        if c.flags["IS_PROBS"] or ls > 0 else (c.dummy, c.dummy)
    pb, pbi = (torch.empty((S, M), dtype=f32, device=dev), torch.empty((S, M), dtype=torch.long, device=dev)) \
        if want_pred else (c.dummy, c.dummy)
    launch(fwd)[lambda meta: (triton.cdiv(M, meta["BM"]), S)](
        c.x2, c.x2.stride(0), c.rid, c.wv, c.wv.stride(0), c.ptr(c.bias),
        c.prob, c.prob.stride(0), c.prob.stride(1), c.ptr(c.cw),
        pm, ps, pd, pt, pb, pbi, M, V, H, split_v, ls, c.cap, _pow2(hint(M)),
        WANT_PRED=want_pred, **c.dots, **c.flags, **c.blocks)
    mx, logs, ce, mass = (torch.empty(M, dtype=f32, device=dev) for _ in range(4))
    z = torch.empty(M, dtype=f32, device=dev) if c.opts.z_loss else None
    pred = torch.empty(M, dtype=torch.long, device=dev) if want_pred else None
    launch(fin)[(triton.cdiv(M, FIN_BM),)](
        c.x2, c.x2.stride(0), c.rid, c.wv, c.wv.stride(0), c.ptr(c.bias),
        pm, ps, pd, pt, pb, pbi, S, c.idx, c.vals, c.K, c.ptr(c.rv),
        c.cw.sum().reshape(1) if c.cw is not None else c.dummy,
        mx, logs, ce, c.ptr(z), c.ptr(pred), mass,
        M, V, H, ls, c.cap, float(c.opts.z_loss), WANT_PRED=want_pred, BM=FIN_BM,
        BK=_pow2(hint(H), hi=CONFIG.triton_linear_blocks[2]), **c.flags, **_loss_flags(c))
    return mx, logs, ce, z, pred, mass


def _loss_flags(c: _Call) -> dict:
    """The flags of the kernels that form the loss terms (finish) and their gradient (backward)."""
    return dict(HAS_RV=c.rv is not None, HAS_Z=bool(c.opts.z_loss), KP=_pow2(c.K, lo=1))


def _backward(c: _Call, mx: Tensor, logs: Tensor, mass: Tensor, red: Reduction, want_grads, row_scale):
    """The input, weight and bias gradients in float32 (atomics over row blocks x vocabulary tiles)."""
    import triton

    _, _, bwd, _ = _kernels(c.x2.dtype)
    f32, dev, M, V, H = torch.float32, c.x2.device, c.M, c.V, c.H
    need_dx, need_dw, need_db = want_grads
    dx = torch.zeros(c.x2.shape, dtype=f32, device=dev) if need_dx else c.dummy
    dw = torch.zeros((V, H), dtype=f32, device=dev) if need_dw else c.dummy
    db = torch.zeros(V, dtype=f32, device=dev) if need_db else c.dummy
    eps = c.opts.filter_eps
    launch(bwd)[lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(V, meta["BV"]))](
        c.x2, c.x2.stride(0), c.rid, c.wv, c.wv.stride(0), c.ptr(c.bias),
        c.prob, c.prob.stride(0), c.prob.stride(1),
        c.idx, c.vals, c.K, c.ptr(c.rv), c.ptr(c.cw), mx, logs, mass,
        row_scale.to(f32).contiguous() if row_scale is not None else c.dummy,
        red.ce_scale.to(f32).reshape(1), red.z_scale.to(f32).reshape(1),
        dx, dw, db, M, V, H, c.opts.label_smoothing, c.cap, float(c.opts.z_loss), float(eps or 0.0), _pow2(hint(M)),
        HAS_RS=row_scale is not None, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db, FILTER=eps is not None,
        EMULATE_RTNE=triton_interpreted() and c.x2.dtype == torch.bfloat16,
        **c.dots, **c.flags, **_loss_flags(c), **c.blocks)
    return dx, dw, db

"""Triton kernels for linear + cross-entropy in the style of Cut Cross-Entropy
(``@triton.jit`` only; the launcher is :mod:`crossent.impl.triton.linear`).

Forward: one program per (block of ``BM`` rows, split of the vocabulary)
streams its classes in ``BV``-wide tiles, each a ``[BM, BV]`` tile of logits
from a tiled matmul over the hidden size, and keeps only per-row online
statistics (max, sum-exp, argmax, the smoothing or soft-target sums), written
per split; splitting the vocabulary keeps every SM busy when there are few
row blocks. A second kernel merges the splits and forms the loss terms.
Nothing of size ``[N, V]`` is written.

Backward: one program per (row block, vocab tile) recomputes its logits tile,
forms the logits' gradient in float32 and adds ``dl @ W_tile`` into the input
gradient and ``dl^T @ X_rows`` into the weight gradient (float32 atomics).
With ``FILTER``, tiles whose gradient is below ``filter_eps`` everywhere are
skipped (an approximation; off by default).
"""

import triton
import triton.language as tl

from .kernels import (_class_weights, _max_shift, _merge_argmax, _nan_max, _round_to, _shifted_sum, _smoothed,
                      _tanh, _track_argmax)


@triton.jit
def _row_block(pid, RID, M, HAS_RID: tl.constexpr, BM: tl.constexpr):
    """Positions ``r`` of row block ``pid``, their mask, and the rows of ``X`` they read (through
    ``RID`` when ``shift`` skips each sequence's last position)."""
    r = pid * BM + tl.arange(0, BM).to(tl.int64)
    rmask = r < M
    rows = r
    if HAS_RID:
        rows = tl.load(RID + r, mask=rmask, other=0).to(tl.int64)
    return r, rmask, rows


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, F32DOT: tl.constexpr):
    """``acc + a @ b``; ``F32DOT``: in float32 (the interpreter's ``tl.dot`` misreads bf16 storage)."""
    if F32DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PREC)
    return out


@triton.jit
def _logits_tile(X, sxr, rows, rmask, W, swv, B, v, vmask, H,
                 HAS_B: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                 F32DOT: tl.constexpr):
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    for k0 in range(0, H, BK):
        kk = k0 + tl.arange(0, BK).to(tl.int64)
        km = kk < H
        a = tl.load(X + rows[:, None] * sxr + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        w = tl.load(W + v[:, None] * swv + kk[None, :], mask=vmask[:, None] & km[None, :], other=0.0)
        acc = _dot(a, tl.trans(w), acc, PREC, F32DOT)
    if HAS_B:
        acc += tl.load(B + v, mask=vmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def lce_fwd_kernel(
    X, sxr, RID, W, swv, B,
    PROB, spr, spv,  # probability targets [M, V]
    CW,  # class weights [V]
    PM, PS, PD, PT, PBEST, PBESTI,  # per-split partial statistics [S, M]
    M, V, H, SPLIT_V, ls, softcap, MB,  # MB: a bucket of M, for the autotuner's key only
    IS_PROBS: tl.constexpr, HAS_RID: tl.constexpr, HAS_B: tl.constexpr, HAS_CW: tl.constexpr,
    HAS_LS: tl.constexpr, HAS_CAP: tl.constexpr, WANT_PRED: tl.constexpr,
    BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, F32DOT: tl.constexpr,
):
    """Program (row block, vocabulary split): online statistics of its ``SPLIT_V`` classes."""
    split = tl.program_id(1).to(tl.int64)
    r, rmask, rows = _row_block(tl.program_id(0).to(tl.int64), RID, M, HAS_RID, BM)
    inv_v = 1.0 / V
    v_lo = split * SPLIT_V
    v_hi = tl.minimum(v_lo + SPLIT_V, V)

    m = tl.zeros([BM], dtype=tl.float32) - float("inf")
    s = tl.zeros([BM], dtype=tl.float32)
    best = tl.zeros([BM], dtype=tl.float32) - float("inf")
    besti = tl.zeros([BM], dtype=tl.int64)
    d = tl.zeros([BM], dtype=tl.float32)  # sum c * (ref - x): c the target mass (probs) or w_c (smoothing)
    tot = tl.zeros([BM], dtype=tl.float32)  # sum c
    for v0 in range(v_lo, v_hi, BV):
        v = v0 + tl.arange(0, BV).to(tl.int64)
        vmask = v < v_hi
        x = _logits_tile(X, sxr, rows, rmask, W, swv, B, v, vmask, H, HAS_B, BM, BV, BK, PREC, F32DOT)
        if WANT_PRED:  # of the raw logits: softcap's tanh may saturate distinct logits into a tie
            best, besti = _track_argmax(tl.where(vmask[None, :], x, float("-inf")), v0,
                                        tl.arange(0, BV)[None, :], best, besti, 1)
        if HAS_CAP:
            x = softcap * _tanh(x / softcap)
        x = tl.where(vmask[None, :], x, float("-inf"))
        tmax = _nan_max(x, 1)
        m_new, m_ref, shift = _max_shift(m, tmax)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[:, None]), 1)
        m = m_new
        dx = m_ref[:, None] - x
        wc = _class_weights(CW, v, vmask, HAS_CW)
        if IS_PROBS:
            t = tl.load(PROB + r[:, None] * spr + v[None, :] * spv, mask=rmask[:, None] & vmask[None, :],
                        other=0.0).to(tl.float32)
            q = tl.where(vmask[None, :], _smoothed(t, ls, inv_v, HAS_LS) * wc[None, :], 0.0)
            d = _shifted_sum(d, tot, shift, q, dx, 1)
            tot += tl.sum(q, 1)
        elif HAS_LS:
            wcb = wc[None, :] + tl.zeros([BM, BV], dtype=tl.float32)
            d = _shifted_sum(d, tot, shift, wcb, dx, 1)
            tot += tl.sum(wcb, 1)
    o = split * M + r
    tl.store(PM + o, m, mask=rmask)
    tl.store(PS + o, s, mask=rmask)
    if IS_PROBS or HAS_LS:
        tl.store(PD + o, d, mask=rmask)
        tl.store(PT + o, tot, mask=rmask)
    if WANT_PRED:
        tl.store(PBEST + o, best, mask=rmask)
        tl.store(PBESTI + o, besti, mask=rmask)


@triton.jit
def lce_fin_kernel(
    X, sxr, RID, W, swv, B,
    PM, PS, PD, PT, PBEST, PBESTI, S,  # the forward's partial statistics [S, M]
    IDX, VAL, K, RV,  # sparse-like targets [M, K]; row validity [M]
    CWSUM,  # the class weights' sum
    MX, LOGS, CE, Z, PRED, MASS,  # per-row outputs [M]
    M, V, H, ls, softcap, z_loss,
    IS_PROBS: tl.constexpr, HAS_RID: tl.constexpr, HAS_B: tl.constexpr, HAS_CW: tl.constexpr,
    HAS_RV: tl.constexpr, HAS_LS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_Z: tl.constexpr,
    WANT_PRED: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    """Program per row block: merge the splits' statistics, then the loss terms (the target logits
    by a ``[BM, K]`` gather of rows of ``W``)."""
    r, rmask, rows = _row_block(tl.program_id(0).to(tl.int64), RID, M, HAS_RID, BM)
    inv_v = 1.0 / V

    m = tl.zeros([BM], dtype=tl.float32) - float("inf")
    s = tl.zeros([BM], dtype=tl.float32)
    best = tl.zeros([BM], dtype=tl.float32) - float("inf")
    besti = tl.zeros([BM], dtype=tl.int64)
    d = tl.zeros([BM], dtype=tl.float32)
    tot = tl.zeros([BM], dtype=tl.float32)
    for j in range(0, S):
        o = j * M + r
        pm = tl.load(PM + o, mask=rmask, other=float("-inf"))
        ps = tl.load(PS + o, mask=rmask, other=0.0)
        pref = tl.where(pm == float("-inf"), 0.0, pm)  # the reference the split's sums are kept against
        m_new, m_ref, shift = _max_shift(m, pm)
        s = s * tl.exp(m - m_ref) + ps * tl.exp(pref - m_ref)
        if IS_PROBS or HAS_LS:
            pd = tl.load(PD + o, mask=rmask, other=0.0)
            pt = tl.load(PT + o, mask=rmask, other=0.0)
            # rebase both sums on m_ref: ours moved by shift, the split's by m_ref - pref
            d = _shifted_sum(d + pd, tot, shift, pt[:, None], (m_ref - pref)[:, None], 1)
            tot += pt
        m = m_new
        if WANT_PRED:
            pb = tl.load(PBEST + o, mask=rmask, other=float("-inf"))
            pbi = tl.load(PBESTI + o, mask=rmask, other=0)
            best, besti = _merge_argmax(best, besti, pb, pbi)  # ties keep the earlier split: the first class
    logs = tl.log(tl.where(rmask, s, 1.0))  # rows past M: no log(0)

    rv = tl.zeros([BM], dtype=tl.float32) + 1.0
    if HAS_RV:
        rv = tl.load(RV + r, mask=rmask, other=0.0).to(tl.float32)
    wsum = V * 1.0
    if HAS_CW:
        wsum = tl.load(CWSUM).to(tl.float32)
    if IS_PROBS:
        ce = tot * logs + d
        mass = tot
    else:
        kk = tl.arange(0, KP)
        km = rmask[:, None] & (kk[None, :] < K)
        cols = tl.load(IDX + r[:, None] * K + kk[None, :], mask=km, other=0).to(tl.int64)
        vals = tl.load(VAL + r[:, None] * K + kk[None, :], mask=km, other=0.0).to(tl.float32)
        # the target classes' logits: rows of W gathered one target class at a time, so that the
        # registers held ([BM, BK] tiles) do not grow with k
        xy = tl.zeros([BM, KP], dtype=tl.float32)
        for j in range(0, K):
            cj = tl.load(IDX + r * K + j, mask=rmask, other=0).to(tl.int64)
            xj = tl.zeros([BM], dtype=tl.float32)
            for k0 in range(0, H, BK):
                hh = k0 + tl.arange(0, BK).to(tl.int64)
                m2 = rmask[:, None] & (hh < H)[None, :]
                a = tl.load(X + rows[:, None] * sxr + hh[None, :], mask=m2, other=0.0)
                wy = tl.load(W + cj[:, None] * swv + hh[None, :], mask=m2, other=0.0)
                xj += tl.sum(a.to(tl.float32) * wy.to(tl.float32), 1)
            xy += tl.where(kk[None, :] == j, xj[:, None], 0.0)
        if HAS_B:
            xy += tl.load(B + cols, mask=km, other=0.0).to(tl.float32)
        if HAS_CAP:
            xy = softcap * _tanh(xy / softcap)
        ce = tl.sum(tl.where(vals == 0.0, 0.0, vals * ((m[:, None] - xy) + logs[:, None])), 1)
        mass = tl.sum(vals, 1)
        if HAS_LS:  # ignored rows drop out by selection: their sums may be inf (0 * inf is NaN)
            ce += tl.where(rv > 0.0, ls * inv_v * (wsum * logs + d), 0.0)
            mass += ls * inv_v * wsum * rv
    tl.store(MX + r, m, mask=rmask)
    tl.store(LOGS + r, logs, mask=rmask)
    tl.store(CE + r, ce, mask=rmask)
    tl.store(MASS + r, mass, mask=rmask)
    if HAS_Z:
        lse = m + logs
        tl.store(Z + r, tl.where(rv > 0.0, z_loss * lse * lse, 0.0), mask=rmask)
    if WANT_PRED:
        tl.store(PRED + r, besti, mask=rmask)


@triton.jit
def lce_bwd_kernel(
    X, sxr, RID, W, swv, B,
    PROB, spr, spv,
    IDX, VAL, K, RV,
    CW, MX, LOGS, MASS, RS,  # RS: per-row incoming gradient (reduction='none')
    CE_G, Z_G,
    DX, DW, DB,  # float32 accumulators [R, H], [V, H], [V]
    M, V, H, ls, softcap, z_loss, filter_eps, MB,  # MB: a bucket of M, for the autotuner's key only
    IS_PROBS: tl.constexpr, HAS_RID: tl.constexpr, HAS_B: tl.constexpr, HAS_CW: tl.constexpr,
    HAS_RV: tl.constexpr, HAS_LS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_RS: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    FILTER: tl.constexpr, KP: tl.constexpr,
    BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, F32DOT: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    pid_v = tl.program_id(1).to(tl.int64)
    r, rmask, rows = _row_block(tl.program_id(0).to(tl.int64), RID, M, HAS_RID, BM)
    v = pid_v * BV + tl.arange(0, BV).to(tl.int64)
    vmask = v < V
    inv_v = 1.0 / V

    raw = _logits_tile(X, sxr, rows, rmask, W, swv, B, v, vmask, H, HAS_B, BM, BV, BK, PREC, F32DOT)
    x = raw
    if HAS_CAP:
        th = _tanh(raw / softcap)
        x = softcap * th
    m = tl.load(MX + r, mask=rmask, other=0.0)
    logs = tl.load(LOGS + r, mask=rmask, other=0.0)
    valid = rmask[:, None] & vmask[None, :]
    p = tl.where(valid, tl.exp((x - m[:, None]) - logs[:, None]), 0.0)
    rv = tl.zeros([BM], dtype=tl.float32) + 1.0
    g = rv * tl.load(CE_G).to(tl.float32)
    if HAS_RV:  # NaN scale (class weights summing to 0) reaches counted rows only, as in PyTorch
        rv = tl.load(RV + r, mask=rmask, other=0.0).to(tl.float32)
        g = tl.where(rv > 0.0, g, 0.0)
    coef = tl.load(MASS + r, mask=rmask, other=0.0) * g
    if HAS_Z:
        coef += 2.0 * z_loss * tl.load(Z_G).to(tl.float32) * (m + logs) * rv
    wc = _class_weights(CW, v, vmask, HAS_CW)
    dl = coef[:, None] * p
    if IS_PROBS:
        t = tl.load(PROB + r[:, None] * spr + v[None, :] * spv, mask=valid, other=0.0).to(tl.float32)
        dl -= g[:, None] * tl.where(valid, _smoothed(t, ls, inv_v, HAS_LS) * wc[None, :], 0.0)
    else:
        for j in tl.static_range(KP):
            jm = rmask & ((r * 0 + j) < K)
            cj = tl.load(IDX + r * K + j, mask=jm, other=-1).to(tl.int64)
            vj = tl.load(VAL + r * K + j, mask=jm, other=0.0).to(tl.float32)
            dl -= g[:, None] * tl.where(v[None, :] == cj[:, None], vj[:, None], 0.0)
        if HAS_LS:
            dl -= (ls * inv_v * g * rv)[:, None] * wc[None, :]
    if HAS_CAP:
        dl *= 1.0 - th * th
    if HAS_RS:
        dl *= tl.load(RS + r, mask=rmask, other=0.0).to(tl.float32)[:, None]
    dl = tl.where(valid, dl, 0.0)

    go_on = True
    if FILTER:
        go_on = tl.max(tl.max(tl.abs(dl), 1), 0) >= filter_eps
    if go_on:
        dlc = dl if F32DOT else _round_to(dl, X.dtype.element_ty, EMULATE_RTNE)
        if NEED_DB:
            tl.atomic_add(DB + v, tl.sum(dl, 0), mask=vmask)
        for k0 in range(0, H, BK):
            kk = k0 + tl.arange(0, BK).to(tl.int64)
            km = kk < H
            if NEED_DX:
                w = tl.load(W + v[:, None] * swv + kk[None, :], mask=vmask[:, None] & km[None, :], other=0.0)
                part = _dot(dlc, w, tl.zeros([BM, BK], dtype=tl.float32), PREC, F32DOT)
                tl.atomic_add(DX + rows[:, None] * H + kk[None, :], part, mask=rmask[:, None] & km[None, :])
            if NEED_DW:
                a = tl.load(X + rows[:, None] * sxr + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
                part = _dot(tl.trans(dlc), a, tl.zeros([BV, BK], dtype=tl.float32), PREC, F32DOT)
                tl.atomic_add(DW + v[:, None] * H + kk[None, :], part, mask=vmask[:, None] & km[None, :])


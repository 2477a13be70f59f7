"""Triton kernels for cross-entropy (``@triton.jit`` only; launchers live in
:mod:`crossent.impl.triton.cross_entropy`).

One program per position (row). Pass 1 streams the row's class tiles once:
online max / sum-exp (the log-sum-exp), the running argmax, and the dot
products the loss needs. Pass 2 (only when a gradient is wanted) re-reads the
row (from L2 on a GPU) and writes ``coef * softmax - target mass`` for every
class; the k target classes are then rewritten from values kept in
registers, so their gradient is formed in float32 and rounded once. The
gradient may alias the logits (``inplace_backward``): every logit a later
step needs is read before it is overwritten. All offsets are int64.
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(u):
    """tanh in float32 from exp (libdevice is not available in the interpreter)."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    u2 = a * a
    small = a * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0))))
    t = tl.where(a < 0.125, small, big)
    return tl.where(u < 0, -t, t)


@triton.jit
def _class_weights(W, offs, mask, HAS_W: tl.constexpr):
    """Class weights of a tile (1 where unweighted, 0 outside the classes)."""
    if HAS_W:
        return tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, 1.0, 0.0)


@triton.jit
def _smoothed(t, ls, inv_c, HAS_LS: tl.constexpr):
    """Target probabilities after label smoothing."""
    if HAS_LS:
        return t * (1.0 - ls) + ls * inv_c
    return t


@triton.jit
def _track_argmax(x, lo, idx, best, besti, axis: tl.constexpr):
    """Running (max, argmax) over class tiles, as ``torch.argmax``: ties keep the first class, and a
    NaN wins over every number (the first NaN). ``idx`` holds positions broadcast like ``x`` and
    ``lo`` is added to them: the linear kernel passes int32 positions in the tile and the tile's first
    class (int64 class ids there cost a [BM, BV] tile of 64-bit registers)."""
    big = 1 << 30
    isn = x != x
    nan_i = tl.min(tl.where(isn, idx, big), axis)
    xn = tl.where(isn, float("-inf"), x)
    tmax = tl.max(xn, axis)
    ti = tl.min(tl.where(xn == tl.expand_dims(tmax, axis), idx, big), axis)
    has_nan = nan_i < big
    return _merge_argmax(best, besti, tl.where(has_nan, float("nan"), tmax),
                         lo + tl.where(has_nan, nan_i, ti).to(tl.int64))


@triton.jit
def _merge_argmax(best, besti, tmax, ti):
    """Merge a later block's (max, argmax) into the running one: NaN wins and stays; ties keep the earlier."""
    best_nan = best != best
    t_nan = tmax != tmax
    take = (~best_nan) & (t_nan | (tmax > best))
    return tl.where(take, tmax, best), tl.where(take, ti, besti)


@triton.jit
def _round_to(x, dtype: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """``x.to(dtype)``, rounded to nearest even. A GPU does that in the conversion; the interpreter
    truncates float32 to bfloat16, so ``EMULATE_RTNE`` rounds the bits first (bfloat16 only)."""
    if EMULATE_RTNE:
        u = x.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        r = (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        y = tl.where(x != x, x.to(dtype), r)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _nan_max2(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _nan_max(x, axis: tl.constexpr):
    """``tl.max`` that propagates NaN, as ``torch.amax`` does: a row holding NaN gets NaN statistics
    (``lse`` NaN, as ``torch.logsumexp``), not those of its numbers."""
    return tl.reduce(x, axis, _nan_max2)


@triton.jit
def _max_shift(m, tmax):
    """Online max update: ``(m_new, ref, shift)``, ``ref`` the new reference point (0 while the max is -inf)
    and ``shift`` how far it moved."""
    m_new = tl.maximum(m, tmax, propagate_nan=tl.PropagateNan.ALL)
    m_old = tl.where(m == float("-inf"), 0.0, m)
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, ref, ref - m_old


@triton.jit
def _shifted_sum(acc, total, shift, c, d, axis: tl.constexpr):
    """``sum c * (ref - x)`` kept against a moving reference; ``0 * inf`` counts 0."""
    return acc + tl.where(total == 0.0, 0.0, total * shift) + tl.sum(tl.where(c == 0.0, 0.0, c * d), axis)


@triton.jit
def ce_fwd_kernel(
    X, sxp, sxc, sxq,  # logits viewed as [P, C, Q]
    G, sgp, sgc, sgq,  # gradient out, same view (may alias X)
    PROB, spp, spc, spq,  # probability targets [P, C, Q]
    IDX, VAL, K,  # sparse-like targets: [M, K] classes and masses
    RV,  # [M] 1/0 row validity (index targets)
    W, WSUM,  # class weights [C] and their sum (a 1-element tensor)
    CE_G, Z_G,  # 1-element tensors: gradient scales of the CE and z-loss sums
    CE, Z, LSE, PRED,  # per-position outputs [M]
    Q, C, ls, softcap, z_loss,
    IS_PROBS: tl.constexpr, HAS_W: tl.constexpr, HAS_RV: tl.constexpr, HAS_LS: tl.constexpr,
    HAS_CAP: tl.constexpr, HAS_Z: tl.constexpr, WANT_GRAD: tl.constexpr, WANT_PRED: tl.constexpr,
    KP: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    p = r // Q
    q = r % Q
    xrow = X + p * sxp + q * sxq
    prow = PROB + p * spp + q * spq
    inv_c = 1.0 / C

    m = tl.zeros([], dtype=tl.float32) - float("inf")
    s = tl.zeros([], dtype=tl.float32)
    best = tl.zeros([], dtype=tl.float32) - float("inf")
    besti = tl.zeros([], dtype=tl.int64)
    # Sums of w_c (m - x_c) and q_c (m - x_c) against the running max m (as PyTorch's
    # log_softmax does): non-negative terms, no cancellation between lse and x.
    wd = tl.zeros([], dtype=tl.float32)
    ws = tl.zeros([], dtype=tl.float32)
    qd = tl.zeros([], dtype=tl.float32)
    qs = tl.zeros([], dtype=tl.float32)
    for c0 in range(0, C, BLOCK):
        offs = c0 + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < C
        x = tl.load(xrow + offs * sxc, mask=mask, other=float("-inf")).to(tl.float32)
        if WANT_PRED:  # of the raw logits: softcap's tanh may saturate distinct logits into a tie
            best, besti = _track_argmax(x, 0, offs, best, besti, 0)  # (int32 positions made ptxas spill here)
        if HAS_CAP:
            x = tl.where(mask, softcap * _tanh(x / softcap), float("-inf"))
        tmax = _nan_max(x, 0)
        m_new, m_ref, shift = _max_shift(m, tmax)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), 0)
        m = m_new
        dx = m_ref - x
        wc = _class_weights(W, offs, mask, HAS_W)
        if IS_PROBS:
            t = _smoothed(tl.load(prow + offs * spc, mask=mask, other=0.0).to(tl.float32), ls, inv_c, HAS_LS)
            qc = tl.where(mask, t * wc, 0.0)
            qd = _shifted_sum(qd, qs, shift, qc, dx, 0)
            qs += tl.sum(qc, 0)
        elif HAS_LS:
            wd = _shifted_sum(wd, ws, shift, wc, dx, 0)
            ws += tl.sum(wc, 0)
    logs = tl.log(s)
    lse = tl.where((m == float("inf")) | (m == float("-inf")), m, m + logs)  # as torch.logsumexp (NaN stays)

    rv = 1.0
    if HAS_RV:
        rv = tl.load(RV + r).to(tl.float32)
    wsum = C * 1.0
    if HAS_W:
        wsum = tl.load(WSUM).to(tl.float32)
    kk = tl.arange(0, KP)
    kmask = kk < K
    if IS_PROBS:
        ce = qs * logs + qd
        mass = qs
    else:
        cols = tl.load(IDX + r * K + kk, mask=kmask, other=0).to(tl.int64)
        vals = tl.load(VAL + r * K + kk, mask=kmask, other=0.0).to(tl.float32)
        xy = tl.load(xrow + cols * sxc, mask=kmask, other=0.0).to(tl.float32)  # read before any overwrite
        thy = xy
        if HAS_CAP:
            thy = _tanh(xy / softcap)
            xy = softcap * thy
        ce = tl.sum(tl.where(vals == 0.0, 0.0, vals * ((m - xy) + logs)), 0)
        mass = tl.sum(vals, 0)
        if HAS_LS:  # ignored rows drop out by selection: their sums may be inf (0 * inf is NaN)
            ce += tl.where(rv > 0.0, ls * inv_c * (wsum * logs + wd), 0.0)
            mass += ls * inv_c * wsum * rv
    tl.store(CE + r, ce)
    tl.store(LSE + r, lse)
    if HAS_Z:
        tl.store(Z + r, tl.where(rv > 0.0, z_loss * lse * lse, 0.0))
    if WANT_PRED:
        tl.store(PRED + r, besti)

    if WANT_GRAD:
        g = tl.load(CE_G).to(tl.float32)
        if HAS_RV:  # NaN scale (class weights summing to 0) reaches counted rows only, as in PyTorch
            g = tl.where(rv > 0.0, g, 0.0)
        coef = mass * g
        if HAS_Z:
            coef += 2.0 * z_loss * tl.load(Z_G).to(tl.float32) * lse * rv
        sm = ls * inv_c * g * rv  # label-smoothing mass per unit weight (index / sparse targets)
        grow = G + p * sgp + q * sgq
        for c0 in range(0, C, BLOCK):
            offs = c0 + tl.arange(0, BLOCK).to(tl.int64)
            mask = offs < C
            x = tl.load(xrow + offs * sxc, mask=mask, other=0.0).to(tl.float32)
            if HAS_CAP:
                th = _tanh(x / softcap)
                x = softcap * th
            gr = coef * tl.exp((x - m) - logs)
            wc = _class_weights(W, offs, mask, HAS_W)
            if IS_PROBS:
                t = _smoothed(tl.load(prow + offs * spc, mask=mask, other=0.0).to(tl.float32), ls, inv_c, HAS_LS)
                gr -= g * t * wc
            elif HAS_LS:
                gr -= sm * wc
            if HAS_CAP:
                gr *= 1.0 - th * th
            tl.store(grow + offs * sgc, _round_to(gr, G.dtype.element_ty, EMULATE_RTNE), mask=mask)
        if not IS_PROBS:
            # Rewrite the k target classes in float32: coef * p - (sum of the masses at that class + smoothing).
            tl.debug_barrier()
            same = cols[:, None] == cols[None, :]
            tot = tl.sum(tl.where(same & kmask[None, :], vals[None, :], 0.0), 1)
            gy = coef * tl.exp((xy - m) - logs) - g * tot
            if HAS_LS:
                gy -= sm * _class_weights(W, cols, kmask, HAS_W)
            if HAS_CAP:
                gy *= 1.0 - thy * thy
            tl.store(grow + cols * sgc, _round_to(gy, G.dtype.element_ty, EMULATE_RTNE), mask=kmask)


"""Fused chunked cross-entropy and linear + cross-entropy with torch ops: any device.

One pass over row chunks computes, per position, the loss terms and -- when a
gradient is wanted -- the gradient of the (already scaled) loss, written
straight into the caller's buffer. No ``[N, C]`` log-softmax is kept: the only
full-size tensor is the gradient itself (none at all with
``inplace_backward``, which writes it over the logits).

For a chunk of rows with logits ``x`` (after the optional softcap), ``lse``
their log-sum-exp, ``p = softmax(x)``, the gradient of one position's loss is
``S * p - m + 2 * z_loss * lse * p`` where ``m`` is the target mass
(``(1 - eps) * w_y`` at the true class for index targets, ``w_c * q_c`` for
probabilities, the k weighted values for top-k targets, plus ``eps/C * w``
for label smoothing) and ``S = sum(m)``.

Losses are formed as sums of ``(x_max - x) >= 0`` plus ``log(sum exp(x - x_max))``,
like PyTorch's log_softmax: no cancellation between a large lse and a large
logit. Terms of ignored positions are removed by selection, never by
multiplying with 0 (``0 * inf`` would be NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..config import CONFIG
from ..options import Options
from ..reduction import Reduction
from ..targets import ProbsTarget, Target
from .common import LinearResult, RowTerms, acc_dtype, host_reads_free, linear_chunk_rows

NAME = "chunked"


def cross_entropy(x3: Tensor, tgt: Target, opts: Options, red: Reduction, grad3: Optional[Tensor] = None) -> RowTerms:
    """Per-position terms for logits ``x3`` ``[P, C, Q]``; when ``grad3`` (same shape as ``x3``; it may
    be ``x3`` itself) is given, the gradient of ``sum(ce) * ce_scale + sum(z) * z_scale`` is written
    into it."""
    acc = acc_dtype(x3.dtype)
    return _cross_entropy(x3, tgt, opts, opts.class_weight(acc), red.ce_scale.to(acc), red.z_scale.to(acc),
                          grad3, opts.return_extras)


@dataclass
class _Rows:
    """Per-position quantities of a call, ``M`` rows, filled before and during the pass over the logits."""

    probs: bool
    xmax: Tensor  # [M] max logit (after softcap)
    logs: Tensor  # [M] log sum exp(x - x_max)
    pred: Optional[Tensor]  # [M] argmax
    mass: Tensor  # [M] total target mass (weighted, smoothed)
    qd: Optional[Tensor] = None  # probs: [M] sum_c q_c (x_max - x_c)
    wd: Optional[Tensor] = None  # smoothing: [M] sum_c w_c (x_max - x_c)
    cols: Optional[Tensor] = None  # index / top-k: [M, k] classes
    vals: Optional[Tensor] = None  # [M, k] their masses
    row_valid: Optional[Tensor] = None  # index targets: [M] 1/0
    xy: Optional[Tensor] = None  # [M, k] target logits (after softcap)
    g_rows: Optional[Tensor] = None  # gradient: [M] scale of each row's CE (0 where ignored)
    zb: Optional[Tensor] = None  # gradient with z-loss: [M] 2 z z_scale (0 where ignored)


def _cross_entropy(x3: Tensor, tgt: Target, opts: Options, w: Optional[Tensor], ce_scale: Tensor,
                   z_scale: Tensor, grad3: Optional[Tensor], want_predicted: bool) -> RowTerms:
    P, C, Q = x3.shape
    rows = _prepare(x3, tgt, opts, w, ce_scale, z_scale, grad3 is not None, want_predicted)
    _chunk_pass(x3, tgt, opts, w, rows, ce_scale, grad3)
    return _loss_terms(rows, opts, w, C)


def _prepare(x3: Tensor, tgt: Target, opts: Options, w: Optional[Tensor], ce_scale: Tensor, z_scale: Tensor,
             need_grad: bool, want_predicted: bool) -> _Rows:
    """Per-position target terms for all rows at once: O(M k) work, no pass over the logits."""
    P, C, Q = x3.shape
    M, acc, dev = P * Q, acc_dtype(x3.dtype), x3.device
    rows = _Rows(probs=isinstance(tgt, ProbsTarget), xmax=torch.empty(M, dtype=acc, device=dev),
                 logs=torch.empty(M, dtype=acc, device=dev),
                 pred=torch.empty(M, dtype=torch.long, device=dev) if want_predicted else None,
                 mass=torch.empty(M, dtype=acc, device=dev))
    ls = opts.label_smoothing
    if rows.probs:
        rows.qd = torch.empty(M, dtype=acc, device=dev)
    else:
        rows.cols, rows.vals, rows.row_valid = tgt.class_terms(w, ls, C, acc)
        k = rows.cols.shape[1]
        xy = x3.gather(1, rows.cols.reshape(P, Q, k).transpose(1, 2)).transpose(1, 2).reshape(M, k).to(acc)
        rows.xy = opts.softcap * torch.tanh(xy / opts.softcap) if opts.softcap is not None else xy
        mass = rows.vals.sum(1)
        if ls > 0:
            sm = (ls / C) * (float(C) if w is None else w.sum())
            mass = _valid_only(rows, mass + sm)  # ignored rows carry no mass (their vals are 0)
            rows.wd = torch.empty(M, dtype=acc, device=dev)
        rows.mass = mass
    if need_grad:
        rows.g_rows = _valid_only(rows, ce_scale.expand(M))
        if opts.z_loss:
            rows.zb = _valid_only(rows, ((2 * opts.z_loss) * z_scale).expand(M))
    return rows


def _valid_only(rows: _Rows, t: Tensor) -> Tensor:
    """``t`` where the position counts, 0 where it is ignored (by selection: ``0 * inf`` stays 0)."""
    return t if rows.row_valid is None else torch.where(rows.row_valid > 0, t, 0.0)


def _row_view(t3: Tensor, p0: int, p1: int) -> Tensor:
    """Rows ``[p0, p1)`` of a ``[P, C, Q]`` tensor as ``[(p1 - p0) * Q, C]`` (a view when Q == 1)."""
    blk = t3[p0:p1]
    if blk.shape[2] == 1:
        return blk[:, :, 0]
    return blk.transpose(1, 2).reshape(-1, blk.shape[1])


def _chunk_pass(x3: Tensor, tgt: Target, opts: Options, w: Optional[Tensor], rows: _Rows, ce_scale: Tensor,
                grad3: Optional[Tensor]) -> None:
    """One pass over slabs of rows: statistics for the loss, and the gradient into ``grad3``."""
    P, C, Q = x3.shape
    acc, ls, softcap = acc_dtype(x3.dtype), opts.label_smoothing, opts.softcap
    slabs = max(1, CONFIG.chunk_elements // max(1, C * Q))
    # Scratch buffers, allocated once: a fresh multi-MB temporary per chunk costs page faults.
    scratch = _Scratch(min(slabs, P) * Q, C, acc, x3.device)
    # On CPU the gradient scale is read once (no device sync there) to fuse it into the ops.
    g: Union[float, Tensor] = float(ce_scale) if host_reads_free(ce_scale) else ce_scale
    for p0 in range(0, P, slabs):
        p1 = min(P, p0 + slabs)
        r0, r1, n = p0 * Q, p1 * Q, (p1 - p0) * Q
        xc = _row_view(x3, p0, p1)
        if xc.dtype != acc or not xc.is_contiguous():
            xc = scratch.get("x", n).copy_(xc)
        # Every read of the logits comes before the softmax, which may overwrite
        # them (inplace_backward writes the gradient over the logits).
        if rows.pred is not None:  # of the raw logits: softcap's tanh may saturate distinct logits into a tie
            rows.pred[r0:r1] = xc.argmax(1)
        th = None
        if softcap is not None:
            th = torch.div(xc, softcap, out=scratch.get("th", n)).tanh_()
            xs = torch.mul(th, softcap, out=scratch.get("xs", n))
        else:
            xs = xc
        xmax = torch.amax(xs, 1, out=rows.xmax[r0:r1])
        q = _target_sums(tgt, rows, xs, xmax, w, ls, C, p0, p1, r0, r1, scratch)
        # softmax straight into the gradient buffer when it is a plain float view
        gdst = grad3[p0:p1, :, 0] if grad3 is not None and Q == 1 else None
        direct = gdst is not None and gdst.dtype == acc and gdst.is_contiguous()
        p = gdst if direct else scratch.get("p", n)
        torch.softmax(xs, 1, out=p)
        # log(sum exp(x - x_max)) = -log p_max: p_max >= 1/C never underflows, so this is exact
        torch.neg(torch.log(p.amax(1)), out=rows.logs[r0:r1])
        if grad3 is None:
            continue
        _chunk_gradient(p, q, rows, g, r0, r1, w, ls, C, th, scratch)
        if gdst is None:
            grad3[p0:p1].copy_(p.reshape(p1 - p0, Q, C).transpose(1, 2))
        elif not direct:
            gdst.copy_(p)


def _target_sums(tgt: Target, rows: _Rows, xs: Tensor, xmax: Tensor, w: Optional[Tensor], ls: float, C: int,
                 p0: int, p1: int, r0: int, r1: int, scratch: "_Scratch") -> Optional[Tensor]:
    """The chunk's sums against the row max: ``q . (x_max - x)`` (probs), ``w . (x_max - x)`` (smoothing).
    Returns the chunk's (smoothed, weighted) probabilities for the gradient, or None."""
    if not rows.probs and rows.wd is None:
        return None
    n = r1 - r0
    d = torch.sub(xmax.unsqueeze(1), xs, out=scratch.get("tmp", n))  # x_max - x >= 0
    if not rows.probs:
        rows.wd[r0:r1] = d @ w if w is not None else d.sum(1)
        return None
    q = _row_view(tgt.probs, p0, p1)
    if ls > 0 or w is not None or q.dtype != d.dtype:
        q = scratch.get("q", n).copy_(q)
        if ls > 0:
            q.mul_(1 - ls).add_(ls / C)
        if w is not None:
            q.mul_(w)
    rows.qd[r0:r1] = _masked_dot(q, d)
    rows.mass[r0:r1] = q.sum(1)
    return q


def _chunk_gradient(p: Tensor, q: Optional[Tensor], rows: _Rows, g: Union[float, Tensor], r0: int, r1: int,
                    w: Optional[Tensor], ls: float, C: int, th: Optional[Tensor], scratch: "_Scratch") -> None:
    """Turn the chunk's softmax ``p`` into the gradient, in place."""
    g_rows = rows.g_rows[r0:r1]
    coef = rows.mass[r0:r1] * (g if rows.probs and isinstance(g, float) else g_rows)
    if rows.zb is not None:
        coef = coef + rows.zb[r0:r1] * (rows.xmax[r0:r1] + rows.logs[r0:r1])
    p.mul_(coef.unsqueeze(1))
    if rows.probs:  # q may be the caller's target: never changed in place
        if isinstance(g, float):
            p.sub_(q, alpha=g)
        else:
            p.sub_(torch.mul(q, g, out=scratch.get("tmp", r1 - r0)))
    else:
        p.scatter_add_(1, rows.cols[r0:r1], rows.vals[r0:r1] * -g_rows.unsqueeze(1))
        if ls > 0:
            sm_rows = (ls / C) * g_rows
            if w is not None:
                p.addr_(sm_rows, w, alpha=-1)
            else:
                p.sub_(sm_rows.unsqueeze(1))
    if th is not None:
        p.mul_(th.square_().neg_().add_(1))


def _loss_terms(rows: _Rows, opts: Options, w: Optional[Tensor], C: int) -> RowTerms:
    """Per-position CE and z-loss from the statistics of the pass."""
    logs, xmax = rows.logs, rows.xmax
    # a row of -inf (or holding +inf) has lse -inf (+inf), as torch.logsumexp says; its softmax is NaN
    lse = torch.where(torch.isinf(xmax), xmax, xmax + logs)
    if rows.probs:
        ce = rows.mass * logs + rows.qd
    else:
        term = rows.vals * ((xmax.unsqueeze(1) - rows.xy) + logs.unsqueeze(1))
        ce = term.masked_fill_(rows.vals == 0, 0).sum(1)
        if rows.wd is not None:
            smooth = (float(C) if w is None else w.sum()) * logs + rows.wd
            ce = ce + (opts.label_smoothing / C) * _valid_only(rows, smooth)
    z = _valid_only(rows, opts.z_loss * lse.square()) if opts.z_loss else None
    return RowTerms(ce, z, lse, rows.pred)


def _masked_dot(q: Tensor, d: Tensor) -> Tensor:
    """Row-wise ``sum_c q_c d_c``, in place in ``d``, with ``0 * inf = 0`` (a zero target mass on a -inf
    logit adds nothing)."""
    prod = d.mul_(q)
    dot = prod.sum(1)
    nan = torch.isnan(dot)
    if host_reads_free(dot) and not bool(nan.any()):
        return dot
    fixed = prod.masked_fill_(q == 0, 0).sum(1)
    return torch.where(nan, fixed, dot)


class _Scratch:
    """Named ``[rows, C]`` buffers, made on first use and reused for every chunk."""

    def __init__(self, rows: int, C: int, dtype: torch.dtype, device: torch.device):
        self.shape = (rows, C)
        self.dtype, self.device = dtype, device
        self.bufs = {}

    def get(self, name: str, n: int) -> Tensor:
        buf = self.bufs.get(name)
        if buf is None:
            buf = self.bufs[name] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return buf[:n]


# --------------------------------------------------------------------------- linear + cross-entropy

# CPU float32 GEMMs with a thin side (a chunk of rows against the whole vocabulary) go through
# oneDNN when torch has it (knob ``onednn``): MKL's float32 sgemm takes its AVX2 path on AMD CPUs
# and loses a further ~25% on 64-row operands, while oneDNN uses AVX-512 where the CPU has it
# (about 2x on a Zen 5 EPYC; see benchmarks/results).
_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _use_onednn(x: Tensor, w: Tensor) -> bool:
    # not while compiling: inductor lowers this op only for frozen (constant) weights
    return (CONFIG.onednn and _HAS_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous()
            and (w.is_contiguous() or w.t().is_contiguous())
            and x.shape[0] > 0 and x.shape[1] > 0 and w.shape[0] > 0 and not torch.compiler.is_compiling())


def linear(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """``x @ w.T + bias`` for a ``[n, k]`` chunk ``x`` (``w`` ``[m, k]``, any strides): oneDNN on
    CPU float32 (see ``_use_onednn``), else ``torch.addmm``/``torch.mm`` into ``out`` when given."""
    if _use_onednn(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    if bias is not None:
        return torch.addmm(bias, x, w.t(), out=out) if out is not None else torch.addmm(bias, x, w.t())
    return torch.mm(x, w.t(), out=out) if out is not None else torch.mm(x, w.t())


def linear_cross_entropy(x2: Tensor, row_ids: Optional[Tensor], linear_weight: Tensor, linear_bias: Optional[Tensor],
                         tgt: Target, opts: Options, red: Reduction, want_grads: Tuple[bool, bool, bool],
                         row_scale: Optional[Tensor] = None) -> LinearResult:
    """Loss terms and gradients of ``cross_entropy(x @ W.T + b, target)`` by row chunks.

    ``x2`` ``[R, H]`` holds the hidden states; position ``i`` uses row
    ``row_ids[i]`` (or row ``i`` when ``row_ids`` is None: ``shift`` uses it to
    skip each sequence's last positions without copying the hidden states).
    ``tgt`` has one position per row of the result (``M``). ``want_grads``
    says which of ``(dx, dW, db)`` to form; the gradient is that of
    ``sum(ce) * ce_scale + sum(z) * z_scale``, each position's term further
    scaled by ``row_scale`` when given (the backward of ``reduction='none'``).
    Logits exist one chunk at a time; the weight gradient accumulates in float32.
    """
    M, (V, H), dev, acc = tgt.positions, linear_weight.shape, x2.device, acc_dtype(x2.dtype)
    need_dx, need_dw, need_db = want_grads
    need_grad = need_dx or need_dw or need_db
    w = opts.class_weight(acc)
    ce_scale, z_scale = red.ce_scale.to(acc), red.z_scale.to(acc)
    # dx: every row is written unless shift skips some (those stay 0); dW: the first chunk writes it
    dx = None
    if need_dx:
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=dev) if row_ids is None else torch.zeros_like(x2)
    dw = torch.empty((V, H), dtype=acc, device=dev) if need_dw else None
    db = torch.zeros(V, dtype=acc, device=dev) if need_db else None
    ce = torch.empty(M, dtype=acc, device=dev)
    z = torch.empty(M, dtype=acc, device=dev) if opts.z_loss else None
    lse = torch.empty(M, dtype=acc, device=dev)
    pred = torch.empty(M, dtype=torch.long, device=dev) if opts.return_extras else None
    n = linear_chunk_rows(M, V, opts.chunk_size, dev)
    # one logits buffer for every chunk (a fresh multi-MB buffer per chunk costs page faults);
    # oneDNN returns a fresh one instead, which the allocator recycles chunk to chunk
    buf = None if _use_onednn(x2[:1], linear_weight) else torch.empty((min(n, M), V), dtype=x2.dtype, device=dev)
    for r0 in range(0, M, n):
        r1 = min(M, r0 + n)
        ids = None if row_ids is None else row_ids[r0:r1]
        xc = x2[r0:r1] if ids is None else x2.index_select(0, ids)
        lo = logits = l3 = None  # drop the last chunk's logits before making the next
        lo = linear(xc, linear_weight, linear_bias, out=None if buf is None else buf[: r1 - r0])
        logits = lo if lo.dtype == acc else lo.to(acc)
        l3 = logits.unsqueeze(2)
        t = _cross_entropy(l3, tgt.rows(r0, r1), opts, w, ce_scale, z_scale, l3 if need_grad else None,
                           opts.return_extras)
        ce[r0:r1], lse[r0:r1] = t.ce, t.lse
        if z is not None:
            z[r0:r1] = t.z
        if pred is not None:
            pred[r0:r1] = t.predicted
        if need_grad:  # the chunk's logits now hold their gradient
            _add_chunk_grads(logits, xc, linear_weight, ids, r0, r1, row_scale, dx, dw, db)
    if dw is not None:
        if M == 0:
            dw.zero_()
        dw = dw.to(linear_weight.dtype)
    if db is not None:
        db = db.to(linear_bias.dtype if linear_bias is not None else linear_weight.dtype)
    return LinearResult(RowTerms(ce, z, lse, pred), dx, dw, db)


def _add_chunk_grads(dl: Tensor, xc: Tensor, linear_weight: Tensor, ids: Optional[Tensor], r0: int, r1: int,
                     row_scale: Optional[Tensor], dx: Optional[Tensor], dw: Optional[Tensor],
                     db: Optional[Tensor]) -> None:
    """Add one chunk's share of the gradients, from ``dl``, its logits' gradient (scaled in place by
    ``row_scale`` when given): the first chunk writes ``dw``, the others add to it."""
    acc = dl.dtype
    if row_scale is not None:
        dl.mul_(row_scale[r0:r1].to(acc).unsqueeze(1))
    if db is not None:
        db += dl.sum(0)
    if dw is not None:
        if r0 == 0:
            torch.mm(dl.t(), xc.to(acc), out=dw)
        else:
            dw.addmm_(dl.t(), xc.to(acc))
    if dx is not None:
        dxc = linear(dl.to(linear_weight.dtype), linear_weight.t())
        if ids is None:
            dx[r0:r1] = dxc
        else:
            dx.index_copy_(0, ids, dxc.to(dx.dtype))

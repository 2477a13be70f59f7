"""Fused chunked cross-entropy with torch ops: any device.

One pass over row chunks computes, per position, the loss terms and -- when a
gradient is wanted -- the gradient of the (already scaled) loss, written
straight into the caller's buffer. No ``[N, C]`` log-softmax is kept: the only
full-size tensor is the gradient itself (none at all with
``inplace_backward``, which writes it over the logits).

For a chunk of rows with logits ``x`` (after the optional softcap), ``lse``
their log-sum-exp, ``p = softmax(x)``, the gradient of one position's loss is
``S * p - m + 2 * z_loss * lse * p`` where ``m`` is the target mass
(``(1 - eps) * w_y`` at the true class for index targets, ``w_c * q_c`` for
probabilities, the k weighted values for sparse targets, plus ``eps/C * w``
for label smoothing) and ``S = sum(m)``.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..targets import Target
from ._terms import host_reads_free, sparse_terms
from .torch import acc_dtype

# Elements per chunk: small enough to stay in cache, big enough that the
# per-op overhead of a dozen torch calls per chunk is amortised.
CHUNK_ELEMENTS = 1 << 19


def _rows(t3: Tensor, p0: int, p1: int) -> Tensor:
    """Rows ``[p0, p1)`` of a ``[P, C, Q]`` tensor as ``[(p1 - p0) * Q, C]`` (a view when Q == 1)."""
    blk = t3[p0:p1]
    if blk.shape[2] == 1:
        return blk[:, :, 0]
    return blk.transpose(1, 2).reshape(-1, blk.shape[1])


def cross_entropy_forward(x3: Tensor, tgt: Target, weight: Optional[Tensor], ignore_index: int,
                          label_smoothing: float, softcap: Optional[float], z_loss: float,
                          ce_gscale: Tensor, z_gscale: Tensor, grad3: Optional[Tensor], want_predicted: bool,
                          chunk_elements: int = 0
                          ) -> Tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
    """Per-position ``(ce, z, lse, predicted)`` for logits ``x3`` ``[P, C, Q]``.

    When ``grad3`` (same shape as ``x3``; it may be ``x3`` itself) is given,
    the gradient of ``sum(ce) * ce_gscale + sum(z) * z_gscale`` is written
    into it.
    """
    P, C, Q = x3.shape
    M = P * Q
    acc = acc_dtype(x3.dtype)
    dev = x3.device
    ls = float(label_smoothing)
    w = None if weight is None else weight.to(acc)
    w_total = float(C) if w is None else w.sum()
    need_grad = grad3 is not None
    probs = tgt.kind == "probs"

    # Per-position target terms for all rows at once: O(M k) work, no pass over the logits.
    row_valid = None
    if not probs:
        cols, vals, row_valid = sparse_terms(tgt, w, ls, ignore_index, C, acc)
        k = cols.shape[1]
        xy = x3.gather(1, cols.reshape(P, Q, k).transpose(1, 2)).transpose(1, 2).reshape(M, k).to(acc)
        if softcap is not None:
            xy = softcap * torch.tanh(xy / softcap)
        mass = vals.sum(1)
        if ls > 0:
            sm = (ls / C) * w_total
            mass = mass + (sm * row_valid if row_valid is not None else sm)
        if need_grad:
            neg_vals = vals * -ce_gscale
            if ls > 0:
                sm_rows = ((ls / C) * ce_gscale).expand(M) if row_valid is None else (ls / C) * ce_gscale * row_valid
        wd = torch.empty(M, dtype=acc, device=dev) if ls > 0 else None
    else:
        mass = torch.empty(M, dtype=acc, device=dev)
        qd = torch.empty(M, dtype=acc, device=dev)
    zb = None
    if need_grad and z_loss:
        zb = (2 * z_loss) * z_gscale * (row_valid if row_valid is not None else torch.ones(M, dtype=acc, device=dev))

    # Losses are formed as sums of (x_max - x) >= 0 plus log(sum exp(x - x_max)), like
    # PyTorch's log_softmax: no cancellation between a large lse and a large logit.
    xmax_all = torch.empty(M, dtype=acc, device=dev)
    logs_all = torch.empty(M, dtype=acc, device=dev)
    pred_out = torch.empty(M, dtype=torch.long, device=dev) if want_predicted else None
    slabs = max(1, (chunk_elements or CHUNK_ELEMENTS) // max(1, C * Q))
    rows = min(slabs, P) * Q
    # Scratch buffers, allocated once: a fresh multi-MB temporary per chunk costs page faults.
    scratch = _Scratch(rows, C, acc, dev)
    # On CPU the gradient scale is read once (no device sync there) to fuse it into the ops.
    g = float(ce_gscale) if host_reads_free(ce_gscale) else ce_gscale
    for p0 in range(0, P, slabs):
        p1 = min(P, p0 + slabs)
        r0, r1 = p0 * Q, p1 * Q
        n = r1 - r0
        xc = _rows(x3, p0, p1)
        if xc.dtype != acc or not xc.is_contiguous():
            xc = scratch.get("x", n).copy_(xc)
        th = None
        if softcap is not None:
            th = torch.div(xc, softcap, out=scratch.get("th", n)).tanh_()
            xs = torch.mul(th, softcap, out=scratch.get("xs", n))
        else:
            xs = xc
        # Every read of the logits comes before the softmax, which may overwrite
        # them (inplace_backward writes the gradient over the logits).
        if want_predicted:
            pred_out[r0:r1] = xs.argmax(1)
        xmax = torch.amax(xs, 1, out=xmax_all[r0:r1])
        if probs or wd is not None:
            d = torch.sub(xmax.unsqueeze(1), xs, out=scratch.get("tmp", n))  # x_max - x >= 0
        if probs:
            q = _rows(tgt.probs, p0, p1)
            if ls > 0 or w is not None or q.dtype != acc:
                q = scratch.get("q", n).copy_(q)
                if ls > 0:
                    q.mul_(1 - ls).add_(ls / C)
                if w is not None:
                    q.mul_(w)
            qd[r0:r1] = _masked_dot(q, d)
            mass[r0:r1] = q.sum(1)
        elif wd is not None:
            wd[r0:r1] = d @ w if w is not None else d.sum(1)

        # softmax straight into the gradient buffer when it is a plain float view
        gdst = grad3[p0:p1, :, 0] if need_grad and Q == 1 else None
        direct = gdst is not None and gdst.dtype == acc and gdst.is_contiguous()
        p = gdst if direct else scratch.get("p", n)
        torch.softmax(xs, 1, out=p)
        # log(sum exp(x - x_max)) = -log p_max: p_max >= 1/C never underflows, so this is exact
        logs = torch.neg(torch.log(p.amax(1)), out=logs_all[r0:r1])
        if not need_grad:
            continue
        lse = xmax + logs
        coef = mass[r0:r1] * g
        if zb is not None:
            coef = coef + zb[r0:r1] * lse
        p.mul_(coef.unsqueeze(1))
        if probs:  # q may be the caller's target: never changed in place
            if isinstance(g, float):
                p.sub_(q, alpha=g)
            else:
                p.sub_(torch.mul(q, g, out=scratch.get("tmp", n)))
        else:
            p.scatter_add_(1, cols[r0:r1], neg_vals[r0:r1])
            if ls > 0:
                if w is not None:
                    p.addr_(sm_rows[r0:r1], w, alpha=-1)
                else:
                    p.sub_(sm_rows[r0:r1].unsqueeze(1))
        if th is not None:
            p.mul_(th.square_().neg_().add_(1))
        if gdst is None:
            grad3[p0:p1].copy_(p.reshape(p1 - p0, Q, C).transpose(1, 2))
        elif not direct:
            gdst.copy_(p)

    logs = logs_all
    lse = xmax_all + logs
    if probs:
        ce = mass * logs + qd
    else:
        term = vals * ((xmax_all.unsqueeze(1) - xy) + logs.unsqueeze(1))
        ce = term.masked_fill_(vals == 0, 0).sum(1)
        if ls > 0:
            smooth = w_total * logs + wd
            ce = ce + (ls / C) * (smooth * row_valid if row_valid is not None else smooth)
    z = None
    if z_loss:
        z = z_loss * lse.square()
        if row_valid is not None:
            z = z * row_valid
    return ce, z, lse, pred_out


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
# oneDNN when torch has it: MKL's float32 sgemm takes its AVX2 path on AMD CPUs and loses a
# further ~25% on 64-row operands, while oneDNN uses AVX-512 where the CPU has it (about 2x on a
# Zen 5 EPYC; see benchmarks/results). ``CROSSENT_ONEDNN=0`` turns this off.
_ONEDNN = (os.environ.get("CROSSENT_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _use_onednn(x: Tensor, w: Tensor) -> bool:
    # not while compiling: inductor lowers this op only for frozen (constant) weights
    return (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and x.dim() == 2 and x.is_contiguous() and (w.is_contiguous() or w.t().is_contiguous())
            and x.shape[0] > 0 and x.shape[1] > 0 and w.shape[0] > 0 and not torch.compiler.is_compiling())


def linear(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """``x @ w.T + bias`` for a ``[n, k]`` chunk ``x`` (``w`` ``[m, k]``, any strides): oneDNN on
    CPU float32 (see ``_ONEDNN``), else ``torch.addmm``/``torch.mm`` into ``out`` when given."""
    if _use_onednn(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    if bias is not None:
        return torch.addmm(bias, x, w.t(), out=out) if out is not None else torch.addmm(bias, x, w.t())
    return torch.mm(x, w.t(), out=out) if out is not None else torch.mm(x, w.t())


# Bytes of float32 logits per row chunk of linear_cross_entropy when chunk_size is not given: on
# CPU a tenth of what the eager computation holds at LM shapes, with matmuls still efficient; on
# CUDA GEMMs want thousands of rows, so up to LINEAR_CHUNK_BYTES_CUDA, at most 1/8 of free memory.
LINEAR_CHUNK_BYTES = 8 << 20
LINEAR_CHUNK_BYTES_CUDA = 512 << 20


def _chunk_bytes(device: Optional[torch.device]) -> int:
    if device is None or device.type != "cuda":
        return LINEAR_CHUNK_BYTES
    if torch.compiler.is_compiling():
        return LINEAR_CHUNK_BYTES_CUDA
    free, _ = torch.cuda.mem_get_info(device)
    return max(LINEAR_CHUNK_BYTES, min(LINEAR_CHUNK_BYTES_CUDA, free // 8))


def linear_chunk_rows(M: int, V: int, chunk_size: Optional[int] = None, device: Optional[torch.device] = None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else what fits the device's chunk budget of float32
    logits (``_chunk_bytes``), at least 32 rows (the weight-gradient update reads and writes all
    of ``[V, H]`` once per chunk, so tiny chunks would make it memory-bound)."""
    if chunk_size is not None:
        return max(1, min(int(chunk_size), max(M, 1)))
    return max(1, min(max(M, 1), max(32, _chunk_bytes(device) // (4 * max(V, 1)))))


def linear_cross_entropy_forward(x2: Tensor, row_ids: Optional[Tensor], weight_v: Tensor, bias: Optional[Tensor],
                                 tgt: Target, class_weight: Optional[Tensor], ignore_index: int,
                                 label_smoothing: float, softcap: Optional[float], z_loss: float,
                                 ce_gscale: Tensor, z_gscale: Tensor, want_grads: Tuple[bool, bool, bool],
                                 want_predicted: bool, chunk_size: Optional[int] = None,
                                 row_scale: Optional[Tensor] = None):
    """Loss terms and gradients of ``cross_entropy(x @ W.T + b, target)`` by row chunks.

    ``x2`` ``[R, H]`` holds the hidden states; position ``i`` uses row
    ``row_ids[i]`` (or row ``i`` when ``row_ids`` is None: ``shift`` uses it to
    skip each sequence's last position without copying the hidden states).
    ``tgt`` has one position per row of the result (``M``). ``want_grads``
    says which of ``(dx, dW, db)`` to form; the gradient is that of
    ``sum(ce) * ce_gscale + sum(z) * z_gscale``, each position's term further
    scaled by ``row_scale`` when given (the backward of ``reduction='none'``).
    Logits exist one chunk at a time; the weight gradient accumulates in float32.

    Returns ``(ce, z, lse, predicted, dx, dW, db)``.
    """
    M = tgt.index.numel() if tgt.kind == "index" else (
        tgt.sp_index.shape[0] * tgt.sp_index.shape[1] if tgt.kind == "sparse" else tgt.probs.shape[0] * tgt.probs.shape[2])
    V, H = weight_v.shape
    dev = x2.device
    acc = acc_dtype(x2.dtype)
    need_dx, need_dw, need_db = want_grads
    need_grad = need_dx or need_dw or need_db
    # dx: every row is written unless shift skips some (those stay 0); dW: the first chunk writes it
    dx = None
    if need_dx:
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=dev) if row_ids is None else torch.zeros_like(x2)
    dw = torch.empty((V, H), dtype=acc, device=dev) if need_dw else None
    db = torch.zeros(V, dtype=acc, device=dev) if need_db else None
    ce = torch.empty(M, dtype=acc, device=dev)
    z = torch.empty(M, dtype=acc, device=dev) if z_loss else None
    lse = torch.empty(M, dtype=acc, device=dev)
    pred = torch.empty(M, dtype=torch.long, device=dev) if want_predicted else None
    n = linear_chunk_rows(M, V, chunk_size, dev)
    # one logits buffer for every chunk (a fresh multi-MB buffer per chunk costs page faults);
    # oneDNN returns a fresh one instead, which the allocator recycles chunk to chunk
    onednn = _use_onednn(x2[:1], weight_v)
    buf = None if onednn else torch.empty((min(n, M), V), dtype=x2.dtype, device=dev)
    for r0 in range(0, M, n):
        r1 = min(M, r0 + n)
        ids = None if row_ids is None else row_ids[r0:r1]
        xc = x2[r0:r1] if ids is None else x2.index_select(0, ids)
        lo = logits = l3 = dl = None  # drop the last chunk's logits before making the next
        lo = linear(xc, weight_v, bias, out=None if buf is None else buf[: r1 - r0])
        logits = lo if lo.dtype == acc else lo.to(acc)
        l3 = logits.unsqueeze(2)
        c, zc, lc, pc = cross_entropy_forward(l3, tgt.rows(r0, r1), class_weight, ignore_index, label_smoothing,
                                              softcap, z_loss, ce_gscale, z_gscale, l3 if need_grad else None,
                                              want_predicted)
        ce[r0:r1] = c
        lse[r0:r1] = lc
        if z is not None:
            z[r0:r1] = zc
        if pred is not None:
            pred[r0:r1] = pc
        if not need_grad:
            continue
        dl = logits  # now the gradient of the chunk's logits
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
            dxc = linear(dl.to(weight_v.dtype), weight_v.t())
            if ids is None:
                dx[r0:r1] = dxc
            else:
                dx.index_copy_(0, ids, dxc.to(dx.dtype))
    if dw is not None:
        if M == 0:
            dw.zero_()
        dw = dw.to(weight_v.dtype)
    if db is not None:
        db = db.to(bias.dtype if bias is not None else weight_v.dtype)
    return ce, z, lse, pred, dx, dw, db

"""Vocab-parallel cross-entropy over ``torch.distributed``: the input's class dim is this rank's
contiguous shard of the vocabulary (ranks in order, shards possibly uneven); every rank gets the
loss over the full vocabulary and the gradient of its own shard.

Every call starts with one all-gather of a few int64 numbers per rank (:func:`shard_sizes`):
classes, positions, a refusal flag, a fingerprint of the options, and, while value checks are on,
fingerprints of the targets, the hidden states (linear) and the full class weights and the value of
``num_items``; also the class weight's length, a float target's width and the rank's chunk budget
(every rank takes the least). Ranks that disagree on any of them, or a rank that refused its
arguments, make every rank raise (never a hang, never a different "global" loss per rank).

Then two collectives of O(N) numbers, never O(N V) (per chunk of rows for linear CE):

1. an all-gather of each shard's ``(lse, max logit, argmax)`` per row and the refusal flag: the
   global log-sum-exp is their logsumexp, the predicted class the first maximum;
2. one all-reduce of a packed ``[N, 3]`` tensor: each shard's loss contribution
   ``T_r (lse - m_r) + sum_c t_c (m_r - x_c)`` (non-negative sums against the shard's max, so
   nothing cancels or underflows), its target mass ``T_r`` and a flag for labels out of range.

The gradient ``scale * (T p - t)`` (plus z-loss) follows from the global ``lse``: the shard's
softmax numerators ``exp(x - m_r)``, left in the gradient buffer by the statistics pass, rescaled
by ``exp(m_r - lse)``. A weighted mean first sums the class weights each rank's labels own (one
all-gather of two numbers per rank). Label smoothing spreads over the full vocabulary; class
weights are this rank's shard (or the full weight, sliced here). The CE backward has no
collective. Linear CE (:func:`vocab_parallel_linear`) goes over row chunks of the shard's logits
``x W_r^T + b_r`` (never all of them) with the two collectives per chunk, forms each chunk's
gradient at once, and all-reduces the input gradient once in the backward.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .config import value_checks
from .impl.common import RowTerms, acc_dtype, chunk_bytes, host_reads_free, refuse_double_backward
from .options import Options
from .reduction import Reduction, plan_reduction
from .targets import (IndexTarget, ProbsTarget, SparseTarget, Target, _fmt, check_after, normalize_target,
                      promoted_dtype)

__all__ = ["agree_after", "agree_before", "data_fingerprint", "vocab_parallel_linear", "local_tensor", "world_size",
           "shard_sizes", "vocab_parallel_terms", "copy_to_vocab_parallel", "is_dtensor", "dtensor_logits",
           "dtensor_linear_args"]


def world_size(group) -> int:
    """The group's size. A group object that answers ``size()`` (a one-rank stand-in group, as
    Megatron's) is asked directly; otherwise torch.distributed must be initialised."""
    if not dist.is_available() or not dist.is_initialized():
        size = getattr(group, "size", None)
        if callable(size) and int(size()) == 1:
            return 1
        raise ValueError("process_group was given but torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group first (or leave process_group=None)")
    return dist.get_world_size(group)


def _fingerprint(opts: Optional[Options], dtype, target_dtype=None, extra=()) -> int:
    """A number every rank must agree on: the options that change the loss, the logits' and the
    target's dtypes (which set the collectives' dtype) and the value-check setting."""
    if opts is None:
        return 0
    key = (opts.ignore_index, opts.reduction, opts.label_smoothing, opts.z_loss, opts.softcap,
           opts.weight is not None, opts.num_items is not None, opts.return_extras, str(dtype), str(target_dtype),
           opts.inplace_backward, opts.chunk_size, value_checks(), tuple(extra))
    return zlib.crc32(repr(key).encode())


_MIX = [c - (1 << 64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)]


def data_fingerprint(*tensors) -> int:
    """An int64 every rank must agree on when it holds the same tensors (``None`` skipped): each
    element's bits and position through splitmix64's mixer, summed. Integer sums are exact and
    order-free, so equal tensors give equal numbers on every rank and thread count; tensors that
    differ anywhere (a swap, or changes that a plain checksum would cancel) collide with probability
    about 2^-64. One read of the data in chunks, one host read at the end."""
    total = None
    for k, t in enumerate(tensors):
        if t is None:
            continue
        flat = t.detach().reshape(-1)
        if flat.dtype.is_floating_point:
            flat = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[flat.element_size()])
        acc = torch.zeros((), dtype=torch.int64, device=flat.device)
        step = 1 << 20
        for i in range(0, flat.numel(), step):
            v = flat[i:i + step].to(torch.int64, copy=True)  # a copy: the mixing below works in place
            v.add_(torch.arange(i, i + v.numel(), device=v.device).mul_(_MIX[0]))
            for shift, mult in ((30, _MIX[1]), (27, _MIX[2])):
                v.bitwise_xor_(v >> shift).mul_(mult)
            acc += v.bitwise_xor_(v >> 31).sum()
        acc = acc * 31 + (flat.numel() + k)
        total = acc if total is None else total * _MIX[0] + acc
    return 0 if total is None else int(total)


@dataclass(frozen=True)
class _Data:
    """What a call's data says, for the exchange (all 0 / -1 while value checks are off, but the
    lengths): fingerprints of the targets, hidden states and class weights, the value of
    ``num_items``, the class weight's length and a float target's class width."""

    target: int = 0
    hidden: int = 0
    num_items: int = 0
    weight_len: int = -1
    target_width: int = -1
    weight: int = 0
    budget: int = 0  # bytes of float32 logits per row chunk this rank proposes; every rank takes the least


def _call_data(like, target, cdim: int, target_format: str, opts: Options, hidden_fp: int = 0,
               budget: int = 0) -> _Data:
    """This rank's :class:`_Data`. A float target as wide as this shard may be its shard of the
    probabilities (decided after the exchange, which tells the global class count)."""
    width = -1
    if isinstance(target, Tensor) and target.dtype.is_floating_point and target.dim() == len(like.shape) \
            and target_format in ("auto", "probs"):
        width = target.shape[cdim]
    w_len = -1 if opts.weight is None else opts.weight.numel()
    if not value_checks():
        return _Data(weight_len=w_len, target_width=width, budget=budget)
    if isinstance(target, SparseTarget):
        tfp = data_fingerprint(target.indices, target.values)
    else:
        tfp = data_fingerprint(target) if isinstance(target, Tensor) else 0
    return _Data(tfp, hidden_fp, _num_items_bits(opts.num_items), w_len, width, data_fingerprint(opts.weight),
                 budget)


def _num_items_bits(num_items) -> int:
    """``num_items``'s value as a number every rank must agree on (a tensor is read on the host)."""
    if num_items is None:
        return 0
    v = float(num_items.detach().reshape(()).item()) if isinstance(num_items, Tensor) else float(num_items)
    return int(torch.tensor(v, dtype=torch.float64).view(torch.int64))


def _exchange_device(group, input) -> torch.device:
    if isinstance(input, Tensor) and not is_dtensor(input):
        return input.device
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")


def agree_before(group, check) -> None:
    """Run ``check`` on every rank and raise on every rank if any refused (one all-gather of a flag)."""
    error = None
    try:
        check()
    except (ValueError, TypeError) as e:
        error = e
    mine = torch.tensor([int(error is not None)], dtype=torch.int64, device=_exchange_device(group, None))
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    _raise_if_refused(error, torch.cat(everyone).cpu() > 0, "its target")


def refuse_vocab_parallel(group, error: BaseException, input) -> None:
    """This rank refuses its arguments: take part in the exchange the others are in, then raise."""
    shard_sizes(group, -1, -1, _exchange_device(group, input), error=error)
    raise error  # unreachable: shard_sizes raised it


def shard_sizes(group, classes: int, positions: int, device: torch.device, error: Optional[BaseException] = None,
                opts: Optional[Options] = None, dtype=None, data: _Data = _Data(), target_dtype=None, extra=()):
    """``(classes, targets differ, chunk budget)``: every rank's number of classes (``[world]`` int64
    on the host), whether the targets' fingerprints differ (raised after the target checks, so that a
    rank's own refusal of its target is what every rank reports) and the least chunk budget any rank
    proposed (so that every rank runs the same chunks), from one all-gather of
    ``(classes, positions, refused, options, *data)`` per rank at every call (a few numbers; a cache
    could go stale between heads of different sizes). Ranks that disagree on the positions, the
    options or dtypes, the hidden states, ``num_items`` or the full class weights, or a rank that
    refused its arguments, make every rank raise instead of leaving the others waiting or returning
    different "global" losses."""
    mine = torch.tensor([classes, positions, int(error is not None), _fingerprint(opts, dtype, target_dtype, extra),
                         *dataclasses.astuple(data)], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    table = torch.stack(everyone).cpu()
    _raise_if_refused(error, table[:, 2], "its arguments")
    sizes, C = table[:, 0], int(table[:, 0].sum())
    _check_weight_lengths(sizes, table[:, 7])
    if bool((table[:, 1] != table[0, 1]).any()):
        raise ValueError(f"vocab-parallel cross_entropy: the ranks hold different numbers of positions "
                         f"{table[:, 1].tolist()} (rank r has row r): every rank must pass the same positions "
                         "(the full batch) with its own shard of the classes")
    if bool((table[:, 3] != table[0, 3]).any()):
        raise ValueError("vocab-parallel cross_entropy: the ranks were called with different options or dtypes "
                         "(label_smoothing, z_loss, softcap, ignore_index, reduction, weight, num_items, "
                         "return_extras, chunk_size, reduce_input_grad, the logits' and the target's dtypes, "
                         "value checks must agree): pass the same ones on every rank")
    for col, what in ((5, "hidden states"), (6, "num_items")):
        if bool((table[:, col] != table[0, col]).any()):
            raise _differ(what)
    full_w = table[:, 7] == C
    if bool(full_w.any()) and bool((table[full_w, 9] != table[full_w, 9][0]).any()):
        raise _differ("class weights")
    # compare the targets of the ranks that hold all of them (not a shard of the probabilities)
    full_t = (table[:, 8] != sizes) | (sizes == C)
    differ = bool(full_t.any()) and bool((table[full_t, 4] != table[full_t, 4][0]).any())
    return sizes, differ, int(table[:, 10].min())


def _differ(what: str) -> ValueError:
    hint = f" {_FSDP_HINT}" if what == "hidden states" else ""
    return ValueError(f"vocab-parallel cross_entropy: the ranks hold different {what} (compared by fingerprint "
                      f"while value checks are on): vocab-parallel ranks split the classes of one batch, so every "
                      f"rank must pass the same {what}.{hint}")


_FSDP_HINT = ("If the weight is sharded by FSDP (fully_shard) over data-parallel ranks, each with its own "
              "batch, its shard is not a vocabulary shard: compute the loss inside the head module's forward "
              "(torch.distributed.fsdp.register_fsdp_forward_method, or "
              "crossent.integrations.transformers.apply(model)), or unshard it first (module.unshard()) and pass "
              "the full weight")


def _check_weight_lengths(sizes: Tensor, lengths: Tensor) -> None:
    """Class weights on every rank: none, this rank's shard ``[C_r]``, or the full ``[C]`` (replicated,
    as ``loss_parallel`` takes it); anything else raises on every rank, naming the ranks."""
    C = int(sizes.sum())
    bad = [r for r, (n, cr) in enumerate(zip(lengths.tolist(), sizes.tolist())) if n not in (-1, cr, C)]
    if bad:
        raise ValueError(f"vocab-parallel cross_entropy: weight on rank(s) {bad} has {lengths[bad].tolist()} "
                         f"entries, but the ranks hold {sizes.tolist()} classes ({C} in all): pass each rank its "
                         f"shard of the class weights, or the full [{C}] weight on every rank")
    if bool(((lengths == -1) != (lengths[0] == -1)).any()):
        raise ValueError("vocab-parallel cross_entropy: some ranks were given class weights and others not: "
                         "pass weight on every rank or on none")


def agree_after(group, tgt, target, loss: Tensor) -> None:
    """The deferred target check (a NaN loss with probability targets: a NaN target?), agreed by every
    rank: the loss is the same on all of them, so all take this branch; a NaN in one rank's shard of
    the probabilities raises on every rank."""
    if value_checks() and isinstance(tgt, ProbsTarget) and bool(torch.isnan(loss.detach()).any()):
        agree_before(group, lambda: check_after(tgt, target, loss))


def _raise_if_refused(error: Optional[BaseException], refused: Tensor, what: str) -> None:
    """Every rank raises when any refused: its own error, or one naming the ranks that refused."""
    if error is not None:
        raise error
    if bool(refused.any()):
        ranks = refused.nonzero().reshape(-1).tolist()
        raise ValueError(f"vocab-parallel cross_entropy: rank(s) {ranks} refused {what} (their error says why); "
                         "every rank stops here instead of waiting for them")


@dataclass
class _Shard:
    """This rank's side of a vocab-parallel cross-entropy, handed to the fused autograd Function as its
    impl. One pass over the shard gathers the per-row statistics and leaves the
    softmax numerators ``exp(x - m_r)`` in the gradient buffer; after the two collectives, one more
    pass over the buffer rescales them by ``exp(m_r - lse)`` into the gradient. Two collectives per
    call, whatever N: a rank that another process holds up delays the others twice, not once per
    chunk."""

    a: "_Agreed"
    lt: "_LocalTargets"
    group: object
    NAME: str = "vocab-parallel"

    @property
    def opts(self) -> Options:
        return self.a.opts

    def cross_entropy(self, x3: Tensor, tgt: Target, opts: Options, red: Reduction,
                      grad3: Optional[Tensor] = None) -> RowTerms:
        P, Cr, Q = x3.shape
        x = _rows(x3.detach(), self.a.acc)
        th, xs = _softcapped(x, opts)
        dst = grad3[:, :, 0] if grad3 is not None and Q == 1 else None
        if dst is None or dst.dtype != xs.dtype or not dst.is_contiguous():
            dst = None
        # exp(xs - ref) lands in the gradient buffer (it may be the logits: read first, then written)
        st, e = _Stats.of(x, xs, self.lt, out=dst, want_arg=opts.return_extras)
        terms, lse, mass = _combine_rows(self.a, st, self.lt, self.group, x3.device)
        if grad3 is not None:
            g, zc = _row_scales(self.lt, lse, opts, red, 1.0)
            p = _shard_grad(e, st.ref, lse, mass, self.lt, th, g, zc)
            if dst is None:
                grad3.copy_(p.reshape(P, Q, Cr).transpose(1, 2))
        return terms


def _row_scales(lt: "_LocalTargets", lse: Tensor, opts: Options, red: Reduction, upstream) -> Tuple[Tensor, Tensor]:
    """``(g, zc)`` per row: the CE gradient's scale (0 on ignored rows; a NaN scale reaches counted rows
    only) and the z-loss coefficient ``2 z z_scale lse``, times the upstream gradient (a number, or
    one per row for ``reduction="none"``)."""
    on = lt.valid if lt.valid is not None else torch.ones_like(lse, dtype=torch.bool)
    g = torch.where(on, red.ce_scale * upstream, 0.0)
    zc = torch.where(on, 2 * opts.z_loss * red.z_scale * upstream, 0.0) * lse if opts.z_loss else \
        torch.zeros_like(lse)
    return g, zc


def _shard_grad(e: Tensor, ref: Tensor, lse: Tensor, mass: Tensor, lt: "_LocalTargets", th: Optional[Tensor],
                g: Tensor, zc: Tensor) -> Tensor:
    """The gradient of this shard's logits ``[m, C_r]`` from the global ``lse``: ``g (T p - t) + zc p``,
    times ``1 - tanh^2`` under softcap, written over ``e = exp(x_s - ref)`` (the shard's softmax
    numerators against a per-row ``ref``): ``p = e * exp(ref - lse)``. A row whose global lse is not
    finite (+inf or NaN anywhere, or all -inf) gets NaN on every rank, as in one process."""
    p = e.mul_(((mass * g + zc) * torch.exp(ref - lse)).unsqueeze(1))
    if lt.t is not None:
        p.sub_(g.unsqueeze(1) * lt.t)
    else:
        if lt.cols is not None:
            p.scatter_add_(1, lt.cols, -g.unsqueeze(1) * lt.vals)
        if lt.smooth is not None:
            p.addr_(g * lt.rows_on, lt.smooth, alpha=-1)
    if th is not None:
        p.mul_(1 - th.square())
    bad_rows = ~torch.isfinite(lse)
    if not host_reads_free(bad_rows) or bool(bad_rows.any()):  # a pass over p only when needed (CPU)
        p.masked_fill_(bad_rows.unsqueeze(1), float("nan"))
    return p


@dataclass
class _LocalTargets:
    """This shard's share of the target: dense masses ``t`` (probabilities), or the owned label entries
    (``cols``, ``vals``) plus label smoothing's per-class masses ``smooth`` on counted rows ``rows_on``."""

    t: Optional[Tensor]  # [M, C_r]
    cols: Optional[Tensor]  # [M, k] local classes (0 where not owned)
    vals: Optional[Tensor]  # [M, k] masses there (0 where not owned)
    smooth: Optional[Tensor]  # [C_r] ls / C * w_c
    rows_on: Tensor  # [M] 1 / 0
    owned_w: Tensor  # [M] class weight of the labels this shard owns (index targets)
    valid: Optional[Tensor]  # [M] bool, index targets
    bad: Tensor  # [M] bool: a label out of the global range

    def rows(self, r0: int, r1: int) -> "_LocalTargets":
        """The targets of rows ``r0:r1`` (a chunk of the linear loss)."""
        cut = [None if t is None else t[r0:r1] for t in (self.t, self.cols, self.vals)]
        return _LocalTargets(*cut, self.smooth, self.rows_on[r0:r1], self.owned_w[r0:r1],
                             None if self.valid is None else self.valid[r0:r1], self.bad[r0:r1])

    def mass_and_sums(self, xs: Tensor, m_r: Tensor) -> Tuple[Tensor, Tensor]:
        """``(T_r, sum_c t_c (m_r - x_c))`` per row against a reference ``m_r`` (the shard's max: terms
        >= 0, no cancellation; ``0 * inf`` counts 0)."""
        M = xs.shape[0]
        zero = torch.zeros((), dtype=xs.dtype, device=xs.device)
        if self.t is not None:
            d = torch.where(self.t == 0, zero, self.t * (m_r.unsqueeze(1) - xs)).sum(1)
            return self.t.sum(1), d
        T = torch.zeros(M, dtype=xs.dtype, device=xs.device)
        d = torch.zeros(M, dtype=xs.dtype, device=xs.device)
        if self.cols is not None:
            xy = xs.gather(1, self.cols)
            T = T + self.vals.sum(1)
            d = d + torch.where(self.vals == 0, zero, self.vals * (m_r.unsqueeze(1) - xy)).sum(1)
        if self.smooth is not None:
            on = self.rows_on > 0
            T = T + torch.where(on, self.smooth.sum(), zero)
            d = d + torch.where(on, (m_r.unsqueeze(1) - xs) @ self.smooth, zero)
        return T, d


def _rows(x3: Tensor, acc: torch.dtype) -> Tensor:
    """``[P, C_r, Q]`` as ``[P * Q, C_r]`` in the accumulation dtype (a view when it can be)."""
    P, C, Q = x3.shape
    return x3.transpose(1, 2).reshape(P * Q, C).to(acc)


def _local_targets(tgt: Target, opts: Options, w: Optional[Tensor], offset: int, Cr: int, C: int, M: int,
                   acc: torch.dtype, device: torch.device) -> _LocalTargets:
    ls = opts.label_smoothing
    zeros = torch.zeros(M, dtype=acc, device=device)
    if tgt is None:  # this rank refused its target: placeholders until the refusal travels (_combine raises)
        return _LocalTargets(None, None, None, None, zeros + 1, zeros, None, torch.zeros(M, dtype=torch.bool,
                                                                                         device=device))
    if isinstance(tgt, ProbsTarget):
        q = _rows(tgt.probs, acc)
        t = q[:, offset:offset + Cr] if q.shape[1] == C else q
        t = t * (1 - ls) + ls / C if ls > 0 else t
        return _LocalTargets(t * w if w is not None else t, None, None, None, zeros + 1, zeros, None,
                             torch.zeros(M, dtype=torch.bool, device=device))
    if isinstance(tgt, IndexTarget):
        y = tgt.index.reshape(-1, 1)
        valid = tgt.valid.reshape(-1)
        mass = valid.to(acc).unsqueeze(1)
        bad = valid & ((y[:, 0] < 0) | (y[:, 0] >= C))
    else:
        k = tgt.indices.shape[-1]
        y = tgt.indices.reshape(-1, k)
        pad = tgt.padding.reshape(-1, k)
        mass = torch.where(pad, torch.zeros((), dtype=acc, device=device), tgt.values.reshape(-1, k).to(acc))
        bad = (~pad & ((y < 0) | (y >= C))).any(1)
        valid = None
    rows_on = valid.to(acc) if valid is not None else zeros + 1
    smooth = None
    if ls > 0 and Cr:
        smooth = (ls / C) * (w if w is not None else torch.ones(Cr, dtype=acc, device=device))
    if Cr == 0:  # a rank that holds no classes owns no labels
        return _LocalTargets(None, None, None, None, rows_on, zeros, valid, bad)
    local = y - offset
    mine = (local >= 0) & (local < Cr)
    cols = torch.where(mine, local, torch.zeros_like(local))
    wy = w[cols] if w is not None else torch.ones_like(mass)
    vals = torch.where(mine, mass * wy * (1 - ls), torch.zeros_like(mass))
    owned_w = zeros
    if valid is not None:
        owned_w = torch.where(mine & valid.unsqueeze(1), wy, torch.zeros_like(wy)).sum(1)
    return _LocalTargets(None, cols, vals, smooth, rows_on, owned_w, valid, bad)


@dataclass
class _Agreed:
    """What the exchange settled for one call: the shard sizes and offset, the options with this rank's
    class weights, the typed target (or this rank's refusal of it) and the dtypes."""

    sizes: Tensor
    offset: int
    C: int
    opts: Options
    w: Optional[Tensor]
    tgt: Optional[Target]
    error: Optional[BaseException]
    targets_differ: bool
    acc: torch.dtype
    out_dtype: torch.dtype
    budget: int  # bytes of float32 logits per row chunk, agreed


def _agree(like: "_LikeLogits", cdim: int, target, target_format: str, opts: Options, group, out_dtype,
           dtype: torch.dtype, hidden_fp: int = 0, budget: int = 0, extra=()) -> _Agreed:
    """The exchange, then the target checked against the global vocabulary (a refusal travels with the
    next collective) and the class weights cut to this rank's shard."""
    Cr, M = like.shape[cdim], math.prod(like.shape[:cdim] + like.shape[cdim + 1:])
    data = _call_data(like, target, cdim, target_format, opts, hidden_fp, budget)
    tdtype = target.values.dtype if isinstance(target, SparseTarget) else getattr(target, "dtype", None)
    sizes, targets_differ, budget = shard_sizes(group, Cr, M, like.device, opts=opts, dtype=dtype, data=data,
                                                target_dtype=tdtype, extra=extra)
    rank = dist.get_rank(group)
    offset, C = int(sizes[:rank].sum()), int(sizes.sum())
    acc = acc_dtype(dtype)
    if opts.weight is not None and opts.weight.numel() == C and C != Cr:  # the full weight: this rank's shard
        opts = dataclasses.replace(opts, weight=opts.weight[offset:offset + Cr])
    error = tgt = None
    try:
        tgt = normalize_target(target, _target_shape(like, data.target_width, cdim, C), cdim, target_format,
                               opts.ignore_index)
    except (ValueError, TypeError) as e:
        error = e
    if tgt is not None:  # PyTorch's promotion with soft targets (float32 logits, float64 probabilities)
        promoted = promoted_dtype(dtype, tgt)
        acc = acc_dtype(promoted)
        out_dtype = promoted if out_dtype == dtype else out_dtype
    return _Agreed(sizes, offset, C, opts, opts.class_weight(acc), tgt, error, targets_differ, acc, out_dtype,
                   budget)


@dataclass
class _Stats:
    """Per-row statistics of this shard, against its own max ``ref``: O(M) numbers."""

    ref: Tensor
    lse: Tensor
    raw_max: Tensor
    raw_arg: Tensor
    mass: Tensor  # T_r
    sums: Tensor  # sum_c t_c (ref - x_c)

    @staticmethod
    def of(x: Tensor, xs: Tensor, lt: "_LocalTargets", out: Optional[Tensor] = None, want_arg: bool = True):
        """``(stats, e)`` of rows ``x`` (the logits, ``[m, C_r]``; ``xs`` after softcap), with
        ``e = exp(xs - ref)`` written into ``out`` when given (it may be ``x`` itself: every read of
        ``x`` comes first). The raw argmax is found only when ``want_arg`` (``predicted`` was asked
        for); otherwise its places hold the max and 0. (Pieces of rows sized for the cache measured
        slower here: the per-piece op overhead costs more than the cache saves.)"""
        m, Cr = x.shape
        if not Cr:
            inf = torch.full((m,), float("-inf"), dtype=x.dtype, device=x.device)
            zero = torch.zeros_like(inf)
            return _Stats(zero, inf, inf, torch.zeros(m, dtype=torch.long, device=x.device), zero, zero), \
                x if out is None else out
        if want_arg:
            raw_max, raw_arg = torch.max(x, 1)
            m_r = raw_max if xs is x else torch.amax(xs, 1)
        else:  # placeholders: the predicted class is not gathered
            m_r = torch.amax(xs, 1)
            raw_max, raw_arg = m_r, torch.zeros(m, dtype=torch.long, device=x.device)
        # the shard's max, 0 for a shard of -inf (a label there gives +inf, not -inf - -inf)
        ref = torch.where(torch.isfinite(m_r), m_r, torch.zeros_like(m_r))
        T, d = lt.mass_and_sums(xs, ref)
        e = torch.sub(xs, ref.unsqueeze(1), out=out) if out is not None else xs - ref.unsqueeze(1)
        lse = torch.where(torch.isinf(m_r), m_r, ref + torch.log(e.exp_().sum(1)))
        return _Stats(ref, lse, raw_max, raw_arg, T, d), e


def _combine_rows(a: _Agreed, st: _Stats, lt: "_LocalTargets", group, dev):
    """The two O(N) collectives over these rows: ``(RowTerms, global lse, global target mass)``."""
    stats = torch.stack([st.lse.double(), st.raw_max.double(), (st.raw_arg + a.offset).double()])
    refused = torch.full((3, 1), float(a.error is not None), dtype=torch.float64, device=stats.device)
    gathered = [torch.empty(3, stats.shape[1] + 1, dtype=torch.float64, device=stats.device) for _ in a.sizes]
    dist.all_gather(gathered, torch.cat([stats, refused], 1), group=group)  # the refusal travels, even with no row
    g = torch.stack(gathered)  # [W, 3, M + 1]
    _raise_if_refused(a.error, g[:, 0, -1].cpu() > 0, "its target")
    if a.targets_differ:
        raise _differ("targets")
    g = g[:, :, :-1]
    lse = torch.logsumexp(g[:, 0], 0).to(a.acc)
    maxes = torch.where((a.sizes.to(dev) > 0).unsqueeze(1), g[:, 1], torch.full_like(g[:, 1], float("-inf")))
    pred = g[:, 2].gather(0, torch.argmax(maxes, 0, keepdim=True)).squeeze(0).long()
    part = torch.where(st.mass == 0, torch.zeros_like(st.mass), st.mass * (lse - st.ref)) + st.sums
    packed = torch.stack([part, st.mass, lt.bad.to(a.acc)], 1)
    dist.all_reduce(packed, group=group)
    # a bad label anywhere, or a +inf / NaN logit in the row (torch's log_softmax is NaN there): NaN
    ce = packed[:, 0].masked_fill((packed[:, 2] > 0) | torch.isnan(lse) | (lse == float("inf")), float("nan"))
    if lt.valid is not None:
        ce = torch.where(lt.valid, ce, torch.zeros_like(ce))
    z = None
    if a.opts.z_loss:
        z = a.opts.z_loss * lse.square()
        z = torch.where(lt.valid, z, torch.zeros_like(z)) if lt.valid is not None else z
    return RowTerms(ce, z, lse, pred if a.opts.return_extras else None), lse, packed[:, 1]


def _softcapped(x: Tensor, opts: Options):
    """``(th, xs)``: ``tanh(x / s)`` and the capped logits ``s * th`` (``None`` and ``x`` without softcap)."""
    if opts.softcap is None:
        return None, x
    th = torch.tanh(x / opts.softcap)
    return th, opts.softcap * th


def vocab_parallel_terms(input: Tensor, target, cdim: int, target_format: str, opts: Options, group,
                         out_dtype: torch.dtype):
    """``(_Shard, typed target, Reduction, shape3)`` of a vocab-parallel cross-entropy: the exchange,
    the target and the reduction; the caller runs the :class:`_Shard` (its statistics, collectives and
    gradient) through the fused autograd Function."""
    P, Cr = math.prod(input.shape[:cdim]), input.shape[cdim]
    Q = math.prod(input.shape[cdim + 1:])
    dev = input.device
    a = _agree(_LikeLogits(input.shape, dev), cdim, target, target_format, opts, group, out_dtype, input.dtype)
    lt = _local_targets(a.tgt, a.opts, a.w, a.offset, Cr, a.C, P * Q, a.acc, dev)
    pos_shape = torch.Size(input.shape[:cdim] + input.shape[cdim + 1:])
    return _Shard(a, lt, group), a.tgt, _reduction_first(a, lt, group, pos_shape, dev), (P, Cr, Q)


def vocab_parallel_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], target, target_format: str,
                          opts: Options, group, out_dtype: torch.dtype, hidden_fp: int = 0, extra=()):
    """Vocab-parallel linear cross-entropy without this shard's ``[N, V_r]`` logits: ``x`` ``[..., H]``
    (replicated), ``weight`` / ``bias`` this rank's rows. Row chunks of the shard's logits, the same
    number on every rank; each chunk's two O(chunk) collectives give its global lse, and (for a
    scalar loss) its gradient is formed at once: three matmuls per chunk, the input, weight and bias
    gradients accumulated (the weight's in float32). ``reduction="none"`` forms it in the backward,
    which recomputes each chunk's logits. Memory beyond the inputs: one chunk of logits plus the
    gradients. Returns ``(loss, terms, typed target)``."""
    pos_shape, H, Cr = x.shape[:-1], x.shape[-1], weight.shape[0]
    M, dev = math.prod(pos_shape), x.device
    like = _LikeLogits(tuple(pos_shape) + (Cr,), dev)
    a = _agree(like, len(pos_shape), target, target_format, opts, group, out_dtype, x.dtype, hidden_fp,
               budget=chunk_bytes(dev), extra=extra)
    x2 = x.reshape(M, H)
    lt = _local_targets(a.tgt, a.opts, a.w, a.offset, Cr, a.C, M, a.acc, dev)
    red = _reduction_first(a, lt, group, torch.Size(pos_shape), dev)
    # the same on every rank: an agreed budget, the largest shard
    n = opts.chunk_size or max(32, a.budget // (4 * max(1, int(a.sizes.max()))))
    n = max(1, min(n, max(M, 1)))
    wants = [t is not None and t.requires_grad for t in (x2, weight, bias)]
    grads = _Grads.zeros(x2, weight, bias, wants, a.acc) if torch.is_grad_enabled() and any(wants) \
        and red is not None and red.scalar else None  # red is None: this rank refused (raised in the first chunk)
    parts = []
    with torch.no_grad():
        for r0 in range(0, M, n) if M else (0,):
            xc, lc = x2[r0:r0 + n], lt.rows(r0, r0 + n)
            z = torch.nn.functional.linear(xc, weight, bias).to(a.acc)
            th, xs = _softcapped(z, a.opts)
            st, e = _Stats.of(z, xs, lc, out=z, want_arg=a.opts.return_extras)  # exp(xs - ref) in z's place
            terms, lse, mass = _combine_rows(a, st, lc, group, dev)
            parts.append((terms, lse, mass))
            if grads is not None:
                g, zc = _row_scales(lc, lse, a.opts, red, 1.0)
                grads.add(r0, xc, weight, _shard_grad(e, st.ref, lse, mass, lc, th, g, zc))
    terms = RowTerms(*[None if parts[0][0][i] is None else torch.cat([p[0][i] for p in parts]) for i in range(4)])
    plan = _LinearPlan(lt, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]), a.opts, red, a.acc,
                       n, grads)
    loss = _VocabParallelLinear.apply(x2, weight, bias, plan, terms)
    return loss, terms, a.tgt


def _reduction_first(a: _Agreed, lt: "_LocalTargets", group, pos_shape: torch.Size, dev) -> Optional[Reduction]:
    """The reduction, before the chunks (each forms its gradient at once). A weighted mean sums the
    class weights each rank's labels own: one all-gather of two numbers per rank, which carries a
    refusal of the target too (every rank takes it: the options agree). ``None`` where this rank
    refused its target and the refusal travels with the first chunk's collective."""
    weight_sum = None
    if a.opts.weight is not None and a.opts.num_items is None and a.opts.reduction == "mean":
        mine = torch.stack([lt.owned_w.sum().to(torch.float64),
                            torch.tensor(float(a.error is not None), dtype=torch.float64, device=dev)])
        everyone = [torch.empty_like(mine) for _ in a.sizes]
        dist.all_gather(everyone, mine, group=group)
        table = torch.stack(everyone)
        _raise_if_refused(a.error, table[:, 1].cpu() > 0, "its target")
        weight_sum = table[:, 0].sum().to(a.acc) if isinstance(a.tgt, IndexTarget) else None
    if a.tgt is None:
        return None
    return plan_reduction(a.tgt, a.opts, a.acc, dev, pos_shape, a.out_dtype, weight_sum=weight_sum)


@dataclass
class _Grads:
    """The gradients formed in the forward (a scalar loss): the input's in its dtype, the weight's and
    bias's accumulated in float32 (the accumulation dtype)."""

    dx: Optional[Tensor]
    dw: Optional[Tensor]
    db: Optional[Tensor]

    @staticmethod
    def zeros(x2: Tensor, weight: Tensor, bias: Optional[Tensor], wants, acc: torch.dtype) -> "_Grads":
        return _Grads(torch.zeros_like(x2) if wants[0] else None,
                      torch.zeros(weight.shape, dtype=acc, device=weight.device) if wants[1] else None,
                      torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if wants[2] else None)

    def add(self, r0: int, xc: Tensor, weight: Tensor, p: Tensor) -> None:
        """A chunk's logit gradient ``p`` ``[m, V_r]`` (rows ``r0:r0 + m``): its three products."""
        if self.dx is not None:
            self.dx[r0:r0 + p.shape[0]] = (p.to(weight.dtype) @ weight).to(self.dx.dtype)
        if self.dw is not None:
            self.dw.addmm_(p.t(), xc.to(p.dtype))
        if self.db is not None:
            self.db += p.sum(0)

    def out(self, grad: Tensor, weight: Tensor, bias: Optional[Tensor]):
        """Scaled by the incoming (scalar) gradient, in the inputs' dtypes."""
        def scaled(t, dtype):
            return None if t is None else (t * grad.to(t.dtype)).to(dtype)
        return (scaled(self.dx, self.dx.dtype if self.dx is not None else None), scaled(self.dw, weight.dtype),
                scaled(self.db, None if bias is None else bias.dtype))


@dataclass
class _LinearPlan:
    lt: "_LocalTargets"
    lse: Tensor
    mass: Tensor
    opts: Options
    red: Reduction
    acc: torch.dtype
    rows: int
    grads: Optional[_Grads]


class _VocabParallelLinear(torch.autograd.Function):
    """The loss from the forward's terms. The backward scales the gradients formed in the forward, or
    (``reduction="none"``) recomputes each chunk's logits of this shard with the rows' upstream."""

    @staticmethod
    def forward(ctx, x2: Tensor, weight: Tensor, bias: Optional[Tensor], plan: _LinearPlan, terms: RowTerms):
        ctx.save_for_backward(x2 if plan.grads is None else None, weight, bias)
        ctx.plan = plan
        return plan.red.reduce(terms.ce, terms.z)

    @staticmethod
    def backward(ctx, grad: Tensor):
        refuse_double_backward("vocab-parallel linear_cross_entropy")  # create_graph=True: a clear error
        with torch.no_grad():
            return _VocabParallelLinear._gradients(ctx, grad)

    @staticmethod
    def _gradients(ctx, grad: Tensor):
        x2, weight, bias = ctx.saved_tensors
        plan = ctx.plan
        if plan.grads is not None:
            return (*plan.grads.out(grad, weight, bias), None, None)
        up = grad.reshape(-1).to(plan.acc) if not plan.red.scalar else grad.to(plan.acc)
        grads = _Grads.zeros(x2, weight, bias, ctx.needs_input_grad[:3], plan.acc)
        n = plan.rows
        for r0 in range(0, x2.shape[0], n):
            xc = x2[r0:r0 + n]
            z = torch.nn.functional.linear(xc, weight, bias).to(plan.acc)
            th, xs = _softcapped(z, plan.opts)
            lse, lt = plan.lse[r0:r0 + n], plan.lt.rows(r0, r0 + n)
            g, zc = _row_scales(lt, lse, plan.opts, plan.red, up[r0:r0 + n] if up.dim() else up)
            e = torch.sub(xs, lse.unsqueeze(1), out=xs).exp_()  # against the global lse: ref = lse
            grads.add(r0, xc, weight, _shard_grad(e, lse, lse, plan.mass[r0:r0 + n], lt, th, g, zc))
        return (*grads.out(torch.ones((), dtype=plan.acc, device=weight.device), weight, bias), None, None)


def _target_shape(like: "_LikeLogits", width: int, cdim: int, C: int) -> "_LikeLogits":
    """The logits the target is checked against: the full vocabulary, or this shard for a shard of the
    probabilities (a float target as wide as the shard, read as probabilities)."""
    Cr = like.shape[cdim]
    if width == Cr and Cr != C:
        return like
    return _LikeLogits(like.shape[:cdim] + (C,) + like.shape[cdim + 1:], like.device)


class _LikeLogits:
    """Shape and device of the full-vocabulary logits (for target normalisation against all classes)."""

    def __init__(self, shape, device):
        self.shape, self.device = torch.Size(shape), device

    def __repr__(self) -> str:
        return f"logits {_fmt(self.shape)}"


class _CopyToVocabParallel(torch.autograd.Function):
    """Identity forward; the backward sums the input's gradient over the ranks (each rank's shard of
    the vocabulary contributes its part of ``dL/dx``)."""

    @staticmethod
    def forward(ctx, x: Tensor, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def copy_to_vocab_parallel(x: Tensor, group) -> Tensor:
    """``x`` unchanged, with its gradient all-reduced (SUM) over ``group`` in the backward."""
    return _CopyToVocabParallel.apply(x, group)


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - older torch
        return False
    return isinstance(t, DTensor)


def local_tensor(t):
    """A DTensor given beside the logits (class weights, a target, ``num_items``): this rank's tensor.
    Replicated, that is all of it (the full ``[C]`` class weights, as ``loss_parallel`` takes them);
    sharded with the vocabulary, this rank's shard (told apart by the exchange)."""
    return t.to_local() if is_dtensor(t) else t


def _replicated(mesh):
    from torch.distributed.tensor import DTensor, Replicate

    def wrap(loss: Tensor):
        return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)
    return wrap


def _mesh_group(t, what: str):
    mesh = t.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"{what} is a DTensor on a {mesh.ndim}-D device mesh; vocab-parallel crossent takes a "
                         "1-D mesh (slice the mesh to the tensor-parallel dim: mesh['tp'])")
    return mesh, mesh.get_group()


def dtensor_logits(input, dim: int):
    """``(local logits, process group, wrap)`` for DTensor logits: sharded on the class dim (vocab-parallel)
    or replicated (the whole vocabulary on every rank); ``wrap`` makes the loss a replicated DTensor."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, group = _mesh_group(input, "input")
    cdim = 0 if input.dim() == 1 else dim % input.dim()
    (placement,) = input.placements
    if isinstance(placement, Replicate):
        return input.to_local(), None, _replicated(mesh)
    if not (isinstance(placement, Shard) and placement.dim == cdim):
        raise ValueError(f"input is a DTensor placed {placement}; vocab-parallel cross_entropy takes logits sharded "
                         f"on the class dim (Shard({cdim})) or replicated")
    return input.to_local(), group, _replicated(mesh)


def dtensor_linear_args(input, linear_weight, linear_bias):
    """``(input, weight, bias, group, wrap)`` for a DTensor ``linear_weight`` sharded on dim 0 (an lm_head
    under ColwiseParallel) and a replicated input (a DTensor or a plain tensor)."""
    from torch.distributed.tensor import Replicate, Shard

    if not is_dtensor(linear_weight):
        raise ValueError("input is a DTensor but linear_weight is not: pass the lm_head weight as a DTensor "
                         "sharded on dim 0 (vocab-parallel), or plain tensors")
    mesh, group = _mesh_group(linear_weight, "linear_weight")
    (placement,) = linear_weight.placements
    if not (isinstance(placement, Shard) and placement.dim == 0) and not isinstance(placement, Replicate):
        raise ValueError(f"linear_weight is a DTensor placed {placement}; vocab-parallel linear_cross_entropy "
                         "takes it sharded on dim 0 (the vocabulary), as ColwiseParallel places an lm_head")
    if is_dtensor(input):
        if not all(isinstance(p, Replicate) for p in input.placements):
            raise ValueError(f"input is a DTensor placed {input.placements}; the hidden states must be replicated "
                             "(input.redistribute(mesh, [Replicate()]))")
        input = input.to_local()
    if is_dtensor(linear_bias):
        linear_bias = linear_bias.to_local()
    shard = isinstance(placement, Shard)
    return input, linear_weight.to_local(), linear_bias, group if shard else None, _replicated(mesh)

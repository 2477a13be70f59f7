"""Vocab-parallel cross-entropy over ``torch.distributed``: the input's class dim is this rank's
contiguous shard of the vocabulary (ranks in order, shards possibly uneven); every rank gets the
loss over the full vocabulary and the gradient of its own shard.

Every call starts with one all-gather of a few int64 numbers per rank: classes, positions, a refusal
flag, a fingerprint of the options, and, while value checks are on, fingerprints of the targets and
of the hidden states (linear) and the value of ``num_items``, plus the class weight's length. Ranks
that disagree on any of them, or a rank that refused its arguments, make every rank raise (never a
hang, never a different "global" loss per rank). The forward then needs two collectives of O(N)
numbers, never O(N V):

1. an all-gather of each shard's ``(lse, max logit, argmax, refused)`` per position: the global
   log-sum-exp is their logsumexp, the predicted class the first maximum;
2. one all-reduce of a packed ``[N, 4]`` tensor: each shard's loss contribution
   ``T_r (lse - m_r) + sum_c t_c (m_r - x_c)`` (non-negative sums against the shard's max, so
   nothing cancels or underflows), its target mass ``T_r``, the class weight of the labels it owns
   (the weighted-mean denominator) and a flag for labels out of range.

Label smoothing spreads over the full vocabulary, class weights are this rank's shard (or the full
weight, sliced here), and the gradient ``scale * (T p - t)`` (plus z-loss) is formed in the forward
from the global ``lse``: the backward needs no collective. It runs through the same autograd
Function as the fused impls.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .config import value_checks
from .impl.common import RowTerms, acc_dtype, host_reads_free
from .options import Options
from .reduction import Reduction, plan_reduction
from .targets import (IndexTarget, ProbsTarget, SparseTarget, Target, _fmt, check_after, normalize_target,
                      promoted_dtype)

__all__ = ["agree_after", "data_fingerprint", "hidden_states_fingerprint", "local_weight", "world_size", "shard_sizes", "vocab_parallel_terms", "copy_to_vocab_parallel", "is_dtensor",
           "dtensor_logits", "dtensor_linear_args"]

def world_size(group) -> int:
    """The group's size. A group object that answers ``size()`` (a one-rank stand-in group, as
    Megatron's) is asked directly; otherwise torch.distributed must be initialised."""
    if not dist.is_available() or not dist.is_initialized():
        size = getattr(group, "size", None)
        if callable(size):
            return int(size())
        raise ValueError("process_group was given but torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group first (or leave process_group=None)")
    return dist.get_world_size(group)


def _fingerprint(opts: Optional[Options], dtype) -> int:
    """A number every rank must agree on: the options that change the loss, and the logits' dtype."""
    if opts is None:
        return 0
    key = (opts.ignore_index, opts.reduction, opts.label_smoothing, opts.z_loss, opts.softcap,
           opts.weight is not None, opts.num_items is not None, opts.return_extras, str(dtype), value_checks())
    return zlib.crc32(repr(key).encode())


def data_fingerprint(*tensors) -> int:
    """An int64 every rank must agree on when it holds the same tensors (``None`` skipped): an
    integer sum of their bits, weighted by position. Integer sums are exact and order-free, so the
    number is the same on every rank and thread count; one read of the data, in chunks."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        flat = t.detach().reshape(-1)
        if flat.dtype.is_floating_point:
            flat = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[flat.element_size()])
        step = 1 << 20
        for i in range(0, flat.numel(), step):
            part = flat[i:i + step].to(torch.int64)
            pos = torch.arange(i, i + part.numel(), device=part.device) % 8191 + 1
            total = (total * 31 + int((part * pos).sum())) % (1 << 61)
        total = (total * 31 + flat.numel()) % (1 << 61)
    return total


_HIDDEN_FINGERPRINT = contextvars.ContextVar("crossent_hidden_fingerprint", default=0)


@contextlib.contextmanager
def hidden_states_fingerprint(fp: int):
    """Vocab-parallel linear CE: the replicated hidden states' fingerprint travels with the exchange of
    the cross-entropy it runs on the shard's logits."""
    token = _HIDDEN_FINGERPRINT.set(fp)
    try:
        yield
    finally:
        _HIDDEN_FINGERPRINT.reset(token)


def _call_fingerprints(input: Tensor, target, cdim: int, opts: Options):
    """``(targets, hidden states, num_items)`` numbers every rank must agree on. A float target with
    this shard's class count may be this rank's shard of the probabilities: not compared."""
    if isinstance(target, SparseTarget):
        tfp = data_fingerprint(target.indices, target.values)
    elif isinstance(target, Tensor):
        shard = target.dtype.is_floating_point and target.dim() == input.dim() and \
            target.shape[cdim] == input.shape[cdim]
        tfp = 0 if shard else data_fingerprint(target)
    else:
        tfp = 0
    return tfp, _HIDDEN_FINGERPRINT.get(), _num_items_bits(opts.num_items)


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


def refuse_vocab_parallel(group, error: BaseException, input) -> None:
    """This rank refuses its arguments: take part in the exchange the others are in, then raise."""
    shard_sizes(group, -1, -1, _exchange_device(group, input), error=error)
    raise error  # unreachable: shard_sizes raised it


def shard_sizes(group, classes: int, positions: int, device: torch.device, error: Optional[BaseException] = None,
                opts: Optional[Options] = None, dtype=None, data=(0, 0, 0), weight_len: int = -1) -> Tensor:
    """``(classes, targets differ)``: every rank's number of classes (``[world]`` int64 on the host),
    and whether the targets' fingerprints differ (raised after the target checks, so that a rank's
    own refusal of its target is what every rank reports), from one all-gather of
    ``(classes, positions, refused, options, targets, hidden states, num_items, weight length)``
    per rank at every call (a few numbers; a cache could go stale between heads of different
    sizes). ``data`` holds the fingerprints of the targets and hidden states and the value of
    ``num_items`` (zeros while value checks are off). Ranks that disagree on any of them, or a rank
    that refused its arguments, make every rank raise instead of leaving the others waiting or
    returning different "global" losses."""
    mine = torch.tensor([classes, positions, int(error is not None), _fingerprint(opts, dtype), *data, weight_len],
                        dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    table = torch.stack(everyone).cpu()
    _raise_if_refused(error, table[:, 2], "its arguments")
    _check_weight_lengths(table[:, 0], table[:, 7])
    if bool((table[:, 1] != table[0, 1]).any()):
        raise ValueError(f"vocab-parallel cross_entropy: the ranks hold different numbers of positions "
                         f"{table[:, 1].tolist()} (rank r has row r): every rank must pass the same positions "
                         "(the full batch) with its own shard of the classes")
    if bool((table[:, 3] != table[0, 3]).any()):
        raise ValueError("vocab-parallel cross_entropy: the ranks were called with different options or logits "
                         "dtypes (label_smoothing, z_loss, softcap, ignore_index, reduction, weight, num_items, "
                         "return_extras, dtype, value checks must agree): pass the same ones on every rank")
    for col, what in ((5, "hidden states"), (6, "num_items")):
        if bool((table[:, col] != table[0, col]).any()):
            raise _differ(what)
    return table[:, 0], bool((table[:, 4] != table[0, 4]).any())


def _differ(what: str) -> ValueError:
    return ValueError(f"vocab-parallel cross_entropy: the ranks hold different {what} (compared by fingerprint "
                      f"while value checks are on): vocab-parallel ranks split the classes of one batch, so every "
                      f"rank must pass the same {what}. {_FSDP_HINT}")


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
    if not (value_checks() and isinstance(tgt, ProbsTarget) and bool(torch.isnan(loss.detach()).any())):
        return
    error = None
    try:
        check_after(tgt, target, loss)
    except (ValueError, TypeError) as e:
        error = e
    mine = torch.tensor([int(error is not None)], dtype=torch.int64, device=loss.device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    _raise_if_refused(error, torch.cat(everyone).cpu() > 0, "its target")


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
    """What the forward learned; handed to the fused autograd Function as its impl, which asks it for
    the gradient of this rank's shard (formed from the global lse, no collective)."""

    terms: RowTerms
    xs: Tensor  # [M, C_r] this shard's logits after softcap (a view of the input without softcap)
    lse: Tensor  # [M] global
    mass: Tensor  # [M] T, the global target mass
    targets: "_LocalTargets"
    th: Optional[Tensor]  # [M, C_r] tanh(x / softcap)
    opts: Optional[Options] = None  # the options with this rank's shard of the class weights
    NAME: str = "vocab-parallel"

    def cross_entropy(self, x3: Tensor, tgt: Target, opts: Options, red: Reduction,
                      grad3: Optional[Tensor] = None) -> RowTerms:
        if grad3 is None:
            return self.terms
        P, Cr, Q = x3.shape
        lt = self.targets
        on = lt.valid if lt.valid is not None else torch.ones_like(self.lse, dtype=torch.bool)
        g = torch.where(on, red.ce_scale, 0.0)  # [M]; ignored rows 0 (a NaN scale reaches counted rows only)
        coef = self.mass * g
        if opts.z_loss:
            coef = coef + torch.where(on, 2 * opts.z_loss * red.z_scale, 0.0) * self.lse
        # softmax over the full vocabulary, straight into the gradient buffer when it is a plain view
        dst = grad3[:, :, 0] if Q == 1 else None
        direct = dst is not None and dst.dtype == self.xs.dtype and dst.is_contiguous()
        p = torch.sub(self.xs, self.lse.unsqueeze(1), out=dst if direct else None).exp_()
        p.mul_(coef.unsqueeze(1))
        if lt.t is not None:
            p.sub_(g.unsqueeze(1) * lt.t)
        else:
            if lt.cols is not None:
                p.scatter_add_(1, lt.cols, -g.unsqueeze(1) * lt.vals)
            if lt.smooth is not None:
                p.addr_(g * lt.rows_on, lt.smooth, alpha=-1)
        if self.th is not None:
            p.mul_(1 - self.th.square())
        # a row whose global lse is not finite (+inf or NaN anywhere, or all -inf) has a NaN softmax on
        # every rank, as in one process: no rank keeps a finite gradient for it
        bad_rows = ~torch.isfinite(self.lse)
        if not host_reads_free(bad_rows) or bool(bad_rows.any()):  # a pass over p only when needed (CPU)
            p.masked_fill_(bad_rows.unsqueeze(1), float("nan"))
        if not direct:
            grad3.copy_(p.reshape(P, Q, Cr).transpose(1, 2))
        return self.terms


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


def vocab_parallel_terms(input: Tensor, target, cdim: int, target_format: str, opts: Options, group,
                         out_dtype: torch.dtype):
    """``(_Shard, typed target, Reduction, shape3)`` of a vocab-parallel cross-entropy: the collectives
    and the per-position terms (no autograd); the caller runs the gradient through the fused Function."""
    P, Cr = math.prod(input.shape[:cdim]), input.shape[cdim]
    Q = math.prod(input.shape[cdim + 1:])
    M, dev, acc = P * Q, input.device, acc_dtype(input.dtype)
    data = _call_fingerprints(input, target, cdim, opts) if value_checks() else (0, 0, 0)
    sizes, targets_differ = shard_sizes(group, Cr, M, dev, opts=opts, dtype=input.dtype, data=data,
                                        weight_len=-1 if opts.weight is None else opts.weight.numel())
    rank = dist.get_rank(group)
    offset, C = int(sizes[:rank].sum()), int(sizes.sum())
    w = opts.class_weight(acc)
    if w is not None and w.numel() == C and C != Cr:  # the full weight, replicated: this rank's shard
        w = w[offset:offset + Cr]
        opts = dataclasses.replace(opts, weight=opts.weight[offset:offset + Cr])
    error = None
    try:  # checked against the global vocabulary; a refusal travels with the next collective
        tgt = normalize_target(target, _target_shape(input, target, cdim, C), cdim, target_format,
                               opts.ignore_index)
    except (ValueError, TypeError) as e:
        error, tgt = e, None
    if tgt is not None:  # PyTorch's promotion with soft targets (float32 logits, float64 probabilities)
        dtype = promoted_dtype(input.dtype, tgt)
        acc = acc_dtype(dtype)
        out_dtype = dtype if out_dtype == input.dtype else out_dtype

    x = _rows(input.reshape(P, Cr, Q).detach(), acc)
    th = torch.tanh(x / opts.softcap) if opts.softcap is not None else None
    xs = opts.softcap * th if th is not None else x
    # 1. per-shard (lse, max, argmax) -> the global lse and predicted class
    if Cr:
        m_r = torch.amax(xs, 1)
        raw_max, raw_arg = torch.max(x, 1)
    else:
        m_r = raw_max = torch.full((M,), float("-inf"), dtype=acc, device=dev)
        raw_arg = torch.zeros(M, dtype=torch.long, device=dev)
    ref = torch.where(torch.isfinite(m_r), m_r, torch.zeros_like(m_r))
    lse_r = torch.where(torch.isinf(m_r), m_r, ref + torch.log((xs - ref.unsqueeze(1)).exp_().sum(1)))
    stats = torch.stack([lse_r.double(), raw_max.double(), (raw_arg + offset).double(),
                         torch.full_like(lse_r, float(error is not None), dtype=torch.float64)])
    gathered = [torch.empty_like(stats) for _ in range(len(sizes))]
    dist.all_gather(gathered, stats, group=group)
    g = torch.stack(gathered)  # [W, 4, M]
    _raise_if_refused(error, g[:, 3, 0] > 0 if M else torch.zeros(len(sizes), dtype=torch.bool), "its target")
    if targets_differ:
        raise _differ("targets")
    lse = torch.logsumexp(g[:, 0], 0).to(acc)
    maxes = torch.where((sizes.to(dev) > 0).unsqueeze(1), g[:, 1], torch.full_like(g[:, 1], float("-inf")))
    pred = g[:, 2].gather(0, torch.argmax(maxes, 0, keepdim=True)).squeeze(0).long()
    # 2. this shard's loss contribution, target mass and owned class weight -> one all-reduce
    lt = _local_targets(tgt, opts, w, offset, Cr, C, M, acc, dev)
    # sums against ref (the shard's max, 0 for a shard of -inf: a label there gives +inf, not -inf - -inf)
    T_r, d = lt.mass_and_sums(xs, ref) if Cr else (torch.zeros_like(m_r), torch.zeros_like(m_r))
    part = torch.where(T_r == 0, torch.zeros_like(T_r), T_r * (lse - ref)) + d
    packed = torch.stack([part, T_r, lt.owned_w, lt.bad.to(acc)], 1)  # a bad label anywhere: NaN everywhere
    dist.all_reduce(packed, group=group)
    ce = packed[:, 0].masked_fill(packed[:, 3] > 0, float("nan"))
    if lt.valid is not None:
        ce = torch.where(lt.valid, ce, torch.zeros_like(ce))
    z = None
    if opts.z_loss:
        z = opts.z_loss * lse.square()
        z = torch.where(lt.valid, z, torch.zeros_like(z)) if lt.valid is not None else z
    pos_shape = torch.Size(input.shape[:cdim] + input.shape[cdim + 1:])
    red = plan_reduction(tgt, opts, acc, dev, pos_shape, out_dtype,
                         weight_sum=packed[:, 2].sum() if (w is not None and isinstance(tgt, IndexTarget)) else None)
    terms = RowTerms(ce, z, lse, pred if opts.return_extras else None)
    return _Shard(terms, xs, lse, packed[:, 1], lt, th, opts), tgt, red, (P, Cr, Q)


def _target_shape(input: Tensor, target, cdim: int, C: int) -> "_LikeLogits":
    """The logits the target is checked against: the full vocabulary, or this shard for a shard of the
    probabilities (a float target with the input's shape)."""
    Cr = input.shape[cdim]
    if isinstance(target, Tensor) and target.dtype.is_floating_point and target.dim() == input.dim() \
            and target.shape[cdim] == Cr and Cr != C:
        return _LikeLogits(input.shape, input.device)
    return _LikeLogits(input.shape[:cdim] + (C,) + input.shape[cdim + 1:], input.device)


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


def local_weight(weight):
    """Class weights given as a DTensor: replicated (the full ``[C]``, as ``loss_parallel`` takes them)
    or sharded with the vocabulary: this rank's tensor (the shard or the full weight, told apart by the
    exchange)."""
    return weight.to_local() if is_dtensor(weight) else weight


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

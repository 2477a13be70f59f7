"""Detect, validate and normalise target encodings.

Every target reaches the impls as one of three small typed classes, laid out
like the input viewed as ``(P, C, Q)`` (``P`` = product of the dims before the
class dim, ``Q`` = product of the dims after it; a position is a ``(p, q)``
pair, ``M = P * Q`` positions in all):

* :class:`IndexTarget` -- ``[P, Q]`` int64 class indices (from index or one-hot
  targets); ``ignore_index`` marks ignored positions.
* :class:`ProbsTarget` -- ``[P, C, Q]`` floating class probabilities (a view,
  never copied).
* :class:`TopKTarget` -- ``[P, Q, k]`` indices and values of a
  :class:`SparseTarget`; an index equal to ``ignore_index`` is padding.

Index and top-k targets are both "k classes per position" targets: their
:meth:`~IndexTarget.class_terms` give the classes and target masses that the
fused impls scatter, without a pass over the logits.

Checks that read target *values* (out-of-range classes, multi-hot rows, NaN)
need the data on the host: on CUDA each costs one device synchronisation.
They run by default; :func:`crossent.set_checks` (or ``CROSSENT_CHECKS=0``)
turns them off. With checks off, a bad value gives its position a NaN loss
(never a device-side assert).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .config import value_checks
from .errors import IndexValueError, RuntimeTypeError, RuntimeValueError
from .options import TARGET_FORMATS

__all__ = ["SparseTarget", "IndexTarget", "ProbsTarget", "TopKTarget", "Target", "normalize_target",
           "TARGET_FORMATS"]


class SparseTarget:
    """Top-k soft targets: ``indices`` ``[..., k]`` (integer) and ``values``
    ``[..., k]`` (float), where ``...`` is the input's shape without its class
    dim. Classes not listed have probability 0. An index equal to the loss's
    ``ignore_index`` is padding (its value is not used). Repeated indices add up.
    Never densified: the loss reads only the ``k`` given entries per position.

    Example::

        >>> logits = torch.randn(2, 5)
        >>> t = SparseTarget(torch.tensor([[1, 3], [0, -100]]), torch.tensor([[0.7, 0.3], [1.0, 0.0]]))
        >>> loss = crossent.cross_entropy(logits, t)
    """

    __slots__ = ("indices", "values")

    def __init__(self, indices: Tensor, values: Tensor):
        if not isinstance(indices, Tensor) or not isinstance(values, Tensor):
            raise TypeError("SparseTarget(indices, values) takes two tensors")
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise TypeError(f"SparseTarget indices must be an integer tensor, got {indices.dtype}; use indices.long()")
        if not values.dtype.is_floating_point:
            raise TypeError(f"SparseTarget values must be a floating tensor, got {values.dtype}; use values.float()")
        if indices.shape != values.shape:
            raise ValueError(
                f"SparseTarget indices {list(indices.shape)} and values {list(values.shape)} must have the same shape [..., k]"
            )
        if indices.dim() == 0 or indices.shape[-1] == 0:
            raise ValueError(f"SparseTarget needs a last dim k >= 1, got shape {list(indices.shape)}")
        if indices.device != values.device:
            raise ValueError(f"SparseTarget indices are on {indices.device} but values on {values.device}")
        self.indices = indices
        self.values = values

    @property
    def shape(self) -> torch.Size:
        return self.indices.shape

    @property
    def device(self) -> torch.device:
        return self.indices.device

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def to(self, *args, **kwargs) -> "SparseTarget":
        """Move both tensors (dtype arguments apply to ``values`` only)."""
        idx = self.indices.to(*[a for a in args if not isinstance(a, torch.dtype)], **{k: v for k, v in kwargs.items() if k != "dtype"})
        return SparseTarget(idx, self.values.to(*args, **kwargs))

    def to_dense(self, num_classes: int, ignore_index: int = -100, dim: int = -1) -> Tensor:
        """The equivalent dense probability tensor (for tests and inspection)."""
        pad = self.indices == ignore_index
        idx = self.indices.long().masked_fill(pad, 0)
        val = self.values.masked_fill(pad, 0)
        out = torch.zeros(*self.indices.shape[:-1], num_classes, dtype=self.values.dtype, device=self.values.device)
        out.scatter_add_(-1, idx, val)
        return out.movedim(-1, dim) if dim != -1 else out

    def __repr__(self) -> str:
        return f"SparseTarget(shape={list(self.shape)}, indices={self.indices!r}, values={self.values!r})"


class ClassTerms(NamedTuple):
    """Per-position target terms of an index or top-k target, rows flattened (``M`` rows).

    ``cols`` ``[M, k]`` int64 are classes (0 where padding or ignored); ``vals``
    ``[M, k]`` the target mass there, weighted and scaled by ``1 - label_smoothing``
    (0 for padding and ignored positions; NaN for a class out of range when checks
    are off, so the loss shows it instead of hiding it); ``row_valid`` ``[M]`` is
    1/0 for index targets (ignored positions), None for top-k targets (every
    position counts).
    """

    cols: Tensor
    vals: Tensor
    row_valid: Optional[Tensor]


@dataclass(frozen=True, eq=False)
class IndexTarget:
    """Class indices ``[P, Q]`` int64 (``source``: "index" or "one_hot")."""

    index: Tensor
    ignore_index: int
    source: str = "index"

    @property
    def positions(self) -> int:
        return self.index.numel()

    @property
    def requires_grad(self) -> bool:
        return False

    @property
    def valid(self) -> Tensor:
        """``[P, Q]`` bool: the positions that are not ignored."""
        return self.index != self.ignore_index

    def rows(self, r0: int, r1: int) -> "IndexTarget":
        """Positions ``[r0, r1)`` of the flattened positions, for ``[r1 - r0, C, 1]`` logits."""
        return IndexTarget(self.index.reshape(-1)[r0:r1].reshape(-1, 1), self.ignore_index, self.source)

    def class_terms(self, weight: Optional[Tensor], label_smoothing: float, C: int, acc: torch.dtype) -> ClassTerms:
        y = self.index.reshape(-1, 1)
        valid = y != self.ignore_index
        in_range = (y >= 0) & (y < C)
        vals = valid.to(acc)
        return _finish_terms(y, vals, valid & ~in_range, in_range, weight, label_smoothing, vals.reshape(-1))


@dataclass(frozen=True, eq=False)
class ProbsTarget:
    """Class probabilities ``[P, C, Q]`` (a view of the caller's tensor)."""

    probs: Tensor
    source: str = "probs"

    @property
    def positions(self) -> int:
        return self.probs.shape[0] * self.probs.shape[2]

    @property
    def requires_grad(self) -> bool:
        return self.probs.requires_grad

    def rows(self, r0: int, r1: int) -> "ProbsTarget":
        """Positions ``[r0, r1)`` as ``[r1 - r0, C, 1]`` (a view when ``Q == 1``)."""
        P, C, Q = self.probs.shape
        return ProbsTarget(self.probs.transpose(1, 2).reshape(-1, C)[r0:r1].unsqueeze(2), self.source)

    def check_finite(self, name: str = "target") -> None:
        """Raise on NaN in the probabilities (one host sync on CUDA), while value checks are on."""
        if value_checks():
            _check_nan(self.probs, name)


@dataclass(frozen=True, eq=False)
class TopKTarget:
    """A :class:`SparseTarget` as ``[P, Q, k]`` int64 indices and float values."""

    indices: Tensor
    values: Tensor
    ignore_index: int
    source: str = "sparse"

    @property
    def positions(self) -> int:
        return self.indices.shape[0] * self.indices.shape[1]

    @property
    def requires_grad(self) -> bool:
        return self.values.requires_grad

    @property
    def padding(self) -> Tensor:
        """``[P, Q, k]`` bool: the padding entries (index == ignore_index)."""
        return self.indices == self.ignore_index

    def rows(self, r0: int, r1: int) -> "TopKTarget":
        k = self.indices.shape[-1]
        return TopKTarget(self.indices.reshape(-1, k)[r0:r1].reshape(-1, 1, k),
                          self.values.reshape(-1, k)[r0:r1].reshape(-1, 1, k), self.ignore_index, self.source)

    def class_terms(self, weight: Optional[Tensor], label_smoothing: float, C: int, acc: torch.dtype) -> ClassTerms:
        k = self.indices.shape[-1]
        y = self.indices.reshape(-1, k)
        pad = y == self.ignore_index
        in_range = (y >= 0) & (y < C)
        vals = torch.where(pad, torch.zeros((), dtype=acc, device=y.device), self.values.reshape(-1, k).to(acc))
        return _finish_terms(y, vals, ~pad & ~in_range, in_range, weight, label_smoothing, None)


Target = Union[IndexTarget, ProbsTarget, TopKTarget]


def _finish_terms(y: Tensor, vals: Tensor, bad: Tensor, in_range: Tensor, weight: Optional[Tensor],
                  label_smoothing: float, row_valid: Optional[Tensor]) -> ClassTerms:
    cols = torch.where(in_range, y, torch.zeros_like(y))
    if weight is not None:
        vals = vals * weight[cols]
    if label_smoothing > 0:
        vals = vals * (1 - label_smoothing)
    return ClassTerms(cols, vals.masked_fill(bad, float("nan")), row_valid)


def promoted_dtype(dtype: torch.dtype, tgt: Target) -> torch.dtype:
    """``dtype`` promoted with soft targets' (dense or top-k) values, as PyTorch promotes logits with
    probabilities (float32 and float64 compute in float64)."""
    if isinstance(tgt, ProbsTarget):
        return torch.promote_types(dtype, tgt.probs.dtype)
    if isinstance(tgt, TopKTarget):
        return torch.promote_types(dtype, tgt.values.dtype)
    return dtype


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _position(flat_index: int, shape: Sequence[int]) -> Tuple[int, ...]:
    pos = []
    for s in reversed(list(shape)):
        pos.append(flat_index % s if s else 0)
        flat_index //= max(s, 1)
    return tuple(reversed(pos))


def class_dim(input: Tensor, dim: int) -> int:
    """The class dim of ``input`` (0 for an unbatched ``(C,)`` input)."""
    dim_in = dim
    try:
        dim = operator.index(dim) if not isinstance(dim, bool) else None
    except TypeError:
        dim = None
    if dim is None:
        raise TypeError(f"dim must be an int, got {type(dim_in).__name__} {dim_in!r}")
    if input.dim() == 0:
        raise RuntimeValueError("input is a 0-dim tensor: cross_entropy needs logits with a class dim, e.g. [N, C] "
                                "or [C]")
    if input.dim() == 1:
        if dim not in (0, 1, -1):
            raise ValueError(f"dim={dim} is out of range for a 1-dim (unbatched) input of shape {_fmt(input.shape)}")
        return 0
    if not -input.dim() <= dim < input.dim():
        raise ValueError(f"dim={dim} is out of range for input of shape {_fmt(input.shape)} ({input.dim()} dims)")
    return dim % input.dim()


def _shape_hint(input_shape: torch.Size, cdim: int, target_shape: torch.Size) -> str:
    """A sentence suggesting the ``dim`` under which ``target_shape`` would fit."""
    nd = len(input_shape)
    for d in range(nd):
        if d == cdim:
            continue
        if tuple(input_shape[:d]) + tuple(input_shape[d + 1:]) == tuple(target_shape):
            name = "the last dim" if d == nd - 1 else f"dim {d}"
            arg = "-1" if d == nd - 1 else str(d)
            return f": classes look like {name}, pass dim={arg}"
    if len(target_shape) == nd and tuple(target_shape) != tuple(input_shape):
        return (": a one-hot or probability target must have the input's shape exactly"
                " (a transposed target needs .movedim() to match)")
    return ""


def normalize_target(target, input, cdim: int, target_format: str, ignore_index: int) -> Target:
    """Detect ``target``'s encoding, validate it and bring it to canonical form.

    ``input`` needs only ``.shape`` and ``.device`` (logits that are never
    built can be described by any object that has them).
    """
    if target_format not in TARGET_FORMATS:
        raise ValueError(f"target_format={target_format!r} is not one of {', '.join(repr(f) for f in TARGET_FORMATS)}")
    if isinstance(target, SparseTarget):
        return _sparse(target, input, cdim, target_format, ignore_index)
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor or a SparseTarget, got {type(target).__name__}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input on {input.device}; move it with target.to(input.device)")
    if target.dtype.is_complex:
        raise TypeError(f"target has complex dtype {target.dtype}; cross_entropy takes integer, bool or real targets")
    fmt = _detect_format(target, input.shape, cdim) if target_format == "auto" else target_format
    if fmt == "index":
        return _index(target, input.shape, cdim, ignore_index)
    if fmt == "one_hot":
        return _one_hot(target, input.shape, cdim, ignore_index)
    if fmt == "probs":
        return _probs(target, input.shape, cdim, ignore_index)
    raise TypeError("target_format='sparse' needs a crossent.SparseTarget(indices, values)")


def _layout(shape: torch.Size, cdim: int) -> Tuple[int, int, int, torch.Size]:
    """``(P, C, Q, positions' shape)`` of logits of ``shape`` with classes at ``cdim``."""
    return (math.prod(shape[:cdim]), shape[cdim], math.prod(shape[cdim + 1:]),
            torch.Size(shape[:cdim] + shape[cdim + 1:]))


def _detect_format(target: Tensor, shape: torch.Size, cdim: int) -> str:
    """``auto``: integer of index shape -> index; float of input shape -> probs; integer/bool of input shape -> one-hot."""
    _, C, _, pos_shape = _layout(shape, cdim)
    floating, is_bool = target.dtype.is_floating_point, target.dtype == torch.bool
    if target.shape == pos_shape and not floating and not is_bool:
        return "index"
    if target.shape == shape:
        return "probs" if floating else "one_hot"
    if target.shape == pos_shape and floating:
        raise RuntimeTypeError(
            f"target is {target.dtype} with shape {_fmt(target.shape)}, the shape of class indices for input "
            f"{_fmt(shape)}: class indices must be integers, use target.long()")
    if target.shape == pos_shape and is_bool:
        raise RuntimeTypeError(
            f"target is bool with shape {_fmt(target.shape)}, the shape of class indices: use target.long() "
            "for class indices, or give a bool one-hot target the input's shape")
    if target.dim() == len(shape) - 1 and len(shape) > 1:
        raise RuntimeValueError(
            f"input is {_fmt(shape)} and target {_fmt(target.shape)}: with the class dim at dim={cdim}, "
            f"class indices must have shape {_fmt(pos_shape)}" + _shape_hint(shape, cdim, target.shape))
    raise RuntimeValueError(
        f"input is {_fmt(shape)} (class dim {cdim}, {C} classes) and target {_fmt(target.shape)}: "
        f"expected class indices of shape {_fmt(pos_shape)} or one-hot/probabilities of shape {_fmt(shape)}"
        + _shape_hint(shape, cdim, target.shape))


def _index(target: Tensor, shape: torch.Size, cdim: int, ignore_index: int) -> IndexTarget:
    P, C, Q, pos_shape = _layout(shape, cdim)
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"target_format='index' needs an integer target, got {target.dtype}; use target.long()")
    if target.shape != pos_shape:
        raise ValueError(f"input is {_fmt(shape)} and target {_fmt(target.shape)}: class indices must have shape "
                         f"{_fmt(pos_shape)}" + _shape_hint(shape, cdim, target.shape))
    index = target.long()  # compare in int64: uint8 156 is not ignore_index=-100, int8 -56 is not 200
    if value_checks():
        _check_classes(index, C, ignore_index, "target")
    return IndexTarget(index.reshape(P, Q), ignore_index, "index")


def _one_hot(target: Tensor, shape: torch.Size, cdim: int, ignore_index: int) -> IndexTarget:
    """One-hot rows become class indices; an all-zero row is ignored; a bad row (multi-hot, a value
    other than 0/1) raises with checks on, and gives NaN at its position with checks off."""
    P, C, Q, _ = _layout(shape, cdim)
    if target.shape != shape:
        raise ValueError(f"one-hot target has shape {_fmt(target.shape)} but must have the input's shape "
                         f"{_fmt(shape)}" + _shape_hint(shape, cdim, target.shape))
    t = target.movedim(cdim, -1)
    nonzero = t != 0
    not_binary = nonzero & (t != 1)
    count = nonzero.sum(-1)
    if value_checks():
        _check_one_hot(t, not_binary, nonzero, count, C)
    idx = nonzero.to(torch.uint8).argmax(-1).masked_fill(count == 0, ignore_index)
    if not value_checks():  # no sync: a bad row gets a class out of range, which the impls turn into NaN
        bad = C if ignore_index != C else C + 1
        idx = idx.masked_fill((count > 1) | not_binary.any(-1), bad)
    return IndexTarget(idx.reshape(P, Q), ignore_index, "one_hot")


def _check_one_hot(t: Tensor, not_binary: Tensor, nonzero: Tensor, count: Tensor, C: int) -> None:
    if bool(not_binary.any()):
        flat = int(not_binary.reshape(-1).nonzero()[0, 0])
        pos = _position(flat, t.shape)
        where = pos[:-1] if t.dim() > 1 else ()
        raise ValueError(
            f"one-hot target has value {t.reshape(-1)[flat].item()} at position {where} class {pos[-1]}: "
            "one-hot rows hold only 0 and 1; for soft labels pass a float target (probs)")
    multi = count > 1
    if bool(multi.any()):
        flat = int(multi.reshape(-1).nonzero()[0, 0])
        classes = nonzero.reshape(-1, C)[flat].nonzero().reshape(-1).tolist()
        raise ValueError(
            f"one-hot target has {len(classes)} classes set at position {_position(flat, count.shape)} "
            f"(classes {classes[:8]}): that is multi-label: use "
            "torch.nn.functional.binary_cross_entropy_with_logits, "
            "or pass a float target normalised to sum to 1 (target_format='probs')")


def _probs(target: Tensor, shape: torch.Size, cdim: int, ignore_index: int) -> ProbsTarget:
    """Probabilities. ``ignore_index`` does not apply to them; as in PyTorch, a negative one (the
    default -100, or -1) is accepted and unused, a class index (>= 0) is refused. NaN is looked for
    only when the loss comes out NaN (:func:`check_after`): no extra pass."""
    P, C, Q, _ = _layout(shape, cdim)
    if ignore_index >= 0:
        raise ValueError(
            f"ignore_index={ignore_index} names a class, but probability targets have no class index to "
            "ignore (PyTorch refuses a non-negative ignore_index with them too): give ignored positions an "
            "all-zero row, or use index targets")
    if not target.dtype.is_floating_point:
        raise TypeError(f"target_format='probs' needs a floating target, got {target.dtype}; use target.float()")
    if target.shape != shape:
        raise ValueError(f"probability target has shape {_fmt(target.shape)} but must have the input's shape "
                         f"{_fmt(shape)}" + _shape_hint(shape, cdim, target.shape))
    return ProbsTarget(target.reshape(P, C, Q))


def _sparse(target: "SparseTarget", input, cdim: int, target_format: str, ignore_index: int) -> TopKTarget:
    shape = input.shape
    P, C, Q, pos_shape = _layout(shape, cdim)
    if target_format not in ("auto", "sparse"):
        raise TypeError(f"target is a SparseTarget but target_format={target_format!r}; "
                        "pass target_format='sparse' or 'auto'")
    if target.indices.shape[:-1] != pos_shape:
        raise ValueError(
            f"SparseTarget has shape {_fmt(target.indices.shape)} but input {_fmt(shape)} (class dim {cdim}) "
            f"needs [{', '.join(str(s) for s in pos_shape)}{', ' if len(pos_shape) else ''}k]"
            + _shape_hint(shape, cdim, target.indices.shape[:-1]))
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input on {input.device}; "
                         "move it with target.to(input.device)")
    k = target.k
    idx = target.indices.long()
    if value_checks():
        _check_classes(idx, C, ignore_index, "SparseTarget index")
        _check_nan(target.values.masked_fill(idx == ignore_index, 0), "SparseTarget values")  # padding: unused
    return TopKTarget(idx.reshape(P, Q, k), target.values.reshape(P, Q, k), ignore_index)


def check_after(tgt: Target, target, loss: Tensor) -> None:
    """Checks deferred until the loss is known: a NaN loss with probability targets
    means a NaN target (raised here) or NaN logits (left to the caller)."""
    if value_checks() and isinstance(tgt, ProbsTarget) and bool(torch.isnan(loss.detach()).any()):
        _check_nan(target, "target")


def _check_classes(t: Tensor, C: int, ignore_index: int, name: str) -> None:
    """Raise if a class index is outside [0, C) and not ignore_index (one host sync on CUDA);
    ``t`` is int64, so nothing wraps."""
    if t.numel() == 0:
        return
    bad = ((t < 0) | (t >= C)) & (t != ignore_index)
    if bool(bad.any()):
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        pos = _position(flat, t.shape)
        value = int(t.reshape(-1)[flat])
        where = f"position {pos[:-1]} entry {pos[-1]}" if name.startswith("SparseTarget") else f"position {pos}"
        hint = f"valid classes are 0..{C - 1}, and ignore_index={ignore_index} marks positions to skip"
        if value < 0 or value == 255:
            hint += f"; if {value} marks padding{' (as in segmentation masks)' if value == 255 else ''}, " \
                    f"pass ignore_index={value}"
        raise IndexValueError(f"{name} {value} at {where} is out of range for {C} classes ({hint})")


def _check_nan(t: Tensor, name: str) -> None:
    """Raise naming the first NaN of ``t``. One fast pass and no ``t``-sized temporary unless there is a
    NaN: the sum is finite unless ``t`` holds NaN (or inf, or overflows; then look closer)."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return
    nan = torch.isnan(t)
    if bool(nan.any()):
        flat = int(nan.reshape(-1).nonzero()[0, 0])
        raise ValueError(f"{name} has NaN at position {_position(flat, t.shape)}: targets must be finite numbers")

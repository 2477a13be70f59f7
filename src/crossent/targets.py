"""Detect, validate and normalise target encodings; :func:`diagnose`.

Every target reaches the impls in one of three canonical forms, laid out like
the input viewed as ``(P, C, Q)`` (``P`` = product of the dims before the class
dim, ``Q`` = product of the dims after it; a position is a ``(p, q)`` pair):

* ``index``  -- ``[P, Q]`` int64 class indices (from index or one-hot targets);
  ``ignore_index`` marks ignored positions.
* ``probs``  -- ``[P, C, Q]`` floating class probabilities (a view, never copied).
* ``sparse`` -- ``[P, Q, k]`` indices and values of a :class:`SparseTarget`;
  an index equal to ``ignore_index`` is padding.

Checks that read target *values* (out-of-range classes, multi-hot rows, NaN)
need the data on the host: on CUDA each costs one device synchronisation.
They run by default; :func:`set_checks` (or ``CROSSENT_CHECKS=0`` in the
environment) turns them off for speed. With checks off, a bad value never
raises a device-side assert: its position gets a NaN loss instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["SparseTarget", "set_checks", "checks_enabled", "TARGET_FORMATS"]

TARGET_FORMATS = ("auto", "index", "one_hot", "probs", "sparse")

_CHECKS = os.environ.get("CROSSENT_CHECKS", "1").strip().lower() not in ("0", "false", "no", "off")


def set_checks(enabled: bool) -> bool:
    """Turn the value checks on targets on or off; returns the previous setting.

    The checks (class index out of range, multi-hot one-hot rows, NaN in
    probabilities) read the target's values, which costs one host
    synchronisation per check on CUDA. Off, a bad value gives a NaN loss at its
    position instead of an error (never a device-side assert).
    """
    global _CHECKS
    previous = _CHECKS
    _CHECKS = bool(enabled)
    return previous


def checks_enabled() -> bool:
    """Whether value checks on targets run (see :func:`set_checks`)."""
    return _CHECKS


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


@dataclass
class Target:
    """A target in canonical form (see the module docstring)."""

    kind: str  # "index" | "probs" | "sparse"
    index: Optional[Tensor] = None  # [P, Q] int64
    probs: Optional[Tensor] = None  # [P, C, Q] float
    sp_index: Optional[Tensor] = None  # [P, Q, k] int64
    sp_values: Optional[Tensor] = None  # [P, Q, k] float
    source: str = ""  # the format the caller used: index / one_hot / probs / sparse

    def rows(self, r0: int, r1: int) -> "Target":
        """Positions ``[r0, r1)`` of the flattened positions, as a target for ``[r1 - r0, C, 1]`` logits.

        Only for targets whose positions flatten without a copy (``Q == 1`` or index/sparse).
        """
        n = r1 - r0
        if self.kind == "index":
            return Target("index", index=self.index.reshape(-1)[r0:r1].reshape(n, 1), source=self.source)
        if self.kind == "sparse":
            k = self.sp_index.shape[-1]
            return Target("sparse", sp_index=self.sp_index.reshape(-1, k)[r0:r1].reshape(n, 1, k),
                          sp_values=self.sp_values.reshape(-1, k)[r0:r1].reshape(n, 1, k), source=self.source)
        P, C, Q = self.probs.shape
        return Target("probs", probs=self.probs.transpose(1, 2).reshape(-1, C)[r0:r1].unsqueeze(2), source=self.source)

    @property
    def requires_grad(self) -> bool:
        for t in (self.probs, self.sp_values):
            if t is not None and t.requires_grad:
                return True
        return False


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
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if input.dim() == 0:
        raise ValueError("input is a 0-dim tensor: cross_entropy needs logits with a class dim, e.g. [N, C] or [C]")
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


def normalize_target(target, input: Tensor, cdim: int, target_format: str, ignore_index: int) -> Target:
    """Detect ``target``'s encoding, validate it and bring it to canonical form."""
    if target_format not in TARGET_FORMATS:
        raise ValueError(f"target_format={target_format!r} is not one of {', '.join(repr(f) for f in TARGET_FORMATS)}")
    shape = input.shape
    C = shape[cdim]
    P = math.prod(shape[:cdim])
    Q = math.prod(shape[cdim + 1:])
    pos_shape = torch.Size(shape[:cdim] + shape[cdim + 1:])

    if isinstance(target, SparseTarget):
        if target_format not in ("auto", "sparse"):
            raise TypeError(f"target is a SparseTarget but target_format={target_format!r}; pass target_format='sparse' or 'auto'")
        if target.indices.shape[:-1] != pos_shape:
            raise ValueError(
                f"SparseTarget has shape {_fmt(target.indices.shape)} but input {_fmt(shape)} (class dim {cdim}) "
                f"needs [{', '.join(str(s) for s in pos_shape)}{', ' if len(pos_shape) else ''}k]"
                + _shape_hint(shape, cdim, target.indices.shape[:-1])
            )
        if target.device != input.device:
            raise ValueError(f"target is on {target.device} but input on {input.device}; move it with target.to(input.device)")
        k = target.k
        idx = target.indices.reshape(P, Q, k)
        val = target.values.reshape(P, Q, k)
        if _CHECKS:
            _check_classes(target.indices, C, ignore_index, "SparseTarget index")
            _check_nan(target.values, "SparseTarget values")
        return Target("sparse", sp_index=idx.long(), sp_values=val, source="sparse")

    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor or a SparseTarget, got {type(target).__name__}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input on {input.device}; move it with target.to(input.device)")
    floating = target.dtype.is_floating_point
    if target.dtype.is_complex:
        raise TypeError(f"target has complex dtype {target.dtype}; cross_entropy takes integer, bool or real targets")
    is_bool = target.dtype == torch.bool
    fmt = target_format
    if fmt == "auto":
        if target.shape == pos_shape and not floating and not is_bool:
            fmt = "index"
        elif target.shape == shape and floating:
            fmt = "probs"
        elif target.shape == shape:
            fmt = "one_hot"
        elif target.shape == pos_shape and floating:
            raise TypeError(
                f"target is {target.dtype} with shape {_fmt(target.shape)}, the shape of class indices for input "
                f"{_fmt(shape)}: class indices must be integers, use target.long()"
            )
        elif target.shape == pos_shape and is_bool:
            raise TypeError(
                f"target is bool with shape {_fmt(target.shape)}, the shape of class indices: use target.long() "
                "for class indices, or give a bool one-hot target the input's shape"
            )
        elif target.dim() == len(shape) - 1 and target.shape != pos_shape and len(shape) > 1:
            raise ValueError(
                f"input is {_fmt(shape)} and target {_fmt(target.shape)}: with the class dim at dim={cdim}, "
                f"class indices must have shape {_fmt(pos_shape)}" + _shape_hint(shape, cdim, target.shape)
            )
        else:
            raise ValueError(
                f"input is {_fmt(shape)} (class dim {cdim}, {C} classes) and target {_fmt(target.shape)}: "
                f"expected class indices of shape {_fmt(pos_shape)} or one-hot/probabilities of shape {_fmt(shape)}"
                + _shape_hint(shape, cdim, target.shape)
            )

    if fmt == "index":
        if floating or is_bool:
            raise TypeError(f"target_format='index' needs an integer target, got {target.dtype}; use target.long()")
        if target.shape != pos_shape:
            raise ValueError(
                f"input is {_fmt(shape)} and target {_fmt(target.shape)}: class indices must have shape {_fmt(pos_shape)}"
                + _shape_hint(shape, cdim, target.shape)
            )
        if _CHECKS:
            _check_classes(target, C, ignore_index, "target")
        return Target("index", index=target.reshape(P, Q).long(), source="index")

    if fmt == "one_hot":
        if target.shape != shape:
            raise ValueError(
                f"one-hot target has shape {_fmt(target.shape)} but must have the input's shape {_fmt(shape)}"
                + _shape_hint(shape, cdim, target.shape)
            )
        t = target.movedim(cdim, -1)
        nonzero = t != 0
        if _CHECKS:
            bad = nonzero & (t != 1)
            if bool(bad.any()):
                flat = int(bad.reshape(-1).nonzero()[0, 0])
                pos = _position(flat, t.shape)
                where = pos[:-1] if t.dim() > 1 else ()
                raise ValueError(
                    f"one-hot target has value {t.reshape(-1)[flat].item()} at position {where} class {pos[-1]}: "
                    "one-hot rows hold only 0 and 1; for soft labels pass a float target (probs)"
                )
        count = nonzero.sum(-1)
        if _CHECKS:
            multi = count > 1
            if bool(multi.any()):
                flat = int(multi.reshape(-1).nonzero()[0, 0])
                pos = _position(flat, count.shape)
                classes = nonzero.reshape(-1, C)[flat].nonzero().reshape(-1).tolist()
                raise ValueError(
                    f"one-hot target has {len(classes)} classes set at position {pos} (classes {classes[:8]}): "
                    "that is multi-label: use torch.nn.functional.binary_cross_entropy_with_logits, "
                    "or pass a float target normalised to sum to 1 (target_format='probs')"
                )
        idx = nonzero.to(torch.uint8).argmax(-1)
        idx = idx.masked_fill(count == 0, ignore_index)
        return Target("index", index=idx.reshape(P, Q), source="one_hot")

    if fmt == "probs":
        if not floating:
            raise TypeError(f"target_format='probs' needs a floating target, got {target.dtype}; use target.float()")
        if target.shape != shape:
            raise ValueError(
                f"probability target has shape {_fmt(target.shape)} but must have the input's shape {_fmt(shape)}"
                + _shape_hint(shape, cdim, target.shape)
            )
        if ignore_index != -100:
            raise ValueError(
                f"ignore_index={ignore_index} was given with probability targets, which have no class index to ignore "
                "(PyTorch rejects this too): leave ignore_index at -100, give ignored positions an all-zero row, "
                "or use index targets"
            )
        # NaN in the probabilities is looked for only when the loss comes out NaN (check_after): no extra pass.
        return Target("probs", probs=target.reshape(P, C, Q), source="probs")

    # fmt == "sparse" with a plain tensor
    raise TypeError("target_format='sparse' needs a crossent.SparseTarget(indices, values)")


def check_after(tgt: Target, target, loss: Tensor) -> None:
    """Checks deferred until the loss is known: a NaN loss with probability targets
    means a NaN target (raised here) or NaN logits (left to the caller)."""
    if _CHECKS and tgt.kind == "probs" and bool(torch.isnan(loss.detach()).any()):
        _check_nan(target, "target")


def _check_classes(t: Tensor, C: int, ignore_index: int, name: str) -> None:
    """Raise if a class index is outside [0, C) and not ignore_index (one host sync on CUDA)."""
    if t.numel() == 0:
        return
    bad = ((t < 0) | (t >= C)) & (t != ignore_index)
    if bool(bad.any()):
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        shape = t.shape
        pos = _position(flat, shape)
        value = int(t.reshape(-1)[flat])
        if name.startswith("SparseTarget"):
            where = f"position {pos[:-1]} entry {pos[-1]}"
        else:
            where = f"position {pos}"
        hint = f"valid classes are 0..{C - 1}, and ignore_index={ignore_index} marks positions to skip"
        if value < 0:
            hint += f"; if {value} marks padding, pass ignore_index={value}"
        raise ValueError(f"{name} {value} at {where} is out of range for {C} classes ({hint})")


def _check_nan(t: Tensor, name: str) -> None:
    nan = torch.isnan(t)
    if bool(nan.any()):
        flat = int(nan.reshape(-1).nonzero()[0, 0])
        raise ValueError(f"{name} has NaN at position {_position(flat, t.shape)}: targets must be finite numbers")

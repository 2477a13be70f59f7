"""The options of a loss call: one frozen object, validated once, that every impl receives.

:func:`make_options` turns what the caller passed (Python numbers, NumPy
scalars, 0-dim tensors, as PyTorch accepts) into an :class:`Options` of plain
values, raising a clear error for anything else. Impls read nothing but the
options, the typed target (:mod:`crossent.targets`), the reduction plan
(:mod:`crossent.reduction`) and tensors.

Adding an option: a field here, its check in :func:`make_options`, the
keyword in :mod:`crossent.functional`, and the impls that implement it (the
others raise a clear error in :mod:`crossent.impl.registry`).
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from numbers import Number
from typing import Optional, Union

import torch
from torch import Tensor

from .config import value_checks
from .errors import RuntimeValueError

try:
    from numpy import bool_ as np_bool
except ImportError:  # numpy is optional
    np_bool = bool

__all__ = ["Options", "make_options", "REDUCTIONS", "TARGET_FORMATS", "IMPL_NAMES", "check_impl"]

REDUCTIONS = ("none", "mean", "sum")
TARGET_FORMATS = ("auto", "index", "one_hot", "probs", "sparse")
IMPL_NAMES = ("auto", "torch", "chunked", "triton")  # what impl= takes; impl.registry resolves each


@dataclass(frozen=True, eq=False)
class Options:
    """Validated options of one call (see :func:`crossent.cross_entropy` for their meaning)."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    weight: Optional[Tensor] = None  # class weights [C], as given
    num_items: Optional[Union[float, Tensor]] = None
    inplace_backward: bool = False
    return_extras: bool = False
    chunk_size: Optional[int] = None  # linear_cross_entropy, chunked impl
    filter_eps: Optional[float] = None  # linear_cross_entropy, triton impl

    def class_weight(self, dtype: torch.dtype) -> Optional[Tensor]:
        """The class weights in ``dtype`` (the accumulation dtype), or None."""
        return None if self.weight is None else self.weight.to(dtype)


def _number(value, name: str, hint: str) -> float:
    """A real number from a Python/NumPy number or a one-element tensor (never a bool)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.dtype.is_complex:
            raise ValueError(f"{name} must be a number or a one-element tensor, got a tensor of shape "
                             f"{list(value.shape)} ({value.dtype}); {hint}")
        if value.requires_grad and torch.is_grad_enabled():
            raise TypeError(f"{name} is a tensor that requires grad, but crossent does not differentiate it "
                            f"(PyTorch refuses this too): pass {name}.item() or {name}.detach()")
        return float(value.reshape(()).item())
    if not isinstance(value, Number) or isinstance(value, complex):  # a bool is a number, as in PyTorch
        raise ValueError(f"{name}={value!r} must be a number; {hint}")
    return float(value)


def _finite(v: float) -> bool:
    """``math.isfinite`` by comparisons, which torch.compile traces on a symbolic float (dynamic=True)."""
    return -math.inf < v < math.inf


def check_label_smoothing(value) -> float:
    hint = "a number in [0, 1] (0 turns it off)"
    ls = _number(value, "label_smoothing", hint)
    if not 0.0 <= ls <= 1.0:
        raise RuntimeValueError(f"label_smoothing={ls!r} must be {hint}")
    return ls


def check_z_loss(value) -> float:
    hint = "a finite number >= 0 (a typical value is 1e-4; 0 turns it off)"
    z = _number(value, "z_loss", hint)
    if not (_finite(z) and z >= 0):
        raise ValueError(f"z_loss={z!r} must be {hint}")
    return z


def check_softcap(value) -> Optional[float]:
    if value is None:
        return None
    hint = "None or a finite number > 0 (for example 30.0)"
    s = _number(value, "softcap", hint)
    if not (_finite(s) and s > 0):
        raise ValueError(f"softcap={s!r} must be {hint}")
    return s


def check_reduction(value) -> str:
    if value == "elementwise_mean":  # PyTorch's deprecated spelling, which it still takes
        warnings.warn("reduction='elementwise_mean' is deprecated (in PyTorch too): use reduction='mean'",
                      DeprecationWarning, stacklevel=3)
        return "mean"
    if value not in REDUCTIONS:
        raise ValueError(f"reduction={value!r} is not one of 'none', 'mean', 'sum'")
    return value


def check_impl(value) -> str:
    """``impl=``: one of :data:`IMPL_NAMES` (the one home of this check)."""
    if value not in IMPL_NAMES:
        raise ValueError(f"impl={value!r} is not one of {', '.join(repr(i) for i in IMPL_NAMES)}")
    return value


def check_target_format(value) -> str:
    if value not in TARGET_FORMATS:
        raise ValueError(f"target_format={value!r} is not one of {', '.join(repr(f) for f in TARGET_FORMATS)}")
    return value


def check_ignore_index(value, allow_none: bool = False) -> int:
    """An int from an int, a NumPy integer or a 0-dim integer tensor (``None``: -100, where allowed)."""
    if value is None and allow_none:
        return -100
    if isinstance(value, bool) or (isinstance(value, Tensor) and (value.dtype.is_floating_point
                                                                   or value.dtype == torch.bool or value.numel() != 1)):
        raise TypeError(f"ignore_index must be an int, got {value!r}")
    try:
        index = int(operator.index(value.reshape(()) if isinstance(value, Tensor) else value))
    except TypeError:
        raise TypeError(f"ignore_index must be an int, got {type(value).__name__} {value!r}") from None
    if not -2**63 <= index < 2**63:
        raise ValueError(f"ignore_index={index} does not fit in int64, the dtype class indices are compared in")
    return index


def check_flag(value, name: str) -> bool:
    if not isinstance(value, (bool, int)) or (isinstance(value, int) and value not in (0, 1)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_num_items(value, reduction: str) -> Optional[Union[float, Tensor]]:
    """A count > 0 (number), or a one-element tensor checked for > 0 while value checks are on."""
    if value is None:
        return None
    if reduction == "none":
        raise ValueError("num_items divides the summed loss, so it needs reduction='mean' or 'sum', not 'none'")
    hint = ("the number of target positions it stands for, summed over micro-batches or ranks; "
            "it must be > 0")
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.dtype.is_complex:
            raise ValueError(f"num_items must be a number or a one-element tensor, got shape {list(value.shape)}"
                             f" ({value.dtype})")
        if value_checks() and not bool((value.detach() > 0).all()):  # one host sync on CUDA
            raise ValueError(f"num_items={value.detach().reshape(()).item()!r} is not a count > 0 ({hint}); "
                             "crossent.set_checks(False) skips this check")
        return value
    if isinstance(value, (bool, np_bool)):
        raise ValueError(f"num_items={value!r} must be a count > 0, not a bool ({hint})")
    n = _number(value, "num_items", hint)
    if not n > 0 or not _finite(n):
        raise ValueError(f"num_items={value!r} must be a count > 0 ({hint})")
    return n


def check_weight(weight: Optional[Tensor], classes: Optional[int], device: torch.device, name: str = "weight") -> None:
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a 1-D tensor of {classes} class weights, got {type(weight).__name__}")
    if classes is None:  # vocab-parallel: this rank's shard or the full weight, checked across the ranks
        if weight.dim() != 1:
            raise ValueError(f"{name} has shape {list(weight.shape)}: pass a 1-D tensor of class weights "
                             "(this rank's shard of them, or all of them)")
    elif weight.dim() != 1 or weight.numel() != classes:
        raise RuntimeValueError(f"{name} has shape {list(weight.shape)} but the input has {classes} classes: "
                         f"pass a 1-D tensor of length {classes}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating, got {weight.dtype}; use {name}.float()")
    if weight.device != device:
        raise ValueError(f"{name} is on {weight.device} but input on {device}; move it with {name}.to(input.device)")


def check_chunk_size(value) -> Optional[int]:
    if value is None:
        return None
    try:
        rows = operator.index(value) if not isinstance(value, bool) else 0
    except TypeError:
        rows = 0
    if rows < 1:
        raise ValueError(f"chunk_size={value!r} must be a positive number of rows, or None to choose it")
    return rows


def check_filter_eps(value) -> Optional[float]:
    if value is None:
        return None
    eps = _number(value, "filter_eps", "a number >= 0, or None for the exact backward")
    if not eps >= 0:
        raise ValueError(f"filter_eps={value!r} must be a number >= 0, or None for the exact backward")
    return eps


def check_shift(shift) -> int:
    """``shift``: False/0 (none), True/1 (next token), or a number of positions k >= 0."""
    if isinstance(shift, (bool, np_bool)):
        return int(shift)
    try:
        k = operator.index(shift)
    except TypeError:
        k = -1
    if k < 0:
        raise ValueError(f"shift={shift!r} must be True/False or a number of positions >= 0 "
                         "(position t predicts the label at t + shift)")
    return k


def make_options(*, classes: Optional[int], device: torch.device, weight=None, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0, z_loss=0.0, softcap=None, num_items=None, inplace_backward=False,
                 return_extras=False, chunk_size=None, filter_eps=None, ignore_index_none_ok=False) -> Options:
    """Validate everything a loss call was given and freeze it into :class:`Options`."""
    reduction = check_reduction(reduction)
    check_weight(weight, classes, device)
    return Options(
        ignore_index=check_ignore_index(ignore_index, allow_none=ignore_index_none_ok),
        reduction=reduction,
        label_smoothing=check_label_smoothing(label_smoothing),
        z_loss=check_z_loss(z_loss),
        softcap=check_softcap(softcap),
        weight=weight,
        num_items=check_num_items(num_items, reduction),
        inplace_backward=check_flag(inplace_backward, "inplace_backward"),
        return_extras=check_flag(return_extras, "return_extras"),
        chunk_size=check_chunk_size(chunk_size),
        filter_eps=check_filter_eps(filter_eps),
    )

"""Thin ``nn.Module`` wrappers over :mod:`crossent.functional`."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .functional import cross_entropy, linear_cross_entropy
from .options import (check_chunk_size, check_ignore_index, check_impl, check_label_smoothing, check_reduction,
                      check_shift, check_softcap, check_target_format, check_z_loss)

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]


def _check_module_options(reduction, label_smoothing, z_loss, softcap, target_format, ignore_index, impl,
                          shift=False) -> None:
    """Fail at construction, not at the first forward (the functions check everything again)."""
    check_ignore_index(ignore_index, allow_none=True)
    check_impl(impl)
    check_shift(shift)
    check_reduction(reduction)
    check_label_smoothing(label_smoothing)
    check_z_loss(z_loss)
    check_softcap(softcap)
    check_target_format(target_format)


class CrossEntropyLoss(nn.CrossEntropyLoss):
    r"""Drop-in for :class:`torch.nn.CrossEntropyLoss` (it is a subclass: same
    constructor arguments, attributes and ``state_dict`` keys) that also takes
    one-hot, probability and :class:`~crossent.SparseTarget` targets and the
    extras of :func:`crossent.cross_entropy` (see there for the math).

    Args:
        weight (Tensor, optional): class weights ``(C,)``, kept as the buffer
            ``weight`` as in PyTorch. Default: ``None``.
        ignore_index (int, optional): class index to skip. Default: -100.
        reduction (str, optional): ``"none"`` | ``"mean"`` | ``"sum"``. Default: ``"mean"``.
        label_smoothing (float, optional): in [0, 1]. Default: 0.0.
        dim, target_format, z_loss, softcap, impl, inplace_backward,
        process_group, return_extras: keyword-only, as in
        :func:`crossent.cross_entropy`.
        size_average, reduce: deprecated PyTorch arguments, honoured as there.

    ``forward(input, target, num_items=None)``; ``num_items`` is per call
    because it changes with every batch.

    Shape:
        - Input: :math:`(N, C)`, :math:`(C)` or :math:`(N, C, d_1, ..., d_K)`.
        - Target: class indices :math:`(N)` / :math:`()` / :math:`(N, d_1, ..., d_K)`,
          or one-hot / probabilities of the input's shape.
        - Output: scalar, or the target positions' shape with ``reduction="none"``.

    Example::

        >>> import torch, crossent
        >>> loss_fn = crossent.CrossEntropyLoss(label_smoothing=0.1)
        >>> logits = torch.randn(4, 3, requires_grad=True)
        >>> one_hot = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]])
        >>> loss_fn(logits, one_hot).backward()
    """

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, dim: int = 1, target_format: str = "auto", z_loss: float = 0.0,
                 softcap: Optional[float] = None, impl: str = "auto", inplace_backward: bool = False,
                 process_group=None, return_extras: bool = False, size_average=None, reduce=None) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        _check_module_options(self.reduction, label_smoothing, z_loss, softcap, target_format, ignore_index, impl)
        self.dim = dim
        self.target_format = target_format
        self.z_loss = z_loss
        self.softcap = softcap
        self.impl = impl
        self.inplace_backward = inplace_backward
        self.process_group = process_group
        self.return_extras = return_extras

    def forward(self, input: Tensor, target, num_items=None):  # type: ignore[override]
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
                             dim=self.dim, target_format=self.target_format, z_loss=self.z_loss,
                             softcap=self.softcap, num_items=num_items, impl=self.impl,
                             inplace_backward=self.inplace_backward, process_group=self.process_group,
                             return_extras=self.return_extras)

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}"]
        if self.ignore_index != -100:
            parts.append(f"ignore_index={self.ignore_index}")
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        for name, default in (("dim", 1), ("target_format", "auto"), ("z_loss", 0.0), ("softcap", None),
                              ("impl", "auto"), ("inplace_backward", False), ("return_extras", False)):
            value = getattr(self, name)
            if value != default:
                parts.append(f"{name}={value!r}")
        return ", ".join(parts)


class LinearCrossEntropyLoss(nn.Module):
    r"""Module form of :func:`crossent.linear_cross_entropy`: the output layer's
    matmul and the cross-entropy in one, without the ``[N, V]`` logits.

    Holds the options (and the class ``weight`` buffer, as
    :class:`CrossEntropyLoss` does); the projection is passed to ``forward``
    so that it stays a parameter of the model (tied embeddings included).

    Args:
        weight, ignore_index, reduction, label_smoothing: as in :class:`CrossEntropyLoss`.
        shift, target_format, z_loss, softcap, impl, chunk_size, process_group,
        return_extras: keyword-only, as in :func:`crossent.linear_cross_entropy`.

    ``forward(input, linear_weight, target, linear_bias=None, num_items=None)``.

    Shape:
        - input: :math:`(*, H)`; linear_weight: :math:`(V, H)`; target: :math:`(*)`.
        - output: scalar, or :math:`(*)` with ``reduction="none"``.

    Example::

        >>> import torch, crossent
        >>> head = torch.nn.Linear(64, 1000, bias=False)
        >>> loss_fn = crossent.LinearCrossEntropyLoss(shift=True, label_smoothing=0.1)
        >>> h = torch.randn(2, 16, 64, requires_grad=True)
        >>> loss_fn(h, head.weight, torch.randint(0, 1000, (2, 16))).backward()
    """

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, shift: bool = False, target_format: str = "auto",
                 z_loss: float = 0.0, softcap: Optional[float] = None, impl: str = "auto",
                 chunk_size: Optional[int] = None, process_group=None, return_extras: bool = False) -> None:
        super().__init__()
        _check_module_options(reduction, label_smoothing, z_loss, softcap, target_format, ignore_index, impl, shift)
        check_chunk_size(chunk_size)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.shift = shift
        self.target_format = target_format
        self.z_loss = z_loss
        self.softcap = softcap
        self.impl = impl
        self.chunk_size = chunk_size
        self.process_group = process_group
        self.return_extras = return_extras

    def forward(self, input: Tensor, linear_weight: Tensor, target, linear_bias: Optional[Tensor] = None,
                num_items=None):
        return linear_cross_entropy(input, linear_weight, target, linear_bias, self.weight, self.ignore_index,
                                    self.reduction, self.label_smoothing, shift=self.shift,
                                    target_format=self.target_format, z_loss=self.z_loss, softcap=self.softcap,
                                    num_items=num_items, impl=self.impl, chunk_size=self.chunk_size,
                                    process_group=self.process_group, return_extras=self.return_extras)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, shift={self.shift}, impl={self.impl!r}"

"""Argument checks, defaults and dispatch to an impl."""

from __future__ import annotations

import math
from functools import partial
from numbers import Number
from typing import Optional

import torch
from torch import Tensor

from . import _reduce
from .impl import chunked as _chunked
from .impl import torch as _ref
from .ops import fused_cross_entropy, fused_linear_cross_entropy
from .ops.cross_entropy import FusedCall
from .ops.linear import LinearCall
from .targets import SparseTarget, Target, check_after, class_dim, normalize_target

__all__ = ["cross_entropy", "linear_cross_entropy"]

IMPLS = ("auto", "torch", "chunked", "triton")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_impl(impl: str, device: torch.device) -> str:
    """The impl that runs: ``auto`` is triton on CUDA when triton imports, else chunked."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {', '.join(repr(i) for i in IMPLS)}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "chunked"
    return impl


def check_options(reduction: str, label_smoothing, z_loss, softcap, num_items) -> None:
    """Validate the options shared by every loss in crossent."""
    if reduction not in _reduce.REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of 'none', 'mean', 'sum'")
    if not isinstance(label_smoothing, Number) or isinstance(label_smoothing, bool) \
            or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be a number in [0, 1] (0 turns it off)")
    if not isinstance(z_loss, Number) or isinstance(z_loss, bool) or not math.isfinite(z_loss) or z_loss < 0:
        raise ValueError(f"z_loss={z_loss!r} must be a finite number >= 0 (a typical value is 1e-4; 0 turns it off)")
    if softcap is not None and (not isinstance(softcap, Number) or isinstance(softcap, bool)
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap={softcap!r} must be None or a finite number > 0 (for example 30.0)")
    if num_items is not None:
        if reduction == "none":
            raise ValueError("num_items divides the summed loss, so it needs reduction='mean' or 'sum', not 'none'")
        if isinstance(num_items, Tensor):
            if num_items.numel() != 1:
                raise ValueError(f"num_items must be a number or a one-element tensor, got shape {list(num_items.shape)}")
        elif not isinstance(num_items, Number) or isinstance(num_items, bool) or not num_items > 0:
            raise ValueError(f"num_items={num_items!r} must be a count > 0 (the number of target positions it "
                             "stands for, summed over micro-batches or ranks)")


def check_weight(weight: Optional[Tensor], C: int, device: torch.device, name: str = "weight") -> None:
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a 1-D tensor of {C} class weights, got {type(weight).__name__}")
    if weight.dim() != 1 or weight.numel() != C:
        raise ValueError(f"{name} has shape {list(weight.shape)} but the input has {C} classes: "
                         f"pass a 1-D tensor of length {C}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating, got {weight.dtype}; use {name}.float()")
    if weight.device != device:
        raise ValueError(f"{name} is on {weight.device} but input on {device}; move it with {name}.to(input.device)")


def cross_entropy(input: Tensor, target, weight: Optional[Tensor] = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, dim: int = 1,
                  target_format: str = "auto", z_loss: float = 0.0, softcap: Optional[float] = None,
                  num_items=None, impl: str = "auto", inplace_backward: bool = False, process_group=None,
                  return_extras: bool = False):
    r"""Cross-entropy between logits and a target in any encoding; a drop-in for
    :func:`torch.nn.functional.cross_entropy`.

    With logits :math:`x` over :math:`C` classes at a position, :math:`\mathrm{lse}
    = \log\sum_c e^{x_c}`, class weights :math:`w` (all 1 by default) and label
    smoothing :math:`\varepsilon`:

    * **class indices** (and **one-hot**, reduced to indices) :math:`y`:

      .. math::
          \ell = (1-\varepsilon)\, w_y (\mathrm{lse} - x_y)
                 + \frac{\varepsilon}{C} \sum_c w_c (\mathrm{lse} - x_c)

      ignored positions (``target == ignore_index``, or an all-zero one-hot row)
      give 0; ``mean`` divides the sum by :math:`\sum w_{y}` over the
      non-ignored positions (PyTorch's rule, also for one-hot targets).
    * **probabilities** :math:`q` (and :class:`SparseTarget`, the same with
      :math:`q_c = 0` outside its k classes):

      .. math::
          \ell = \sum_c w_c \big((1-\varepsilon) q_c + \tfrac{\varepsilon}{C}\big) (\mathrm{lse} - x_c)

      ``mean`` divides by the number of positions. Terms with zero target mass
      count as 0 even where :math:`x_c = -\infty`.

    Extras, added to every non-ignored position: ``z_loss`` adds
    :math:`z\,\mathrm{lse}^2` (unweighted; ``mean`` divides it by the number of
    non-ignored positions); ``softcap`` :math:`s` replaces :math:`x` by
    :math:`s \tanh(x / s)` first. ``num_items`` divides the sum of both terms by
    a count you give (gradient accumulation, data parallel): a micro-batch
    whose positions are all ignored gives 0 and a zero gradient, not NaN.

    Args:
        input (Tensor): logits, ``(N, C)``, ``(C,)``, ``(N, C, d1, ..., dK)``,
            or classes at any ``dim``. Not probabilities: no softmax first.
        target (Tensor or SparseTarget): class indices (any integer dtype) of
            the input's shape without the class dim; one-hot (bool, integer or,
            with ``target_format="one_hot"``, float) or probabilities (float)
            of the input's shape; or a :class:`SparseTarget`.
        weight (Tensor, optional): class weights ``(C,)``. Default: ``None``.
        ignore_index (int, optional): class index to skip (padding in a
            :class:`SparseTarget`). Not allowed with probabilities. Default: -100.
        reduction (str, optional): ``"none"`` | ``"mean"`` | ``"sum"``. Default: ``"mean"``.
        label_smoothing (float, optional): :math:`\varepsilon` in [0, 1]. Default: 0.0.
        dim (int, optional): the class dim; ``dim=-1`` takes ``[B, T, V]``
            logits with ``[B, T]`` targets, no transpose or copy. Default: 1.
        target_format (str, optional): ``"auto"`` | ``"index"`` | ``"one_hot"``
            | ``"probs"`` | ``"sparse"``. ``auto``: integer of index shape is
            index; float of input shape is probs (PyTorch's rule); integer or
            bool of input shape is one-hot. Default: ``"auto"``.
        z_loss (float, optional): z-loss coefficient. Default: 0.0.
        softcap (float, optional): logit soft-capping value. Default: ``None``.
        num_items (int, float or Tensor, optional): divide the summed loss by
            this instead of the ``mean`` denominator. Default: ``None``.
        impl (str, optional): ``"auto"`` | ``"torch"`` | ``"chunked"`` |
            ``"triton"``. Default: ``"auto"`` (triton on CUDA, else chunked).
        inplace_backward (bool, optional): write the gradient over ``input``'s
            storage during the forward (no extra ``[N, C]`` memory). The logits'
            values are lost; anything else that saved them fails loudly at its
            backward. Fused impls only. Default: ``False``.
        process_group (ProcessGroup, optional): vocab-parallel mode (the
            input holds this rank's shard of the classes). Default: ``None``.
        return_extras (bool, optional): also return a dict with per-position
            ``lse``, ``z_loss`` and ``predicted`` class (detached). Default: ``False``.

    Value checks on targets sync with the device on CUDA: see
    :func:`crossent.set_checks`.

    Shape:
        - Input: :math:`(N, C)`, :math:`(C)` or :math:`(N, C, d_1, ..., d_K)`
          (classes at ``dim``).
        - Target: :math:`(N)`, :math:`()` or :math:`(N, d_1, ..., d_K)` for
          indices; the input's shape for one-hot and probabilities; that shape
          with the class dim removed plus a last dim :math:`k` for a SparseTarget.
        - Output: a scalar, or the target positions' shape with ``reduction="none"``.

    Example::

        >>> import torch, crossent
        >>> logits = torch.randn(4, 3, requires_grad=True)
        >>> a = crossent.cross_entropy(logits, torch.tensor([0, 1, 2, 2]))
        >>> b = crossent.cross_entropy(logits, torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]))
        >>> torch.allclose(a, b)
        True
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a tensor of logits, got {type(input).__name__}")
    if not input.dtype.is_floating_point:
        raise TypeError(f"input must be floating logits, got {input.dtype}; use input.float()")
    cdim = class_dim(input, dim)
    C = input.shape[cdim]
    if C == 0:
        raise ValueError(f"input {list(input.shape)} has 0 classes at dim {cdim}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_options(reduction, label_smoothing, z_loss, softcap, num_items)
    check_weight(weight, C, input.device)
    if process_group is not None:
        raise ValueError("process_group (vocab-parallel) is not available yet in this version of crossent; "
                         "gather the full vocab on one device or leave process_group=None")
    name = resolve_impl(impl, input.device)
    tgt = normalize_target(target, input, cdim, target_format, ignore_index)
    shape3 = (math.prod(input.shape[:cdim]), C, math.prod(input.shape[cdim + 1:]))
    pos_shape = torch.Size(input.shape[:cdim] + input.shape[cdim + 1:])
    acc, w, ls, z_loss, softcap, ce_denom, z_denom = _settings(tgt, input, weight, label_smoothing, z_loss, softcap,
                                                               reduction, num_items, ignore_index)

    if name == "torch":
        if inplace_backward:
            raise ValueError("inplace_backward=True needs a fused impl ('chunked' or 'triton'): impl='torch' "
                             "differentiates with autograd and has no gradient to write in place")
        loss, lse, zrows, pred = _reference(input.reshape(shape3), tgt, weight, ignore_index, ls, softcap, z_loss,
                                            reduction, ce_denom, z_denom, pos_shape, input.dtype)
    else:
        _check_fused(name, weight, tgt)
        if name == "triton":
            from .impl.triton import cross_entropy_forward as kernel_fn
        else:
            kernel_fn = _chunked.cross_entropy_forward
        ce_g = _reduce.grad_scale(ce_denom, acc, input.device)
        z_g = _reduce.grad_scale(z_denom, acc, input.device)
        kernel = partial(_run_kernel, kernel_fn, tgt, w, ignore_index, ls, softcap, z_loss, ce_g, z_g, return_extras)
        call = FusedCall(kernel, shape3, reduction, ce_denom, z_denom, pos_shape, cdim, bool(inplace_backward), name,
                         torch.is_grad_enabled())
        loss, lse, zrows, pred = fused_cross_entropy(input, call)
    return _finish(loss, lse, zrows, pred, pos_shape, tgt, target, return_extras)


def _settings(tgt: Target, input: Tensor, weight, label_smoothing, z_loss, softcap, reduction, num_items,
              ignore_index):
    """Accumulation dtype, weights in it, plain-float options and the reduction's denominators."""
    acc = _ref.acc_dtype(input.dtype)
    w = None if weight is None else weight.to(acc)
    ce_denom, z_denom = _reduce.denominators(tgt, w, reduction, num_items, ignore_index, acc, input.device)
    return (acc, w, float(label_smoothing), float(z_loss), None if softcap is None else float(softcap), ce_denom,
            z_denom)


def _reference(logits3: Tensor, tgt: Target, weight, ignore_index, ls, softcap, z_loss, reduction, ce_denom,
               z_denom, pos_shape, dtype):
    """The torch impl: differentiable per-position terms, reduced like every other impl."""
    ce, z, lse, pred = _ref.cross_entropy_rows(logits3, tgt, weight, ignore_index, ls, softcap, z_loss)
    loss = _reduce.reduce_rows(ce, z, reduction, ce_denom, z_denom, pos_shape, dtype)
    return loss, lse, (z.detach() if z is not None else torch.zeros_like(lse)), pred


def _check_fused(name: str, weight: Optional[Tensor], tgt: Target) -> None:
    """The fused impls differentiate the logits (or input and projection) only."""
    if weight is not None and weight.requires_grad:
        raise ValueError(f"weight requires grad, but impl={name!r} does not differentiate class weights; "
                         "pass weight.detach() or use impl='torch'")
    if tgt.requires_grad:
        raise ValueError(f"the target requires grad, but impl={name!r} does not differentiate targets; "
                         "pass target.detach() (the usual case for a teacher's probabilities) or use impl='torch'")


def _finish(loss, lse, zrows, pred, pos_shape, tgt, target, return_extras):
    """Deferred target checks, then the loss or ``(loss, extras)``."""
    check_after(tgt, target, loss)
    if not return_extras:
        return loss
    return loss, {"lse": lse.reshape(pos_shape), "z_loss": zrows.reshape(pos_shape),
                  "predicted": pred.reshape(pos_shape)}


def _run_kernel(kernel_fn, tgt: Target, w, ignore_index, ls, softcap, z_loss, ce_g, z_g, want_pred, x3, grad3):
    return kernel_fn(x3, tgt, w, ignore_index, ls, softcap, z_loss, ce_g, z_g, grad3, want_pred)



class _Like:
    """Shape and device of logits that are never built (for target normalisation)."""

    def __init__(self, shape, device):
        self.shape, self.device = torch.Size(shape), device


def _shift_sparse(target):
    """A SparseTarget's labels for position t are at t + 1 (the positions' last dim)."""
    if isinstance(target, SparseTarget):
        return SparseTarget(target.indices[..., 1:, :], target.values[..., 1:, :])
    return target


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target, linear_bias: Optional[Tensor] = None,
                         weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, *, shift: bool = False, target_format: str = "auto",
                         z_loss: float = 0.0, softcap: Optional[float] = None, num_items=None, impl: str = "auto",
                         chunk_size: Optional[int] = None, process_group=None, return_extras: bool = False,
                         filter_eps: Optional[float] = None):
    r"""``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` without ever holding
    the ``[N, V]`` logits: the loss of a large-vocabulary model's output layer.

    The math is that of :func:`crossent.cross_entropy` (classes last) on the
    logits :math:`z = x W^\top + b`. The fused impls go through the positions
    in chunks of rows: each chunk's logits exist only while its loss and
    gradients are formed; the input, weight and bias gradients accumulate in
    float32. Memory beyond the inputs is one chunk of logits plus the
    gradients themselves.

    Args:
        input (Tensor): hidden states ``[..., H]``.
        linear_weight (Tensor): output projection ``[V, H]`` (same dtype and device).
        target (Tensor or SparseTarget): class indices ``[...]`` (any integer
            dtype), a :class:`SparseTarget` ``[..., k]`` (a teacher's top-k:
            distillation without the teacher's logits), or dense probabilities
            ``[..., V]`` (the one format that costs ``[N, V]`` memory).
        linear_bias (Tensor, optional): ``[V]``. Default: ``None``.
        weight, ignore_index, reduction, label_smoothing, target_format,
        z_loss, softcap, num_items, return_extras: as in :func:`crossent.cross_entropy`.
        shift (bool, optional): causal language modelling: position ``t``
            predicts label ``t + 1`` along the sequence dim (``input``'s dim -2,
            ``target``'s last position dim); the last position of each sequence
            is dropped, the hidden states are not copied. Default: ``False``.
        impl (str, optional): ``"auto"`` | ``"torch"`` (materialises the logits:
            the reference) | ``"chunked"`` | ``"triton"`` (tiled kernels in the
            style of Cut Cross-Entropy). Default: ``"auto"`` (triton on CUDA,
            else chunked).
        chunk_size (int, optional): rows per chunk of the ``chunked`` impl;
            default: chosen from ``V`` and the device (about 8 MiB of float32
            logits on CPU; on CUDA up to 512 MiB, at most 1/8 of the free
            memory; at least 32 rows). On CPU in
            float32 the chunk matmuls run on oneDNN (``CROSSENT_ONEDNN=0``:
            ``torch.mm`` instead).
        process_group: vocab-parallel mode (not available yet).
        filter_eps (float, optional): triton only: skip the backward's
            (row block, vocab tile) pairs whose logit gradient is below this
            everywhere (an approximation that saves time when the softmax is
            peaked). Default: ``None`` (exact).

    Shape:
        - input: :math:`(*, H)`; linear_weight: :math:`(V, H)`; linear_bias: :math:`(V)`.
        - target: :math:`(*)` indices, :math:`(*, k)` SparseTarget, :math:`(*, V)` probabilities.
        - output: scalar, or :math:`(*)` with ``reduction="none"`` (:math:`(*, T-1)` with ``shift``).

    Example::

        >>> import torch, crossent
        >>> h = torch.randn(2, 16, 64, requires_grad=True)
        >>> W = torch.randn(1000, 64, requires_grad=True)
        >>> labels = torch.randint(0, 1000, (2, 16))
        >>> loss = crossent.linear_cross_entropy(h, W, labels, shift=True)
        >>> loss.backward()
    """
    if not isinstance(input, Tensor) or not input.dtype.is_floating_point or input.dim() == 0:
        raise TypeError("input must be a floating tensor of hidden states [..., H]")
    if not isinstance(linear_weight, Tensor) or linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must be a [V, H] matrix, got "
                         f"{list(linear_weight.shape) if isinstance(linear_weight, Tensor) else type(linear_weight).__name__}")
    V, H = linear_weight.shape
    if input.shape[-1] != H:
        raise ValueError(f"input is {list(input.shape)} (hidden size {input.shape[-1]}) but linear_weight is "
                         f"[{V}, {H}] (hidden size {H}): linear_weight must be [vocab, hidden]; did you pass its transpose?")
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"linear_weight is {linear_weight.dtype} but input is {input.dtype}: cast one to the other")
    if linear_weight.device != input.device:
        raise ValueError(f"linear_weight is on {linear_weight.device} but input on {input.device}")
    if linear_bias is not None:
        if not isinstance(linear_bias, Tensor) or linear_bias.shape != (V,):
            raise ValueError(f"linear_bias must have shape [{V}], got "
                             f"{list(linear_bias.shape) if isinstance(linear_bias, Tensor) else type(linear_bias).__name__}")
        if linear_bias.device != input.device or linear_bias.dtype != input.dtype:
            raise ValueError(f"linear_bias must be {input.dtype} on {input.device}, like input")
    if V == 0:
        raise ValueError("linear_weight has 0 rows: there are no classes")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_options(reduction, label_smoothing, z_loss, softcap, num_items)
    check_weight(weight, V, input.device)
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive number of rows, or None to choose it")
    if process_group is not None:
        raise ValueError("process_group (vocab-parallel) is not available yet in this version of crossent")
    name = resolve_impl(impl, input.device)
    if filter_eps is not None:
        if name != "triton":
            raise ValueError(f"filter_eps applies to impl='triton' only (this call runs impl={name!r}, which is "
                             "always exact); leave filter_eps=None")
        if not isinstance(filter_eps, Number) or isinstance(filter_eps, bool) or not filter_eps >= 0:
            raise ValueError(f"filter_eps={filter_eps!r} must be a number >= 0")

    pos_shape = input.shape[:-1]
    row_ids = None
    if shift:
        if input.dim() < 2 or input.shape[-2] < 1:
            raise ValueError(f"shift=True needs input [..., T, H] with a sequence dim, got {list(input.shape)}")
        T = input.shape[-2]
        tshape = target.shape[:-1] if isinstance(target, SparseTarget) else (
            target.shape[:len(pos_shape)] if isinstance(target, Tensor) else pos_shape)
        if tshape != pos_shape:
            raise ValueError(f"with shift=True the target covers every position before shifting: expected "
                             f"{list(pos_shape)} (+ [V] for probabilities), got {list(target.shape)}")
        if isinstance(target, Tensor):
            target = target[..., 1:] if target.shape == pos_shape else target[..., 1:, :]
        else:
            target = _shift_sparse(target)
        pos_shape = torch.Size(input.shape[:-2] + (T - 1,))
        B = math.prod(input.shape[:-2])
        row_ids = ((torch.arange(B, device=input.device) * T).unsqueeze(1)
                   + torch.arange(T - 1, device=input.device)).reshape(-1)
    cdim = len(pos_shape)
    tgt = normalize_target(target, _Like(pos_shape + (V,), input.device), cdim, target_format, ignore_index)
    acc, w, ls, z_loss, softcap, ce_denom, z_denom = _settings(tgt, input, weight, label_smoothing, z_loss, softcap,
                                                               reduction, num_items, ignore_index)

    if name == "torch":
        x = input[..., :-1, :] if shift else input
        logits = torch.nn.functional.linear(x, linear_weight, linear_bias)
        loss, lse, zrows, pred = _reference(logits.reshape(-1, V).unsqueeze(2), tgt, weight, ignore_index, ls,
                                            softcap, z_loss, reduction, ce_denom, z_denom, pos_shape, input.dtype)
    else:
        _check_fused(name, weight, tgt)
        ce_g = _reduce.grad_scale(ce_denom, acc, input.device)
        z_g = _reduce.grad_scale(z_denom, acc, input.device)
        x2 = input.reshape(-1, H)

        if name == "triton":
            from .impl.triton.linear import linear_cross_entropy_forward as lin_fn
            extra = {"filter_eps": filter_eps}
        else:
            lin_fn, extra = _chunked.linear_cross_entropy_forward, {}

        def kernel(x2_, w_, b_, row_scale, want):
            return lin_fn(x2_, row_ids, w_, b_, tgt, w, ignore_index, ls, softcap, z_loss, ce_g, z_g, want,
                          return_extras, chunk_size, row_scale, **extra)

        call = LinearCall(kernel, reduction, ce_denom, z_denom, pos_shape, name, torch.is_grad_enabled())
        loss, lse, zrows, pred = fused_linear_cross_entropy(x2, linear_weight, linear_bias, call)
    return _finish(loss, lse, zrows, pred, pos_shape, tgt, target, return_extras)

"""The public loss functions: check the arguments, build the options, resolve the impl, call it.

This layer knows PyTorch's argument conventions and nothing of kernels; the
impls (:mod:`crossent.impl`) know nothing of argument conventions.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from .distributed import (agree_after, agree_before, copy_to_vocab_parallel, data_fingerprint, dtensor_logits,
                          dtensor_linear_args, is_dtensor, local_tensor, refuse_vocab_parallel, vocab_parallel_linear,
                          vocab_parallel_terms, world_size)
from .config import value_checks
from .errors import NotImplementedTypeError
from .impl.common import acc_dtype
from .impl.registry import check_supported, resolve
from .ops import (FusedCall, LinearCall, check_inplace, check_not_overwritten, fused_cross_entropy,
                  fused_linear_cross_entropy, mark_overwritten)
from .options import Options, check_chunk_size, check_impl, check_flag, check_shift, check_target_format, make_options
from .reduction import plan_reduction
from .targets import (ProbsTarget, SparseTarget, Target, _fmt, check_after, class_dim, normalize_target,
                      promoted_dtype)

__all__ = ["cross_entropy", "linear_cross_entropy"]


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
            :class:`SparseTarget`); a NumPy integer or 0-dim tensor works too.
            With probabilities, as in PyTorch, a negative value is unused and
            a class index (>= 0) is refused. Default: -100.
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
            values are lost: anything that saved them fails loudly at its
            backward, a later crossent call on them raises, and (unless they
            are a view) so does any later use that needs their gradient.
            Refused for a leaf that requires grad (a parameter) or a view of
            one, and for self-overlapping memory (``expand``). Fused impls
            only. Default: ``False``.
        process_group (ProcessGroup, optional): vocab-parallel mode: the
            input's class dim holds this rank's contiguous shard of the
            vocabulary (ranks in order, shards may be uneven or empty), and
            ``weight`` this rank's shard of the class weights or the full
            ``(C,)`` weight (replicated, as ``loss_parallel`` takes it). Every
            rank gets the loss over the full vocabulary (label smoothing,
            weighted mean, z-loss, extras all global) and the gradient of its
            shard; the target is the full one (indices, one-hot, probabilities
            or a SparseTarget; probabilities may also be this rank's shard),
            the same on every rank. In the forward, an exchange of eleven
            numbers per rank and two collectives of O(N) numbers; none in the
            backward, none when the group has one rank. Ranks that disagree
            on positions, options, dtype or (while value checks are on, by
            fingerprint) targets, hidden states or ``num_items``, or that
            refuse their arguments, raise on every rank. It runs on torch ops
            for every ``impl`` (not the fused kernels), without double
            backward. A ``DTensor`` input sharded on the class dim is
            vocab-parallel with no extra argument and gives a replicated
            DTensor loss. A group object whose ``size()`` is 1 needs no
            ``init_process_group``. Default: ``None``.
        return_extras (bool, optional): also return a dict with per-position
            ``lse``, ``z_loss`` and ``predicted`` class (detached). Default: ``False``.

    Value checks on targets sync with the device on CUDA: see
    :func:`crossent.set_checks` and ``with crossent.checks(False):``. They
    cannot read data while :func:`torch.compile` traces or a
    :mod:`torch.func` transform runs: there a bad value gives NaN at its
    position instead of an error.

    torch.compile and torch.func: ``fullgraph=True`` works with the default
    settings (the fused impls run as registered ``torch.library`` ops; a
    compiled call ignores ``inplace_backward``); under ``grad``, ``vmap``,
    ``jacrev`` or ``jacfwd`` every ``impl`` runs the reference, PyTorch's
    results.

    dtypes: like PyTorch, float32 logits with float64 probabilities compute
    and return float64, and under :func:`torch.autocast` the loss of 16-bit
    logits is float32 (the gradient keeps the logits' dtype).

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
    _no_jit_trace()
    if process_group is not None or is_dtensor(input):  # DTensor weights, targets, counts: this rank's tensors
        weight, target, num_items = local_tensor(weight), local_tensor(target), local_tensor(num_items)
    if is_dtensor(input):  # sharded on the class dim: vocab-parallel, a replicated loss
        input, process_group, wrap = dtensor_logits(input, dim)
        out = cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, dim=dim,
                            target_format=target_format, z_loss=z_loss, softcap=softcap, num_items=num_items,
                            impl=impl, inplace_backward=inplace_backward, process_group=process_group,
                            return_extras=return_extras)
        return (wrap(out[0]), out[1]) if return_extras else wrap(out)
    def checked():
        """``(class dim, options)`` after every check of the arguments that needs no data exchange."""
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a tensor of logits, got {type(input).__name__}")
        if not input.dtype.is_floating_point:
            raise NotImplementedTypeError(f"input must be floating logits, got {input.dtype}; use input.float()")
        cdim = class_dim(input, dim)
        no_probs = not (isinstance(target, Tensor) and target.dtype.is_floating_point and target.shape == input.shape)
        if input.shape[cdim] == 0 and process_group is None and no_probs:  # a vocab-parallel rank may hold none
            raise ValueError(f"input {list(input.shape)} has 0 classes at dim {cdim}: no class index can be in "
                             "range (probabilities of the same shape are taken, as PyTorch takes them)")
        check_target_format(target_format)
        check_impl(impl)
        classes = None if process_group is not None else input.shape[cdim]  # vocab-parallel: [C_r] or [C]
        return cdim, make_options(classes=classes, device=input.device, weight=weight,
                                  ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                                  z_loss=z_loss, softcap=softcap, num_items=num_items,
                                  inplace_backward=inplace_backward, return_extras=return_extras)

    if process_group is not None and world_size(process_group) > 1:
        return _vocab_parallel(input, target, dim, target_format, checked, process_group)
    cdim, opts = checked()
    C = input.shape[cdim]
    if C == 0:
        return _no_classes(input, cdim, opts)
    tgt = normalize_target(target, input, cdim, check_target_format(target_format), opts.ignore_index)
    _guard_logits(input, tgt, opts)
    input = _promoted(input, tgt)
    r = resolve(impl, input.device, input.dtype, (input,), _reference_only(tgt, opts))
    check_supported(r, opts, tgt.requires_grad)
    shape3 = (math.prod(input.shape[:cdim]), C, math.prod(input.shape[cdim + 1:]))
    pos_shape = torch.Size(input.shape[:cdim] + input.shape[cdim + 1:])
    autocast_off, out_dtype = _autocast_off(input)
    with autocast_off:
        red = plan_reduction(tgt, opts, acc_dtype(input.dtype), input.device, pos_shape, out_dtype)
        if r.fused:
            watch = opts.inplace_backward and not torch.compiler.is_compiling()  # traced: nothing in place
            version = input._version if watch else 0
            loss, lse, z, pred = fused_cross_entropy(
                input, FusedCall(r.module, tgt, opts, red, shape3, cdim, torch.is_grad_enabled()))
            if watch and input._version != version:
                mark_overwritten(input)  # a later crossent call on these "logits" raises
        else:  # the reference: autograd differentiates it
            terms = r.module.cross_entropy(input.reshape(shape3), tgt, opts, red)
            loss, lse, z, pred = red.reduce(terms.ce, terms.z), terms.lse, terms.z, terms.predicted
    return _finish(loss, lse, z, pred, pos_shape, tgt, target, opts)


def _no_classes(input: Tensor, cdim: int, opts: Options):
    """Logits and probabilities with no class, as PyTorch gives: every position's loss is 0 (a sum over
    no class), so ``none`` gives zeros, ``sum`` 0 and ``mean`` NaN (PyTorch's 0 / 0); the gradient is
    empty. ``num_items`` divides the 0 sum."""
    ce = input.sum(cdim) * 0  # connected to the input, so backward gives its (empty) gradient
    if opts.num_items is not None:
        loss = ce.sum() / torch.as_tensor(opts.num_items, dtype=ce.dtype, device=ce.device)
    else:
        loss = {"none": ce, "sum": ce.sum(), "mean": ce.sum() * float("nan")}[opts.reduction]
    if not opts.return_extras:
        return loss
    lse = torch.full(ce.shape, float("-inf"), dtype=ce.dtype, device=ce.device)
    return loss, {"lse": lse, "z_loss": torch.zeros_like(lse),
                  "predicted": torch.zeros(ce.shape, dtype=torch.long, device=ce.device)}


def _vocab_parallel(input, target, dim, target_format: str, checked, group):
    """The input holds this rank's shard of the classes: collectives in :mod:`crossent.distributed`,
    the gradient through the fused autograd Function (the same path for every ``impl``). Whatever this
    rank refuses travels with the first exchange, so that every rank raises instead of waiting."""
    cdim = opts = None
    try:
        cdim, opts = checked()
        if not torch.compiler.is_compiling():
            check_not_overwritten(input)
            if opts.inplace_backward:
                check_inplace(input)
        if torch.is_grad_enabled() and opts.weight is not None and opts.weight.requires_grad:
            raise ValueError("weight requires grad, but vocab-parallel cross_entropy does not differentiate class "
                             "weights; pass weight.detach()")
    except (ValueError, TypeError, RuntimeError) as e:
        refuse_vocab_parallel(group, e, input)
    autocast_off, out_dtype = _autocast_off(input)
    with autocast_off:
        shard, tgt, red, shape3 = vocab_parallel_terms(input, target, cdim, target_format, opts, group, out_dtype)
        watch = opts.inplace_backward and not torch.compiler.is_compiling()
        if watch and isinstance(tgt, ProbsTarget) and value_checks():  # before the logits are overwritten
            agree_before(group, tgt.check_finite)
        version = input._version if watch else 0
        loss, lse, z, pred = fused_cross_entropy(input, FusedCall(shard, tgt, shard.opts, red, shape3, cdim,
                                                                  torch.is_grad_enabled()))
        if watch and input._version != version:
            mark_overwritten(input)  # a later crossent call on these "logits" raises, as on one device
    agree_after(group, tgt, target, loss)  # a NaN probability on one rank: every rank raises
    return _finish(loss, lse, z, pred, torch.Size(input.shape[:cdim] + input.shape[cdim + 1:]), tgt, target,
                   opts, checked_after=True)


def _reference_only(tgt: Target, opts: Options) -> str:
    """What, of this call's inputs, requires grad though only the reference differentiates it ("" if
    nothing): soft targets, class weights. Torch differentiates both; the fused impls form only the
    logits' gradient, so such a call runs the reference."""
    if not torch.is_grad_enabled():
        return ""
    what = [name for name, on in (("targets", tgt.requires_grad),
                                  ("class weights", opts.weight is not None and opts.weight.requires_grad)) if on]
    return " and ".join(what)


def _guard_logits(input: Tensor, tgt: Target, opts: Options) -> None:
    """Logits that an earlier ``inplace_backward`` overwrote, or that this one must not overwrite."""
    if torch.compiler.is_compiling():
        return  # traced: nothing is written in place, and fake tensors have no storage to look up
    if torch._C._are_functorch_transforms_active():  # the reference runs: nothing is written in place
        check_not_overwritten(_unwrapped(input))
        return
    check_not_overwritten(input)
    if opts.inplace_backward:
        check_inplace(input)
        if isinstance(tgt, ProbsTarget):
            tgt.check_finite()  # before the logits are overwritten


def _unwrapped(t: Tensor) -> Tensor:
    """The plain tensor under torch.func's wrappers (its storage is the caller's)."""
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(t):
        t = f.get_unwrapped(t)
    return t


def _no_jit_trace() -> None:
    if torch.jit.is_tracing():
        raise RuntimeError("crossent does not support TorchScript (torch.jit.trace / torch.jit.script): "
                           "use torch.compile or torch.export, which it supports, or "
                           "torch.nn.functional.cross_entropy inside TorchScript code")


def _promoted(input: Tensor, tgt: Target) -> Tensor:
    """PyTorch's type promotion with probability targets: float32 logits and float64 probabilities
    compute (and return) in float64 (top-k values alike)."""
    dtype = promoted_dtype(input.dtype, tgt)
    return input if dtype == input.dtype else input.to(dtype)


def _autocast_off(input: Tensor):
    """``(context, loss dtype)``: run the impl with autocast off; under autocast the loss of 16-bit
    inputs is float32 (cross_entropy is on autocast's float32 list), else it has the input's dtype."""
    dev = input.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        out = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
        return torch.autocast(dev, enabled=False), out
    return contextlib.nullcontext(), input.dtype


def _finish(loss: Tensor, lse: Tensor, z: Optional[Tensor], pred: Optional[Tensor], pos_shape: torch.Size,
            tgt: Target, target, opts: Options, checked_after: bool = False):
    """Deferred target checks, then the loss or ``(loss, extras)``."""
    if not checked_after:
        check_after(tgt, target, loss)
    if not opts.return_extras:
        return loss
    z = z.detach() if z is not None else torch.zeros_like(lse)
    return loss, {"lse": lse.reshape(pos_shape), "z_loss": z.reshape(pos_shape),
                  "predicted": pred.reshape(pos_shape)}


class _Logits:
    """Shape and device of logits that are never built (for target normalisation)."""

    def __init__(self, shape, device):
        self.shape, self.device = torch.Size(shape), device


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target, linear_bias: Optional[Tensor] = None,
                         weight: Optional[Tensor] = None, ignore_index: Optional[int] = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, *, shift=False,
                         target_format: str = "auto", z_loss: float = 0.0, softcap: Optional[float] = None,
                         num_items=None, impl: str = "auto", chunk_size: Optional[int] = None,
                         process_group=None, return_extras: bool = False, filter_eps: Optional[float] = None,
                         options=None, reduce_input_grad: bool = True):


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
        shift (bool or int, optional): causal language modelling: position
            ``t`` predicts label ``t + shift`` (``True``: 1) along the sequence
            dim (``input``'s dim -2, ``target``'s last position dim); the last
            ``shift`` positions of each sequence are dropped, the hidden states
            are not copied. Default: ``False``.
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
        process_group (ProcessGroup, optional): vocab-parallel mode:
            ``linear_weight`` (and ``linear_bias``) hold this rank's rows of the
            vocabulary, ``input`` is replicated. Each rank goes over row chunks
            of its shard's logits (never all of them: ``chunk_size`` applies),
            with the collectives of vocab-parallel :func:`crossent.cross_entropy`
            per chunk; the weight gradient needs no communication. A
            ``DTensor`` ``linear_weight`` sharded on dim 0 (an lm_head under
            ``ColwiseParallel``) is vocab-parallel with no extra argument. The hidden states must be the same on every rank (checked
            by fingerprint while value checks are on): an FSDP2 (``fully_shard``)
            weight seen outside its module's forward is a shard over
            data-parallel ranks, not the vocabulary, and raises on every rank;
            compute the loss inside the module's forward (as
            ``crossent.integrations.transformers.apply`` does). Default: ``None``.
        reduce_input_grad (bool, optional): with ``process_group``, sum the
            input's gradient over the ranks in the backward (one all-reduce);
            ``False`` when a Megatron-style layer already reduces it.
            Default: ``True``.
        filter_eps (float, optional): triton only: skip the backward's
            (row block, vocab tile) pairs whose logit gradient is below this
            everywhere (an approximation that saves time when the softmax is
            peaked). Default: ``None`` (exact).
        options (torch.nn.LinearCrossEntropyOptions, optional): accepted for
            compatibility with :func:`torch.nn.functional.linear_cross_entropy`;
            its ``batch_chunk_size`` is honoured as ``chunk_size``, its other
            fields choose among PyTorch's own strategies and do not apply.
            Default: ``None``.

    A drop-in for :func:`torch.nn.functional.linear_cross_entropy` too:
    ``ignore_index=None`` means -100, and a K-dimensional ``linear_weight``
    ``(C, d_1, ..., d_K, H)`` with input ``(N, H)`` gives PyTorch's result
    (logits ``(N, C, d_1, ..., d_K)``, classes at dim 1; those logits are
    built, as PyTorch's reference path builds them). Inputs of more than two
    dims, which PyTorch refuses, are positions with classes last.

    Shape:
        - input: :math:`(*, H)`; linear_weight: :math:`(V, H)`; linear_bias: :math:`(V)`.
        - target: :math:`(*)` indices, :math:`(*, k)` SparseTarget, :math:`(*, V)` probabilities.
        - output: scalar, or :math:`(*)` with ``reduction="none"`` (:math:`(*, T - k)` with ``shift=k``).

    Example::

        >>> import torch, crossent
        >>> h = torch.randn(2, 16, 64, requires_grad=True)
        >>> W = torch.randn(1000, 64, requires_grad=True)
        >>> labels = torch.randint(0, 1000, (2, 16))
        >>> loss = crossent.linear_cross_entropy(h, W, labels, shift=True)
        >>> loss.backward()
    """
    _no_jit_trace()
    early = None
    try:
        chunk_size = check_chunk_size(_chunk_size(chunk_size, options))
    except (ValueError, TypeError) as e:
        early = e  # vocab-parallel: raised on every rank, not on this one alone
    if process_group is not None or is_dtensor(linear_weight) or is_dtensor(input):
        weight, target, num_items = local_tensor(weight), local_tensor(target), local_tensor(num_items)
    kw = dict(weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
              target_format=target_format, z_loss=z_loss, softcap=softcap, num_items=num_items,
              return_extras=return_extras)
    if is_dtensor(linear_weight) or is_dtensor(input):
        input, linear_weight, linear_bias, process_group, wrap = dtensor_linear_args(input, linear_weight,
                                                                                   linear_bias)
        loss = linear_cross_entropy(input, linear_weight, target, linear_bias, shift=shift, impl=impl,
                                    chunk_size=chunk_size, process_group=process_group, filter_eps=filter_eps,
                                    reduce_input_grad=reduce_input_grad, **kw)
        return (wrap(loss[0]), loss[1]) if return_extras else wrap(loss)
    if process_group is not None and world_size(process_group) > 1:
        if early is not None:
            refuse_vocab_parallel(process_group, early, input)
        return _linear_vocab_parallel(input, linear_weight, target, linear_bias, shift, process_group,
                                      reduce_input_grad, chunk_size=chunk_size, filter_eps=filter_eps, **kw)
    if early is not None:
        raise early
    if isinstance(linear_weight, Tensor) and linear_weight.dim() > 2:
        if filter_eps is not None or chunk_size is not None:  # as torch, which ignores its options there
            warnings.warn("chunk_size, filter_eps and options.batch_chunk_size apply to a [V, H] linear_weight; a "
                          f"K-dimensional one {_fmt(linear_weight.shape)} builds its logits: they are ignored",
                          UserWarning, stacklevel=2)
        kw["ignore_index"] = -100 if ignore_index is None else ignore_index
        return _linear_k_dim(input, linear_weight, target, linear_bias, shift=shift, impl=impl,
                             process_group=process_group, **kw)
    return _linear_one_device(input, linear_weight, target, linear_bias, shift, impl, chunk_size, filter_eps, **kw)


def _linear_one_device(input: Tensor, linear_weight: Tensor, target, linear_bias: Optional[Tensor], shift, impl: str,
                       chunk_size, filter_eps, *, target_format: str, **kw):
    """:func:`linear_cross_entropy` on one device: the fused impls' row chunks, or the reference."""
    V, H = _check_linear_args(input, linear_weight, linear_bias)
    opts = make_options(classes=V, device=input.device, chunk_size=chunk_size, filter_eps=filter_eps,
                        ignore_index_none_ok=True, **kw)
    pos_shape, target, row_ids = _linear_positions(input, target, V, check_shift(shift))
    tgt = normalize_target(target, _Logits(pos_shape + (V,), input.device), len(pos_shape),
                           check_target_format(target_format), opts.ignore_index)
    x, lw, lb = _linear_promoted(input, linear_weight, linear_bias, tgt)
    r = resolve(impl, x.device, x.dtype, (x, lw, lb), _reference_only(tgt, opts))
    check_supported(r, opts, tgt.requires_grad)
    autocast_off, out_dtype = _autocast_off(x)
    with autocast_off:
        red = plan_reduction(tgt, opts, acc_dtype(x.dtype), x.device, pos_shape, out_dtype)
        x2 = x.reshape(math.prod(x.shape[:-1]), H)
        if r.fused:
            call = LinearCall(r.module, row_ids, tgt, opts, red, torch.is_grad_enabled())
            loss, lse, z, pred = fused_linear_cross_entropy(x2, lw, lb, call)
        else:
            terms = r.module.linear_cross_entropy(x2, row_ids, lw, lb, tgt, opts, red, None).terms
            loss, lse, z, pred = red.reduce(terms.ce, terms.z), terms.lse, terms.z, terms.predicted
    return _finish(loss, lse, z, pred, pos_shape, tgt, target, opts)


def _linear_vocab_parallel(input: Tensor, linear_weight: Tensor, target, linear_bias: Optional[Tensor], shift,
                           group, reduce_input_grad, chunk_size, filter_eps, target_format, **kw):
    """``linear_weight`` (and bias) hold this rank's rows of the vocabulary, the input is replicated:
    :func:`crossent.distributed.vocab_parallel_linear` goes through row chunks of this shard's logits
    (never all of them). The weight gradient needs no communication; the input gradient is summed
    over the ranks (one all-reduce in the backward) unless ``reduce_input_grad=False`` (a layer
    already reduces it)."""
    try:  # a refusal here travels with the exchange, so that every rank raises
        if filter_eps is not None:
            raise ValueError("filter_eps is for the triton impl on one device; vocab-parallel "
                             "linear_cross_entropy is exact: leave it unset")
        if not isinstance(linear_weight, Tensor) or linear_weight.dim() != 2:
            raise ValueError("vocab-parallel linear_cross_entropy takes this rank's rows of a [V, H] linear_weight")
        _check_linear_args(input, linear_weight, linear_bias, allow_empty=True)
        shift = check_shift(shift)
        reduce_input_grad = check_flag(reduce_input_grad, "reduce_input_grad")
        check_target_format(target_format)
        if shift:
            _check_linear_target(input, target, None, shift)
            if input.dim() < 2:
                raise ValueError(f"shift needs input [..., T, H] with a sequence dim, got {_fmt(input.shape)}")
        kw["ignore_index"] = -100 if kw["ignore_index"] is None else kw["ignore_index"]
        opts = make_options(classes=None, device=input.device, chunk_size=chunk_size, **kw)
        if torch.is_grad_enabled() and opts.weight is not None and opts.weight.requires_grad:
            raise ValueError("weight requires grad, but vocab-parallel linear_cross_entropy does not differentiate "
                             "class weights; pass weight.detach()")
    except (ValueError, TypeError) as e:
        refuse_vocab_parallel(group, e, input)
    fingerprint = data_fingerprint(input) if value_checks() else 0
    x = copy_to_vocab_parallel(input, group) if reduce_input_grad else input
    if shift:  # shift >= T: no position, as on one device (mean: NaN, sum: 0)
        x = x[..., :max(input.shape[-2] - shift, 0), :]
        target = _shifted_target(target, input.shape[:-1], shift)
    x, lw, lb = _linear_promoted(x, linear_weight, linear_bias, None, _soft_dtype(target))
    autocast_off, out_dtype = _autocast_off(x)
    with autocast_off:
        loss, terms, tgt = vocab_parallel_linear(x, lw, lb, target, target_format, opts, group, out_dtype,
                                                 fingerprint, extra=(reduce_input_grad,))
    agree_after(group, tgt, target, loss)
    return _finish(loss, terms.lse, terms.z, terms.predicted, x.shape[:-1], tgt, target, opts, checked_after=True)


def _soft_dtype(target) -> Optional[torch.dtype]:
    """The dtype of a target's soft (float) values before it is typed (probabilities, a SparseTarget's
    values), which PyTorch's type promotion reads; None for class indices."""
    values = target.values if isinstance(target, SparseTarget) else target
    return values.dtype if isinstance(values, Tensor) and values.dtype.is_floating_point else None


def _linear_k_dim(input: Tensor, linear_weight: Tensor, target, linear_bias: Optional[Tensor], *, shift, **kw):
    """A K-dimensional projection ``[C, d1, ..., dK, H]``, as ``torch.nn.functional.linear_cross_entropy``
    takes it: logits ``[N, C, d1, ..., dK]`` from a ``[N, H]`` input, then :func:`cross_entropy` with
    classes at dim 1. The logits are built (PyTorch's reference path does the same)."""
    W = linear_weight
    if not isinstance(input, Tensor) or input.dim() != 2:
        got = _fmt(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"a K-dimensional linear_weight {_fmt(W.shape)} (classes first, hidden last, as in "
                         f"torch.nn.functional.linear_cross_entropy) needs a batched input [N, {W.shape[-1]}], "
                         f"got {got}")
    if shift:
        raise ValueError("shift needs a [V, H] linear_weight and input [..., T, H]; a K-dimensional "
                         f"linear_weight {_fmt(W.shape)} has no sequence to shift along")
    if input.shape[-1] != W.shape[-1]:
        raise ValueError(f"input is {_fmt(input.shape)} (hidden size {input.shape[-1]}) but linear_weight is "
                         f"{_fmt(W.shape)} (hidden size {W.shape[-1]}, its last dim)")
    out_features = W.shape[:-1]
    if linear_bias is not None and (not isinstance(linear_bias, Tensor) or linear_bias.shape != out_features):
        got = _fmt(linear_bias.shape) if isinstance(linear_bias, Tensor) else type(linear_bias).__name__
        raise ValueError(f"linear_bias must have shape {_fmt(out_features)} (linear_weight without its hidden "
                         f"dim), got {got}")
    flat_bias = None if linear_bias is None else linear_bias.reshape(-1)
    logits = torch.nn.functional.linear(input, W.reshape(-1, W.shape[-1]), flat_bias)
    return cross_entropy(logits.reshape(input.shape[:1] + out_features), target, dim=1, **kw)


def _check_linear_args(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], allow_empty: bool = False):
    """``(V, H)`` after checking the hidden states, the projection and its bias."""
    if not isinstance(input, Tensor) or not input.dtype.is_floating_point:
        raise TypeError("input must be a floating tensor of hidden states [..., H], got "
                        + (f"{input.dtype} {_fmt(input.shape)}" if isinstance(input, Tensor) else type(input).__name__))
    if input.dim() == 0:
        raise ValueError("input is a 0-dim tensor, but linear_cross_entropy needs hidden states [..., H] "
                         "(at least a hidden dim)")
    if not isinstance(linear_weight, Tensor) or linear_weight.dim() != 2:
        got = _fmt(linear_weight.shape) if isinstance(linear_weight, Tensor) else type(linear_weight).__name__
        raise ValueError(f"linear_weight must be a [V, H] matrix (vocabulary, hidden) or, as in PyTorch, "
                         f"[C, d1, ..., dK, H]; got {got}")
    V, H = linear_weight.shape
    if input.shape[-1] != H:
        raise ValueError(f"input is {_fmt(input.shape)} (hidden size {input.shape[-1]}) but linear_weight is "
                         f"[{V}, {H}] (hidden size {H}): linear_weight must be [vocab, hidden]; did you pass its "
                         "transpose?")
    autocast = input.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(input.device.type) \
        and input.dtype != torch.float64 and linear_weight.dtype != torch.float64
    if linear_weight.dtype != input.dtype and not autocast:
        raise TypeError(f"linear_weight is {linear_weight.dtype} but input is {input.dtype}: cast one to the "
                        "other (as torch.nn.functional.linear requires)")
    if linear_weight.device != input.device:
        raise ValueError(f"linear_weight is on {linear_weight.device} but input on {input.device}")
    if linear_bias is not None:
        if not isinstance(linear_bias, Tensor) or linear_bias.shape != (V,):
            got = _fmt(linear_bias.shape) if isinstance(linear_bias, Tensor) else type(linear_bias).__name__
            raise ValueError(f"linear_bias must have shape [{V}] (one per row of linear_weight), got {got}")
        if linear_bias.device != input.device or (linear_bias.dtype != input.dtype and not autocast):
            raise ValueError(f"linear_bias must be {input.dtype} on {input.device}, like input")
    if V == 0 and not allow_empty:  # a vocab-parallel rank may hold no rows
        raise ValueError("linear_weight has 0 rows: there are no classes")
    return V, H


def _linear_promoted(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], tgt: Optional[Target],
                     soft: Optional[torch.dtype] = None):
    """The hidden states, weight and bias in one dtype: autocast's (as ``F.linear`` under autocast),
    else promoted with probability targets (as ``cross_entropy`` promotes): the typed ``tgt``'s, or
    ``soft``, the dtype of a target not yet typed (vocab-parallel)."""
    dev = input.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) and input.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(dev)  # autocast leaves float64 alone
    else:
        dtype = promoted_dtype(input.dtype, tgt) if tgt is not None else input.dtype
        dtype = torch.promote_types(dtype, soft) if soft is not None and soft.is_floating_point else dtype
    x, lw, lb = [None if t is None else (t if t.dtype == dtype else t.to(dtype)) for t in (input, linear_weight, linear_bias)]
    return x, lw, None if lb is None else lb.contiguous()  # the fused impls read the bias as a dense [V]


def _chunk_size(chunk_size: Optional[int], options) -> Optional[int]:
    """``chunk_size``, or the ``batch_chunk_size`` of torch's ``LinearCrossEntropyOptions`` (the one
    field of it that applies here; the others choose among torch's own strategies)."""
    if options is None:
        return chunk_size
    rows = getattr(options, "batch_chunk_size", None)
    if not hasattr(options, "batch_chunk_size"):
        raise TypeError(f"options must be None or a torch.nn.LinearCrossEntropyOptions, got {type(options).__name__}")
    if chunk_size is not None and rows is not None and rows != chunk_size:
        raise ValueError(f"chunk_size={chunk_size} and options.batch_chunk_size={rows} disagree: give one of them")
    return chunk_size if rows is None else rows


def _shifted_target(target, pos_shape: torch.Size, shift: int):
    """The labels of positions ``shift..T-1`` (position ``t`` predicts label ``t + shift``)."""
    if isinstance(target, SparseTarget):
        return SparseTarget(target.indices[..., shift:, :], target.values[..., shift:, :])
    if isinstance(target, Tensor):
        return target[..., shift:] if target.shape == pos_shape else target[..., shift:, :]
    return target


def _check_linear_target(input: Tensor, target, V: Optional[int], shift: int) -> None:
    """The target's shape against the hidden states ``[..., H]``: indices ``[...]``, probabilities
    ``[..., V]`` (any last dim where ``V`` is None) or a SparseTarget ``[..., k]`` (before any shift)."""
    pos = input.shape[:-1]
    if isinstance(target, SparseTarget):
        ok, got = target.indices.shape[:-1] == pos, target.indices.shape
    elif isinstance(target, Tensor):
        floating = target.dtype.is_floating_point
        dense = target.shape[:-1] == pos and target.dim() == len(pos) + 1 and (V is None or target.shape[-1] == V)
        ok, got = dense or (target.shape == pos and not floating), target.shape
        if floating and target.shape == pos:
            raise TypeError(f"target is {target.dtype} with shape {_fmt(target.shape)}, the shape of class indices "
                            f"for hidden states {_fmt(input.shape)}: class indices must be integers, use target.long()")
    else:
        return  # normalize_target names the wrong type
    if ok:
        return
    sparse = f"{_fmt(pos)[:-1]}{', ' if len(pos) else ''}k]"
    hint = ""
    if shift and len(pos) and got[:len(pos)] == pos[:-1] + (pos[-1] - shift,):
        hint = "; the labels look shifted already: pass shift=False"
    v = "V" if V is None else V
    raise ValueError(f"input (hidden states) is {_fmt(input.shape)} and linear_weight has {v} rows, so the target "
                     f"must be class indices {_fmt(pos)}, one-hot or probabilities {_fmt(pos)[:-1]}"
                     f"{', ' if len(pos) else ''}{v}] or a SparseTarget "
                     f"{sparse}; got {_fmt(got)}" + (" (with shift, the target covers every position before "
                                                       "shifting)" if shift else "") + hint)


def _linear_positions(input: Tensor, target, V: int, shift: int):
    """``(positions' shape, target, row_ids)``: the target checked against the hidden states (errors
    name the input's shape, not the logits'), and with ``shift`` the labels and rows it pairs."""
    pos_shape = input.shape[:-1]
    _check_linear_target(input, target, V, shift)
    if not shift:
        return pos_shape, target, None
    if input.dim() < 2:
        raise ValueError(f"shift needs input [..., T, H] with a sequence dim, got {_fmt(input.shape)}")
    T = input.shape[-2]
    n = max(T - shift, 0)  # shift >= T: no position, as PyTorch's loss over the empty shifted logits (mean: NaN)
    target = _shifted_target(target, pos_shape, shift)
    B = math.prod(input.shape[:-2])
    row_ids = ((torch.arange(B, device=input.device) * T).unsqueeze(1)
               + torch.arange(n, device=input.device)).reshape(-1)
    return torch.Size(input.shape[:-2] + (n,)), target, row_ids

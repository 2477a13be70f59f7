"""The compile boundary of the fused impls: functional ``torch.library`` ops.

Under ``torch.compile`` the fused entry points do not run the eager autograd
Functions of :mod:`crossent.ops.cross_entropy` / :mod:`crossent.ops.linear`
(which scale a saved gradient in place and may write over the logits) but
these registered ops, one per fused impl:

* ``crossent::cross_entropy_chunked`` / ``crossent::linear_cross_entropy_chunked``:
  :func:`torch.library.custom_op`; the compiler sees one opaque call, traced
  with its fake (meta) function, so no Python loop over row chunks specialises
  the graph on the number of positions.
* ``crossent::cross_entropy_triton`` / ``crossent::linear_cross_entropy_triton``:
  :func:`torch.library.triton_op`; the launcher is traced and its kernels are
  wrapped with :func:`torch.library.wrap_triton`, so inductor sees the kernels
  themselves.

Each op is functional: it mutates nothing, and returns the loss, the
per-position extras and the gradient it formed in the forward (an output, so
the compiler plans its memory); its registered backward multiplies that
gradient by the incoming one (``reduction='none'`` of the linear op recomputes
instead, calling the op again with the incoming gradient as ``row_scale``).
Options cross the boundary as plain values, the target as its tensors and a
kind (``index`` | ``probs`` | ``topk``), the reduction as its denominators and
scales; :func:`_unpack` rebuilds the typed objects the impls take, so the impls
are the same code in eager and compiled runs.
"""

from __future__ import annotations

import inspect
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..impl import chunked
from ..impl import triton as triton_impl
from ..config import triton_interpreted
from ..impl.common import acc_dtype
from ..impl.triton.launch import registered_op
from ..options import Options
from ..reduction import Reduction
from ..targets import IndexTarget, ProbsTarget, Target, TopKTarget
from ..impl.common import refuse_double_backward

__all__ = ["compiled_cross_entropy", "compiled_linear_cross_entropy", "has_compiled_op", "OPS"]


# ------------------------------------------------------------------ packing the call into op arguments

def _pack(tgt: Target, opts: Options, red: Reduction) -> Dict[str, object]:
    """The op arguments that describe the target, the options and the reduction."""
    if isinstance(tgt, IndexTarget):
        kind, ta, tb = "index", tgt.index, None
    elif isinstance(tgt, ProbsTarget):
        kind, ta, tb = "probs", tgt.probs, None
    else:
        kind, ta, tb = "topk", tgt.indices, tgt.values
    softcap = None if opts.softcap is None else float(opts.softcap)
    return dict(kind=kind, ta=ta, tb=tb, weight=opts.weight, ce_denom=red.ce_denom, z_denom=red.z_denom,
                ce_scale=red.ce_scale, z_scale=red.z_scale, mode=red.mode, nan_at_zero=red.nan_at_zero,
                out_dtype=red.out_dtype, ignore_index=int(opts.ignore_index),
                label_smoothing=float(opts.label_smoothing), z_loss=float(opts.z_loss), softcap=softcap,
                want_pred=bool(opts.return_extras))


def _unpack(M, kind: str, ta: Tensor, tb: Optional[Tensor], weight: Optional[Tensor], ce_denom: Optional[Tensor],
            z_denom: Optional[Tensor], ce_scale: Tensor, z_scale: Tensor, mode: str, nan_at_zero: bool,
            out_dtype: torch.dtype, ignore_index: int, label_smoothing: float, z_loss: float,
            softcap: Optional[float], want_pred: bool, chunk_size: Optional[int] = None,
            filter_eps: Optional[float] = None) -> Tuple[Target, Options, Reduction]:
    """The typed target, options and reduction of :func:`_pack`'s arguments (``M`` positions)."""
    if kind == "index":
        tgt: Target = IndexTarget(ta, ignore_index)
    elif kind == "probs":
        tgt = ProbsTarget(ta)
    else:
        tgt = TopKTarget(ta, tb, ignore_index)
    opts = Options(ignore_index=ignore_index, reduction=mode, label_smoothing=label_smoothing, z_loss=z_loss,
                   softcap=softcap, weight=weight, return_extras=want_pred, chunk_size=chunk_size,
                   filter_eps=filter_eps)
    red = Reduction(mode, ce_denom, z_denom, ce_scale, z_scale, torch.Size([M]), out_dtype, nan_at_zero)
    return tgt, opts, red


def _scalar(mode: str, ce_denom: Optional[Tensor]) -> bool:
    return mode != "none" or ce_denom is not None


def _positions(kind: str, ta: Tensor):
    """The number of positions of a packed target (``[P, Q]`` / ``[P, Q, k]``, or ``[P, C, Q]`` probabilities)."""
    return ta.shape[0] * (ta.shape[2] if kind == "probs" else ta.shape[1])


def _row_outputs(x: Tensor, M, out_dtype: torch.dtype, scalar: bool, want_pred: bool):
    """Fresh ``(loss, lse, z, pred)`` of the right shapes and dtypes (the fake functions' outputs)."""
    acc = acc_dtype(x.dtype)
    loss = x.new_empty((), dtype=out_dtype) if scalar else x.new_empty((M,), dtype=out_dtype)
    return (loss, x.new_empty((M,), dtype=acc), x.new_empty((M,), dtype=acc),
            x.new_empty((M if want_pred else 0,), dtype=torch.long))


def _finish_rows(x: Tensor, loss: Tensor, terms, want_pred: bool):
    """``(loss, lse, z, pred)`` from an impl's row terms: absent ones as zeros / empty, in the
    accumulation dtype, no output sharing another's storage (ops may not return aliases)."""
    acc = acc_dtype(x.dtype)
    lse = terms.lse.to(acc)
    z = torch.zeros_like(lse) if terms.z is None else terms.z.to(acc)
    pred = terms.predicted if want_pred else x.new_empty((0,), dtype=torch.long)
    out = [loss, lse, z, pred]
    for i in range(1, 4):  # e.g. an empty batch's terms may share one buffer
        if any(torch._C._is_alias_of(out[i], out[j]) for j in range(i)):  # fake tensors too (no data_ptr)
            out[i] = out[i].clone()
    return tuple(out)


def _none_grads(n: int) -> Tuple[None, ...]:
    return (None,) * n


# ------------------------------------------------------------------ cross_entropy

def _ce_body(impl):
    def body(x3: Tensor, kind: str, ta: Tensor, tb: Optional[Tensor], weight: Optional[Tensor],
             ce_denom: Optional[Tensor], z_denom: Optional[Tensor], ce_scale: Tensor, z_scale: Tensor, mode: str,
             nan_at_zero: bool, out_dtype: torch.dtype, ignore_index: int, label_smoothing: float, z_loss: float,
             softcap: Optional[float], want_pred: bool, want_grad: bool
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        P, C, Q = x3.shape
        tgt, opts, red = _unpack(P * Q, kind, ta, tb, weight, ce_denom, z_denom, ce_scale, z_scale, mode,
                                 nan_at_zero, out_dtype, ignore_index, label_smoothing, z_loss, softcap, want_pred)
        grad3 = torch.empty(x3.shape, dtype=x3.dtype, device=x3.device) if want_grad else None
        terms = impl.cross_entropy(x3, tgt, opts, red, grad3)
        loss = red.reduce(terms.ce, terms.z)
        return (*_finish_rows(x3, loss, terms, want_pred), grad3 if want_grad else x3.new_empty((0,)))
    return body


def _ce_fake(x3, kind, ta, tb, weight, ce_denom, z_denom, ce_scale, z_scale, mode, nan_at_zero, out_dtype,
             ignore_index, label_smoothing, z_loss, softcap, want_pred, want_grad):
    P, C, Q = x3.shape
    rows = _row_outputs(x3, P * Q, out_dtype, _scalar(mode, ce_denom), want_pred)
    return (*rows, x3.new_empty(x3.shape) if want_grad else x3.new_empty((0,)))  # contiguous, as the body's


_CE_PARAMS = tuple(inspect.signature(_ce_fake).parameters)  # the op's arguments, in order


def _ce_setup(ctx, inputs, output):
    a = dict(zip(_CE_PARAMS, inputs))
    ctx.scalar = _scalar(a["mode"], a["ce_denom"])
    ctx.shape3 = a["x3"].shape
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(output[4])


def _ce_backward(ctx, g_loss, *_):
    (grad,) = ctx.saved_tensors
    if g_loss is None:
        return _none_grads(len(_CE_PARAMS))
    refuse_double_backward("cross_entropy with a fused impl under torch.compile")
    P, C, Q = ctx.shape3
    go = g_loss if ctx.scalar else g_loss.reshape(P, 1, Q)
    return (grad * go.to(grad.dtype), *_none_grads(len(_CE_PARAMS) - 1))


# ------------------------------------------------------------------ linear_cross_entropy

def _lce_body(impl):
    def body(x2: Tensor, lw: Tensor, lb: Optional[Tensor], row_ids: Optional[Tensor], kind: str, ta: Tensor,
             tb: Optional[Tensor], weight: Optional[Tensor], ce_denom: Optional[Tensor], z_denom: Optional[Tensor],
             ce_scale: Tensor, z_scale: Tensor, mode: str, nan_at_zero: bool, out_dtype: torch.dtype,
             ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float], want_pred: bool,
             chunk_size: Optional[int], filter_eps: Optional[float], want_dx: bool, want_dw: bool, want_db: bool,
             row_scale: Optional[Tensor]
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        tgt, opts, red = _unpack(_positions(kind, ta), kind, ta, tb, weight, ce_denom, z_denom, ce_scale, z_scale, mode,
                                 nan_at_zero, out_dtype, ignore_index, label_smoothing, z_loss, softcap, want_pred,
                                 chunk_size, filter_eps)
        want = _formed(mode, ce_denom, row_scale, want_dx, want_dw, want_db)
        res = impl.linear_cross_entropy(x2, row_ids, lw, lb, tgt, opts, red, want, row_scale)
        loss = red.reduce(res.terms.ce, res.terms.z)
        empty = x2.new_empty((0,))
        # contiguous whatever the inputs' strides (the fake function promises that layout)
        grads = [g.contiguous() if g is not None else empty.clone() for g in (res.dx, res.dw, res.db)]
        return (*_finish_rows(x2, loss, res.terms, want_pred), *grads)
    return body


def _lce_fake(x2, lw, lb, row_ids, kind, ta, tb, weight, ce_denom, z_denom, ce_scale, z_scale, mode, nan_at_zero,
              out_dtype, ignore_index, label_smoothing, z_loss, softcap, want_pred, chunk_size, filter_eps,
              want_dx, want_dw, want_db, row_scale):
    rows = _row_outputs(x2, _positions(kind, ta), out_dtype, _scalar(mode, ce_denom), want_pred)
    dx, dw, db = _formed(mode, ce_denom, row_scale, want_dx, want_dw, want_db)
    return (*rows, x2.new_empty(x2.shape) if dx else x2.new_empty((0,)), lw.new_empty(lw.shape) if dw else
            x2.new_empty((0,)), lb.new_empty(lb.shape) if db else x2.new_empty((0,)))


def _formed(mode: str, ce_denom: Optional[Tensor], row_scale: Optional[Tensor], *want: bool) -> Tuple[bool, ...]:
    """Which of ``(dx, dW, db)`` the linear op forms: those wanted, once the loss's gradient is known
    (a scalar loss, or ``reduction='none'`` with the incoming gradient as ``row_scale``)."""
    known = _scalar(mode, ce_denom) or row_scale is not None
    return tuple(bool(w) and known for w in want)


_LCE_PARAMS = tuple(inspect.signature(_lce_fake).parameters)  # the op's arguments, in order


def _lce_setup(ctx, inputs, output):
    a = dict(zip(_LCE_PARAMS, inputs))
    ctx.scalar = _scalar(a["mode"], a["ce_denom"])
    ctx.inputs_meta = [None if isinstance(i, Tensor) else i for i in inputs]  # no tensor kept by accident
    ctx.want = (a["want_dx"], a["want_dw"], a["want_db"])
    ctx.has_bias = a["lb"] is not None
    ctx.mark_non_differentiable(*output[1:])
    if ctx.scalar:  # the gradients were formed in the forward
        ctx.save_for_backward(*output[4:7])
    else:  # reduction='none': the backward recomputes with the incoming gradient folded in
        tensors = [i for i in inputs if isinstance(i, Tensor)]
        ctx.tensor_pos = [k for k, i in enumerate(inputs) if isinstance(i, Tensor)]
        ctx.save_for_backward(*tensors)


def _lce_backward_for(op_name: str):
    def backward(ctx, g_loss, *_):
        if g_loss is None:
            return _none_grads(len(_LCE_PARAMS))
        refuse_double_backward("linear_cross_entropy with a fused impl under torch.compile")
        if ctx.scalar:
            dx, dw, db = (g * g_loss.to(g.dtype) if w else None for g, w in zip(ctx.saved_tensors, ctx.want))
        else:
            args = list(ctx.inputs_meta)
            for k, t in zip(ctx.tensor_pos, ctx.saved_tensors):
                args[k] = t
            args[_LCE_PARAMS.index("row_scale")] = g_loss.reshape(-1)
            out = OPS[op_name](*args)
            dx, dw, db = (g if w else None for g, w in zip(out[4:7], ctx.want))
        return (dx, dw, db if ctx.has_bias else None, *_none_grads(len(_LCE_PARAMS) - 3))
    return backward


# ------------------------------------------------------------------ registration

OPS: Dict[str, object] = {}
_IMPLS = {"chunked": chunked, "triton": triton_impl}


def _launching(body):
    """A triton op's body: its kernel launches go through ``wrap_triton`` (see ``impl/triton/launch.py``)."""
    def wrapped(*args, **kwargs):
        with registered_op():
            return body(*args, **kwargs)
    wrapped.__signature__ = inspect.signature(body)
    wrapped.__annotations__ = body.__annotations__
    return wrapped


def _register() -> None:
    """``crossent::{cross_entropy,linear_cross_entropy}_{chunked,triton,triton_interpreted}``. Under
    ``TRITON_INTERPRET=1`` (the CPU test runs) :func:`torch.library.wrap_triton` hands back the bare
    kernel, which fake tensors cannot run: there the triton impl goes through an opaque custom op
    with a fake function, like chunked, and the ``triton_op`` is left to real GPUs."""
    for suffix, impl_name, traced in (("chunked", "chunked", False), ("triton", "triton", True),
                                      ("triton_interpreted", "triton", False)):
        module = _IMPLS[impl_name]
        ce_name, lce_name = f"cross_entropy_{suffix}", f"linear_cross_entropy_{suffix}"
        if traced:  # kernels visible to inductor (their launches go through wrap_triton)
            ce = torch.library.triton_op(f"crossent::{ce_name}", _launching(_ce_body(module)), mutates_args=())
            lce = torch.library.triton_op(f"crossent::{lce_name}", _launching(_lce_body(module)), mutates_args=())
        else:
            ce = torch.library.custom_op(f"crossent::{ce_name}", _ce_body(module), mutates_args=())
            lce = torch.library.custom_op(f"crossent::{lce_name}", _lce_body(module), mutates_args=())
            ce.register_fake(_ce_fake)
            lce.register_fake(_lce_fake)
        ce.register_autograd(_ce_backward, setup_context=_ce_setup)
        lce.register_autograd(_lce_backward_for(lce_name), setup_context=_lce_setup)
        OPS[ce_name], OPS[lce_name] = ce, lce


_register()


def has_compiled_op(impl_module) -> bool:
    """Whether ``impl_module`` (an impl of :mod:`crossent.impl`) has registered ops."""
    return any(impl_module is m for m in _IMPLS.values())


def _op(impl_module, what: str):
    suffix = impl_module.NAME
    if suffix == "triton" and triton_interpreted():
        suffix = "triton_interpreted"
    return OPS[f"{what}_{suffix}"]


def compiled_cross_entropy(input: Tensor, call) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(loss, lse, z, predicted)`` of a :class:`~crossent.ops.FusedCall` through the impl's op."""
    want_grad = call.grad_enabled and input.requires_grad
    op = _op(call.impl, "cross_entropy")
    loss, lse, z, pred, _ = op(input.reshape(call.shape3), **_pack(call.target, call.opts, call.red),
                               want_grad=want_grad)
    return _shaped(loss, call.red), lse, z, pred if call.opts.return_extras else None


def compiled_linear_cross_entropy(x2: Tensor, lw: Tensor, lb: Optional[Tensor], call
                                  ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(loss, lse, z, predicted)`` of a :class:`~crossent.ops.LinearCall` through the impl's op."""
    on = call.grad_enabled
    op = _op(call.impl, "linear_cross_entropy")
    out = op(x2, lw, lb, call.row_ids, **_pack(call.target, call.opts, call.red), chunk_size=call.opts.chunk_size,
             filter_eps=call.opts.filter_eps, want_dx=on and x2.requires_grad, want_dw=on and lw.requires_grad,
             want_db=on and lb is not None and lb.requires_grad, row_scale=None)
    loss, lse, z, pred = out[:4]
    return _shaped(loss, call.red), lse, z, pred if call.opts.return_extras else None


def _shaped(loss: Tensor, red: Reduction) -> Tensor:
    """The ops return a per-position loss flat: the positions' shape back."""
    return loss if red.scalar else loss.reshape(red.pos_shape)

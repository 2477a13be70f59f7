"""Which impl runs: every fallback decision in one place, with its reason.

Each impl is a module exposing the same two entry points with the same signature:

* ``cross_entropy(x3, tgt, opts, red, grad3=None) -> RowTerms``: logits viewed as
  ``[P, C, Q]``, a typed target (:mod:`crossent.targets`), the
  :class:`~crossent.options.Options` and the :class:`~crossent.reduction.Reduction`;
  fused impls write the gradient of the reduced loss into ``grad3`` when given.
* ``linear_cross_entropy(x2, row_ids, linear_weight, linear_bias, tgt, opts, red,
  want_grads, row_scale=None) -> LinearResult``.

``torch`` (:mod:`.reference`) is differentiated by autograd; ``chunked`` and
``triton`` are fused (they form gradients themselves) and run through the
autograd Functions of :mod:`crossent.ops` (eager) or its registered ops
(while torch.compile traces). Under a torch.func transform, or with
forward-mode AD tangents, every ``impl`` resolves to the reference: those
need an op they can differentiate and batch, and a gradient formed inside
the forward is neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import List

import torch

from ..config import triton_interpreted
from ..options import IMPL_NAMES, check_impl
from . import chunked, reference
from . import triton as triton_impl  # imports no triton: its launchers do, at their first call

__all__ = ["IMPLS", "Resolved", "resolve", "explain"]

IMPLS = IMPL_NAMES  # the names impl= takes (options.check_impl is their one check)
_MODULES = {"torch": reference, "chunked": chunked, "triton": triton_impl}


@dataclass(frozen=True)
class Resolved:
    """The impl that runs, and why."""

    name: str  # "torch" | "chunked" | "triton"
    reason: str
    transformed: bool = False  # a torch.func transform runs: the reference, in-place options ignored

    @property
    def module(self) -> ModuleType:
        return _MODULES[self.name]

    @property
    def fused(self) -> bool:
        return self.name != "torch"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is as unavailable as a missing one
        return False
    return True


def resolve(impl: str, device: torch.device, dtype: torch.dtype, tensors=(), differentiate: str = "") -> Resolved:
    """Resolve ``impl`` (``"auto"`` | ``"torch"`` | ``"chunked"`` | ``"triton"``) for tensors of ``dtype`` on
    ``device``; raises a clear error for a combination that cannot run. ``tensors``: the differentiable
    inputs, looked at for forward-mode AD tangents (``torch.autograd.forward_ad``). ``differentiate``
    names inputs that require grad and that only the reference differentiates (soft targets, class
    weights): such a call runs the reference."""
    check_impl(impl)
    if impl == "torch":
        return Resolved("torch", "asked for: the reference (plain torch ops, autograd)")
    if differentiate:
        return Resolved("torch", f"impl={impl!r} with {differentiate} that require grad: the reference, which "
                                 "differentiates them as torch does (the fused impls form only the logits' gradient)")
    if _has_tangent(tensors):
        return Resolved("torch", f"impl={impl!r} with forward-mode AD tangents (torch.autograd.forward_ad): the "
                                 "reference, which forward AD differentiates like torch's own", transformed=True)
    if torch._C._are_functorch_transforms_active():
        return Resolved("torch", f"impl={impl!r} under a torch.func transform (grad, vmap, jacrev, jacfwd, ...): "
                                 "the reference, which the transforms differentiate and batch like torch's own "
                                 "(the fused impls form their gradient inside the forward, where they cannot)",
                        transformed=True)
    if impl == "chunked":
        return Resolved("chunked", "asked for")
    if impl == "auto":
        if device.type != "cuda":
            return Resolved("chunked", f"auto: tensors on {device.type}, where chunked is the fused impl")
        if not triton_available():
            return Resolved("chunked", "auto: triton is not installed (pip install 'crossent[triton]')")
        if dtype == torch.float64:
            return Resolved("chunked", "auto: float64 runs on chunked (triton's float64 math gains nothing on a GPU)")
        return Resolved("triton", "auto: CUDA tensors and triton installed")
    # impl == "triton"
    if not triton_available():
        raise ValueError("impl='triton' needs triton: pip install 'crossent[triton]' (or use impl='chunked')")
    if dtype == torch.float64:
        return Resolved("chunked", "triton asked for, float64 runs on chunked (triton's float64 math gains nothing)")
    if device.type == "cuda":
        return Resolved("triton", "asked for")
    if device.type == "cpu" and triton_interpreted():
        return Resolved("triton", "asked for, on CPU under the triton interpreter (TRITON_INTERPRET=1): slow, for tests")
    raise ValueError(
        f"impl='triton' runs its kernels on CUDA tensors, and these are on {device.type}: move them to a GPU "
        "(.cuda()), use impl='chunked' (or 'auto') on this device, or, to test the kernels on the CPU, set "
        "TRITON_INTERPRET=1 in the environment before triton is first imported")


def _has_tangent(tensors) -> bool:
    """Whether a forward-AD level is open and one of ``tensors`` carries a tangent there."""
    fad = torch.autograd.forward_ad
    if getattr(fad, "_current_level", -1) < 0:
        return False
    return any(t is not None and fad.unpack_dual(t).tangent is not None for t in tensors)


def explain(device: torch.device) -> List[str]:
    """One line per (impl, dtype) on ``device``: what runs and why (``crossent info``)."""
    lines = []
    for impl in IMPLS:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            try:
                r = resolve(impl, device, dtype)
                lines.append(f"impl={impl!r} {str(dtype).replace('torch.', '')}: {r.name} ({r.reason})")
            except ValueError as e:
                lines.append(f"impl={impl!r} {str(dtype).replace('torch.', '')}: error: {str(e).split(':')[0]}")
    return lines


def check_supported(r: Resolved, opts, target_requires_grad: bool) -> None:
    """Options and inputs that only some impls take: a clear error where the resolved impl does not."""
    if opts.inplace_backward and not r.fused and not r.transformed:
        why = "" if r.reason.startswith("asked for") else f" (this call runs impl='torch': {r.reason})"
        raise ValueError("inplace_backward=True needs a fused impl ('chunked' or 'triton'): impl='torch' "
                         f"differentiates with autograd and has no gradient to write in place{why}")
    if opts.filter_eps is not None and r.name != "triton":
        raise ValueError(f"filter_eps applies to impl='triton' only (this call runs impl={r.name!r}, which is "
                         "always exact); leave filter_eps=None")
    if not r.fused or not torch.is_grad_enabled():
        return
    if opts.weight is not None and opts.weight.requires_grad:
        raise ValueError(f"weight requires grad, but impl={r.name!r} does not differentiate class weights; "
                         "pass weight.detach() or use impl='torch'")
    if target_requires_grad:
        raise ValueError(f"the target requires grad, but impl={r.name!r} does not differentiate targets; "
                         "pass target.detach() (the usual case for a teacher's probabilities) or use impl='torch'")

"""``diagnose``: what is legal but probably wrong in a cross-entropy call."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .targets import _fmt, class_dim, normalize_target

__all__ = ["diagnose"]


def diagnose(input: Tensor, target, weight: Optional[Tensor] = None, ignore_index: int = -100, *, dim: int = 1,
             target_format: str = "auto") -> List[str]:
    """Look for what is legal but probably wrong in a ``cross_entropy`` call.

    Returns a list of plain sentences (empty when nothing looks off). It never
    raises for a bad call: what :func:`crossent.cross_entropy` would reject is
    reported as a finding too. Reads the data (one host sync on CUDA).

    Checks: input that looks like softmax / log-softmax output or like one-hot
    labels instead of raw logits; probability targets whose rows do not sum to
    1; classes that never occur in the targets; labels outside the class range;
    negative labels that look like padding with another ``ignore_index``; a
    class dim that looks misplaced.

    Example::

        >>> x = torch.randn(8, 3).softmax(1)
        >>> crossent.diagnose(x, torch.randint(0, 3, (8,)))
        ['input rows are all in [0, 1] and sum to 1: this looks like softmax output ...']
    """
    findings: List[str] = []
    if not isinstance(input, Tensor) or not input.dtype.is_floating_point or input.dim() == 0:
        return [f"input must be a floating tensor of logits with a class dim, got "
                f"{type(input).__name__ if not isinstance(input, Tensor) else f'{input.dtype} {_fmt(input.shape)}'}"]
    try:
        cdim = class_dim(input, dim)
    except (ValueError, TypeError) as e:
        return [str(e)]
    shape = input.shape
    C = shape[cdim]
    try:
        tgt = normalize_target(target, input, cdim, target_format, ignore_index)
    except (ValueError, TypeError) as e:
        findings.append(str(e))
        tgt = None

    with torch.no_grad():
        x = input.detach().movedim(cdim, -1).reshape(-1, C).double()
        if x.numel():
            finite = torch.isfinite(x).all()
            rowsum = x.sum(-1)
            if bool(finite) and bool(((x >= 0) & (x <= 1)).all()) and bool(torch.allclose(rowsum, torch.ones_like(rowsum), atol=1e-3)):
                if bool(((x == 0) | (x == 1)).all()):
                    findings.append(
                        "input rows are one-hot (all 0 and 1, one 1 per row): this looks like labels, not logits; "
                        "did you swap input and target?")
                else:
                    findings.append(
                        "input rows are all in [0, 1] and sum to 1: this looks like softmax output, but cross_entropy "
                        "applies log-softmax itself; pass the raw logits (drop the softmax) or the loss trains badly")
            elif C > 1 and bool((x <= 0).all()) and bool(torch.allclose(torch.logsumexp(x, -1), torch.zeros_like(rowsum), atol=1e-3)):
                findings.append(
                    "input rows look like log-softmax output (all <= 0, logsumexp 0): cross_entropy applies "
                    "log-softmax itself; the result is the same, but the extra log_softmax is wasted work")
        if len(shape) >= 3 and cdim == 1 and shape[1] < shape[-1] and isinstance(target, Tensor) \
                and target.shape == torch.Size(shape[:1] + shape[2:]) and not target.dtype.is_floating_point \
                and target.numel() and int(target.max()) >= shape[1] and int(target.max()) < shape[-1]:
            findings.append(
                f"input is {_fmt(shape)} with classes at dim 1 ({shape[1]} classes) but targets reach "
                f"{int(target.max())}: if the last dim ({shape[-1]}) holds the classes, pass dim=-1")

        if tgt is not None and tgt.kind == "index":
            t = tgt.index.reshape(-1)
            valid = t != ignore_index
            tv = t[valid]
            if tv.numel():
                present = torch.bincount(tv.clamp(0, C - 1), minlength=C) > 0
                missing = (~present).nonzero().reshape(-1).tolist()
                if missing and C <= 100_000:
                    shown = ", ".join(str(m) for m in missing[:10]) + (" ..." if len(missing) > 10 else "")
                    findings.append(
                        f"{len(missing)} of {C} classes never occur in the target (class {shown}): "
                        "check the number of classes, or expect no gradient pushing towards them in this batch")
            if not bool(valid.any()) and t.numel():
                findings.append(f"every position is ignored (ignore_index={ignore_index}): a 'mean' loss is NaN")
            if weight is not None and isinstance(weight, Tensor) and weight.numel() == C and tv.numel() \
                    and bool((weight.to(tv.device)[tv.clamp(0, C - 1)] == 0).all()):
                findings.append("every non-ignored position has a class of weight 0: a 'mean' loss is NaN")
        if isinstance(target, Tensor) and not target.dtype.is_floating_point and target.dtype != torch.bool \
                and target.shape == torch.Size(shape[:cdim] + shape[cdim + 1:]) and target.numel():
            neg = target[(target < 0) & (target != ignore_index)]
            if neg.numel():
                v = int(neg[0])
                findings.append(
                    f"target holds {v} at {neg.numel()} positions but ignore_index is {ignore_index}: "
                    f"if {v} marks padding, pass ignore_index={v}")
            over = target[target >= C]
            if over.numel() and tgt is not None:
                findings.append(
                    f"target holds labels up to {int(target.max())} but the input has only {C} classes "
                    f"(valid labels 0..{C - 1}): check the model's output size or the label encoding")
        if tgt is not None and tgt.kind == "probs" and weight is not None and tgt.probs.numel() \
                and bool(((tgt.probs == 0) | (tgt.probs == 1)).all()) and bool((tgt.probs.sum(1) == 1).all()):
            findings.append(
                "the float target rows are one-hot, so they are read as probabilities (PyTorch's rule), whose "
                "weighted 'mean' divides by the number of positions, not by the summed class weights as for "
                "class indices: pass target_format='one_hot' (or target.argmax(dim)) for index semantics")
        if tgt is not None and tgt.kind == "probs":
            sums = tgt.probs.double().sum(1).reshape(-1)
            off = (sums - 1).abs() > 1e-3
            if bool(off.any()):
                i = int(off.nonzero()[0, 0])
                findings.append(
                    f"probability targets should sum to 1 over the classes, but {int(off.sum())} rows do not "
                    f"(the first sums to {float(sums[i]):.4g}): normalise them, or use index or one-hot targets")
            if bool((tgt.probs < 0).any()):
                findings.append("probability targets hold negative values: probabilities are in [0, 1]")
        if tgt is not None and tgt.kind == "sparse":
            v = tgt.sp_values.masked_fill(tgt.sp_index == ignore_index, 0).double().sum(-1).reshape(-1)
            off = (v - 1).abs() > 1e-3
            if bool(off.any()):
                findings.append(
                    f"SparseTarget values should sum to 1 per position, but {int(off.sum())} positions do not "
                    f"(the first sums to {float(v[int(off.nonzero()[0, 0])]):.4g}): top-k teacher probabilities "
                    "are usually renormalised over the k entries")
    return findings

"""``diagnose``: what is legal but probably wrong in a cross-entropy call."""

from __future__ import annotations

import math
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from .options import check_ignore_index
from .targets import SparseTarget, _detect_format, _fmt, _position, class_dim, normalize_target

__all__ = ["diagnose"]

# Logits (or input-shaped target entries) read per step. The extra memory of diagnose() is a few
# chunks of this size (a float32 copy of a low-precision chunk, a temporary of logsumexp) plus
# O(positions + classes); it never holds an input-sized temporary.
_CHUNK_ELEMENTS = 1 << 20

# The "labels use only a prefix of the classes" finding needs this many labels per class on average.
_PREFIX_MIN_LABELS_PER_CLASS = 4


def diagnose(input: Tensor, target, weight: Optional[Tensor] = None, ignore_index: int = -100, *, dim: int = 1,
             target_format: str = "auto") -> List[str]:
    """Look for what is legal but probably wrong in a ``cross_entropy`` call.

    Returns a list of plain sentences (empty when nothing looks off). It never
    raises for a bad call: what :func:`crossent.cross_entropy` would reject
    (a bad target, ``weight``, ``dim``, ...) is reported as a finding too.

    Checks:

    * input and target swapped (class indices passed as the input, logits as
      the target);
    * input that looks like softmax or log-softmax output, or like one-hot
      labels, instead of raw logits;
    * a ``weight`` of the wrong shape, dtype or device;
    * labels outside the class range; negative labels that look like padding
      with another ``ignore_index``; a class dim that looks misplaced; every
      position ignored; every position of a class with weight 0;
    * labels that use only a prefix of the classes (a wrong number of
      classes): every label falls in ``0..m-1`` with at least two distinct
      labels, ``m <= C / 2``, and the batch has at least ``4 * C`` labelled
      positions. Classes that merely do not occur in a batch are normal (a
      batch of 64 tokens over a 32000-word vocabulary misses most of it) and
      are not reported; with ``4 * C`` labels a class-count mismatch shows as
      an unused upper half of the classes;
    * one-hot targets with values other than 0/1 or several classes set; float
      one-hot targets with class weights (read as probabilities);
      probability rows that do not sum to 1 (an all-zero row, which means
      "ignored", is fine) or hold negative values; ``SparseTarget`` values
      that do not sum to 1 per position.

    It reads the data (a few host syncs on CUDA) in row chunks: the extra
    memory is O(positions + classes) plus a few chunks of about a million
    elements, never a copy of the input.

    Example::

        >>> x = torch.randn(8, 3).softmax(1)
        >>> crossent.diagnose(x, torch.randint(0, 3, (8,)))
        ['input rows are all in [0, 1] and sum to 1: this looks like softmax output ...']
    """
    with torch.no_grad():
        try:
            return _diagnose(input, target, weight, ignore_index, dim, target_format)
        except Exception as e:  # noqa: BLE001 - diagnose reports, it never raises
            return [f"diagnose could not read this call ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                    "check the inputs' devices and dtypes"]


def _diagnose(input, target, weight, ignore_index, dim, target_format) -> List[str]:
    swap = _swapped(input, target)
    if swap is not None:
        return [swap]
    if not isinstance(input, Tensor) or not input.dtype.is_floating_point or input.dim() == 0:
        return [f"input must be a floating tensor of logits with a class dim, got "
                f"{type(input).__name__ if not isinstance(input, Tensor) else f'{input.dtype} {_fmt(input.shape)}'}"]
    try:
        cdim = class_dim(input, dim)
    except (ValueError, TypeError) as e:
        return [str(e)]
    input = input.detach()
    shape = input.shape
    C = shape[cdim]
    pos_shape = torch.Size(shape[:cdim] + shape[cdim + 1:])
    if C == 0:
        return [f"input {_fmt(shape)} has 0 classes at dim {cdim}: there is nothing to classify"]

    findings: List[str] = []
    if C == 1:
        findings.append(f"input {_fmt(shape)} has 1 class at dim {cdim}: cross-entropy over a single class is always "
                        "0 with no gradient; for a yes/no output use "
                        "torch.nn.functional.binary_cross_entropy_with_logits, or check the class dim")
    try:
        ignore_index = check_ignore_index(ignore_index)  # NumPy integers and 0-dim tensors, as cross_entropy
    except TypeError as e:
        findings.append(str(e))
        ignore_index = -100  # read the rest of the call with the default
    bad_weight = _weight_problem(weight, C, input.device)
    if bad_weight is not None:
        findings.append(bad_weight)
    good_weight = weight if weight is not None and bad_weight is None else None

    fmt = _format(target, input, cdim, pos_shape, target_format)
    rejected = False
    if fmt != "one_hot":  # one-hot targets are validated here, chunk by chunk (normalize_target builds [N, C] masks)
        probe = target
        if fmt == "probs":  # same shape, dtype and device, no data: validation without a copy of the target
            probe = torch.zeros((), dtype=target.dtype, device=target.device).expand(target.shape)
        try:
            normalize_target(probe, input, cdim, target_format, ignore_index)
        except (ValueError, TypeError) as e:
            findings.append(str(e))
            rejected = True

    findings += _input_findings(input, cdim, C)

    findings += _class_dim_hint(shape, cdim, target)
    if fmt == "index":
        findings += _index_findings(target.detach().reshape(-1).long(), C, ignore_index, good_weight, rejected)
    elif fmt == "one_hot":
        labels, problem = _one_hot_labels(target.detach(), cdim, C, pos_shape, ignore_index)
        if problem is not None:
            findings.append(problem)
        else:
            findings += _label_findings(labels, C, ignore_index, good_weight, "one_hot")
    elif fmt == "probs":
        findings += _probs_findings(target.detach(), cdim, C, pos_shape, weight)
    elif fmt == "sparse":
        findings += _sparse_findings(target, C, ignore_index, rejected)
    return findings


def _class_dim_hint(shape: torch.Size, cdim: int, target) -> List[str]:
    """Labels beyond the class dim's size but within the last dim's: the classes are probably last."""
    if len(shape) >= 3 and cdim == 1 and shape[1] < shape[-1] and isinstance(target, Tensor) \
            and target.shape == torch.Size(shape[:1] + shape[2:]) and not target.dtype.is_floating_point \
            and target.dtype != torch.bool and target.numel() and shape[1] <= int(target.max()) < shape[-1]:
        return [f"input is {_fmt(shape)} with classes at dim 1 ({shape[1]} classes) but targets reach "
                f"{int(target.max())}: if the last dim ({shape[-1]}) holds the classes, pass dim=-1"]
    return []


def _index_findings(t: Tensor, C: int, ignore_index: int, weight: Optional[Tensor], rejected: bool) -> List[str]:
    """Class indices: padding under another value, labels past C, and the label distribution."""
    findings = []
    valid = t != ignore_index
    neg = valid & (t < 0)
    if bool(neg.any()):
        v = int(t[neg][0])
        findings.append(f"target holds {v} at {int(neg.sum())} positions but ignore_index is {ignore_index}: "
                        f"if {v} marks padding, pass ignore_index={v}")
    over = valid & (t >= C)
    if bool(over.any()) and not rejected:
        high = t[over]
        hint = (f"; if {int(high[0])} marks padding (as 255 does in segmentation masks), pass "
                f"ignore_index={int(high[0])}" if bool((high == high[0]).all()) else "")
        findings.append(f"target holds labels up to {int(high.max())} but the input has only {C} classes "
                        f"(valid labels 0..{C - 1}): check the model's output size or the label encoding" + hint)
    return findings + _label_findings(t, C, ignore_index, weight, "index")


# ---------------------------------------------------------------------------------------------------------------------
# the call's shape: swapped arguments, weight, target format


def _swapped(input, target) -> Optional[str]:
    """A finding when ``input`` looks like class indices and ``target`` like the logits."""
    if not isinstance(input, Tensor) or not isinstance(target, Tensor) or input.dtype.is_complex:
        return None
    if not target.dtype.is_floating_point or target.dim() != input.dim() + 1:
        return None
    nd = target.dim()
    dims = [d for d in range(nd) if target.shape[:d] + target.shape[d + 1:] == input.shape]
    if not dims:
        return None
    if input.dtype.is_floating_point:
        x = input.detach()
        if x.numel() == 0 or not bool((torch.isfinite(x) & (x == x.round())).all()):
            return None
        what, fix = "whole numbers", "labels.long()"
    else:
        what, fix = "integers", "labels"
    d = 1 if 1 in dims and nd > 1 else (nd - 1 if nd - 1 in dims else dims[0])
    dim_arg = "" if nd == 1 or d == 1 else f", dim={-1 if d == nd - 1 else d}"
    return (f"input is {input.dtype} {_fmt(input.shape)} holding {what} and target is {target.dtype} "
            f"{_fmt(target.shape)}, one dim larger: they look like class indices and logits; did you swap input and "
            f"target? Call cross_entropy(logits, {fix}{dim_arg}) with the logits first")


def _weight_problem(weight, C: int, device: torch.device) -> Optional[str]:
    """What :func:`crossent.cross_entropy` says about ``weight`` (None when it is fine)."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor):
        return f"weight must be a 1-D tensor of {C} class weights, got {type(weight).__name__}"
    if weight.dim() != 1 or weight.numel() != C:
        return f"weight has shape {_fmt(weight.shape)} but the input has {C} classes: pass a 1-D tensor of length {C}"
    if not weight.dtype.is_floating_point:
        return f"weight must be floating, got {weight.dtype}; use weight.float()"
    if weight.device != device:
        return f"weight is on {weight.device} but input on {device}; move it with weight.to(input.device)"
    return None


def _format(target, input: Tensor, cdim: int, pos_shape: torch.Size, target_format: str) -> Optional[str]:
    """The target's encoding when its shape, dtype and device fit one (``auto``: the rule of
    :func:`crossent.targets.normalize_target`); else None (``normalize_target`` then says what is wrong)."""
    if isinstance(target, SparseTarget):
        return "sparse" if target_format in ("auto", "sparse") else None
    if not isinstance(target, Tensor) or target.device != input.device or target.dtype.is_complex:
        return None
    if target_format == "auto":
        try:
            return _detect_format(target, input.shape, cdim)
        except (ValueError, TypeError):
            return None
    floating, is_bool = target.dtype.is_floating_point, target.dtype == torch.bool
    fits = {"index": target.shape == pos_shape and not floating and not is_bool,
            "one_hot": target.shape == input.shape, "probs": target.shape == input.shape and floating}
    return target_format if fits.get(target_format) else None


# ---------------------------------------------------------------------------------------------------------------------
# row chunks


def _row_chunks(x: Tensor) -> Iterator[Tensor]:
    """``x`` (classes last) as ``[r, C]`` pieces of about ``_CHUNK_ELEMENTS``, rows in flat position order.

    Views where the layout allows; otherwise each piece is a copy of at most one chunk."""
    if x.numel() == 0:
        return
    C = x.shape[-1]
    if x.dim() == 1:
        yield x.unsqueeze(0)
        return
    rows = max(1, _CHUNK_ELEMENTS // C)
    try:
        flat = x.view(-1, C)
    except RuntimeError:  # e.g. classes at dim 1 of [B, C, T]: step along the leading dim
        inner = math.prod(x.shape[1:-1])
        if inner <= rows:
            step = rows // inner
            for b0 in range(0, x.shape[0], step):
                yield x[b0:b0 + step].reshape(-1, C)
        else:
            for b in range(x.shape[0]):
                yield from _row_chunks(x[b])
        return
    for r0 in range(0, flat.shape[0], rows):
        yield flat[r0:r0 + rows]


def _working(c: Tensor) -> Tensor:
    """A chunk in float32 / float64 (a copy only for other dtypes)."""
    return c if c.dtype in (torch.float32, torch.float64) else c.float()


def _row(x: Tensor, r: int, pos_shape: torch.Size) -> Tensor:
    """Row ``r`` (flat position order) of ``x`` with classes last."""
    return x[_position(r, pos_shape)] if len(pos_shape) else x


def _total(parts: List[Tensor]) -> List[int]:
    """Sum each per-chunk count; one host sync."""
    return [int(v) for v in torch.stack([p.sum() if p.dim() else p for p in parts]).tolist()] if parts else []


# ---------------------------------------------------------------------------------------------------------------------
# the input


def _input_findings(input: Tensor, cdim: int, C: int) -> List[str]:
    x = input.movedim(cdim, -1)
    R = x.numel() // C
    if R == 0:
        return []
    # tolerances: rounding to the input's dtype moves a row sum by up to eps, a logsumexp by up to eps * entropy
    eps = torch.finfo(input.dtype).eps
    sum_tol, lse_tol = max(1e-3, eps), max(1e-3, eps * max(1.0, math.log(C)))
    probs = onehot = nonpos = None
    for c in _row_chunks(x):
        c = _working(c)
        mn, mx = torch.aminmax(c, dim=-1)  # NaN propagates, and fails every test below
        in01 = (mn >= 0) & (mx <= 1) & ((c.sum(-1) - 1).abs() <= sum_tol)
        one = in01 & (mx == 1) & (torch.linalg.vector_norm(c, 0, -1) == 1)
        p, o, n = in01.sum(), one.sum(), (mx <= 0).sum()
        probs, onehot, nonpos = (p, o, n) if probs is None else (probs + p, onehot + o, nonpos + n)
        del c  # before the next chunk is made: one chunk alive at a time
    probs, onehot, nonpos = _total([probs, onehot, nonpos])
    if probs == R:
        if onehot == R:
            return ["input rows are one-hot (all 0 and 1, one 1 per row): this looks like labels, not logits; "
                    "did you swap input and target?"]
        return ["input rows are all in [0, 1] and sum to 1: this looks like softmax output, but cross_entropy "
                "applies log-softmax itself; pass the raw logits (drop the softmax) or the loss trains badly"]
    if C > 1 and nonpos == R:  # a second pass, only for inputs that are all <= 0
        zero = None
        for c in _row_chunks(x):
            z = (torch.logsumexp(_working(c), -1).abs() <= lse_tol).sum()
            zero = z if zero is None else zero + z
            del c
        if _total([zero])[0] == R:
            return ["input rows look like log-softmax output (all <= 0, logsumexp 0): cross_entropy applies "
                    "log-softmax itself; the result is the same, but the extra log_softmax is wasted work"]
    return []


# ---------------------------------------------------------------------------------------------------------------------
# targets


def _label_findings(t: Tensor, C: int, ignore_index: int, weight: Optional[Tensor], source: str) -> List[str]:
    """Checks on flat int64 class indices (from index or one-hot targets)."""
    findings: List[str] = []
    if t.numel() == 0:
        return findings
    valid = t != ignore_index
    if not bool(valid.any()):
        if source == "one_hot":
            findings.append("every one-hot row is all zero, so every position is ignored: a 'mean' loss is NaN")
        else:
            findings.append(f"every position is ignored (ignore_index={ignore_index}): a 'mean' loss is NaN")
        return findings
    labels = t[valid & (t >= 0) & (t < C)]
    n = labels.numel()
    if n == 0:
        return findings
    if weight is not None and bool((weight[labels.to(weight.device)] == 0).all()):
        findings.append("every non-ignored position has a class of weight 0: a 'mean' loss is NaN")
    if C >= 4 and n >= _PREFIX_MIN_LABELS_PER_CLASS * C:
        lo, hi = (int(v) for v in torch.aminmax(labels))
        m = hi + 1
        if lo < hi and 2 * m <= C:
            findings.append(
                f"all {n} labels fall in 0..{m - 1} but the input has {C} classes: classes {m}..{C - 1} never occur "
                f"in a batch of {n / C:.3g} labels per class; if the data has {m} classes, the model's output size "
                f"(number of classes) is wrong, set it to {m}")
    return findings


def _one_hot_labels(target: Tensor, cdim: int, C: int, pos_shape: torch.Size,
                    ignore_index: int) -> Tuple[Optional[Tensor], Optional[str]]:
    """Class indices of a one-hot target (all-zero rows -> ``ignore_index``), or the rejection message.

    Chunk by chunk: nothing target-sized is built beyond the per-row results."""
    tl = target.movedim(cdim, -1)
    bad_rows, counts, classes = [], [], []
    for c in _row_chunks(tl):
        if c.dtype == torch.bool:
            bad = torch.zeros(c.shape[0], dtype=torch.bool, device=c.device)
        elif c.dtype.is_floating_point:
            bad = ((c != 0) & (c != 1)).any(-1)  # NaN included
        else:
            mn, mx = torch.aminmax(c, dim=-1)
            bad = (mn < 0) | (mx > 1)
        f = _working(c)
        bad_rows.append(bad)
        counts.append(torch.linalg.vector_norm(f, 0, -1))
        classes.append(f.argmax(-1))
        del c, f
    if not bad_rows:  # no positions: no labels
        return torch.empty(0, dtype=torch.long, device=target.device), None
    bad, count, cls = torch.cat(bad_rows), torch.cat(counts), torch.cat(classes)
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        row = _row(tl, r, pos_shape)
        j = int(((row != 0) & (row != 1)).nonzero()[0, 0])
        return None, (f"one-hot target has value {row[j].item()} at position {_position(r, pos_shape)} class {j}: "
                      "one-hot rows hold only 0 and 1; for soft labels pass a float target (probs)")
    multi = count > 1
    if bool(multi.any()):
        r = int(multi.nonzero()[0, 0])
        set_ = (_row(tl, r, pos_shape) != 0).nonzero().reshape(-1).tolist()
        return None, (f"one-hot target has {len(set_)} classes set at position {_position(r, pos_shape)} "
                      f"(classes {set_[:8]}): that is multi-label: use "
                      "torch.nn.functional.binary_cross_entropy_with_logits, "
                      "or pass a float target normalised to sum to 1 (target_format='probs')")
    return cls.masked_fill(count == 0, ignore_index), None


def _probs_findings(target: Tensor, cdim: int, C: int, pos_shape: torch.Size, weight) -> List[str]:
    tl = target.movedim(cdim, -1)
    sums, zero_rows, neg, onehot = [], [], None, None
    for c in _row_chunks(tl):
        f = _working(c)
        mn, mx = torch.aminmax(f, dim=-1)
        nz = torch.linalg.vector_norm(f, 0, -1)
        sums.append(f.sum(-1).double())
        zero_rows.append(nz == 0)
        n, o = (mn < 0).sum(), ((mn >= 0) & (mx == 1) & (nz == 1)).sum()
        neg, onehot = (n, o) if neg is None else (neg + n, onehot + o)
        del c, f
    if not sums:
        return []
    findings: List[str] = []
    R = sum(s.numel() for s in sums)
    neg, onehot = _total([neg, onehot])
    if weight is not None and onehot == R:
        findings.append(
            "the float target rows are one-hot, so they are read as probabilities (PyTorch's rule), whose "
            "weighted 'mean' divides by the number of positions, not by the summed class weights as for "
            "class indices: pass target_format='one_hot' (or target.argmax(dim)) for index semantics")
    s = torch.cat(sums)
    off = ~((s - 1).abs() <= 1e-3) & ~torch.cat(zero_rows)  # an all-zero row is an ignored position
    if bool(off.any()):
        i = int(off.nonzero()[0, 0])
        findings.append(
            f"probability targets should sum to 1 over the classes, but {int(off.sum())} rows do not "
            f"(the first, at position {_position(i, pos_shape)}, sums to {float(s[i]):.4g}): normalise them, "
            "or use index or one-hot targets")
    if neg:
        findings.append("probability targets hold negative values: probabilities are in [0, 1]")
    return findings


def _sparse_findings(target: SparseTarget, C: int, ignore_index: int, rejected: bool) -> List[str]:
    findings: List[str] = []
    idx = target.indices.detach().long()
    pad = idx == ignore_index
    out = ~pad & ((idx < 0) | (idx >= C))
    if not rejected and bool(out.any()):
        findings.append(
            f"SparseTarget index {int(idx[out][0])} is out of range for {C} classes (valid classes 0..{C - 1}, "
            f"and ignore_index={ignore_index} marks padding)")
    k = idx.shape[-1]
    v = target.values.detach().masked_fill(pad, 0).double().sum(-1).reshape(-1)
    off = ~((v - 1).abs() <= 1e-3) & ~pad.reshape(-1, k).all(-1)  # an all-padding position is ignored
    if bool(off.any()):
        findings.append(
            f"SparseTarget values should sum to 1 per position, but {int(off.sum())} positions do not "
            f"(the first sums to {float(v[int(off.nonzero()[0, 0])]):.4g}): top-k teacher probabilities "
            "are usually renormalised over the k entries")
    return findings

"""Per-position target terms shared by the fused impls (O(M k) work, never a pass over the logits)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..targets import Target


def host_reads_free(t: Tensor) -> bool:
    """Whether reading a value of ``t`` on the host costs nothing: a CPU tensor outside torch.compile
    (on CUDA it would sync; under torch.compile it would break the graph)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def sparse_terms(tgt: Target, w: Optional[Tensor], label_smoothing: float, ignore_index: int, C: int,
                 acc: torch.dtype) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(cols, vals, row_valid)`` for index and sparse targets, rows flattened.

    ``cols`` ``[M, k]`` int64 are classes (0 where padding or ignored),
    ``vals`` ``[M, k]`` the target mass there, already weighted and scaled by
    ``1 - label_smoothing`` (0 for padding and ignored positions; NaN for a
    class out of range when checks are off, so the loss shows it instead of
    hiding it). ``row_valid`` ``[M]`` is 1/0 for index targets (ignored
    positions), None for sparse targets (every position counts).
    """
    row_valid = None
    if tgt.kind == "index":
        y = tgt.index.reshape(-1, 1)
        valid = y != ignore_index
        in_range = (y >= 0) & (y < C)
        vals = valid.to(acc)
        row_valid = vals.reshape(-1)
        bad = valid & ~in_range
    else:
        k = tgt.sp_index.shape[-1]
        y = tgt.sp_index.reshape(-1, k)
        pad = y == ignore_index
        in_range = (y >= 0) & (y < C)
        vals = tgt.sp_values.reshape(-1, k).to(acc).masked_fill(pad, 0)
        bad = ~pad & ~in_range
    cols = torch.where(in_range, y, torch.zeros_like(y))
    if w is not None:
        vals = vals * w[cols]
    if label_smoothing > 0:
        vals = vals * (1 - label_smoothing)
    return cols, vals.masked_fill(bad, float("nan")), row_valid

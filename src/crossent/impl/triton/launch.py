"""How the launchers call a kernel: through :func:`torch.library.wrap_triton` inside the triton
impl's registered ops (``crossent.ops.custom``, which torch.compile traces: inductor then sees the
kernels themselves, and fake tensors never reach them), the kernel as it is on the eager path."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

_STATE = threading.local()


@contextmanager
def registered_op() -> Iterator[None]:
    """Mark the launches inside as those of a ``torch.library.triton_op`` body."""
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


def launch(kernel):
    """``kernel``, ready for ``[grid](...)``: wrapped inside a registered op (under torch.compile the
    triton impl runs only there), as it is otherwise."""
    if getattr(_STATE, "depth", 0):
        return torch.library.wrap_triton(kernel)
    return kernel


def hint(n):
    """``n`` as a plain int: a symbolic size (torch.compile with dynamic shapes) by the value it was
    traced with, without a guard. Only for choices that change speed, never a result (block sizes
    of kernels that loop over the dimension, vocabulary splits, autotune keys), so that a compiled
    graph serves every size instead of recompiling per size bucket."""
    if isinstance(n, torch.SymInt):
        node = n.node
        return int(node.hint) if node.has_hint() else 1 << 13
    return n

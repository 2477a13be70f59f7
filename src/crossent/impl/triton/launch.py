"""How the launchers call a kernel: through :func:`torch.library.wrap_triton` while the triton
impl's registered op (``crossent.ops.custom``) is traced for torch.compile, so that inductor sees
the kernel itself; the kernel as it is otherwise (no wrapper on the eager path)."""

from __future__ import annotations

import torch


def _tracing() -> bool:
    try:
        from torch._library.triton import is_wrap_triton_enabled
    except ImportError:  # older torch: no triton_op
        return False
    return is_wrap_triton_enabled() or torch.compiler.is_compiling()


def launch(kernel):
    """``kernel``, ready for ``[grid](...)``: wrapped while a trace may see it."""
    if not _tracing():
        return kernel
    return torch.library.wrap_triton(kernel)

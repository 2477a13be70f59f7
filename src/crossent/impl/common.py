"""What every fused impl shares: the result types, the accumulation dtype, host reads, gradient buffers,
the row chunks of the linear loss."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..config import CONFIG

__all__ = ["RowTerms", "LinearResult", "acc_dtype", "host_reads_free", "empty_gradient", "linear_chunk_rows",
           "chunk_bytes", "refuse_double_backward"]


class RowTerms(NamedTuple):
    """Per-position results of an impl, ``M`` positions flattened: the CE and z-loss terms (before the
    reduction), the log-sum-exp and the predicted class (None unless asked for)."""

    ce: Tensor
    z: Optional[Tensor]
    lse: Tensor
    predicted: Optional[Tensor]


class LinearResult(NamedTuple):
    """``linear_cross_entropy``'s per-position terms and the gradients formed with them (None where not asked)."""

    terms: RowTerms
    dx: Optional[Tensor]
    dw: Optional[Tensor]
    db: Optional[Tensor]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def host_reads_free(t: Tensor) -> bool:
    """Whether reading a value of ``t`` on the host costs nothing: a CPU tensor outside torch.compile
    (on CUDA it would sync; under torch.compile it would break the graph)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


_HUGE_MIN_BYTES = 64 << 20
_MADV_HUGEPAGE = 14
_LIBC = []


def empty_gradient(like: Tensor, shape: Optional[torch.Size] = None) -> Tensor:
    """A fresh buffer for a gradient the size of ``like``; on Linux CPU, large ones are advised for
    transparent huge pages: a new ``[N, C]`` buffer is first touched page by page, and with 4 KiB
    pages those faults cost as much as the softmax itself (2 MiB pages cut them 512-fold)."""
    t = torch.empty(like.shape if shape is None else shape, dtype=like.dtype, device=like.device)
    if t.device.type == "cpu" and t.numel() * t.element_size() >= _HUGE_MIN_BYTES \
            and not torch.compiler.is_compiling() and _libc() is not None:
        huge = 2 << 20
        start = (t.data_ptr() + huge - 1) // huge * huge
        end = (t.data_ptr() + t.numel() * t.element_size()) // huge * huge
        if end > start:
            _libc().madvise(start, end - start, _MADV_HUGEPAGE)
    return t


def _libc():
    if not _LIBC:
        lib = None
        try:
            import ctypes
            import sys

            if sys.platform.startswith("linux"):
                lib = ctypes.CDLL(None, use_errno=True)
                lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                lib.madvise.restype = ctypes.c_int
        except (OSError, AttributeError):
            lib = None
        _LIBC.append(lib)
    return _LIBC[0]


def chunk_bytes(device: Optional[torch.device]) -> int:
    """Bytes of float32 logits per row chunk: on CPU a tenth of what the eager computation holds at LM
    shapes, with matmuls still efficient; on CUDA GEMMs want thousands of rows, so more, at most 1/8
    of the free memory."""
    if device is None or device.type != "cuda":
        return CONFIG.linear_chunk_bytes
    if torch.compiler.is_compiling():
        return CONFIG.linear_chunk_bytes_cuda
    free, _ = torch.cuda.mem_get_info(device)
    return max(CONFIG.linear_chunk_bytes, min(CONFIG.linear_chunk_bytes_cuda, free // 8))


def linear_chunk_rows(M: int, V: int, chunk_size: Optional[int] = None, device: Optional[torch.device] = None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else what fits the device's chunk budget of float32
    logits (``chunk_bytes``), at least 32 rows (the weight-gradient update reads and writes all
    of ``[V, H]`` once per chunk, so tiny chunks would make it memory-bound)."""
    if chunk_size is not None:
        return max(1, min(int(chunk_size), max(M, 1)))
    return max(1, min(max(M, 1), max(32, chunk_bytes(device) // (4 * max(V, 1)))))


def refuse_double_backward(what: str) -> None:
    """The fused impls form their gradient in the forward: no second derivative."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"crossent: {what} computes its gradient during the forward and cannot give a second derivative "
            "(backward with create_graph=True); use impl='torch' for double backward")

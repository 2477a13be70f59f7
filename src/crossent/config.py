"""Every knob of crossent, in one place.

Knobs are read where they are used, at every call: nothing copies them into
module constants, so changing one takes effect at the next call.

* ``checks`` (env ``CROSSENT_CHECKS``, default on): value checks on targets.
  They read target values, one host synchronisation per check on CUDA; off,
  a bad value gives NaN at its position (never a device-side assert).
  :func:`set_checks` / :func:`checks` (a context manager) switch them. They
  never run while torch.compile traces or under a torch.func transform
  (:func:`value_checks`), where a bad value gives NaN in the same way.
* ``onednn`` (env ``CROSSENT_ONEDNN``, default on): CPU float32 chunk matmuls
  of ``linear_cross_entropy`` through oneDNN (AVX-512) instead of MKL.
* ``chunk_elements``: elements of logits per chunk of the chunked
  cross-entropy (sized to stay in cache).
* ``linear_chunk_bytes`` / ``linear_chunk_bytes_cuda``: bytes of float32
  logits per row chunk of the chunked ``linear_cross_entropy`` (CUDA: at most
  1/8 of the free memory too).
* ``triton_max_block``: widest class tile of the triton cross-entropy kernel.
* ``triton_linear_blocks``: ``(BM, BV, BK)`` upper bounds of the triton linear
  kernels' blocks where they are not autotuned (the interpreter).
* ``triton_fwd_splits``: force the number of vocabulary splits of the triton
  linear forward (None: from the GPU's size).
* ``triton_split_grain``: vocabulary splits are multiples of this (every
  autotuned ``BV`` divides it).
* ``triton_fwd_configs`` / ``triton_bwd_configs``: the autotuner's
  ``(BM, BV, BK, num_warps, num_stages)`` candidates for the linear kernels
  with 16-bit inputs; ``triton_fwd_configs_fp32`` / ``triton_bwd_configs_fp32``
  for float32 inputs, whose IEEE float32 dots need smaller tiles to stay in
  registers (``benchmarks/kernel_resources.py`` checks that none spills).

Tests change knobs only through :func:`override`, which restores them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator, Optional, Tuple

__all__ = ["CONFIG", "override", "set_checks", "checks_enabled", "checks", "value_checks", "triton_interpreted"]


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "no", "off", "")


@dataclass
class Config:
    checks: bool = True
    onednn: bool = True
    chunk_elements: int = 1 << 19
    linear_chunk_bytes: int = 8 << 20
    linear_chunk_bytes_cuda: int = 512 << 20
    triton_max_block: int = 8192
    triton_linear_blocks: Tuple[int, int, int] = (64, 128, 64)
    triton_fwd_splits: Optional[int] = None
    triton_split_grain: int = 256
    # none spills registers in bfloat16 / float16 on sm_80, sm_90 or sm_100, and each fits in shared
    # memory (docs/kernels.md, benchmarks/kernel_resources.py)
    triton_fwd_configs: Tuple[Tuple[int, int, int, int, int], ...] = (
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (64, 128, 64, 4, 3),
        (128, 128, 32, 8, 4))
    triton_bwd_configs: Tuple[Tuple[int, int, int, int, int], ...] = (
        (64, 128, 32, 4, 3), (64, 128, 32, 8, 3), (128, 128, 32, 8, 3), (128, 128, 32, 8, 4),
        (64, 256, 32, 8, 3))
    triton_fwd_configs_fp32: Tuple[Tuple[int, int, int, int, int], ...] = ((32, 64, 32, 4, 3), (64, 64, 16, 4, 3))
    triton_bwd_configs_fp32: Tuple[Tuple[int, int, int, int, int], ...] = (
        (32, 128, 16, 4, 3), (32, 64, 32, 4, 3), (64, 64, 16, 4, 2))


CONFIG = Config(checks=_env_flag("CROSSENT_CHECKS", True), onednn=_env_flag("CROSSENT_ONEDNN", True))


@contextmanager
def override(**knobs) -> Iterator[Config]:
    """Set knobs of :data:`CONFIG` for the duration of a ``with`` block (tests, benchmarks)."""
    names = {f.name for f in fields(Config)}
    unknown = sorted(set(knobs) - names)
    if unknown:
        raise ValueError(f"unknown crossent knob(s) {unknown}; the knobs are {sorted(names)}")
    old = {k: getattr(CONFIG, k) for k in knobs}
    for k, v in knobs.items():
        setattr(CONFIG, k, v)
    try:
        yield CONFIG
    finally:
        for k, v in old.items():
            setattr(CONFIG, k, v)


def set_checks(enabled: bool) -> bool:
    """Turn the value checks on targets on or off; returns the previous setting.

    The checks (class index out of range, multi-hot one-hot rows, NaN in
    probabilities, a ``num_items`` tensor <= 0) read values, which costs one
    host synchronisation per check on CUDA. Off, a bad value gives a NaN loss
    at its position instead of an error (never a device-side assert).
    ``CROSSENT_CHECKS=0`` in the environment turns them off at import.
    """
    if not isinstance(enabled, (bool, int)) or isinstance(enabled, int) and enabled not in (0, 1):
        raise TypeError(f"set_checks takes True or False, got {enabled!r}")
    previous = CONFIG.checks
    CONFIG.checks = bool(enabled)
    return previous


def checks_enabled() -> bool:
    """Whether value checks on targets run (see :func:`set_checks`)."""
    return CONFIG.checks


@contextmanager
def checks(enabled: bool) -> Iterator[None]:
    """``with crossent.checks(False): ...``: value checks on or off inside the block only.

    Example::

        >>> with crossent.checks(False):   # no host syncs in this training step
        ...     loss = crossent.cross_entropy(logits, labels)
    """
    previous = set_checks(enabled)
    try:
        yield
    finally:
        set_checks(previous)


def value_checks() -> bool:
    """Whether this call reads target values to check them: the ``checks`` knob, except while
    torch.compile traces or a torch.func transform (``grad``, ``vmap``, ``jacrev``, ...) runs, where
    a read of a value would break the graph or cannot be made. There, as with checks off, a bad
    value gives NaN at its position (never an error, never a device-side assert)."""
    if not CONFIG.checks:
        return False
    import torch

    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active())


def triton_interpreted() -> bool:
    """Whether triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``), read at every call.

    Triton reads the variable when a kernel is defined, so it must be set
    before crossent's kernels are first imported (the test suite sets it first).
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"

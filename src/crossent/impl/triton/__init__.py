"""Triton kernels (GPU; CPU under ``TRITON_INTERPRET=1``)."""

from .cross_entropy import cross_entropy_forward

__all__ = ["cross_entropy_forward"]

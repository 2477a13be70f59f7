"""Autograd boundary of the fused impls (the compile boundary)."""

from .cross_entropy import fused_cross_entropy, keep_graph

__all__ = ["fused_cross_entropy", "keep_graph"]

"""Autograd boundary of the fused impls (the compile boundary)."""

from .cross_entropy import fused_cross_entropy, keep_graph
from .linear import fused_linear_cross_entropy

__all__ = ["fused_cross_entropy", "fused_linear_cross_entropy", "keep_graph"]

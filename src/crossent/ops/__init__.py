"""Autograd boundary of the fused impls (eager): the Functions that run an impl's entry point in the
forward and scale the gradients it formed in the backward."""

from .cross_entropy import FusedCall, check_inplace, check_not_overwritten, fused_cross_entropy, mark_overwritten
from .linear import LinearCall, fused_linear_cross_entropy

__all__ = ["FusedCall", "LinearCall", "fused_cross_entropy", "fused_linear_cross_entropy",
           "check_inplace", "check_not_overwritten", "mark_overwritten"]

"""The triton impl (GPU; CPU under ``TRITON_INTERPRET=1``): kernels in ``kernels.py`` and
``linear_kernels.py`` (``@triton.jit`` only), launchers in ``cross_entropy.py`` and ``linear.py``.
Importing this package does not import triton: the launchers do, at their first call."""

from .cross_entropy import cross_entropy
from .linear import linear_cross_entropy

NAME = "triton"

__all__ = ["NAME", "cross_entropy", "linear_cross_entropy"]

"""crossent: a drop-in cross-entropy for PyTorch that takes every target
encoding, explains misuse, and runs fused (less memory, less time)."""

from .functional import cross_entropy, linear_cross_entropy
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss
from .diagnose import diagnose
from .config import checks, checks_enabled, set_checks
from .targets import SparseTarget

__version__ = "0.1.0"

__all__ = ["cross_entropy", "linear_cross_entropy", "CrossEntropyLoss", "LinearCrossEntropyLoss", "SparseTarget", "diagnose", "set_checks", "checks_enabled", "checks",
           "__version__"]

"""Error types that are both crossent's (``ValueError`` / ``TypeError``, with messages that name the
value, the position and the fix) and the type PyTorch raises for the same input, so that code written
for ``torch.nn.functional.cross_entropy`` (``except RuntimeError:``, ``except IndexError:``) keeps
working with crossent swapped in."""

__all__ = ["IndexValueError", "RuntimeValueError", "RuntimeTypeError", "NotImplementedTypeError"]


class IndexValueError(ValueError, IndexError):
    """A class index out of range (PyTorch: ``IndexError`` on CPU)."""


class RuntimeValueError(ValueError, RuntimeError):
    """Shapes, lengths or values PyTorch refuses with a ``RuntimeError`` (target shape, weight length,
    ``label_smoothing`` out of [0, 1], a 0-dim input)."""


class RuntimeTypeError(TypeError, RuntimeError):
    """A target of the wrong dtype for its shape (PyTorch: ``RuntimeError``)."""


class NotImplementedTypeError(TypeError, NotImplementedError):
    """Integer logits (PyTorch: ``NotImplementedError``, no kernel for the dtype)."""

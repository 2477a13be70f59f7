"""Implementations. Each computes per-position loss terms for canonical inputs
(logits viewed as ``[P, C, Q]``, a :class:`crossent.targets.Target`); none of
them knows about PyTorch's argument conventions."""

"""Implementations. Each computes per-position loss terms (and, fused, their gradients) for
canonical inputs: logits viewed as ``[P, C, Q]``, a typed target (:mod:`crossent.targets`), the
:class:`~crossent.options.Options` and the :class:`~crossent.reduction.Reduction`. None of them
knows PyTorch's argument conventions; :mod:`crossent.impl.registry` says which one runs."""

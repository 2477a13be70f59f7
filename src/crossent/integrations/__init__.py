"""Integrations of crossent with other libraries.

Each integration is a submodule imported on demand, so that crossent itself
never imports the library it integrates with:

- :mod:`crossent.integrations.transformers`: Hugging Face transformers (5.x)
  causal language models train with :func:`crossent.linear_cross_entropy`.
"""

"""Triton kernels (GPU; CPU under ``TRITON_INTERPRET=1``)."""


def cross_entropy_forward(*args, **kwargs):
    raise ValueError("impl='triton' is not available yet in this version of crossent; use impl='chunked' "
                     "(any device) or impl='auto'")

"""Triton kernels of msconv, one file per kernel family.

Importing these modules never fails: when Triton is missing, ``HAS_TRITON`` is False (set
once here, read by every kernel file) and the launchers raise an ImportError that says how
to install it.
"""
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the package works without Triton; only this backend is missing
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON"]

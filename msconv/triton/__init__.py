"""Triton kernels of msconv, one file per kernel family.

Importing these modules never fails: when Triton is missing, each sets ``HAS_TRITON = False``
and its launchers raise an ImportError that says how to install it.
"""
from .resample import HAS_TRITON

__all__ = ["HAS_TRITON"]

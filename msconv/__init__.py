"""msconv: multiscale training of convolutional networks.

Public API: the multilevel transfer operators ``restrict``, ``prolong`` and ``pyramid``,
``info()``, and the reference implementations in ``msconv.reference``.
"""
__version__ = "0.1.0"

from msconv import reference
from msconv._info import info
from msconv.ops import prolong, pyramid, restrict

__all__ = ["__version__", "info", "reference", "restrict", "prolong", "pyramid"]

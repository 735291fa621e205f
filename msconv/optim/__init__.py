"""Optimizers for the large batches of coarse levels: layer-wise trust ratios (LARS, LAMB).

- :class:`LARS` — layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017), paper form,
  with LARC clipping, Nesterov, the ``‖g + βw‖`` denominator and exclusion of parameters.
- :class:`LAMB` — Adam moments with the same layer-wise trust ratio.
- :func:`warmup_poly` — linear warm-up then γ0(1 − t/T)^power, for any optimizer.
- :func:`lars`, :func:`lamb` — the functional forms the optimizers call.
"""

from .lamb import LAMB, lamb
from .lars import LARS, lars
from .schedule import WarmupPolyLR, warmup_poly, warmup_poly_factor

__all__ = ["LARS", "LAMB", "WarmupPolyLR", "lars", "lamb", "warmup_poly", "warmup_poly_factor"]

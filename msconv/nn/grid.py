"""The grid-scale context, as ``msconv.nn.grid`` (it lives in :mod:`msconv.grid`, a leaf module the
ops and the multilevel engine import too)."""
from msconv.grid import current_grid_scale, grid_scale

__all__ = ["grid_scale", "current_grid_scale"]

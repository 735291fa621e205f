"""Layers and layer context: the grid-scale context (and, with the mesh-free issue, MFConv2d)."""
from msconv.nn.grid import current_grid_scale, grid_scale

__all__ = ["grid_scale", "current_grid_scale"]

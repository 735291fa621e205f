"""Layers and layer context: the grid-scale context, MFConv2d and convert()."""
from msconv.grid import current_grid_scale, grid_scale
from msconv.nn.mfconv import MFConv2d, UnresolvedSigmaWarning
from msconv.nn.convert import PoorFitWarning, convert

__all__ = ["grid_scale", "current_grid_scale", "MFConv2d", "convert", "UnresolvedSigmaWarning", "PoorFitWarning"]

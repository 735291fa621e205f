"""Layers and layer context: the grid-scale context, MFConv2d, convert() and bake()."""
from msconv.grid import current_grid_scale, grid_scale
from msconv.nn.mfconv import MFConv2d, UnresolvedSigmaWarning
from msconv.nn.convert import PoorFitWarning, convert
from msconv.nn.bake import bake
from msconv.nn.mfconv3d import MFConv3d

__all__ = ["grid_scale", "current_grid_scale", "MFConv2d", "MFConv3d", "convert", "bake", "UnresolvedSigmaWarning", "PoorFitWarning"]

"""msconv: multiscale training of convolutional networks.

Public API: the multilevel transfer operators ``restrict``, ``prolong`` and ``pyramid``,
``info()``, the reference implementations in ``msconv.reference``, and the large-batch
optimizers in ``msconv.optim`` (LARS, LAMB, warmup_poly), and ``load_run`` (a trained run's model,
ready to restore images).
"""
from msconv._version import __version__

from msconv import optim, reference
from msconv._info import info
from msconv.nn import current_grid_scale, grid_scale
from msconv.ops import prolong, pyramid, restrict
from msconv.multilevel import MGE, FullMultiscale, Schedule  # also binds msconv.multilevel
from msconv.nn import MFConv2d, MFConv3d, bake, convert
from msconv.ops.mfconv import mf_conv2d
from msconv import data, models, tasks  # image-restoration tasks, datasets and model zoo (msconv.train loads on demand)
from msconv.restore import load_run

__all__ = ["__version__", "info", "optim", "reference", "restrict", "prolong", "pyramid", "grid_scale", "current_grid_scale", "MFConv2d", "MFConv3d", "convert", "mf_conv2d", "multilevel", "MGE", "FullMultiscale", "Schedule", "load_run", "bake"]

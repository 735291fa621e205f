"""``bake``: freeze a model's MFConv2d (MFConv3d) layers into plain nn.Conv2d (nn.Conv3d) at one grid scale."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from msconv import reference
from msconv.nn.convert import take_over
from msconv.nn.mfconv import MFConv2d

__all__ = ["bake", "bake_layer"]


def bake_layer(layer: MFConv2d, grid_scale: float = 1.0) -> nn.Conv2d:
    """The nn.Conv2d that computes exactly what ``layer`` computes on the grid of spacing ``grid_scale``.

    Its weight ``[C_out, C_in/groups, K', K']`` is the sampled stencil
    (:func:`msconv.reference.mf_stencil`, σ floored as the layer floors it), with stride, groups,
    bias and padding_mode kept. At stride S > 1 the layer's output cell I is centred on input
    cells ``S·I … S·I+S−1``, so its window is not centred on ``S·I``: ``z = −(kmin + kmax)``
    leading zero rows/columns and the symmetric padding ``−kmin`` give nn.Conv2d's
    ``floor((H + 2p − K')/S) + 1 = ceil(H/S)`` output cells, each reading the layer's window.
    """
    if not isinstance(layer, MFConv2d):
        raise TypeError(f"bake_layer: layer must be an msconv.MFConv2d, got {type(layer).__name__}")
    sigma = float(layer.sigma.detach()) if layer.learn_sigma else layer._sigma
    weight = layer.weight.detach()
    if layer.sigma_floor is not None:
        sigma, weight = layer._floored(sigma, grid_scale)
        weight = weight.detach()
    stride = layer.stride[0]
    _, kmin = reference.mf_taps(layer.order, sigma, grid_scale, stride)
    stencil = reference.mf_stencil(weight, sigma, grid_scale, stride)  # [C_out, C_in/g, K, K]
    k = stencil.shape[-1]
    kmax = kmin + k - 1
    lead = -(kmin + kmax)  # >= 0: the output-centre shift (S − 1)/2 moves the window right
    stencil = nn.functional.pad(stencil, (lead, 0, lead, 0))
    conv = nn.Conv2d(
        layer.in_channels, layer.out_channels, k + lead, stride=stride, padding=-kmin, groups=layer.groups,
        bias=layer.bias is not None, padding_mode=layer.padding_mode, device=weight.device, dtype=weight.dtype,
    )
    take_over(conv, layer, stencil)
    return conv


def bake(model: nn.Module, grid_scale: float = 1.0) -> nn.Module:
    """A copy of ``model`` with every MFConv2d replaced by the exact nn.Conv2d of ``grid_scale``.

    The copy runs without msconv's ops (a TorchScript-, trace- and ONNX-friendly form) and
    computes what ``model`` computes under ``msconv.grid_scale(grid_scale)``, to rounding; it
    no longer adapts to other grids. ``model`` itself is not changed. A layer registered under
    several names stays one (shared) nn.Conv2d. The padding modes reflect and circular of the
    baked conv need images wider than its padding (about 4σ/s pixels), as nn.Conv2d does.

    Shapes: an MFConv2d's input ``[N, C_in, H, W]`` → ``[N, C_out, ceil(H/S), ceil(W/S)]``, as before;
    an MFConv3d becomes the nn.Conv3d (stride kept) of ``[N, C_in, D, H, W]`` → ``[N, C_out, ceil(D/S_d), …]``.

    Example::

        >>> net = nn.Sequential(msconv.MFConv2d(3, 8, 3), nn.ReLU())
        >>> fixed = msconv.nn.bake(net, grid_scale=0.5)     # the layer as it runs on a 2× finer grid
        >>> torch.jit.script(fixed)                          # plain nn.Conv2d inside
    """
    if isinstance(grid_scale, bool) or not isinstance(grid_scale, (int, float)) or not (
        math.isfinite(grid_scale) and grid_scale > 0
    ):
        raise ValueError(
            f"bake: grid_scale must be a finite number > 0 (reference pixels per pixel), got grid_scale={grid_scale!r}; "
            "1.0 is the grid the model was built for, 2.0 one level coarser"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"bake: model is a TorchScript module ({type(model).__name__}); bake the eager nn.Module, then script it"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"bake: model must be a torch.nn.Module, got {type(model).__name__}")
    from msconv.nn.mfconv3d import MFConv3d

    model = copy.deepcopy(model)
    if isinstance(model, (MFConv2d, MFConv3d)):
        return _bake_any(model, float(grid_scale))
    baked: dict[int, nn.Module] = {}
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(mod, (MFConv2d, MFConv3d)):
            continue
        if id(mod) not in baked:
            baked[id(mod)] = _bake_any(mod, float(grid_scale))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, baked[id(mod)])
    return model


def _bake_any(layer: nn.Module, grid_scale: float) -> nn.Module:
    """bake_layer for an MFConv2d; for an MFConv3d the nn.Conv3d with its sampled stencil at ``grid_scale``,
    shifted per axis for a stride as bake_layer shifts it (leading zeros, symmetric padding ``−kmin``)."""
    from msconv.grid import grid_scale as scale_context
    from msconv.nn.mfconv3d import MFConv3d

    if not isinstance(layer, MFConv3d):
        return bake_layer(layer, grid_scale)
    with torch.no_grad(), scale_context(grid_scale):
        stencil = layer.stencil()  # [C_out, C_in/g, K_d, K_h, K_w]
        _, filts, kmins = layer._filters()
    leads = [-(2 * kmin + f.shape[1] - 1) for f, kmin in zip(filts, kmins)]  # −(kmin + kmax) per axis (D, H, W)
    stencil = nn.functional.pad(stencil, (leads[2], 0, leads[1], 0, leads[0], 0))
    conv = nn.Conv3d(layer.in_channels, layer.out_channels, tuple(stencil.shape[2:]), stride=layer.stride,
                     padding=tuple(-kmin for kmin in kmins), groups=layer.groups, bias=layer.bias is not None,
                     device=stencil.device, dtype=layer.weight.dtype)
    take_over(conv, layer, stencil.to(layer.weight.dtype))
    return conv

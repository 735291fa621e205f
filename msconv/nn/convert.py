"""``convert``: swap a model's nn.Conv2d layers for MFConv2d fitted to their weights."""
from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn as nn

from msconv import reference
from msconv.nn.mfconv import DEFAULT_SIGMA_FLOOR, MFConv2d

__all__ = ["convert", "fit_mf_weight", "PoorFitWarning", "FIT_WARN_THRESHOLD"]

# Relative fit error above which convert() warns. Measured at order 2, σ = ½, 3×3 (fit error →
# relative output error on three 256² bundled photos): Gaussian 0.09 → 0.014, identity 0.10 →
# 0.14; Laplacian 0.27 → 6.1 (its response to photos is small), Sobel 0.30 → 0.17, one-pixel
# shift 0.30 → 0.27, box 0.36 → 0.10, Kaiming-random 0.46-0.58 → 0.24-0.59. 0.2 keeps the
# kernels a 2nd-order Gaussian basis represents silent and flags the rest.
FIT_WARN_THRESHOLD = 0.2


class PoorFitWarning(UserWarning):
    """convert(): a layer's mesh-free fit is far from its nn.Conv2d weights."""


def take_over(new: nn.Module, old: nn.Module, weight: torch.Tensor) -> None:
    """``new`` replaces ``old``: ``weight`` (in new's layout) and old's bias, each parameter frozen
    exactly when old's was (a frozen layer stays frozen), and old's train/eval mode."""
    with torch.no_grad():
        new.weight.copy_(weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    if old.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    new.train(old.training)


def _window_offsets(conv: nn.Conv2d) -> int | None:
    """Offset of the conv's first tap from the output position S·I, or None if not "same"-like."""
    k = conv.kernel_size[0]
    if conv.padding == "same":
        return -((k - 1) // 2)  # torch pads the short side first for even k
    if isinstance(conv.padding, tuple) and conv.padding == (k // 2, k // 2) and k % 2 == 1:
        return -(k // 2)
    return None


def _why_not(conv: nn.Conv2d) -> str | None:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} subclasses nn.Conv2d and may change its forward; left as is"
    if conv.kernel_size == (1, 1):
        return "a 1×1 conv is a pure channel mix with no spatial extent: nothing mesh-free to fit; left as is"
    if conv.dilation != (1, 1):
        return f"dilation={conv.dilation} has no mesh-free equivalent"
    if conv.kernel_size[0] != conv.kernel_size[1] or conv.stride[0] != conv.stride[1]:
        return f"non-square kernel_size={conv.kernel_size} / stride={conv.stride} (MFConv2d is isotropic)"
    if _window_offsets(conv) is None:
        return (
            f"padding={conv.padding} with kernel_size={conv.kernel_size} changes the output size; "
            "MFConv2d keeps the 'same' grid, so the model would not run unchanged"
        )
    return None


def fit_mf_weight(weight: torch.Tensor, first_offset: int, order: int, sigma: float, stride: int = 1):
    """Least-squares θ whose s = 1 stencil best matches a k×k conv weight; (θ, relative error).

    Args:
        weight: ``[C_out, C_in/g, k, k]`` (F.conv2d orientation); its tap t multiplies the input
            at offset ``first_offset + t`` from the output position ``S·I``.
    Returns:
        θ ``[C_out, C_in/g, M]`` (float64) and ``‖stencil(θ) − weight‖ / ‖weight‖`` measured on
        the union of both windows (the mesh-free stencil's tails outside k×k count as error).
    """
    k = weight.shape[-1]
    taps, kmin = reference.mf_taps(order, sigma, 1.0, stride)
    kk = taps.shape[1]
    kmax = kmin + kk - 1
    # MFC correlation entry t ↔ offset t − kmax; conv entry t ↔ offset first_offset + t.
    lo, hi = min(-kmax, first_offset), max(kk - 1 - kmax, first_offset + k - 1)
    n = hi - lo + 1
    filt = taps.flip(-1)
    basis = torch.zeros(len(reference.mf_multi_indices(order)), n, n, dtype=torch.float64)
    a0 = -kmax - lo
    for m, (a, b) in enumerate(reference.mf_multi_indices(order)):
        basis[m, a0 : a0 + kk, a0 : a0 + kk] = filt[b][:, None] * filt[a][None, :]
    target = torch.zeros(*weight.shape[:2], n, n, dtype=torch.float64)
    w0 = first_offset - lo
    target[..., w0 : w0 + k, w0 : w0 + k] = weight.detach().to("cpu", torch.float64)
    A = basis.reshape(basis.shape[0], -1).T  # [n², M]
    rhs = target.reshape(-1, n * n).T  # [n², C_out·C_in/g]
    theta = torch.linalg.lstsq(A, rhs).solution  # [M, C_out·C_in/g]
    err = torch.linalg.norm(A @ theta - rhs) / torch.linalg.norm(rhs).clamp_min(1e-300)
    return theta.T.reshape(*weight.shape[:2], -1), float(err)


def _why_not_3d(conv: nn.Conv3d) -> str | None:
    k = conv.kernel_size
    if type(conv) is not nn.Conv3d:
        return f"{type(conv).__name__} subclasses nn.Conv3d and may change its forward; left as is"
    if k == (1, 1, 1):
        return "a 1×1×1 conv is a pure channel mix with no spatial extent: nothing mesh-free to fit; left as is"
    if len(set(k)) != 1 or k[0] % 2 == 0:
        return f"kernel_size={k}: MFConv3d fits odd cubic kernels"
    if conv.dilation != (1, 1, 1) or conv.padding_mode != "zeros":
        return f"dilation={conv.dilation}, padding_mode={conv.padding_mode!r}: MFConv3d runs with zero padding, undilated"
    if conv.padding not in ("same", (k[0] // 2,) * 3):
        return f"padding={conv.padding} changes the output size; MFConv3d keeps the 'same' grid (ceil(n/stride) cells)"
    return None


def fit_mf3d_weight(weight: torch.Tensor, order: int, sigma: float, stride=(1, 1, 1)):
    """Least-squares θ ``[C_out, C_in/g, M]`` whose s = 1 MFConv3d stencil (at ``stride`` per axis (D, H, W))
    best matches a k×k×k conv weight ``[C_out, C_in/g, k, k, k]`` padded by k//2, whose tap t multiplies the
    input at offset ``t − k//2`` from ``S·I``; returns (θ float64, relative error on the union of both windows).
    At stride S the mesh-free window is centred (S − 1)/2 voxels later than the conv's, which the fit sees."""
    from msconv.nn.mfconv3d import _axis_filters, _jet_basis, mf_multi_indices_3d

    m = len(mf_multi_indices_3d(order))
    k = weight.shape[-1]
    filts, conv_at = [], []
    for st in stride:
        filt, kmin = _axis_filters(order, sigma, 1.0, st)  # entry t ↔ offset t − kmax
        kk = filt.shape[1]
        kmax = kmin + kk - 1
        lo, hi = min(-kmax, -(k // 2)), max(kk - 1 - kmax, k // 2)
        padded = torch.zeros(order + 1, hi - lo + 1, dtype=torch.float64)
        padded[:, -kmax - lo:-kmax - lo + kk] = filt
        filts.append(padded)
        conv_at.append(-(k // 2) - lo)
    A = _jet_basis(order, filts)  # [M, n_d, n_h, n_w]
    target = torch.zeros(*weight.shape[:2], *A.shape[1:], dtype=torch.float64)
    (d, h, w) = conv_at
    target[..., d:d + k, h:h + k, w:w + k] = weight.detach().to("cpu", torch.float64)
    A = A.reshape(m, -1).T
    rhs = target.reshape(-1, A.shape[0]).T
    theta = torch.linalg.lstsq(A, rhs).solution
    err = torch.linalg.norm(A @ theta - rhs) / torch.linalg.norm(rhs).clamp_min(1e-300)
    return theta.T.reshape(*weight.shape[:2], -1), float(err)


def convert(
    model: nn.Module, order: int = 2, sigma: float | None = None, inplace: bool = False,
    warn_above: float | None = FIT_WARN_THRESHOLD, sigma_floor: float | None = DEFAULT_SIGMA_FLOOR,
):
    """Replace every nn.Conv2d in ``model`` by an MFConv2d fitted by least squares (at s = 1), and every
    nn.Conv3d (odd cubic kernel, any stride, padding 'same' or k//2, zeros) by an MFConv3d fitted the same way.

    Each layer keeps its channels, stride, groups, bias and padding_mode; θ minimises the
    Frobenius distance between the sampled s = 1 stencil and the conv's weights. ``sigma``
    (reference pixels) defaults to each layer's ``kernel_size / 6``. Layers that MFConv2d cannot
    honour (dilation ≠ 1, non-square, padding that changes the output size, subclasses of
    nn.Conv2d) and 1×1 convs (a channel mix, the same on every grid) are left in place and
    reported. ``sigma_floor`` is passed to each MFConv2d (default 0.5, as there; None: off).
    Each new parameter requires grad exactly when the conv's did, so frozen layers stay frozen.
    A TorchScript module cannot be converted: convert the eager model, then script it.

    Returns ``(model, report)``: ``report`` is a list of dicts, one per nn.Conv2d found, with
    ``name``, ``converted`` (bool), ``rel_error`` (the relative fit error, None if skipped) and
    ``reason`` (why it was skipped, else ""), and ``shared_with`` (the other names under which the
    same nn.Conv2d is registered: a conv used in several places is converted once and the one
    MFConv2d takes all of its places, so the weights stay tied). ``inplace=False`` converts a
    deep copy. A :class:`PoorFitWarning` names each layer whose ``rel_error`` exceeds
    ``warn_above`` (None: never warn); such a layer computes a visibly different function.

    >>> net, report = msconv.convert(torchvision_like_model, order=2)
    >>> [(r["name"], round(r["rel_error"], 3)) for r in report if r["converted"]]
    """
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"convert: order must be an int >= 0, got order={order!r}")
    if sigma is not None and not (
        isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and math.isfinite(sigma) and sigma > 0
    ):
        raise ValueError(
            f"convert: sigma must be a finite number > 0 in reference pixels or None (kernel_size / 6 per layer), "
            f"got sigma={sigma!r}"
        )
    if warn_above is not None and not (isinstance(warn_above, (int, float)) and warn_above >= 0):
        raise ValueError(f"convert: warn_above must be a number >= 0 or None, got warn_above={warn_above!r}")
    if sigma_floor is not None and not (
        isinstance(sigma_floor, (int, float)) and not isinstance(sigma_floor, bool)
        and math.isfinite(sigma_floor) and sigma_floor > 0
    ):
        raise ValueError(
            f"convert: sigma_floor must be None (off) or a finite number > 0 in grid pixels, got "
            f"sigma_floor={sigma_floor!r}; the default {DEFAULT_SIGMA_FLOOR} uses sigma = s/2 on grids too coarse for sigma"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"convert: model is a TorchScript module ({type(model).__name__}), whose layers cannot be replaced; "
            "convert the eager nn.Module first, then script or trace the converted model"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    # Every place each conv is registered (named_modules lists a shared module only once).
    places: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, (nn.Conv2d, nn.Conv3d)):
            places.setdefault(id(mod), []).append(name)
    report, swaps = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Conv2d, nn.Conv3d)):
            continue
        shared = [p for p in places[id(mod)] if p != name]
        why = _why_not(mod) if isinstance(mod, nn.Conv2d) else _why_not_3d(mod)
        if why is not None:
            report.append({"name": name, "converted": False, "rel_error": None, "reason": why, "shared_with": shared})
            continue
        k = mod.kernel_size[0]
        sig = float(sigma) if sigma is not None else k / 6.0
        if not torch.isfinite(mod.weight).all():
            raise ValueError(
                f"convert: layer {name or '<model>'!r} has non-finite weights (NaN or inf); a least-squares fit "
                "of them would be NaN. Load trained weights or re-initialise the layer first"
            )
        if isinstance(mod, nn.Conv3d):
            from msconv.nn.mfconv3d import MFConv3d

            theta, err = fit_mf3d_weight(mod.weight, order, sig, mod.stride)
            new = MFConv3d(mod.in_channels, mod.out_channels, k, mod.stride, groups=mod.groups,
                           bias=mod.bias is not None, device=mod.weight.device, dtype=mod.weight.dtype, order=order,
                           sigma=sig, sigma_floor=sigma_floor)
        else:
            theta, err = fit_mf_weight(mod.weight, _window_offsets(mod), order, sig, mod.stride[0])
            new = MFConv2d(
                mod.in_channels, mod.out_channels, k, mod.stride[0], groups=mod.groups, bias=mod.bias is not None,
                padding_mode=mod.padding_mode, device=mod.weight.device, dtype=mod.weight.dtype, order=order,
                sigma=sig, sigma_floor=sigma_floor,
            )
        take_over(new, mod, theta)
        swaps += [(place, new) for place in places[id(mod)]]
        report.append({"name": name, "converted": True, "rel_error": err, "reason": "", "shared_with": shared})
        if warn_above is not None and err > warn_above:
            warnings.warn(
                f"convert: layer {name or '<model>'!r} ({mod.in_channels}->{mod.out_channels}, kernel_size={k}) fits "
                f"with relative error {err:.2f} > {warn_above:g} (order={order}, sigma={sig:g}): the MFConv2d computes "
                "a visibly different function. Fine-tune after converting, or raise order (or adjust sigma) for a "
                "closer fit; warn_above=None silences this",
                PoorFitWarning, stacklevel=2,
            )
    for name, new in swaps:
        if name == "":
            model = new
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model, report

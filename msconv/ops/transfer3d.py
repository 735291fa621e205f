"""Transfer operators for volumes (N, C, D, H, W): ``restrict3d``, ``prolong3d``, ``pyramid3d``.

One rule for every axis, so the same code serves isotropic coarsening
(``factors=(2, 2, 2)``, 8 fine voxels per coarse voxel) and anisotropic coarsening (e.g.
``(1, 2, 2)``: in-plane only, for thick-slice scans whose slice axis must stay as it is):

* restriction ``average``: the mean over each 2-cell block of every coarsened axis (an odd length
  is first padded by repeating its last cell, as the 2-D operators do: output ``ceil(n / 2)``);
  ``nearest``: the first cell of each block;
* prolongation ``linear`` (cell-centred; equals ``F.interpolate(mode="trilinear",
  align_corners=False)``) and ``nearest`` (each coarse cell repeated); ``size`` gives the exact fine
  size when it was odd.

Built on torch's own 3-D pooling and interpolation (autograd to any order, ``torch.compile``-able,
every device torch supports); the identities they must satisfy are tested in float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from msconv.ops._common import FLOAT_DTYPES

__all__ = ["restrict3d", "prolong3d", "pyramid3d", "RESTRICT3D_KINDS", "PROLONG3D_KINDS"]

RESTRICT3D_KINDS = ("average", "nearest")
PROLONG3D_KINDS = ("linear", "nearest")


def _check(x, op: str, factors) -> tuple[int, int, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor of shape (N, C, D, H, W), got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"{op}: x must have 5 dimensions (N, C, D, H, W), got x.shape={tuple(x.shape)}; add "
                         "batch/channel dimensions with x[None, None]")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be a floating tensor, got x.dtype={x.dtype}; convert with x.float()")
    f = tuple(factors) if isinstance(factors, (tuple, list)) else None
    if f is None or len(f) != 3 or any(v not in (1, 2) or isinstance(v, bool) for v in f):
        raise ValueError(f"{op}: factors must be three of 1 (keep the axis) or 2 (coarsen it), for (D, H, W); got "
                         f"factors={factors!r}, e.g. (2, 2, 2) or (1, 2, 2) for in-plane coarsening")
    return f


def _levels(levels, op: str) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
        raise ValueError(f"{op}: levels must be an int >= 0, got levels={levels!r}")
    return levels


def _restrict_once(x: torch.Tensor, kind: str, f: tuple[int, int, int]) -> torch.Tensor:
    if kind == "nearest":
        return x[:, :, :: f[0], :: f[1], :: f[2]]
    # Odd coarsened lengths: repeat the last cell (output ceil(n / 2)), then torch's own 3-D pooling.
    pad = [0, 0, 0, 0, 0, 0]
    for a in range(3):
        if f[a] == 2 and x.shape[2 + a] % 2:
            pad[2 * (2 - a) + 1] = 1
    if any(pad):
        x = F.pad(x, pad, mode="replicate")
    if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":  # no CPU avg_pool3d for them
        return F.avg_pool3d(x.float(), f).to(x.dtype)
    return F.avg_pool3d(x, f)


def restrict3d(x: torch.Tensor, kind: str = "average", levels: int = 1, factors=(2, 2, 2)) -> torch.Tensor:
    """Restrict (N, C, D, H, W) ``levels`` times; each coarsened axis of length n becomes ceil(n / 2).

    >>> restrict3d(torch.ones(1, 1, 5, 8, 8)).shape
    torch.Size([1, 1, 3, 4, 4])
    """
    f = _check(x, "restrict3d", factors)
    if kind not in RESTRICT3D_KINDS:
        raise ValueError(f"restrict3d: unknown kind={kind!r}; use one of {RESTRICT3D_KINDS}")
    for _ in range(_levels(levels, "restrict3d")):
        if any(x.shape[2 + a] < 2 for a in range(3) if f[a] == 2):
            raise ValueError(f"restrict3d: x.shape={tuple(x.shape)} cannot be coarsened {levels} time(s) along the "
                             f"axes of factors={f} (each needs >= 2 cells); use fewer levels")
        x = _restrict_once(x, kind, f)
    return x


def pyramid3d(x: torch.Tensor, levels: int, kind: str = "average", factors=(2, 2, 2)) -> list[torch.Tensor]:
    """``[x, R x, …, R^levels x]`` by chained :func:`restrict3d`."""
    out = [x]
    for _ in range(_levels(levels, "pyramid3d")):
        out.append(restrict3d(out[-1], kind, 1, factors))
    return out


def prolong3d(x: torch.Tensor, kind: str = "linear", levels: int = 1, size=None, factors=(2, 2, 2)) -> torch.Tensor:
    """Prolong (N, C, d, h, w) ``levels`` times: each refined axis doubles, or reaches ``size`` (the fine
    grid's (D, H, W), which must restrict to x's size).

    >>> prolong3d(torch.ones(1, 1, 3, 4, 4), size=(5, 8, 8)).shape
    torch.Size([1, 1, 5, 8, 8])
    """
    f = _check(x, "prolong3d", factors)
    if kind not in PROLONG3D_KINDS:
        raise ValueError(f"prolong3d: unknown kind={kind!r}; use one of {PROLONG3D_KINDS}")
    levels = _levels(levels, "prolong3d")
    coarse = tuple(x.shape[2:])
    if size is None:
        size = tuple(n << levels if f[a] == 2 else n for a, n in enumerate(coarse))
    if not (isinstance(size, (tuple, list, torch.Size)) and len(size) == 3 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ValueError(f"prolong3d: size must be three positive ints (D, H, W), got size={size!r}")
    expect = tuple(-(-s // (1 << levels)) if f[a] == 2 else s for a, s in enumerate(size))
    if expect != coarse:
        raise ValueError(f"prolong3d: size={tuple(size)} does not fit x.shape={tuple(x.shape)} with levels={levels} "
                         f"and factors={f}: it restricts to {expect}; pass the fine grid's size or size=None")
    mode = {"linear": "trilinear", "nearest": "nearest"}[kind]
    for k in range(levels - 1, -1, -1):
        # A factor of 1 is the identity for both modes (align_corners=False maps cell centres onto themselves).
        x = F.interpolate(x, scale_factor=tuple(float(v) for v in f), mode=mode,
                          **({"align_corners": False} if mode == "trilinear" else {}))
        x = x[:, :, : -(-size[0] // (1 << k)) if f[0] == 2 else None, : -(-size[1] // (1 << k)) if f[1] == 2 else None,
              : -(-size[2] // (1 << k)) if f[2] == 2 else None]
    return x


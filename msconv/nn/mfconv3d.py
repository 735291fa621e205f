"""MFConv3d: the mesh-free convolution for volumes, a drop-in for ``nn.Conv3d`` (stride 1, 'same').

The kernel is a linear differential operator of order <= p applied after Gaussian smoothing of
width σ reference voxels: ``K = Σ_{a+b+c<=p} θ_abc ∂w^a ∂h^b ∂d^c G_σ``, with the
(p+1)(p+2)(p+3)/6 Gaussian-derivative jets as its basis. On a grid whose voxels measure
``spacing · s`` reference voxels along (D, H, W) (``s = msconv.current_grid_scale()``; ``spacing``
the physical voxel size, e.g. (3, 1, 1) for 3 mm slices of 1 mm pixels) it is sampled by
cell-integrated separable taps per axis, so the same layer is the same operator on every grid, and
on anisotropic voxels. With the σ floor (default 0.5, as MFConv2d) an axis whose voxels are too
coarse for σ (σ < f·s_axis) uses σ_axis = f·s_axis and rescales θ, so that grid applies the
finest resolved grid's stencil in its own voxels.

Computed as one ``F.conv3d`` with the sampled dense stencil (plain PyTorch: autograd, autocast and
``torch.compile`` apply as to any conv).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from msconv import reference
from msconv.grid import current_grid_scale
from msconv.nn.mfconv import DEFAULT_SIGMA_FLOOR

__all__ = ["MFConv3d", "mf_multi_indices_3d", "mf_stencil_3d"]


def mf_multi_indices_3d(order: int) -> list[tuple[int, int, int]]:
    """The (a, b, c) derivative orders along (W, H, D) of the jets, by total degree; (p+1)(p+2)(p+3)/6 of them."""
    return [(d - b - c, b, c) for d in range(order + 1) for c in range(d + 1) for b in range(d - c + 1)]


def mf_stencil_3d(theta: torch.Tensor, sigmas: tuple, scales: tuple) -> torch.Tensor:
    """Dense stencil ``[C_out, C_in/g, K_d, K_h, K_w]`` (a correlation, for ``F.conv3d``) of coefficients θ
    ``[C_out, C_in/g, M]`` with σ and grid spacing per axis (D, H, W). Differentiable in θ."""
    order = _order_of(theta.shape[-1])
    filt = [reference.mf_taps(order, sg, sc)[0].flip(-1).to(theta.device) for sg, sc in zip(sigmas, scales)]
    fd, fh, fw = filt
    basis = torch.stack([fd[c][:, None, None] * fh[b][None, :, None] * fw[a][None, None, :]
                         for a, b, c in mf_multi_indices_3d(order)])
    return torch.einsum("ocm,mdhw->ocdhw", theta.to(torch.float64), basis).to(theta.dtype)


def _order_of(m: int) -> int:
    p = 0
    while (p + 1) * (p + 2) * (p + 3) // 6 < m:
        p += 1
    if (p + 1) * (p + 2) * (p + 3) // 6 != m:
        raise ValueError(f"MFConv3d: {m} coefficients is not (p+1)(p+2)(p+3)/6 for any order p")
    return p


def _triple(v, name: str) -> tuple:
    t = tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)
    if len(t) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                              for x in t):
        raise ValueError(f"MFConv3d: {name} must be a number > 0 or three of them (D, H, W), got {name}={v!r}")
    return tuple(float(x) for x in t)


class MFConv3d(nn.Module):
    """Mesh-free 3-D convolution. Shapes: (N, C_in, D, H, W) -> (N, C_out, D, H, W).

    Args (as ``nn.Conv3d`` where they exist): in_channels, out_channels, kernel_size (sets the default
    σ = kernel_size/6 reference voxels), bias, groups; ``order`` p; ``sigma``; ``spacing`` the voxel size
    in reference units along (D, H, W); ``sigma_floor`` (None: the fixed σ on every grid).

    >>> conv = MFConv3d(1, 8, 3)
    >>> conv(torch.rand(2, 1, 16, 16, 16)).shape
    torch.Size([2, 8, 16, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding="same",
                 bias: bool = True, groups: int = 1, order: int = 2, sigma: float | None = None, spacing=1.0,
                 sigma_floor: float | None = DEFAULT_SIGMA_FLOOR, device=None, dtype=None) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MFConv3d: {name} must be an int >= 1, got {name}={v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"MFConv3d: in_channels={in_channels} and out_channels={out_channels} must be divisible "
                             f"by groups={groups}")
        if stride not in (1, (1, 1, 1)) or padding not in ("same", kernel_size // 2, (kernel_size // 2,) * 3):
            raise ValueError(f"MFConv3d: only stride=1 with 'same' padding is supported (got stride={stride!r}, "
                             f"padding={padding!r}); coarsen with msconv.ops.restrict3d between layers")
        if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= 6:
            raise ValueError(f"MFConv3d: order must be an int in [0, 6], got order={order!r}")
        if sigma_floor is not None and not (isinstance(sigma_floor, (int, float)) and sigma_floor > 0):
            raise ValueError(f"MFConv3d: sigma_floor must be > 0 or None (off), got sigma_floor={sigma_floor!r}")
        self.in_channels, self.out_channels, self.groups, self.order = in_channels, out_channels, groups, order
        self.kernel_size = kernel_size
        self.sigma = float(sigma) if sigma is not None else kernel_size / 6
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"MFConv3d: sigma must be > 0 reference voxels, got sigma={sigma!r}")
        self.spacing = _triple(spacing, "spacing")
        self.sigma_floor = sigma_floor
        m = len(mf_multi_indices_3d(order))
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, m, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv3d's output variance for a white-noise input on the reference grid: θ_m ~ U(±√(3 v_m)),
        v_m = 1 / (3 · fan_in · M · G_m), G_m the energy of basis stencil m at s = 1."""
        fan = self.in_channels // self.groups
        one = torch.eye(len(mf_multi_indices_3d(self.order)), dtype=torch.float64)[None]  # each basis stencil alone
        energy = mf_stencil_3d(one, (self.sigma,) * 3, (1.0,) * 3)[0].pow(2).sum(dim=(1, 2, 3))
        bound = torch.sqrt(1.0 / (fan * one.shape[-1] * energy))
        with torch.no_grad():
            if self.weight.device.type != "meta":
                u = torch.rand(self.weight.shape, dtype=torch.float64) * 2 - 1
                self.weight.copy_((u * bound).to(self.weight.dtype))
            if self.bias is not None:
                nn.init.uniform_(self.bias, -1 / math.sqrt(fan * self.kernel_size ** 3),
                                 1 / math.sqrt(fan * self.kernel_size ** 3))

    def scales(self) -> tuple:
        """The voxel size of the current grid along (D, H, W), in reference units."""
        s = current_grid_scale()
        return tuple(sp * s for sp in self.spacing)

    def stencil(self) -> torch.Tensor:
        """The dense sampled stencil on the current grid (σ floor applied)."""
        scales = self.scales()
        sigmas, weight = [self.sigma] * 3, self.weight
        if self.sigma_floor is not None:
            sigmas = [max(self.sigma, self.sigma_floor * s) for s in scales]
            if sigmas != [self.sigma] * 3:
                ratio = [sg / self.sigma for sg in sigmas]  # (D, H, W)
                powers = torch.tensor([ratio[2] ** a * ratio[1] ** b * ratio[0] ** c
                                       for a, b, c in mf_multi_indices_3d(self.order)], dtype=weight.dtype,
                                      device=weight.device)
                weight = weight * powers
        return mf_stencil_3d(weight, tuple(sigmas), scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"MFConv3d: x must be (N, {self.in_channels}, D, H, W), got x.shape={tuple(x.shape)}")
        w = self.stencil()
        if x.device.type != "meta":
            w = w.to(x.dtype)
        pad = tuple(k // 2 for k in w.shape[2:])
        return F.conv3d(x, w, None if self.bias is None else self.bias.to(w.dtype), padding=pad, groups=self.groups)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, order={self.order}, sigma={self.sigma:g}"
        if self.spacing != (1.0, 1.0, 1.0):
            s += f", spacing={self.spacing}"
        if self.sigma_floor != DEFAULT_SIGMA_FLOOR:
            s += f", sigma_floor={self.sigma_floor}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s

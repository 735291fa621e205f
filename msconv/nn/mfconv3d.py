"""MFConv3d: the mesh-free convolution for volumes, a drop-in for ``nn.Conv3d`` ('same' padding, any stride).

The kernel is a linear differential operator of order <= p applied after Gaussian smoothing of
width σ reference voxels: ``K = Σ_{a+b+c<=p} θ_abc ∂w^a ∂h^b ∂d^c G_σ``, with the
(p+1)(p+2)(p+3)/6 Gaussian-derivative jets as its basis. On a grid whose voxels measure
``spacing · s`` reference voxels along (D, H, W) (``s = msconv.current_grid_scale()``; ``spacing``
the physical voxel size, e.g. (3, 1, 1) for 3 mm slices of 1 mm pixels) it is sampled by
cell-integrated separable taps per axis, so the same layer is the same operator on every grid, and
on anisotropic voxels. With the σ floor (default 0.5, as MFConv2d) an axis whose voxels are too
coarse for σ (σ < f·s_axis) uses σ_axis = f·s_axis and rescales θ, so that grid applies the
finest resolved grid's stencil in its own voxels.

Two paths compute the same operator in plain PyTorch (autograd, autocast and ``torch.compile``
apply as to any conv): ``dense``, one ``F.conv3d`` with the sampled K_d×K_h×K_w stencil, and
``separable``, the jets (three 1-D passes per input channel) then a 1×1×1 channel mix, whose cost
grows like K instead of K³; ``auto`` takes the cheaper by a cost model.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from msconv import reference
from msconv.grid import current_grid_scale
from msconv.nn.mfconv import DEFAULT_SIGMA_FLOOR

__all__ = ["MFConv3d", "mf_multi_indices_3d", "mf_stencil_3d", "METHODS_3D"]

METHODS_3D = ("auto", "dense", "separable")

# Relative time per multiply-add, 1 = the float32 dense stencil conv (mkldnn). The separable jets run
# as depthwise 1-D convs, which PyTorch's CPU backend computes far below GEMM speed; other dtypes
# (float64) take the dense conv off mkldnn onto an unfolding path that is slower still per
# multiply-add and holds C_in·K³ values per output voxel. Fitted to paired single-thread timings of
# both paths (bench/bench_mfconv3d.py).
_EFF = {"dense": 1.0, "dense_unfolded": 40.0, "jets": 120.0, "mix": 3.0}


def mf_multi_indices_3d(order: int) -> list[tuple[int, int, int]]:
    """The (a, b, c) derivative orders along (W, H, D) of the jets, by total degree; (p+1)(p+2)(p+3)/6 of them."""
    return [(d - b - c, b, c) for d in range(order + 1) for c in range(d + 1) for b in range(d - c + 1)]


# Correlation filters per (order, σ, spacing, stride) of one axis. They depend on Python floats only,
# never on a parameter, so a hit is always the value a fresh computation would give.
_FILTER_CACHE: dict = {}


def _axis_filters(order: int, sigma: float, scale: float, stride: int) -> tuple[torch.Tensor, int]:
    """(float64 CPU correlation filters ``[order + 1, K]``, kmin) of one axis: ``mf_taps`` flipped, so that
    after the padding of :func:`msconv.reference.mf_padding` output cell I reads padded entries S·I … S·I+K−1."""
    if torch.compiler.is_compiling():  # dynamo traces the computation instead of a dict lookup
        taps, kmin = reference.mf_taps(order, sigma, scale, stride)
        return taps.flip(-1), kmin
    key = (order, float(sigma), float(scale), int(stride))
    hit = _FILTER_CACHE.get(key)
    if hit is None:
        if len(_FILTER_CACHE) > 256:
            _FILTER_CACHE.clear()
        taps, kmin = reference.mf_taps(order, sigma, scale, stride)
        hit = _FILTER_CACHE[key] = (taps.flip(-1), kmin)
    return hit


def _jet_basis(order: int, filts) -> torch.Tensor:
    """``[M, K_d, K_h, K_w]``: the dense stencil of each jet from the per-axis filters (D, H, W) ``[order+1, K]``."""
    fd, fh, fw = filts
    return torch.stack([fd[c][:, None, None] * fh[b][None, :, None] * fw[a][None, None, :]
                        for a, b, c in mf_multi_indices_3d(order)])


def mf_stencil_3d(theta: torch.Tensor, sigmas: tuple, scales: tuple, strides: tuple = (1, 1, 1)) -> torch.Tensor:
    """Dense stencil ``[C_out, C_in/g, K_d, K_h, K_w]`` (a correlation, for ``F.conv3d`` after the padding of
    :func:`msconv.reference.mf_padding` per axis) of coefficients θ ``[C_out, C_in/g, M]``, with σ, grid
    spacing and stride per axis (D, H, W). Differentiable in θ."""
    order = _order_of(theta.shape[-1])
    filts = [_axis_filters(order, sg, sc, st)[0] for sg, sc, st in zip(sigmas, scales, strides)]
    basis = _jet_basis(order, filts).to(theta.device)
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


def _int_triple(v, name: str) -> tuple:
    t = tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)
    if len(t) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in t):
        raise ValueError(f"MFConv3d: {name} must be an int >= 1 or three of them (D, H, W), got {name}={v!r}")
    return t


def _jets_3d(xp: torch.Tensor, filts, order: int, strides: tuple) -> torch.Tensor:
    """The jets of a padded volume ``[N, C, D_p, H_p, W_p]`` → ``[N, C·M, D_o, H_o, W_o]``, channel c·M + m
    holding jet ``mf_multi_indices_3d(order)[m]`` of input channel c: one pass per axis, each jet of a pass
    computed once and shared by the jets of higher order along the later axes."""
    n, c = xp.shape[:2]
    fd, fh, fw = (f.to(device=xp.device, dtype=xp.dtype) for f in filts)
    idx = mf_multi_indices_3d(order)
    sd, sh, sw = strides
    v = F.conv3d(xp.reshape(n * c, 1, *xp.shape[2:]), fd[:, None, :, None, None], stride=(sd, 1, 1))
    pairs = sorted({(dc, b) for _, b, dc in idx})  # (order along D, order along H) the W pass needs
    v = F.conv3d(v[:, [dc for dc, _ in pairs]], torch.stack([fh[b] for _, b in pairs])[:, None, None, :, None],
                 stride=(1, sh, 1), groups=len(pairs))
    where = {pair: i for i, pair in enumerate(pairs)}
    v = F.conv3d(v[:, [where[(dc, b)] for _, b, dc in idx]],
                 torch.stack([fw[a] for a, _, _ in idx])[:, None, None, None, :], stride=(1, 1, sw), groups=len(idx))
    return v.reshape(n, c * len(idx), *v.shape[2:])


class MFConv3d(nn.Module):
    """Mesh-free 3-D convolution, a drop-in for ``nn.Conv3d`` with an odd kernel and 'same'-like padding.

    Arguments are nn.Conv3d's, in its order; the differences:

    * ``kernel_size`` only chooses the default ``sigma = kernel_size / 6`` reference voxels; the stencil
      actually sampled has radius ``ceil(4σ/s_axis + ½)`` voxels per axis.
    * ``padding`` is ``'same'`` or ``kernel_size // 2`` (what nn.Conv3d needs for ``ceil(n/S)`` outputs),
      always zeros, on the cell-centred grid.
    * ``stride`` S (an int or one per axis (D, H, W)) gives ``ceil(n/S)`` output cells of spacing ``S·s``,
      each centred on its block of S input cells (half a voxel off nn.Conv3d's sample points for S = 2):
      the grid :func:`msconv.ops.restrict3d` produces.
    * ``dilation`` must be 1.

    Keyword-only: ``order`` p, ``sigma``, ``spacing`` the voxel size in reference units along (D, H, W),
    ``sigma_floor`` (None: the fixed σ on every grid), ``method`` (``auto``, ``dense``, ``separable``).

    Shapes: input ``[N, C_in, D, H, W]``, output ``[N, C_out, ceil(D/S_d), ceil(H/S_h), ceil(W/S_w)]``,
    weight ``[C_out, C_in/groups, M]`` with M = (p+1)(p+2)(p+3)/6, bias ``[C_out]``.

    >>> conv = MFConv3d(1, 8, 3)
    >>> conv(torch.rand(2, 1, 16, 16, 16)).shape
    torch.Size([2, 8, 16, 16, 16])
    >>> MFConv3d(1, 8, 3, stride=2, padding=1)(torch.rand(2, 1, 15, 16, 16)).shape
    torch.Size([2, 8, 8, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride=1, padding="same",
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None,
                 dtype=None, *, order: int = 2, sigma: float | None = None, spacing=1.0,
                 sigma_floor: float | None = DEFAULT_SIGMA_FLOOR, method: str = "auto") -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups),
                        ("kernel_size", kernel_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MFConv3d: {name} must be an int >= 1, got {name}={v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"MFConv3d: in_channels={in_channels} and out_channels={out_channels} must be divisible "
                             f"by groups={groups}")
        self.stride = _int_triple(stride, "stride")
        if padding != "same" and (kernel_size % 2 == 0 or padding not in (kernel_size // 2, (kernel_size // 2,) * 3)):
            raise ValueError(f"MFConv3d: padding={padding!r} is not supported: MFConv3d keeps the cell-centred 'same' "
                             f"grid (ceil(n/stride) output cells); pass padding='same' (or kernel_size//2 = "
                             f"{kernel_size // 2} for an odd kernel_size)")
        if _int_triple(dilation, "dilation") != (1, 1, 1):
            raise ValueError(f"MFConv3d: dilation={dilation!r} cannot be honoured: a mesh-free kernel is a smooth "
                             "function sampled on the grid, it has no holes; use dilation=1 and a larger sigma")
        if padding_mode != "zeros":
            raise ValueError(f"MFConv3d: padding_mode={padding_mode!r} is not supported; use 'zeros'")
        if method not in METHODS_3D:
            raise ValueError(f"MFConv3d: unknown method={method!r}; use one of {METHODS_3D}")
        if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= 6:
            raise ValueError(f"MFConv3d: order must be an int in [0, 6], got order={order!r}")
        if sigma_floor is not None and not (isinstance(sigma_floor, (int, float)) and sigma_floor > 0):
            raise ValueError(f"MFConv3d: sigma_floor must be > 0 or None (off), got sigma_floor={sigma_floor!r}")
        self.in_channels, self.out_channels, self.groups, self.order = in_channels, out_channels, groups, order
        self.kernel_size, self.padding, self.method = kernel_size, padding, method
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

    def _floored(self, scales: tuple) -> tuple[tuple, torch.Tensor]:
        """(σ per axis (D, H, W), θ rescaled for it) on a grid of these voxel sizes: with the floor f,
        ``σ_axis = max(σ, f·s_axis)`` and jet (a, b, c) is weighted by ``Π (σ_axis/σ)^order`` (see MFConv2d)."""
        sigmas, weight = (self.sigma,) * 3, self.weight
        if self.sigma_floor is not None:
            sigmas = tuple(max(self.sigma, self.sigma_floor * s) for s in scales)
            if sigmas != (self.sigma,) * 3:
                ratio = [sg / self.sigma for sg in sigmas]  # (D, H, W)
                powers = torch.tensor([ratio[2] ** a * ratio[1] ** b * ratio[0] ** c
                                       for a, b, c in mf_multi_indices_3d(self.order)], dtype=weight.dtype,
                                      device=weight.device)
                weight = weight * powers
        return sigmas, weight

    def _filters(self) -> tuple[tuple, list, list]:
        """(θ rescaled by the σ floor, per-axis filters ``[p+1, K]``, per-axis kmin) on the current grid."""
        scales = self.scales()
        sigmas, weight = self._floored(scales)
        fk = [_axis_filters(self.order, sg, sc, st) for sg, sc, st in zip(sigmas, scales, self.stride)]
        return weight, [f for f, _ in fk], [k for _, k in fk]

    def stencil(self) -> torch.Tensor:
        """The dense sampled stencil ``[C_out, C_in/g, K_d, K_h, K_w]`` on the current grid (σ floor applied):
        output cell I reads input cells ``S·I − kmax … S·I − kmin`` per axis (:func:`mf_stencil_3d`)."""
        scales = self.scales()
        sigmas, weight = self._floored(scales)
        return mf_stencil_3d(weight, sigmas, scales, self.stride)

    def _pick(self, x: torch.Tensor, ks: list) -> str:
        """``method``, or for ``auto`` the path of the smaller modelled cost (:data:`_EFF`)."""
        if self.method != "auto":
            return self.method
        n, c_in = x.shape[:2]
        out = [-(-d // s) for d, s in zip(x.shape[2:], self.stride)]
        vox = n * out[0] * out[1] * out[2]
        mix = vox * self.out_channels * (c_in // self.groups)
        m = len(mf_multi_indices_3d(self.order))
        pairs = (self.order + 1) * (self.order + 2) // 2
        padded = [s * (o - 1) + k for s, o, k in zip(self.stride, out, ks)]
        jets = n * c_in * ((self.order + 1) * ks[0] * out[0] * padded[1] * padded[2]
                           + pairs * ks[1] * out[0] * out[1] * padded[2] + m * ks[2] * vox // n)
        dense = mix * ks[0] * ks[1] * ks[2] * _EFF["dense" if x.dtype == torch.float32 else "dense_unfolded"]
        return "dense" if dense <= jets * _EFF["jets"] + mix * m * _EFF["mix"] else "separable"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C_in, D, H, W]`` on the grid of ``current_grid_scale()`` → ``[N, C_out, ceil(D/S), …]``."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"MFConv3d: x must be (N, {self.in_channels}, D, H, W), got x.shape={tuple(x.shape)}")
        weight, filts, kmins = self._filters()
        ks = [f.shape[1] for f in filts]
        pads = [reference.mf_padding(n, kmin, k, s) for n, kmin, k, s in zip(x.shape[2:], kmins, ks, self.stride)]
        dtype = x.dtype if x.device.type != "meta" else weight.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        flat = tuple(p for pair in reversed(pads) for p in pair)  # F.pad order: W, H, D
        if self._pick(x, ks) == "separable":
            jets = _jets_3d(F.pad(x, flat), filts, self.order, self.stride)
            mix = weight.to(dtype).reshape(self.out_channels, -1, 1, 1, 1)
            return F.conv3d(jets, mix, bias, groups=self.groups)
        basis = _jet_basis(self.order, filts).to(weight.device)
        w = torch.einsum("ocm,mdhw->ocdhw", weight.to(torch.float64), basis).to(dtype)
        if all(lo == hi >= 0 for lo, hi in pads):  # stride 1, or an even size at stride 2: no copy of x
            return F.conv3d(x, w, bias, stride=self.stride, padding=tuple(lo for lo, _ in pads), groups=self.groups)
        return F.conv3d(F.pad(x, flat), w, bias, stride=self.stride, groups=self.groups)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        if self.stride != (1, 1, 1):
            s += f", stride={self.stride}"
        s += f", order={self.order}, sigma={self.sigma:g}"
        if self.spacing != (1.0, 1.0, 1.0):
            s += f", spacing={self.spacing}"
        if self.sigma_floor != DEFAULT_SIGMA_FLOOR:
            s += f", sigma_floor={self.sigma_floor}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.method != "auto":
            s += f", method={self.method!r}"
        return s

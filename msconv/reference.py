"""Plain-PyTorch ground truth for every msconv op: the spec in executable form.

Grid conventions (SPEC §1). Pixels are cells; coarse cell ``I`` covers fine cells ``2I`` and
``2I+1`` in each dimension. One level halves each dimension, rounding up:
``H_coarse = ceil(H / 2)``.

Boundary and odd-size rule (restriction). The fine field is extended by *edge replication*:
first to even size, then as far as a stencil reaches past the border. Every restriction
therefore preserves constants everywhere, odd sizes included.

Boundary and odd-size rule (prolongation). A coarse field of size ``h`` prolongs to ``2h``;
``size=`` asks for a fine size ``H`` with ``ceil(H / 2) == h`` and the last row/column of the
``2h`` result is cropped when ``H`` is odd. ``bilinear`` is cell-centred with clamped
(replicated) borders, exactly ``F.interpolate(scale_factor=2, mode="bilinear",
align_corners=False)``.

Adjoint pairs (``<R u, v> = 1/4 <u, P v>``): ``average`` with ``nearest`` prolongation and
``full_weighting`` with ``bilinear`` prolongation hold exactly for every field when H and W are
even. When a fine size is odd no restriction can both preserve constants and be an exact
adjoint (summing ``R^T 1 = 1/4`` over the fine cells gives ``H*W/4 != ceil(H/2)*ceil(W/2)``);
msconv keeps constants, and the identity then holds for coarse fields ``v`` that vanish on the
last coarse row/column of an odd dimension (tested). Autograd always uses the exact transpose.

Kinds:
    restriction: ``average`` (2×2 cell average, default; divides white-noise variance by 4),
    ``full_weighting`` ([1,3,3,1]⊗[1,3,3,1]/64, stride 2), ``bilinear`` (what
    ``F.interpolate(scale_factor=0.5, mode="bilinear", align_corners=False)`` computes: on a
    cell-centred grid, sampling halfway between two fine cells, i.e. the 2×2 average — kept as
    its own name so code ported from ``F.interpolate`` reads the same), ``nearest`` (injection
    of fine cell ``(2I, 2J)``, as the official research code and ``F.interpolate(mode="nearest")``
    do; keeps the full per-pixel noise).
    prolongation: ``bilinear`` (default), ``nearest`` (each coarse value copied to its 2×2 cells).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

RESTRICT_KINDS = ("average", "full_weighting", "bilinear", "nearest")
PROLONG_KINDS = ("bilinear", "nearest")

__all__ = [
    "RESTRICT_KINDS",
    "PROLONG_KINDS",
    "coarse_size",
    "restrict_ref",
    "prolong_ref",
    "pyramid_ref",
]


def coarse_size(n: int) -> int:
    """Length of a dimension one level coarser: ``ceil(n / 2)``."""
    return (n + 1) // 2


def _pad_to_even(x: torch.Tensor) -> torch.Tensor:
    H, W = x.shape[-2:]
    if H % 2 == 0 and W % 2 == 0:
        return x
    # Edge replication; F.pad's replicate mode needs a float tensor of rank 3-5, which x is.
    return F.pad(x, (0, W % 2, 0, H % 2), mode="replicate")


def _restrict_once(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "nearest":
        return x[..., ::2, ::2]
    xe = _pad_to_even(x)
    if kind in ("average", "bilinear"):
        return F.avg_pool2d(xe, 2)
    if kind == "full_weighting":
        C = xe.shape[1]
        k1 = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=xe.dtype, device=xe.device) / 8
        k2 = (k1[:, None] * k1[None, :]).expand(C, 1, 4, 4)
        return F.conv2d(F.pad(xe, (1, 1, 1, 1), mode="replicate"), k2, stride=2, groups=C)
    raise ValueError(f"kind={kind!r} is not a restriction; use one of {RESTRICT_KINDS}")


def _prolong_once(x: torch.Tensor, kind: str, size: tuple[int, int]) -> torch.Tensor:
    if kind not in PROLONG_KINDS:
        raise ValueError(f"kind={kind!r} is not a prolongation; use one of {PROLONG_KINDS}")
    if x.shape[0] * x.shape[1] == 0:
        return x.new_empty(*x.shape[:2], *size)
    mode = "bilinear" if kind == "bilinear" else "nearest"
    kw = {"align_corners": False} if mode == "bilinear" else {}
    y = F.interpolate(x, scale_factor=2, mode=mode, **kw)
    return y[..., : size[0], : size[1]]


def restrict_ref(x: torch.Tensor, kind: str = "average", levels: int = 1) -> torch.Tensor:
    """Restrict ``x`` (N, C, H, W) ``levels`` times -> (N, C, ceil(H/2^l), ceil(W/2^l))."""
    for _ in range(levels):
        x = _restrict_once(x, kind)
    return x


def prolong_ref(
    x: torch.Tensor, kind: str = "bilinear", levels: int = 1, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Prolong ``x`` (N, C, h, w) ``levels`` times -> (N, C, 2^l h, 2^l w) or (N, C, *size)."""
    h, w = x.shape[-2:]
    sizes = []
    for k in range(levels, 0, -1):
        if size is None:
            sizes.append((h << (levels - k + 1), w << (levels - k + 1)))
        else:
            sizes.append((-(-size[0] // (1 << (k - 1))), -(-size[1] // (1 << (k - 1)))))
    for s in sizes:
        x = _prolong_once(x, kind, s)
    return x


def pyramid_ref(x: torch.Tensor, levels: int, kind: str = "average") -> list[torch.Tensor]:
    """``[x, R x, R² x, …, R^levels x]`` by chained restriction."""
    out = [x]
    for _ in range(levels):
        out.append(_restrict_once(out[-1], kind))
    return out

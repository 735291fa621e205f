"""Multilevel transfer operators: ``restrict``, ``prolong``, ``pyramid``.

Two custom ops carry the compiled and Triton kernels through autograd and ``torch.compile``:

* ``msconv::transfer2d(x, direction, kind, out_h, out_w, adjoint, backend)`` — one level of a
  restriction or prolongation, or (``adjoint=True``) its transpose. Its backward is the same op
  with ``adjoint`` flipped, so gradients of any order are kernels too.
* ``msconv::pyramid(x, kind, levels, backend)`` — every restriction level in one call; the
  compiled CPU kernel carries each image plane through all levels while it is in cache.

``backend="reference"`` bypasses both and runs msconv/reference.py under plain autograd.
Grid, boundary and odd-size rules: see msconv/reference.py.
"""
from __future__ import annotations

import torch

from msconv import reference
from msconv._memory import check_fits
from msconv.ops import _backend
from msconv.ops._common import (check_choice, check_image, check_int, empty_like_format, pyramid_adjoint,
                               save_pyramid_sizes)
from msconv.ops._taps import taps
from msconv.reference import PROLONG_KINDS, RESTRICT_KINDS, coarse_size, max_levels

__all__ = ["restrict", "prolong", "pyramid"]


def _run_chain(x: torch.Tensor, tables: list, backend: str) -> list[torch.Tensor]:
    iy, wy, ix, wx = (list(t) for t in zip(*tables))
    if backend in ("cpp", "cuda"):
        return list(torch.ops.msconv.resample2d_chain(x, iy, wy, ix, wx))
    if backend == "triton":
        from msconv.triton.resample import resample2d_chain_triton

        return resample2d_chain_triton(x, iy, wy, ix, wx)
    raise ValueError(f"backend {backend!r} has no kernel for transfer ops")


def _level_tables(direction, kind, h_in, w_in, h_out, w_out, adjoint, device):
    # The fine side of the 1-D operator is the input unless this is a prolongation or an
    # adjoint restriction (exactly one of the two).
    fine_is_out = (direction == "prolong") != adjoint
    hf, hc = (h_out, h_in) if fine_is_out else (h_in, h_out)
    wf, wc = (w_out, w_in) if fine_is_out else (w_in, w_out)
    if coarse_size(hf) != hc or coarse_size(wf) != wc:
        raise ValueError(
            f"transfer2d: a fine grid of {(hf, wf)} has coarse size {(coarse_size(hf), coarse_size(wf))}, "
            f"not {(hc, wc)}; the output size must be the other level's size"
        )
    iy, wy = taps(direction, kind, hf, hc, adjoint, device)
    ix, wx = taps(direction, kind, wf, wc, adjoint, device)
    return iy, wy, ix, wx


@torch.library.custom_op("msconv::transfer2d", mutates_args=())
def _transfer2d(
    x: torch.Tensor, direction: str, kind: str, out_h: int, out_w: int, adjoint: bool, backend: str
) -> torch.Tensor:
    tables = _level_tables(direction, kind, x.shape[2], x.shape[3], out_h, out_w, adjoint, x.device)
    return _run_chain(x, [tables], backend)[0]


@_transfer2d.register_fake
def _(x, direction, kind, out_h, out_w, adjoint, backend):
    return empty_like_format(x, out_h, out_w)


def _transfer2d_setup(ctx, inputs, output):
    x, direction, kind, _, _, adjoint, backend = inputs
    ctx.args = (direction, kind, x.shape[2], x.shape[3], not adjoint, backend)


def _transfer2d_backward(ctx, grad):
    return _transfer2d(grad, *ctx.args), None, None, None, None, None, None


_transfer2d.register_autograd(_transfer2d_backward, setup_context=_transfer2d_setup)


@torch.library.custom_op("msconv::pyramid", mutates_args=())
def _pyramid(x: torch.Tensor, kind: str, levels: int, backend: str) -> list[torch.Tensor]:
    tables, h, w = [], x.shape[2], x.shape[3]
    for _ in range(levels):
        hc, wc = coarse_size(h), coarse_size(w)
        tables.append(_level_tables("restrict", kind, h, w, hc, wc, False, x.device))
        h, w = hc, wc
    return _run_chain(x, tables, backend)


@_pyramid.register_fake
def _(x, kind, levels, backend):
    out, h, w = [], x.shape[2], x.shape[3]
    for _ in range(levels):
        h, w = (h + 1) // 2, (w + 1) // 2
        out.append(empty_like_format(x, h, w))
    return out


def _pyramid_setup(ctx, inputs, output):
    x, kind, _, backend = inputs
    save_pyramid_sizes(ctx, x, output, kind, backend)


def _pyramid_backward(ctx, grads):
    acc = pyramid_adjoint(grads, ctx.sizes,
                          lambda g, size: _transfer2d(g, "restrict", ctx.kind, *size, True, ctx.backend))
    return acc, None, None, None


_pyramid.register_autograd(_pyramid_backward, setup_context=_pyramid_setup)


def _check_levels(x: torch.Tensor, levels: int, op: str) -> None:
    allowed = max_levels(x.shape[2], x.shape[3])
    if levels > allowed:
        raise ValueError(
            f"{op}: x.shape={tuple(x.shape)} allows at most {allowed} level(s) (each level halves H and W, "
            f"which needs H >= 2 and W >= 2), got levels={levels}; use fewer levels or a larger image"
        )


def _is_volume(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 5


def _volume_kind(kind: str, op: str, allowed: tuple) -> str:
    """The 3-D name of a 2-D ``kind`` (``bilinear`` prolongation is ``linear`` in 3-D)."""
    k = {"bilinear": "linear"}.get(kind, kind) if op == "prolong" else kind
    if k not in allowed:
        raise ValueError(f"{op}: kind={kind!r} has no 3-D version for the volume (N, C, D, H, W) given; use one of "
                         f"{allowed} (see msconv.ops.{op}3d)")
    return k


def restrict(x: torch.Tensor, kind: str = "average", levels: int = 1, *, backend: str | None = None) -> torch.Tensor:
    """Restrict (N, C, H, W) -> (N, C, ceil(H/2^levels), ceil(W/2^levels)), factor 2 per level.

    ``kind``: ``average`` (default), ``full_weighting``, ``bilinear``, ``nearest``; see
    msconv.reference for the exact stencils and the odd-size rule.

    >>> msconv.restrict(torch.ones(1, 3, 5, 8)).shape
    torch.Size([1, 3, 3, 4])

    A volume (N, C, D, H, W) is restricted along D, H and W (``average`` or ``nearest``) by
    :func:`msconv.ops.restrict3d`.
    """
    if _is_volume(x):
        from msconv.ops.transfer3d import RESTRICT3D_KINDS, restrict3d

        return restrict3d(x, _volume_kind(kind, "restrict", RESTRICT3D_KINDS), levels, backend=backend)
    check_image(x, "x", "restrict")
    check_choice(kind, "kind", "restrict", RESTRICT_KINDS)
    check_int(levels, "levels", "restrict")
    _check_levels(x, levels, "restrict")
    if levels == 0:
        return x
    b = _backend.resolve("restrict", x.device, backend)
    if b == "reference":
        return reference.restrict_ref(x, kind, levels)
    if levels == 1:
        return _transfer2d(x, "restrict", kind, coarse_size(x.shape[2]), coarse_size(x.shape[3]), False, b)
    return _pyramid(x, kind, levels, b)[-1]


def _prolong_sizes(x: torch.Tensor, levels: int, size) -> list[tuple[int, int]]:
    h, w = x.shape[2], x.shape[3]
    if size is None:
        return [(h << k, w << k) for k in range(1, levels + 1)]
    if (
        not isinstance(size, (tuple, list, torch.Size))
        or len(size) != 2
        or not all(isinstance(s, int) and s > 0 for s in size)
    ):
        raise ValueError(f"prolong: size must be a pair of positive ints (H, W), got size={size!r}")
    out = [(-(-size[0] // (1 << k)), -(-size[1] // (1 << k))) for k in range(levels - 1, -1, -1)]
    coarse = (-(-size[0] // (1 << levels)), -(-size[1] // (1 << levels)))
    if coarse != (h, w):
        raise ValueError(
            f"prolong: size={tuple(size)} does not fit x.shape={tuple(x.shape)} with levels={levels}: "
            f"a fine size F restricts to ceil(F / 2^levels) = {coarse}, not {(h, w)}; pass the fine "
            f"grid's size, or size=None for ({h << levels}, {w << levels})"
        )
    return out


def prolong(
    x: torch.Tensor,
    kind: str = "bilinear",
    levels: int = 1,
    size: tuple[int, int] | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Prolong (N, C, h, w) -> (N, C, 2^levels h, 2^levels w), or (N, C, *size).

    ``kind``: ``bilinear`` (default; cell-centred, equals ``F.interpolate(scale_factor=2,
    mode="bilinear", align_corners=False)``) or ``nearest``. ``size`` is the fine grid's exact
    (H, W) when it was odd: it must satisfy ``ceil(H / 2^levels) == h``.

    >>> msconv.prolong(torch.ones(1, 3, 3, 4), size=(5, 8)).shape
    torch.Size([1, 3, 5, 8])

    A volume (N, C, d, h, w) is prolonged along every axis by :func:`msconv.ops.prolong3d`
    (``bilinear`` is its ``linear``; ``size`` then is (D, H, W)).
    """
    if _is_volume(x):
        from msconv.ops.transfer3d import PROLONG3D_KINDS, prolong3d

        return prolong3d(x, _volume_kind(kind, "prolong", PROLONG3D_KINDS), levels, size, backend=backend)
    check_image(x, "x", "prolong")
    check_choice(kind, "kind", "prolong", PROLONG_KINDS)
    check_int(levels, "levels", "prolong")
    sizes = _prolong_sizes(x, levels, size)
    if levels == 0:
        return x
    h, w = sizes[-1]
    check_fits(x.shape[0] * x.shape[1] * h * w * x.element_size(), x.device, "prolong",
               f"levels={levels} on x.shape={tuple(x.shape)} (output {h}×{w})", "use fewer levels")
    b = _backend.resolve("prolong", x.device, backend)
    if b == "reference":
        return reference.prolong_ref(x, kind, levels, size)
    for h, w in sizes:
        x = _transfer2d(x, "prolong", kind, h, w, False, b)
    return x


def pyramid(x: torch.Tensor, levels: int, kind: str = "average", *, backend: str | None = None) -> list[torch.Tensor]:
    """``[x, R x, R² x, …, R^levels x]`` from one fused kernel call that reads ``x`` once.

    Level l has shape (N, C, ceil(H/2^l), ceil(W/2^l)); equals chained :func:`restrict`. A volume
    (N, C, D, H, W) gives :func:`msconv.ops.pyramid3d`'s levels.
    """
    if _is_volume(x):
        from msconv.ops.transfer3d import RESTRICT3D_KINDS, pyramid3d

        return pyramid3d(x, levels, _volume_kind(kind, "pyramid", RESTRICT3D_KINDS), backend=backend)
    check_image(x, "x", "pyramid")
    check_choice(kind, "kind", "pyramid", RESTRICT_KINDS)
    check_int(levels, "levels", "pyramid")
    _check_levels(x, levels, "pyramid")
    if levels == 0:
        return [x]
    b = _backend.resolve("pyramid", x.device, backend)
    if b == "reference":
        return reference.pyramid_ref(x, levels, kind)
    return [x, *_pyramid(x, kind, levels, b)]

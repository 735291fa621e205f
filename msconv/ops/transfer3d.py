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

Every operator is separable: one 1-D tap table per axis (msconv/ops/_taps.py; an identity table
for an axis that is kept), run by the kernels of two custom ops, as the 2-D operators are:

* ``msconv::transfer3d(x, direction, kind, out_d, out_h, out_w, adjoint, backend)`` — one level
  or (``adjoint=True``) its transpose; its backward is the same op with ``adjoint`` flipped.
* ``msconv::pyramid3d(x, kind, levels, factors, backend)`` — every restriction level in one call;
  the compiled CPU kernel carries each volume through all levels while it is in cache.

Backends: compiled C++ (CPU), compiled CUDA, Triton, and ``reference``: the plain-PyTorch
``*_ref`` functions below (torch's own 3-D pooling and interpolation), the ground truth the
kernels are tested against.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from msconv._memory import check_fits
from msconv.ops import _backend
from msconv.ops._common import FLOAT_DTYPES, pyramid_adjoint, save_pyramid_sizes
from msconv.ops._taps import taps
from msconv.reference import coarse_size

__all__ = ["restrict3d", "prolong3d", "pyramid3d", "restrict3d_ref", "prolong3d_ref", "pyramid3d_ref",
           "RESTRICT3D_KINDS", "PROLONG3D_KINDS"]

RESTRICT3D_KINDS = ("average", "nearest")
PROLONG3D_KINDS = ("linear", "nearest")
# The 1-D stencil of each kind in msconv/ops/_taps.py (3-D "linear" is 2-D "bilinear" per axis).
_TAPS_KIND = {"average": "average", "nearest": "nearest", "linear": "bilinear"}


# ------------------------------------------------------------------------------ reference


def _restrict_once_ref(x: torch.Tensor, kind: str, f: tuple[int, int, int]) -> torch.Tensor:
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


def restrict3d_ref(x: torch.Tensor, kind: str = "average", levels: int = 1, factors=(2, 2, 2)) -> torch.Tensor:
    """Plain-PyTorch :func:`restrict3d` (``F.avg_pool3d`` / strided slicing), no input checks."""
    for _ in range(levels):
        x = _restrict_once_ref(x, kind, tuple(factors))
    return x


def pyramid3d_ref(x: torch.Tensor, levels: int, kind: str = "average", factors=(2, 2, 2)) -> list[torch.Tensor]:
    """Plain-PyTorch :func:`pyramid3d`: ``[x, R x, …, R^levels x]``, no input checks."""
    out = [x]
    for _ in range(levels):
        out.append(_restrict_once_ref(out[-1], kind, tuple(factors)))
    return out


def prolong3d_ref(x: torch.Tensor, kind: str = "linear", levels: int = 1, size=None, factors=(2, 2, 2)) -> torch.Tensor:
    """Plain-PyTorch :func:`prolong3d` (``F.interpolate`` then a crop to odd sizes), no input checks."""
    f = tuple(factors)
    sizes = _prolong_sizes(tuple(x.shape[2:]), levels, size, f)
    mode = {"linear": "trilinear", "nearest": "nearest"}[kind]
    for s in sizes:
        # A factor of 1 is the identity for both modes (align_corners=False maps cell centres onto themselves).
        x = F.interpolate(x, scale_factor=tuple(float(v) for v in f), mode=mode,
                          **({"align_corners": False} if mode == "trilinear" else {}))
        x = x[:, :, : s[0], : s[1], : s[2]]
    return x


def _prolong_sizes(coarse, levels: int, size, f) -> list[tuple[int, int, int]]:
    """The fine sizes of each prolongation level, coarse to fine (``size`` None: every axis doubles)."""
    if size is None:
        size = tuple(n << levels if f[a] == 2 else n for a, n in enumerate(coarse))
    return [tuple(-(-s // (1 << k)) if f[a] == 2 else s for a, s in enumerate(size)) for k in range(levels - 1, -1, -1)]


# ------------------------------------------------------------------------------ tap tables


@functools.lru_cache(maxsize=256)
def _identity_taps(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n, dtype=torch.int32, device=device)[:, None], torch.ones(n, 1, device=device)


def _axis_taps(direction, kind, n_in, n_out, adjoint, device):
    # An axis that keeps its length is kept (factor 1): where a factor of 2 would also keep it
    # (length 1), both operators are the identity.
    if n_in == n_out:
        return _identity_taps(n_in, device)
    # The fine side is the input unless this is a prolongation or an adjoint restriction.
    fine_is_out = (direction == "prolong") != adjoint
    nf, nc = (n_out, n_in) if fine_is_out else (n_in, n_out)
    if coarse_size(nf) != nc:
        raise ValueError(f"transfer3d: an axis of {nf} fine cells has coarse length {coarse_size(nf)}, not {nc}; "
                         "the output size must be the other level's size")
    return taps(direction, _TAPS_KIND[kind], nf, nc, adjoint, device)


def _level_tables(direction, kind, size_in, size_out, adjoint, device) -> list[torch.Tensor]:
    """[iz, wz, iy, wy, ix, wx] of one level from (D, H, W) ``size_in`` to ``size_out``."""
    out = []
    for n_in, n_out in zip(size_in, size_out):
        out.extend(_axis_taps(direction, kind, n_in, n_out, adjoint, device))
    return out


def _run_chain(x: torch.Tensor, tables: list[list[torch.Tensor]], backend: str) -> list[torch.Tensor]:
    per_arg = [list(t) for t in zip(*tables)]  # iz, wz, iy, wy, ix, wx: one list of levels each
    if backend in ("cpp", "cuda"):
        return list(torch.ops.msconv.resample3d_chain(x, *per_arg))
    if backend == "triton":
        from msconv.triton.resample3d import resample3d_chain_triton

        return resample3d_chain_triton(x, *per_arg)
    raise ValueError(f"backend {backend!r} has no kernel for transfer3d ops")


def _is_channels_last_3d(x: torch.Tensor) -> bool:
    """The memory-format rule every 3-D kernel follows: NDHWC only when x is not also NCDHW-contiguous."""
    return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


def _empty_like_format(x: torch.Tensor, d, h, w) -> torch.Tensor:
    fmt = torch.channels_last_3d if _is_channels_last_3d(x) else torch.contiguous_format
    return x.new_empty((x.shape[0], x.shape[1], d, h, w)).contiguous(memory_format=fmt)


# ------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("msconv::transfer3d", mutates_args=())
def _transfer3d(
    x: torch.Tensor, direction: str, kind: str, out_d: int, out_h: int, out_w: int, adjoint: bool, backend: str
) -> torch.Tensor:
    tables = _level_tables(direction, kind, tuple(x.shape[2:]), (out_d, out_h, out_w), adjoint, x.device)
    return _run_chain(x, [tables], backend)[0]


@_transfer3d.register_fake
def _(x, direction, kind, out_d, out_h, out_w, adjoint, backend):
    return _empty_like_format(x, out_d, out_h, out_w)


def _transfer3d_setup(ctx, inputs, output):
    x, direction, kind, _, _, _, adjoint, backend = inputs
    ctx.args = (direction, kind, *x.shape[2:], not adjoint, backend)


def _transfer3d_backward(ctx, grad):
    return _transfer3d(grad, *ctx.args), None, None, None, None, None, None, None


_transfer3d.register_autograd(_transfer3d_backward, setup_context=_transfer3d_setup)


def _coarse_sizes(size, f, levels):
    out = []
    for _ in range(levels):
        size = tuple((n + 1) // 2 if f[a] == 2 else n for a, n in enumerate(size))
        out.append(size)
    return out


@torch.library.custom_op("msconv::pyramid3d", mutates_args=())
def _pyramid3d(x: torch.Tensor, kind: str, levels: int, factors: list[int], backend: str) -> list[torch.Tensor]:
    sizes = [tuple(x.shape[2:]), *_coarse_sizes(tuple(x.shape[2:]), factors, levels)]
    tables = [_level_tables("restrict", kind, a, b, False, x.device) for a, b in zip(sizes, sizes[1:])]
    return _run_chain(x, tables, backend)


@_pyramid3d.register_fake
def _(x, kind, levels, factors, backend):
    return [_empty_like_format(x, *s) for s in _coarse_sizes(tuple(x.shape[2:]), factors, levels)]


def _pyramid3d_setup(ctx, inputs, output):
    x, kind, _, _, backend = inputs
    save_pyramid_sizes(ctx, x, output, kind, backend)


def _pyramid3d_backward(ctx, grads):
    acc = pyramid_adjoint(grads, ctx.sizes,
                          lambda g, size: _transfer3d(g, "restrict", ctx.kind, *size, True, ctx.backend))
    return acc, None, None, None, None


_pyramid3d.register_autograd(_pyramid3d_backward, setup_context=_pyramid3d_setup)


# ------------------------------------------------------------------------------ public API


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


def _check_restrict(x, kind, levels, factors, op: str) -> tuple[tuple[int, int, int], int]:
    """(factors, levels) of a restriction or pyramid, checked."""
    f = _check(x, op, factors)
    if kind not in RESTRICT3D_KINDS:
        raise ValueError(f"{op}: unknown kind={kind!r}; use one of {RESTRICT3D_KINDS}")
    levels = _levels(levels, op)
    size = tuple(x.shape[2:])
    for _ in range(levels):
        if any(size[a] < 2 for a in range(3) if f[a] == 2):
            raise ValueError(f"{op}: x.shape={tuple(x.shape)} cannot be coarsened {levels} time(s) along the "
                             f"axes of factors={f} (each needs >= 2 cells); use fewer levels")
        size = tuple((n + 1) // 2 if f[a] == 2 else n for a, n in enumerate(size))
    return f, levels


def restrict3d(x: torch.Tensor, kind: str = "average", levels: int = 1, factors=(2, 2, 2), *,
               backend: str | None = None) -> torch.Tensor:
    """Restrict (N, C, D, H, W) ``levels`` times; each coarsened axis of length n becomes ceil(n / 2).

    ``backend``: ``cpp``, ``cuda``, ``triton`` or ``reference`` (default: ``MSCONV_BACKEND``, else
    the compiled kernels of x's device).

    >>> restrict3d(torch.ones(1, 1, 5, 8, 8)).shape
    torch.Size([1, 1, 3, 4, 4])
    """
    f, levels = _check_restrict(x, kind, levels, factors, "restrict3d")
    if levels == 0:
        return x
    b = _backend.resolve("restrict3d", x.device, backend)
    if b == "reference":
        return restrict3d_ref(x, kind, levels, f)
    if levels == 1:
        return _transfer3d(x, "restrict", kind, *_coarse_sizes(tuple(x.shape[2:]), f, 1)[0], False, b)
    return _pyramid3d(x, kind, levels, list(f), b)[-1]


def pyramid3d(x: torch.Tensor, levels: int, kind: str = "average", factors=(2, 2, 2), *,
              backend: str | None = None) -> list[torch.Tensor]:
    """``[x, R x, …, R^levels x]`` from one fused kernel call that reads ``x`` once; level l has
    shape (N, C, *sizes) with each coarsened axis ceil(n / 2^l). Equals chained :func:`restrict3d`.

    >>> [t.shape[2:] for t in pyramid3d(torch.ones(1, 1, 5, 8, 8), 2, factors=(1, 2, 2))]
    [torch.Size([5, 8, 8]), torch.Size([5, 4, 4]), torch.Size([5, 2, 2])]
    """
    f, levels = _check_restrict(x, kind, levels, factors, "pyramid3d")
    if levels == 0:
        return [x]
    b = _backend.resolve("pyramid3d", x.device, backend)
    if b == "reference":
        return pyramid3d_ref(x, levels, kind, f)
    return [x, *_pyramid3d(x, kind, levels, list(f), b)]


def prolong3d(x: torch.Tensor, kind: str = "linear", levels: int = 1, size=None, factors=(2, 2, 2), *,
              backend: str | None = None) -> torch.Tensor:
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
    if size is not None and not (isinstance(size, (tuple, list, torch.Size)) and len(size) == 3
                                 and all(isinstance(s, (int, torch.SymInt)) and s > 0 for s in size)):
        raise ValueError(f"prolong3d: size must be three positive ints (D, H, W), got size={size!r}")
    sizes = _prolong_sizes(coarse, levels, size, f)
    if size is not None:
        expect = tuple(-(-s // (1 << levels)) if f[a] == 2 else s for a, s in enumerate(size))
        if expect != coarse:
            raise ValueError(f"prolong3d: size={tuple(size)} does not fit x.shape={tuple(x.shape)} with levels={levels} "
                             f"and factors={f}: it restricts to {expect}; pass the fine grid's size or size=None")
    if levels == 0:
        return x
    d, h, w = sizes[-1]
    if not torch.compiler.is_compiling():  # formatting the sizes would specialise them in a graph
        check_fits(x.shape[0] * x.shape[1] * d * h * w * x.element_size(), x.device, "prolong3d",
                   f"levels={levels} on x.shape={tuple(x.shape)} (output {d}×{h}×{w})", "use fewer levels")
    b = _backend.resolve("prolong3d", x.device, backend)
    if b == "reference":
        return prolong3d_ref(x, kind, levels, size, f)
    for s in sizes:
        x = _transfer3d(x, "prolong", kind, *s, False, b)
    return x

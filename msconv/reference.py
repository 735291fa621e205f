"""Plain-PyTorch ground truth for every msconv op: the spec in executable form.

Grid conventions. Pixels are cells; coarse cell ``I`` covers fine cells ``2I`` and
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

import math

import torch
import torch.nn.functional as F

RESTRICT_KINDS = ("average", "full_weighting", "bilinear", "nearest")
PROLONG_KINDS = ("bilinear", "nearest")

__all__ = [
    "RESTRICT_KINDS",
    "PROLONG_KINDS",
    "coarse_size",
    "max_levels",
    "restrict_ref",
    "prolong_ref",
    "pyramid_ref",
    "mf_multi_indices",
    "mf_taps",
    "mf_jets_ref",
    "mf_order_of",
    "mf_padding",
    "mf_pad",
    "mf_stencil",
    "mf_conv2d_ref",
]


def coarse_size(n: int) -> int:
    """Length of a dimension one level coarser: ``ceil(n / 2)``."""
    return (n + 1) // 2


def max_levels(h: int, w: int) -> int:
    """How many factor-2 restrictions an H×W grid allows: each needs H >= 2 and W >= 2."""
    levels = 0
    while h >= 2 and w >= 2:
        h, w, levels = coarse_size(h), coarse_size(w), levels + 1
    return levels


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


# ---------------------------------------------------------------------------------------------
# Mesh-free convolution: cell-integrated Gaussian-derivative taps and the jets.
#
# Conventions. x is the horizontal (W) axis, y the vertical (H) axis; a is the order of the
# x-derivative, b of the y-derivative. The jet index m enumerates (a, b) with a + b <= p by
# total degree, x-derivative first: (0,0), (1,0), (0,1), (2,0), (1,1), (0,2), (3,0), ...
# (`mf_multi_indices`). Convolution is a true convolution, (g * u)(x) = ∫ g(ξ) u(x − ξ) dξ, so
# the jet of u(x) = x for (a, b) = (1, 0) is +1.
#
# Output grid of a stride-S layer: output cell I covers input cells S·I … S·I + S − 1 (the
# cell-centred convention of the transfer operators, top of this module), so its centre sits
# δ = (S − 1)/2 input pixels after input cell S·I, and the number of output cells is
# ceil(H / S). For S = 2 that is exactly the grid `restrict` produces.
# ---------------------------------------------------------------------------------------------


def mf_multi_indices(order: int) -> list[tuple[int, int]]:
    """The (a, b) derivative orders of the jets, in jet order; length (p+1)(p+2)/2."""
    return [(d - b, b) for d in range(order + 1) for b in range(d + 1)]


def _gauss_primitive(n: int, xi: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """g_n(ξ): the n-th derivative of the 1-D Gaussian of width σ; n = −1 its integral Φ."""
    z = xi / sigma
    if n == -1:
        return 0.5 * (1.0 + torch.special.erf(z / math.sqrt(2.0)))
    # Probabilists' Hermite: He_0 = 1, He_1 = z, He_{k+1} = z He_k − k He_{k−1};
    # d^n/dξ^n G = (−1/σ)^n He_n(ξ/σ) G(ξ).
    he_prev, he = torch.ones_like(z), z
    if n == 0:
        he = he_prev
    else:
        for k in range(1, n):
            he_prev, he = he, z * he - k * he_prev
    gauss = torch.exp(-0.5 * z * z) / (sigma * math.sqrt(2.0 * math.pi))
    return (-1.0 / sigma) ** n * he * gauss


def mf_taps(
    order: int, sigma: float | torch.Tensor, scale: float, stride: int = 1
) -> tuple[torch.Tensor, int]:
    """Cell-integrated 1-D Gaussian-derivative taps on a grid of spacing ``scale``.

    Returns ``(taps, kmin)``: ``taps`` is float64 ``[order + 1, K]`` with
    ``taps[a, t] = ∫ g_a over [(k − ½)s + δ, (k + ½)s + δ]`` for offset ``k = kmin + t``,
    where ``δ = (stride − 1)/2 · s`` is the output-centre shift (see the conventions above),
    so that the a-th jet along one axis is ``J[I] = Σ_k taps[a, k − kmin] · u[S·I − k]``.
    Offsets are kept while the cell lies within the truncation radius ``r·s``,
    ``r = ceil(4σ/s + ½)`` (the Gaussian cut at 4σ, past which lies 6e-5 of its mass, plus
    half a cell): ``K = 2r + 1`` for stride 1.

    ``sigma`` may be a tensor that requires grad (learnable σ): the taps are differentiable
    in it. The support is computed from its value.
    """
    if order < 0:
        raise ValueError(f"mf_taps: order must be >= 0, got order={order}")
    sig_val = float(sigma)
    if not (sig_val > 0 and math.isfinite(sig_val)):
        raise ValueError(f"mf_taps: sigma must be finite and > 0, got sigma={sig_val}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"mf_taps: scale must be finite and > 0, got scale={scale}")
    if stride < 1:
        raise ValueError(f"mf_taps: stride must be >= 1, got stride={stride}")
    r = math.ceil(4.0 * sig_val / scale + 0.5)
    shift = (stride - 1) / 2.0  # in input pixels
    kmin, kmax = math.ceil(-r - shift), math.floor(r - shift)
    sig = sigma.to(torch.float64) if isinstance(sigma, torch.Tensor) else torch.tensor(sig_val, dtype=torch.float64)
    k = torch.arange(kmin, kmax + 1, dtype=torch.float64)
    lo = (k - 0.5 + shift) * scale
    hi = (k + 0.5 + shift) * scale
    rows = [_gauss_primitive(a - 1, hi, sig) - _gauss_primitive(a - 1, lo, sig) for a in range(order + 1)]
    return torch.stack(rows), kmin


def mf_jets_ref(xp: torch.Tensor, filt: torch.Tensor, order: int, stride: int = 1) -> torch.Tensor:
    """The jets of a pre-padded field as a plain correlation (what ``msconv::mf_jets`` computes).

    Args:
        xp: ``[N, C, Hp, Wp]``, already padded.
        filt: ``[order + 1, K]`` correlation filters, the same on both axes (the flipped taps
            of :func:`mf_taps`: ``filt = taps.flip(-1)``).
    Returns:
        ``[N, C * M, Ho, Wo]`` with ``Ho = (Hp − K) // stride + 1`` (likewise Wo), channel
        ``c * M + m`` holding, for ``(a, b) = mf_multi_indices(order)[m]``,
        ``J[n, c·M+m, i, j] = Σ_t Σ_q filt[b, t] · filt[a, q] · xp[n, c, i·S + t, j·S + q]``.
    """
    n, c, hp, wp = xp.shape
    p1, k = filt.shape
    if p1 != order + 1:
        raise ValueError(f"mf_jets_ref: filt must have order + 1 = {order + 1} rows, got {filt.shape=}")
    idx = mf_multi_indices(order)
    filt = filt.to(xp.dtype)
    # Vertical pass: one filter per y-order b, then horizontal per (a, b).
    v = F.conv2d(xp.reshape(n * c, 1, hp, wp), filt.reshape(p1, 1, k, 1), stride=(stride, 1))
    out = [F.conv2d(v[:, b : b + 1], filt[a].reshape(1, 1, 1, k), stride=(1, stride)) for a, b in idx]
    j = torch.cat(out, dim=1)
    return j.reshape(n, c * len(idx), j.shape[-2], j.shape[-1])


def mf_order_of(m: int) -> int:
    """The order p with (p+1)(p+2)/2 == m (the jets per channel); ValueError if m is no such count."""
    p = 0
    while (p + 1) * (p + 2) // 2 < m:
        p += 1
    if (p + 1) * (p + 2) // 2 != m:
        valid = [(q + 1) * (q + 2) // 2 for q in range(6)]
        raise ValueError(
            f"a mesh-free weight's last dimension counts the jets, (p+1)(p+2)/2 for order p, "
            f"i.e. one of {valid}..., got {m}; build it as [C_out, C_in/groups, (p+1)(p+2)/2]"
        )
    return p


def mf_padding(n: int, kmin: int, k: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of an axis of length ``n`` for taps ``(kmin, K)`` from mf_taps.

    After padding, output cell ``I`` of the ``ceil(n / stride)`` cells reads padded entries
    ``S·I … S·I + K − 1``, i.e. input offsets ``S·I + kmax … S·I + kmin`` (kmax = kmin + K − 1),
    exactly the sum ``J[I] = Σ_k taps[k] u[S·I − k]``. Either amount can be negative (a crop)
    when the stride exceeds the stencil.
    """
    # ceil(n / S) as a floor division of non-negatives: with a symbolic n (torch.compile with
    # dynamic shapes) -(-n // S) leaves a negative floor division that inductor cannot size.
    n_out = (n + stride - 1) // stride
    kmax = kmin + k - 1
    return kmax, stride * (n_out - 1) - (n - 1) - kmin


def mf_pad(x: torch.Tensor, pad_h: tuple[int, int], pad_w: tuple[int, int], mode: str) -> torch.Tensor:
    """Extend ``x`` (N, C, H, W) by ``pad_h``/``pad_w`` (before, after) cells per ``mode``.

    Modes as nn.Conv2d's ``padding_mode``: ``zeros``, ``reflect`` (mirror without repeating the
    edge, F.pad's "reflect"), ``replicate``, ``circular``. Unlike F.pad any amount is allowed —
    pads wider than the image repeat the rule (reflect bounces, circular wraps again) — and
    negative amounts crop; both happen for wide stencils on coarse grids.
    """
    (t, b), (l, r) = pad_h, pad_w
    h, w = x.shape[-2:]
    if mode == "zeros":
        return F.pad(x, (l, r, t, b))
    fits = {"reflect": lambda p, n: 0 <= p < n, "replicate": lambda p, n: p >= 0, "circular": lambda p, n: 0 <= p <= n}
    if mode not in fits:
        raise ValueError(f"mf_pad: unknown mode={mode!r}; use zeros, reflect, replicate or circular")
    # Under torch.compile replicate padding takes the gather below: inductor (torch 2.13, CPU)
    # mis-strides the backward of F.pad(mode="replicate") followed by a convolution.
    compiled_replicate = mode == "replicate" and torch.compiler.is_compiling()
    if not compiled_replicate and all(fits[mode](p, n) for p, n in ((t, h), (b, h), (l, w), (r, w))):
        return F.pad(x, (l, r, t, b), mode=mode)

    def index(n: int, lo: int, hi: int) -> torch.Tensor:
        i = torch.arange(-lo, n + hi, device=x.device)
        if mode == "replicate" or n == 1:
            return i.clamp(0, n - 1)
        if mode == "circular":
            return i.remainder(n)
        i = i.remainder(2 * (n - 1))
        return torch.where(i < n, i, 2 * (n - 1) - i)

    return x.index_select(-2, index(h, t, b)).index_select(-1, index(w, l, r))


def mf_stencil(weight_coeffs: torch.Tensor, sigma: float | torch.Tensor, scale: float, stride: int = 1) -> torch.Tensor:
    """The dense sampled stencil of a mesh-free layer, ready for ``F.conv2d`` (a correlation).

    Args:
        weight_coeffs: θ, ``[C_out, C_in/groups, M]``, M = (p+1)(p+2)/2 in jet order.
    Returns:
        ``[C_out, C_in/groups, K, K]`` in θ's dtype, ``K = 2r + 1`` for stride 1:
        ``stencil[o, c, t, q] = Σ_m θ[o, c, m] · filt[b_m, t] · filt[a_m, q]`` with
        ``filt = mf_taps(...).flip(-1)``; entry ``(t, q)`` multiplies ``u[S·I + t − kmax,
        S·J + q − kmax]`` (see :func:`mf_padding`). Differentiable in θ and in a tensor σ.
    """
    order = mf_order_of(weight_coeffs.shape[-1])
    taps, _ = mf_taps(order, sigma, scale, stride)
    filt = taps.flip(-1).to(weight_coeffs.device)
    basis = torch.stack([filt[b][:, None] * filt[a][None, :] for a, b in mf_multi_indices(order)])
    stencil = torch.einsum("ocm,mtq->octq", weight_coeffs.to(torch.float64), basis)
    return stencil.to(weight_coeffs.dtype)


def mf_conv2d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    sigma: float | torch.Tensor,
    scale: float = 1.0,
    stride: int = 1,
    padding_mode: str = "zeros",
    groups: int = 1,
) -> torch.Tensor:
    """Mesh-free convolution as F.conv2d with the dense sampled stencil (the ground truth).

    Args:
        x: ``[N, C_in, H, W]`` on a grid of spacing ``scale`` reference pixels.
        weight: θ, ``[C_out, C_in/groups, M]``; bias ``[C_out]`` or None; sigma in reference pixels.
    Returns:
        ``[N, C_out, ceil(H/stride), ceil(W/stride)]``; output cell I is centred on input cells
        ``S·I … S·I + S − 1`` (the cell-centred convention above), whatever the padding mode.
    """
    taps, kmin = mf_taps(mf_order_of(weight.shape[-1]), sigma, scale, stride)
    k = taps.shape[1]
    stencil = mf_stencil(weight, sigma, scale, stride).to(x.dtype)
    xp = mf_pad(x, mf_padding(x.shape[-2], kmin, k, stride), mf_padding(x.shape[-1], kmin, k, stride), padding_mode)
    return F.conv2d(xp, stencil, bias, stride=stride, groups=groups)

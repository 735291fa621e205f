"""The stride-1 mesh-free convolution with jets and channel mix fused: ``msconv::mf_conv2d_fused``.

``torch.ops.msconv.mf_conv2d_fused(x, weight, bias, filt, pad, padding_mode, groups)`` computes
exactly :func:`mf_conv2d_fused_ref` — the jets of ``x`` padded by ``pad`` cells before and
``K − 1 − pad`` after on both axes (``padding_mode`` as msconv.reference.mf_pad), mixed by θ
(``weight``, ``[C_out, C_in/groups, M]``) as a grouped 1×1 convolution, plus ``bias``. With
``filt = mf_taps(order, σ, s)[0].flip(-1)`` and ``pad = kmax`` this is mf_conv2d at stride 1.

The CPU kernel (csrc/mf_conv_cpu.cpp) works per tile of output rows and applies the mix
between the vertical and the horizontal pass, so per input channel it keeps p+1 column-filtered
planes instead of M jets and never writes either to memory; the GEMMs skip the padding columns.
Only CPU float32/float64 tensors with the compiled extension take it (``available``); callers
fall back to the jets op otherwise.

Gradients: w.r.t. ``x`` and ``weight`` by the fused backward kernel (the θ-gradient from
per-tile GEMMs against recomputed column-filtered planes), ``bias`` by a sum, ``filt`` (a
learnable σ) in plain PyTorch through :func:`msconv.ops.mf_jets._filt_grad`. Double backward
(grad mode on inside the backward) differentiates the twin instead, at reference speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from msconv import reference
from msconv.ops import _backend

__all__ = ["mf_conv2d_fused", "mf_conv2d_fused_ref", "available", "MODES"]

MODES = ("zeros", "reflect", "replicate", "circular")
_OP = "mf_conv2d_fused"


def _order(weight: torch.Tensor) -> int:
    return reference.mf_order_of(weight.shape[-1])


def _pads(k: int, pad: int) -> tuple[int, int]:
    return pad, k - 1 - pad


def mf_conv2d_fused_ref(x, weight, bias, filt, pad: int, padding_mode: str, groups: int):
    """Plain-PyTorch twin: pad, msconv.reference.mf_jets_ref, grouped 1×1 conv."""
    order = _order(weight)
    p = _pads(filt.shape[1], pad)
    xp = reference.mf_pad(x, p, p, padding_mode)
    jets = reference.mf_jets_ref(xp, filt.to(x.dtype), order, 1)
    return F.conv2d(jets, weight.reshape(weight.shape[0], -1, 1, 1), bias, groups=groups)


def available(x: torch.Tensor, order: int, k: int) -> bool:
    """Whether the fused kernel can run this call (CPU extension, fp32/fp64, its limits)."""
    return (
        _backend.has_cpp()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and order <= 8
        and 1 <= k <= 256
        and hasattr(torch.ops.msconv, "mf_conv_fwd")
    )


def _check(x, weight, bias, filt, pad, padding_mode, groups):
    if padding_mode not in MODES:
        raise ValueError(f"{_OP}: unknown padding_mode={padding_mode!r}; use one of {MODES}")
    order = _order(weight)
    if filt.dim() != 2 or filt.shape[0] != order + 1:
        raise ValueError(f"{_OP}: filt must be [order + 1, K] = [{order + 1}, K], got {tuple(filt.shape)=}")
    if not 0 <= pad < filt.shape[1]:
        raise ValueError(f"{_OP}: pad must be in [0, K) = [0, {filt.shape[1]}), got {pad=}")
    c_in, c_out = x.shape[1], weight.shape[0]
    if groups < 1 or c_in % groups or c_out % groups or weight.shape[1] * groups != c_in:
        raise ValueError(f"{_OP}: channels do not fit {groups=}: {x.shape=}, {weight.shape=}")
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"{_OP}: bias must be [C_out]=[{c_out}], got {bias.shape=}")
    return order


@torch.library.custom_op("msconv::mf_conv2d_fused", mutates_args=())
def _mf_conv2d_fused(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, filt: torch.Tensor, pad: int,
    padding_mode: str, groups: int,
) -> torch.Tensor:
    order = _check(x, weight, bias, filt, pad, padding_mode, groups)
    return torch.ops.msconv.mf_conv_fwd(x, weight, bias, filt, order, pad, MODES.index(padding_mode), groups)


@_mf_conv2d_fused.register_fake
def _(x, weight, bias, filt, pad, padding_mode, groups):
    _check(x, weight, bias, filt, pad, padding_mode, groups)
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


def _setup(ctx, inputs, output):
    x, weight, bias, filt, pad, padding_mode, groups = inputs
    ctx.save_for_backward(x, weight, bias, filt)
    ctx.args = (pad, padding_mode, groups)


def _backward(ctx, grad):
    x, weight, bias, filt = ctx.saved_tensors
    pad, mode, groups = ctx.args
    need = ctx.needs_input_grad
    grad = grad.contiguous()
    if torch.is_grad_enabled():  # double backward: differentiate the twin
        inputs = [t for t, n in zip((x, weight, bias, filt), need[:4]) if n]
        with torch.enable_grad():
            y = mf_conv2d_fused_ref(x, weight, bias, filt, pad, mode, groups)
            got = iter(torch.autograd.grad(y, inputs, grad, create_graph=True))
        return tuple(next(got) if n else None for n in need[:4]) + (None, None, None)
    order = _order(weight)
    gx, gw = torch.ops.msconv.mf_conv_bwd(
        grad, x, weight, filt, order, pad, MODES.index(mode), groups, need[0], need[1]
    )
    gb = grad.sum((0, 2, 3)) if need[2] else None
    gf = None
    if need[3]:
        from msconv.ops.mf_jets import _filt_grad

        p = _pads(filt.shape[1], pad)
        gjets = F.conv_transpose2d(grad, weight.reshape(weight.shape[0], -1, 1, 1), groups=groups)
        gf = _filt_grad(reference.mf_pad(x, p, p, mode), filt, gjets, order, 1)
    return (gx if need[0] else None), (gw if need[1] else None), gb, gf, None, None, None


_mf_conv2d_fused.register_autograd(_backward, setup_context=_setup)

if _backend.has_cpp() and hasattr(torch.ops.msconv, "mf_conv_bwd"):
    # The backward calls the compiled op directly: torch.compile traces it through this.
    @torch.library.register_fake("msconv::mf_conv_bwd")
    def _(grad, x, theta, filt, order, pad, mode, groups, need_x, need_theta):
        return (x.new_empty(x.shape) if need_x else x.new_empty(0),
                theta.new_empty(theta.shape) if need_theta else x.new_empty(0))


def mf_conv2d_fused(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, filt: torch.Tensor, pad: int,
    padding_mode: str = "zeros", groups: int = 1,
) -> torch.Tensor:
    """Stride-1 mesh-free convolution, jets and mix fused (CPU kernel; see the module docstring).

    Args:
        x: ``[N, C_in, H, W]`` float32/float64 on CPU.
        weight: θ ``[C_out, C_in/groups, M]``; bias: ``[C_out]`` or None.
        filt: ``[order + 1, K]`` correlation filters (``mf_taps(...)[0].flip(-1)``), x's dtype.
        pad: cells of padding before the image on both axes (``kmax``); ``K − 1 − pad`` after.
    Returns:
        ``[N, C_out, H, W]``, equal to :func:`mf_conv2d_fused_ref` up to rounding.

    >>> from msconv.reference import mf_taps
    >>> taps, kmin = mf_taps(2, 0.5, 1.0)
    >>> mf_conv2d_fused(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 6), None, taps.flip(-1).float(),
    ...                 kmin + taps.shape[1] - 1).shape
    torch.Size([1, 4, 8, 8])
    """
    return _mf_conv2d_fused(x, weight, bias, filt, pad, padding_mode, groups)

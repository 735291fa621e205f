"""Mesh-free convolution, functional form: ``mf_conv2d``.

Three ways to compute the same discrete operator (msconv.reference.mf_conv2d_ref defines it):

* ``separable`` — at stride 1 on CPU (compiled extension, float32/64) the fused kernel
  ``torch.ops.msconv.mf_conv2d_fused`` (msconv.ops.mf_conv_fused): per tile of output rows, the
  p+1 column passes of each input channel, the mix with θ as small GEMMs, then the p+1 row
  passes of each output channel — ``(p+1)·K·(C_in + C_out) + C_out·C_in/g·M`` multiply-adds
  per pixel and nothing but x and y in memory. Otherwise pad per ``padding_mode``, the
  separable jets ``J[c,(a,b)] = (w_a ⊗ w_b) * u_c`` (shared by every output channel;
  ``torch.ops.msconv.mf_jets`` when the compiled/Triton kernels are installed, else the
  plain-PyTorch correlation of msconv.reference), then the channel mix as a grouped 1×1
  convolution with θ: ``C_in·((p+1)·K·S + M·K) + C_out·C_in/g·M`` per output pixel. Both are
  linear in the stencil width K; the stride is applied inside the jets.
* ``fft`` — circular padding only: the jets of all H×W positions as one real FFT of the input
  times the DFT of the circularly wrapped cell-integrated taps (not the continuous multiplier
  ``(i kx)^a (i ky)^b e^{−σ²|k|²/2}``, so it is the *same* discrete operator as the other paths,
  equal to rounding), an inverse FFT per jet, the output cells ``S·I`` picked out (exact for
  every stride: the periodic output at the cell-centred positions, sizes not divisible by S
  included), then the same 1×1 mix. Cost independent of σ/s: the path for very wide stencils.
* ``dense`` — F.conv2d with the dense (2r+1)² sampled stencil (what the reference computes);
  the fallback where only the plain-PyTorch jets exist.

``auto`` picks by the cost model in :func:`_method_costs`.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from msconv import reference
from msconv.grid import current_grid_scale
from msconv.ops import _backend
from msconv.ops import mf_conv_fused as _fused
from msconv.ops._common import check_choice, check_image

__all__ = ["mf_conv2d", "METHODS", "PADDING_MODES"]

METHODS = ("auto", "separable", "fft", "dense")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_OP = "mf_conv2d"

# Relative time per multiply-add of each kind of work, 1 = a GEMM-backed convolution (mkldnn /
# cuDNN), for forward+backward (training). Fitted to paired single-thread timings (each path
# against the dense stencil conv in alternation, median ratio) on the shared 2-core AMD EPYC
# development CPU, N=2, 64×64, σ=½, p=2, float32, 16 and 64 channels, s = 1…1/32:
# * ``fused``: the stride-1 CPU kernel (msconv.ops.mf_conv_fused), per multiply-add of its
#   (p+1)·K-tap passes over C_in + C_out planes; its GEMMs count as ``mix``. Measured
#   separable/dense 0.46, 0.25 (s=1; 16, 64 ch), 0.20, 0.10 (s=½), 0.037, 0.026 (s=¼),
#   0.009, 0.005 (s=⅛); the model says 0.44, 0.20, 0.24, 0.10 where the dense conv is still
#   efficient (K ≤ 11; beyond, dense runs 2-3× slower per MAC and is never picked anyway).
# * ``jets``: the separate jets kernel with its adjoint (stride > 1, or GPU backends): fitted at
#   stride 2, separable/dense 0.88 and 0.46 at s=1 (16, 64 ch), 0.55, 0.21 at s=½.
# * ``fft``: per modelled FFT multiply-add; against the fused kernel with circular padding it
#   crosses over at K ≈ 70 (measured sep/fft 0.79, 0.98 at K=67; 2.5, 1.6 at K=131; 0.58,
#   0.40 at K=35, where the old model picked fft).
# * ``jets_reference``: the plain-PyTorch jets (a 1×K conv per plane), ~100× per MAC.
# So auto now picks separable for every measured stride-1 zeros-padded case (dense only
# with the reference jets), fft for circular padding from K ≈ 70. GPU factors are not
# measured (no GPU here): the CPU ones stand in.
_EFF = {"fused": 6.0, "jets": 6.0, "jets_reference": 100.0, "mix": 1.0, "dense": 1.0, "fft": 12.0}


def _load_jets_op():
    """``torch.ops.msconv.mf_jets`` if its module (the compiled/Triton jets kernels) is installed.

    Resolved once at import: dynamo cannot trace an import inside a compiled forward.
    """
    global _JETS_LIMITS
    try:
        import msconv.ops.mf_jets as mod  # registers the op
    except ImportError:
        return None
    _JETS_LIMITS = (getattr(mod, "MAX_ORDER", 8), getattr(mod, "MAX_TAPS", 256))
    return getattr(torch.ops.msconv, "mf_jets", None)


def _jets_op():
    global _JETS_OP
    if _JETS_OP is _UNSET:
        _JETS_OP = _load_jets_op()
    return _JETS_OP


_UNSET = object()
_JETS_OP = _UNSET
_JETS_LIMITS = (8, 256)  # (max order, max taps)


_TAPS_CACHE: dict = {}


def _taps(order: int, sigma, scale: float, stride: int, dtype: torch.dtype, device: torch.device):
    """(correlation filters ``[order+1, K]`` in ``dtype`` on ``device``, kmin); cached for float σ.

    A σ that requires grad is recomputed every call so autograd sees it; a float σ is cached
    because the ~30 small ops that build the taps cost more than the convolution on tiny inputs.
    """
    if isinstance(sigma, torch.Tensor) and sigma.requires_grad:
        with warnings.catch_warnings():  # mf_taps reads σ's value for the support: intended
            warnings.filterwarnings("ignore", "Converting a tensor with requires_grad=True to a scalar")
            taps, kmin = reference.mf_taps(order, sigma, scale, stride)
        return taps.flip(-1).to(device=device, dtype=dtype), kmin
    sig = float(sigma)
    key = (order, sig, float(scale), stride, dtype, device)
    if torch.compiler.is_compiling():  # dynamo traces the computation instead of a dict lookup
        taps, kmin = reference.mf_taps(order, sig, scale, stride)
        return taps.flip(-1).to(device=device, dtype=dtype), kmin
    hit = _TAPS_CACHE.get(key)
    if hit is None:
        if len(_TAPS_CACHE) > 256:
            _TAPS_CACHE.clear()
        taps, kmin = reference.mf_taps(order, sig, scale, stride)
        filt = taps.flip(-1).to(dtype)
        # Once per cache entry, on the host (a meta device has no values to check): past some
        # order the Gaussian-derivative taps leave the dtype's range (MFConv2d refuses such
        # orders up front; the functional form finds out here).
        if not bool(torch.isfinite(filt).all()):
            raise ValueError(
                f"{_OP}: order={order} is too high for sigma={sig:g} on grid_scale({scale:g}) in {dtype}: the "
                "Gaussian-derivative taps overflow and the output would be NaN; use a lower order (MFConv2d's "
                "error names the largest usable one), a larger sigma, or float64 inputs"
            )
        hit = _TAPS_CACHE[key] = (filt.to(device), kmin)
    return hit


def _static_float(v):
    """``v`` as a constant of the traced graph, guarded on its value.

    A Python float read from module or thread-local state reaches dynamo as a symbolic float
    once its value has changed between compiles (automatic dynamic, ``specialize_float=False``);
    the scale and σ fix tensor sizes (the stencil radius), so they must be concrete. Rebuilding
    the float from its exact hex form makes dynamo specialize and guard on it: each distinct
    scale gets its own graph, as msconv.nn.grid promises.
    """
    return float.fromhex(float(v).hex())


def _method_costs(
    n, c_in, c_out, groups, order, k, h, w, stride, padding_mode, jets_backend="cpp", fused=None
) -> dict:
    """Estimated cost (weighted multiply-adds) of each path; ``auto`` takes the smallest.

    Per path: separable = the fused kernel's (p+1)·K-tap passes over the input and output
    planes + mix (``fused``; default: stride 1 on the ``cpp`` backend), else the jets (vertical
    pass on every S-th row of the padded width, then one horizontal pass per jet) + mix;
    dense = the (K×K) stencil conv; fft = forward rFFT of each input plane, one product and one
    inverse rFFT per jet at all H×W positions, + mix. ``jets_backend`` is the backend the
    separable jets would run on (``reference`` = PyTorch).
    """
    m = (order + 1) * (order + 2) // 2
    ho, wo = -(-h // stride), -(-w // stride)
    wp = stride * (wo - 1) + k
    mix = n * ho * wo * c_out * (c_in // groups) * m * _EFF["mix"]
    if fused is None:
        fused = stride == 1 and jets_backend == "cpp"
    if fused:
        sep = n * h * w * (order + 1) * k * (c_in + c_out) * _EFF["fused"] + mix
    else:
        jets_eff = _EFF["jets_reference" if jets_backend == "reference" else "jets"]
        sep = n * c_in * ((order + 1) * k * ho * wp + m * k * ho * wo) * jets_eff + mix
    costs = {
        "separable": sep,
        "dense": n * ho * wo * c_out * (c_in // groups) * k * k * _EFF["dense"],
    }
    if padding_mode == "circular":
        # ~2.5·log2(HW) multiply-adds per point of a real 2-D FFT.
        fft_pt = 2.5 * math.log2(max(h * w, 2))
        costs["fft"] = n * c_in * h * w * ((1 + m) * fft_pt + 2 * m) * _EFF["fft"] + mix
    return costs


# The size the cost model assumes for a dimension that is symbolic under
# torch.compile(dynamic=True). The method is a speed choice only (every path computes the same
# operator), and at stride 1 the separable/dense ratio does not depend on N, H, W at all; the fft
# and strided costs do only through log2(H·W) and the edge columns, so a nominal value costs
# little, while comparing symbolic costs would guard on (or fail to decide) sizes.
_NOMINAL_SIZE = 64


def _concrete(v):
    """``v`` if it is a plain int, else (a SymInt of a dynamic-shape graph) :data:`_NOMINAL_SIZE`."""
    return v if type(v) is int else _NOMINAL_SIZE


def _cheapest(costs: dict) -> str:
    """The key of the smallest cost, first on ties (``min(costs, key=costs.get)``, which dynamo
    cannot trace with ``fullgraph=True``)."""
    best = None
    for name, cost in costs.items():
        if best is None or cost < costs[best]:
            best = name
    return best


def _check_args(x, weight, bias, sigma, scale, stride, padding_mode, groups, method):
    check_image(x, "x", _OP)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(
            f"{_OP}: weight must be θ of shape [C_out, C_in/groups, (p+1)(p+2)/2], got {shape}; "
            "a k×k nn.Conv2d weight is converted with msconv.convert"
        )
    order = reference.mf_order_of(weight.shape[-1])
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{_OP}: groups must be a positive int, got groups={groups!r}")
    c_in, c_out = x.shape[1], weight.shape[0]
    if c_in % groups or c_out % groups or weight.shape[1] * groups != c_in:
        raise ValueError(
            f"{_OP}: channels do not fit groups={groups}: x has C_in={c_in}, weight.shape={tuple(weight.shape)}; "
            "need C_in and C_out divisible by groups and weight.shape[1] == C_in // groups"
        )
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(
            f"{_OP}: weight ({weight.dtype}, {weight.device}) must match x ({x.dtype}, {x.device}); "
            "move the layer with .to(x.device, x.dtype)"
        )
    if bias is not None and (bias.shape != (c_out,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"{_OP}: bias must be [C_out]={c_out} in x's dtype and device, got {bias.shape=}, {bias.dtype}")
    if isinstance(sigma, torch.Tensor) and sigma.device.type == "meta":
        raise ValueError(
            f"{_OP}: sigma is a tensor on the meta device, whose value (the stencil width) cannot be read; "
            "pass sigma as a float for shape-only (meta) runs"
        )
    sig = float(sigma.detach()) if isinstance(sigma, torch.Tensor) and sigma.numel() == 1 else sigma
    sig = sig if isinstance(sig, (int, float)) and not isinstance(sig, bool) else float("nan")
    if not (sig > 0 and math.isfinite(sig)):
        raise ValueError(
            f"{_OP}: sigma must be a finite number > 0 (the Gaussian width in reference pixels), got sigma={sigma}; "
            "kernel_size / 6 matches a kernel_size×kernel_size footprint at scale 1"
        )
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0 and math.isfinite(scale)):
        raise ValueError(f"{_OP}: scale must be a finite number > 0 (grid spacing in reference pixels), got scale={scale!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"{_OP}: stride must be an int >= 1, got stride={stride!r}")
    check_choice(padding_mode, "padding_mode", _OP, PADDING_MODES)
    check_choice(method, "method", _OP, METHODS)
    if method == "fft" and padding_mode != "circular":
        raise ValueError(
            f"{_OP}: method='fft' computes a periodic convolution and needs padding_mode='circular', "
            f"got padding_mode={padding_mode!r}; use method='separable' (or 'auto')"
        )
    return order


def _pad(x, kmin, k, stride, padding_mode):
    """x extended so that a K-tap correlation with ``stride`` gives the ceil(H/S) output cells."""
    pad_h = reference.mf_padding(x.shape[-2], kmin, k, stride)
    return reference.mf_pad(x, pad_h, reference.mf_padding(x.shape[-1], kmin, k, stride), padding_mode)


def _dense(x, weight, bias, filt, kmin, order, stride, padding_mode, groups):
    """msconv.reference.mf_conv2d_ref's dense-stencil conv, built from the cached taps."""
    basis = torch.stack([filt[b][:, None] * filt[a][None, :] for a, b in reference.mf_multi_indices(order)])
    stencil = torch.einsum("ocm,mtq->octq", weight, basis.to(weight.dtype))
    return F.conv2d(_pad(x, kmin, filt.shape[1], stride, padding_mode), stencil, bias, stride=stride, groups=groups)


def _separable(x, filt, kmin, order, stride, padding_mode, backend):
    k = filt.shape[1]
    xp = _pad(x, kmin, k, stride, padding_mode)
    op = _jets_op() if backend != "reference" else None
    # The kernels' limits (msconv.ops.mf_jets): wider stencils or higher orders run in PyTorch.
    if op is None or k > _JETS_LIMITS[1] or order > _JETS_LIMITS[0]:
        return reference.mf_jets_ref(xp, filt, order, stride)
    return op(xp, filt, order, stride, backend)


def _use_fused(x, order, k, stride, backend) -> bool:
    """The fused stride-1 kernel (msconv.ops.mf_conv_fused) runs the separable path on CPU."""
    return stride == 1 and backend == "cpp" and _fused.available(x, order, k)


def _fft_jets(x, filt, kmin, order, stride):
    """Jets of the periodic field at the output cells, [N, C·M, ceil(H/S), ceil(W/S)]."""
    n, c, h, w = x.shape
    k = filt.shape[1]
    kmax = kmin + k - 1

    def wrapped_dft(length: int, real_half: bool):
        # Correlation entry q multiplies u[i + q − kmax], i.e. taps at offset kmax − q; the
        # periodic kernel holds offset d at index d mod length (several offsets may share one).
        idx = torch.arange(kmax, kmax - k, -1, device=x.device).remainder(length)
        ker = filt.new_zeros(order + 1, length).index_add(1, idx, filt)
        return torch.fft.rfft(ker, dim=-1) if real_half else torch.fft.fft(ker, dim=-1)

    fy, fx = wrapped_dft(h, False), wrapped_dft(w, True)  # [p+1, H], [p+1, W//2+1]
    u = torch.fft.rfft2(x)  # [N, C, H, W//2+1]
    mult = torch.stack([fy[b][:, None] * fx[a][None, :] for a, b in reference.mf_multi_indices(order)])
    # 4-D from here on: inductor cannot order the strides of a 5-D FFT output with symbolic sizes
    # (torch.compile(dynamic=True) failed with "cannot determine truth value of Relational").
    spec = (u[:, :, None] * mult).reshape(n, -1, h, u.shape[-1])  # [N, C·M, H, W//2+1]
    jets = torch.fft.irfft2(spec, s=(h, w))  # [N, C·M, H, W]
    return jets[..., ::stride, ::stride]


def mf_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    sigma: float | torch.Tensor = 0.5,
    scale: float | None = None,
    stride: int = 1,
    padding_mode: str = "zeros",
    groups: int = 1,
    method: str = "auto",
    backend: str | None = None,
) -> torch.Tensor:
    """Mesh-free convolution of ``x`` on a grid of spacing ``scale`` reference pixels.

    Args:
        x: ``[N, C_in, H, W]`` floating.
        weight: θ, ``[C_out, C_in/groups, M]`` with ``M = (p+1)(p+2)/2`` for order p, in the jet
            order of ``msconv.reference.mf_multi_indices``.
        bias: ``[C_out]`` or None.
        sigma: Gaussian width in reference pixels; a tensor that requires grad is learnable.
        scale: grid spacing s; None reads ``msconv.current_grid_scale()``.
        stride: output grid spacing ``stride·s``, computed directly; output cell I is centred on
            input cells ``S·I … S·I+S−1``.
        padding_mode: ``zeros``, ``reflect``, ``replicate`` or ``circular``.
        method: ``auto``, ``separable``, ``fft`` (circular only) or ``dense``.
        backend: jets kernel backend (``auto|cpp|cuda|triton|reference``; default MSCONV_BACKEND).
    Returns:
        ``[N, C_out, ceil(H/stride), ceil(W/stride)]`` in x's dtype; equals
        ``msconv.reference.mf_conv2d_ref`` up to rounding.

    >>> y = msconv.mf_conv2d(torch.randn(2, 3, 32, 32), torch.randn(8, 3, 6), sigma=0.5, scale=0.5)
    >>> y.shape
    torch.Size([2, 8, 32, 32])
    """
    if scale is None:
        scale = current_grid_scale()
    if torch.compiler.is_compiling():
        scale = _static_float(scale)
        if not isinstance(sigma, torch.Tensor):
            sigma = _static_float(sigma)
    order = _check_args(x, weight, bias, sigma, scale, stride, padding_mode, groups, method)
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    b = _backend.resolve(_OP, x.device, backend)
    # CPU half-precision convolutions and FFTs are slow or missing: compute in float32 (the
    # fp32 accumulation every kernel uses) and round once at the end.
    out_dtype = x.dtype
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        x, weight = x.float(), weight.float()
        bias = bias.float() if bias is not None else None
    filt_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    filt, kmin = _taps(order, sigma, float(scale), stride, filt_dtype, x.device)
    if method == "auto":
        jb = b if _jets_op() is not None and filt.shape[1] <= _JETS_LIMITS[1] and order <= _JETS_LIMITS[0] else "reference"
        fused = _use_fused(x, order, filt.shape[1], stride, b)
        sizes = [_concrete(v) for v in (n, c_in, c_out, h, w)]
        costs = _method_costs(*sizes[:3], groups, order, filt.shape[1], *sizes[3:], stride, padding_mode, jb, fused)
        method = _cheapest(costs)
    if method == "dense":
        return _dense(x, weight, bias, filt, kmin, order, stride, padding_mode, groups).to(out_dtype)
    k = filt.shape[1]
    if method == "separable" and _use_fused(x, order, k, stride, b):
        y = _fused.mf_conv2d_fused(x, weight, bias, filt.to(x.dtype), kmin + k - 1, padding_mode, groups)
        return y.to(out_dtype)
    if method == "fft":
        jets = _fft_jets(x if x.dtype == filt_dtype else x.float(), filt, kmin, order, stride).to(x.dtype)
    else:
        jets = _separable(x, filt if x.dtype == filt_dtype else filt.to(x.dtype), kmin, order, stride, padding_mode, b)
    y = F.conv2d(jets, weight.reshape(c_out, -1, 1, 1), bias, groups=groups)
    return y.to(out_dtype)


_jets_op()

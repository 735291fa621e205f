"""MFConv2d: the mesh-free convolution layer, a drop-in replacement for nn.Conv2d."""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn as nn

from msconv import reference
from msconv._memory import check_fits
from msconv.grid import current_grid_scale
from msconv.ops._common import is_channels_last
from msconv.ops.mfconv import METHODS, PADDING_MODES, mf_conv2d

__all__ = ["MFConv2d", "UnresolvedSigmaWarning", "DEFAULT_SIGMA_FLOOR"]

# The σ floor MFConv2d and convert() use unless told otherwise: the training CLI's default
# (--mf-sigma-floor 0.5), where σ is resolved exactly when σ >= s/2.
DEFAULT_SIGMA_FLOOR = 0.5


class UnresolvedSigmaWarning(UserWarning):
    """An MFConv2d runs on a grid coarser than twice its σ, where its derivative taps vanish."""


# (σ, s) pairs already warned about: the warning is about the configuration, not each call.
_WARNED_UNRESOLVED: set = set()


def _init_bound(order: int, sigma: float, fan_in: int) -> torch.Tensor:
    """Per-basis-function uniform bound of the default θ init, float64 ``[M]`` (see reset_parameters)."""
    # A wide σ has ~8σ taps at s = 1; for σ > 64 the s = 1 energy Σ tap² ≈ ∫ g_a² is taken from cells of
    # σ/64 (each tap there is its width times g_a, so Σ tap² / width is the same Riemann sum).
    scale = max(1.0, sigma / 64)
    taps, _ = reference.mf_taps(order, sigma, scale)
    taps = taps / math.sqrt(scale)
    energy = torch.stack([(taps[a] ** 2).sum() * (taps[b] ** 2).sum() for a, b in reference.mf_multi_indices(order)])
    return (1.0 / (fan_in * len(energy) * energy)).sqrt()


def _representable(bound: torch.Tensor, dtype: torch.dtype) -> bool:
    return bool(torch.isfinite(bound).all()) and float(bound.max()) <= torch.finfo(dtype).max


def _smallest_representable_sigma(order: int, fan_in: int, dtype: torch.dtype) -> float:
    """Bisection for the σ below which the θ init overflows ``dtype`` (for the error message)."""
    lo, hi = 1e-3, 1.0
    for _ in range(30):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if _representable(_init_bound(order, mid, fan_in), dtype) else (mid, hi)
    return hi


# How far below the dtype's largest finite number the largest tap must stay. The jets sum K
# products tap × input, and the taps of very fine grids exceed those of s = 1 by up to ~3×
# (measured at order 44, σ = ½, s = 1/8), so 2^16 leaves room for inputs and activations of a
# few thousand. Measured at σ = ½ (kernel_size 3) in float32: the s = 1 taps pass 3.4e38 at
# order 45 (NaN outputs), the s = 1/8 taps at order 44, an input of 1e3 overflows the jets
# from order 42; with this headroom the largest usable order is 40.
_TAP_HEADROOM = 2.0**16


def _compute_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the taps are applied in: float64 for a float64 layer, else float32 (see mf_conv2d)."""
    return torch.float64 if (dtype or torch.get_default_dtype()) == torch.float64 else torch.float32


def _usable_orders(order: int, sigma: float, dtype: torch.dtype) -> int:
    """How many derivative orders 0, 1, … have s = 1 taps that fit ``dtype`` with the headroom.

    The largest tap of order a grows like σ^-a·sqrt(a!) (the Gaussian's a-th derivative), so
    past some order the taps, and the jets, overflow and the layer returns NaN.
    """
    # A wide σ would need ~8σ taps at s = 1 (1e7 → 80 M); cells of σ/64 resolve every derivative the
    # order check can reach (oscillations of width ~σ/√order), and a cell's tap is its width times g_a there.
    scale = max(1.0, sigma / 64)
    taps, _ = reference.mf_taps(order, sigma, scale)
    taps = taps / scale
    limit = torch.finfo(dtype).max / _TAP_HEADROOM
    fits = torch.isfinite(taps).all(-1) & (taps.abs().amax(-1) <= limit)  # [order + 1]
    return int(fits.int().cumprod(0).sum())


def _check_order(order: int, sigma: float, dtype: torch.dtype | None) -> None:
    compute = _compute_dtype(dtype)
    usable = _usable_orders(order, sigma, compute)
    if usable <= order:
        raise ValueError(
            f"MFConv2d: order={order} is too high for sigma={sigma:g} in {compute}: the taps of the order-{usable} "
            f"Gaussian derivative exceed {compute}'s range (they grow like sigma^-order·sqrt(order!)) and the "
            f"layer would return NaN. The largest usable order here is {usable - 1}; use order <= {usable - 1} or a "
            "larger sigma" + (", or a float64 layer (dtype=torch.float64)" if compute != torch.float64 else "")
        )


def _square(value, name: str) -> int:
    """An int, or a tuple of two equal ints (what nn.Conv2d's _pair accepts), as one int."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(
                f"MFConv2d: {name} must be an int or a square pair (k, k), got {name}={tuple(value)}; the "
                "mesh-free kernel is isotropic (one σ for both axes), so a non-square "
                f"{name} cannot be honoured — use a square one"
            )
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"MFConv2d: {name} must be a positive int, got {name}={value!r}")
    return value


def _shortest_decimal(sigma: torch.Tensor) -> float:
    """The shortest decimal that rounds to ``sigma``'s float16/float32 value, as a Python float.

    A σ given as 0.9 and saved in float32 (0.89999998) comes back as 0.9; what a checkpoint of
    format 1 (σ in the module's dtype) holds is most likely such a rounded decimal."""
    if sigma.dtype in (torch.float16, torch.float32):
        return float(str(sigma.detach().cpu().numpy()[()]))
    return float(sigma)


class MFConv2d(nn.Module):
    r"""Mesh-free 2-D convolution: ``bias + Σ_c Σ_{a+b≤p} θ[o,c,(a,b)] ∂x^a ∂y^b G_σ * u_c``.

    The kernel is a function in physical (reference-pixel) coordinates, sampled on the grid of
    spacing ``s = msconv.current_grid_scale()`` at every call, so the layer is the same operator
    at every resolution. Arguments are nn.Conv2d's; the differences:

    * ``kernel_size`` only chooses the default ``sigma = kernel_size / 6`` (the ±3σ footprint
      equals ``kernel_size`` reference pixels at s = 1); the stencil actually sampled has radius
      ``ceil(4σ/s + ½)`` pixels.
    * ``padding`` is always "same" on the cell-centred grid: ``"same"`` or the int/pair
      ``kernel_size // 2`` (odd kernel sizes) are accepted and mean that.
    * ``stride`` S gives ``ceil(H/S)`` output cells of spacing ``S·s``, each centred on its S×S
      block of input cells (half a pixel off nn.Conv2d's sample points for even S).
    * ``dilation`` must be 1 (a dilated kernel has no mesh-free meaning).

    Keyword-only: ``order`` p of the derivative basis (M = (p+1)(p+2)/2 weights per channel
    pair; 6 for p = 2), ``sigma`` in reference pixels, ``learn_sigma`` (σ a parameter, else a
    buffer), ``method`` (``auto``, ``separable``, ``fft`` for circular padding, ``dense``),
    ``sigma_floor`` (default 0.5, the training CLI's; f > 0: on a grid with ``f·s > σ`` the layer
    uses ``σ_s = f·s`` and multiplies the weight of jet (a, b) by ``(σ_s/σ)^(a+b)``, so a grid too
    coarse for σ applies, in its own pixels, the stencil of the finest grid where ``σ = f·s``
    instead of a blur with vanishing derivative taps; grids that resolve σ are unchanged. f = 0.5
    matches the resolution rule ``σ >= s/2``; None: off, the fixed σ on every grid).
    ``order`` is limited by the float range: past about 40 for σ = ½ in float32 the
    Gaussian-derivative taps overflow, and the constructor says which order is the largest.
    A learnable σ sets the stencil support from its current value, one host read per call (a
    graph break under torch.compile); a fixed σ is a Python constant and compiles fully.

    Shapes: input ``[N, C_in, H, W]``, output ``[N, C_out, ceil(H/S), ceil(W/S)]``, weight
    ``[C_out, C_in/groups, M]``, bias ``[C_out]``, sigma ``[]``.

    Example::

        >>> layer = msconv.MFConv2d(3, 16, kernel_size=3)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> y1 = layer(x)
        >>> with msconv.grid_scale(2.0):           # the same layer on a 2× coarser image
        ...     y2 = layer(msconv.restrict(x))      # ≈ msconv.restrict(y1)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        stride=1,
        padding="same",
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        order: int = 2,
        sigma: float | None = None,
        learn_sigma: bool = False,
        method: str = "auto",
        sigma_floor: float | None = DEFAULT_SIGMA_FLOOR,
    ):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MFConv2d: {name} must be a positive int, got {name}={v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"MFConv2d: in_channels={in_channels} and out_channels={out_channels} must both be divisible "
                f"by groups={groups}"
            )
        k = _square(kernel_size, "kernel_size")
        stride = _square(stride, "stride")
        if _square(dilation, "dilation") != 1:
            raise ValueError(
                f"MFConv2d: dilation={dilation!r} cannot be honoured: a mesh-free kernel is a smooth function "
                "sampled on the grid, it has no holes; use dilation=1 and a larger sigma (or kernel_size) "
                "for a wider receptive field"
            )
        if padding != "same":
            pad = tuple(padding) if isinstance(padding, (tuple, list)) else (padding, padding)
            if isinstance(padding, str) or k % 2 == 0 or pad != (k // 2, k // 2):
                raise ValueError(
                    f"MFConv2d: padding={padding!r} is not supported: MFConv2d always keeps the cell-centred "
                    f"'same' grid (ceil(H/stride) output cells); pass padding='same' (or kernel_size//2 = {k // 2} "
                    "for an odd kernel_size)"
                )
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"MFConv2d: unknown padding_mode={padding_mode!r}; use one of {PADDING_MODES}")
        if method not in METHODS:
            raise ValueError(f"MFConv2d: unknown method={method!r}; use one of {METHODS}")
        if method == "fft" and padding_mode != "circular":
            raise ValueError("MFConv2d: method='fft' needs padding_mode='circular'; use method='separable' or 'auto'")
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ValueError(f"MFConv2d: order must be an int >= 0 (the highest derivative order), got order={order!r}")
        if sigma is None:
            sigma = k / 6.0
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(
                f"MFConv2d: sigma must be a finite number > 0 in reference pixels, got sigma={sigma!r}; "
                "leave it None for kernel_size / 6"
            )
        if sigma_floor is not None and (
            isinstance(sigma_floor, bool) or not isinstance(sigma_floor, numbers.Real)
            or not (math.isfinite(sigma_floor) and sigma_floor > 0)
        ):
            raise ValueError(
                f"MFConv2d: sigma_floor must be None or a finite number > 0 in grid pixels, got "
                f"sigma_floor={sigma_floor!r}; 0.5 uses sigma = s/2 on grids too coarse for sigma"
            )
        _check_order(order, float(sigma), dtype)
        self.sigma_floor = None if sigma_floor is None else float(sigma_floor)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.dilation = (k, k), (stride, stride), padding, (1, 1)
        self.padding_mode, self.order, self.method, self.learn_sigma = padding_mode, order, method, learn_sigma
        m = (order + 1) * (order + 2) // 2
        fk = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, m, **fk))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **fk))
        else:
            self.register_parameter("bias", None)
        if learn_sigma:
            self.sigma = nn.Parameter(torch.tensor(float(sigma), **fk))
        else:
            # Stored in float64 whatever the module dtype (see _apply): a float64 holds the Python
            # float exactly, so a checkpoint reloads the very σ it was saved with.
            self.register_buffer("sigma", torch.tensor(float(sigma), dtype=torch.float64, device=device))
        # A fixed σ is used as a Python float: exact whatever the module dtype (a float16 buffer
        # would round it) and free of host syncs and graph breaks under torch.compile.
        self._sigma = float(sigma)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's default output variance, for a white-noise input at s = 1.

        nn.Conv2d draws w ~ U(±1/√fan_in), fan_in = C_in/g·k², so a unit white-noise input gives
        Var(y) = fan_in·Var(w) = 1/3. Here y = Σ_c Σ_m θ_m J_m and Var(J_m) = G_m = ‖stencil_m‖²
        (the s = 1 basis stencil's energy, which grows like σ^(−2(a+b)) for derivatives), so
        θ_m ~ U(±√(3·v_m)) with v_m = 1/(3·C_in/g·M·G_m) gives each of the C_in/g·M terms an
        equal share and Var(y) = 1/3 again. The bias is nn.Conv2d's, U(±1/√fan_in).
        """
        fan = self.in_channels // self.groups
        bound = _init_bound(self.order, self._sigma, fan)
        dtype = self.weight.dtype
        if not _representable(bound, dtype):
            # A σ far below the reference pixel: the derivative taps hold almost no energy on the
            # s = 1 grid (≈ exp(−1/(4σ²))), so θ would have to be huge to give them a share.
            floor = _smallest_representable_sigma(self.order, fan, dtype)
            raise ValueError(
                f"MFConv2d: sigma={self._sigma:g} is too small for order={self.order} in {dtype}: the derivative taps "
                f"vanish on the reference grid (s = 1) and the initial weights are not finite (the smallest "
                f"sigma that is representable here is about {floor:.3g}); use sigma >= 0.5 (= s/2, where the "
                "derivative taps are resolved at s = 1; the default is kernel_size / 6), or order=0 for a pure blur"
            )
        bound = bound.to(device=self.weight.device, dtype=torch.float32)
        with torch.no_grad():
            # σ too, for the meta-device recipe (build on meta, to_empty, reset_parameters).
            self.sigma.fill_(self._sigma)
            u = torch.rand(self.weight.shape, device=self.weight.device, dtype=torch.float32) * 2 - 1
            self.weight.copy_(u * bound)
            if self.bias is not None:
                b = 1.0 / math.sqrt(fan * self.kernel_size[0] ** 2)
                nn.init.uniform_(self.bias, -b, b)

    # 2: a fixed σ is saved in float64 (exact); 1 (or None): in the module's dtype.
    _version = 2

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if not self.learn_sigma:
            # .half()/.to(dtype) would round the fixed σ's buffer, to_empty() would leave it
            # undefined; it always holds the exact σ the layer computes with.
            self.sigma = torch.tensor(self._sigma, dtype=torch.float64, device=self.sigma.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        key = prefix + "sigma"
        sigma = state_dict.get(key)
        if sigma is not None:
            value = float(sigma) if isinstance(sigma, torch.Tensor) and sigma.numel() == 1 else float("nan")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"MFConv2d.load_state_dict: {key} must be a finite number > 0, got {sigma!r}; "
                    "the checkpoint is damaged or not from an MFConv2d"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)
        if sigma is None or key not in state_dict:
            return
        if not self.learn_sigma and sigma.dtype != torch.float64:
            # A checkpoint of format 1, or a learnable σ loaded into a fixed one: keep the exact σ
            # when the value is just its rounding (0.3 is stored as 0.30000001), else the decimal
            # it most likely rounds — a resumed run must compute the stencils of the run that saved it.
            if value != float(torch.tensor(self._sigma, dtype=sigma.dtype)):
                self._sigma = _shortest_decimal(sigma)
        else:
            self._sigma = value
        if not self.learn_sigma:
            self.sigma = torch.tensor(self._sigma, dtype=torch.float64, device=self.sigma.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C_in, H, W]`` on the grid of ``current_grid_scale()`` → ``[N, C_out, ceil(H/S), ceil(W/S)]``.

        Under ``torch.autocast`` the layer computes in its weights' dtype (float32 kernels: the
        derivative taps of a fine grid are too small for float16/bfloat16 sums) and returns the
        autocast dtype, as nn.Conv2d does. A channels_last input gives a channels_last output.
        """
        if isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex()):
            raise TypeError(
                f"MFConv2d: input must be a floating tensor, got x.dtype={x.dtype}; convert it first, "
                "e.g. x.float() / 255 for 8-bit images"
            )
        scale = current_grid_scale()
        if isinstance(x, torch.Tensor) and x.device.type == "meta":
            return self._meta_forward(x, scale)
        sigma = self.sigma if self.learn_sigma else self._sigma
        if isinstance(x, torch.Tensor) and not torch.compiler.is_compiling():
            # Host-side checks on Python numbers, skipped while tracing so that a compiled forward
            # has no graph break: a compiled model gets them from its eager calls only.
            sig = float(sigma.detach()) if isinstance(sigma, torch.Tensor) else sigma
            if not (math.isfinite(sig) and sig > 0):
                raise ValueError(
                    f"MFConv2d: the learnable sigma is now {sig:g}, not a finite number > 0: training pushed it "
                    "there (a diverging run); lower the learning rate, or use learn_sigma=False"
                )
            if self.sigma_floor is None:
                self._warn_if_unresolved(sig, scale)
            self._check_size(x, max(sig, self.sigma_floor * scale) if self.sigma_floor else sig, scale)
        out_dtype = None
        if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type) and torch.float64 not in (
            x.dtype, self.weight.dtype
        ):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        if out_dtype is not None:
            with torch.autocast(x.device.type, enabled=False):
                y = self._conv(x.to(self.weight.dtype), sigma, scale).to(out_dtype)
        else:
            y = self._conv(x, sigma, scale)
        if is_channels_last(x) and not is_channels_last(y):
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    def _meta_forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """Shapes only, as nn.Conv2d on meta tensors: a meta tensor has no value to read, so the
        stencil is sized from the σ the layer was built (or last loaded) with, and there is no
        autocast on the meta device."""
        weight, sigma = self.weight, self._sigma
        if self.sigma_floor is not None:
            sigma, weight = self._floored(sigma, scale)
        y = mf_conv2d(
            x, weight, self.bias, sigma, scale, self.stride[0], self.padding_mode, self.groups, "dense", "reference",
        )
        return y.contiguous(memory_format=torch.channels_last) if is_channels_last(x) else y

    def _conv(self, x, sigma, scale):
        weight = self.weight
        if self.sigma_floor is not None:
            sigma, weight = self._floored(sigma, scale)
        return mf_conv2d(
            x, weight, self.bias, sigma, scale, self.stride[0], self.padding_mode, self.groups, self.method,
        )

    def _floored(self, sigma, scale):
        """``(σ_s, θ·(σ_s/σ)^(a+b))`` with ``σ_s = max(σ, sigma_floor·s)``; θ ``[C_out, C_in/g, M]``.

        The jet (a, b) of width σ_s = f·s sampled at spacing s is s^-(a+b) times the s = 1 jet of
        width f, so the rescaled weights give the same stencil in grid pixels on every grid
        coarser than σ/f: the finest such grid's, where the two widths meet."""
        floor = self.sigma_floor * scale
        if isinstance(sigma, torch.Tensor):
            wide = torch.clamp(sigma, min=floor)
            if float(wide) == float(sigma):
                return sigma, self.weight
            ratio = wide / sigma
        else:
            if sigma >= floor:
                return sigma, self.weight
            wide, ratio = floor, floor / sigma
        degree = [a + b for a, b in reference.mf_multi_indices(self.order)]
        powers = torch.tensor(degree, device=self.weight.device, dtype=self.weight.dtype)
        return wide, self.weight * ratio ** powers

    def _warn_if_unresolved(self, sigma: float, scale: float) -> None:
        """Once per (σ, s): on grids coarser than 2σ the derivative taps nearly vanish (≈ 0 beyond
        s = 4σ), the layer is close to a 1×1 mix of blurred inputs there, and what a coarse grid
        trains does not carry over to the fine one."""
        if scale <= 2 * sigma or self.order == 0 or (sigma, scale) in _WARNED_UNRESOLVED:
            return
        _WARNED_UNRESOLVED.add((sigma, scale))
        warnings.warn(
            f"MFConv2d: sigma={sigma:g} reference pixels is not resolved on the grid grid_scale({scale:g}) "
            f"(needs sigma >= s/2 = {scale / 2:g}): its derivative taps nearly vanish there, so the layer acts "
            f"as a blur and those weights get almost no gradient. Use sigma >= {scale / 2:g}, or keep this "
            "layer on finer grids",
            UnresolvedSigmaWarning, stacklevel=5,  # the caller of layer(x), past nn.Module.__call__
        )

    def _check_size(self, x: torch.Tensor, sigma: float, scale: float) -> None:
        """Refuse, before allocating, a stencil whose padded input cannot fit in the device's memory."""
        if x.dim() != 4:
            return  # mf_conv2d raises its own clear error
        k = 2 * math.ceil(4.0 * sigma / scale + 0.5) + 1
        n, c, h, w = x.shape
        if self.padding_mode == "circular" and self.method in ("auto", "fft"):
            return  # the FFT path's memory does not grow with the stencil
        nbytes = n * c * (h + k - 1) * (w + k - 1) * x.element_size()
        if self.method == "dense":
            nbytes += self.out_channels * (c // self.groups) * k * k * x.element_size()
        check_fits(
            nbytes, x.device, "MFConv2d",
            f"sigma={sigma:g} on grid_scale({scale:g}) (a {k}×{k} stencil, input {tuple(x.shape)} padded to "
            f"{h + k - 1}×{w + k - 1})",
            "use a smaller sigma (the stencil radius is about 4·sigma/s pixels; kernel_size/6 by default) or "
            "a coarser grid; padding_mode='circular' computes wide stencils by FFT without this padding",
        )

    def __prepare_scriptable__(self):
        # torch.jit.script calls this before compiling; the layer's forward reads the grid scale
        # from thread-local state and sizes its stencil in Python, which TorchScript cannot express.
        raise TypeError(
            "MFConv2d cannot be compiled by torch.jit.script: its stencil is sized at each call from the grid "
            "scale and sigma in Python. Use torch.compile or torch.export on the eager model, or "
            "msconv.nn.bake(model, grid_scale=s) for plain nn.Conv2d layers at one grid scale, which "
            "torch.jit.script, torch.jit.trace and ONNX export accept"
        )

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        if self.stride != (1, 1):
            s += f", stride={self.stride}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.order != 2:
            s += f", order={self.order}"
        s += f", sigma={float(self.sigma) if self.learn_sigma else self._sigma:.4g}"
        if self.learn_sigma:
            s += ", learn_sigma=True"
        if self.sigma_floor != DEFAULT_SIGMA_FLOOR:
            s += ", sigma_floor=None" if self.sigma_floor is None else f", sigma_floor={self.sigma_floor:g}"
        if self.method != "auto":
            s += f", method={self.method!r}"
        return s

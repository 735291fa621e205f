"""Model zoo for image restoration: DnCNN, the paper's UNet and ResNet, ESPCN.

Every model is fully convolutional and resolution-agnostic (any H, W; the UNet pads to a
multiple of its pooling factor internally and crops back), and takes
``conv="standard"`` (nn.Conv2d) or ``conv="mf"`` (:class:`msconv.MFConv2d`, read lazily so
the zoo works before that layer is installed). 1×1 convolutions stay nn.Conv2d in both kinds:
a pointwise map already means the same operator at every grid spacing.

None uses BatchNorm by default: batch statistics couple the samples of a batch, which breaks
the per-sample weighting the multilevel estimator relies on (DnCNN takes ``batchnorm=True``
for the classic architecture).

>>> m = build_model("dncnn", in_channels=1, out_channels=1, depth=5, width=16)
>>> m(torch.rand(2, 1, 40, 40)).shape
torch.Size([2, 1, 40, 40])
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["make_conv", "he_init", "DnCNN", "UNet", "ResNet", "ESPCN", "MODELS", "build_model", "mf_available"]

CONV_KINDS = ("standard", "mf")
_TANH_GAIN = 5.0 / 3.0  # torch.nn.init.calculate_gain("tanh")


def mf_available() -> bool:
    """True when :class:`msconv.nn.MFConv2d` can be imported."""
    try:
        from msconv.nn import MFConv2d  # noqa: F401
    except ImportError:
        return False
    return True


def make_conv(conv, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True,
              dims: int = 2) -> nn.Module:
    """A 'same'-padded k×k (``dims=3``: k×k×k) convolution of the requested kind: ``standard``
    (nn.Conv2d / nn.Conv3d), ``mf`` (MFConv2d / MFConv3d), or a factory ``conv(in_channels,
    out_channels, kernel_size, bias)`` (what :func:`build_model` passes when the mesh-free layers get
    a non-default σ; it is called with ``dims=3`` for volumes)."""
    if callable(conv):
        return conv(in_channels, out_channels, kernel_size, bias) if dims == 2 else conv(
            in_channels, out_channels, kernel_size, bias, dims=dims)
    if conv == "standard":
        cls = nn.Conv2d if dims == 2 else nn.Conv3d
        return cls(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
    if conv == "mf":
        try:
            from msconv.nn import MFConv2d, MFConv3d
        except ImportError as e:
            raise ImportError(
                "conv='mf' needs msconv.nn.MFConv2d, which is not available in this install "
                f"({e}); use conv='standard' (CLI: --conv standard) or update msconv"
            ) from e
        return (MFConv2d if dims == 2 else MFConv3d)(in_channels, out_channels, kernel_size, padding="same", bias=bias)
    raise ValueError(f"conv must be one of {CONV_KINDS}, got {conv!r}")


def _check_dims(dims, who: str) -> int:
    if dims not in (2, 3) or isinstance(dims, bool):
        raise ValueError(f"{who}: dims must be 2 (images) or 3 (volumes), got dims={dims!r}")
    return dims


def _zero_init(m: nn.Module) -> nn.Module:
    # Residual models then start as the identity on the corrupted picture (PSNR = input PSNR)
    # instead of adding a random image to it, which costs early steps just to undo.
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def he_init(conv: nn.Module, gain: float = math.sqrt(2.0)) -> nn.Module:
    """Variance-preserving initialisation of a convolution followed by a nonlinearity of ``gain``
    (He et al. 2015: √2 for ReLU, 5/3 for tanh); biases start at zero.

    Why: PyTorch's default conv init gives Var(y) = Var(x)/3, so each conv-ReLU pair divides the
    signal's variance by 6; in a 17-layer DnCNN without BatchNorm the input is lost after 4 layers
    and only the biases reach the head (post-ReLU std ≈ 1.5e-2 from layer 5 on), which is why the
    default model did not learn. With He init every layer keeps Var ≈ Var(input).

    ``nn.Conv2d``: ``w ~ N(0, gain² / fan_in)``. :class:`msconv.MFConv2d`: its own initialisation
    gives nn.Conv2d's default output variance (1/3 for a unit white-noise input); its coefficients
    are scaled by ``gain·√3`` so the output variance is ``gain²`` as for the standard layer.
    """
    weight = getattr(conv, "weight", None)
    if weight is None:
        return conv
    if isinstance(conv, (nn.Conv2d, nn.Conv3d)):
        fan_in = weight[0].numel()
        with torch.no_grad():
            weight.normal_(0.0, gain / math.sqrt(fan_in))
    else:  # MFConv2d and other layers with nn.Conv2d's default output variance
        reset = getattr(conv, "reset_parameters", None)
        if reset is not None:
            reset()
        with torch.no_grad():
            weight.mul_(gain * math.sqrt(3.0))
    if getattr(conv, "bias", None) is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _residual_base(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    # The first out_channels input channels are the corrupted picture (inpainting appends its
    # mask after them), so residual models predict a correction to them.
    return x[:, :out_channels]


class DnCNN(nn.Module):
    """DnCNN (Zhang et al. 2017): conv-ReLU, (depth − 2) × conv-[BN]-ReLU, conv; residual
    learning (the network predicts the corruption, the output is ``x − net(x)``).

    Shapes: (N, in_channels, H, W) → (N, out_channels, H, W); with ``dims=3`` (3×3×3 convolutions)
    (N, in_channels, D, H, W) → (N, out_channels, D, H, W). Classic: depth=17, width=64.
    """

    def __init__(self, in_channels=1, out_channels=1, depth=17, width=64, conv="standard", batchnorm=False, dims=2):
        super().__init__()
        if depth < 2:
            raise ValueError(f"DnCNN: depth must be >= 2, got {depth}")
        d = _check_dims(dims, "DnCNN")
        layers = [he_init(make_conv(conv, in_channels, width, dims=d)), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [he_init(make_conv(conv, width, width, bias=not batchnorm, dims=d))]
            if batchnorm:
                layers += [nn.BatchNorm2d(width) if d == 2 else nn.BatchNorm3d(width)]
            layers += [nn.ReLU(inplace=True)]
        layers += [_zero_init(make_conv(conv, width, out_channels, dims=d))]
        self.body = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x):
        return _residual_base(x, self.out_channels) - self.body(x)


class _DoubleConv(nn.Sequential):
    def __init__(self, conv, cin, cout, dims=2):
        super().__init__(he_init(make_conv(conv, cin, cout, dims=dims)), nn.ReLU(inplace=True),
                         he_init(make_conv(conv, cout, cout, dims=dims)), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """A small UNet as in the paper's experiments: ``depth`` 2×2 average-pool downsamplings,
    bilinear upsampling, channel widths ``width·2^k``, skip connections, global residual.

    Shapes: (N, in_channels, H, W) → (N, out_channels, H, W) for any H, W (padded with edge
    replication to a multiple of 2^depth inside, cropped back). ``dims=3``: the 3-D UNet (3×3×3
    convolutions, 2×2×2 average pooling, trilinear upsampling), (N, C, D, H, W) → (N, C_out, D, H, W).
    """

    def __init__(self, in_channels=1, out_channels=1, width=16, depth=2, conv="standard", dims=2):
        super().__init__()
        self.depth, self.out_channels, self.dims = depth, out_channels, _check_dims(dims, "UNet")
        chans = [width * 2 ** k for k in range(depth + 1)]
        self.enc = nn.ModuleList([_DoubleConv(conv, in_channels, chans[0], dims)] +
                                 [_DoubleConv(conv, chans[k - 1], chans[k], dims) for k in range(1, depth + 1)])
        self.dec = nn.ModuleList([_DoubleConv(conv, chans[k + 1] + chans[k], chans[k], dims) for k in range(depth)])
        self.head = _zero_init((nn.Conv2d if dims == 2 else nn.Conv3d)(chans[0], out_channels, 1))

    def forward(self, x):
        size = x.shape[2:]
        m = 2 ** self.depth
        # Padded even when nothing is missing (a zero pad is a copy): a branch on the size would be frozen
        # into exported graphs (ONNX, torch.export) at the example's size.
        z = F.pad(x, [p for n in reversed(size) for p in (0, (-n) % m)], mode="replicate")
        pool = F.avg_pool2d if self.dims == 2 else F.avg_pool3d
        skips = []
        for k, block in enumerate(self.enc):
            z = block(z if k == 0 else pool(z, 2))
            skips.append(z)
        z = skips.pop()
        for k in reversed(range(self.depth)):
            skip = skips.pop()
            # To the skip's size (twice z's, as the padding makes it): the same as scale_factor=2, and
            # an exported graph then knows the two sizes agree.
            z = F.interpolate(z, size=skip.shape[2:], mode="bilinear" if self.dims == 2 else "trilinear",
                              align_corners=False)
            z = self.dec[k](torch.cat([z, skip], dim=1))
        out = self.head(z)[(slice(None), slice(None)) + tuple(slice(0, n) for n in size)]
        return _residual_base(x, self.out_channels) + out


class ResNet(nn.Module):
    """A plain residual network as in the paper: head conv, ``blocks`` × (conv-ReLU-conv + skip),
    tail conv, global residual; no downsampling, so it is resolution-agnostic.

    Shapes: (N, in_channels, H, W) → (N, out_channels, H, W); ``dims=3``: (N, C, D, H, W) likewise.
    """

    def __init__(self, in_channels=1, out_channels=1, width=32, blocks=4, conv="standard", dims=2):
        super().__init__()
        self.out_channels = out_channels
        d = _check_dims(dims, "ResNet")
        # The head feeds a ReLU (every block and the tail see relu(z)); each block starts as the
        # identity (its last conv zero, as Fixup/SkipInit and torchvision's zero_init_residual), so
        # the variance of z does not grow with the number of blocks at initialisation.
        self.head = he_init(make_conv(conv, in_channels, width, dims=d))
        self.blocks = nn.ModuleList(
            nn.Sequential(he_init(make_conv(conv, width, width, dims=d)), nn.ReLU(inplace=True),
                          _zero_init(make_conv(conv, width, width, dims=d)))
            for _ in range(blocks)
        )
        self.tail = _zero_init(make_conv(conv, width, out_channels, dims=d))

    def forward(self, x):
        z = self.head(x)
        for b in self.blocks:
            z = z + b(F.relu(z))
        return _residual_base(x, self.out_channels) + self.tail(F.relu(z))


class ESPCN(nn.Module):
    """ESPCN (Shi et al. 2016): conv5×5-tanh, conv3×3-tanh, conv3×3 to out·r² channels, pixel
    shuffle by ``upscale`` = r.

    Shapes: (N, in_channels, h, w) → (N, out_channels, r·h, r·w). With ``upscale=1`` it is an
    image-to-image network (for the non-SR tasks) with a global residual.
    """

    def __init__(self, in_channels=1, out_channels=1, upscale=2, width=64, conv="standard"):
        super().__init__()
        self.upscale, self.out_channels = upscale, out_channels
        self.body = nn.Sequential(
            he_init(make_conv(conv, in_channels, width, 5), _TANH_GAIN), nn.Tanh(),
            he_init(make_conv(conv, width, width // 2, 3), _TANH_GAIN), nn.Tanh(),
            make_conv(conv, width // 2, out_channels * upscale ** 2, 3),
        )
        if upscale == 1:
            _zero_init(self.body[-1])
        self.shuffle = nn.PixelShuffle(upscale)

    def forward(self, x):
        y = self.shuffle(self.body(x))
        if self.upscale == 1:
            y = y + _residual_base(x, self.out_channels)
        return y


MODELS = {"dncnn": DnCNN, "unet": UNet, "resnet": ResNet, "espcn": ESPCN}


def mf_factory(sigma: float | None = None, order: int = 2, sigma_floor: float | None = None):
    """A :func:`make_conv` factory of MFConv2d layers whose σ is ``sigma`` (reference pixels) for
    a 3×3 layer and ``sigma·k/3`` for a k×k one; ``None`` keeps MFConv2d's default k/6.

    Why: a Gaussian-derivative kernel is only resolved on grids with spacing s ≤ 2σ (coarser,
    the derivative taps shrink towards 0 over a cell and the layer degenerates to a 1×1 mix).
    Multiscale training evaluates the layer on grids up to s = 2**levels, so σ must be sized
    for the coarsest grid: ``sigma >= 2**levels / 2``; or keep a small σ and give
    ``sigma_floor`` (see :class:`msconv.MFConv2d`; 0.5: grids too coarse for σ apply, in their own
    pixels, the stencil of the finest grid that resolves it; None: MFConv2d's default; 0: off).
    """
    from msconv.nn import MFConv2d, MFConv3d

    if sigma is not None and not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"mf_sigma must be a number > 0 in reference pixels (e.g. 0.5 for s = 1, 2 for s = 4), got {sigma!r}")

    def conv(in_channels, out_channels, kernel_size, bias, dims=2):
        s = None if sigma is None else sigma * kernel_size / 3
        floor = {} if sigma_floor is None else {"sigma_floor": sigma_floor or None}  # 0: off
        cls = MFConv2d if dims == 2 else MFConv3d
        return cls(in_channels, out_channels, kernel_size, padding="same", bias=bias, order=order, sigma=s, **floor)

    return conv


def _user_model(factory, name: str, in_channels: int, out_channels: int, conv: str, sigma_floor) -> nn.Module:
    """``factory(in_channels, out_channels)``'s module; with ``conv='mf'`` its Conv2d layers become MFConv2d."""
    if not callable(factory):
        raise ValueError(f"--model {name!r} is not callable; give a function or class taking (in_channels, out_channels)")
    model = factory(in_channels, out_channels)
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if conv == "mf":
        from msconv.nn import convert

        floor = {} if sigma_floor is None else {"sigma_floor": sigma_floor or None}
        model, _ = convert(model, warn_above=None, **floor)
    return model


def build_model(name: str, in_channels: int, out_channels: int, conv: str = "standard", upscale: int = 1,
                mf_sigma: float | None = None, mf_order: int = 2, mf_sigma_floor: float | None = None,
                dims: int = 2, **kwargs) -> nn.Module:
    """Build a zoo model by name. ``kwargs`` the model does not take (e.g. ``depth`` for
    ESPCN) are ignored so one config serves every model; ``upscale`` only applies to ESPCN.
    ``mf_sigma``/``mf_order``/``mf_sigma_floor`` set the mesh-free layers' σ, order and σ floor
    (``conv='mf'`` only; see :func:`mf_factory`; a floor of None is MFConv2d's default, 0 is off).
    ``dims=3`` builds the volumetric version (3-D convolutions; dncnn, unet, resnet)."""
    import inspect

    from msconv._imports import is_import_path, resolve

    if conv not in CONV_KINDS:
        raise ValueError(f"model: conv must be one of {CONV_KINDS}, got {conv!r}")
    if is_import_path(name):
        return _user_model(resolve(name, "--model"), name, in_channels, out_channels, conv, mf_sigma_floor)
    if name not in MODELS:
        raise ValueError(f"model: unknown model {name!r}; choose one of {sorted(MODELS)} or give package.module:factory")
    cls = MODELS[name]
    params = inspect.signature(cls.__init__).parameters
    kw = {k: v for k, v in kwargs.items() if k in params and v is not None}
    if dims != 2:
        if "dims" not in params:
            raise ValueError(f"model: {name!r} is 2-D only; for volumes use one of "
                             f"{sorted(n for n, c in MODELS.items() if 'dims' in inspect.signature(c.__init__).parameters)}")
        kw["dims"] = _check_dims(dims, "model")
    if "upscale" in params:
        kw["upscale"] = upscale
    elif upscale != 1:
        raise ValueError(f"model: {name!r} keeps the resolution; use upscale=1 (SR with pre-upsampled input) or model='espcn'")
    if conv == "mf" and (mf_sigma is not None or mf_order != 2 or mf_sigma_floor is not None):
        conv = mf_factory(mf_sigma, mf_order, mf_sigma_floor)
    return cls(in_channels=in_channels, out_channels=out_channels, conv=conv, **kw)

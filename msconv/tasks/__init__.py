"""Image-restoration tasks: forward operators applied at the finest grid.

Every task maps clean images ``y`` (N, C, H, W) in [0, 1] at the finest grid to a pair
``(x, y)``: the network input and the target. All randomness comes from the
``torch.Generator`` passed in, so a run is reproducible and a resumed run redraws exactly
the same corruptions.

Restriction rule (the same for every task, and what :class:`msconv.MGE` does): the input
and the target are each restricted with the same operator (``average`` by default), after
the corruption was applied at the finest grid. Consequences, each tested:

* denoise: the restricted noise has variance σ²/4 per level (cell averages of white noise);
* deblur: σ is in reference pixels, so ``R(blur(u))`` ≈ ``blur(R u)`` sampled at s = 2;
* inpaint: the input carries the mask as its last channel, so the restricted mask is the
  fraction of each coarse cell that was observed;
* super-resolution: with ``area`` downsampling ``R(down(y)) == down(R y)`` exactly (both are
  cell averages), with ``bicubic`` approximately.

>>> task = build_task("denoise", noise_sigma=25)
>>> x, y = task.corrupt(torch.rand(2, 1, 64, 64), torch.Generator().manual_seed(0))
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "Task", "Denoise", "Deblur", "Inpaint", "SuperResolution", "Rician", "SliceSR", "TASKS", "VOLUME_TASKS", "build_task",
    "gaussian_taps", "gaussian_blur", "random_masks", "COARSE_TASKS",
]


def _check_image(y: torch.Tensor, who: str, volumes: bool = True) -> None:
    """``y`` is a float (N, C, H, W) batch, or with ``volumes`` a (N, C, D, H, W) one; else a ValueError."""
    if isinstance(y, torch.Tensor) and y.dim() == 5 and y.is_floating_point() and not volumes:
        raise ValueError(f"{who}: this task is defined for images (N, C, H, W), got volumes of shape {tuple(y.shape)}; "
                         f"for volumes use one of {', '.join(VOLUME_TASKS)}")
    if not isinstance(y, torch.Tensor) or y.dim() not in (4, 5) or not y.is_floating_point():
        got = f"shape={tuple(y.shape)} dtype={y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{who}: clean images must be a float tensor (N, C, H, W) in [0, 1] (volumes: (N, C, D, H, W)), "
                         f"got {got}")


def _cell_std(level: int, y: torch.Tensor) -> float:
    """2**(level·d/2): how much a 2**level-per-axis cell average of white noise shrinks its std on a grid of
    d = ``y.dim() - 2`` spatial dimensions (2**level for images, 2**(1.5·level) for volumes)."""
    return 2.0 ** (level * (y.dim() - 2) / 2)


def _check_generator(g, who: str) -> torch.Generator:
    if not isinstance(g, torch.Generator):
        raise TypeError(
            f"{who}: generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), "
            f"got {type(g).__name__}; corruptions are drawn from it so runs are reproducible"
        )
    return g


def _randn(shape, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Draw on the generator's device, then move: a CPU generator cannot fill a CUDA tensor.
    return torch.randn(shape, generator=g, device=g.device, dtype=torch.float32).to(like.device, like.dtype)


class Task:
    """Base class. Subclasses implement :meth:`corrupt`; ``restrict_pair`` is shared."""

    name = "task"
    #: Every side (H, W; D of volumes) of the finest-grid target must be a multiple of this (times 2**levels).
    size_multiple = 1

    def in_channels(self, c: int) -> int:
        return c

    def out_channels(self, c: int) -> int:
        return c

    def corrupt(self, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def restrict_pair(self, x: torch.Tensor, y: torch.Tensor, levels: int, kind: str = "average"):
        """``(R^levels x, R^levels y)`` — input and target restricted alike (module docstring)."""
        if levels == 0:
            return x, y
        xs, ys = self.pyramid_pair(x, y, levels, kind)
        return xs[-1], ys[-1]

    def pyramid_pair(self, x: torch.Tensor, y: torch.Tensor, depth: int, kind: str = "average"):
        """``([x, R x, …, R^depth x], [y, R y, …])``: the pair on every grid down to ``depth``
        (what :class:`msconv.MGE` evaluates; pass it as ``MGE(..., pyramid_fn=task.pyramid_pair)``)."""
        from msconv.ops.transfer import pyramid

        return pyramid(x, depth, kind), pyramid(y, depth, kind)

    def corrupt_on_grid(self, y: torch.Tensor, generator: torch.Generator, level: int, kind: str = "average"):
        """A corrupted pair on grid ``level`` from clean finest-grid images ``y``: what
        :meth:`corrupt` then :meth:`restrict_pair` give (the pair MGE would evaluate there).

        Tasks whose corruption has a direct coarse-grid form override this to skip the fine-grid
        work (a coarse Full-Multiscale stage draws 4**level times more samples per work unit, 8**level on
        volumes)."""
        x, y = self.corrupt(y, generator)
        return self.restrict_pair(x, y, level, kind)

    def input_for_metrics(self, x: torch.Tensor) -> torch.Tensor:
        """The corrupted image as a picture (for 'input PSNR' baselines), same size as x."""
        return x

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Denoise(Task):
    """Additive white Gaussian noise, ``noise_sigma`` on the 0–255 scale (the DnCNN protocol:
    no clipping, so the noise stays Gaussian).

    ``noise_restriction`` says how the noise reaches coarser grids:

    * ``"average"`` (the generic rule: corrupt at the finest grid, then restrict): the noise is
      cell-averaged with the image, so level l sees std σ/2^l — a different, easier problem on
      every grid, and coarse training does not transfer.
    * ``"preserve"`` (default): level l's input is ``R^l y + 2^l · R^l(x − y)``, the *same* noise draw
      restricted and rescaled to per-pixel std σ (an average of 4^l i.i.d. N(0, σ²) times 2^l is
      again N(0, σ²); on volumes, 8^l voxels times 2^(1.5 l)). Every grid then poses the same denoising problem at its resolution, so
      what a network learns on a coarse grid is what it needs on the fine one, and the MGE
      difference terms stay coupled (same draw on both grids). The finest grid is unchanged,
      so MGE stays unbiased for the fine-grid gradient.
    """

    name = "denoise"
    NOISE_RESTRICTIONS = ("average", "preserve")

    def __init__(self, noise_sigma: float = 25.0, noise_restriction: str = "preserve"):
        if not (isinstance(noise_sigma, (int, float)) and noise_sigma >= 0 and math.isfinite(noise_sigma)):
            raise ValueError(f"denoise: noise_sigma must be >= 0 on the 0-255 scale (e.g. 25), got {noise_sigma!r}")
        if noise_restriction not in self.NOISE_RESTRICTIONS:
            raise ValueError(f"denoise: noise_restriction must be one of {self.NOISE_RESTRICTIONS}, got {noise_restriction!r}")
        self.noise_sigma = float(noise_sigma)
        self.noise_restriction = noise_restriction

    def pyramid_pair(self, x, y, depth, kind="average"):
        xs, ys = super().pyramid_pair(x, y, depth, kind)
        if self.noise_restriction == "preserve":
            # R^l is linear: R^l(x − y) is the restricted noise; rescale it back to std σ.
            xs = [xs[0]] + [yl + _cell_std(l, y) * (xl - yl) for l, (xl, yl) in enumerate(zip(xs[1:], ys[1:]), 1)]
        return xs, ys

    def corrupt(self, y, generator):
        _check_image(y, "denoise")
        g = _check_generator(generator, "denoise")
        return y + (self.noise_sigma / 255.0) * _randn(y.shape, g, y), y

    def corrupt_on_grid(self, y, generator, level, kind="average"):
        """The clean crop restricted to ``level``, plus white noise drawn on that grid: std σ with
        ``preserve``, σ/2**level with ``average`` — the distribution the fine-grid route gives
        (a 2**level × 2**level cell average of i.i.d. N(0, σ²) is N(0, σ²/4**level), independent
        across cells; on volumes 8**level), at 4**level (8**level) times fewer random numbers. Other restriction kinds correlate
        neighbouring cells, so they take the fine-grid route."""
        if level == 0 or kind != "average":
            return super().corrupt_on_grid(y, generator, level, kind)
        _check_image(y, "denoise")
        g = _check_generator(generator, "denoise")
        from msconv.ops.transfer import restrict

        yc = restrict(y, kind, levels=level)
        std = self.noise_sigma / 255.0 / (1.0 if self.noise_restriction == "preserve" else _cell_std(level, y))
        return yc + std * _randn(yc.shape, g, yc), yc


def gaussian_taps(sigma: float, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """1-D taps of a Gaussian of std ``sigma`` reference pixels on a grid of spacing ``scale``.

    Cell-integrated (erf differences over each cell), exact for a field constant on cells,
    truncated at radius ceil(4σ/scale + ½) and normalised to sum 1 (so constants are kept).
    Shape (2r + 1,). σ = 0 gives the identity tap ``[1]``.
    """
    if sigma < 0 or scale <= 0:
        raise ValueError(f"gaussian_taps: need sigma >= 0 and scale > 0, got sigma={sigma}, scale={scale}")
    if sigma == 0:
        return torch.ones(1, dtype=dtype)
    r = math.ceil(4 * sigma / scale + 0.5)
    i = torch.arange(-r, r + 1, dtype=torch.float64)
    cdf = lambda t: 0.5 * (1 + torch.erf(t / (sigma * math.sqrt(2))))  # noqa: E731
    w = cdf((i + 0.5) * scale) - cdf((i - 0.5) * scale)
    return (w / w.sum()).to(dtype)


def gaussian_blur(u: torch.Tensor, sigma: float, scale: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W), σ in reference pixels, on a grid of spacing
    ``scale``. Edges replicate (a blurred photo's border continues outward)."""
    w = gaussian_taps(sigma, scale, u.dtype).to(u.device)
    r = (w.numel() - 1) // 2
    if r == 0:
        return u
    n, c, h, wd = u.shape
    v = F.pad(u.reshape(n * c, 1, h, wd), (r, r, r, r), mode="replicate")
    v = F.conv2d(v, w.view(1, 1, 1, -1))
    v = F.conv2d(v, w.view(1, 1, -1, 1))
    return v.reshape(n, c, h, wd)


COARSE_TASKS = ("restricted", "same")


def _check_coarse(coarse: str, who: str) -> str:
    if coarse not in COARSE_TASKS:
        raise ValueError(f"{who}: coarse must be one of {COARSE_TASKS}, got coarse={coarse!r}")
    return coarse


class Deblur(Task):
    """Gaussian blur (``blur_sigma`` pixels) plus white noise (``noise_sigma`` on 0–255).

    ``coarse`` says what coarser grids pose:

    * ``"restricted"`` (the generic rule): corrupt at the finest grid, restrict input and
      target. The blur is in reference pixels, so on a grid of spacing s it spans σ/s pixels:
      at s = 4 a σ = 1.6 blur is nearly the identity, and coarse training learns another task.
    * ``"same"`` (default): the clean image restricted to the grid, blurred with σ in *that grid's own*
      pixels, plus noise of the same std: the fine problem at lower resolution. For MGE's
      coupled differences, level l's input is the blur of ``R^l y`` plus the fine noise draw
      restricted and rescaled to std σ (``2^l R^l n``); level 0 is unchanged.
    """

    name = "deblur"

    def __init__(self, blur_sigma: float = 1.6, noise_sigma: float = 2.55, coarse: str = "same"):
        if not (isinstance(blur_sigma, (int, float)) and blur_sigma > 0):
            raise ValueError(f"deblur: blur_sigma must be > 0 reference pixels (e.g. 1.6), got {blur_sigma!r}")
        if not (isinstance(noise_sigma, (int, float)) and noise_sigma >= 0):
            raise ValueError(f"deblur: noise_sigma must be >= 0 on the 0-255 scale, got {noise_sigma!r}")
        self.blur_sigma, self.noise_sigma = float(blur_sigma), float(noise_sigma)
        self.coarse = _check_coarse(coarse, "deblur")

    def corrupt(self, y, generator):
        _check_image(y, "deblur", volumes=False)
        g = _check_generator(generator, "deblur")
        b = gaussian_blur(y, self.blur_sigma, 1.0)
        return b + (self.noise_sigma / 255.0) * _randn(y.shape, g, y), y

    def pyramid_pair(self, x, y, depth, kind="average"):
        if self.coarse == "restricted":
            return super().pyramid_pair(x, y, depth, kind)
        from msconv.ops.transfer import pyramid

        ys = pyramid(y, depth, kind)
        noise = pyramid(x - gaussian_blur(y, self.blur_sigma, 1.0), depth, kind)
        xs = [x] + [gaussian_blur(yl, self.blur_sigma, 1.0) + 2.0 ** l * nl
                    for l, (yl, nl) in enumerate(zip(ys[1:], noise[1:]), 1)]
        return xs, ys

    def corrupt_on_grid(self, y, generator, level, kind="average"):
        if self.coarse == "restricted" or level == 0:
            return super().corrupt_on_grid(y, generator, level, kind)
        from msconv.ops.transfer import restrict

        return self.corrupt(restrict(y, kind, levels=level), generator)


def _segment_distance(yy, xx, p0, p1):
    # Distance of every pixel centre to the segment p0-p1 (all in pixels).
    d = p1 - p0
    L2 = float((d * d).sum()) or 1e-12
    t = (((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / L2).clamp(0, 1)
    return torch.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def random_masks(n: int, h: int, w: int, generator: torch.Generator, fraction: float = 0.3,
                 kind: str = "mixed") -> torch.Tensor:
    """Masks (n, 1, h, w), 1 = observed, 0 = missing, drawn from ``generator``.

    ``kind``: ``boxes`` (axis-aligned rectangles, sides 1/10–1/3 of the image), ``strokes``
    (free-form brush strokes: random polylines of width 1/40–1/15 of the image side) or
    ``mixed`` (each shape is a box or a stroke with equal probability). Shapes are added until
    at least ``fraction`` of the pixels is missing. Sizes are relative to the image, so a mask
    means the same region at any resolution.
    """
    if kind not in ("boxes", "strokes", "mixed"):
        raise ValueError(f"random_masks: kind must be 'boxes', 'strokes' or 'mixed', got {kind!r}")
    if not 0 < fraction < 1:
        raise ValueError(f"random_masks: fraction must be in (0, 1), got {fraction!r}")
    g = generator
    rnd = lambda *s: torch.rand(s, generator=g, device=g.device).cpu()  # noqa: E731
    yy = torch.arange(h, dtype=torch.float32).view(h, 1) + 0.5
    xx = torch.arange(w, dtype=torch.float32).view(1, w) + 0.5
    side = float(min(h, w))
    out = torch.ones(n, 1, h, w)
    for k in range(n):
        missing = torch.zeros(h, w, dtype=torch.bool)
        for _ in range(200):  # bounded: a pathological draw never loops forever
            if missing.float().mean() >= fraction:
                break
            box = kind == "boxes" or (kind == "mixed" and float(rnd(1)) < 0.5)
            if box:
                bh, bw = (0.1 + 0.23 * rnd(2)) * torch.tensor([h, w])
                y0, x0 = rnd(2) * torch.tensor([h - bh, w - bw])
                missing |= (yy >= y0) & (yy < y0 + bh) & (xx >= x0) & (xx < x0 + bw)
            else:
                width = side * (1 / 40 + (1 / 15 - 1 / 40) * float(rnd(1)))
                p = rnd(2) * torch.tensor([h, w])
                for _ in range(1 + int(4 * float(rnd(1)))):
                    ang = 2 * math.pi * float(rnd(1))
                    length = side * (0.1 + 0.25 * float(rnd(1)))
                    q = p + length * torch.tensor([math.sin(ang), math.cos(ang)])
                    q = torch.stack([q[0].clamp(0, h), q[1].clamp(0, w)])
                    missing |= _segment_distance(yy, xx, p, q) <= width / 2
                    p = q
        out[k, 0][missing] = 0
    return out


class Inpaint(Task):
    """Random box and stroke masks. Input: ``cat(y * m, m)`` (C + 1 channels, the mask last);
    target: ``y``. The mask travels as a channel, so it is restricted with the image."""

    name = "inpaint"

    def __init__(self, mask_fraction: float = 0.25, mask_kind: str = "mixed"):
        if not (isinstance(mask_fraction, (int, float)) and 0 < mask_fraction < 1):
            raise ValueError(f"inpaint: mask_fraction must be in (0, 1), got {mask_fraction!r}")
        if mask_kind not in ("boxes", "strokes", "mixed"):
            raise ValueError(f"inpaint: mask_kind must be 'boxes', 'strokes' or 'mixed', got {mask_kind!r}")
        self.mask_fraction, self.mask_kind = float(mask_fraction), mask_kind

    def in_channels(self, c):
        return c + 1

    def corrupt(self, y, generator):
        _check_image(y, "inpaint", volumes=False)
        g = _check_generator(generator, "inpaint")
        m = random_masks(y.shape[0], y.shape[2], y.shape[3], g, self.mask_fraction, self.mask_kind)
        m = m.to(y.device, y.dtype)
        return torch.cat([y * m, m], dim=1), y

    def input_for_metrics(self, x):
        return x[:, :-1]


class SuperResolution(Task):
    """Downsampling by ``scale`` (2 or 4) with ``bicubic`` (antialiased) or ``area`` (cell
    averages). ``pre_upsample=False`` (ESPCN): the input is the low-resolution image
    (H/scale, W/scale); ``pre_upsample=True`` (other models): it is bicubic-upsampled back to
    (H, W) so any image-to-image network applies."""

    name = "sr"

    def __init__(self, scale: int = 2, kernel: str = "bicubic", pre_upsample: bool = False, coarse: str = "same"):
        if scale not in (2, 4):
            raise ValueError(f"sr: scale must be 2 or 4, got {scale!r}")
        if kernel not in ("bicubic", "area"):
            raise ValueError(f"sr: kernel must be 'bicubic' or 'area', got {kernel!r}")
        self.scale, self.kernel, self.pre_upsample = int(scale), kernel, bool(pre_upsample)
        self.size_multiple = self.scale
        self.coarse = _check_coarse(coarse, "sr")

    def pyramid_pair(self, x, y, depth, kind="average"):
        """With ``coarse="same"``, level l's input is the ×scale degradation of ``R^l y`` in that
        grid's own pixels (the fine problem at lower resolution; restricting the fine input
        instead averages away the detail the model must restore, so coarse grids would pose a
        near-identity task)."""
        if self.coarse == "restricted":
            return super().pyramid_pair(x, y, depth, kind)
        from msconv.ops.transfer import pyramid

        ys = pyramid(y, depth, kind)
        return [x] + [self._degrade(yl) for yl in ys[1:]], ys

    def corrupt_on_grid(self, y, generator, level, kind="average"):
        if self.coarse == "restricted" or level == 0:
            return super().corrupt_on_grid(y, generator, level, kind)
        from msconv.ops.transfer import restrict

        return self.corrupt(restrict(y, kind, levels=level), generator)

    def downsample(self, y: torch.Tensor) -> torch.Tensor:
        if self.kernel == "area":
            return F.avg_pool2d(y, self.scale)
        return F.interpolate(y, scale_factor=1 / self.scale, mode="bicubic", align_corners=False, antialias=True)

    def corrupt(self, y, generator):
        _check_image(y, "sr", volumes=False)
        h, w = y.shape[2:]
        if h % self.scale or w % self.scale:
            raise ValueError(f"sr: image size {(h, w)} must be a multiple of scale={self.scale}; crop it first")
        return self._degrade(y), y

    def _degrade(self, y):
        lr = self.downsample(y)
        if self.pre_upsample:
            lr = F.interpolate(lr, size=y.shape[2:], mode="bicubic", align_corners=False)
        return lr

    def input_for_metrics(self, x):
        return x


class Rician(Task):
    """Rician noise, the noise of magnitude MRI: ``x = |y + σ(n₁ + i n₂)|``, the modulus of the clean
    image plus complex white Gaussian noise (n₁, n₂ i.i.d. N(0, 1)), ``noise_sigma`` on the 0–255
    scale. Where the signal is low the noise is not zero-mean (it lifts dark background), which is
    what a Gaussian denoiser gets wrong on MR magnitude images. For images and volumes.

    Coarse grids (``noise_restriction``): ``"preserve"`` (default) draws the complex noise on each
    grid at the same σ, so every grid poses the same problem (what Full-Multiscale's stages and the
    baselines train on); ``"average"`` corrupts at the finest grid and restricts. The coupled pairs
    of :class:`msconv.MGE` are the restricted ones in both cases: the magnitude does not split into
    clean image plus noise, so the draw cannot be rescaled as :class:`Denoise` does.
    """

    name = "rician"

    def __init__(self, noise_sigma: float = 25.0, noise_restriction: str = "preserve"):
        if not (isinstance(noise_sigma, (int, float)) and noise_sigma >= 0 and math.isfinite(noise_sigma)):
            raise ValueError(f"rician: noise_sigma must be >= 0 on the 0-255 scale (e.g. 25), got {noise_sigma!r}")
        if noise_restriction not in Denoise.NOISE_RESTRICTIONS:
            raise ValueError(f"rician: noise_restriction must be one of {Denoise.NOISE_RESTRICTIONS}, got "
                             f"{noise_restriction!r}")
        self.noise_sigma, self.noise_restriction = float(noise_sigma), noise_restriction

    def corrupt(self, y, generator):
        _check_image(y, "rician")
        g = _check_generator(generator, "rician")
        s = self.noise_sigma / 255.0
        real, imag = y + s * _randn(y.shape, g, y), s * _randn(y.shape, g, y)
        return torch.sqrt(real * real + imag * imag), y

    def corrupt_on_grid(self, y, generator, level, kind="average"):
        if level == 0 or self.noise_restriction != "preserve":
            return super().corrupt_on_grid(y, generator, level, kind)
        from msconv.ops.transfer import restrict

        _check_image(y, "rician")
        return self.corrupt(restrict(y, kind, levels=level), generator)


class SliceSR(Task):
    """Slice super-resolution of volumes (N, C, D, H, W): thick slices to thin ones along D, the first
    spatial axis. The input averages every ``scale`` consecutive slices (a thick-slice acquisition)
    and is resampled back to D slices by linear interpolation along D, so any volume-to-volume
    network applies; ``noise_sigma`` (0–255 scale, default 0) adds white noise to the thick slices.
    D must be a multiple of ``scale``.

    ``coarse="same"`` (default): a coarser grid poses the same problem in its own slices (its clean
    volume restricted, then averaged over ``scale`` of *its* slices); ``"restricted"``: corrupt at the
    finest grid, then restrict input and target.
    """

    name = "slice_sr"

    def __init__(self, scale: int = 2, noise_sigma: float = 0.0, coarse: str = "same"):
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 2:
            raise ValueError(f"slice_sr: scale (slices per thick slice) must be an int >= 2, got {scale!r}")
        if not (isinstance(noise_sigma, (int, float)) and noise_sigma >= 0 and math.isfinite(noise_sigma)):
            raise ValueError(f"slice_sr: noise_sigma must be >= 0 on the 0-255 scale, got {noise_sigma!r}")
        self.scale, self.noise_sigma = int(scale), float(noise_sigma)
        self.size_multiple = self.scale
        self.coarse = _check_coarse(coarse, "slice_sr")

    def corrupt(self, y, generator):
        if isinstance(y, torch.Tensor) and y.dim() == 4:
            raise ValueError(f"slice_sr: the task needs volumes (N, C, D, H, W), got images of shape {tuple(y.shape)}; "
                             "give --data a folder of volumes (NIfTI, .npy, TIFF stacks) or use --task sr for images")
        _check_image(y, "slice_sr")
        return self._degrade(y, _check_generator(generator, "slice_sr")), y

    def _degrade(self, y: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        n, c, d, h, w = y.shape
        if d % self.scale:
            raise ValueError(f"slice_sr: the volume has {d} slices along D, not a multiple of scale={self.scale}; crop it")
        thick = y.reshape(n, c, d // self.scale, self.scale, h, w).mean(3)
        if self.noise_sigma and g is not None:
            thick = thick + (self.noise_sigma / 255.0) * _randn(thick.shape, g, thick)
        return F.interpolate(thick, size=(d, h, w), mode="trilinear", align_corners=False)

    def pyramid_pair(self, x, y, depth, kind="average"):
        """With ``coarse="same"`` and no noise, level l's input is the thick-slice degradation of ``R^l y`` in
        that grid's own slices; with noise, the restricted pair (the noise draw is not recoverable from x)."""
        if self.coarse == "restricted" or self.noise_sigma:
            return super().pyramid_pair(x, y, depth, kind)
        from msconv.ops.transfer import pyramid

        ys = pyramid(y, depth, kind)
        return [x] + [self._degrade(yl, None) for yl in ys[1:]], ys

    def corrupt_on_grid(self, y, generator, level, kind="average"):
        if self.coarse == "restricted" or level == 0:
            return super().corrupt_on_grid(y, generator, level, kind)
        from msconv.ops.transfer import restrict

        return self.corrupt(restrict(y, kind, levels=level), generator)


TASKS = {"denoise": Denoise, "deblur": Deblur, "inpaint": Inpaint, "sr": SuperResolution, "rician": Rician,
         "slice_sr": SliceSR}
# The tasks defined for volumes (N, C, D, H, W).
VOLUME_TASKS = ("denoise", "rician", "slice_sr")


def task_class(name: str) -> type:
    """The Task class ``name`` stands for: a built-in name, or ``package.module:Class`` (a Task subclass)."""
    from msconv._imports import is_import_path, resolve

    if is_import_path(name):
        cls = resolve(name, "--task")
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ValueError(f"--task {name!r} is not a subclass of msconv.tasks.Task; subclass it and implement "
                             "corrupt(y, generator) -> (x, y)")
        return cls
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; choose one of {sorted(TASKS)} or give package.module:TaskClass")
    return TASKS[name]


def build_task(name: str, **kwargs) -> Task:
    """``build_task("denoise", noise_sigma=25)``; names: denoise, deblur, inpaint, sr, rician, slice_sr.
    Keyword arguments the task does not take are ignored so one config serves all tasks."""
    import inspect

    cls = task_class(name)
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in params and v is not None})

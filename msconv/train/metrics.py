"""Validation metrics: PSNR and SSIM of a restored image, on the device it was computed on.

Both come from torchmetrics. SSIM is configured to be scikit-image's ``structural_similarity``
with its defaults (7×7 uniform window, K1 = 0.01, K2 = 0.03, sample covariances, the border of
half a window left out of the mean), so figures agree with scikit-image to rounding:

* sample covariances: scikit-image scales every (co)variance by N/(N−1), N = 49; in the SSIM
  formula that is the same as dividing C2 by N/(N−1), i.e. K2·sqrt((N−1)/N);
* border: torchmetrics averages the SSIM map over the whole image; here the map is taken in full
  and its 3-pixel border (where scikit-image's map depends on padding) is cropped before the mean.
"""
from __future__ import annotations

import math

import torch

__all__ = ["psnr_ssim", "PSNR_CAP_DB", "SSIM_MIN_SIDE"]

PSNR_CAP_DB = 100.0  # an exact reconstruction reports this instead of +inf
_WIN = 7
SSIM_MIN_SIDE = _WIN  # the smallest image side SSIM scores
_K2_SAMPLE = 0.03 * math.sqrt((_WIN * _WIN - 1) / (_WIN * _WIN))


def _ssim_volume(p: torch.Tensor, t: torch.Tensor) -> float:
    """scikit-image's SSIM of two (1, C, D, H, W) float64 volumes: 7×7×7 uniform windows, sample covariances,
    the map's border of half a window left out. Written with ``avg_pool3d`` (the valid window means are exactly
    the part of scikit-image's map it keeps) because torchmetrics' 3-D SSIM asks for memory far beyond the
    volume's own on whole scans."""
    import torch.nn.functional as F

    n = _WIN ** 3
    mean = lambda v: F.avg_pool3d(v, _WIN, stride=1)  # noqa: E731
    ux, uy = mean(p), mean(t)
    cov = n / (n - 1)
    vx, vy, vxy = cov * (mean(p * p) - ux * ux), cov * (mean(t * t) - uy * uy), cov * (mean(p * t) - ux * uy)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s.mean())


def psnr_ssim(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """PSNR (dB, peak 1) and SSIM of one image (C, H, W) against its clean original, on the full
    image (every side >= 7); the prediction is clipped to [0, 1]. Computed in float64 on the tensors'
    device. A prediction with any NaN/inf value gives (nan, nan); an exact one PSNR_CAP_DB.
    A volume (C, D, H, W) is scored in 3-D: SSIM with a 7×7×7 window, its border cropped on every axis."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if pred.dim() not in (3, 4) or pred.shape != target.shape:
        raise ValueError(f"psnr_ssim: pred and target must be one (C, H, W) image (or (C, D, H, W) volume) each of the "
                         f"same shape, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if not target.is_floating_point():
        raise ValueError(f"psnr_ssim: target must be a floating image in [0, 1], got dtype {target.dtype}; convert "
                         "it, e.g. target.float() / 255 for 8-bit images")
    lo, hi = float(target.min()), float(target.max())
    if not (0.0 <= lo and hi <= 1.0):
        raise ValueError(f"psnr_ssim: target values span [{lo:g}, {hi:g}], outside [0, 1] (PSNR and SSIM use peak 1 "
                         "and the prediction is clipped to [0, 1]); scale it to [0, 1], e.g. target / 255")
    if min(pred.shape[1:]) < _WIN:
        raise ValueError(f"psnr_ssim: SSIM needs images of at least {_WIN}x{_WIN} pixels, got {tuple(pred.shape)}")
    if not bool(torch.isfinite(pred).all()):
        # clamp() keeps NaN and maps inf into range: a broken model must never score.
        return math.nan, math.nan
    p = pred.detach().clamp(0, 1).double().unsqueeze(0)
    t = target.detach().double().unsqueeze(0)
    psnr = float(peak_signal_noise_ratio(p, t, data_range=1.0))
    if p.dim() == 5:
        ssim = _ssim_volume(p, t)
    else:
        _, ssim_map = structural_similarity_index_measure(p, t, gaussian_kernel=False, kernel_size=_WIN, data_range=1.0,
                                                          k2=_K2_SAMPLE, return_full_image=True)
        r = (_WIN - 1) // 2
        ssim = float(ssim_map[..., r:-r, r:-r].mean())
    # Only an exact reconstruction (MSE 0, PSNR +inf) is capped; anything else non-finite stays NaN.
    return (PSNR_CAP_DB if psnr == math.inf else min(psnr, PSNR_CAP_DB)), ssim

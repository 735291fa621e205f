"""PSNR/SSIM (torchmetrics, on the tensors' device) against scikit-image on real photographs."""
import numpy as np
import pytest
import torch

skm = pytest.importorskip("skimage.metrics")
skd = pytest.importorskip("skimage.data")
pytest.importorskip("torchmetrics")

from msconv.train import psnr_ssim  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])]


def photo_pair(name: str, sigma: float, crop: int = 96):
    """A clean photograph crop in [0, 1] (C, H, W) and a noisy 'restoration' of it (float32)."""
    a = getattr(skd, name)()
    a = a[:crop, 10:10 + crop + 5]  # odd width: the border crop must match scikit-image's too
    y = torch.from_numpy(np.ascontiguousarray(a)).double() / 255.0
    y = y.unsqueeze(0) if y.dim() == 2 else y.permute(2, 0, 1)
    g = torch.Generator().manual_seed(1)
    return (y + sigma / 255.0 * torch.randn(y.shape, generator=g, dtype=torch.float64)).float(), y.float()


def reference(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    p = pred.double().clamp(0, 1).numpy()
    t = target.double().numpy()
    psnr = skm.peak_signal_noise_ratio(t, p, data_range=1.0)
    ssim = (skm.structural_similarity(t[0], p[0], data_range=1.0) if t.shape[0] == 1
            else skm.structural_similarity(t, p, data_range=1.0, channel_axis=0))
    return psnr, ssim


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,sigma", [("camera", 25.0), ("astronaut", 15.0), ("coffee", 50.0), ("camera", 2.0)])
def test_psnr_ssim_on_device_match_scikit_image(device, name, sigma):
    pred, target = photo_pair(name, sigma)
    ref_psnr, ref_ssim = reference(pred, target)
    psnr, ssim = psnr_ssim(pred.to(device), target.to(device))
    assert abs(psnr - ref_psnr) < 1e-3, (psnr, ref_psnr)
    assert abs(ssim - ref_ssim) < 1e-5, (ssim, ref_ssim)

"""Each task's corruption at the finest grid and its restriction rule (msconv.tasks)."""
import math

import pytest
import torch

import msconv
from msconv.tasks import Deblur, Denoise, Inpaint, SuperResolution, build_task, gaussian_blur, gaussian_taps, random_masks


def _smooth(n=2, c=1, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    a = torch.rand(n, c, 1, 1, generator=g)
    return (0.5 + 0.3 * torch.sin(2 * math.pi * (a * 2 + 1) * xx) * torch.cos(3 * yy)).float()


def test_denoise_noise_level_and_restriction():
    y = torch.full((8, 1, 128, 128), 0.5)
    x, y2 = Denoise(25).corrupt(y, torch.Generator().manual_seed(0))
    assert y2 is y
    assert abs((x - y).std().item() - 25 / 255) < 0.02 * 25 / 255
    # Cell averages of white noise: the std halves per level of `average` restriction.
    xr, yr = Denoise(25, "average").restrict_pair(x, y, 2)
    assert xr.shape == (8, 1, 32, 32) and torch.allclose(yr, torch.full_like(yr, 0.5))
    assert abs((xr - yr).std().item() - 25 / 255 / 4) < 0.05 * 25 / 255 / 4


def test_denoise_preserve_keeps_the_noise_level_on_every_grid_with_the_same_draw():
    y = torch.full((8, 1, 128, 128), 0.5)
    task = Denoise(25, noise_restriction="preserve")
    x, _ = task.corrupt(y, torch.Generator().manual_seed(0))
    xs, ys = task.pyramid_pair(x, y, 3)
    plain_x, plain_y = Denoise(25, "average").pyramid_pair(x, y, 3)
    assert torch.equal(xs[0], x) and all(torch.equal(a, b) for a, b in zip(ys, plain_y))  # fine grid untouched
    for l in range(1, 4):
        # The same draw: exactly 2^l times the restricted noise, so per-pixel std is σ again.
        torch.testing.assert_close(xs[l] - ys[l], 2.0**l * (plain_x[l] - plain_y[l]))
        assert abs((xs[l] - ys[l]).std().item() - 25 / 255) < 0.1 * 25 / 255
    xr, yr = task.restrict_pair(x, y, 2)
    assert torch.equal(xr, xs[2]) and torch.equal(yr, ys[2])
    with pytest.raises(ValueError, match="noise_restriction"):
        Denoise(25, noise_restriction="double")


def test_same_generator_same_corruption_and_different_seeds_differ():
    y = torch.rand(2, 3, 32, 32)
    for name in ["denoise", "deblur", "inpaint", "sr"]:
        t = build_task(name)
        a = t.corrupt(y, torch.Generator().manual_seed(3))[0]
        b = t.corrupt(y, torch.Generator().manual_seed(3))[0]
        assert torch.equal(a, b), name
        if name in ("denoise", "deblur", "inpaint"):
            c = t.corrupt(y, torch.Generator().manual_seed(4))[0]
            assert not torch.equal(a, c), name


def test_gaussian_taps_sum_to_one_and_scale_in_physical_units():
    w1, w2 = gaussian_taps(2.0, 1.0, torch.float64), gaussian_taps(2.0, 2.0, torch.float64)
    assert abs(w1.sum().item() - 1) < 1e-12 and abs(w2.sum().item() - 1) < 1e-12
    var = lambda w, s: (((torch.arange(w.numel()) - w.numel() // 2) * s) ** 2 * w).sum().item()  # noqa: E731
    # Cell integration adds s²/12 to the variance of the physical Gaussian.
    assert abs(var(w1, 1.0) - (4 + 1 / 12)) < 1e-3
    assert abs(var(w2, 2.0) - (4 + 4 / 12)) < 1e-2


def test_deblur_commutes_with_restriction_in_physical_units():
    u = _smooth(h=128, w=128).double()
    sigma = 3.0
    fine_then_restrict = msconv.restrict(gaussian_blur(u, sigma, 1.0), "average")
    physical = gaussian_blur(msconv.restrict(u, "average"), sigma, 2.0)  # σ means the same length
    pixel_units = gaussian_blur(msconv.restrict(u, "average"), sigma, 1.0)  # σ in coarse pixels: wrong
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    e_phys = (fine_then_restrict - physical)[inner].abs().max().item()
    e_pix = (fine_then_restrict - pixel_units)[inner].abs().max().item()
    assert e_phys < 2e-3 and e_phys < e_pix / 10


def test_deblur_blurs_and_adds_noise():
    y = torch.zeros(1, 1, 33, 33)
    y[..., 16, 16] = 1
    x, _ = Deblur(blur_sigma=2.0, noise_sigma=0).corrupt(y, torch.Generator().manual_seed(0))
    assert abs(x.sum().item() - 1) < 1e-5 and x[..., 16, 16].item() < 0.1
    xn, _ = Deblur(blur_sigma=2.0, noise_sigma=10).corrupt(y, torch.Generator().manual_seed(0))
    assert abs((xn - x).std().item() - 10 / 255) < 0.15 * 10 / 255


@pytest.mark.parametrize("kind", ["boxes", "strokes", "mixed"])
def test_inpaint_masks_are_real_shapes(kind):
    m = random_masks(4, 96, 80, torch.Generator().manual_seed(1), fraction=0.3, kind=kind)
    assert m.shape == (4, 1, 96, 80) and set(m.unique().tolist()) <= {0.0, 1.0}
    frac = 1 - m.mean(dim=(1, 2, 3))
    assert (frac >= 0.3).all() and (frac < 0.8).all()
    assert not torch.equal(m[0], m[1])  # independent per sample


def test_inpaint_mask_restricted_with_image():
    y = torch.rand(2, 3, 64, 64)
    t = Inpaint(0.3, "boxes")
    x, _ = t.corrupt(y, torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 64, 64) and t.in_channels(3) == 4
    m = x[:, 3:]
    assert torch.equal(x[:, :3], y * m)
    xr, yr = t.restrict_pair(x, y, 1)
    # The coarse mask is the observed fraction of each coarse cell.
    assert torch.allclose(xr[:, 3:], torch.nn.functional.avg_pool2d(m, 2))
    assert ((xr[:, 3:] > 0) & (xr[:, 3:] < 1)).any()
    assert torch.allclose(xr[:, :3], torch.nn.functional.avg_pool2d(y * m, 2), atol=1e-6)


@pytest.mark.parametrize("scale", [2, 4])
def test_sr_area_commutes_with_restriction(scale):
    y = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    t = SuperResolution(scale, "area")
    x, _ = t.corrupt(y, torch.Generator())
    assert x.shape == (2, 1, 64 // scale, 64 // scale)
    xr, yr = t.restrict_pair(x, y, 1)
    assert torch.allclose(xr, t.downsample(yr), atol=1e-12)


def test_sr_bicubic_and_pre_upsample():
    y = _smooth(h=64, w=64)
    x, _ = SuperResolution(4, "bicubic").corrupt(y, torch.Generator())
    assert x.shape == (2, 1, 16, 16)
    xu, _ = SuperResolution(2, "bicubic", pre_upsample=True).corrupt(y, torch.Generator())
    assert xu.shape == y.shape and (xu - y).abs().mean() < 0.02
    with pytest.raises(ValueError, match="multiple of scale"):
        SuperResolution(4).corrupt(torch.rand(1, 1, 30, 30), torch.Generator())


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="noise_sigma"):
        Denoise(-1)
    with pytest.raises(ValueError, match="unknown task"):
        build_task("colorize")
    with pytest.raises(TypeError, match="generator"):
        Denoise(25).corrupt(torch.rand(1, 1, 8, 8), 0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        Denoise(25).corrupt(torch.rand(8, 8), torch.Generator())


def test_coarse_same_poses_the_fine_problem_on_every_grid():
    y = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    yc = msconv.restrict(y, "average", levels=2)
    # sr: the x2 degradation of the restricted image, in that grid's own pixels
    t = SuperResolution(2, "area", pre_upsample=True, coarse="same")
    x, _ = t.corrupt(y, torch.Generator())
    xs, ys = t.pyramid_pair(x, y, 2)
    assert torch.equal(xs[0], x) and torch.allclose(ys[2], yc)
    assert torch.allclose(xs[2], t.corrupt(yc, torch.Generator())[0])
    assert all(torch.equal(a, b) for a, b in zip(t.corrupt_on_grid(y, torch.Generator(), 2), t.corrupt(yc, torch.Generator())))
    # deblur: the same blur in the coarse grid's pixels, and the fine noise draw at its fine std
    d = Deblur(1.6, 25.0, coarse="same")
    x, _ = d.corrupt(y, torch.Generator().manual_seed(0))
    xs, ys = d.pyramid_pair(x, y, 2)
    noise2 = xs[2] - gaussian_blur(yc, 1.6, 1.0)
    assert torch.allclose(noise2, 4 * msconv.restrict(x - gaussian_blur(y, 1.6, 1.0), "average", levels=2))
    xg, yg = d.corrupt_on_grid(y, torch.Generator().manual_seed(0), 2)
    assert torch.allclose(yg, yc) and abs(float((xg - gaussian_blur(yc, 1.6, 1.0)).std()) - 25 / 255) < 0.02
    # "restricted" keeps the generic rule
    r = Deblur(1.6, 25.0, coarse="restricted")
    x, _ = r.corrupt(y, torch.Generator().manual_seed(0))
    assert torch.equal(r.pyramid_pair(x, y, 1)[0][1], msconv.restrict(x, "average"))
    with pytest.raises(ValueError, match="coarse must be one of"):
        Deblur(coarse="x")

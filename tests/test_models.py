"""Every zoo model at several resolutions with both conv kinds (msconv.models)."""
import pytest
import torch

import math

from msconv.models import MODELS, build_model, he_init, make_conv

SMALL = dict(depth=4, width=8, blocks=2)


@pytest.mark.parametrize("conv", ["standard", "mf"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_runs_at_several_resolutions(name, conv):
    torch.manual_seed(0)
    up = 2 if name == "espcn" else 1
    kw = dict(SMALL, depth=2) if name == "unet" else SMALL
    m = build_model(name, in_channels=2, out_channels=1, conv=conv, upscale=up, **kw)
    for h, w in [(16, 16), (33, 20), (64, 48)]:
        x = torch.rand(2, 2, h, w, requires_grad=True)
        y = m(x)
        assert y.shape == (2, 1, up * h, up * w)
        y.square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
        m.zero_grad()


@pytest.mark.parametrize("name", ["dncnn", "unet", "resnet", "espcn"])
def test_residual_models_start_as_identity_on_first_channels(name):
    x = torch.rand(1, 2, 24, 24)
    m = build_model(name, 2, 1, **SMALL)
    assert torch.equal(m(x), x[:, :1])


def test_mf_sigma_sizes_every_mesh_free_layer_for_the_coarsest_grid():
    from msconv.nn import MFConv2d

    m = build_model("espcn", 1, 1, "mf", upscale=2, mf_sigma=2.0, mf_order=1, width=4)
    layers = [l for l in m.modules() if isinstance(l, MFConv2d)]
    assert layers and all(l.order == 1 for l in layers)
    assert sorted({round(l._sigma, 6) for l in layers}) == [2.0, round(2.0 * 5 / 3, 6)]  # 3x3 and the 5x5 head
    assert all(l._sigma == 0.5 for l in build_model("dncnn", 1, 1, "mf", depth=3, width=4).modules()
               if isinstance(l, MFConv2d))
    with pytest.raises(ValueError, match="mf_sigma"):
        build_model("dncnn", 1, 1, "mf", mf_sigma=-1.0, depth=3, width=4)


def test_conv_factory_errors():
    with pytest.raises(ValueError, match="conv must be one of"):
        make_conv("dense", 1, 1)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", 1, 1)
    with pytest.raises(ValueError, match="espcn"):
        build_model("dncnn", 1, 1, upscale=2)


def _post_activation_stds(model, x):
    stds = []
    hooks = [m.register_forward_hook(lambda m, i, o: stds.append(float(o.detach().std())))
             for m in model.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.Tanh))]
    model(x)
    for h in hooks:
        h.remove()
    return stds


@pytest.mark.parametrize("conv", ["standard", "mf"])
def test_deep_dncnn_keeps_its_signal_at_initialisation(conv):
    # PyTorch's default conv init divides the variance by ~6 per conv-ReLU pair, so in a 17-layer
    # DnCNN only the biases reached the head (post-ReLU std ~1.5e-2 from layer 5 on) and the model
    # did not learn. He init keeps every layer's activations at the input's scale.
    torch.manual_seed(0)
    width = 64 if conv == "standard" else 16
    m = build_model("dncnn", 1, 1, conv, depth=17, width=width)
    x = torch.rand(2, 1, 48, 48)
    stds = _post_activation_stds(m, x)
    assert len(stds) == 16
    assert min(stds) > 0.25 * float(x.std()), stds
    assert max(stds) < 4.0 * float(x.std()), stds


def test_he_init_matches_the_gain_for_both_conv_kinds():
    from msconv.nn import MFConv2d

    torch.manual_seed(0)
    x = torch.randn(8, 32, 40, 40)
    for conv in (torch.nn.Conv2d(32, 32, 3, padding=1), MFConv2d(32, 32, 3)):
        he_init(conv, gain=math.sqrt(2.0))
        var = float(conv(x)[..., 8:-8, 8:-8].var())
        assert 1.4 < var < 2.8, (type(conv).__name__, var)  # gain² = 2 for a unit white-noise input
        assert conv.bias is None or torch.count_nonzero(conv.bias) == 0


@pytest.fixture(scope="module")
def photos():
    from msconv.data import bundled_images

    return bundled_images(gray=True).images


def _photo_crops(ims, n, side, g):
    out = []
    for _ in range(n):
        im = ims[int(torch.randint(len(ims), (1,), generator=g))]
        h, w = im.shape[1:]
        t, l = (int(torch.randint(d - side, (1,), generator=g)) for d in (h, w))
        out.append(im[:, t:t + side, l:l + side])
    return torch.stack(out)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_model_learns_at_its_default_size(name, photos):
    """A property of the architecture and its initialisation, not a timing: at its default size
    (DnCNN 17 × 64, UNet, ResNet, ESPCN), 60 Adam steps on photo crops bring the denoising loss
    well below the noisy input's (σ = 25: MSE 9.6e-3)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = build_model(name, 1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    sigma = 25 / 255
    losses = []
    for _ in range(60):
        y = _photo_crops(photos, 4, 32, g)
        x = y + sigma * torch.randn(y.shape, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    ratio = sum(losses[-10:]) / 10 / sigma**2
    assert ratio < 0.6, f"{name}: loss/input MSE {ratio:.2f} after 60 steps"

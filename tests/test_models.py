"""Every zoo model at several resolutions with both conv kinds (msconv.models)."""
import pytest
import torch

from msconv.models import MODELS, build_model, make_conv, mf_available

SMALL = dict(depth=4, width=8, blocks=2)


@pytest.mark.parametrize("conv", ["standard", "mf"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_runs_at_several_resolutions(name, conv):
    if conv == "mf" and not mf_available():
        pytest.skip("msconv.nn.MFConv2d is not available yet")
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
    if not mf_available():
        pytest.skip("msconv.nn.MFConv2d is not available")
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
    if not mf_available():
        with pytest.raises(ImportError, match="--conv standard"):
            make_conv("mf", 1, 1)

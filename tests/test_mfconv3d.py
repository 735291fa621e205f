"""MFConv3d against its definition, against MFConv2d (a volume constant along depth), on anisotropic
voxels and coarse grids (σ floor), with gradients, strided, by both paths; and the same operator on every grid."""
import math

import pytest
import torch
import torch.nn.functional as F

import msconv
from msconv import reference
from msconv.nn.mfconv3d import MFConv3d, mf_multi_indices_3d, mf_stencil_3d
from msconv.ops import restrict3d


def test_a_drop_in_for_conv3d_with_same_padding():
    conv = MFConv3d(2, 4, 3)
    x = torch.rand(2, 2, 8, 9, 10)
    y = conv(x)
    assert y.shape == (2, 4, 8, 9, 10) and torch.isfinite(y).all()
    assert len(mf_multi_indices_3d(2)) == 10 and len(set(mf_multi_indices_3d(3))) == 20
    # nn.Conv3d's output scale for white noise at s = 1 (1/3 for its default init), within sampling error
    big = MFConv3d(16, 32, 3, bias=False)
    v = big(torch.randn(1, 16, 12, 12, 12))[..., 3:-3, 3:-3, 3:-3].var().item()
    assert 0.15 < v < 0.7


def test_the_stencil_is_the_sum_of_separable_jets():
    order, sigma = 2, 0.6
    theta = torch.randn(1, 1, len(mf_multi_indices_3d(order)), dtype=torch.float64)
    st = mf_stencil_3d(theta, (sigma,) * 3, (1.0,) * 3)[0, 0]
    taps = reference.mf_taps(order, sigma, 1.0)[0].flip(-1)
    expect = sum(theta[0, 0, m] * taps[c][:, None, None] * taps[b][None, :, None] * taps[a][None, None, :]
                 for m, (a, b, c) in enumerate(mf_multi_indices_3d(order)))
    torch.testing.assert_close(st, expect)


@pytest.mark.parametrize("stride", [1, 2])
def test_a_volume_constant_along_depth_gives_the_2d_layer(stride):
    torch.manual_seed(0)
    conv3 = MFConv3d(2, 3, 3, (1, stride, stride), sigma_floor=None).double()
    conv2 = msconv.MFConv2d(2, 3, 3, stride, sigma_floor=None).double()
    with torch.no_grad():
        conv3.weight.zero_()
        conv3.bias.copy_(conv2.bias)
        idx3 = {abc: m for m, abc in enumerate(mf_multi_indices_3d(2))}
        for m2, (a, b) in enumerate(reference.mf_multi_indices(2)):
            conv3.weight[:, :, idx3[(a, b, 0)]] = conv2.weight[:, :, m2]
    x2 = torch.rand(1, 2, 11, 12, dtype=torch.float64)
    x3 = x2[:, :, None].expand(1, 2, 16, 11, 12).contiguous()
    # Interior slices (no zero padding in depth within the kernel's reach): the depth taps sum to the
    # Gaussian's mass inside its 4-sigma cut.
    torch.testing.assert_close(conv3(x3)[:, :, 8], conv2(x2), rtol=1e-4, atol=1e-4)


def test_anisotropic_voxels_and_the_sigma_floor():
    st = MFConv3d(1, 2, 3, spacing=(3.0, 1.0, 1.0), sigma_floor=None).stencil()
    assert st.shape[2] < st.shape[3] == st.shape[4]  # thick slices: fewer taps across them
    conv = MFConv3d(1, 2, 3, spacing=(3.0, 1.0, 1.0))  # with the floor: sigma 1.5 across the 3-voxel slices
    with msconv.grid_scale(4.0):
        y = conv(torch.rand(1, 1, 6, 6, 6))
        st4 = conv.stencil()
    assert torch.isfinite(y).all() and st4.abs().sum() > 0
    off = MFConv3d(1, 2, 3, sigma_floor=None)
    off.load_state_dict({k: v for k, v in conv.state_dict().items()})
    def spread(st):  # the share of the stencil's mass off its centre tap
        st, c = st.detach(), tuple(k // 2 for k in st.shape[2:])
        return float(1 - st[:, :, c[0], c[1], c[2]].abs().sum() / st.abs().sum())

    with msconv.grid_scale(8.0):  # without the floor the derivative taps vanish: a 1x1x1 mix is left
        assert spread(off.stencil()) < 1e-6 < 0.1 < spread(conv.stencil())


def test_the_same_operator_on_a_coarser_grid():
    """For a smooth volume, the layer on the restricted volume at s = 2 is the restricted output at s = 1
    up to a discretisation error that shrinks as the volume gets smoother."""
    torch.manual_seed(0)
    conv = MFConv3d(1, 1, 3, order=2, sigma=1.0).double()
    n = 32
    g = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    errors = []
    for k in (3.0, 1.5):
        u = (torch.sin(2 * math.pi * k * g)[:, None, None] * torch.cos(2 * math.pi * k * g)[None, :, None]
             * torch.sin(2 * math.pi * k * g + 1)[None, None, :])[None, None]
        with torch.no_grad():
            fine = restrict3d(conv(u))
            with msconv.grid_scale(2.0):
                coarse = conv(restrict3d(u))
        inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
        errors.append(float((fine - coarse)[inner].norm() / fine[inner].norm()))
    assert errors[1] < errors[0] / 2 and errors[1] < 0.05, errors


def test_gradients_and_bad_arguments():
    conv = MFConv3d(1, 1, 3, order=1).double()
    x = torch.rand(1, 1, 5, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w: F.conv3d(t, mf_stencil_3d(w, (0.5,) * 3, (1.0,) * 3), padding=3),
                                    (x, conv.weight.detach().clone().requires_grad_(True)))
    for kw, match in (({"stride": 0}, "stride"), ({"stride": (2, 2)}, "stride"), ({"padding": 2}, "padding"),
                      ({"dilation": 2}, "dilation"), ({"padding_mode": "reflect"}, "padding_mode"),
                      ({"method": "fft"}, "method"), ({"order": 9}, "order"), ({"spacing": (1, 0, 1)}, "spacing"),
                      ({"groups": 3}, "divisible")):
        with pytest.raises(ValueError, match=match):
            MFConv3d(2, 4, 3, **kw)
    with pytest.raises(ValueError, match="D, H, W"):
        conv(torch.rand(1, 1, 5, 5))


def test_convert_fits_conv3d_layers_and_leaves_the_rest():
    torch.manual_seed(0)
    blur = torch.nn.Conv3d(1, 1, 3, padding=1, bias=False)
    g = torch.tensor([0.25, 0.5, 0.25])
    with torch.no_grad():
        blur.weight.copy_((g[:, None, None] * g[None, :, None] * g[None, None, :])[None, None])
    blur.weight.requires_grad_(False)
    net = torch.nn.Sequential(blur, torch.nn.Conv3d(1, 2, 1), torch.nn.Conv3d(2, 2, 3, stride=2, padding=1),
                              torch.nn.Conv3d(2, 2, 3, stride=(1, 2, 2), padding=1), torch.nn.Conv3d(2, 2, 3))
    mf, report = msconv.convert(net, warn_above=None)
    assert [r["converted"] for r in report] == [True, False, True, True, False]
    assert isinstance(mf[0], MFConv3d) and not mf[0].weight.requires_grad  # frozen stays frozen
    assert report[0]["rel_error"] < 0.2 and "channel mix" in report[1]["reason"] and "padding" in report[4]["reason"]
    assert (mf[2].stride, mf[3].stride) == ((2, 2, 2), (1, 2, 2))
    x = torch.rand(1, 2, 9, 10, 11)
    with torch.no_grad():
        assert mf[2](x).shape == net[2](x).shape and mf[3](x).shape == net[3](x).shape
    x = torch.rand(1, 1, 12, 12, 12)
    with torch.no_grad():
        err = (mf[0](x) - blur(x))[..., 2:-2, 2:-2, 2:-2].norm() / blur(x)[..., 2:-2, 2:-2, 2:-2].norm()
    assert err < 0.1  # a 2nd-order Gaussian basis represents a binomial blur closely, not exactly


@pytest.mark.parametrize("stride", [2, 3, (1, 2, 2), (2, 1, 3)])
def test_strided_output_has_conv3d_shape_and_cell_centred_samples(stride):
    conv = MFConv3d(1, 1, 3, stride, padding=1, order=1, sigma=1.0, sigma_floor=None, bias=False).double()
    for size in ((8, 8, 8), (9, 10, 11)):
        want = torch.nn.Conv3d(1, 1, 3, stride, padding=1)(torch.rand(1, 1, *size)).shape
        assert conv(torch.rand(1, 1, *size, dtype=torch.float64)).shape == want
    # Smoothing a linear field returns it at output cell I's centre, S·I + (S − 1)/2 input cells (to the
    # 4σ truncation): the cells of the grid restrict3d makes for S = 2.
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0] = 1
    n = 30
    d, h, w = torch.meshgrid(*[torch.arange(n, dtype=torch.float64)] * 3, indexing="ij")
    y = conv((d + 2 * h + 3 * w)[None, None])[0, 0]
    sd, sh, sw = conv.stride
    cd, ch, cw = torch.meshgrid(*[s * torch.arange(-(-n // s), dtype=torch.float64) + (s - 1) / 2 for s in conv.stride],
                                indexing="ij")
    inner = tuple(slice(6 // s + 1, -(6 // s) - 1) for s in conv.stride)
    torch.testing.assert_close(y[inner], (cd + 2 * ch + 3 * cw)[inner], atol=0, rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 2, (2, 1, 1)])
def test_dense_and_separable_paths_agree_with_gradients(stride):
    torch.manual_seed(0)
    dense = MFConv3d(4, 6, 3, stride, groups=2, spacing=(2.0, 1.0, 1.0), method="dense").double()
    sep = MFConv3d(4, 6, 3, stride, groups=2, spacing=(2.0, 1.0, 1.0), method="separable").double()
    sep.load_state_dict(dense.state_dict())
    x = torch.rand(2, 4, 7, 8, 9, dtype=torch.float64)
    for scale in (1.0, 0.5, 4.0):  # s = 4: the σ floor rescales θ per axis
        got = []
        for layer in (dense, sep):
            layer.zero_grad()
            xg = x.clone().requires_grad_()
            with msconv.grid_scale(scale):
                y = layer(xg)
            (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
            got.append((y, xg.grad, layer.weight.grad, layer.bias.grad))
        for a, b in zip(*got):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_auto_takes_dense_for_small_stencils_and_separable_for_wide_ones():
    conv = MFConv3d(16, 16, 3)
    x = torch.empty(2, 16, 32, 32, 32, device="meta")
    assert conv._pick(x, [7, 7, 7]) == "dense" and conv._pick(x, [35, 35, 35]) == "separable"


def test_in_place_parameter_updates_are_seen_on_every_call():
    # The per-axis filters are cached; the stencil is built from θ at each call.
    torch.manual_seed(0)
    conv = MFConv3d(2, 2, 3, method="dense")
    x = torch.rand(1, 2, 6, 6, 6)
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    for method in ("dense", "separable"):
        conv.method = method
        conv(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        fresh = MFConv3d(2, 2, 3, method=method)
        fresh.load_state_dict(conv.state_dict())
        torch.testing.assert_close(conv(x), fresh(x))

"""MFConv2d and convert() in the settings around training: torch.compile with dynamic shapes, high
orders, the meta device, frozen and scripted models, exact checkpoints, the library defaults."""
import io
import warnings
from collections import OrderedDict

import pytest
import torch
import torch._dynamo.testing
import torch.nn as nn

import msconv
from conftest import TOL
from msconv import reference
from msconv.nn import MFConv2d, convert
from msconv.nn.mfconv import DEFAULT_SIGMA_FLOOR

pytestmark = pytest.mark.filterwarnings("ignore::msconv.nn.UnresolvedSigmaWarning")


# ------------------------------------------------------------------ torch.compile, dynamic shapes


def _compiled_matches_eager(layer, backend, sizes, scales, grad):
    """Compile once with dynamic shapes and fullgraph; every (size, scale) must match eager in fp32."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(layer, backend=counter, dynamic=True, fullgraph=True)
    atol, rtol = TOL[torch.float32]
    for s in scales:
        for h, w in sizes:
            x = torch.randn(3, layer.in_channels, h, w, requires_grad=grad)
            with msconv.grid_scale(s):
                y = compiled(x)
                ref = layer(x)
            torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)
            if grad:
                (gx,) = torch.autograd.grad(y.square().sum(), x)
                (rx,) = torch.autograd.grad(ref.square().sum(), x)
                torch.testing.assert_close(gx, rx, atol=atol, rtol=rtol)
    # A graph per grid scale at least (a constant of the graph, guarded on); sizes may add some,
    # as torch's own meta kernels guard on size ranges (their channels-last checks).
    assert counter.frame_count >= len(scales), counter.frame_count
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compile_dynamic_fullgraph_across_sizes_and_scales(backend):
    # Before: fullgraph failed on min(costs, key=costs.get) in the method choice; without
    # fullgraph the graph broke there and inductor failed with "cannot determine truth value of
    # Relational" on the symbolic stencil size of the resumed graph.
    torch.manual_seed(0)
    layer = MFConv2d(2, 3, 3)
    # inductor compiles a C++ kernel per graph: forward only keeps it quick.
    _compiled_matches_eager(layer, backend, [(8, 10), (11, 9), (16, 13)], (1.0, 2.0), grad=backend != "inductor")


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw",
    [{"stride": 2, "padding_mode": "reflect"}, {"padding_mode": "circular", "method": "fft"},
     {"padding_mode": "replicate", "method": "dense"}, {"stride": 2, "padding_mode": "circular"}],
    ids=["stride2-reflect", "fft", "replicate-dense", "stride2-circular"],
)
def test_compile_dynamic_inductor_every_path_with_backward(kw):
    # Before: the negative floor division of ceil(H/S), the 5-D FFT output and inductor's
    # F.pad(mode="replicate") backward each failed to compile.
    torch.manual_seed(0)
    _compiled_matches_eager(MFConv2d(2, 3, 3, **kw), "inductor", [(8, 10), (11, 9)], (1.0, 2.0), grad=True)


# ------------------------------------------------------------------------------ orders that overflow


def test_order_whose_taps_overflow_is_refused_naming_the_largest_usable_one():
    # Before: MFConv2d(1, 1, order=48) built, with finite weights, and returned NaN.
    with pytest.raises(ValueError, match=r"order=48 .*largest usable order here is 40.*order <= 40"):
        MFConv2d(1, 1, order=48)
    with pytest.raises(ValueError, match=r"order=45 .*torch.float32"):
        MFConv2d(1, 1, order=45)
    # float64 has room for far higher orders; σ = 1/6 (kernel_size 1) for fewer.
    with pytest.raises(ValueError, match=r"largest usable order here is 28"):
        MFConv2d(1, 1, 1, order=30)
    MFConv2d(1, 1, order=48, dtype=torch.float64)


@pytest.mark.parametrize("scale", [0.125, 1.0, 2.0, 8.0])
def test_largest_usable_order_gives_finite_outputs(scale):
    torch.manual_seed(0)
    layer = MFConv2d(2, 2, order=40)
    with msconv.grid_scale(scale):
        y = layer(1e3 * torch.randn(1, 2, 12, 12))
    assert torch.isfinite(y).all()


def test_functional_form_refuses_overflowing_taps():
    layer = MFConv2d(1, 1, order=60, dtype=torch.float64).float()
    with pytest.raises(ValueError, match=r"order=60 .*taps overflow"):
        layer(torch.randn(1, 1, 8, 8))


# ----------------------------------------------------------------------------------- meta device


@pytest.mark.parametrize(
    "kw", [{}, {"stride": 2, "padding_mode": "circular"}, {"learn_sigma": True, "order": 3}, {"sigma_floor": None}]
)
def test_meta_device_gives_shapes_like_conv2d(kw):
    # Before: "unknown device type for autocast" (and Tensor.item() on a learnable σ).
    x = torch.randn(2, 3, 9, 7, device="meta", requires_grad=True)
    for layer in (MFConv2d(3, 4, 3, device="meta", **kw), MFConv2d(3, 4, 3, **kw).to("meta")):
        assert layer.weight.device.type == "meta"
        for s in (1.0, 4.0):
            with msconv.grid_scale(s):
                y = layer(x)
            conv = nn.Conv2d(3, 4, 3, stride=layer.stride, padding=1, device="meta")
            expect = (2, 4, 5, 4) if layer.stride[0] == 2 else conv(x).shape
            assert y.device.type == "meta" and tuple(y.shape) == tuple(expect)
        y.sum().backward()
        assert x.grad.shape == x.shape and layer.weight.grad.shape == layer.weight.shape
        x.grad = None
    cl = x.detach().contiguous(memory_format=torch.channels_last)
    assert MFConv2d(3, 4, 3, device="meta")(cl).is_contiguous(memory_format=torch.channels_last)


def test_meta_then_to_empty_and_reset_parameters_is_a_working_layer():
    layer = MFConv2d(3, 4, 5, device="meta").to_empty(device="cpu")
    layer.reset_parameters()
    assert layer.sigma.item() == 5 / 6 and torch.isfinite(layer.weight).all()
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(layer(x), reference.mf_conv2d_ref(x, layer.weight, layer.bias, 5 / 6))


# ------------------------------------------------------------------------- convert() and TorchScript


def test_convert_keeps_frozen_layers_frozen():
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    net[0].requires_grad_(False)
    net[2].bias.requires_grad_(False)
    new, _ = convert(net, warn_above=None)
    assert not new[0].weight.requires_grad and not new[0].bias.requires_grad
    assert new[2].weight.requires_grad and not new[2].bias.requires_grad


def test_convert_refuses_a_scripted_model():
    # Before: a silent no-op with an empty report.
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1)))
    with pytest.raises(TypeError, match="TorchScript.*convert the eager nn.Module first"):
        convert(scripted)


def test_script_of_mfconv2d_says_what_is_supported():
    with pytest.raises(TypeError, match=r"torch.jit.script.*torch.compile or torch.export.*msconv.nn.bake"):
        torch.jit.script(nn.Sequential(MFConv2d(2, 2, 3), nn.ReLU()))


# ------------------------------------------------------------------------------ exact checkpoints


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("sigma", [0.9, 5 / 6, 1 / 6])
def test_state_dict_round_trip_is_bitwise_exact(sigma, learn_sigma):
    # Before: σ = 0.9 was saved as a float32 buffer and reloaded as 0.89999998 (outputs 1.4e-7 off).
    torch.manual_seed(0)
    a = MFConv2d(3, 5, 3, sigma=sigma, learn_sigma=learn_sigma)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = MFConv2d(3, 5, 3, sigma=0.3, learn_sigma=learn_sigma)
    b.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(2, 3, 16, 16)
    for s in (0.5, 1.0, 4.0):
        with msconv.grid_scale(s):
            assert torch.equal(b(x), a(x))
    if not learn_sigma:
        assert b._sigma == sigma and b.sigma.dtype == torch.float64


def test_fixed_sigma_stays_exact_through_dtype_casts():
    layer = MFConv2d(2, 2, 5).half()
    assert layer.sigma.dtype == torch.float64 and layer.sigma.item() == 5 / 6
    assert layer.float().state_dict()["sigma"].item() == 5 / 6


def test_old_checkpoint_with_float32_sigma_loads():
    # Format 1 stored a fixed σ in the module dtype; 0.89999998 is read back as the decimal 0.9.
    a = MFConv2d(3, 5, 3, sigma=0.9)
    old = a.state_dict()
    old["sigma"] = old["sigma"].float()
    old._metadata = OrderedDict({"": {"version": 1}})
    b = MFConv2d(3, 5, 3, sigma=0.3)
    b.load_state_dict(old)
    assert b._sigma == 0.9 and b.sigma.dtype == torch.float64
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(b(x), a(x))


# ------------------------------------------------------------------------------- library defaults


def test_library_sigma_floor_default_is_the_clis():
    from msconv.train.config import TrainConfig

    assert DEFAULT_SIGMA_FLOOR == TrainConfig().mf_sigma_floor == 0.5
    layer = MFConv2d(2, 2, 3)
    assert layer.sigma_floor == 0.5 and "sigma_floor" not in repr(layer)
    assert "sigma_floor=None" in repr(MFConv2d(2, 2, 3, sigma_floor=None))
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    floored = MFConv2d(2, 2, 3, sigma_floor=0.5).double()
    layer = layer.double()
    layer.load_state_dict(floored.state_dict())
    with msconv.grid_scale(4.0), warnings.catch_warnings():
        warnings.simplefilter("error", msconv.nn.UnresolvedSigmaWarning)  # floored: resolved
        torch.testing.assert_close(layer(x), floored(x))


def test_convert_uses_the_sigma_floor_and_leaves_1x1_convs_alone():
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1, stride=2))
    new, report = convert(net, warn_above=None)
    assert type(new[1]) is nn.Conv2d and type(new[2]) is nn.Conv2d
    assert new[0].sigma_floor == DEFAULT_SIGMA_FLOOR
    by_name = {r["name"]: r for r in report}
    for name in ("1", "2"):
        assert by_name[name]["converted"] is False and "1×1" in by_name[name]["reason"]
    torch.testing.assert_close(new[1].weight, net[1].weight)
    off, _ = convert(net, warn_above=None, sigma_floor=None)
    assert off[0].sigma_floor is None
    assert convert(net, warn_above=None, sigma_floor=1.0)[0][0].sigma_floor == 1.0
    with pytest.raises(ValueError, match=r"sigma_floor must be None \(off\) or a finite number > 0.*sigma_floor=0"):
        convert(net, sigma_floor=0)

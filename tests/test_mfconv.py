"""mf_conv2d / MFConv2d: every path and backend against msconv.reference.mf_conv2d_ref."""
import importlib.util
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import msconv
from conftest import TOL
from msconv import reference
from msconv.ops import _backend
from msconv.ops import mfconv as mfops

# The reference reads a learnable σ's value for the stencil support: intended, not a warning.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths"),  # torch's, in convert's input
]

SCALES = [2.0, 1.0, 0.5, 0.25]
MODES = ["zeros", "reflect", "replicate", "circular"]


def _backends():
    out = ["reference"]
    if mfops._jets_op() is not None:
        out += [b for b in ("cpp", "triton") if _backend._available(b, torch.device("cpu")) is None]
        if importlib.util.find_spec("msconv.triton.mf_jets") is None:
            out = [b for b in out if b != "triton"]
    return out


BACKENDS = _backends()
# Triton runs under the (slow) interpreter on CPU: its full matrix is marked slow; one quick
# case (test_triton_quick) always runs.
BACKEND_PARAMS = [pytest.param(b, marks=pytest.mark.slow) if b == "triton" else b for b in BACKENDS]


def _methods(mode, auto=False):
    return ["separable"] + (["fft"] if mode == "circular" else []) + (["auto"] if auto else [])


def _data(n, c_in, c_out, groups, order, h, w, seed=0, dtype=torch.float64, sliced=False, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    m = (order + 1) * (order + 2) // 2
    if sliced:  # a view with non-contiguous strides everywhere
        x = torch.randn(n + 1, c_in + 1, 2 * h, w + 2, generator=g, dtype=torch.float64)[1:, 1:, ::2, 1:-1]
    else:
        x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(c_out, c_in // groups, m, generator=g, dtype=torch.float64)
    b = torch.randn(c_out, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype), wt.to(dtype), b.to(dtype)


def _run_with_grads(fn, x, wt, b, sigma, seed=5):
    """Output and grads (x, weight, bias, σ) of ``fn`` for a fixed random upstream gradient."""
    x, wt, b = (t.detach().requires_grad_() for t in (x, wt, b))
    sig = torch.tensor(sigma, dtype=torch.float64, requires_grad=True)
    y = fn(x, wt, b, sig)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y.backward(gy.to(y.dtype))
    return y, x.grad, wt.grad, b.grad, sig.grad


def _close(a, b, dtype, what=""):
    atol, rtol = TOL[dtype]
    # Gradients of θ and σ sum over every pixel: scale atol by the reference's magnitude.
    scale = max(1.0, b.abs().max().item())
    torch.testing.assert_close(a.double(), b.double(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _ref(scale, stride, mode, groups):
    return lambda x, w, b, s: reference.mf_conv2d_ref(x, w, b, s, scale, stride, mode, groups)


# ---------------------------------------------------------------------------------------------
# The reference itself


def test_reference_stencil_is_jets_then_mix():
    x, wt, b = _data(2, 4, 6, 2, 2, 9, 7)
    for scale, stride in itertools.product((1.0, 0.5), (1, 2)):
        taps, kmin = reference.mf_taps(2, 0.6, scale, stride)
        k = taps.shape[1]
        xp = reference.mf_pad(x, reference.mf_padding(9, kmin, k, stride), reference.mf_padding(7, kmin, k, stride), "zeros")
        jets = reference.mf_jets_ref(xp, taps.flip(-1), 2, stride)
        mixed = F.conv2d(jets, wt.reshape(6, -1, 1, 1), b, groups=2)
        torch.testing.assert_close(reference.mf_conv2d_ref(x, wt, b, 0.6, scale, stride, "zeros", 2), mixed)


def test_reference_derivative_of_linear_field():
    # True convolution: the x-derivative jet of u(x, y) = x is +1 and of y is 0; the output
    # of a stride-2 smoothing sits at the cell-centred position 2I + ½.
    u = torch.arange(40.0, dtype=torch.float64).expand(1, 1, 40, 40)
    dx = torch.zeros(1, 1, 6, dtype=torch.float64)
    dx[0, 0, 1] = 1
    # (to the 4σ truncation: the tails beyond hold ~1e-6 of the mass)
    y = reference.mf_conv2d_ref(u, dx, None, 1.0)[0, 0, 10:30, 10:30]
    torch.testing.assert_close(y, torch.ones(20, 20, dtype=torch.float64), atol=1e-5, rtol=0)
    sm = torch.zeros(1, 1, 6, dtype=torch.float64)
    sm[0, 0, 0] = 1
    y = reference.mf_conv2d_ref(u, sm, None, 1.0, stride=2)
    torch.testing.assert_close(y[0, 0, 10, 5:15], 2 * torch.arange(5, 15, dtype=torch.float64) + 0.5, atol=0, rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 2, 3, 7])
def test_reference_is_the_defining_sum(stride):
    # y[I, J] = Σ_m θ_m Σ_{k,l} w_b[k] w_a[l] u[S·I − k, S·J − l] (u = 0 outside), straight
    # from the definition in mf_taps — including stride 7 on a coarse grid, where the padding
    # before the image is negative (a crop).
    g = torch.Generator().manual_seed(stride)
    u = torch.randn(9, 8, generator=g, dtype=torch.float64)
    theta = torch.randn(3, generator=g, dtype=torch.float64)
    scale = 2.0 if stride == 7 else 0.5
    taps, kmin = reference.mf_taps(1, 0.5, scale, stride)
    ho, wo = -(-9 // stride), -(-8 // stride)
    want = torch.zeros(ho, wo, dtype=torch.float64)
    for i, j in itertools.product(range(ho), range(wo)):
        for m, (a, b) in enumerate(reference.mf_multi_indices(1)):
            for k, l in itertools.product(range(taps.shape[1]), repeat=2):
                r, c = stride * i - (k + kmin), stride * j - (l + kmin)
                if 0 <= r < 9 and 0 <= c < 8:
                    want[i, j] += theta[m] * taps[b, k] * taps[a, l] * u[r, c]
    got = reference.mf_conv2d_ref(u[None, None], theta[None, None], None, 0.5, scale, stride)
    torch.testing.assert_close(got[0, 0], want)


def test_reference_smoothing_preserves_constants():
    # The (0,0) jet integrates the Gaussian over the cells: a constant stays constant (to the
    # 4σ truncation) at every scale and stride, with replicate padding also at the border.
    u = torch.full((1, 1, 7, 6), 3.0, dtype=torch.float64)
    w = torch.zeros(1, 1, 6, dtype=torch.float64)
    w[0, 0, 0] = 1
    for scale, stride in itertools.product(SCALES, (1, 2, 3)):
        y = reference.mf_conv2d_ref(u, w, None, 0.7, scale, stride, "replicate")
        torch.testing.assert_close(y, torch.full_like(y, 3.0), atol=0, rtol=1e-4)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_pad_wider_than_image(mode):
    # Wide stencils on coarse grids pad more than the image size: the rule repeats.
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    y = reference.mf_pad(x, (7, 5), (6, 9), mode)
    assert y.shape == (1, 2, 15, 19)
    i = torch.arange(-7, 3 + 5)
    if mode == "circular":
        ref = x[:, :, i % 3]
    elif mode == "replicate":
        ref = x[:, :, i.clamp(0, 2)]
    else:
        ref = x[:, :, torch.tensor([(lambda q: q if q < 3 else 4 - q)(k % 4) for k in i.tolist()])]
    torch.testing.assert_close(y[..., 6:10], ref)


# ---------------------------------------------------------------------------------------------
# Every path and backend against the reference, forward and all gradients (float64)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_paths_match_reference(order, stride, mode, backend):
    if backend == "triton" and (order not in (1, 4) or mode not in ("zeros", "reflect")):
        pytest.skip("Triton under the interpreter is slow: a subset here, the jets op's own tests cover it")
    groups = 2 if order % 2 else 1
    x, wt, b = _data(2, 4, 6, groups, order, 7, 9, seed=order + 10 * stride, sliced=order == 3, channels_last=order == 1)
    # Two of the four scales per case, rotating so every scale meets every order, stride and mode.
    for scale in (SCALES[(order + stride) % 4], SCALES[(order + stride + 2) % 4]):
        sigma = 0.6
        ref = _run_with_grads(_ref(scale, stride, mode, groups), x, wt, b, sigma)
        for method in _methods(mode):
            fn = lambda x, w, b, s: msconv.mf_conv2d(x, w, b, s, scale, stride, mode, groups, method, backend)  # noqa: E731
            got = _run_with_grads(fn, x, wt, b, sigma)
            assert got[0].shape == (2, 6, -(-7 // stride), -(-9 // stride))
            for name, a, r in zip(("y", "grad x", "grad weight", "grad bias", "grad sigma"), got, ref):
                _close(a, r, torch.float64, f"{method}/{backend} s={scale} {name}")


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton (or msconv.triton.mf_jets) here")
def test_triton_quick():
    x, wt, b = _data(1, 2, 4, 2, 2, 6, 7, seed=11)
    ref = _run_with_grads(_ref(0.5, 2, "reflect", 2), x, wt, b, 0.4)
    fn = lambda x, w, b, s: msconv.mf_conv2d(x, w, b, s, 0.5, 2, "reflect", 2, "separable", "triton")  # noqa: E731
    for name, a, r in zip(("y", "grad x", "grad weight", "grad bias", "grad sigma"), _run_with_grads(fn, x, wt, b, 0.4), ref):
        _close(a, r, torch.float64, f"triton {name}")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_dtypes(dtype, mode, backend):
    x, wt, b = _data(2, 3, 4, 1, 2, 10, 11, seed=3, dtype=dtype)
    for scale, stride in [(1.0, 1), (0.5, 2), (0.25, 1)]:
        ref = _run_with_grads(_ref(scale, stride, mode, 1), x.double(), wt.double(), b.double(), 0.5)
        for method in _methods(mode, auto=True):
            fn = lambda x, w, b, s: msconv.mf_conv2d(x, w, b, s, scale, stride, mode, 1, method, backend)  # noqa: E731
            got = _run_with_grads(fn, x, wt, b, 0.5)
            assert got[0].dtype == dtype and got[1].dtype == dtype
            for name, a, r in zip(("y", "grad x", "grad weight", "grad bias", "grad sigma"), got, ref):
                _close(a, r, dtype, f"{method}/{backend} {dtype} s={scale} {name}")


def test_dense_method_is_reference():
    x, wt, b = _data(1, 2, 3, 1, 2, 6, 5)
    y = msconv.mf_conv2d(x, wt, b, 0.5, 0.5, method="dense")
    torch.testing.assert_close(y, reference.mf_conv2d_ref(x, wt, b, 0.5, 0.5))


@pytest.mark.parametrize("method", ["separable", "fft"])
def test_gradcheck(method):
    x, wt, b = _data(1, 2, 2, 1, 2, 5, 6, seed=7)
    sig = torch.tensor(0.4, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, wt, b, sig))
    fn = lambda x, w, b, s: msconv.mf_conv2d(x, w, b, s, 1.0, 2, "circular", method=method)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs[:3] + (sig.detach(),))


def test_scale_from_context():
    layer = msconv.MFConv2d(3, 4, 5, stride=2, sigma_floor=None).double()  # the paper's fixed σ on every grid
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    for s in (2.0, 0.25):
        with msconv.grid_scale(s):
            y = layer(x)
        torch.testing.assert_close(y, reference.mf_conv2d_ref(x, layer.weight, layer.bias, 5 / 6, s, 2))


def test_auto_picks_cheapest_and_fft_for_wide_circular():
    # Measured (see _EFF): the fused separable kernel wins every stride-1 case up to K = 35,
    # fft takes over for circular padding around K ≈ 70.
    pick = lambda *a, **kw: min((c := mfops._method_costs(*a, **kw)), key=c.get)  # noqa: E731
    assert pick(1, 16, 16, 1, 2, 131, 128, 128, 1, "circular") == "fft"
    assert pick(1, 16, 16, 1, 2, 35, 128, 128, 1, "circular") == "separable"
    assert pick(1, 64, 64, 1, 2, 35, 64, 64, 1, "circular") == "separable"  # was fft; separable measured faster
    assert pick(1, 16, 16, 1, 2, 7, 128, 128, 1, "zeros") == "separable"
    assert pick(1, 64, 64, 1, 2, 6, 64, 64, 2, "zeros") == "separable"  # stride 2: the jets kernel
    # without the compiled jets kernel the PyTorch jets are slow: dense or fft take over
    assert pick(1, 64, 64, 1, 2, 11, 128, 128, 1, "zeros", "reference") == "dense"
    assert "fft" not in mfops._method_costs(1, 16, 16, 1, 2, 35, 128, 128, 1, "zeros")


def test_compile_fullgraph():
    torch._dynamo.reset()
    with msconv.grid_scale(2.0):  # the scale now lives in thread-local state that dynamo reads
        pass
    layer = msconv.MFConv2d(3, 4, 3, stride=2, padding_mode="reflect")
    x = torch.randn(2, 3, 11, 10, requires_grad=True)
    ref_y = layer(x)
    ref_y.sum().backward()
    ref_gx, ref_gw = x.grad.clone(), layer.weight.grad.clone()
    x.grad, layer.weight.grad = None, None
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(x.grad, ref_gx)
    torch.testing.assert_close(layer.weight.grad, ref_gw)
    # A new scale is a guard failure and a recompile, not a stale graph — also once dynamo has
    # seen the scale change (automatic dynamic would otherwise make it symbolic).
    for s in (0.5, 0.25, 1.0):
        with msconv.grid_scale(s):
            torch.testing.assert_close(compiled(x), layer(x))


# ---------------------------------------------------------------------------------------------
# The layer


def test_layer_matches_functional_and_learns_sigma():
    layer = msconv.MFConv2d(4, 6, 5, groups=2, padding_mode="replicate", order=3, learn_sigma=True).double()
    assert isinstance(layer.sigma, nn.Parameter) and layer.weight.shape == (6, 2, 10)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    with msconv.grid_scale(0.5):
        y = layer(x)
    y.square().mean().backward()
    assert layer.sigma.grad is not None and layer.sigma.grad.abs() > 0
    sig = layer.sigma.detach().clone().requires_grad_()
    yr = reference.mf_conv2d_ref(x, layer.weight.detach(), layer.bias.detach(), sig, 0.5, 1, "replicate", 2)
    yr.square().mean().backward()
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(layer.sigma.grad, sig.grad)


def test_layer_half_precision_keeps_sigma_exact():
    layer = msconv.MFConv2d(3, 4, 5)
    x = torch.randn(2, 3, 9, 9)
    y32 = layer(x)
    layer.half()
    assert layer._sigma == 5 / 6 and layer.weight.dtype == torch.float16
    y16 = layer(x.half())
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.float(), y32, atol=1e-2, rtol=1e-2)


def test_init_matches_conv2d_output_variance():
    torch.manual_seed(0)
    x = torch.randn(4, 64, 32, 32)
    conv_var = torch.stack([nn.Conv2d(64, 64, 3, padding=1, bias=False)(x).var() for _ in range(4)]).mean()
    mf_var = torch.stack([msconv.MFConv2d(64, 64, 3, bias=False)(x).var() for _ in range(4)]).mean()
    assert abs(mf_var / conv_var - 1) < 0.15, (mf_var, conv_var)


def test_repr_hides_defaults():
    assert repr(msconv.MFConv2d(3, 8)) == "MFConv2d(3, 8, kernel_size=(3, 3), sigma=0.5)"
    r = repr(msconv.MFConv2d(3, 8, 5, stride=2, bias=False, padding_mode="circular", order=3, learn_sigma=True, method="fft"))
    assert "stride=(2, 2)" in r and "bias=False" in r and "order=3" in r and "learn_sigma=True" in r and "'fft'" in r


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_state_dict_round_trip(learn_sigma, tmp_path):
    a = msconv.MFConv2d(3, 5, 3, learn_sigma=learn_sigma, sigma=0.7)
    sd = a.state_dict()
    assert set(sd) == {"weight", "bias", "sigma"} and sd["weight"].shape == (5, 3, 6)
    assert ("sigma" in dict(a.named_parameters())) == learn_sigma
    torch.save(sd, tmp_path / "mf.pt")
    b = msconv.MFConv2d(3, 5, 3, learn_sigma=learn_sigma, sigma=0.3)
    b.load_state_dict(torch.load(tmp_path / "mf.pt", weights_only=True))
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(b(x), a(x))
    assert "sigma=0.7" in repr(b)


def test_padding_and_stride_forms_accepted():
    x = torch.randn(1, 2, 9, 9)
    for kw in ({"padding": 1}, {"padding": (1, 1)}, {"padding": "same"}, {"stride": (2, 2)}, {"kernel_size": (3, 3)}):
        y = msconv.MFConv2d(2, 3, **{"kernel_size": 3, **kw})(x)
        c = nn.Conv2d(2, 3, **{"kernel_size": 3, "padding": 1, **{k: v for k, v in kw.items() if k != "padding"}})
        assert y.shape == c(x).shape


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"order": -1}, "order must be an int >= 0"),
        ({"sigma": 0.0}, "sigma must be a finite number > 0"),
        ({"sigma": -1.0}, "sigma must be a finite number > 0"),
        ({"dilation": 2}, "dilation=2 cannot be honoured"),
        ({"kernel_size": (3, 5)}, "kernel_size must be an int or a square pair"),
        ({"stride": (1, 2)}, "stride must be an int or a square pair"),
        ({"padding": 0}, "padding=0 is not supported.*padding='same'"),
        ({"padding": "valid"}, "padding='valid' is not supported"),
        ({"kernel_size": 4, "padding": 2}, "padding=2 is not supported"),
        ({"padding_mode": "mirror"}, "unknown padding_mode"),
        ({"method": "fft"}, "method='fft' needs padding_mode='circular'"),
        ({"groups": 2}, "divisible by groups=2"),
    ],
)
def test_bad_layer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        msconv.MFConv2d(3, 4, **{"kernel_size": 3, **kwargs})


def test_bad_inputs():
    layer = msconv.MFConv2d(3, 4)
    with pytest.raises(TypeError, match=r"x.dtype=torch.uint8.*x.float\(\)"):
        layer(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="must have 4 dimensions"):
        layer(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="must match x"):
        layer(torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        msconv.mf_conv2d(x, torch.zeros(4, 3, 6), sigma=-0.5)
    with pytest.raises(ValueError, match=r"\(p\+1\)\(p\+2\)/2"):
        msconv.mf_conv2d(x, torch.zeros(4, 3, 7))
    with pytest.raises(ValueError, match="msconv.convert"):
        msconv.mf_conv2d(x, torch.zeros(4, 3, 3, 3))
    with pytest.raises(ValueError, match="channels do not fit groups=1"):
        msconv.mf_conv2d(x, torch.zeros(4, 2, 6))
    with pytest.raises(ValueError, match="needs padding_mode='circular'"):
        msconv.mf_conv2d(x, torch.zeros(4, 3, 6), method="fft")
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        msconv.mf_conv2d(x, torch.zeros(4, 3, 6), stride=0)
    with pytest.raises(ValueError, match="mf_conv2d: order must be >= 0|mf_taps: order"):
        reference.mf_taps(-1, 0.5, 1.0)


# ---------------------------------------------------------------------------------------------
# convert


def _convnet():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        nn.Conv2d(8, 4, 5, padding="same", bias=False),
        nn.Conv2d(4, 4, 4, padding="same"),  # even: torch pads 1 before, 2 after
        nn.Conv2d(4, 4, 3),  # 'valid': changes the size, left alone
    )


def test_convert_runs_unchanged_and_reports():
    net = _convnet()
    x = torch.randn(2, 3, 17, 16)
    new, report = msconv.convert(net, order=4)
    assert new is not net and all(type(m) is nn.Conv2d for m in net if isinstance(m, nn.Conv2d))
    names = ["MFConv2d", "ReLU", "MFConv2d", "ReLU", "Conv2d", "MFConv2d", "MFConv2d", "Conv2d"]
    assert [type(m).__name__ for m in new] == names
    assert new(x).shape == net(x).shape
    by_name = {r["name"]: r for r in report}
    assert by_name["4"]["converted"] is False and "dilation" in by_name["4"]["reason"]
    assert by_name["7"]["converted"] is False and "output size" in by_name["7"]["reason"]
    assert all(0 <= r["rel_error"] < 1 for r in report if r["converted"])
    assert new[2].groups == 2 and new[2].padding_mode == "reflect" and new[5].bias is None
    torch.testing.assert_close(new[0].bias, net[0].bias)
    # A richer basis fits at least as well.
    _, report2 = msconv.convert(net, order=2)
    assert report[0]["rel_error"] <= report2[0]["rel_error"] + 1e-12


def test_convert_recovers_a_sampled_stencil_exactly():
    # A 7×7 conv whose weights *are* the s = 1 stencil of some θ (σ = 0.5, radius 3): the fit
    # is exact and the converted layer computes the same function.
    theta = torch.randn(4, 3, 6, dtype=torch.float64)
    conv = nn.Conv2d(3, 4, 7, padding=3).double()
    with torch.no_grad():
        conv.weight.copy_(reference.mf_stencil(theta, 0.5, 1.0))
    new, report = msconv.convert(conv, sigma=0.5)
    assert isinstance(new, msconv.MFConv2d) and report[0]["rel_error"] < 1e-10
    torch.testing.assert_close(new.weight, theta)
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(new(x), conv(x))


def test_convert_inplace_and_bad_args():
    net = _convnet()
    same, _ = msconv.convert(net, inplace=True)
    assert same is net and isinstance(net[0], msconv.MFConv2d)
    with pytest.raises(ValueError, match="order must be an int >= 0"):
        msconv.convert(_convnet(), order=-1)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        msconv.convert(_convnet(), sigma=0)


def test_stride_is_computed_directly():
    # Only the output cells are computed (not everything then subsampled): the stride-2 layer
    # does about a quarter of the stride-1 work (the vertical jets pass runs on every input
    # column, so a little more). Counted on the PyTorch path, whose convolutions the counter sees.
    from torch.utils.flop_counter import FlopCounterMode

    x, wt, b = _data(1, 4, 16, 1, 2, 32, 32, dtype=torch.float32)
    flops = {}
    for stride in (1, 2):
        with FlopCounterMode(display=False) as fc:
            msconv.mf_conv2d(x, wt, b, 0.5, 0.5, stride, method="separable", backend="reference")
        flops[stride] = fc.get_total_flops()
    assert 0.2 < flops[2] / flops[1] < 0.4, flops

"""msconv::mf_conv2d_fused (the stride-1 mesh-free convolution, jets and mix fused in one CPU
kernel) against msconv.reference.mf_conv2d_ref and its plain-PyTorch twin: forward and every
gradient across orders, groups, padding modes, scales, odd and tiny sizes, both GEMM paths,
dtypes, threads; gradcheck/gradgradcheck, opcheck, torch.compile and errors."""
import itertools

import pytest
import torch

import msconv
from conftest import TOL
from msconv import reference
from msconv.ops import mf_conv_fused as mcf
from test_mf_jets import one_thread  # noqa: F401  (autouse: one intra-op thread per test)

pytestmark = [
    pytest.mark.skipif(not mcf.available(torch.zeros(1), 0, 1), reason="msconv._C (fused kernel) not built"),
    pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar"),
]

MODES = ["zeros", "reflect", "replicate", "circular"]
SCALES = [2.0, 1.0, 0.5, 0.25]


def _args(n, c_in, c_out, groups, order, h, w, sigma, scale, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = (order + 1) * (order + 2) // 2
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64).to(dtype)
    wt = (torch.randn(c_out, c_in // groups, m, generator=g, dtype=torch.float64) / (c_in * m) ** 0.5).to(dtype)
    b = torch.randn(c_out, generator=g, dtype=torch.float64).to(dtype)
    taps, kmin = reference.mf_taps(order, sigma, scale)
    return x, wt, b, taps.flip(-1).to(dtype), kmin + taps.shape[1] - 1


def _check(x, wt, b, filt, pad, mode, groups, sigma=None, scale=None, filt_grad=False):
    """Output and grads of x, θ, bias (and filt) against the float64 reference."""
    dtype = x.dtype
    xa, wa, ba, fa = (t.detach().requires_grad_() for t in (x, wt, b, filt))
    fa.requires_grad_(filt_grad)
    y = mcf.mf_conv2d_fused(xa, wa, ba, fa, pad, mode, groups)
    xr, wr, br, fr = (t.detach().double().requires_grad_() for t in (x, wt, b, filt))
    if sigma is not None:  # the layer's own definition (σ, s) — else the twin with these taps
        yr = reference.mf_conv2d_ref(xr, wr, br, sigma, scale, 1, mode, groups)
    else:
        yr = mcf.mf_conv2d_fused_ref(xr, wr, br, fr, pad, mode, groups)
    assert y.shape == yr.shape and y.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), yr, atol=atol, rtol=rtol)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ins = (xa, wa, ba) + ((fa,) if filt_grad else ())
    refs = (xr, wr, br) + ((fr,) if filt_grad else ())
    got = torch.autograd.grad(y, ins, gy.to(dtype))
    want = torch.autograd.grad(yr, refs, gy)
    for name, a, r in zip(("grad x", "grad weight", "grad bias", "grad filt"), got, want):
        assert a.dtype == dtype
        scale_ = max(1.0, r.abs().max().item())  # sums over every pixel
        torch.testing.assert_close(a.double(), r, atol=atol * scale_, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(order, mode):
    groups = 2 if order % 2 else 1
    # Odd sizes, one smaller than the stencil; every scale meets every order and mode.
    for i, (h, w) in enumerate([(7, 9), (5, 3)]):
        scale = SCALES[(order + MODES.index(mode) + 2 * i) % 4]
        args = _args(2, 4, 6, groups, order, h, w, 0.6, scale, seed=order)
        _check(*args, mode, groups, sigma=0.6, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("c_in,c_out,groups", [(3, 5, 1), (16, 16, 1), (8, 80, 2), (20, 100, 1)])
def test_channels_dtypes_gemm_paths(dtype, c_in, c_out, groups):
    # C_out/groups <= 16 and > 64 take the register GEMMs and at::mm_out respectively; rows tile
    # unevenly (tall image) and W is not a multiple of the vector width.
    x, wt, b, filt, pad = _args(2, c_in, c_out, groups, 2, 37, 13, 0.5, 1.0, dtype, seed=c_out)
    _check(x, wt, b, filt, pad, "reflect", groups)


def test_learnable_taps_and_tiny_inputs():
    # Gradient w.r.t. filt (a learnable σ); 1×1 images (reflect of a single cell replicates).
    for (h, w), mode in itertools.product([(1, 1), (2, 5), (6, 1)], MODES):
        _check(*_args(1, 2, 3, 1, 2, h, w, 0.7, 0.5), mode, 1, filt_grad=True)


def test_empty():
    x, wt, b, filt, pad = _args(0, 3, 4, 1, 1, 6, 5, 0.5, 1.0)
    y = mcf.mf_conv2d_fused(x.requires_grad_(), wt.requires_grad_(), b, filt, pad, "zeros", 1)
    assert y.shape == (0, 4, 6, 5)
    gx, gw = torch.autograd.grad(y.sum(), (x, wt))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(wt))


def test_threads_deterministic():
    torch.set_num_threads(2)
    x, wt, b, filt, pad = _args(3, 6, 6, 1, 2, 33, 21, 0.5, 1.0, torch.float32)
    _check(x, wt, b, filt, pad, "circular", 1)
    runs = []
    for _ in range(2):
        xa, wa = x.clone().requires_grad_(), wt.clone().requires_grad_()
        y = mcf.mf_conv2d_fused(xa, wa, b, filt, pad, "circular", 1)
        runs.append((y,) + torch.autograd.grad(y.square().sum(), (xa, wa)))
    for a, r in zip(*runs):
        assert torch.equal(a, r)


def test_gradcheck_gradgradcheck():
    x, wt, b, filt, pad = _args(1, 2, 3, 1, 2, 6, 5, 0.4, 1.0)
    inputs = tuple(t.requires_grad_() for t in (x, wt, b, filt))
    fn = lambda x, w, b, f: mcf.mf_conv2d_fused(x, w, b, f, pad, "reflect", 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_opcheck():
    x, wt, b, filt, pad = _args(2, 4, 6, 2, 1, 9, 7, 0.5, 0.5)
    torch.library.opcheck(torch.ops.msconv.mf_conv2d_fused.default, (x, wt, b, filt, pad, "zeros", 2))
    torch.library.opcheck(torch.ops.msconv.mf_conv2d_fused.default, (x.float(), wt.float(), None, filt.float(), pad, "replicate", 2))


def test_compile_fullgraph():
    x, wt, b, filt, pad = _args(1, 3, 4, 1, 2, 11, 10, 0.5, 1.0, torch.float32)
    x.requires_grad_(), wt.requires_grad_()
    fn = lambda x, w: mcf.mf_conv2d_fused(x, w, b, filt, pad, "reflect", 1).square().sum()  # noqa: E731
    cfn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, e in zip(torch.autograd.grad(cfn(x, wt), (x, wt)), torch.autograd.grad(fn(x, wt), (x, wt))):
        torch.testing.assert_close(a, e)


def test_mf_conv2d_uses_it_at_stride_one():
    # The separable path on CPU at stride 1 is this op (and equals the reference).
    x, wt, b, _, _ = _args(1, 3, 4, 1, 2, 8, 8, 0.5, 1.0, torch.float32)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with prof:
        y = msconv.mf_conv2d(x, wt, b, 0.5, 1.0, 1, "zeros", 1, "separable", "cpp")
    assert any("mf_conv2d_fused" in e.name for e in prof.events())
    torch.testing.assert_close(y, reference.mf_conv2d_ref(x, wt, b, 0.5, 1.0), atol=1e-5, rtol=1e-5)


def test_errors():
    x, wt, b, filt, pad = _args(1, 4, 6, 1, 2, 8, 8, 0.5, 1.0, torch.float32)
    with pytest.raises(ValueError, match="unknown padding_mode"):
        mcf.mf_conv2d_fused(x, wt, b, filt, pad, "mirror", 1)
    with pytest.raises(ValueError, match=r"filt must be \[order \+ 1, K\]"):
        mcf.mf_conv2d_fused(x, wt, b, filt[:2], pad, "zeros", 1)
    with pytest.raises(ValueError, match=r"pad must be in \[0, K\)"):
        mcf.mf_conv2d_fused(x, wt, b, filt, filt.shape[1], "zeros", 1)
    with pytest.raises(ValueError, match="channels do not fit groups=4"):
        mcf.mf_conv2d_fused(x, wt, b, filt, pad, "zeros", 4)
    with pytest.raises(ValueError, match=r"bias must be \[C_out\]"):
        mcf.mf_conv2d_fused(x, wt, b[:2], filt, pad, "zeros", 1)
    # The compiled kernels check on their own too.
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.msconv.mf_conv_fwd(x.half(), wt.half(), None, filt, 2, pad, 0, 1)
    with pytest.raises(RuntimeError, match="mode must be"):
        torch.ops.msconv.mf_conv_fwd(x, wt, None, filt, 2, pad, 7, 1)
    with pytest.raises(RuntimeError, match="grad must be"):
        torch.ops.msconv.mf_conv_bwd(x, x, wt, filt, 2, pad, 0, 1, True, True)

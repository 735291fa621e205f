"""The Triton resample kernel under the Triton interpreter (CPU tensors), against a float64
gather reference and, where it is built, the compiled CPU op."""
import os

import pytest
import torch

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # Setting it here would switch every Triton kernel imported later in this pytest run, and the
    # op tests' choice of device, to the interpreter: the GPU tests would test the wrong thing.
    pytest.skip("a CUDA device is present: Triton runs compiled on it (the gpu tests); run this file "
                "with TRITON_INTERPRET=1 in the environment to test the interpreter", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

from msconv.triton import resample as tr  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if not isinstance(tr._resample2d_kernel, InterpretedFunction):
    pytest.skip(
        "msconv.triton.resample was imported before TRITON_INTERPRET=1 was set; run this file "
        "on its own (or set TRITON_INTERPRET=1 in the environment)",
        allow_module_level=True,
    )

try:
    import msconv._C  # noqa: F401  (registers torch.ops.msconv.*)

    HAS_COMPILED = hasattr(torch.ops.msconv, "resample2d_chain")
except ImportError:
    HAS_COMPILED = False

# (atol, rtol) against the float64 reference, which rounds each level to x.dtype as the kernels
# do, so only one level's rounding and accumulation error is left. bfloat16 runs here too: this
# kernel loads and stores it only through conversions to/from float32, which the interpreter
# handles (bf16 has been reported to come back as zeros from other kernels under it).
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


# ---------------------------------------------------------------------------- tables / reference


def random_taps(n_out, n_in, k, gen):
    """(n_out, k) int32 indices in [0, n_in) and float32 weights summing to 1 per row, with about
    a quarter of the taps padded (weight 0, index still valid)."""
    idx = torch.randint(0, n_in, (n_out, k), generator=gen, dtype=torch.int32)
    w = torch.rand(n_out, k, generator=gen) + 0.1
    w = torch.where(torch.rand(n_out, k, generator=gen) < 0.25, torch.zeros_like(w), w)
    w = w / w.sum(1, keepdim=True).clamp_min(1e-3)
    return idx, w.float()


def average_taps(n_in):
    """The 2x2 average restriction along one axis: I -> [2I, min(2I+1, n-1)], weights 1/2."""
    i = torch.arange((n_in + 1) // 2)
    idx = torch.stack([2 * i, torch.clamp(2 * i + 1, max=n_in - 1)], 1).to(torch.int32)
    return idx, torch.full(idx.shape, 0.5)


def random_chain(H, W, sizes, k, seed=0):
    """Tables for levels (H, W) -> sizes[0] -> sizes[1] -> ..., k taps (int or (ky, kx))."""
    gen = torch.Generator().manual_seed(seed)
    ky, kx = (k, k) if isinstance(k, int) else k
    iy, wy, ix, wx = [], [], [], []
    for Ho, Wo in sizes:
        a, b = random_taps(Ho, H, ky, gen)
        c, d = random_taps(Wo, W, kx, gen)
        iy.append(a), wy.append(b), ix.append(c), wx.append(d)
        H, W = Ho, Wo
    return iy, wy, ix, wx


def average_chain(H, W, levels):
    iy, wy, ix, wx = [], [], [], []
    for _ in range(levels):
        a, b = average_taps(H)
        c, d = average_taps(W)
        iy.append(a), wy.append(b), ix.append(c), wx.append(d)
        H, W = a.shape[0], c.shape[0]
    return iy, wy, ix, wx


def resample2d_chain_ref(x, iy, wy, ix, wx):
    """Gather reference in float64; each level is rounded to x.dtype before the next one."""
    outs, cur = [], x.double()
    for a, b, c, d in zip(iy, wy, ix, wx):
        rows = sum(b[:, t].double()[:, None] * cur.index_select(2, a[:, t].long()) for t in range(a.shape[1]))
        cols = sum(d[:, t].double() * rows.index_select(3, c[:, t].long()) for t in range(c.shape[1]))
        out = cols.to(x.dtype)
        outs.append(out)
        cur = out.double()
    return outs


def make_input(shape, dtype, layout, seed=0):
    """x of `shape` laid out as `contiguous`, `channels_last`, `sliced` (strided view of a larger
    NCHW buffer), `sliced_cl` (channel slice of a channels_last buffer) or `expanded` (stride 0)."""
    gen = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    if layout == "contiguous":
        return torch.randn(shape, generator=gen).to(dtype)
    if layout == "channels_last":
        return torch.randn(shape, generator=gen).to(dtype).to(memory_format=torch.channels_last)
    if layout == "sliced":
        big = torch.randn(N, C + 2, 2 * H + 1, 2 * W + 3, generator=gen).to(dtype)
        return big[:, 1 : C + 1, 1::2, 3::2][:, :, :H, :W]
    if layout == "sliced_cl":
        big = torch.randn(N, C + 3, H, W, generator=gen).to(dtype).to(memory_format=torch.channels_last)
        return big[:, 2 : C + 2]
    if layout == "expanded":
        return torch.randn(N, C, 1, W, generator=gen).to(dtype).expand(N, C, H, W)
    raise ValueError(layout)


def expected_format(x):
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def check(x, tables, *, compiled=True):
    outs = tr.resample2d_chain_triton(x, *tables)
    refs = resample2d_chain_ref(x, *tables)
    atol, rtol = TOL[x.dtype]
    assert len(outs) == len(refs)
    fmt = expected_format(x)
    for level, (o, r) in enumerate(zip(outs, refs)):
        assert o.shape == r.shape and o.dtype == x.dtype, (level, o.shape, r.shape)
        assert o.is_contiguous(memory_format=fmt), (level, o.stride(), fmt)
        torch.testing.assert_close(o, r, atol=atol, rtol=rtol, msg=lambda m: f"level {level}: {m}")
    if compiled and HAS_COMPILED:
        # Same summation order for NCHW, different for channels_last: equal up to rounding.
        cpp = torch.ops.msconv.resample2d_chain(x, *tables)
        for level, (o, c) in enumerate(zip(outs, cpp)):
            assert c.stride() == o.stride(), (level, c.stride(), o.stride())
            torch.testing.assert_close(o, c, atol=atol, rtol=rtol, msg=lambda m: f"cpp level {level}: {m}")
    return outs


# ---------------------------------------------------------------------------------------- tests

LAYOUTS = ["contiguous", "channels_last", "sliced", "sliced_cl", "expanded"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_chain(dtype, layout):
    x = make_input((2, 3, 17, 9), dtype, layout)
    # down, down, up (a prolongation-like level), mixed tap counts
    tables = random_chain(17, 9, [(9, 5), (5, 3), (10, 6)], k=(3, 4))
    check(x, tables)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (17, 9), (2, 16)])
@pytest.mark.parametrize("n", [1, 2])
def test_average_pyramid(n, hw, layout):
    H, W = hw
    levels = max(1, (max(H, W) - 1).bit_length())  # down to 1 x 1
    tables = average_chain(H, W, levels)
    x = make_input((n, 4, H, W), torch.float32, layout, seed=H * W)
    outs = check(x, tables)
    assert outs[-1].shape == (n, 4, 1, 1)
    # the average restriction preserves constants, odd sizes included
    for o in tr.resample2d_chain_triton(torch.full_like(x, 2.5), *tables):
        torch.testing.assert_close(o, torch.full_like(o, 2.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_tiny_and_wide_taps(dtype):
    # 1x1 input, 8 taps (the maximum), one tap, and a level with a single output row
    x = make_input((1, 2, 1, 1), dtype, "contiguous")
    check(x, random_chain(1, 1, [(3, 2), (1, 5), (4, 4)], k=(8, 1), seed=3))
    x = make_input((1, 5, 3, 5), dtype, "channels_last")
    check(x, random_chain(3, 5, [(2, 3), (1, 1)], k=(1, 8), seed=4))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(0, 3, 8, 6), (2, 0, 8, 6)])
def test_empty_batch_or_channels(shape, layout):
    x = make_input(shape, torch.float32, layout)
    tables = average_chain(8, 6, 2)
    outs = tr.resample2d_chain_triton(x, *tables)
    assert [tuple(o.shape) for o in outs] == [(*shape[:2], 4, 3), (*shape[:2], 2, 2)]
    if HAS_COMPILED:
        cpp = torch.ops.msconv.resample2d_chain(x, *tables)
        assert [(o.shape, o.stride()) for o in cpp] == [(o.shape, o.stride()) for o in outs]


def test_no_levels_and_zero_taps():
    x = make_input((1, 2, 4, 4), torch.float32, "contiguous")
    assert tr.resample2d_chain_triton(x, [], [], [], []) == []
    # zero taps per row: every output is an empty sum
    iy, wy = torch.zeros(2, 0, dtype=torch.int32), torch.zeros(2, 0)
    ix, wx = average_taps(4)
    (y,) = tr.resample2d_chain_triton(x, [iy], [wy], [ix], [wx])
    assert torch.equal(y, torch.zeros(1, 2, 2, 2))


def test_padded_taps_are_not_read():
    # A weight-0 tap pointing at an inf contributes nothing (0 * inf would be nan).
    x = torch.ones(1, 1, 2, 2)
    x[0, 0, 1, 1] = float("inf")
    iy = torch.tensor([[0, 1]], dtype=torch.int32)
    wy = torch.tensor([[1.0, 0.0]])
    (y,) = tr.resample2d_chain_triton(x, [iy], [wy], [iy], [wy])
    assert torch.equal(y, torch.ones(1, 1, 1, 1))


def test_out_of_range_taps_contribute_nothing():
    # Not range-checked on device (that would synchronise); such taps are skipped, never read.
    x = torch.ones(1, 1, 3, 3)
    iy = torch.tensor([[0, 3], [-1, 2]], dtype=torch.int32)
    w = torch.full((2, 2), 0.5)
    (y,) = tr.resample2d_chain_triton(x, [iy], [w], [iy], [w])
    torch.testing.assert_close(y, torch.full((1, 1, 2, 2), 0.25))


def test_bad_input_errors():
    x = torch.randn(1, 2, 4, 4)
    t = average_chain(4, 4, 1)
    with pytest.raises(ValueError, match="N x C x H x W"):
        tr.resample2d_chain_triton(x[0], *t)
    with pytest.raises(TypeError, match="floating"):
        tr.resample2d_chain_triton(x.int(), *t)
    with pytest.raises(ValueError, match="one table per level"):
        tr.resample2d_chain_triton(x, t[0], t[1], t[2], [])
    with pytest.raises(TypeError, match="int32 / float32"):
        tr.resample2d_chain_triton(x, [t[0][0].long()], t[1], t[2], t[3])
    with pytest.raises(ValueError, match="equal shape"):
        tr.resample2d_chain_triton(x, t[0], [t[1][0][:1]], t[2], t[3])
    wide = torch.zeros(2, tr.MAX_TAPS + 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="at most"):
        tr.resample2d_chain_triton(x, [wide], [wide.float()], t[2], t[3])

"""Mesh-free convolution benchmark: MFConv2d paths against the dense-stencil and the 3×3 conv.

For each grid scale s (the stencil radius grows as ceil(4σ/s + ½), σ = ½: K = 7, 11, 19, 35
for s = 1, ½, ¼, ⅛) and channel count, forward and forward+backward (grads of x and every
weight) of:

* ``mf-separable-<backend>``: mf_conv2d's separable path with each available jets backend
  (``reference`` = the plain-PyTorch jets; ``cpp`` at stride 1 = the fused kernel
  msconv::mf_conv2d_fused);
* ``mf-jets-cpp``: the unfused path it replaced — the jets op (M planes per channel in
  memory) then a grouped 1×1 conv — for a side-by-side before/after;
* ``mf-auto``: what MFConv2d runs by default (the cost model's pick, in the ``auto_pick`` column);
* ``mf-fft``: the FFT path (circular padding; the others use zeros — same cost class);
* ``dense-stencil``: F.conv2d with the equivalent sampled K×K stencil (stencil precomputed,
  the stencil itself learnable in fwd+bwd, as a plain conv layer would be);
* ``conv3x3``: a plain 3×3 F.conv2d with the same channels.

Columns ``speedup_vs_dense`` (dense p50 / row p50) and ``x_vs_conv3x3`` (row p50 / 3×3 p50) are
measured side by side in one run: the implementations of a configuration are timed in
``--rounds`` interleaved rounds (torch.utils.benchmark blocked_autorange each) and the
percentiles taken over all rounds, so load that comes and goes on a shared machine hits them
alike. Targets: at s = ¼ ≥ 4× faster than dense (fwd+bwd); at
s = 1 within 1.3× of the 3×3 conv. CSV into bench/results/mfconv_<device>[_quick].csv.

    python bench/bench_mfconv.py [--quick] [--device cpu|cuda] [--dtype float32] [--threads T] [--rounds R] [--out FILE]
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import env_columns, kernel_backends, kernel_parser, report, time_fn  # noqa: E402

import msconv  # noqa: E402
from msconv import reference  # noqa: E402
from msconv.ops import mfconv as mfops  # noqa: E402

SIGMA, ORDER = 0.5, 2
FULL = {"scales": [1.0, 0.5, 0.25, 0.125], "channels": [16, 32, 64, 128], "n": 4, "hw": 64}
QUICK = {"scales": [1.0, 0.5, 0.25, 0.125], "channels": [16, 64], "n": 2, "hw": 64}
SMOKE = {"scales": [1.0], "channels": [2], "n": 1, "hw": 16}


def _impls(scale, c, device, dtype, backends):
    g = torch.Generator(device="cpu").manual_seed(0)
    m = (ORDER + 1) * (ORDER + 2) // 2
    theta = (torch.randn(c, c, m, generator=g) / (c * m) ** 0.5).to(device, dtype)
    bias = torch.zeros(c, device=device, dtype=dtype)
    taps, kmin = reference.mf_taps(ORDER, SIGMA, scale)
    k = taps.shape[1]
    stencil = reference.mf_stencil(theta, SIGMA, scale)
    w3 = (torch.randn(c, c, 3, 3, generator=g) / (9 * c) ** 0.5).to(device, dtype)
    pad = -kmin  # symmetric for stride 1

    def mf(method, backend, mode="zeros"):
        return lambda x, p: msconv.mf_conv2d(x, p[0], p[1], SIGMA, scale, 1, mode, 1, method, backend)

    impls = [(f"mf-separable-{b}", mf("separable", b), [theta, bias]) for b in backends]
    if "cpp" in backends and device.type == "cpu":

        def unfused(x, p):
            filt, kmin = mfops._taps(ORDER, SIGMA, scale, 1, x.dtype, x.device)
            jets = mfops._separable(x, filt, kmin, ORDER, 1, "zeros", "cpp")
            return F.conv2d(jets, p[0].reshape(c, -1, 1, 1), p[1])

        impls.append(("mf-jets-cpp", unfused, [theta, bias]))
    impls.append(("mf-auto", mf("auto", None), [theta, bias]))
    impls.append(("mf-fft", mf("fft", None, "circular"), [theta, bias]))
    impls.append(("dense-stencil", lambda x, p: F.conv2d(x, p[0], p[1], padding=pad), [stencil, bias]))
    impls.append(("conv3x3", lambda x, p: F.conv2d(x, p[0], p[1], padding=1), [w3, bias]))
    return impls, k


def _time_interleaved(fns, device, min_run_time, rounds):
    """(p50, p20, p80) ms per function, timed in ``rounds`` interleaved rounds."""
    if device.type == "cuda":
        return [time_fn(fn, device, min_run_time) for fn in fns]
    from torch.utils.benchmark import Timer

    times = [[] for _ in fns]
    warm = []
    for fn in fns:
        t0 = time.perf_counter()
        fn()  # warm-up (allocator, caches)
        warm.append(time.perf_counter() - t0)
    for r in range(rounds):
        for i, fn in enumerate(fns):
            if r and warm[i] > min_run_time:  # seconds per call (reference, dense at fine s): one round
                continue
            if r:
                fn()  # untimed: the previous implementation left other buffers in the caches/allocator
            m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time / rounds)
            times[i] += m.times
    out = []
    for t in times:
        t = torch.tensor(t) * 1e3
        out.append((t.median().item(), t.quantile(0.2).item(), t.quantile(0.8).item()))
    return out


def run(quick=False, device="cpu", dtype="float32", min_run_time=None, rounds=None, smoke=False):
    device = torch.device(device)
    dt = getattr(torch, dtype)
    cfg = SMOKE if smoke else QUICK if quick else FULL
    mrt = min_run_time if min_run_time is not None else (0.005 if smoke else 0.1 if quick else 0.4)
    rounds = rounds if rounds is not None else (1 if smoke else 3 if quick else 5)
    backends = ["reference"] + (kernel_backends(device) if mfops._jets_op() is not None else [])
    env = env_columns(device)
    rows = []
    for scale in cfg["scales"]:
        for c in cfg["channels"]:
            n, hw = cfg["n"], cfg["hw"]
            x = torch.randn(n, c, hw, hw, device=device, dtype=dt)
            impls, k = _impls(scale, c, device, dt, backends)
            costs = mfops._method_costs(n, c, c, 1, ORDER, k, hw, hw, 1, "zeros", backends[-1])
            pick = min(costs, key=costs.get)
            block = []
            for mode in ("fwd", "fwd+bwd"):
                fns = []
                for _, fn, params in impls:
                    if mode == "fwd":
                        fns.append(lambda fn=fn, params=params: _no_grad(fn, x, params))
                    else:
                        xg = x.detach().requires_grad_()
                        pg = [p.detach().requires_grad_() for p in params]
                        fns.append(lambda fn=fn, xg=xg, pg=pg: fn(xg, pg).sum().backward())
                for (name, _, _), (p50, p20, p80) in zip(impls, _time_interleaved(fns, device, mrt, rounds)):
                    block.append({"op": "mf_conv2d", "scale": scale, "K": k, "channels": c,
                                  "shape": f"{n}x{c}x{hw}x{hw}", "dtype": dtype, "pass": mode, "impl": name,
                                  "auto_pick": pick, "p50_ms": round(p50, 3), "p20_ms": round(p20, 3),
                                  "p80_ms": round(p80, 3)})
            for mode in ("fwd", "fwd+bwd"):
                ref = {r["impl"]: r["p50_ms"] for r in block if r["pass"] == mode}
                for r in block:
                    if r["pass"] == mode:
                        r["speedup_vs_dense"] = round(ref["dense-stencil"] / r["p50_ms"], 2)
                        r["x_vs_conv3x3"] = round(r["p50_ms"] / ref["conv3x3"], 2)
            rows += [{**r, **env} for r in block]
    return rows


def _no_grad(fn, x, params):
    with torch.no_grad():
        return fn(x, params)


def main(argv=None) -> int:
    p = kernel_parser(__doc__, "mfconv", "fewer channel counts, shorter timing (the demo)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: the shared machine's other core stays free)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5, quick 3)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.quick, args.device, args.dtype, rounds=args.rounds, smoke=args.smoke)
    report(rows, args, "mfconv", ["scale", "K", "channels", "pass", "impl", "p50_ms", "p20_ms", "p80_ms",
                                  "speedup_vs_dense", "x_vs_conv3x3", "auto_pick"], f", sigma {SIGMA}, order {ORDER}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Mesh-free convolution benchmark: MFConv2d paths against the dense-stencil and the 3×3 conv.

For each grid scale s (the stencil radius grows as ceil(4σ/s + ½), σ = ½: K = 7, 11, 19, 35
for s = 1, ½, ¼, ⅛) and channel count, forward and forward+backward (grads of x and every
weight) of:

* ``mf-separable-<backend>``: mf_conv2d's separable path with each available jets backend
  (``reference`` = the plain-PyTorch jets);
* ``mf-auto``: what MFConv2d runs by default (the cost model's pick, in the ``auto_pick`` column);
* ``mf-fft``: the FFT path (circular padding; the others use zeros — same cost class);
* ``dense-stencil``: F.conv2d with the equivalent sampled K×K stencil (stencil precomputed,
  the stencil itself learnable in fwd+bwd, as a plain conv layer would be);
* ``conv3x3``: a plain 3×3 F.conv2d with the same channels.

Columns ``speedup_vs_dense`` (dense p50 / row p50) and ``x_vs_conv3x3`` (row p50 / 3×3 p50) are
measured side by side in one run. SPEC §6 bars: at s = ¼ ≥ 4× faster than dense (fwd+bwd); at
s = 1 within 1.3× of the 3×3 conv. CSV into bench/results/mfconv_<device>[_quick].csv.

    python bench/bench_mfconv.py [--quick] [--device cpu|cuda] [--dtype float32] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, env_columns, table, time_fn, write_csv  # noqa: E402

import msconv  # noqa: E402
from msconv import reference  # noqa: E402
from msconv.ops import _backend  # noqa: E402
from msconv.ops import mfconv as mfops  # noqa: E402

SIGMA, ORDER = 0.5, 2
FULL = {"scales": [1.0, 0.5, 0.25, 0.125], "channels": [16, 32, 64, 128], "n": 4, "hw": 64}
QUICK = {"scales": [1.0, 0.5, 0.25, 0.125], "channels": [16, 64], "n": 2, "hw": 64}


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
    impls.append(("mf-auto", mf("auto", None), [theta, bias]))
    impls.append(("mf-fft", mf("fft", None, "circular"), [theta, bias]))
    impls.append(("dense-stencil", lambda x, p: F.conv2d(x, p[0], p[1], padding=pad), [stencil, bias]))
    impls.append(("conv3x3", lambda x, p: F.conv2d(x, p[0], p[1], padding=1), [w3, bias]))
    return impls, k


def run(quick=False, device="cpu", dtype="float32", min_run_time=None):
    device = torch.device(device)
    dt = getattr(torch, dtype)
    cfg = QUICK if quick else FULL
    mrt = min_run_time if min_run_time is not None else (0.1 if quick else 0.4)
    backends = ["reference"]
    if mfops._jets_op() is not None:
        backends += [b for b in ("cpp", "cuda", "triton") if _backend._available(b, device) is None]
    if device.type == "cpu":
        backends = [b for b in backends if b != "triton"]  # the interpreter is not a performance path
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
            for name, fn, params in impls:
                for mode in ("fwd", "fwd+bwd"):
                    if mode == "fwd":
                        run_ = lambda fn=fn, params=params: fn(x, params)  # noqa: E731
                        ctx = torch.no_grad()
                    else:
                        xg = x.detach().requires_grad_()
                        pg = [p.detach().requires_grad_() for p in params]
                        run_ = lambda fn=fn, xg=xg, pg=pg: fn(xg, pg).sum().backward()  # noqa: E731
                        ctx = torch.enable_grad()
                    with ctx:
                        p50, p20, p80 = time_fn(run_, device, mrt)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer channel counts, shorter timing (the demo)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--out", default=None, help="CSV path (default bench/results/mfconv_<device>[_quick].csv)")
    args = p.parse_args(argv)
    rows = run(args.quick, args.device, args.dtype)
    tag = "cuda_" + torch.cuda.get_device_name().replace(" ", "_") if args.device == "cuda" else "cpu"
    out = args.out or os.path.join(RESULTS, f"mfconv_{tag}{'_quick' if args.quick else ''}.csv")
    write_csv(rows, out)
    print(f"device: {rows[0]['device']}, torch {rows[0]['torch']}, dtype {args.dtype}, sigma {SIGMA}, order {ORDER}")
    print(table(rows, ["scale", "K", "channels", "pass", "impl", "p50_ms", "p20_ms", "p80_ms",
                       "speedup_vs_dense", "x_vs_conv3x3", "auto_pick"]))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Mesh-free jets microbenchmark: the fused msconv kernels against the plain-PyTorch reference
(msconv.reference.mf_jets_ref: 1 + M F.conv2d calls) and against one F.conv2d with the
equivalent dense stencil (C·M output channels, K x K taps each, groups=C).

Cases: K for s = 1, ½, ¼, ⅛ at σ = 0.5 (K = mf_taps(order, 0.5, s)[0].shape[1]), orders 2 and 4,
strides 1 and 2; forward and forward+backward (gradient w.r.t. xp). CSV into
bench/results/mf_jets_<device>[_quick].csv.

    python bench/bench_mf_jets.py [--quick] [--device cpu|cuda] [--dtype float32] [--out FILE]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import env_columns, kernel_backends, kernel_parser, report, time_fn  # noqa: E402

from msconv.ops.mf_jets import mf_jets  # noqa: E402
from msconv.reference import mf_multi_indices, mf_taps  # noqa: E402

SIGMA = 0.5
# (N, C, H, scale, order, stride): H is the unpadded size; xp is H + K - 1 square.
FULL = [(4, 16, 128, s, p, st) for s in (1.0, 0.5, 0.25, 0.125) for p in (2, 4) for st in (1, 2)]
QUICK = [(2, 16, 96, s, 2, st) for s in (1.0, 0.5, 0.25, 0.125) for st in (1, 2)] + [(2, 16, 96, 0.25, 4, 1)]


def dense_stencil(filt: torch.Tensor, order: int, c: int) -> torch.Tensor:
    """(C·M, 1, K, K) weight of the grouped conv equal to the jets: w[m] = filt[b] ⊗ filt[a]."""
    w = torch.stack([filt[b][:, None] * filt[a][None, :] for a, b in mf_multi_indices(order)])
    return w[:, None].repeat(c, 1, 1, 1)


def bench_case(n, c, h, scale, order, stride, dtype, device, backends, mrt):
    taps, _ = mf_taps(order, SIGMA, scale, stride)
    filt = taps.flip(-1).to(dtype=dtype, device=device)
    k = filt.shape[1]
    xp = torch.randn(n, c, h + k - 1, h + k - 1, dtype=dtype, device=device)
    wd = dense_stencil(filt, order, c)
    impls = [(f"msconv-{b}", lambda x, b=b: mf_jets(x, filt, order, stride, backend=b)) for b in backends]
    impls.append(("reference", lambda x: mf_jets(x, filt, order, stride, backend="reference")))
    impls.append(("dense_conv2d", lambda x: F.conv2d(x, wd, stride=stride, groups=c)))
    rows = []
    for name, fn in impls:
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":
                run = lambda: fn(xp)  # noqa: E731
            else:
                xg = xp.detach().requires_grad_()
                run = lambda: fn(xg).sum().backward()  # noqa: E731
            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                p50, p20, p80 = time_fn(run, device, mrt)
            rows.append({"op": "mf_jets", "shape": f"{n}x{c}x{h}x{h}", "scale": scale, "K": k, "order": order,
                         "stride": stride, "dtype": str(dtype).replace("torch.", ""), "pass": mode, "impl": name,
                         "p50_ms": round(p50, 3), "p20_ms": round(p20, 3), "p80_ms": round(p80, 3)})
    for mode in ("fwd", "fwd+bwd"):
        mine = [r for r in rows if r["pass"] == mode]
        ref = next(r["p50_ms"] for r in mine if r["impl"] == "reference")
        dense = next(r["p50_ms"] for r in mine if r["impl"] == "dense_conv2d")
        for r in mine:
            r["speedup_vs_ref"] = round(ref / r["p50_ms"], 2)
            r["speedup_vs_dense"] = round(dense / r["p50_ms"], 2)
    return rows


SMOKE = [(1, 2, 16, 1.0, 2, 1)]


def run(quick=False, device="cpu", dtype="float32", min_run_time=None, smoke=False):
    device = torch.device(device)
    dt = getattr(torch, dtype)
    backends = kernel_backends(device)
    mrt = min_run_time if min_run_time is not None else (0.005 if smoke else 0.1 if quick else 0.3)
    env = env_columns(device)
    rows = []
    for case in SMOKE if smoke else QUICK if quick else FULL:
        rows += [{**r, **env} for r in bench_case(*case, dt, device, backends, mrt)]
    return rows


def main(argv=None) -> int:
    args = kernel_parser(__doc__, "mf_jets", "fewer, smaller cases, shorter timing").parse_args(argv)
    rows = run(args.quick, args.device, args.dtype, smoke=args.smoke)
    report(rows, args, "mf_jets", ["shape", "scale", "K", "order", "stride", "pass", "impl", "p50_ms", "speedup_vs_ref",
                                   "speedup_vs_dense"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

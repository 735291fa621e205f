"""Volumetric transfer operators (msconv.ops.restrict3d / prolong3d / pyramid3d) against torch's own
3-D ops, forward and forward+backward, side by side in one run: chained ``F.avg_pool3d`` for the
average restriction and its pyramid, ``F.interpolate(mode="trilinear")`` for the prolongation.
``vs_torch`` is torch's p50 over msconv's (> 1: msconv is faster).

    python bench/bench_transfer3d.py [--quick | --smoke] [--device cuda]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import env_columns, kernel_parser, report, time_fn  # noqa: E402

from msconv.ops import prolong3d, pyramid3d, restrict3d  # noqa: E402

FULL_SHAPES = [(1, 8, 64, 64, 64), (2, 16, 96, 96, 96)]
QUICK_SHAPES = [(1, 8, 48, 48, 48)]
SMOKE_SHAPES = [(1, 2, 8, 8, 8)]

CASES = {
    "restrict_average": (lambda x: restrict3d(x), lambda x: F.avg_pool3d(x, 2)),
    "pyramid_average_3": (lambda x: pyramid3d(x, 3), lambda x: [x, *_chain(x, 3)]),
    "prolong_linear": (lambda x: prolong3d(x),
                       lambda x: F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)),
}


def _chain(x, levels):
    out = []
    for _ in range(levels):
        x = F.avg_pool3d(x, 2)
        out.append(x)
    return out


def _loss(y):
    return sum(t.sum() for t in y) if isinstance(y, list) else y.sum()


def run(shapes, device, dtype, min_run_time):
    env = env_columns(device)
    rows = []
    for case, (ours, theirs) in CASES.items():
        for shape in shapes:
            x = torch.randn(shape, dtype=dtype, device=device)
            if case.startswith("prolong"):
                x = x[..., ::2, ::2, ::2].contiguous()
            for mode in ("fwd", "fwd+bwd"):
                times = {}
                for impl, fn in (("torch", theirs), ("msconv", ours)):
                    if mode == "fwd":
                        with torch.no_grad():
                            times[impl] = time_fn(lambda: fn(x), device, min_run_time)
                    else:
                        xg = x.detach().requires_grad_()
                        times[impl] = time_fn(lambda: _loss(fn(xg)).backward(), device, min_run_time)
                for impl, (p50, p20, p80) in times.items():
                    rows.append({"op": case, "shape": "x".join(map(str, shape)), "pass": mode, "impl": impl,
                                 "dtype": str(dtype).replace("torch.", ""), "p50_ms": round(p50, 3),
                                 "p20_ms": round(p20, 3), "p80_ms": round(p80, 3),
                                 "vs_torch": round(times["torch"][0] / p50, 2), **env})
    return rows


def main(argv=None) -> int:
    args = kernel_parser(__doc__, "transfer3d", "one shape, shorter timing").parse_args(argv)
    shapes = SMOKE_SHAPES if args.smoke else QUICK_SHAPES if args.quick else FULL_SHAPES
    mrt = 0.005 if args.smoke else 0.2 if args.quick else 0.5
    rows = run(shapes, torch.device(args.device), getattr(torch, args.dtype), mrt)
    report(rows, args, "transfer3d", ["op", "shape", "pass", "impl", "p50_ms", "p20_ms", "p80_ms", "vs_torch"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

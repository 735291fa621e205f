"""Volumetric transfer operators (msconv.ops.restrict3d / prolong3d / pyramid3d) on each compiled
backend against torch's own 3-D ops, forward and forward+backward, side by side in one run: chained
``F.avg_pool3d`` for the average restriction (isotropic and in-plane) and its 3-level pyramid,
``F.interpolate(mode="trilinear")`` for the prolongation.

Every (op, shape, pass) is timed ``--repeats`` times, torch and each backend in turn within a
repeat, so that a noisy (shared) machine slows both sides of a ratio alike; the CSV gives the
median over repeats of each p50 and of each ratio. ``vs_torch`` is torch's time over msconv's
(> 1: msconv is faster).

    python bench/bench_transfer3d.py [--quick | --smoke] [--device cuda] [--threads 1] [--repeats 5]
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import env_columns, kernel_backends, kernel_parser, report, time_fn  # noqa: E402

from msconv.ops import prolong3d, pyramid3d, restrict3d  # noqa: E402

FULL_SHAPES = [(1, 8, 64, 64, 64), (2, 16, 96, 96, 96)]
QUICK_SHAPES = [(1, 8, 48, 48, 48)]
SMOKE_SHAPES = [(1, 2, 8, 8, 8)]


def _chain(x, levels, factors=2):
    out = [x]
    for _ in range(levels):
        out.append(F.avg_pool3d(out[-1], factors))
    return out


# op: (msconv on backend b, torch, whether the input is the coarse grid)
CASES = {
    "restrict_average": (lambda x, b: restrict3d(x, backend=b), lambda x: F.avg_pool3d(x, 2), False),
    "restrict_average_inplane": (lambda x, b: restrict3d(x, factors=(1, 2, 2), backend=b),
                                 lambda x: F.avg_pool3d(x, (1, 2, 2)), False),
    "pyramid_average_3": (lambda x, b: pyramid3d(x, 3, backend=b), lambda x: _chain(x, 3), False),
    "prolong_linear": (lambda x, b: prolong3d(x, backend=b),
                       lambda x: F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False), True),
}


def _loss(y):
    return sum(t.sum() for t in y) if isinstance(y, list) else y.sum()


def _time(fn, x, mode, device, min_run_time):
    if mode == "fwd":
        with torch.no_grad():
            return time_fn(lambda: fn(x), device, min_run_time)
    xg = x.detach().requires_grad_()
    return time_fn(lambda: _loss(fn(xg)).backward(), device, min_run_time)


def run(shapes, device, dtype, min_run_time, repeats, backends):
    env = env_columns(device)
    rows = []
    for case, (ours, theirs, coarse) in CASES.items():
        for shape in shapes:
            x = torch.randn(shape, dtype=dtype, device=device)
            if coarse:
                x = x[..., ::2, ::2, ::2].contiguous()
            for mode in ("fwd", "fwd+bwd"):
                impls = {"torch": theirs, **{b: (lambda t, b=b: ours(t, b)) for b in backends}}
                runs = {impl: [] for impl in impls}  # per repeat: (p50, p20, p80)
                for _ in range(repeats):
                    for impl, fn in impls.items():
                        runs[impl].append(_time(fn, x, mode, device, min_run_time))
                for impl, times in runs.items():
                    med = [statistics.median(t[i] for t in times) for i in range(3)]
                    ratio = statistics.median(a[0] / b[0] for a, b in zip(runs["torch"], times))
                    rows.append({"op": case, "shape": "x".join(map(str, shape)), "pass": mode, "impl": impl,
                                 "dtype": str(dtype).replace("torch.", ""), "p50_ms": round(med[0], 3),
                                 "p20_ms": round(med[1], 3), "p80_ms": round(med[2], 3),
                                 "vs_torch": round(ratio, 2), "repeats": repeats, **env})
    return rows


def main(argv=None) -> int:
    p = kernel_parser(__doc__, "transfer3d", "one shape, shorter timing")
    p.add_argument("--repeats", type=int, default=None, help="timings per case, interleaved (default 5; --quick 3, --smoke 1)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    shapes = SMOKE_SHAPES if args.smoke else QUICK_SHAPES if args.quick else FULL_SHAPES
    mrt = 0.005 if args.smoke else 0.2 if args.quick else 0.5
    repeats = args.repeats or (1 if args.smoke else 3 if args.quick else 5)
    device = torch.device(args.device)
    rows = run(shapes, device, getattr(torch, args.dtype), mrt, repeats, kernel_backends(device))
    report(rows, args, "transfer3d", ["op", "shape", "pass", "impl", "p50_ms", "p20_ms", "p80_ms", "vs_torch"],
           note=f", {repeats} repeat(s), medians")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

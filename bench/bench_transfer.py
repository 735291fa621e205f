"""Transfer-operator microbenchmark: msconv kernels against the equivalent chained torch calls.

Rows: restriction (average, full weighting), bilinear prolongation and the 4-level pyramid,
forward and forward+backward, for each available msconv backend, the plain-PyTorch reference
(msconv.reference) and the torch ops a user would otherwise chain (F.avg_pool2d,
F.interpolate). CSV into bench/results/transfer_<device>.csv.

    python bench/bench_transfer.py [--quick] [--device cpu|cuda] [--dtype float32] [--out FILE]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import env_columns, kernel_backends, kernel_parser, report, time_fn  # noqa: E402

import msconv  # noqa: E402
from msconv import reference  # noqa: E402

FULL_SHAPES = [(1, 3, 512, 512), (8, 3, 1024, 1024), (8, 3, 2048, 2048), (8, 64, 256, 256)]
QUICK_SHAPES = [(1, 3, 512, 512), (8, 3, 1024, 1024), (8, 64, 256, 256)]
PYRAMID_LEVELS = 4


def torch_chained(case: str):
    """What a user writes with torch's own ops."""
    if case == "restrict_average":
        return lambda x: F.avg_pool2d(x, 2)
    if case == "prolong_bilinear":
        return lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    if case == "pyramid_average":
        def chain(x):
            out = [x]
            for _ in range(PYRAMID_LEVELS):
                out.append(F.avg_pool2d(out[-1], 2))
            return out
        return chain
    return None  # full weighting has no torch one-liner; the reference (depthwise conv2d) stands in


def msconv_fn(case: str, backend: str):
    if case == "restrict_average":
        return lambda x: msconv.restrict(x, "average", backend=backend)
    if case == "restrict_full_weighting":
        return lambda x: msconv.restrict(x, "full_weighting", backend=backend)
    if case == "prolong_bilinear":
        return lambda x: msconv.prolong(x, "bilinear", backend=backend)
    if case == "pyramid_average":
        return lambda x: msconv.pyramid(x, PYRAMID_LEVELS, "average", backend=backend)
    raise ValueError(case)


def _loss(out):
    outs = out if isinstance(out, (list, tuple)) else [out]
    return sum(o.sum() for o in outs if o.requires_grad)


def bench_case(case, shape, dtype, device, impls, min_run_time):
    x = torch.randn(shape, dtype=dtype, device=device)
    if case.startswith("prolong"):
        x = x[..., : shape[2] // 2, : shape[3] // 2].contiguous()  # prolong to the listed size
    rows = []
    for name, fn in impls:
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":
                run = lambda: fn(x)  # noqa: E731
            else:
                xg = x.detach().requires_grad_()
                run = lambda: _loss(fn(xg)).backward()  # noqa: E731
            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                p50, p20, p80 = time_fn(run, device, min_run_time)
            rows.append({"op": case, "shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
                         "pass": mode, "impl": name, "p50_ms": round(p50, 3), "p20_ms": round(p20, 3),
                         "p80_ms": round(p80, 3)})
    # ratio of each impl against the torch baseline (or the reference) of the same pass
    for mode in ("fwd", "fwd+bwd"):
        base = [r for r in rows if r["pass"] == mode and r["impl"] in ("torch", "reference")][0]["p50_ms"]
        for r in rows:
            if r["pass"] == mode:
                r["speedup_vs_torch"] = round(base / r["p50_ms"], 2)
    return rows


SMOKE_SHAPES = [(1, 2, 16, 16)]


def run(quick=False, device="cpu", dtype="float32", min_run_time=None, smoke=False):
    device = torch.device(device)
    dt = getattr(torch, dtype)
    backends = kernel_backends(device)
    shapes = SMOKE_SHAPES if smoke else QUICK_SHAPES if quick else FULL_SHAPES
    mrt = min_run_time if min_run_time is not None else (0.005 if smoke else 0.2 if quick else 0.5)
    cases = ["pyramid_average", "restrict_average", "restrict_full_weighting", "prolong_bilinear"]
    env = env_columns(device)
    rows = []
    for case in cases:
        for shape in shapes:
            impls = []
            t = torch_chained(case)
            if t is not None:
                impls.append(("torch", t))
            impls.append(("reference", msconv_fn(case, "reference")))
            impls += [(f"msconv-{b}", msconv_fn(case, b)) for b in backends]
            for r in bench_case(case, shape, dt, device, impls, mrt):
                rows.append({**r, **env})
    return rows


def main(argv=None) -> int:
    args = kernel_parser(__doc__, "transfer", "fewer shapes, shorter timing (the demo)").parse_args(argv)
    rows = run(args.quick, args.device, args.dtype, smoke=args.smoke)
    report(rows, args, "transfer", ["op", "shape", "pass", "impl", "p50_ms", "p20_ms", "p80_ms", "speedup_vs_torch"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

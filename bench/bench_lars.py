"""Time one optimizer ``step()``: LARS and LAMB (loop and foreach) against torch.optim.

The parameter set is that of a ResNet-style CNN built from ``nn.Conv2d`` and
``nn.BatchNorm2d`` layers, its width chosen so the total lands near ``--params`` (1–10 M
parameters), with gradients filled in once. Rows go to a CSV (one row per optimizer and
implementation: bench/results/lars_<device>[_quick].csv) and a table is printed; ``vs_base`` is each p50 over the p50 of its
torch.optim baseline with the same ``foreach`` setting (SGD for LARS, Adam for LAMB),
measured side by side in the same run.

    python bench/bench_lars.py                       # ~5 M parameters, CPU, float32
    python bench/bench_lars.py --params 2e6 --compile
    python bench/bench_lars.py --quick               # ~1e5 parameters, seconds (smoke run)

CPU timings use torch.utils.benchmark.Timer; on CUDA the same Timer synchronises the
device around each measurement.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import env_columns, kernel_parser, report  # noqa: E402

from msconv.optim import LAMB, LARS  # noqa: E402

FIELDS = [
    "op",
    "impl",
    "params",
    "tensors",
    "dtype",
    "threads",
    "p20_ms",
    "p50_ms",
    "p80_ms",
    "vs_base",
    "device",
    "torch",
    "msconv",
    "git",
]

# name -> (factory(params, foreach), baseline name)
OPTIMIZERS: dict[str, tuple[Callable[[list[nn.Parameter], bool], torch.optim.Optimizer], str]] = {
    "sgd": (
        lambda ps, fe: torch.optim.SGD(ps, lr=1e-4, momentum=0.9, weight_decay=5e-5, foreach=fe),
        "sgd",
    ),
    "lars": (
        lambda ps, fe: LARS(ps, lr=1e-4, momentum=0.9, weight_decay=5e-5, foreach=fe),
        "sgd",
    ),
    "adam": (
        lambda ps, fe: torch.optim.Adam(ps, lr=1e-6, weight_decay=0.0, foreach=fe),
        "adam",
    ),
    "lamb": (
        lambda ps, fe: LAMB(ps, lr=1e-6, weight_decay=0.01, foreach=fe),
        "adam",
    ),
}


def cnn(width: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ResNet-18-like stack (no skips needed: only the parameter set matters here)."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 7, bias=False), nn.BatchNorm2d(width)]
    c_in = width
    for mult in (1, 2, 4, 8):
        c = width * mult
        for block in range(2):
            layers += [nn.Conv2d(c_in, c, 3, bias=False), nn.BatchNorm2d(c)]
            layers += [nn.Conv2d(c, c, 3, bias=False), nn.BatchNorm2d(c)]
            if c_in != c:
                layers += [nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c)]
            c_in = c
    layers.append(nn.Conv2d(c_in, 10, 1))
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def cnn_for(target_params: float, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """The widest `cnn` with at most `target_params` parameters (at least width 1)."""
    def count(w: int) -> int:
        return sum(p.numel() for p in cnn(w, "meta").parameters())

    lo, hi = 1, 1
    while count(hi) <= target_params:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= target_params else (lo, mid)
    return cnn(lo, device, dtype)


def time_step(step: Callable[[], Any], repeats: int, min_block_s: float) -> np.ndarray:
    """Per-step times in ms: `repeats` blocks, each long enough to be above timer noise."""
    timer = benchmark.Timer(stmt="step()", globals={"step": step})
    step()  # lazy state allocation is not part of a step's cost
    per_call = timer.timeit(1).mean
    number = max(1, int(min_block_s / max(per_call, 1e-9)))
    return np.array([timer.timeit(number).mean * 1e3 for _ in range(repeats)])


def run(
    target_params: float = 5e6,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    ops: tuple[str, ...] = ("sgd", "lars", "adam", "lamb"),
    impls: tuple[str, ...] = ("loop", "foreach"),
    repeats: int = 15,
    min_block_s: float = 0.05,
    compile: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time `step()` for every (op, impl); return one dict per row (keys: FIELDS).

    ``impl`` is "loop" (foreach=False), "foreach" (foreach=True) or, with ``compile``,
    "compiled" (inductor-compiled foreach step; compilation time excluded).
    """
    unknown = [op for op in ops if op not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"bench_lars: unknown ops {unknown}; choose from {sorted(OPTIMIZERS)}")
    torch.manual_seed(seed)
    model = cnn_for(target_params, device, dtype)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    n_params = sum(p.numel() for p in params)
    common = {
        "params": n_params,
        "tensors": len(params),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
    env = env_columns(torch.device(device))
    impl_list = list(impls) + (["compiled"] if compile else [])
    rows: list[dict[str, Any]] = []
    p50: dict[tuple[str, str], float] = {}
    for op in ops:
        factory, _ = OPTIMIZERS[op]
        for impl in impl_list:
            # Fresh copies: every optimizer starts from the same weights and empty state.
            ps = [p.detach().clone().requires_grad_() for p in params]
            for p, q in zip(ps, params):
                p.grad = q.grad
            opt = factory(ps, impl != "loop")
            step = opt.step
            if impl == "compiled":
                step = torch.compile(opt.step)
            times = time_step(step, repeats, min_block_s)
            p20, p50_, p80 = np.percentile(times, [20, 50, 80])
            p50[(op, impl)] = p50_
            rows.append({"op": op, "impl": impl, **common, "p20_ms": round(p20, 4),
                         "p50_ms": round(p50_, 4), "p80_ms": round(p80, 4)})
    for row in rows:
        base = p50.get((OPTIMIZERS[row["op"]][1], row["impl"]))
        row["vs_base"] = round(p50[(row["op"], row["impl"])] / base, 3) if base else float("nan")
        row.update(env)
    return [{k: row[k] for k in FIELDS} for row in rows]


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    r0 = rows[0]
    head = (
        f"optimizer step(): {r0['params'] / 1e6:.2f} M parameters in {r0['tensors']} tensors, "
        f"{r0['dtype']}, {r0['device']}, {r0['threads']} threads, torch {r0['torch']}, "
        f"git {r0['git']}"
    )
    lines = [head, f"{'op':<6} {'impl':<9} {'p20 ms':>9} {'p50 ms':>9} {'p80 ms':>9} {'vs base':>8}"]
    for r in rows:
        lines.append(
            f"{r['op']:<6} {r['impl']:<9} {r['p20_ms']:>9.3f} {r['p50_ms']:>9.3f} "
            f"{r['p80_ms']:>9.3f} {r['vs_base']:>7.2f}x"
        )
    lines.append("vs base: p50 over torch.optim.SGD (lars) / torch.optim.Adam (lamb), same impl")
    return "\n".join(lines)


QUICK = {"params": 1e5, "repeats": 3, "min_block_s": 0.005}


def main(argv: list[str] | None = None) -> int:
    """Run from the command line (or ``msconv bench lars``); returns the exit code, 0."""
    parser = kernel_parser(__doc__, "lars", "~1e5 parameters, 3 short blocks: a smoke run in seconds")
    parser.add_argument("--params", type=float, default=5e6, help="target parameter count")
    parser.add_argument("--ops", default="sgd,lars,adam,lamb", help="comma-separated subset")
    parser.add_argument("--impls", default="loop,foreach", help="comma-separated: loop,foreach")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per row")
    parser.add_argument("--min-block-s", type=float, default=0.05, help="seconds per timed block")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(opt.step)")
    parser.add_argument("--no-csv", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.quick:
        # --quick shrinks what was left at its default; sizes given explicitly still win.
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    rows = run(
        target_params=args.params,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        ops=tuple(s for s in args.ops.split(",") if s),
        impls=tuple(s for s in args.impls.split(",") if s),
        repeats=args.repeats,
        min_block_s=args.min_block_s,
        compile=args.compile,
    )
    if args.no_csv:
        print(format_table(rows))
    else:
        report(rows, args, "lars", FIELDS[:10])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

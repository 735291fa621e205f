"""Full-Multiscale's wall-clock per work unit, stage by stage, against single-scale's, and where a
training step's time goes.

A bare training step costs about the same per work unit on every grid, so Full-Multiscale's time
ratio can reach its work ratio only if its many small coarse steps carry no extra overhead. For each
model size this runs single-scale and Full-Multiscale training side by side (the same machine, one
run after the other, the product defaults otherwise) and reports, per stage, seconds per work unit
over single-scale's (target <= 1.25), then profiles one short run of each mode with cProfile and
splits the step time into data (crop sampling), corruption, pyramid (restricting the pair to the
stage's grids), forward, backward, optimizer and the rest (logging, FLOP counting, Python).

    python bench/bench_overhead.py            # default and small DnCNN, bundled photographs, 1 thread
    python bench/bench_overhead.py --quick    # a shorter budget
"""
from __future__ import annotations

import cProfile
import csv
import os
import pstats
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, bench_parser, env_columns, size_tag, table, write_csv  # noqa: E402

MODELS = {"dncnn8x32": {"depth": 8, "width": 32}, "dncnn6x16": {"depth": 6, "width": 16}}
# (category, file suffix, function name): cumulative cProfile time of these functions.
CATEGORIES = [
    ("data", "data/__init__.py", "next_batch"),
    ("corruption", "tasks/__init__.py", "corrupt"),
    ("pyramid", "tasks/__init__.py", "pyramid_pair"),
    ("loss (pyramid + forward)", "multilevel/estimator.py", "loss"),
    ("backward", "multilevel/estimator.py", "backward"),
    ("optimizer", "optim/adam.py", "step"),
]


def _config(model: str, mode: str, budget: float, threads: int, data: str, out: str):
    from msconv.train import TrainConfig

    return TrainConfig(mode=mode, model="dncnn", budget=budget, threads=threads, data=data, out=out, progress=False,
                       tensorboard=False, val_points=1, **MODELS[model])


def stage_seconds_per_wu(metrics_csv: str) -> dict[int, tuple[int, float, float]]:
    """stage -> (steps, work units, seconds) from a run's metrics.csv."""
    out: dict[int, list] = {}
    prev_w = prev_t = 0.0
    with open(metrics_csv, newline="") as fh:
        for r in csv.DictReader(fh):
            if not r.get("loss"):
                continue  # the step-0 validation row
            k, w, t = int(r["stage"]), float(r["work_units"]), float(r["wall_clock_s"])
            a = out.setdefault(k, [0, 0.0, 0.0])
            a[0] += 1
            a[1] += w - prev_w
            a[2] += t - prev_t
            prev_w, prev_t = w, t
    return {k: tuple(v) for k, v in out.items()}


def profile(cfg, data) -> dict[str, float]:
    """Fractions of the training steps' time per category (cProfile, one run)."""
    from msconv.train.trainer import Trainer

    tr = Trainer(cfg, data=data)
    prof = cProfile.Profile()
    prof.enable()
    tr.run()
    prof.disable()
    stats = pstats.Stats(prof).stats
    cum = {}
    for (fname, _, func), (_, _, _, ct, _) in stats.items():
        for cat, suffix, name in CATEGORIES:
            if func == name and fname.replace(os.sep, "/").endswith(suffix):
                cum[cat] = cum.get(cat, 0.0) + ct
    step = sum(ct for (fname, _, func), (_, _, _, ct, _) in stats.items()
               if (func == "__call__" and fname.replace(os.sep, "/").endswith("train/step.py"))
               or (func == "draw" and fname.endswith("trainer.py")))
    out = {cat: cum.get(cat, 0.0) / step for cat, _, _ in CATEGORIES if step}
    out["forward"] = out.pop("loss (pyramid + forward)", 0.0) - out.get("pyramid", 0.0)
    out["other"] = 1.0 - sum(out.values())  # logging, FLOP counting, Python; the categories do not overlap
    return out


def main(argv=None) -> int:
    p = bench_parser(__doc__, "overhead", "budget 60 work units instead of 240")
    p.add_argument("--data", default="bundled", help="training photos (default: the bundled photographs)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = 12.0 if args.smoke else 60.0 if args.quick else 240.0
    from msconv.data import load_dataset
    from msconv.train.trainer import Trainer

    data = load_dataset(args.data)
    env = env_columns(torch.device("cpu"))
    rows, prof_rows = [], []
    for model in args.models.split(","):
        per_mode = {}
        for mode in ("single", "fmg"):
            out = tempfile.mkdtemp(prefix=f"overhead_{mode}_")
            Trainer(_config(model, mode, budget, args.threads, args.data, out), data=data).run()
            per_mode[mode] = stage_seconds_per_wu(os.path.join(out, "metrics.csv"))
        s_steps, s_wu, s_t = per_mode["single"][0]
        single_rate = s_t / s_wu
        for k, (n, wu, t) in sorted(per_mode["fmg"].items()):
            rows.append({"model": model, "mode": "fmg", "stage": k, "steps": n, "work_units": round(wu, 2),
                         "seconds": round(t, 3), "s_per_wu": round(t / wu, 4),
                         "x_single_s_per_wu": round(t / wu / single_rate, 3), **env})
        rows.append({"model": model, "mode": "single", "stage": 0, "steps": s_steps, "work_units": round(s_wu, 2),
                     "seconds": round(s_t, 3), "s_per_wu": round(single_rate, 4), "x_single_s_per_wu": 1.0, **env})
        for mode in ("single", "fmg"):
            out = tempfile.mkdtemp(prefix=f"overhead_prof_{mode}_")
            fr = profile(_config(model, mode, budget / 2, args.threads, args.data, out), data)
            prof_rows.append({"model": model, "mode": mode, **{k: round(v, 3) for k, v in fr.items()}, **env})
    tag = size_tag(args)
    path = args.out or os.path.join(RESULTS, f"overhead_cpu{tag}.csv")
    write_csv(rows, path)
    write_csv(prof_rows, path.replace(".csv", "_profile.csv"))
    print(f"device: {env['device']}, torch {env['torch']}, budget {budget:g} WU per run")
    print(table(rows, ["model", "mode", "stage", "steps", "work_units", "seconds", "s_per_wu", "x_single_s_per_wu"]))
    print("\nshare of the training steps' time (cProfile):")
    cols = ["model", "mode"] + [c for c in prof_rows[0] if c not in ("model", "mode") and c not in env]
    print(table(prof_rows, cols))
    print(f"\nwrote {path} and {path.replace('.csv', '_profile.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

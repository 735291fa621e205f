"""Shared plumbing of the paper experiments (bench/paper_*.py).

Each experiment is a list of ``msconv compare`` runs (the same code path as the CLI): one
:class:`msconv.train.TrainConfig` per cell of its table, every mode of a cell on the same data,
seed and budget. This module runs them, flattens each summary into CSV rows with the ratios to
single-scale, and writes the per-cell plots next to the CSV.

Standard data paths are ``../shared/data/<name>`` beside the checkout; every script takes
``--data-root`` (and ``--tiny`` swaps them for the bundled photographs so the test suite can run
each script in seconds without them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from _common import RESULTS, env_columns, table, write_csv  # noqa: E402
from msconv.train.compare import compare  # noqa: E402
from msconv.train.config import TrainConfig  # noqa: E402

DEFAULT_DATA_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc)
    p.add_argument("--data-root", default=DEFAULT_DATA_ROOT, help="folder holding Train400/, BSD68/, Set5/, Set14/")
    p.add_argument("--tiny", action="store_true",
                   help="a few steps on the bundled photographs (what the test suite runs; figures meaningless)")
    p.add_argument("--budget", type=float, help="work units per run (fine-equivalent samples)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run")
    p.add_argument("--out", help="results folder (default bench/results/paper_<name>[_tiny])")
    p.add_argument("--runs", help="where the per-run folders go (default runs/paper_<name>[_tiny]; deleted after --tiny)")
    return p


def data_paths(args, train: str, val: str, test: str | None = None) -> dict:
    """TrainConfig data fields: the standard folders, or bundled photographs under --tiny."""
    if args.tiny:
        return {"data": "bundled", "val_data": None, "test_data": None}
    paths = {k: os.path.join(args.data_root, v) for k, v in (("data", train), ("val_data", val), ("test_data", test)) if v}
    missing = [p for p in paths.values() if not os.path.isdir(p)]
    if missing:
        raise SystemExit(f"missing data folder(s) {missing}; pass --data-root (the folder with Train400/, BSD68/, ...) "
                         "or --tiny to run on the bundled photographs")
    return {"test_data": None, **paths}


def out_dir(args, name: str) -> str:
    out = args.out or os.path.join(RESULTS, f"paper_{name}" + ("_tiny" if args.tiny else ""))
    os.makedirs(out, exist_ok=True)
    return out


def tiny_overrides() -> dict:
    return {"crop": 32, "val_crop": 32, "budget": 6.0, "val_points": 2, "count_flops": False, "depth": 3, "width": 4}


def run_cell(cell: str, cfg: TrainConfig, modes, runs_dir: str) -> dict:
    """One ``compare`` of ``modes`` under ``cfg``; returns its summary with the cell name."""
    out = os.path.join(runs_dir, cell)
    t0 = time.time()
    summary = compare(cfg.replace(out=out, progress=False, tensorboard=False), modes=modes)
    summary["cell"], summary["elapsed_s"], summary["out"] = cell, time.time() - t0, out
    return summary


def run_all(args, name: str, cells) -> tuple[list[dict], list[dict]]:
    """Run ``cells`` = [(cell, TrainConfig, modes, extra CSV columns)]; returns (rows, summaries)."""
    rows, summaries = [], []
    for cell, cfg, modes, extra in cells:
        s = run_cell(cell, cfg, modes, runs_dir(args, name))
        summaries.append(s)
        rows += rows_of(s, {"cell": cell, **extra})
        print(f"[{cell}] done in {s['elapsed_s']:.0f}s", flush=True)
    return rows, summaries


def rows_of(summary: dict, extra: dict) -> list[dict]:
    """CSV rows of one compared cell: every mode with its figures and its ratios to single-scale."""
    runs = summary["runs"]
    single = next((r for r in runs if r["mode"] == "single"), None)
    env = env_columns(torch.device("cpu"))
    rows = []
    for r in runs:
        def ratio(key, r=r):
            a, b = single and single.get(key), r.get(key)
            return round(a / b, 3) if a and b else ""

        rows.append({
            **extra, "mode": r["mode"], "conv": r["conv"],
            "val_psnr": rnd(r["psnr"], 3), "val_ssim": rnd(r["ssim"], 4),
            "test_psnr": rnd(r.get("test_psnr"), 3), "test_ssim": rnd(r.get("test_ssim"), 4),
            "dpsnr_vs_single": rnd(None if single is None or r["psnr"] is None else r["psnr"] - single["psnr"], 3),
            "dtest_vs_single": rnd(None if single is None or r.get("test_psnr") is None
                                  else r["test_psnr"] - single["test_psnr"], 3),
            "work_units": rnd(r["work_units"], 2), "flops": f"{r['flops']:.4g}", "wall_clock_s": rnd(r["wall_clock_s"], 2),
            "iterations": r["iterations"],
            "work_to_single_quality": rnd(r["work_units_to_single_quality"], 2),
            "x_less_work_to_quality": ratio("work_units_to_single_quality"),
            "time_to_single_quality_s": rnd(r["wall_clock_to_single_quality_s"], 2),
            "x_less_time_to_quality": ratio("wall_clock_to_single_quality_s"),
            "flops_ratio_single_over_mode": ratio("flops"),
            **env,
        })
    return rows


def rnd(v, nd):
    """round(v, nd), or "" for a missing figure (a blank CSV cell)."""
    return "" if v is None else round(float(v), nd)


def keep_plots(summary: dict, out: str) -> None:
    """Copy a cell's quality-vs-work and quality-vs-time plots next to the CSV."""
    for name in ("psnr_vs_work_units.png", "psnr_vs_wall_clock.png"):
        src = os.path.join(summary["out"], name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out, f"{summary['cell']}_{name}"))


def finish(args, out: str, name: str, rows: list[dict], summaries: list[dict], cols: list[str]) -> str:
    """Write CSV + JSON (+ the plots), print the table, drop the run folders under --tiny."""
    path = write_csv(rows, os.path.join(out, f"{name}.csv"))
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump({"rows": rows, "summaries": summaries}, fh, indent=1, default=str)
    for s in summaries:
        keep_plots(s, out)
    print(table(rows, cols))
    print(f"\nwrote {path}")
    if args.tiny and not args.runs:
        shutil.rmtree(runs_dir(args, name), ignore_errors=True)
    return path


def runs_dir(args, name: str) -> str:
    """Per-run folders (checkpoints, logs): outside bench/results, under the git-ignored runs/."""
    return args.runs or os.path.join(os.path.dirname(HERE), "runs", f"paper_{name}" + ("_tiny" if args.tiny else ""))

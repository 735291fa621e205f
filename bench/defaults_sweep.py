"""The sweep the CLI's defaults come from: `msconv compare` (single-scale vs Full-Multiscale) on
Train400 crops, validated on 10 BSD68 images (every sixth of the first 60, centre 160²), σ = 25
denoising with the noise level preserved on coarse grids, one thread per run, varying one knob at a
time around DnCNN 8×32, 128² crops, batch 4, 4 grids, iteration ratio 8, batch ratio 2, Adam 2e-3.

    python bench/defaults_sweep.py --data ../shared/data/Train400 --val ../shared/data/BSD68 --out runs/sweep
    python bench/defaults_sweep.py --aggregate runs/sweep        # -> bench/results/defaults_sweep/sweep.csv

Each configuration is one `msconv compare` into OUT/<name>; finished ones are skipped, so the sweep
can be stopped and continued.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

from _common import bsd68_val_subset

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = ["--task", "denoise", "--noise-sigma", "25", "--noise-restriction", "preserve", "--modes", "single,fmg",
        "--model", "dncnn", "--depth", "8", "--width", "32", "--crop", "128", "--lr", "2e-3", "--batch-size", "4",
        "--levels", "3", "--fmg-iteration-ratio", "8", "--fmg-batch-ratio", "2", "--budget", "1200", "--val-points", "40"]
# name -> options that override BASE (argparse keeps the last occurrence).
CONFIGS = {
    "B300_L3r8_lr2e3": ["--budget", "300", "--val-points", "30"],
    "B300_L3r8_lr1e3": ["--budget", "300", "--val-points", "30", "--lr", "1e-3"],
    "B300_L2r8_lr2e3": ["--budget", "300", "--val-points", "30", "--levels", "2"],
    "B300_L3r16_lr2e3": ["--budget", "300", "--val-points", "30", "--fmg-iteration-ratio", "16"],
    "B300_b1_L3r8_lr2e3": ["--budget", "300", "--val-points", "30", "--batch-size", "1"],
    "B1200_L3r8_lr2e3": [],
    "B1200_L3r8_lr1e3": ["--lr", "1e-3"],
    "B1200_L3r8_lr4e3": ["--lr", "4e-3"],
    "B1200_L3r16_lr2e3": ["--fmg-iteration-ratio", "16"],
    "B1200_L2r16_lr2e3": ["--levels", "2", "--fmg-iteration-ratio", "16"],
    "B1200_L3r8br1_lr2e3": ["--fmg-batch-ratio", "1"],
    "B1200_L3r8br4_lr2e3": ["--fmg-batch-ratio", "4"],
    "B1200_b1_L3r8_lr2e3": ["--batch-size", "1"],
    "B1200_b2_L3r8_lr2e3": ["--batch-size", "2"],
    "B1200_b1_L3r4": ["--batch-size", "1", "--fmg-iteration-ratio", "4"],
    "B1200_b1_L2r8": ["--batch-size", "1", "--levels", "2"],
}


def run(args) -> int:
    val = bsd68_val_subset(args.val, "sweep_val_")
    for name, extra in CONFIGS.items():
        out = os.path.join(args.out, name)
        if os.path.exists(os.path.join(out, "summary.json")):
            continue
        cmd = [sys.executable, "-m", "msconv", "compare", "--threads", "1", "--no-progress", "--no-tensorboard",
               "--data", args.data, "--val-data", val, "--val-crop", "160", "--out", out] + BASE + extra
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=False)
    return 0


def aggregate(folder: str, out_csv: str) -> int:
    rows = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name, "summary.json")
        if not os.path.exists(path):
            continue
        s = json.load(open(path))
        runs = {r["mode"]: r for r in s["runs"]}
        single, fmg = runs.get("single"), runs.get("fmg")
        start = json.load(open(os.path.join(folder, name, "single", "result.json")))["val_history"][0]["psnr"]
        c = s["config"]
        row = {"name": name, "budget": c["budget"], "batch_size": c["batch_size"], "levels": c["levels"],
               "fmg_iteration_ratio": c["fmg_iteration_ratio"], "fmg_batch_ratio": c["fmg_batch_ratio"], "lr": c["lr"],
               "input_psnr": round(start, 3), "single_psnr": round(single["psnr"], 3),
               "single_wall_s": round(single["wall_clock_s"], 1),
               "single_wu_to_quality": single["work_units_to_single_quality"]}
        if fmg:
            row.update(fmg_psnr=round(fmg["psnr"], 3), fmg_gain_db=round(fmg["psnr"] - single["psnr"], 3),
                       fmg_wall_s=round(fmg["wall_clock_s"], 1),
                       fmg_wu_to_quality=fmg["work_units_to_single_quality"],
                       fmg_x_less_work=(round(single["work_units_to_single_quality"] / fmg["work_units_to_single_quality"], 2)
                                        if fmg["work_units_to_single_quality"] else None))
        rows.append(row)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        w.writerows(rows)
    print(f"{len(rows)} configurations -> {out_csv}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/defaults_sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "Train400"))
    p.add_argument("--val", default=os.path.join(HERE, "..", "..", "shared", "data", "BSD68"))
    p.add_argument("--out", default="runs/defaults_sweep")
    p.add_argument("--aggregate", metavar="FOLDER", help="only aggregate FOLDER's finished runs into the CSV")
    p.add_argument("--csv", default=os.path.join(HERE, "results", "defaults_sweep", "sweep.csv"))
    a = p.parse_args(argv)
    if a.aggregate:
        return aggregate(a.aggregate, a.csv)
    for d in (a.data, a.val):
        if not os.path.isdir(d):
            print(f"defaults_sweep: {d!r} is not a folder; pass --data/--val (Train400 and BSD68)", file=sys.stderr)
            return 2
    return run(a)


if __name__ == "__main__":
    raise SystemExit(main())

"""Large coarse batches at the CLI's defaults: Full-Multiscale with coarsest batches 64x the fine one.

Each configuration is ``msconv compare --modes fmg --threads 1 --no-progress --no-tensorboard`` plus its
options, every other option at the CLI's default (4 grids, DnCNN 8x32, batch 4, 1200 work units, σ 25 with
the noise preserved on coarse grids). ``--fmg-batch-ratio 4`` makes the coarsest stage's batch 4**3 = 64x
the fine one (the default 2 gives 8x); ``--fmg-iteration-ratio 4`` with it keeps the default's split of the
work between the stages (each coarser stage 4x the next finer one's). The default Adam run it is read
against is the Full-Multiscale row of ``bench/results/defaults_unseen`` (unseen photos) or of
``bench/results/mf_training_bsd68/std`` (BSD68), both with the same defaults.

Finished configurations (OUT/<name>/summary.json) are read back, not rerun; OUT/large_batch.csv and
OUT/summary.md get one row per configuration.

    python bench/large_batch_defaults.py --out bench/results/large_batch_defaults
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
UNSEEN = "/work/sweep/unseen"
# Train400 -> 10 BSD68 images (every sixth of the first 60, centre 160²), as bench/defaults_sweep.py.
BSD68 = ["--task", "denoise", "--noise-sigma", "25", "--val-crop", "160", "--val-points", "40"]
BR4 = ["--fmg-batch-ratio", "4"]
# (name, data set, options)
CONFIGS = [
    ("unseen_adam_br4", "unseen", ["--optimizer", "adam", *BR4]),
    ("unseen_lars_br4", "unseen", ["--optimizer", "lars", *BR4]),
    ("unseen_lars_br2", "unseen", ["--optimizer", "lars"]),
    ("unseen_adam_br4_r4", "unseen", ["--optimizer", "adam", *BR4, "--fmg-iteration-ratio", "4"]),
    ("unseen_lars_br4_r4", "unseen", ["--optimizer", "lars", *BR4, "--fmg-iteration-ratio", "4"]),
    ("bsd_lars_br4", "bsd68", ["--optimizer", "lars", *BR4, *BSD68]),
]
REFERENCE = {"unseen": os.path.join(HERE, "results", "defaults_unseen"),
             "bsd68": os.path.join(HERE, "results", "mf_training_bsd68", "std")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "results", "large_batch_defaults"))
    p.add_argument("--unseen", default=UNSEEN, help="folder of the unseen photos (Set5 + Set14)")
    p.add_argument("--data-root", default=os.path.join(HERE, "..", "..", "shared", "data"),
                   help="folder holding Train400 and BSD68")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    val = None
    rows = []
    for name, data, options in CONFIGS:
        folder = os.path.join(args.out, name)
        if not os.path.exists(os.path.join(folder, "summary.json")):
            if data == "unseen":
                src = ["--data", args.unseen]
            else:
                val = val or bsd68_val_subset(os.path.join(args.data_root, "BSD68"), "lb_val_")
                src = ["--data", os.path.join(args.data_root, "Train400"), "--val-data", val]
            cmd = [sys.executable, "-m", "msconv", "compare", "--modes", "fmg", *options, *src, "--threads", "1",
                   "--no-progress", "--no-tensorboard", "--out", folder]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True)
        with open(os.path.join(folder, "summary.json")) as f:
            run = next(r for r in json.load(f)["runs"] if r["mode"] == "fmg")
        with open(os.path.join(REFERENCE[data], "summary.json")) as f:
            ref = next(r for r in json.load(f)["runs"] if r["mode"] == "fmg")
        rows.append({"config": name, "data": data, "options": " ".join(options), "psnr_db": round(run["psnr"], 3),
                     "default_adam_fmg_psnr_db": round(ref["psnr"], 3),
                     "delta_vs_default_adam_fmg_db": round(run["psnr"] - ref["psnr"], 3),
                     "work_units": round(run["work_units"], 1), "iterations": run["iterations"],
                     "wall_clock_s": round(run["wall_clock_s"], 1)})
    with open(os.path.join(args.out, "large_batch.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| config | data | options | Full-Multiscale PSNR (dB) | default Adam FMG (dB) | Δ (dB) | steps |",
             "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['config']} | {r['data']} | `{r['options']}` | {r['psnr_db']:.2f} | {r['default_adam_fmg_psnr_db']:.2f} "
              f"| {r['delta_vs_default_adam_fmg_db']:+.2f} | {r['iterations']} |" for r in rows]
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Full-Multiscale against the baselines a practitioner would run instead, at equal work.

Every run is one ``msconv train`` (DnCNN 8x32, Adam 2e-3, denoising at σ 25 with the noise preserved
on coarse grids, 128² reference crops, batch 4, 1200 work units, 1 thread) that differs from the
others only in the options listed with it; runs go to OUT/<suite>/<name>/. A run whose result.json
is there already is read back, not run again. Each suite then writes

* OUT/<suite>/<name>/metrics.csv — the run's log, thinned to about 500 training rows plus every
  validation, skipped-step and stage-change row;
* OUT/<suite>/runs.csv — one row per run: final validation PSNR, work units, wall-clock, steps;
* OUT/<suite>/<group>/summary.md and summary.json — ``msconv compare``'s own summary of a group
  of runs (every mode against the best baseline, and against each baseline).

Suites:

* ``sweep`` (Train400 -> 10 BSD68 images, the tuning data): the small-patch baseline's patch side
  and batch, progressive resizing's initial scale, and 12 Full-Multiscale schedules (from the
  previous defaults, ``FMG_MGE_STAGES``, to the current ones, ``fmg``);
* ``unseen`` (Set5 + Set14, never tuned on; 80/20 split by image): the default comparison, plus
  tuned progressive resizing and the previous Full-Multiscale schedule;
* ``long`` (Train400 -> BSD68, run with ``--budget 4800``): the best baseline and Full-Multiscale at
  four times the default budget;
* ``unet`` (the unseen photos): a UNet with 3 poolings (receptive field 108 px);
* ``tasks`` (the unseen photos): deblurring and super-resolution x2 (DnCNN): single-scale, small
  patches, Full-Multiscale, and its previous schedule with coarse grids posing the same problem
  or the restricted fine one.

--data for unseen/unet/tasks: a folder holding Set5 and Set14 (e.g. symlinks ``Set5_<name>``,
``Set14_<name>`` to ../shared/data/Set5/* and Set14/*).

    python bench/strong_baselines.py --suite sweep --jobs 2
    python bench/strong_baselines.py --suite unseen --data /tmp/unseen --jobs 2
    python bench/strong_baselines.py --suite long --budget 4800 --jobs 2
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from _common import bsd68_val_subset, thin_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared", "data")
BSD68_OPTIONS = ["--val-crop", "160", "--val-points", "40"]

# name -> options. Baselines at their defaults, then the variants the sweep measures.
DEFAULTS = {
    "single": ["--mode", "single"],
    "small": ["--mode", "small"],
    "progressive": ["--mode", "progressive"],
    "patches": ["--mode", "patches"],
    "fmg": ["--mode", "fmg"],
}
# Full-Multiscale's previous defaults (MGE stages, full crops, batches x2 and iterations x8 per
# coarser stage); the sweep's variants start from it, so each runs the same whatever the defaults.
FMG_MGE_STAGES = ["--mode", "fmg", "--no-fmg-plain-stages", "--fmg-crop", "128", "--fmg-batch-ratio", "2",
                  "--fmg-iteration-ratio", "8"]
SWEEP = {
    # Small patches: the side at equal pixels per step (batch 16), and the batch at 32².
    **{f"small_p{p}_b16": ["--mode", "small", "--small-crop", str(p), "--small-batch", "16"] for p in (24, 32, 48, 64)},
    "small_p32_b4": ["--mode", "small", "--small-crop", "32", "--small-batch", "4"],
    "small_p32_b64": ["--mode", "small", "--small-crop", "32", "--small-batch", "64"],
    "small_p24_b4": ["--mode", "small", "--small-crop", "24", "--small-batch", "4"],
    "small_p16_b4": ["--mode", "small", "--small-crop", "16", "--small-batch", "4"],
    "small_p40_b4": ["--mode", "small", "--small-crop", "40", "--small-batch", "4"],
    "progressive_s0.25": ["--mode", "progressive", "--progressive-initial-scale", "0.25"],
    "fmg_mge_stages": FMG_MGE_STAGES,
    "fmg_c32": [*FMG_MGE_STAGES, "--fmg-crop", "32"],
    "fmg_c64": [*FMG_MGE_STAGES, "--fmg-crop", "64"],
    # Many cheap steps (what small patches do well): the same batch on every stage, 16x the steps per coarser stage.
    "fmg_b1": [*FMG_MGE_STAGES, "--fmg-batch-ratio", "1", "--fmg-iteration-ratio", "16"],
    # More of the work on the fine grid's small patches: FMG as their hot start.
    "fmg_c32_r4": [*FMG_MGE_STAGES, "--fmg-crop", "32", "--fmg-iteration-ratio", "4"],
    "fmg_c32_b1": [*FMG_MGE_STAGES, "--fmg-crop", "32", "--fmg-batch-ratio", "1", "--fmg-iteration-ratio", "16"],
    # Plain-loss stages (no MGE differences in a stage: its gradient is as exact as single-scale's).
    "fmg_plain": [*FMG_MGE_STAGES, "--fmg-plain-stages"],
    "fmg_plain_b1": [*FMG_MGE_STAGES, "--fmg-plain-stages", "--fmg-batch-ratio", "1", "--fmg-iteration-ratio", "16"],
    # ... with 16² patches on every grid (the small-patch baseline's pixels per step) and batch 4;
    # iterations x2 per coarser stage is the current default schedule ("fmg").
    "fmg_plain_c16_b1_r4": [*FMG_MGE_STAGES, "--fmg-plain-stages", "--fmg-crop", "16", "--fmg-batch-ratio", "1",
                            "--fmg-iteration-ratio", "4"],
    # Equal steps per stage (what paid on volumes, bench/results/volume): the default with ratio 1.
    "fmg_r1": ["--mode", "fmg", "--fmg-iteration-ratio", "1"],
}
SUITES = {
    "sweep": ({**DEFAULTS, **SWEEP}, {"defaults": list(DEFAULTS), "all": list(DEFAULTS) + list(SWEEP)}),
    "unseen": ({**DEFAULTS, "progressive_s0.25": SWEEP["progressive_s0.25"], "fmg_mge_stages": FMG_MGE_STAGES,
                "fmg_c32": SWEEP["fmg_c32"], "fmg_r1": SWEEP["fmg_r1"]},
               {"defaults": list(DEFAULTS),
                "tuned": list(DEFAULTS) + ["progressive_s0.25", "fmg_mge_stages", "fmg_c32", "fmg_r1"]}),
}
# A longer budget (--budget 4800): does the best baseline catch up as training converges?
SUITES["long"] = ({n: DEFAULTS[n] for n in ("small", "fmg")}, {"defaults": ["small", "fmg"]})
# A UNet with 3 poolings (receptive field 108 px).
UNET = ["--model", "unet", "--depth", "3"]
SUITES["unet"] = ({"single": [*UNET, *DEFAULTS["single"]], "small": [*UNET, *DEFAULTS["small"]],
                   "small_p112": [*UNET, "--mode", "small", "--small-crop", "112"],
                   "fmg_mge_stages": [*UNET, *FMG_MGE_STAGES],
                   "fmg_plain_b1": [*UNET, *SWEEP["fmg_plain_b1"]], "fmg": [*UNET, *DEFAULTS["fmg"]]},
                  {"defaults": ["single", "small", "small_p112", "fmg_mge_stages", "fmg_plain_b1", "fmg"]})
TASKS = {f"{task}_{name}": [*task_opts, *opts]
         for task, task_opts in (("deblur", ["--task", "deblur"]), ("sr", ["--task", "sr"]))
         for name, opts in (("single", DEFAULTS["single"]), ("small", DEFAULTS["small"]), ("fmg", DEFAULTS["fmg"]),
                            ("fmg_mge_stages", FMG_MGE_STAGES),
                            ("fmg_mge_stages_restricted", [*FMG_MGE_STAGES, "--coarse-task", "restricted"]))}
SUITES["tasks"] = (TASKS, {t: [n for n in TASKS if n.startswith(t)] for t in ("deblur", "sr")})
FIELDS = ["suite", "name", "mode", "psnr_db", "start_psnr_db", "work_units", "wall_clock_s", "iterations",
          "stages", "options"]


def run_one(python, name, options, common, out) -> dict:
    folder = os.path.join(out, name)
    done = os.path.join(folder, "result.json")
    if not os.path.exists(done):
        cmd = [python, "-m", "msconv", "train", *options, *common, "--threads", "1", "--no-progress",
               "--no-tensorboard", "--out", folder]
        print("+", " ".join(cmd), flush=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    thin_metrics(os.path.join(folder, "metrics.csv"))
    with open(done) as f:
        return json.load(f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=tuple(SUITES), default="sweep")
    p.add_argument("--data", default=None, help="training images (default: Train400; unseen: required)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "strong_baselines"))
    p.add_argument("--only", default=None, help="comma-separated run names")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each on 1 thread)")
    p.add_argument("--budget", type=float, default=1200.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    configs, groups = SUITES[args.suite]
    if args.suite in ("unseen", "tasks", "unet"):
        if not args.data or not os.path.isdir(args.data):
            print(f"strong_baselines: --suite {args.suite} needs --data DIR (Set5 + Set14 images)", file=sys.stderr)
            return 2
        common = ["--data", args.data]
    else:
        train, bsd68 = args.data or os.path.join(SHARED, "Train400"), os.path.join(SHARED, "BSD68")
        if not (os.path.isdir(train) and os.path.isdir(bsd68)):
            print(f"strong_baselines: {train!r} or {bsd68!r} is missing", file=sys.stderr)
            return 2
        common = ["--data", train, "--val-data", bsd68_val_subset(bsd68), *BSD68_OPTIONS]
    common += ["--budget", f"{args.budget:g}", "--seed", str(args.seed)]
    out = os.path.join(args.out, args.suite if args.seed == 0 else f"{args.suite}_seed{args.seed}")
    os.makedirs(out, exist_ok=True)
    names = [n for n in configs if args.only is None or n in args.only.split(",")]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = dict(zip(names, pool.map(lambda n: run_one(sys.executable, n, configs[n], common, out), names)))

    rows = []
    for n, r in results.items():
        h = r["val_history"]
        rows.append({"suite": args.suite, "name": n, "mode": r["mode"], "psnr_db": round(r["psnr"], 3),
                     "start_psnr_db": round(h[0]["psnr"], 3) if h else None, "work_units": round(r["work_units"], 1),
                     "wall_clock_s": round(r["wall_clock_s"], 1), "iterations": r["iterations"],
                     "stages": " ".join(f"{s.get('crop', '-')}/{s.get('resize', '-')}x{s['batch_sizes']}:{s['iterations']}"
                                        .replace(" ", "") for s in r["stages"]),
                     "options": " ".join(configs[n])})
    with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)

    from msconv.train.compare import summarize
    from msconv.train.config import TrainConfig

    cfg = TrainConfig(budget=args.budget, seed=args.seed, data=common[1], val_data=None)
    for g, members in groups.items():
        if not all(m in results for m in members):
            continue
        folder = os.path.join(out, g)
        os.makedirs(folder, exist_ok=True)
        # Runs are named in the summary by their configuration name (variants of one mode differ).
        def label(m):  # a variant's name, with the task prefix dropped (deblur_fmg -> fmg)
            short = m.split("_", 1)[1] if args.suite == "tasks" else m
            return results[m]["mode"] if short in DEFAULTS else short

        summarize(cfg.replace(task=g) if args.suite == "tasks" else cfg,
                  [dict(results[m], mode=label(m)) for m in members], folder)
    for r in sorted(rows, key=lambda r: -r["psnr_db"]):
        print(f"{r['name']:22s} {r['psnr_db']:7.3f} dB  {r['work_units']:7.1f} WU  {r['wall_clock_s']:7.1f} s  {r['iterations']} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MFConv2d in training: `msconv compare` runs of the mesh-free DnCNN against the Conv2d one, one CSV.

Each configuration is ``msconv compare --data DATA --threads 1 --no-progress`` plus its own options
(every other option at its default: DnCNN 8x32, batch 4, crop 128, 1200 work units, Adam 2e-3,
denoising at σ 25 with the noise preserved on coarse grids). The runs go to OUT/<name>/ (compare's
own summary.json / summary.md / plots, one folder per mode); a configuration whose summary.json is
there already is read back, not run again. OUT/mf_training.csv gets one row per (configuration,
mode): final validation PSNR, work and wall-clock to single-scale quality and their ratios.

The σ floor (``--mf-sigma-floor``: grids too coarse for σ apply the finest resolved grid's stencil in
their own pixels) is on by default at 0.5; the plain mesh-free rows turn it off with 0.

Suites: ``unseen`` trains on DATA (default /work/sweep/unseen, Set5 + Set14) with compare's own 80/20
split; ``bsd68`` trains on Train400 and validates on 10 BSD68 images (every sixth of the first 60,
centre 160², as bench/defaults_sweep.py does), one compare per convolution with all three modes.

    python bench/mf_training.py --data /work/sweep/unseen --out bench/results/mf_training
    python bench/mf_training.py --only mf_s0.5_single,std_l1   # a subset, by name
    python bench/mf_training.py --suite bsd68 --out bench/results/mf_training_bsd68
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

# (name, compare options, sigma_floor or None, baseline): in the order they are run. A configuration
# without a single-scale run is measured against the single-scale run of its baseline configuration
# (the same model at s = 1: σ floored or not, the fine grid computes the same thing, so that run
# is the one it would repeat bit for bit).
OFF = ["--mf-sigma-floor", "0"]
FLOOR = ["--mf-sigma-floor", "0.5"]
CONFIGS = [
    ("mf_s0.5_single", ["--conv", "mf", "--modes", "single", *OFF], None, None),
    ("mf_s1.0_l1", ["--conv", "mf", "--mf-sigma", "1.0", "--modes", "single,fmg", "--levels", "1", *OFF], None, None),
    ("std_l1", ["--conv", "standard", "--modes", "single,fmg", "--levels", "1"], None, None),
    ("mf_s0.5_fmg", ["--conv", "mf", "--modes", "fmg", *OFF], None, "mf_s0.5_single"),
    ("mf_s0.5_floor_fmg", ["--conv", "mf", "--modes", "fmg", *FLOOR], 0.5, "mf_s0.5_single"),
    # A second seed (model init, sampling and noise) for the single-scale gap and the floor's saving.
    ("std_single_seed1", ["--conv", "standard", "--modes", "single", "--seed", "1"], None, None),
    ("mf_s0.5_single_seed1", ["--conv", "mf", "--modes", "single", "--seed", "1", *OFF], None, None),
    ("mf_s0.5_floor_fmg_seed1", ["--conv", "mf", "--modes", "fmg", "--seed", "1", *FLOOR], 0.5, "mf_s0.5_single_seed1"),
    # MGE (variance-matched allocation) on mesh-free layers: does their faster decay of the level
    # differences' variance let MGE pay where Conv2d's does not?
    ("mf_s0.5_floor_mge", ["--conv", "mf", "--modes", "mge", *FLOOR], 0.5, "mf_s0.5_single"),
    ("mf_s0.5_mge", ["--conv", "mf", "--modes", "mge", *OFF], None, "mf_s0.5_single"),
]
# Train400 -> 10 BSD68 images: the options of bench/defaults_sweep.py's B1200_L3r8_lr2e3 row.
BSD68_OPTIONS = ["--task", "denoise", "--noise-sigma", "25", "--val-crop", "160", "--val-points", "40"]
BSD68_CONFIGS = [
    ("std", ["--conv", "standard", "--modes", "single,fmg,mge", *BSD68_OPTIONS], None, None),
    ("mf_s0.5_floor", ["--conv", "mf", "--modes", "single,fmg,mge", *FLOOR, *BSD68_OPTIONS], 0.5, None),
    # The single-scale gap: a second seed, and order 3 (10 basis functions per channel pair, a 3x3
    # conv has 9; order 2 has 6).
    ("std_seed1", ["--conv", "standard", "--modes", "single", "--seed", "1", *BSD68_OPTIONS], None, None),
    ("mf_s0.5_floor_seed1", ["--conv", "mf", "--modes", "single", "--seed", "1", *FLOOR, *BSD68_OPTIONS], 0.5, None),
    ("mf_s0.5_order3", ["--conv", "mf", "--mf-order", "3", "--modes", "single", *FLOOR, *BSD68_OPTIONS], 0.5, None),
    # A narrower σ (the floor with it, or it would widen σ back to 0.5 at s = 1): closer to a 3x3
    # conv's pixel-scale taps.
    ("mf_s0.4", ["--conv", "mf", "--mf-sigma", "0.4", "--mf-sigma-floor", "0.4", "--modes", "single",
                 *BSD68_OPTIONS], 0.4, None),
    ("mf_s0.35", ["--conv", "mf", "--mf-sigma", "0.35", "--mf-sigma-floor", "0.35", "--modes", "single",
                  *BSD68_OPTIONS], 0.35, None),
    # And wider ones (floor 0.5 as by default).
    ("mf_s0.6", ["--conv", "mf", "--mf-sigma", "0.6", "--modes", "single", *FLOOR, *BSD68_OPTIONS], 0.5, None),
    ("mf_s0.75", ["--conv", "mf", "--mf-sigma", "0.75", "--modes", "single", *FLOOR, *BSD68_OPTIONS], 0.5, None),
]

FIELDS = ["config", "conv", "mf_sigma", "sigma_floor", "levels", "mode", "psnr_db", "delta_vs_single_db",
          "start_psnr_db", "work_units", "wall_clock_s", "iterations", "work_to_single_quality",
          "work_ratio", "time_to_single_quality_s", "time_ratio", "ratio_resolution", "options"]


def run_config(name, options, data, out, python, extra=()) -> dict:
    folder = os.path.join(out, name)
    summary = os.path.join(folder, "summary.json")
    if not os.path.exists(summary):
        argv = [*options, "--data", data, *extra, "--threads", "1", "--no-progress", "--no-tensorboard", "--out", folder]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        cmd = [python, "-m", "msconv", "compare", *argv]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, check=True)
    with open(summary) as f:
        return json.load(f)


def _against(folder, run, single) -> dict:
    """``run`` with its work / wall-clock to ``single``'s quality and the ratio's resolution, read
    from its validation history (compare's own rule: within 0.1 dB of single's final PSNR)."""
    from msconv.train.compare import ratio_resolution, to_single_quality

    with open(os.path.join(folder, run["mode"], "result.json")) as f:
        history = json.load(f)["val_history"]
    wu, t = to_single_quality(history, single["psnr"])
    return dict(run, work_units_to_single_quality=wu, wall_clock_to_single_quality_s=t,
                ratio_resolution=ratio_resolution(history, single["psnr"]))


def rows(name, options, sigma_floor, summary, folder, baseline=None) -> list[dict]:
    """One CSV row per mode; ``baseline`` (another configuration's summary) supplies single-scale."""
    cfg = summary["config"]
    by_mode = {r["mode"]: r for r in summary["runs"]}
    single = by_mode.get("single")
    runs = summary["runs"]
    if single is None and baseline is not None:
        single = next(r for r in baseline["runs"] if r["mode"] == "single")
        runs = [_against(folder, r, single) for r in runs]
    out = []
    for r in runs:
        wq, tq = r.get("work_units_to_single_quality"), r.get("wall_clock_to_single_quality_s")
        out.append({
            "config": name, "conv": r["conv"], "mf_sigma": cfg.get("mf_sigma") if r["conv"] == "mf" else "",
            "sigma_floor": "" if sigma_floor is None else sigma_floor, "levels": cfg["levels"], "mode": r["mode"],
            "psnr_db": round(r["psnr"], 3),
            "delta_vs_single_db": round(r["psnr"] - single["psnr"], 3) if single else "",
            "start_psnr_db": round(r["start_psnr"], 3), "work_units": round(r["work_units"], 1),
            "wall_clock_s": round(r["wall_clock_s"], 1), "iterations": r["iterations"],
            "work_to_single_quality": "" if wq is None else round(wq, 1),
            # compare's own ratio: single-scale's work to its own quality (within 0.1 dB of its
            # final PSNR) over the mode's.
            "work_ratio": round(single["work_units_to_single_quality"] / wq, 2) if (single and wq) else "",
            "time_to_single_quality_s": "" if tq is None else round(tq, 1),
            "time_ratio": round(single["wall_clock_to_single_quality_s"] / tq, 2) if (single and tq) else "",
            "ratio_resolution": "" if r.get("ratio_resolution") is None else round(r["ratio_resolution"], 2),
            "options": " ".join(options) + (f" (single: {baseline['config'].get('conv')} run of the baseline)"
                                             if baseline is not None and "single" not in by_mode else ""),
        })
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=("unseen", "bsd68"), default="unseen")
    p.add_argument("--data", default=None, help="training folder (default: /work/sweep/unseen; bsd68: Train400)")
    p.add_argument("--val", default=os.path.join(HERE, "..", "..", "shared", "data", "BSD68"),
                   help="bsd68: the BSD68 folder")
    p.add_argument("--out", default=os.path.join(HERE, "results", "mf_training"), help="output folder")
    p.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    args = p.parse_args(argv)
    configs, extra = CONFIGS, []
    if args.suite == "bsd68":
        configs = BSD68_CONFIGS
        args.data = args.data or os.path.join(os.path.dirname(os.path.abspath(args.val)), "Train400")
        extra = ["--val-data", bsd68_val_subset(args.val, "mf_val_")]
    args.data = args.data or "/work/sweep/unseen"
    names = [c[0] for c in configs]
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(names))
    if unknown:
        p.error(f"--only: unknown configuration(s) {unknown}; choose from {names}")
    os.makedirs(args.out, exist_ok=True)
    table, done = [], {}
    # The Conv2d baseline at the defaults (3 levels), run and committed before: read, not rerun.
    ref = os.path.join(HERE, "results", "defaults_unseen")
    if args.suite == "unseen" and os.path.exists(os.path.join(ref, "summary.json")):
        with open(os.path.join(ref, "summary.json")) as f:
            table += rows("std_l3 (results/defaults_unseen)", ["--conv", "standard", "--modes", "single,mge,fmg"],
                          None, json.load(f), ref)
    for name, options, floor, base in configs:
        folder = os.path.join(args.out, name)
        if only and name not in only:
            if not os.path.exists(os.path.join(folder, "summary.json")):
                continue
            with open(os.path.join(folder, "summary.json")) as f:
                done[name] = json.load(f)
        else:
            done[name] = run_config(name, options, args.data, args.out, sys.executable, extra)
        table += rows(name, options, floor, done[name], folder, done.get(base))
    path = os.path.join(args.out, "mf_training.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(table)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"data": args.data, "rows": table}, f, indent=2)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary_markdown(table, args.data))
    print(f"wrote {path}, summary.json, summary.md")
    return 0


def summary_markdown(table: list[dict], data: str) -> str:
    """One Markdown table of the rows: PSNR, ΔPSNR against the configuration's single-scale run, and
    the work / wall-clock ratios to single-scale quality (compare's own definitions)."""
    lines = [
        f"# MFConv2d in training: DnCNN 8x32, denoising σ 25, 1200 work units, data {data!r}",
        "",
        "ΔPSNR and ratios are against the configuration's single-scale run (for an fmg-only configuration, the",
        "baseline named in its options); 'x less work' = single's work to its own quality (within 0.1 dB of its",
        "final PSNR) over the mode's; — = never reached it, or single-scale did not learn.",
        "",
        "| config | conv | σ | σ floor | levels | mode | PSNR (dB) | ΔPSNR vs single | work to quality | x less work "
        "| x less time | wall-clock (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        sigma = r["mf_sigma"] if r["mf_sigma"] not in ("", None) else ("0.5" if r["conv"] == "mf" else "")
        lines.append(
            f"| {r['config']} | {r['conv']} | {sigma} | {r['sigma_floor']} | {r['levels']} | {r['mode']} "
            f"| {r['psnr_db']:.2f} | {r['delta_vs_single_db']:+.2f} | {r['work_to_single_quality'] or '—'} "
            f"| {r['work_ratio'] or '—'} | {r['time_ratio'] or '—'} | {r['wall_clock_s']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

"""Experiment 3: cost-to-quality — what Full-Multiscale needs to reach single-scale quality.

Every mode is trained to completion at budgets B, B/2, …, B/2^k work units (each run with its own
full schedule: warm-up, decay, and for Full-Multiscale all its stages), at 256² crops. The target
is single-scale's final validation PSNR at the largest budget B; for each mode we report the
smallest budget (and its training wall-clock) whose final PSNR is within 0.1 dB of it, and the
ratios single/mode of both — the target is ≥ 16× fewer work units and ≥ 8× less wall-clock.
The compare run at budget B also gives the within-run figure (work until the validation curve
first came within 0.1 dB).

Data: the bundled photographs at 256² crops (Train400's 180² images are too small for the 256²
bar), validation on BSD68 centre crops of 256². Denoising σ = 25, small DnCNN, standard conv,
``noise_restriction=preserve``, 4 grids (256² … 32²), Full-Multiscale iterations ×8 and batches ×2
per coarser stage (so each coarser stage gets 4× the work of the next finer one: work 64:16:4:1
from coarsest to finest, the fine stage about 1/85 of the budget).

    python bench/paper_curves.py [--budget 1600] [--halvings 5] [--modes single,fmg] [--tiny]
"""
from __future__ import annotations

import os

from _paper import data_paths, finish, out_dir, parser, rnd, run_all, tiny_overrides

from msconv.train.compare import QUALITY_TOLERANCE_DB
from msconv.train.config import TrainConfig

COLS = ["cell", "mode", "budget", "val_psnr", "wall_clock_s", "reaches_target", "x_less_work_vs_single",
        "x_less_time_vs_single"]


def needed(rows, mode, target):
    """(work units, wall-clock) of the cheapest run of ``mode`` within tolerance of ``target``."""
    ok = [r for r in rows if r["mode"] == mode and r["val_psnr"] != "" and r["val_psnr"] >= target - QUALITY_TOLERANCE_DB]
    if not ok:
        return None, None
    best = min(ok, key=lambda r: r["work_units"])
    return best["work_units"], best["wall_clock_s"]


def plot(rows, out, modes):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for mode in modes:
        rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["budget"])
        for ax, key in zip(axes, ("work_units", "wall_clock_s")):
            ax.plot([r[key] for r in rs], [r["val_psnr"] for r in rs], marker="o", label=mode)
    target = next(r["target_psnr"] for r in rows)
    for ax, label in zip(axes, ("fine-equivalent work units (whole run)", "training wall-clock (s, whole run)")):
        ax.axhline(target - QUALITY_TOLERANCE_DB, color="gray", ls="--", lw=1, label="single-scale quality − 0.1 dB")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("final validation PSNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "cost_to_quality.png")
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--halvings", type=int, default=5, help="budgets B, B/2, ..., B/2^halvings")
    p.add_argument("--modes", default="single,fmg")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--conv", default="standard")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--fmg-iteration-ratio", type=float, default=8.0,
                   help="Full-Multiscale: iterations x this per coarser stage (batches x 2): most work on coarse grids")
    args = p.parse_args(argv)
    name = "curves"
    out = out_dir(args, name)
    paths = data_paths(args, "Train400", "BSD68")
    if not args.tiny:
        paths["data"] = "bundled"  # 256² crops need images larger than Train400's 180²
    base = dict(task="denoise", noise_sigma=25.0, noise_restriction="preserve", model="dncnn", depth=6, width=16,
                conv=args.conv, crop=args.crop, val_crop=args.crop, batch_size=1, levels=args.levels, lr=2e-3,
                fmg_iteration_ratio=args.fmg_iteration_ratio, val_points=8, threads=args.threads, **paths)
    if args.tiny:
        base.update(tiny_overrides())
    top = args.budget or (base["budget"] if args.tiny else 1600.0)
    modes = args.modes.split(",")
    if "single" not in modes:
        modes = ["single"] + modes
    cells = [(f"budget{top / 2 ** k:g}", TrainConfig(**{**base, "budget": top / 2 ** k}).validated(), modes,
              {"budget": top / 2 ** k}) for k in range(args.halvings + 1)]
    rows, summaries = run_all(args, name, cells)
    target = next(r["val_psnr"] for r in rows if r["mode"] == "single" and r["budget"] == top)
    need = {m: needed(rows, m, target) for m in modes}
    for r in rows:
        b, t = need[r["mode"]]
        bs, ts = need["single"]
        r.update(target_psnr=target, reaches_target=r["val_psnr"] != "" and r["val_psnr"] >= target - QUALITY_TOLERANCE_DB,
                 mode_budget_to_target=b if b is not None else "", mode_time_to_target_s=t if t is not None else "",
                 x_less_work_vs_single=rnd(bs / b, 2) if b and bs else "",
                 x_less_time_vs_single=rnd(ts / t, 2) if t and ts else "")
    finish(args, out, name, rows, summaries[:1], COLS)
    print(f"\nplot: {plot(rows, out, modes)}")
    for m in modes:
        b, t = need[m]
        print(f"{m}: cheapest budget within {QUALITY_TOLERANCE_DB} dB of single@{top:g} ({target:.2f} dB): "
              f"{'never' if b is None else f'{b:g} WU, {t:.1f} s'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

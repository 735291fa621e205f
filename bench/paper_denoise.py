"""Experiment 1: denoising, the standard protocol (train Train400, test BSD68, σ = 15/25/50).

DnCNN with nn.Conv2d and with MFConv2d; single-scale, MGE and Full-Multiscale at the same budget
of fine-equivalent work units. Validation PSNR (BSD68 centre crops, the curves) during training,
test PSNR/SSIM on the full BSD68 images at the end; work units, FLOPs, wall-clock and the ratios
to single-scale (CSV, JSON and the per-cell quality-vs-work / quality-vs-time plots).

On this CPU the DnCNN is small (``--depth``/``--width``) and the budget short; the defaults finish
in about 25 minutes on one core. Multiscale denoising uses ``noise_restriction=preserve`` (every
grid sees the fine grid's noise level; see msconv.tasks.Denoise); the cell ``*_avgnoise`` repeats
σ = 25 with the default (noise restricted with the image) to show what that choice is worth.
Multiscale runs use 4 grids (128² … 16²) and Full-Multiscale iterations ×8 per coarser stage
(``--levels``, ``--fmg-iteration-ratio``; the default schedule is ``--levels 2
--fmg-iteration-ratio 2``, whose results are kept in bench/results/paper_denoise_L2r2/).

    python bench/paper_denoise.py [--sigmas 15,25,50] [--convs standard,mf] [--budget 800] [--tiny]
"""
from __future__ import annotations

from _paper import data_paths, finish, out_dir, parser, run_all, tiny_overrides

from msconv.train.config import TrainConfig

COLS = ["cell", "mode", "val_psnr", "test_psnr", "test_ssim", "dtest_vs_single", "work_units", "wall_clock_s",
        "work_to_single_quality", "x_less_work_to_quality", "x_less_time_to_quality"]


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--sigmas", default="15,25,50", help="noise levels on the 0-255 scale")
    p.add_argument("--convs", default="standard,mf", help="conv kinds: standard, mf")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--modes", default="single,mge,fmg")
    p.add_argument("--levels", type=int, default=3, help="coarser grids below the finest (mge, fmg)")
    p.add_argument("--fmg-iteration-ratio", type=float, default=8.0,
                   help="Full-Multiscale iterations x this per coarser stage (batches x 2); the default is 2")
    p.add_argument("--no-avgnoise", action="store_true", help="skip the σ=25 cell with the default noise restriction")
    args = p.parse_args(argv)
    name = "denoise"
    out = out_dir(args, name)
    base = dict(task="denoise", model="dncnn", depth=args.depth, width=args.width, crop=args.crop, batch_size=4,
                levels=args.levels, fmg_iteration_ratio=args.fmg_iteration_ratio,
                lr=2e-3, budget=args.budget or 800.0, val_crop=128, val_points=10, threads=args.threads,
                noise_restriction="preserve", **data_paths(args, "Train400", "BSD68", "BSD68"))
    if args.tiny:
        base.update(tiny_overrides())
    modes = args.modes.split(",")
    cells = [(f"sigma{s:g}_{c}", dict(noise_sigma=float(s), conv=c))
             for s in map(float, args.sigmas.split(",")) for c in args.convs.split(",")]
    if not args.no_avgnoise and 25.0 in [float(s) for s in args.sigmas.split(",")] and "standard" in args.convs:
        cells.append(("sigma25_standard_avgnoise", dict(noise_sigma=25.0, conv="standard", noise_restriction="average")))
    runs = []
    for cell, kw in cells:
        cfg = TrainConfig(**{**base, **kw}).validated()
        runs.append((cell, cfg, modes, {"sigma": kw["noise_sigma"], "noise_restriction": cfg.noise_restriction,
                                        "depth": args.depth, "width": args.width, "crop": cfg.crop, "budget": cfg.budget}))
    rows, summaries = run_all(args, name, runs)
    finish(args, out, name, rows, summaries, COLS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

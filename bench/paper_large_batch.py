"""Experiment 5: large batches on the coarse grids — SGD, Adam, LARS and LAMB.

Full-Multiscale over 3 grids (denoising σ = 25, Train400 → BSD68, small DnCNN, fine batch 4) with
the coarsest stage's batch 4×, 16× or 64× the fine one (per-level batch ratio 2, 4, 8) and the
same number of epochs: the per-level iteration ratio is 4 / batch ratio, so every stage sees
as many samples as with the default schedule, and the budget in work units is the same. Each
optimizer at its usual rate: SGD (momentum 0.9) with linear LR scaling per stage (LR × stage batch
/ fine batch) and 5% warm-up; Adam, LARS and LAMB at one LR for all stages (LARS and LAMB adapt
the step per layer; that is their point). A single-scale Adam run at the same budget is the
reference. Final test PSNR/SSIM on the full BSD68 images.

    python bench/paper_large_batch.py [--multipliers 4,16,64] [--optimizers sgd,adam,lars,lamb] [--budget 800] [--tiny]
"""
from __future__ import annotations

import math

from _paper import data_paths, finish, out_dir, parser, run_all, tiny_overrides

from msconv.train.config import TrainConfig

COLS = ["cell", "optimizer", "coarse_batch_x", "lr", "lr_batch_scaling", "mode", "val_psnr", "test_psnr", "test_ssim",
        "work_units", "iterations", "wall_clock_s"]
LR = {"sgd": 1e-2, "adam": 2e-3, "lars": 1.0, "lamb": 1e-2}
SCALING = {"sgd": "linear", "adam": "none", "lars": "none", "lamb": "none"}


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--multipliers", default="4,16,64", help="coarsest-stage batch / fine batch (levels=2: 4 ** k)")
    p.add_argument("--optimizers", default="sgd,adam,lars,lamb")
    args = p.parse_args(argv)
    name = "large_batch"
    out = out_dir(args, name)
    base = dict(task="denoise", noise_sigma=25.0, noise_restriction="preserve", model="dncnn", depth=6, width=16,
                crop=128, batch_size=4, levels=2, budget=args.budget or 800.0, val_crop=128, val_points=4,
                threads=args.threads, **data_paths(args, "Train400", "BSD68", "BSD68"))
    if args.tiny:
        base.update(tiny_overrides())
    specs = [("single_adam", "adam", None)] + [(f"{o}_x{m}", o, int(m)) for o in args.optimizers.split(",")
                                                for m in args.multipliers.split(",")]
    cells = []
    for cell, opt, mult in specs:
        kw = dict(optimizer=opt, lr=LR[opt])
        if mult is not None:
            ratio = math.sqrt(mult)  # per level, over levels = 2
            kw.update(fmg_batch_ratio=ratio, fmg_iteration_ratio=4.0 / ratio, lr_batch_scaling=SCALING[opt])
        cfg = TrainConfig(**{**base, **kw}).validated()
        cells.append((cell, cfg, ["single"] if mult is None else ["fmg"],
                      {"optimizer": opt, "coarse_batch_x": mult or 1, "lr": cfg.resolved_lr,
                       "lr_batch_scaling": cfg.lr_batch_scaling}))
    rows, summaries = run_all(args, name, cells)
    finish(args, out, name, rows, summaries, COLS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

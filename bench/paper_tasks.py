"""Experiment 2: deblurring and inpainting on BSD68, super-resolution ×2 on Set5/Set14 (ESPCN).

The same comparison as experiment 1 (single-scale, MGE and Full-Multiscale at one budget of
fine-equivalent work units), on the other restoration tasks. Training on Train400 crops;
deblurring (Gaussian blur σ = 1.6 reference pixels + noise σ = 2.55/255) and inpainting (25% of the
pixels missing in boxes and strokes; the mask is an input channel) are validated on BSD68 centre
crops and tested on the full BSD68 images with a small DnCNN; SR ×2 (bicubic) trains ESPCN,
validates on Set5 and tests on Set14 (luma, BT.601). Every task uses the same rule: corrupt at the
finest grid, restrict input and target alike. Multiscale runs use 4 grids and Full-Multiscale
iterations ×8 per coarser stage (``--levels``, ``--fmg-iteration-ratio``).

    python bench/paper_tasks.py [--tasks deblur,inpaint,sr2] [--budget 800] [--tiny]
"""
from __future__ import annotations

from _paper import data_paths, finish, out_dir, parser, run_all, tiny_overrides

from msconv.train.config import TrainConfig

COLS = ["cell", "mode", "val_psnr", "test_psnr", "test_ssim", "dtest_vs_single", "work_units", "wall_clock_s",
        "work_to_single_quality", "x_less_work_to_quality", "x_less_time_to_quality"]

CELLS = {
    "deblur": (dict(task="deblur", model="dncnn", depth=6, width=16, blur_sigma=1.6, noise_sigma=2.55),
               ("Train400", "BSD68", "BSD68")),
    "inpaint": (dict(task="inpaint", model="dncnn", depth=6, width=16, mask_fraction=0.25, mask_kind="mixed"),
                ("Train400", "BSD68", "BSD68")),
    "sr2": (dict(task="sr", model="espcn", width=32, sr_scale=2, sr_kernel="bicubic"), ("Train400", "Set5", "Set14")),
}


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--tasks", default="deblur,inpaint,sr2", help=f"comma-separated subset of {list(CELLS)}")
    p.add_argument("--modes", default="single,mge,fmg")
    p.add_argument("--levels", type=int, default=3, help="coarser grids below the finest (mge, fmg)")
    p.add_argument("--fmg-iteration-ratio", type=float, default=8.0,
                   help="Full-Multiscale iterations x this per coarser stage (batches x 2); the default is 2")
    args = p.parse_args(argv)
    name = "tasks"
    out = out_dir(args, name)
    cells = []
    for cell in args.tasks.split(","):
        if cell not in CELLS:
            raise SystemExit(f"--tasks: unknown task {cell!r}; choose from {list(CELLS)}")
        kw, folders = CELLS[cell]
        cfg = dict(crop=128, batch_size=4, levels=args.levels, fmg_iteration_ratio=args.fmg_iteration_ratio,
                   lr=2e-3, budget=args.budget or 800.0, val_crop=128, val_points=10,
                   threads=args.threads, **kw, **data_paths(args, *folders))
        if args.tiny:
            cfg.update(tiny_overrides(), width=8 if cell == "sr2" else 4)
        cfg = TrainConfig(**cfg).validated()
        cells.append((cell, cfg, args.modes.split(","), {"model": cfg.model, "train": folders[0], "val": folders[1],
                                                         "test": folders[2], "budget": cfg.budget}))
    rows, summaries = run_all(args, name, cells)
    finish(args, out, name, rows, summaries, COLS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Experiment 4: MGE gradient variance against cost on the real task (Train400 crops, σ = 25).

The paper's claim: MGE reaches single-scale gradient variance at a fraction of the fine-grid
work. bench/bench_mge.py measures it (R independent gradient draws per estimator at a fixed
initialisation of a 3-layer denoiser; single-scale, and MGE with fixed, paper and mlmc batch
allocation; plus the variance of each level-difference term); this script runs it on Train400
crops, with clean input (no noise) and with σ = 25 noise — restricted with the image (the
default) and with the noise level preserved on coarse grids (msconv.tasks.Denoise) — for
nn.Conv2d and MFConv2d. ``efficiency`` = how many times less work than single-scale the estimator
needs for the same variance (> 1: MGE pays).

    python bench/paper_variance.py [--draws 32] [--crop 64] [--tiny]
"""
from __future__ import annotations

import os

from _paper import data_paths, out_dir, parser

import bench_mge


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--draws", type=int, default=32)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--levels", type=int, default=2)
    args = p.parse_args(argv)
    out = out_dir(args, "variance")
    data = data_paths(args, "Train400", "BSD68")["data"]
    opts = ["--threads", str(args.threads), "--noise-restriction", "average,preserve",
            "--out", os.path.join(out, "variance.csv")]
    if args.tiny:
        opts += ["--quick", "--draws", "4", "--noise", "0,25"]
    else:
        opts += ["--data", data, "--draws", str(args.draws), "--crop", str(args.crop), "--levels", str(args.levels),
                 "--batch", "4", "--width", "16", "--noise", "0,25"]
    return bench_mge.main(opts)


if __name__ == "__main__":
    raise SystemExit(main())

"""Does multiscale training pay on volumes? Full-Multiscale against single-scale and the small-patch
baseline at equal work, 3-D denoising of the MNI ICBM152 T1 template (real MRI, nearly noise-free).

Train on the left part of the brain (sagittal index x < 90), validate on the right (x >= 106; a
16-voxel margin, so no training crop overlaps a validation voxel). Gaussian noise sigma = 25 on
the 0-255 scale. Model: a 3-D DnCNN (3x3x3 convolutions, residual), the same for every mode.
Work units: one forward+backward of one 32^3 sample on the fine grid = 1; a sample of v voxels on
any grid costs v / 32^3. Modes, each at the same budget, seed, optimizer (Adam 2e-3, 5% warm-up,
linear decay) and validation:

- single: 32^3 crops, batch 4 (the reference crop);
- small: 16^3 crops, batch 4 (the strongest 2-D baseline: small patches at equal work);
- fmg: Full-Multiscale over grids 1, 1/2, 1/4 (average restriction, 8 voxels per coarse voxel),
  each stage trained with the plain loss on its own grid, 16^3 patches of that grid's voxels
  (coarser stages see 2x / 4x more of the brain), batch 4, iterations x2 per coarser stage; the
  noise is drawn on each grid at the same sigma (the same problem at every resolution).

Writes bench/results/volume/{curves.csv, summary.csv, stage_timing.csv} (each stage's seconds per
work unit: a coarse step should cost what a fine one does per work unit) and prints the table.

    python bench/volume_fmg.py [--budget 1200] [--quick]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from _common import write_csv  # noqa: E402

from msconv.ops import restrict3d as restrict  # noqa: E402

REF = 32  # the reference crop side: one 32^3 sample = 1 work unit
SIGMA = 25.0 / 255.0


class DnCNN3d(nn.Module):
    """(N, 1, D, H, W) -> same: x minus the predicted noise, `depth` 3x3x3 layers of `width` channels."""

    def __init__(self, depth: int = 6, width: int = 16):
        super().__init__()
        layers = [nn.Conv3d(1, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv3d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
        layers += [nn.Conv3d(width, 1, 3, padding=1)]
        self.body = nn.Sequential(*layers)
        nn.init.zeros_(self.body[-1].weight)  # starts as the identity
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x):
        return x - self.body(x)


def load_volume(path: str) -> torch.Tensor:
    import nibabel as nib

    return torch.from_numpy(nib.load(path).get_fdata().astype("float32") / 255.0)[None]  # (1, X, Y, Z)


def crops(vol: torch.Tensor, n: int, side: int, g: torch.Generator) -> torch.Tensor:
    """n random side^3 crops of (1, X, Y, Z), random flips and axis permutations: (n, 1, side, side, side)."""
    _, X, Y, Z = vol.shape
    out = []
    for _ in range(n):
        i, j, k = (int(torch.randint(0, s - side + 1, (1,), generator=g)) for s in (X, Y, Z))
        c = vol[:, i:i + side, j:j + side, k:k + side]
        for axis in (1, 2, 3):
            if int(torch.randint(0, 2, (1,), generator=g)):
                c = c.flip(axis)
        perm = torch.randperm(3, generator=g).tolist()
        out.append(c.permute(0, *[p + 1 for p in perm]))
    return torch.stack(out).contiguous()


def restrict3d(x: torch.Tensor, levels: int) -> torch.Tensor:
    return restrict(x, "average", levels)


def plan(mode: str, budget: float, batch: int = 4, ratio: float = 2.0) -> list[dict]:
    """Stages: grid level, fine-voxel crop side, steps, batch; scaled so the work adds up to the budget."""
    if mode == "single":
        stages = [dict(level=0, side=REF, weight=1)]
    elif mode == "small":
        stages = [dict(level=0, side=16, weight=1)]
    else:  # fmg: coarse to fine, 16^3 grid voxels per sample, iterations x2 per coarser stage
        stages = [dict(level=l, side=16 * 2 ** l, weight=ratio ** l) for l in (2, 1, 0)]
    cost = [batch * (s["side"] // 2 ** s["level"]) ** 3 / REF ** 3 for s in stages]  # WU per step
    unit = budget / sum(s["weight"] * c for s, c in zip(stages, cost))
    for s, c in zip(stages, cost):
        s.update(steps=max(1, round(s["weight"] * unit)), batch=batch, wu_per_step=c)
    return stages


def add_noise(y: torch.Tensor, g: torch.Generator, kind: str) -> torch.Tensor:
    """Gaussian: y + σn. Rician (magnitude MRI): |y + σ(n1 + i n2)|, the modulus of complex Gaussian noise."""
    n1 = SIGMA * torch.randn(y.shape, generator=g)
    if kind == "gaussian":
        return y + n1
    return torch.sqrt((y + n1) ** 2 + (SIGMA * torch.randn(y.shape, generator=g)) ** 2)


def validate(model: nn.Module, pairs: list) -> float:
    model.eval()
    with torch.no_grad():
        mse = [float(F.mse_loss(model(x).clamp(0, 1), y)) for x, y in pairs]
    model.train()
    return sum(10 * math.log10(1 / m) for m in mse) / len(mse)


def run_mode(mode: str, train: torch.Tensor, pairs: list, budget: float, points: int, seed: int,
             ratio: float = 2.0, noise: str = "gaussian") -> list[dict]:
    torch.manual_seed(seed)
    model = DnCNN3d()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    stages = plan(mode, budget, ratio=ratio)
    total = sum(s["steps"] for s in stages)
    warm = max(1, int(0.05 * total))
    marks = [0.0] + [budget * 64.0 ** (-(points - j) / (points - 1)) for j in range(1, points + 1)]
    g, gn = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    rows = [dict(mode=mode, step=0, work_units=0.0, wall_clock_s=0.0, stage_level=stages[0]["level"],
                 val_psnr=validate(model, pairs))]
    work = wall = 0.0
    step, next_mark = 0, 1
    for s in stages:
        s["seconds"] = 0.0
        for _ in range(s["steps"]):
            lr = 2e-3 * ((step + 1) / warm if step < warm else max(0.0, 1 - (step - warm) / max(1, total - warm)))
            for group in opt.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            y = restrict3d(crops(train, s["batch"], s["side"], g), s["level"])
            x = add_noise(y, gn, noise)
            loss = F.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            wall += dt
            s["seconds"] += dt
            work += s["wu_per_step"]
            step += 1
            while next_mark <= points and work >= marks[next_mark] - 1e-9:
                next_mark += 1
                rows.append(dict(mode=mode, step=step, work_units=round(work, 3), wall_clock_s=round(wall, 3),
                                 stage_level=s["level"], val_psnr=validate(model, pairs)))
    if rows[-1]["step"] != step:
        rows.append(dict(mode=mode, step=step, work_units=round(work, 3), wall_clock_s=round(wall, 3),
                         stage_level=0, val_psnr=validate(model, pairs)))
    timing = [dict(mode=mode, level=s["level"], side_on_grid=s["side"] // 2 ** s["level"], steps=s["steps"],
                   batch=s["batch"], work_units=round(s["steps"] * s["wu_per_step"], 3), seconds=round(s["seconds"], 3),
                   ms_per_work_unit=round(1e3 * s["seconds"] / (s["steps"] * s["wu_per_step"]), 2)) for s in stages]
    return rows, timing


def first_reaching(rows: list[dict], target: float):
    for r in rows:
        if r["val_psnr"] >= target:
            return r
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--volume", default=os.path.join(ROOT, "..", "shared", "data", "volumes", "mni_icbm152_t1.nii.gz"))
    p.add_argument("--budget", type=float, default=1200.0)
    p.add_argument("--points", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="single,small,fmg")
    p.add_argument("--fmg-ratio", type=float, default=2.0, help="fmg: iterations ratio of each coarser stage")
    p.add_argument("--noise", choices=("gaussian", "rician"), default="gaussian",
                   help="rician: the magnitude of complex Gaussian noise, as in magnitude MRI")
    p.add_argument("--quick", action="store_true", help="budget 40, 3 points (checks that it runs)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "volume"))
    args = p.parse_args(argv)
    if args.quick:
        args.budget, args.points = 40.0, 3
    torch.set_num_threads(1)
    vol = load_volume(args.volume)
    train, val = vol[:, :90], vol[:, 106:]
    g = torch.Generator().manual_seed(1234)
    pairs = []
    for _ in range(4):  # four fixed 48^3 validation blocks of the held-out hemisphere, noised once
        y = crops(val, 1, 48, g)
        pairs.append((add_noise(y, g, args.noise), y))
    input_psnr = sum(10 * math.log10(1 / float(F.mse_loss(x.clamp(0, 1), y))) for x, y in pairs) / len(pairs)
    curves, timing = [], []
    for mode in args.modes.split(","):
        rows, t = run_mode(mode, train, pairs, args.budget, args.points, args.seed, args.fmg_ratio, args.noise)
        curves += rows
        timing += t
        print(f"{mode}: {curves[-1]['val_psnr']:.2f} dB at {curves[-1]['work_units']:.0f} WU, {curves[-1]['wall_clock_s']:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    tag = "_quick" if args.quick else ""
    write_csv(curves, os.path.join(args.out, f"curves{tag}.csv"))
    write_csv(timing, os.path.join(args.out, f"stage_timing{tag}.csv"))
    finals = {m: [r for r in curves if r["mode"] == m][-1] for m in args.modes.split(",")}
    baselines = [m for m in finals if m != "fmg"] or list(finals)
    best = max(baselines, key=lambda m: finals[m]["val_psnr"])
    summary = []
    for m, f in finals.items():
        hit = first_reaching([r for r in curves if r["mode"] == m], finals[best]["val_psnr"])
        summary.append(dict(mode=m, val_psnr=round(f["val_psnr"], 3), delta_vs_best_baseline=round(f["val_psnr"] - finals[best]["val_psnr"], 3),
                            work_units=f["work_units"], wall_clock_s=f["wall_clock_s"],
                            work_to_best_baseline_quality=hit["work_units"] if hit else None,
                            x_less_work=round(finals[best]["work_units"] / hit["work_units"], 2) if hit and hit["work_units"] else None,
                            x_less_time=round(finals[best]["wall_clock_s"] / hit["wall_clock_s"], 2) if hit and hit["wall_clock_s"] else None,
                            best_baseline=best, input_psnr=round(input_psnr, 3), budget=args.budget, seed=args.seed,
                            fmg_ratio=args.fmg_ratio, noise=args.noise))
    path = write_csv(summary, os.path.join(args.out, f"summary{tag}.csv"))
    for r in summary:
        print(r)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Diagnostic: does what a network learns on a coarse grid transfer to the fine grid?

Train a small DnCNN on one grid only — level 0 (the fine grid), 1 or 2 (crops restricted 2× or
4×) — for the same budget of fine-equivalent work units, then measure its PSNR at the *fine*
grid (BSD68 centre crops, σ = 25). This is what Full-Multiscale relies on: its coarse stages are
worth their cost only if the model they produce is already good on the finer grids. Rows:
standard and mesh-free convolutions (``mf_floor``: with ``sigma_floor=0.5``, grids too coarse for σ
apply the finest resolved grid's stencil in their own pixels), noise restricted with the image (the default,
``average``: std σ/2^l on level l) or preserved (``preserve``: the same draw at std σ on every
grid; msconv.tasks.Denoise). The loop is msconv.MGE(levels=0, base_level=l) — the plain loss on
grid l, in grid_scale(2^l) — with Adam and a warm-up + linear decay schedule.

    python bench/paper_transfer.py [--budget 400] [--tiny]
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from _paper import data_paths, out_dir, parser

import msconv
from _common import env_columns, table, write_csv
from msconv.data import CropSampler, load_dataset
from msconv.models import build_model
from msconv.multilevel import MGE
from msconv.optim import WarmupPolyLR
from msconv.tasks import Denoise
from msconv.train.metrics import psnr_ssim

COLS = ["conv", "noise_restriction", "train_level", "work_units", "steps", "fine_psnr", "input_psnr", "seconds"]


def train_on_level(conv, how, level, budget, data, val, crop, depth, width, seed=0):
    torch.manual_seed(seed)
    floor = {"mf_floor": 0.5}.get(conv)  # mf_floor: MFConv2d(sigma_floor=0.5), the CLI's default
    model = build_model("dncnn", 1, 1, "mf" if floor else conv, depth=depth, width=width, mf_sigma_floor=floor)
    task = Denoise(25.0, noise_restriction=how)
    batch = 4 * 4**level  # the same samples-per-step cost at every level: 4 fine-equivalent work units
    est = MGE(0, batch, base_level=level, count_flops=False, pyramid_fn=task.pyramid_pair)
    steps = max(1, round(budget / est.step_work(est.batch_sizes)))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = WarmupPolyLR(opt, max(1, steps // 20), steps, 1.0)
    crops, g = CropSampler(data, crop, seed=seed), torch.Generator().manual_seed(seed + 1)
    t0, work = time.perf_counter(), 0.0
    for _ in range(steps):
        x, y = task.corrupt(crops.next_batch(batch), g)
        opt.zero_grad(set_to_none=True)
        est.backward(est.loss(model, F.mse_loss, [(x, y)]))
        opt.step()
        sched.step()
        work += est.last_cost.work_units
    secs = time.perf_counter() - t0
    model.eval()
    ps, ins = [], []
    with torch.no_grad(), msconv.grid_scale(1.0):
        for xv, yv in val:
            ps.append(psnr_ssim(model(xv)[0], yv[0])[0])
            ins.append(psnr_ssim(xv[0], yv[0])[0])
    return {"work_units": round(work, 1), "steps": steps, "fine_psnr": round(sum(ps) / len(ps), 3),
            "input_psnr": round(sum(ins) / len(ins), 3), "seconds": round(secs, 2)}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    labels = [f"{r['conv']}\nL{r['train_level']} {r['noise_restriction'] if r['train_level'] else ''}" for r in rows]
    ax.bar(range(len(rows)), [r["fine_psnr"] for r in rows], color=[{"standard": "C0", "mf": "C1"}.get(r["conv"], "C2") for r in rows])
    ax.axhline(rows[0]["input_psnr"], color="gray", ls="--", lw=1, label="noisy input")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("PSNR at the fine grid (dB)")
    ax.set_ylim(min(r["fine_psnr"] for r in rows) - 1, max(r["fine_psnr"] for r in rows) + 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--convs", default="standard,mf,mf_floor")
    p.add_argument("--levels", default="0,1,2")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = out_dir(args, "transfer")
    paths = data_paths(args, "Train400", "BSD68")
    train, val_set = load_dataset(paths["data"], paths["val_data"])
    crop, side, depth, width = (32, 32, 2, 4) if args.tiny else (128, 128, 6, 16)
    budget = args.budget or (8.0 if args.tiny else 400.0)
    g = torch.Generator().manual_seed(2)
    val = []
    for im in val_set.images[: 4 if args.tiny else None]:
        h, w = im.shape[1:]
        y = im[:, (h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2].unsqueeze(0)
        val.append(Denoise(25.0).corrupt(y, g))
    env = env_columns(torch.device("cpu"))
    rows = []
    for conv in args.convs.split(","):
        for level in map(int, args.levels.split(",")):
            for how in (["average"] if level == 0 else ["average", "preserve"]):
                r = train_on_level(conv, how, level, budget, train, val, crop, depth, width)
                rows.append({"conv": conv, "noise_restriction": how, "train_level": level, **r, "budget": budget,
                             "crop": crop, "depth": depth, "width": width, **env})
                print(f"{conv} level {level} {how}: {r['fine_psnr']:.2f} dB at the fine grid", flush=True)
    path = write_csv(rows, f"{out}/transfer.csv")
    print(table(rows, COLS))
    print(f"\nwrote {path} and {plot(rows, f'{out}/transfer.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Gradient variance against cost: single-scale vs MGE (fixed, paper, mlmc).

For each model (nn.Conv2d, and MFConv2d when msconv has it) and input (clean photographs, and
the same with white noise of σ/255 — the denoising task, ``--noise``), draw R independent gradient
estimates at a fixed random initialisation and measure

* ``grad_var``  — total variance of one step's gradient estimate, Σ_params Var[ĝ] over the draws;
* ``work_units``, ``flops`` (forward + measured backward), ``seconds`` — mean cost of one step;
* ``efficiency`` — (grad_var · work)_single / (grad_var · work)_estimator: how many times less
  work the estimator needs for the single-scale variance (Monte Carlo variance ∝ 1/work);
* ``bias_z`` — max over parameters of |mean ĝ − mean ĝ_single| in standard errors (a sanity
  column: MGE is unbiased, so it stays at a few units; the max over ~10³ parameters of |z| is
  about 3.5 for an unbiased estimator, more for mlmc whose tiny fine batches are heavy-tailed).
* rows ``diff`` (``levels`` = l): the variance of the level-difference term alone,
  ∇ℓ(level l) − ∇ℓ(level l+1) on one batch of ``--batch`` samples — the quantity that decides
  whether MGE pays: it must be far below the single-scale variance and shrink towards the fine
  grid. White noise keeps it large on fine levels for a standard convolution.

Data: scikit-image's bundled photographs (msconv.data.bundled_images), random crops and
flips (msconv.data.CropSampler), noise from msconv.tasks.Denoise; nothing is downloaded.
CSV into bench/results/mge_cpu[_quick].csv and a log-log plot of variance against work next
to it (.png).

    python bench/bench_mge.py [--quick] [--draws R] [--crop 64] [--levels 3] [--batch 4] [--noise 0,25,75] [--out FILE]
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, bench_parser, env_columns, size_tag, table, write_csv  # noqa: E402

import msconv  # noqa: E402
from msconv.data import CropSampler, bundled_images, load_folder  # noqa: E402
from msconv.multilevel import MGE, MLMC  # noqa: E402
from msconv.tasks import Denoise  # noqa: E402

ESTIMATORS = ("single", "fixed", "paper", "mlmc")


def build_model(kind: str, width: int, seed: int = 0) -> nn.Module:
    """A 3-layer fully convolutional denoiser at a fixed random initialisation."""
    torch.manual_seed(seed)
    conv = nn.Conv2d if kind == "conv2d" else msconv.MFConv2d
    return nn.Sequential(conv(1, width, 3, padding=1), nn.ReLU(), conv(width, width, 3, padding=1), nn.ReLU(),
                         conv(width, 1, 3, padding=1))


def estimator_for(name: str, levels: int, batch: int, paper_work: float, pyramid_fn=None) -> MGE:
    if name == "single":
        return MGE(0, batch)
    if name == "fixed":
        return MGE(levels, [batch] * (levels + 1), pyramid_fn=pyramid_fn)
    if name == "paper":
        return MGE(levels, batch, allocation="paper", pyramid_fn=pyramid_fn)
    # Giles' allocation under the same per-step work as the paper allocation.
    return MGE(levels, [batch] * (levels + 1), allocation=MLMC(budget=paper_work, warmup_steps=3), pyramid_fn=pyramid_fn)


def one_draw(est: MGE, model: nn.Module, crops: CropSampler, task: Denoise, g: torch.Generator) -> torch.Tensor:
    batches = [task.corrupt(crops.next_batch(n), g) for n in est.batch_sizes]
    model.zero_grad(set_to_none=True)
    est.backward(est.loss(model, None, batches))
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def level_difference_rows(model, crops, task, g, levels: int, batch: int, draws: int) -> list[dict]:
    """Variance of ∇ℓ_l − ∇ℓ_{l+1} on one batch, for l < levels (same samples on both grids)."""
    def level_loss(x, y, level):
        xl, yl = task.restrict_pair(x, y, level)
        with msconv.grid_scale(2.0**level):
            return nn.functional.mse_loss(model(xl), yl)

    out = []
    grads = [[] for _ in range(levels)]
    for _ in range(draws):
        x, y = task.corrupt(crops.next_batch(batch), g)
        for l in range(levels):
            model.zero_grad(set_to_none=True)
            (level_loss(x, y, l) - level_loss(x, y, l + 1)).backward()
            grads[l].append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    for l in range(levels):
        out.append({"level": l, "grad_var": torch.stack(grads[l]).var(0).sum().item(),
                    "work": batch * (4.0**-l + 4.0 ** -(l + 1))})
    return out


def measure(est: MGE, model, crops, task, g, draws: int, warmup: int) -> dict:
    for _ in range(warmup):  # mlmc: learn the level variances before measuring
        one_draw(est, model, crops, task, g)
    grads, work, flops, secs, sizes = [], 0.0, 0, [], None
    for _ in range(draws):
        t0 = time.perf_counter()
        grads.append(one_draw(est, model, crops, task, g))
        secs.append(time.perf_counter() - t0)
        c = est.last_cost
        work += c.work_units / draws
        flops += c.flops / draws
        sizes = c.batch_sizes
    return {"grads": torch.stack(grads), "work": work, "flops": flops,
            "seconds": sorted(secs)[len(secs) // 2], "sizes": sizes}


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    photos = load_folder(args.data) if args.data else bundled_images(gray=True)
    models = ["conv2d"] + (["mfconv2d"] if hasattr(msconv, "MFConv2d") else [])
    if len(models) == 1:
        print("MFConv2d not available: the mfconv2d rows are skipped", file=sys.stderr)
    paper_work = MGE(args.levels, args.batch, allocation="paper").step_work()
    env = env_columns(device)
    rows = []
    for model_kind in models:
        model = build_model(model_kind, args.width)
        for noise, how in [(n, r) for n in args.noise for r in (args.noise_restriction if n else ["average"])]:
            task = Denoise(noise, noise_restriction=how)
            results = {}
            for name in ESTIMATORS:
                crops = CropSampler(photos, args.crop, seed=1)
                g = torch.Generator().manual_seed(2)
                est = estimator_for(name, args.levels, args.batch, paper_work, task.pyramid_pair)
                results[name] = measure(est, model, crops, task, g, args.draws, 4 if name == "mlmc" else 1)
            ref = results["single"]
            ref_vw = ref["grads"].var(0).sum().item() * ref["work"]
            for name, r in results.items():
                var = r["grads"].var(0)
                se = (var / args.draws + ref["grads"].var(0) / args.draws).sqrt()
                bias_z = ((r["grads"].mean(0) - ref["grads"].mean(0)).abs() / (se + 1e-30)).max().item()
                gv = var.sum().item()
                rows.append({
                    "model": model_kind, "input": (f"noise{noise:g}" + ("-preserve" if how == "preserve" else ""))
                    if noise else "clean", "noise_sigma": noise, "noise_restriction": how if noise else "",
                    "estimator": name, "levels": 0 if name == "single" else args.levels,
                    "batch_sizes": "/".join(map(str, r["sizes"])), "crop": args.crop, "draws": args.draws,
                    "grad_var": f"{gv:.4e}", "work_units": round(r["work"], 4), "flops": int(r["flops"]),
                    "seconds": round(r["seconds"], 5), "var_x_work": f"{gv * r['work']:.4e}",
                    "efficiency": round(ref_vw / (gv * r["work"]), 3), "bias_z": round(bias_z, 2), **env,
                })
            crops, g = CropSampler(photos, args.crop, seed=1), torch.Generator().manual_seed(3)
            for d in level_difference_rows(model, crops, task, g, args.levels, args.batch, args.draws):
                rows.append({**rows[-1], "estimator": "diff", "levels": d["level"], "batch_sizes": str(args.batch),
                             "grad_var": f"{d['grad_var']:.4e}", "work_units": d["work"], "flops": "", "seconds": "",
                             "var_x_work": f"{d['grad_var'] * d['work']:.4e}",
                             "efficiency": round(ref_vw / (d["grad_var"] * d["work"]), 3), "bias_z": ""})
    return rows


def plot(rows: list[dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = sorted({(r["model"], r["input"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (m, inp) in zip(axes[0], panels):
        sub = [r for r in rows if r["model"] == m and r["input"] == inp]
        single = next(r for r in sub if r["estimator"] == "single")
        # The single-scale line: variance ∝ 1/work through the measured single-scale point.
        w = [single["work_units"] * 2**k for k in range(-1, 6)]
        ax.loglog(w, [float(single["grad_var"]) * single["work_units"] / x for x in w], "k--", lw=0.8,
                  label="single-scale, var ∝ 1/work")
        for r in sub:
            name = f"diff l={r['levels']}" if r["estimator"] == "diff" else r["estimator"]
            ax.loglog(r["work_units"], float(r["grad_var"]), "x" if r["estimator"] == "diff" else "o",
                      label=f"{name} ({r['batch_sizes']})")
        ax.set_title(f"{m}, {inp} input")
        ax.set_xlabel("work units per step (fine fwd+bwd)")
        ax.set_ylabel("gradient variance per step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = bench_parser(__doc__, "mge", "small crops and few draws (about a minute on 2 cores)")
    p.add_argument("--draws", type=int, help="independent gradient draws per estimator")
    p.add_argument("--crop", type=int, help="finest-grid crop size")
    p.add_argument("--levels", type=int, help="coarser levels below the finest")
    p.add_argument("--batch", type=int, help="single-scale batch = MGE finest-level batch")
    p.add_argument("--width", type=int, help="channels of the hidden layers")
    p.add_argument("--noise", type=lambda v: [float(t) for t in v.split(",")],
                   help="noise levels on the 0-255 scale, comma separated (0 = clean input)")
    p.add_argument("--noise-restriction", type=lambda v: v.split(","), default=["average"],
                   help="how noise reaches coarse grids (msconv.tasks.Denoise): average, preserve or both, comma separated")
    p.add_argument("--data", help="a folder of training images (default: the bundled photographs)")
    p.add_argument("--threads", type=int, default=min(torch.get_num_threads(), 2))
    args = p.parse_args(argv)
    quick = {"draws": 16, "crop": 32, "levels": 2, "batch": 4, "width": 8, "noise": [0.0, 50.0]}
    smoke = {"draws": 2, "crop": 8, "levels": 1, "batch": 4, "width": 2, "noise": [50.0]}
    full = {"draws": 96, "crop": 64, "levels": 3, "batch": 4, "width": 16, "noise": [0.0, 25.0, 75.0]}
    for k, v in (smoke if args.smoke else quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.crop % 2**args.levels:
        p.error(f"--crop {args.crop} must be divisible by 2**levels = {2**args.levels} so every level has whole cells")
    rows = run(args)
    out = args.out or os.path.join(RESULTS, f"mge_cpu{size_tag(args)}.csv")
    write_csv(rows, out)
    png = plot(rows, os.path.splitext(out)[0] + ".png")
    print(table(rows, ["model", "input", "estimator", "levels", "batch_sizes", "grad_var", "work_units", "flops", "seconds",
                       "efficiency", "bias_z"]))
    print(f"\nwrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

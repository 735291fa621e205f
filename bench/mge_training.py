"""MGE in training: `msconv compare` with the gradient variance of MGE logged against single-scale's.

Runs exactly what ``msconv compare <options>`` runs (the options after ``--`` are its options, the
defaults included) and, for every MGE run, logs along training:

* with ``--allocation matched``, the allocation's own figures at every re-estimation: the level
  variances V_l, single-scale's per-sample variance V_single (both from half batches), the sizes
  N_l, the predicted estimator variance ``Σ V_l / N_l`` and its target ``V_single / B``;
* every ``--check-every`` steps (any allocation), an independent measurement at the current
  weights: per-sample variances of every level term and of the single-scale gradient from
  ``--draws`` fresh one-sample draws each, on crops from a sampler of its own (the run's data
  stream and wall-clock are untouched); MGE's variance at the current sizes ``Σ V_l / N_l``
  against single-scale's ``V_single / B``, and the least work per step that could match it
  (``predicted_work_ratio`` = (Σ sqrt(V_l C_l))² / V_single, the frontier: < 1 means MGE can pay).

Writes OUT/variance.csv, OUT/variance.png (variance ratio and per-step work against training
steps) besides compare's own OUT/summary.{json,md} and plots.

    python bench/mge_training.py --out bench/results/mge_training/matched --check-every 50 -- \\
        --modes single,mge --allocation matched --data /work/sweep/unseen --threads 1 --no-progress
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import torch
import torch.nn.functional as F

FIELDS = ["mode", "allocation", "source", "step", "work_units", "wall_clock_s", "batch_sizes", "variance",
          "single_variance", "ratio", "target", "level_variances", "single_sample_variance", "work_per_step",
          "single_work_per_step", "predicted_work_ratio", "draws"]


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().double().flatten() for p in model.parameters() if p.grad is not None])


def _trace_cov(samples: list[torch.Tensor]) -> float:
    g = torch.stack(samples)
    return float(g.var(dim=0, unbiased=True).sum())


def independent_check(trainer, levels: int, draws: int, sampler, gen) -> tuple[list[float], float]:
    """Per-sample variances from ``draws`` fresh one-sample draws at the model's current weights:
    ``([V_0 … V_L], V_single)``, V_l of MGE's level-l term (fine minus coarse evaluation of one
    sample; the coarsest level's own gradient), V_single of the plain fine gradient. The levels
    are independent, so MGE's variance at sizes N_l is ``Σ V_l / N_l`` and single-scale's
    ``V_single / B``."""
    from msconv import grid_scale

    cfg, model, task = trainer.cfg, trainer.model, trainer.task
    samples: list[list[torch.Tensor]] = [[] for _ in range(levels + 2)]
    for _ in range(draws):
        for l in range(levels + 2):  # l = levels + 1: single-scale
            x, y = task.corrupt_on_grid(sampler.next_batch(1), gen, 0, cfg.restriction)
            lo = 0 if l > levels else l
            depth = lo + (1 if l < levels else 0)
            xs, ys = task.pyramid_pair(x.to(trainer.device), y.to(trainer.device), depth, cfg.restriction)
            model.zero_grad(set_to_none=True)
            with grid_scale(2.0 ** lo):
                loss = F.mse_loss(model(xs[lo]), ys[lo])
            if l < levels:
                with grid_scale(2.0 ** (lo + 1)):
                    loss = loss - F.mse_loss(model(xs[lo + 1]), ys[lo + 1])
            loss.backward()
            samples[l].append(_flat_grad(model))
    model.zero_grad(set_to_none=True)
    v = [_trace_cov(s) for s in samples]
    return v[:-1], v[-1]


class VarianceLog:
    """``on_step`` hook for :func:`msconv.train.compare.compare`: rows of variance figures."""

    def __init__(self, check_every: int, draws: int) -> None:
        self.rows: list[dict] = []
        self.check_every, self.draws = check_every, draws
        self._seen: set = set()
        self._sampler = None

    def __call__(self, trainer, step: int) -> None:
        cfg = trainer.cfg
        if cfg.mode != "mge":
            return
        est = trainer.estimators[0]
        alloc = est.allocation
        base = {"mode": cfg.mode, "allocation": alloc.name, "step": step, "work_units": trainer.state.work_units,
                "wall_clock_s": trainer.state.wall_clock_s}
        last = getattr(alloc, "last", None)
        if last is not None and (id(trainer), last["step"]) not in self._seen:
            self._seen.add((id(trainer), last["step"]))
            self.rows.append({**base, "source": "allocation", "batch_sizes": " ".join(map(str, last["batch_sizes"])),
                              "variance": last["variance"], "single_variance": last["target"],
                              "ratio": last["variance"] / last["target"], "target": last["target"],
                              "level_variances": " ".join(f"{v:.4g}" for v in last["variances"]),
                              "single_sample_variance": last["single_variance"],
                              "work_per_step": last["work_per_step"], "single_work_per_step": last["single_work_per_step"],
                              "predicted_work_ratio": last["predicted_work_ratio"]})
        if self.check_every and (step == 1 or step % self.check_every == 0):
            from msconv.data import CropSampler

            if self._sampler is None or self._sampler[0] is not trainer:
                self._sampler = (trainer, CropSampler(trainer.train_set, cfg.crop, seed=cfg.seed + 1000),
                                 torch.Generator().manual_seed(cfg.seed + 1001))
            _, sampler, gen = self._sampler
            sizes = list(est.batch_sizes)
            v, vs = independent_check(trainer, est.levels, self.draws, sampler, gen)
            fine = est.level_work()[-1] * 4.0 ** est.levels
            costs = [c / fine for c in est.level_work()]
            v_mge, v_single = sum(vl / n for vl, n in zip(v, sizes)), vs / cfg.batch_size
            best = sum((vl * c) ** 0.5 for vl, c in zip(v, costs)) ** 2 / vs
            self.rows.append({**base, "source": "independent", "batch_sizes": " ".join(map(str, sizes)),
                              "variance": v_mge, "single_variance": v_single, "ratio": v_mge / v_single,
                              "level_variances": " ".join(f"{x:.4g}" for x in v), "single_sample_variance": vs,
                              "work_per_step": est.step_work(sizes) / fine, "predicted_work_ratio": best,
                              "single_work_per_step": float(cfg.batch_size), "draws": self.draws})
            print(f"[variance] {alloc.name} step {step}: sizes {sizes}, MGE/single variance {v_mge / v_single:.3f}, "
                  f"work per step {est.step_work(sizes) / fine:.2f} vs {cfg.batch_size}; V_l/V_single "
                  f"{[round(x / vs, 4) for x in v]}; best matched work ratio {best:.3f}", flush=True)

    def write(self, out: str) -> None:
        with open(os.path.join(out, "variance.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, FIELDS)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: r.get(k, "") for k in FIELDS})
        plot(self.rows, os.path.join(out, "variance.png"))


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for source, marker in (("allocation", "."), ("independent", "o")):
        rs = [r for r in rows if r["source"] == source]
        for alloc in sorted({r["allocation"] for r in rs}):
            pts = [r for r in rs if r["allocation"] == alloc]
            a.plot([r["step"] for r in pts], [r["ratio"] for r in pts], marker=marker, ls="-" if source == "independent" else ":",
                   label=f"{alloc}: {'measured, fresh draws' if source == 'independent' else 'Σ V_l/N_l over V_single/B'}")
            b.plot([r["step"] for r in pts], [r["work_per_step"] / r["single_work_per_step"] for r in pts], marker=marker,
                   ls="-" if source == "independent" else ":", label=alloc + (" (at checks: a measuring step, every level >= 2)" if source == "independent" else " (after each re-estimation)"))
    a.axhline(1.0, color="k", lw=0.8)
    a.axhspan(0.8, 1.2, color="g", alpha=0.1, label="±20%")
    a.set_xlabel("training step")
    a.set_ylabel("MGE gradient variance / single-scale's")
    a.set_yscale("log")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    b.axhline(1.0, color="k", lw=0.8)
    b.set_xlabel("training step")
    b.set_ylabel("MGE work per step / single-scale's")
    b.legend(fontsize=7)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summarize(dirs: list[str], out: str) -> str:
    """One table over several runs of this script (e.g. one per allocation) and the frontier plot:
    the least work per step at which MGE could have matched single-scale's variance, from the
    independent checks, against training steps."""
    import json
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| allocation | PSNR (dB) | ΔPSNR vs single | work units | wall-clock (s) | iterations | work to single quality "
             "| MGE variance / single's (checks: median, range) | least matched work / single's (median, range) |",
             "|---|---|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for d in dirs:
        with open(os.path.join(d, "summary.json")) as fh:
            runs = {r["mode"]: r for r in json.load(fh)["runs"]}
        with open(os.path.join(d, "variance.csv")) as fh:
            checks = [r for r in csv.DictReader(fh) if r["source"] == "independent"]
        name = os.path.basename(os.path.normpath(d))
        single, mge = runs.get("single"), runs.get("mge")
        if single and "single" not in [line.split(" | ")[0][2:] for line in lines[2:]]:
            lines.append(f"| single | {single['psnr']:.2f} | +0.00 | {single['work_units']:.0f} | {single['wall_clock_s']:.1f} "
                         f"| {single['iterations']} | {single['work_units_to_single_quality']:.0f} | 1 | 1 |")
        ratio = [float(r["ratio"]) for r in checks]
        best = [float(r["predicted_work_ratio"]) for r in checks]
        wq = mge.get("work_units_to_single_quality") if mge else None

        def rng(x):
            return f"{statistics.median(x):.2f} ({min(x):.2f}-{max(x):.2f})" if x else "—"

        if mge:
            lines.append(f"| mge {name} | {mge['psnr']:.2f} | {mge['psnr'] - single['psnr']:+.2f} | {mge['work_units']:.0f} "
                         f"| {mge['wall_clock_s']:.1f} | {mge['iterations']} | {'not reached' if wq is None else f'{wq:.0f}'} "
                         f"| {rng(ratio)} | {rng(best)} |")
        ax.plot([int(r["step"]) for r in checks], best, marker="o", label=f"during MGE {name} training")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("least work to match single-scale variance / its work")
    ax.set_title("MGE pays below 1", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"))
    plt.close(fig)
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write(table)
    return table


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (compare's --out)")
    p.add_argument("--check-every", type=int, default=50, help="independent variance check every this many steps (0: off)")
    p.add_argument("--draws", type=int, default=12, help="gradient draws per estimator in a check")
    p.add_argument("--summarize", nargs="+", metavar="DIR", help="only tabulate earlier runs' folders into --out "
                   "(table.md, frontier.png)")
    args = p.parse_args(own)
    if args.summarize:
        os.makedirs(args.out, exist_ok=True)
        print(summarize(args.summarize, args.out))
        return 0

    from msconv.cli import _config_from_args, build_parser
    from msconv.train.compare import compare, summary_markdown

    cargs = build_parser().parse_args(["compare", *rest, "--out", args.out])
    cfg = _config_from_args(cargs)
    modes = [m for m in cargs.modes.replace(" ", "").split(",") if m]
    log = VarianceLog(args.check_every, args.draws)
    s = compare(cfg, modes, on_step=log)
    log.write(args.out)
    print(summary_markdown(s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Experiment 5: large batches on the coarse grids — SGD, Adam, LARS and LAMB, each at its best rate.

Full-Multiscale over 3 grids (denoising σ = 25, Train400 → BSD68, small DnCNN, fine batch 4) with
the coarsest stage's batch 4×, 16× or 64× the fine one (per-level batch ratio 2, 4, 8) and the
same number of epochs: the per-level iteration ratio is 4 / batch ratio, so every stage sees
as many samples as with the default schedule, and the budget in work units is the same. Every
optimizer also runs single-scale at each rate, the reference its Full-Multiscale runs are read
against.

Rates: ``--lrs default`` runs each optimizer at the CLI's default rate; ``--lrs sweep`` runs a log
grid per optimizer (GRID below) and adds a table of each optimizer at its best rate (by final
validation PSNR, per schedule) to the JSON and a ``*_best.csv``. Per-stage LR rule on the coarse
stages (``lr_batch_scaling``): SGD ``sqrt`` (measured: ``linear`` takes the 64× stage to 64× the
rate), the others ``none`` (Adam normalises its step; LARS and LAMB set it per layer from ‖w‖).

LARS and LAMB run with ``norm_floor`` (default 1.0: a zero-initialised layer such as DnCNN's last
conv is moved against the norm a He-initialised tensor of its shape would have, instead of the
paper's λ = 1 fallback), and LARS adapts the biases too, against a unit-RMS reference norm
(``exclude_1d=False``); ``--norm-floor 0`` is the paper's update with biases excluded, what the
trainer passed before.

    python bench/paper_large_batch.py [--lrs default|sweep] [--multipliers 4,16,64]
        [--optimizers sgd,adam,lars,lamb] [--budget 800] [--crop 128] [--norm-floor 1] [--tiny]
"""
from __future__ import annotations

import contextlib
import json
import math
import os

from _paper import data_paths, finish, out_dir, parser, rows_of, run_cell, runs_dir, tiny_overrides
from _common import table, write_csv

import msconv.optim
from msconv.train.config import DEFAULT_LR, TrainConfig

COLS = ["cell", "model", "optimizer", "coarse_batch_x", "lr", "lr_batch_scaling", "mode", "val_psnr", "test_psnr",
        "test_ssim", "work_units", "iterations", "wall_clock_s"]
# Log grids (half-decades) around each optimizer's usual rate.
GRID = {"adam": [3e-4, 1e-3, 3e-3, 1e-2], "sgd": [1e-2, 3e-2, 1e-1, 3e-1],
        "lars": [0.3, 1.0, 3.0, 10.0], "lamb": [3e-3, 1e-2, 3e-2, 1e-1]}
SCALING = {"sgd": "sqrt", "adam": "none", "lars": "none", "lamb": "none"}


@contextlib.contextmanager
def layerwise_options(options: dict[str, dict]):
    """Build LARS and LAMB with ``options[name]`` wherever the trainer constructs them.

    The trainer creates its optimizer from the config; options it does not (yet) pass, such as
    ``norm_floor``, are supplied here so the benchmark measures them through the CLI's code path
    (they override the trainer's own keyword arguments).
    """
    real = {name: getattr(msconv.optim, name) for name in options}

    def forcing(cls, forced):
        # Not functools.partial: there the trainer's own keywords (exclude_1d=True) would win.
        return lambda *a, **kw: cls(*a, **{**kw, **forced})

    try:
        for name, cls in real.items():
            setattr(msconv.optim, name, forcing(cls, options[name]))
        yield
    finally:
        for name, cls in real.items():
            setattr(msconv.optim, name, cls)


def rates(spec: str, optimizers: list[str]) -> dict[str, list[float]]:
    if spec == "default":
        return {o: [DEFAULT_LR[o]] for o in optimizers}
    if spec == "sweep":
        return {o: GRID[o] for o in optimizers}
    try:  # explicit rates, e.g. lars=3,adam=3e-3
        given = {k: [float(v)] for k, v in (kv.split("=") for kv in spec.split(","))}
    except ValueError:
        raise SystemExit(f"--lrs must be 'default', 'sweep' or e.g. 'lars=3,adam=3e-3', got {spec!r}") from None
    missing = [o for o in optimizers if o not in given]
    if missing:
        raise SystemExit(f"--lrs {spec!r} gives no rate for {missing}; add e.g. {missing[0]}=0.01")
    return {o: given[o] for o in optimizers}


def run_cells(args, name: str, cells) -> tuple[list[dict], list[dict]]:
    """Like ``_paper.run_all``, but a run that diverges (the trainer stops on non-finite losses)
    is a result of the sweep, not the end of it: its row says ``diverged`` and has no PSNR."""
    from msconv.train.trainer import NonFiniteError

    rows, summaries = [], []
    for cell, cfg, modes, extra in cells:
        try:
            s = run_cell(cell, cfg, modes, runs_dir(args, name))
        except NonFiniteError as e:
            print(f"[{cell}] diverged: {str(e).splitlines()[0][:160]}", flush=True)
            rows.append({"cell": cell, **extra, "mode": modes[0], "val_psnr": "", "test_psnr": "", "test_ssim": "",
                         "work_units": "", "iterations": "", "wall_clock_s": "", "diverged": True})
            continue
        summaries.append(s)
        rows += [{**r, "diverged": False} for r in rows_of(s, {"cell": cell, **extra})]
        print(f"[{cell}] done in {s['elapsed_s']:.0f}s", flush=True)
    return rows, summaries


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (model, optimizer, coarse batch) the row at the rate with the highest final validation PSNR."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r.get("model") or "dncnn", r["optimizer"], str(r["coarse_batch_x"]))
        if r["val_psnr"] != "" and (key not in best or float(r["val_psnr"]) > float(best[key]["val_psnr"])):
            best[key] = r
    return list(best.values())


def summarize(folder: str) -> int:
    """Merge the sweeps run one optimizer at a time (``FOLDER/<name>/large_batch_sweep.csv``) into
    ``FOLDER/best.csv``: each (optimizer, coarse batch) at its best rate, and the rate grid."""
    import csv
    import glob

    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*", "large_batch_sweep.csv"))):
        sweep = os.path.basename(os.path.dirname(path))
        rows += [{"sweep": sweep, **r} for r in csv.DictReader(open(path))]
    if not rows:
        raise SystemExit(f"--summarize {folder}: no */large_batch_sweep.csv below it")
    best = best_rows([{**r, "optimizer": r["sweep"]} for r in rows])
    cols = ["sweep", "coarse_batch_x", "lr", "lr_batch_scaling", "val_psnr", "test_psnr", "test_ssim", "iterations"]
    write_csv([{c: r.get(c, "") for c in cols} for r in best], os.path.join(folder, "best.csv"))
    print(table(best, cols))
    print(f"\nwrote {os.path.join(folder, 'best.csv')}")
    return 0


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--multipliers", default="4,16,64", help="coarsest-stage batch / fine batch (levels=2: 4 ** k)")
    p.add_argument("--optimizers", default="sgd,adam,lars,lamb")
    p.add_argument("--lrs", default="default",
                   help="default (the CLI's rate per optimizer), sweep (GRID) or explicit, e.g. lars=3,adam=3e-3")
    p.add_argument("--crop", type=int, default=128, help="training crop (fine grid)")
    p.add_argument("--norm-floor", type=float, default=1.0, help="LARS/LAMB norm_floor (0: the paper's update)")
    p.add_argument("--models", default="dncnn", help="zoo models, e.g. dncnn,unet,resnet,espcn (width 16, depth 6, 2 blocks)")
    p.add_argument("--scaling", default="", help="per-stage LR rule overrides, e.g. lars=sqrt,adam=none")
    p.add_argument("--lr-power", type=float, default=None, help="polynomial decay power (default: the CLI's)")
    p.add_argument("--summarize", metavar="FOLDER", help="only merge FOLDER/*/large_batch_sweep.csv into FOLDER/best.csv")
    args = p.parse_args(argv)
    if args.summarize:
        return summarize(args.summarize)
    scaling = {**SCALING, **dict(kv.split("=") for kv in args.scaling.split(",") if kv)}
    optimizers = [o for o in args.optimizers.split(",") if o]
    name = "large_batch" + ("_sweep" if args.lrs == "sweep" else "")
    out = out_dir(args, name)
    base = dict(task="denoise", noise_sigma=25.0, noise_restriction="preserve", depth=6, width=16, blocks=2,
                crop=args.crop, batch_size=4, levels=2, budget=args.budget or 800.0, val_crop=128, val_points=4,
                threads=args.threads, **data_paths(args, "Train400", "BSD68", "BSD68"))
    if args.lr_power is not None:
        base["lr_power"] = args.lr_power
    if args.tiny:
        base.update(tiny_overrides())
    multipliers = [None] + [int(m) for m in args.multipliers.split(",") if m]
    cells = []
    for model in args.models.split(","):
        for opt, lrs in rates(args.lrs, optimizers).items():
            for lr in lrs:
                for mult in multipliers:
                    kw = dict(model=model, optimizer=opt, lr=lr)
                    if mult is not None:
                        ratio = math.sqrt(mult)  # per level, over levels = 2
                        kw.update(fmg_batch_ratio=ratio, fmg_iteration_ratio=4.0 / ratio,
                                  lr_batch_scaling=scaling[opt])
                    cfg = TrainConfig(**{**base, **kw}).validated()
                    cell = (f"{model}_" if model != "dncnn" else "") + f"{opt}_lr{lr:g}_" + (
                        "single" if mult is None else f"x{mult}")
                    cells.append((cell, cfg, ["single"] if mult is None else ["fmg"],
                                  {"model": model, "optimizer": opt, "coarse_batch_x": mult or 1, "lr": lr,
                                   "lr_batch_scaling": cfg.lr_batch_scaling, "lr_power": cfg.lr_power}))
    # LARS adapts biases too (exclude_1d=False): against their unit-RMS reference norm they move
    # by a relative γ·η like the weights; excluded, they take raw γ·g steps, and γ is a relative
    # rate (measured: γ = 3 diverges that way, single-scale). LAMB's excluded biases take a plain
    # Adam step, which is already of the right size.
    floor = args.norm_floor
    options = {"LARS": {"norm_floor": floor, "exclude_1d": floor == 0.0}, "LAMB": {"norm_floor": floor}}
    with layerwise_options(options):
        rows, summaries = run_cells(args, name, cells)
    fields = list(next((r for r in rows if not r["diverged"]), rows[0]))
    rows = [{k: r.get(k, "") for k in fields} for r in rows]  # diverged rows: the same columns, blank
    for r in rows:
        r["norm_floor"] = args.norm_floor if r["optimizer"] in ("lars", "lamb") else ""
    finish(args, out, name, rows, summaries, COLS)
    if args.lrs == "sweep":
        best = best_rows(rows)
        write_csv(best, os.path.join(out, f"{name}_best.csv"))
        with open(os.path.join(out, f"{name}.json")) as fh:
            dump = json.load(fh)
        dump["best"] = best
        with open(os.path.join(out, f"{name}.json"), "w") as fh:
            json.dump(dump, fh, indent=1, default=str)
        print("\neach optimizer at its best rate (by final validation PSNR):")
        print(table(best, COLS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

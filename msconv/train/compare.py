"""``msconv compare``: the same task, data, seed and budget under several modes, side by side.

Writes ``OUT/<mode>/…`` (each a full ``msconv train`` run), ``OUT/summary.json``,
``OUT/summary.md`` and the plots ``OUT/psnr_vs_work_units.png`` and
``OUT/psnr_vs_wall_clock.png``.
"""
from __future__ import annotations

import json
import math
import os

import torch

from msconv.multilevel.baselines import BASELINES
from msconv.train.config import MODES, ConfigError, TrainConfig
from msconv.train.trainer import Trainer

__all__ = ["compare", "summarize", "to_single_quality", "baseline_verdict", "best_baseline", "QUALITY_TOLERANCE_DB",
           "LEARNED_MARGIN_DB", "BASELINE_MODES", "DEFAULT_MODES"]

QUALITY_TOLERANCE_DB = 0.1
# A single-scale run whose final validation PSNR is less than this above its starting PSNR (the
# corrupted input, for the residual zoo models) has not learned: nothing can be "as good" as it
# faster, so no savings are reported against it.
LEARNED_MARGIN_DB = 1.0


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def to_single_quality(history: list[dict], target_psnr: float | None, tol: float = QUALITY_TOLERANCE_DB):
    """(work units, wall-clock s) spent until validation PSNR first came within ``tol`` dB of
    ``target_psnr``; (None, None) if it never did (or there is no finite target)."""
    if not _finite(target_psnr):
        return None, None
    for rec in history:
        if _finite(rec["psnr"]) and rec["psnr"] >= target_psnr - tol:
            return rec["work_units"], rec["wall_clock_s"]
    return None, None


def baseline_verdict(base: dict | None) -> tuple[bool, str]:
    """(whether the baseline run ``base`` learned, a sentence saying so with its figures)."""
    if base is None:
        return False, "no baseline run (single-scale or a baseline schedule) to compare against: no savings are reported"
    name = "single-scale" if base["mode"] == "single" else f"the best baseline ({base['mode']})"
    h = base["val_history"]
    start, final = (h[0]["psnr"] if h else None), base["psnr"]
    if not _finite(final):
        return False, f"{name}'s final validation PSNR is {final} (not finite): no savings are reported"
    if not _finite(start):
        return False, f"{name} has no finite starting PSNR: no savings are reported"
    gain = final - start
    if gain < LEARNED_MARGIN_DB:
        return False, (f"{name} did not learn: {start:.2f} -> {final:.2f} dB ({gain:+.2f} dB, less than "
                       f"{LEARNED_MARGIN_DB:g} dB over the start), so no savings ratio is meaningful and none is "
                       f"reported. Raise --budget (or lower --lr for a deep model) and run again")
    return True, f"{name} learned: {start:.2f} -> {final:.2f} dB ({gain:+.2f} dB)"


def ratio_resolution(history: list[dict], reached_wu: float | None):
    """How exactly the work to single-scale quality is known: the factor between the validation
    point where the run got there (``reached_wu``, from :func:`to_single_quality`) and the point
    before (the crossing lies in between). ``inf`` when that was the first point after the start
    (the ratio is then a lower bound); None when the run never got there."""
    if reached_wu is None:
        return None
    before = [r["work_units"] for r in history if r["work_units"] < reached_wu]
    return reached_wu / before[-1] if before and before[-1] > 0 else float("inf")


BASELINE_MODES = ("single",) + BASELINES


def is_baseline(mode: str) -> bool:
    """Whether ``mode`` is a baseline; a name with a suffix (``small_p32``, a benchmark's variant)
    counts as its mode's."""
    return mode.split("_")[0] in BASELINE_MODES


def _quality(history, target):
    wu, t = to_single_quality(history, target)
    return {"work_units": wu, "wall_clock_s": t, "resolution": ratio_resolution(history, wu)}


def _against(run: dict, base: dict, learned: bool) -> dict:
    """``run`` measured against baseline ``base``: PSNR difference at the end, and the work and
    wall-clock each needed to come within the tolerance of ``base``'s final PSNR, as ratios
    (base's figure over run's: > 1 means run needs less)."""
    target = base["psnr"] if learned else None
    mine, theirs = _quality(run["val_history"], target), _quality(base["val_history"], target)
    dp = run["psnr"] - base["psnr"] if _finite(run["psnr"]) and _finite(base["psnr"]) else None
    return {"baseline": base["mode"], "delta_psnr": dp, "work_units_to_quality": mine["work_units"],
            "wall_clock_to_quality_s": mine["wall_clock_s"], "ratio_resolution": mine["resolution"],
            "x_less_work": _ratio(theirs["work_units"], mine["work_units"]) if learned else None,
            "x_less_time": _ratio(theirs["wall_clock_s"], mine["wall_clock_s"]) if learned else None}


def best_baseline(results: list[dict]) -> dict | None:
    """The baseline run (single-scale or one of the practitioner's schedules) with the highest
    final validation PSNR; None when no baseline ran or none has a finite PSNR."""
    base = [r for r in results if is_baseline(r["mode"]) and _finite(r["psnr"])]
    return max(base, key=lambda r: r["psnr"]) if base else None


def summarize(cfg: TrainConfig, results: list[dict], out: str) -> dict:
    """Build and write summary.json / summary.md / plots from per-mode results.

    Every run is measured against the best baseline (the baseline mode with the highest final
    validation PSNR) and, in ``vs_baselines``, every multiscale run against each baseline. The
    ``*_to_single_quality`` fields keep the figures against plain single-scale."""
    single = next((r for r in results if r["mode"] == "single"), None)
    best = best_baseline(results)
    if best is None:
        best = next((r for r in results if is_baseline(r["mode"])), None)
    learned, verdict = baseline_verdict(best)
    single_learned = baseline_verdict(single)[0] if single is not None else False
    baselines = [r for r in results if is_baseline(r["mode"])]
    runs, vs = [], {}
    for r in results:
        wu, t = to_single_quality(r["val_history"], single["psnr"] if single_learned else None)
        vb = _against(r, best, learned) if best is not None else {}
        runs.append({
            "mode": r["mode"], "conv": r["conv"], "psnr": r["psnr"], "ssim": r["ssim"],
            "start_psnr": r["val_history"][0]["psnr"] if r["val_history"] else None,
            "test_psnr": r.get("test_psnr"), "test_ssim": r.get("test_ssim"),
            "work_units": r["work_units"], "flops": r["flops"], "wall_clock_s": r["wall_clock_s"],
            "iterations": r["iterations"], "work_units_to_single_quality": wu, "wall_clock_to_single_quality_s": t,
            "ratio_resolution": vb.get("ratio_resolution") if r is not best else None,
            "delta_psnr_vs_best_baseline": vb.get("delta_psnr"),
            "work_units_to_best_baseline_quality": vb.get("work_units_to_quality"),
            "wall_clock_to_best_baseline_quality_s": vb.get("wall_clock_to_quality_s"),
            "x_less_work_than_best_baseline": vb.get("x_less_work"),
            "x_less_time_than_best_baseline": vb.get("x_less_time"),
        })
        if not is_baseline(r["mode"]):
            vs[r["mode"]] = {b["mode"]: _against(r, b, baseline_verdict(b)[0]) for b in baselines}
    config = {k: v for k, v in cfg.to_dict().items() if k not in ("resume", "progress", "out", "max_steps")}
    config.update(modes=[r["mode"] for r in results], quality_tolerance_db=QUALITY_TOLERANCE_DB,
                  engine=results[0].get("engine") if results else None)
    summary = {"config": config, "baseline_learned": learned, "verdict": verdict,
               "best_baseline": best["mode"] if best is not None else None, "runs": runs, "vs_baselines": vs}
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    md = summary_markdown(summary)
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write(md)
    plot(results, out)
    return summary


def _fmt(v, spec):
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # nan / inf are reported as such, never as a score
    return format(v, spec)


def _times(v) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _ratio(a, b):
    return None if not (_finite(a) and _finite(b)) or a <= 0 or b <= 0 else a / b


def summary_markdown(summary: dict) -> str:
    """Markdown tables: every mode against the best baseline, then every multiscale mode against
    each baseline; ratios are the baseline's figure divided by the mode's (× less)."""
    runs = summary["runs"]
    best = summary.get("best_baseline") or "single"
    c = summary["config"]
    res = [r for r in runs if r.get("ratio_resolution")]
    from msconv.data.volumes import is_volume_data

    power, full = ("³", "full volumes") if is_volume_data(c["data"]) else ("²", "full images")
    lines = [
        f"# msconv compare: {c['task']} with {c['model']} ({c['conv']} conv), budget {c['budget']:g} work units",
        "",
        f"Training on {c['data']!r} (crops {c['crop']}{power}), validation on {c.get('val_data') or 'a split of it'!r}, "
        f"test on {c.get('test_data') or '—'!r} ({full}), seed {c['seed']}. Every mode is measured against the "
        f"**best baseline, {best}** (the baseline mode with the highest final validation PSNR; baselines: "
        f"{', '.join(BASELINE_MODES)}). Ratios are its figure over the mode's (so > 1 means the mode needs less); "
        f"'to quality' = spent until validation PSNR was within {c['quality_tolerance_db']} dB of {best}'s final PSNR.",
        "",
        f"**{summary.get('verdict', '')}.**" if summary.get("verdict") else "",
        "",
        f"| mode | PSNR (dB) | ΔPSNR vs {best} | SSIM | test PSNR (dB) | test SSIM | work units | FLOPs | wall-clock (s) "
        "| iterations | work to quality | × less work | time to quality (s) | × less time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['mode']} | {_fmt(r['psnr'], '.2f')} | {_fmt(r.get('delta_psnr_vs_best_baseline'), '+.2f')} "
            f"| {_fmt(r['ssim'], '.4f')} | {_fmt(r.get('test_psnr'), '.2f')} | {_fmt(r.get('test_ssim'), '.4f')} "
            f"| {r['work_units']:.1f} | {r['flops']:.3g} | {r['wall_clock_s']:.1f} | {r['iterations']} "
            f"| {_fmt(r.get('work_units_to_best_baseline_quality'), '.1f')} "
            f"| {_fmt(r.get('x_less_work_than_best_baseline'), '.2f')} "
            f"| {_fmt(r.get('wall_clock_to_best_baseline_quality_s'), '.1f')} "
            f"| {_fmt(r.get('x_less_time_than_best_baseline'), '.2f')} |"
        )
    if summary.get("baseline_learned") and res:
        exact = ", ".join(f"{r['mode']} {r['ratio_resolution']:.2f}×" for r in res if math.isfinite(r["ratio_resolution"]))
        lower = [r["mode"] for r in res if r["ratio_resolution"] == float("inf")]
        lines += [""]
        if exact:
            lines += [f"Validation points are log-spaced in work units; each mode reached {best}'s quality "
                      f"between two of them, so its '× less' ratios are exact to within this factor: {exact}."]
        if lower:
            lines += [f"{', '.join(lower)} reached it at the first validation point: its ratios are lower bounds."]
    vs = summary.get("vs_baselines") or {}
    names = list(next(iter(vs.values()))) if vs else []
    if vs and len(names) > 1:
        lines += ["", "Each multiscale mode against each baseline (ΔPSNR at the end / × less work / × less time to "
                  "that baseline's final quality; — = never reached it or the baseline did not learn):", "",
                  "| mode | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for mode, per in vs.items():
            cells = [f"{_fmt(per[b]['delta_psnr'], '+.2f')} dB / {_times(per[b]['x_less_work'])} / "
                     f"{_times(per[b]['x_less_time'])}" for b in names]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out: str) -> list[str]:
    """Validation PSNR against work units and against wall-clock, one line per mode (PNG). The axes are
    logarithmic: savings are ratios, decided early, where a linear axis squeezes the points (the
    start, at 0, is left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label, name in (("work_units", "fine-equivalent work units", "psnr_vs_work_units.png"),
                             ("wall_clock_s", "training wall-clock (s)", "psnr_vs_wall_clock.png")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for r in results:
            h = [p for p in r["val_history"] if p[key] > 0]
            ax.plot([p[key] for p in h], [p["psnr"] for p in h], marker="o", ms=3, label=f"{r['mode']} ({r['conv']})")
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log scale)")
        ax.set_ylabel("validation PSNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


# What `msconv compare` runs without --modes: Full-Multiscale against single-scale and the baselines
# a practitioner would pick instead (MGE, which loses to single-scale at equal work, on request).
DEFAULT_MODES = ("single", "small", "progressive", "patches", "fmg")


def load_data(cfg: TrainConfig):
    """(train, validation) image sets of ``cfg``, read once for every mode."""
    from msconv.data import load_dataset

    return load_dataset(cfg.data, cfg.val_data, cfg.gray, cfg.val_fraction, cfg.split_seed,
                        "skip" if cfg.skip_bad_files else "error", cfg.max_megapixels, cfg.data_memory_mb)


def plan_summary(cfg: TrainConfig, modes, data) -> str:
    """What a comparison will run, before it starts: each mode's stages (grid side × steps × batch) and
    an estimate of the wall-clock, from timing a few training steps of the fine grid on this machine
    (a step costs about the same per work unit on every grid)."""
    import time

    import torch.nn.functional as F

    from msconv.train.run import build_run

    import warnings

    lines = []
    dims = data[0].dims
    power = "²" if dims == 2 else "³"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each run says its warnings when it starts
        for mode in modes:
            run = build_run(cfg.replace(mode=mode), data)
            stages = ", ".join(f"{(s.resize or s.crop or cfg.crop) // 2 ** s.base_level}{power}@1/{2 ** s.base_level}:"
                               f"{s.iterations}×{s.batch_sizes[0]}" for s in run.stages)
            lines.append(f"  {mode:<12} {run.total_steps:>6} steps  [{stages}]")
        run = build_run(cfg.replace(mode="single"), data)
    x = torch.rand(cfg.batch_size, run.task.in_channels(run.train_set.channels), *(cfg.crop,) * dims, device=run.device)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        y = run.model(x)
        F.mse_loss(y, torch.zeros_like(y)).backward()
        times.append(time.perf_counter() - t0)
    per_unit = sorted(times[1:])[1] / cfg.batch_size  # the first step warms up
    total = per_unit * cfg.budget * len(modes)
    head = (f"plan: {len(modes)} modes x {cfg.budget:g} work units ({cfg.crop}{power} crops, batch {cfg.batch_size}) on "
            f"{run.device}, {torch.get_num_threads()} thread(s); estimated {f'{total / 60:.0f} min' if total > 120 else f'{total:.0f} s'} of training "
            f"({per_unit * 1e3:.1f} ms per work unit measured now; validation adds a little). Stages: "
            f"sample side{power} in the grid's own pixels @ the grid's resolution:steps×batch")
    return "\n".join([head, *lines])


def compare(cfg: TrainConfig, modes=DEFAULT_MODES, data=None, on_step=None) -> dict:
    """Run each mode under ``cfg`` (same seed and budget) into ``cfg.out/<mode>``; summarise.

    With ``cfg.resume``, modes that already finished are read back and unfinished ones resume.
    """
    modes = list(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"--modes: {bad or modes!r} not valid; give a comma-separated subset of {list(MODES)}")
    twice = sorted({m for m in modes if modes.count(m) > 1})
    if twice:
        raise ConfigError(f"--modes: {', '.join(twice)} given more than once; each mode runs once into OUT/<mode>")
    os.makedirs(cfg.out, exist_ok=True)
    if data is None:
        data = load_data(cfg)
    from msconv.train.folder import run_folder_lock

    with run_folder_lock(cfg.out):
        results = []
        for mode in modes:
            sub = cfg.replace(mode=mode, out=os.path.join(cfg.out, mode))
            done = os.path.join(sub.out, "result.json")
            if cfg.resume and os.path.exists(done):
                with open(done) as fh:
                    results.append(json.load(fh))
                continue
            if cfg.resume and not os.path.exists(os.path.join(sub.out, "checkpoint.pt")):
                sub = sub.replace(resume=False)
            r = Trainer(sub, on_step=on_step, data=data).run()
            if not r["complete"]:  # stopped early on purpose (max_steps): nothing to summarise yet
                return {"config": cfg.to_dict(), "runs": [], "incomplete": mode}
            results.append(r)
        return summarize(cfg, results, cfg.out)

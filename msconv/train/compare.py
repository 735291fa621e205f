"""``msconv compare``: the same task, data, seed and budget under several modes, side by side.

Writes ``OUT/<mode>/…`` (each a full ``msconv train`` run), ``OUT/summary.json``,
``OUT/summary.md`` and the plots ``OUT/psnr_vs_work_units.png`` and
``OUT/psnr_vs_wall_clock.png``.
"""
from __future__ import annotations

import json
import math
import os

from msconv.train.config import MODES, ConfigError, TrainConfig
from msconv.train.trainer import Trainer

__all__ = ["compare", "summarize", "to_single_quality", "baseline_verdict", "QUALITY_TOLERANCE_DB", "LEARNED_MARGIN_DB"]

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


def baseline_verdict(single: dict | None) -> tuple[bool, str]:
    """(whether single-scale learned, a sentence saying so with its figures)."""
    if single is None:
        return False, "no single-scale run to compare against: no savings are reported"
    h = single["val_history"]
    start, final = (h[0]["psnr"] if h else None), single["psnr"]
    if not _finite(final):
        return False, f"single-scale's final validation PSNR is {final} (not finite): no savings are reported"
    if not _finite(start):
        return False, "single-scale has no finite starting PSNR: no savings are reported"
    gain = final - start
    if gain < LEARNED_MARGIN_DB:
        return False, (f"single-scale did not learn: {start:.2f} -> {final:.2f} dB ({gain:+.2f} dB, less than "
                       f"{LEARNED_MARGIN_DB:g} dB over the start), so no savings ratio is meaningful and none is "
                       f"reported. Raise --budget (or lower --lr for a deep model) and run again")
    return True, f"single-scale learned: {start:.2f} -> {final:.2f} dB ({gain:+.2f} dB)"


def ratio_resolution(history: list[dict], reached_wu: float | None):
    """How exactly the work to single-scale quality is known: the factor between the validation
    point where the run got there (``reached_wu``, from :func:`to_single_quality`) and the point
    before (the crossing lies in between). ``inf`` when that was the first point after the start
    (the ratio is then a lower bound); None when the run never got there."""
    if reached_wu is None:
        return None
    before = [r["work_units"] for r in history if r["work_units"] < reached_wu]
    return reached_wu / before[-1] if before and before[-1] > 0 else float("inf")


def summarize(cfg: TrainConfig, results: list[dict], out: str) -> dict:
    """Build and write summary.json / summary.md / plots from per-mode results."""
    single = next((r for r in results if r["mode"] == "single"), None)
    learned, verdict = baseline_verdict(single)
    target = single["psnr"] if learned else None
    runs = []
    for r in results:
        wu, t = to_single_quality(r["val_history"], target)
        runs.append({
            "mode": r["mode"], "conv": r["conv"], "psnr": r["psnr"], "ssim": r["ssim"],
            "start_psnr": r["val_history"][0]["psnr"] if r["val_history"] else None,
            "test_psnr": r.get("test_psnr"), "test_ssim": r.get("test_ssim"),
            "work_units": r["work_units"], "flops": r["flops"], "wall_clock_s": r["wall_clock_s"],
            "iterations": r["iterations"], "work_units_to_single_quality": wu, "wall_clock_to_single_quality_s": t,
            "ratio_resolution": ratio_resolution(r["val_history"], wu) if r["mode"] != "single" else None,
        })
    config = {k: v for k, v in cfg.to_dict().items() if k not in ("resume", "progress", "out", "max_steps")}
    config.update(modes=[r["mode"] for r in results], quality_tolerance_db=QUALITY_TOLERANCE_DB,
                  engine=results[0].get("engine") if results else None)
    summary = {"config": config, "baseline_learned": learned, "verdict": verdict, "runs": runs}
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


def _ratio(a, b):
    return None if not (_finite(a) and _finite(b)) or a <= 0 or b <= 0 else a / b


def summary_markdown(summary: dict) -> str:
    """A Markdown table; ratios are single-scale's figure divided by the mode's (× less)."""
    runs = summary["runs"]
    single = next((r for r in runs if r["mode"] == "single"), None)
    learned = summary.get("baseline_learned", True)
    c = summary["config"]
    res = [r["ratio_resolution"] for r in runs if r.get("ratio_resolution")]
    lines = [
        f"# msconv compare: {c['task']} with {c['model']} ({c['conv']} conv), budget {c['budget']:g} work units",
        "",
        f"Training on {c['data']!r} (crops {c['crop']}²), validation on {c.get('val_data') or 'a split of it'!r}, "
        f"test on {c.get('test_data') or '—'!r} (full images), seed {c['seed']}. Ratios are single-scale's figure "
        f"over the mode's (so > 1 means the mode needs less); 'to quality' = spent until validation PSNR was within "
        f"{c['quality_tolerance_db']} dB of single-scale's final PSNR.",
        "",
        f"**{summary.get('verdict', '')}.**" if summary.get("verdict") else "",
        "",
        "| mode | PSNR (dB) | ΔPSNR vs single | SSIM | test PSNR (dB) | test SSIM | work units | FLOPs | wall-clock (s) | iterations "
        "| work to quality | × less work | time to quality (s) | × less time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        dp = None if (single is None or not _finite(r["psnr"]) or not _finite(single["psnr"])) else r["psnr"] - single["psnr"]
        s_wu = single and single["work_units_to_single_quality"]
        s_t = single and single["wall_clock_to_single_quality_s"]
        lines.append(
            f"| {r['mode']} | {_fmt(r['psnr'], '.2f')} | {_fmt(dp, '+.2f')} | {_fmt(r['ssim'], '.4f')} "
            f"| {_fmt(r.get('test_psnr'), '.2f')} | {_fmt(r.get('test_ssim'), '.4f')} "
            f"| {r['work_units']:.1f} | {r['flops']:.3g} | {r['wall_clock_s']:.1f} | {r['iterations']} "
            f"| {_fmt(r['work_units_to_single_quality'], '.1f')} "
            f"| {_fmt(_ratio(s_wu, r['work_units_to_single_quality']) if learned else None, '.2f')} "
            f"| {_fmt(r['wall_clock_to_single_quality_s'], '.1f')} "
            f"| {_fmt(_ratio(s_t, r['wall_clock_to_single_quality_s']) if learned else None, '.2f')} |"
        )
    if learned and res:
        exact = ", ".join(f"{r['mode']} {r['ratio_resolution']:.2f}×" for r in runs
                          if r.get("ratio_resolution") and math.isfinite(r["ratio_resolution"]))
        lower = [r["mode"] for r in runs if r.get("ratio_resolution") == float("inf")]
        lines += [""]
        if exact:
            lines += [f"Validation points are log-spaced in work units; each mode reached single-scale's quality "
                      f"between two of them, so its '× less' ratios are exact to within this factor: {exact}."]
        if lower:
            lines += [f"{', '.join(lower)} reached it at the first validation point: its ratios are lower bounds."]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out: str) -> list[str]:
    """Validation PSNR against work units and against wall-clock, one line per mode (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label, name in (("work_units", "fine-equivalent work units", "psnr_vs_work_units.png"),
                             ("wall_clock_s", "training wall-clock (s)", "psnr_vs_wall_clock.png")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for r in results:
            h = r["val_history"]
            ax.plot([p[key] for p in h], [p["psnr"] for p in h], marker="o", ms=3, label=f"{r['mode']} ({r['conv']})")
        ax.set_xlabel(label)
        ax.set_ylabel("validation PSNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def compare(cfg: TrainConfig, modes=MODES, data=None, on_step=None) -> dict:
    """Run each mode under ``cfg`` (same seed and budget) into ``cfg.out/<mode>``; summarise.

    With ``cfg.resume``, modes that already finished are read back and unfinished ones resume.
    """
    modes = list(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"--modes: {bad or modes!r} not valid; give a comma-separated subset of {list(MODES)}")
    os.makedirs(cfg.out, exist_ok=True)
    if data is None:
        from msconv.data import load_dataset

        data = load_dataset(cfg.data, cfg.val_data, cfg.gray, cfg.val_fraction, cfg.split_seed,
                            "skip" if cfg.skip_bad_files else "error")
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

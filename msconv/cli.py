"""Command line (console script ``msconv`` and ``python -m msconv``).

- ``msconv train``   — train one model single-scale, with MGE or Full-Multiscale.
- ``msconv compare`` — the same job under several modes; summary.json / .md and plots.
- ``msconv apply``   — restore photos with a trained run.
- ``msconv export``  — a trained run's model as ONNX / TorchScript / pt2, runnable without msconv.
- ``msconv bench``   — kernel microbenchmarks (bench/bench_<name>.py).
- ``msconv info``    — versions, compiled kernels, Triton, and the backend each op uses.
"""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    from msconv._info import format_info, info

    d = info()
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


def _bench_names(bench_dir: str) -> list[str]:
    """One benchmark per bench/bench_<name>.py, discovered so a new kernel family needs no CLI edit."""
    import glob
    import os

    return sorted(os.path.basename(f)[len("bench_"):-3] for f in glob.glob(os.path.join(bench_dir, "bench_*.py")))


def _bench_dir() -> str:
    import os

    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _cmd_bench(args) -> int:
    import importlib
    import os

    bench_dir = _bench_dir()
    if not os.path.isdir(bench_dir) or not _bench_names(bench_dir):
        # A wheel ships the library only; the benchmarks live in the source tree's bench/ folder.
        print(f"msconv bench: the benchmarks are not installed with msconv (no bench_*.py in {bench_dir}); they "
              "live in the bench/ folder of a source checkout: install from it with pip install -e . and run "
              "msconv bench there, or run python bench/bench_<name>.py in it", file=sys.stderr)
        return 2
    sys.path.insert(0, bench_dir)
    available = _bench_names(bench_dir)
    if args.which != "all" and args.which not in available:
        print(f"msconv bench: no benchmark {args.which!r}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    names = available if args.which == "all" else [args.which]
    failed = []
    for name in names:
        mod = importlib.import_module(f"bench_{name}")
        rc = mod.main(args.rest)
        if isinstance(rc, bool) or not isinstance(rc, int):
            print(f"msconv bench: bench/bench_{name}.py main() returned a {type(rc).__name__}, not an exit code; "
                  "its main(argv) must return an int (0 on success)", file=sys.stderr)
            rc = 1
        if rc:
            failed.append((name, rc))
    if failed:
        if len(names) > 1:
            print(f"msconv bench: failed: {', '.join(f'{n} (exit {rc})' for n, rc in failed)}", file=sys.stderr)
        return failed[0][1]
    return 0


_EXIT_CONFIG, _EXIT_NONFINITE, _EXIT_CHECKPOINT = 2, 3, 4
_EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd program
_EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of our output went away (`msconv info | head`)


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field; defaults are suppressed so that only options given
    on the command line override the YAML file."""
    from msconv.train.config import TrainConfig

    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (keys as below, '_' or '-'); "
                   "command-line options override it")
    for f in TrainConfig.fields():
        name = "--" + f.name.replace("_", "-")
        default = f.default
        helptext = f.metadata["help"] + ("" if default is None else f" (default: {default})")
        if f.type == "bool":
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=helptext)
            continue
        kw = {"type": {"int": int, "float": float}.get(f.type, str), "default": argparse.SUPPRESS, "help": helptext}
        if f.metadata.get("choices") and not f.metadata.get("open_choices"):  # open ones are checked by TrainConfig
            kw["choices"] = f.metadata["choices"]
        if f.type == "list":
            kw["metavar"] = "N,N,..."
        p.add_argument(name, **kw)


def _config_from_args(args, **overrides):
    """Options: defaults < (with --resume) OUT/config.json of the run being resumed < --config FILE
    < the command line."""
    from msconv.train.config import TrainConfig, load_yaml, options_of_run

    d = {}
    if getattr(args, "resume", False):
        d.update(options_of_run(getattr(args, "out", None) or overrides.get("out") or TrainConfig.out))
    if getattr(args, "config", None):
        d.update(load_yaml(args.config))
    names = {f.name for f in TrainConfig.fields()}
    d.update({k: v for k, v in vars(args).items() if k in names})
    for k, v in overrides.items():
        d.setdefault(k, v)
    return TrainConfig.from_dict(d, source=args.config or "options")


def _end_distributed() -> None:
    """Leave torch.distributed (under torchrun) so that the processes exit cleanly."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _is_finite(v) -> bool:
    import math

    return isinstance(v, (int, float)) and math.isfinite(v)


def _run_guarded(fn) -> int:
    """Known failures print one clear line and an exit code instead of a traceback
    (``MSCONV_DEBUG=1`` shows the traceback)."""
    import os

    from msconv.data import ImageReadError
    from msconv.train.config import ConfigError
    from msconv.train.checkpoint import CheckpointError
    from msconv.train.trainer import NonFiniteError

    if os.environ.get("MSCONV_DEBUG"):
        return fn()
    try:
        return fn()
    except (ConfigError, ImageReadError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"msconv: error: {e}", file=sys.stderr)
        return _EXIT_CONFIG
    except NonFiniteError as e:
        print(f"msconv: {e}", file=sys.stderr)
        return _EXIT_NONFINITE
    except CheckpointError as e:
        print(f"msconv: error: {e}", file=sys.stderr)
        return _EXIT_CHECKPOINT
    except KeyboardInterrupt as e:
        print(f"\nmsconv: {e or 'interrupted'}", file=sys.stderr)
        return _EXIT_INTERRUPTED
    except OSError as e:  # a full disk or a vanished folder while writing logs or results
        where = f" ({e.filename})" if e.filename else ""
        print(f"msconv: error: {e.strerror or e}{where}. Checkpoints are written atomically: after fixing it, run "
              "the same command again with --resume", file=sys.stderr)
        return _EXIT_CONFIG


def _cmd_train(args) -> int:
    def go():
        from msconv.train.trainer import Trainer

        cfg = _config_from_args(args)
        try:
            trainer = Trainer(cfg)
            r = trainer.run()
        finally:
            _end_distributed()
        if trainer.rank != 0:
            return 0 if not r["complete"] or _is_finite(r["psnr"]) else _EXIT_NONFINITE  # rank 0 reports
        if r["complete"] and not _is_finite(r["psnr"]):
            print(f"msconv: {cfg.mode}/{cfg.conv} finished, but the model's validation outputs are not finite "
                  f"(val PSNR {r['psnr']}, {r['skipped_steps']} of {r['iterations']} steps skipped as non-finite): "
                  f"the model is broken, not scored. {cfg.out}/result.json records psnr NaN. Lower --lr, or for "
                  "--conv mf raise --mf-sigma (or keep --mf-sigma-floor at 0.5), and train again", file=sys.stderr)
            return _EXIT_NONFINITE
        state = "finished" if r["complete"] else f"stopped at step {r['iterations']} (resume with --resume)"
        print(f"{cfg.mode}/{cfg.conv} {state}: val PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}, "
              f"{r['work_units']:.1f} work units, {r['flops']:.3g} FLOPs, {r['wall_clock_s']:.1f} s, "
              f"{r['iterations']} steps ({r['skipped_steps']} skipped) -> {cfg.out}")
        return 0

    return _run_guarded(go)


def _cmd_compare(args) -> int:
    def go():
        from msconv.train.compare import compare, summary_markdown

        cfg = _config_from_args(args, out="runs/compare")
        from msconv.train.compare import DEFAULT_MODES
        from msconv.train.config import MODES

        modes = DEFAULT_MODES if args.modes is None else [m for m in args.modes.replace(" ", "").split(",") if m]
        data = None
        if not cfg.resume and modes and all(m in MODES for m in modes):
            import torch

            from msconv.train.compare import load_data, plan_summary

            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            data = load_data(cfg)
            print(plan_summary(cfg, modes, data), flush=True)
        s = compare(cfg, modes, data=data)
        if not s["runs"]:
            print(f"compare stopped during mode {s['incomplete']!r} (--max-steps); run again with --resume")
            return 0
        print(summary_markdown(s))
        print(f"wrote {cfg.out}/summary.json, summary.md, psnr_vs_work_units.png, psnr_vs_wall_clock.png")
        return 0

    return _run_guarded(go)


def _cmd_apply(args) -> int:
    def go():
        from msconv.apply import apply_run, mean_scores
        from msconv.restore import load_run
        from msconv.train.run import resolve_device

        run = load_run(args.run, resolve_device(args.device))
        rows = apply_run(run, args.input, args.out, reference=args.reference, degrade=args.degrade, tile=args.tile,
                         grid_scale=args.grid_scale, seed=args.seed, progress=not args.no_progress)
        scores = mean_scores(rows)
        what = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" if "ssim" in k else f"{k.replace('_', ' ')} {v:.2f} dB"
                         for k, v in scores.items())
        print(f"restored {len(rows)} image(s) with {run.config.mode}/{run.config.conv} ({run.task.name}) -> {args.out}"
              + (f": mean {what}" if what else ""))
        return 0

    return _run_guarded(go)


def _cmd_export(args) -> int:
    def go():
        from msconv.restore import export_run

        path = export_run(args.run, args.format, args.out, args.grid_scale)
        print(f"wrote {path} ({args.format}; mesh-free layers baked at grid scale {args.grid_scale:g}; runs without msconv)")
        return 0

    return _run_guarded(go)


def _add_run_arguments(p: argparse.ArgumentParser, grid_scale_help: str) -> None:
    """The trained run a command uses, and the grid its mesh-free layers run on."""
    p.add_argument("run", help="run folder (with config.json and model.pt) or the model.pt in one")
    p.add_argument("--grid-scale", type=float, default=1.0, help=grid_scale_help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msconv", description="Multiscale training of CNNs.")
    sub = p.add_subparsers(dest="command", required=True)
    pt = sub.add_parser(
        "train", help="train an image-restoration CNN: single-scale, MGE or Full-Multiscale",
        description="Train one model on one task. Writes OUT/metrics.csv, OUT/tb (TensorBoard), OUT/checkpoint.pt "
        "(atomic; --resume continues exactly), OUT/result.json and OUT/model.pt. `--resume --out OUT` alone continues a "
        "run with the options in OUT/config.json; of those, only --lr, --on-nonfinite, --max-skips and "
        "--divergence-factor may be changed on --resume (the learning-rate schedule goes on from the new peak --lr). "
        "Multi-process: `torchrun --nproc_per_node N -m msconv train ...` shares every level's batch over the N "
        "processes (batch sizes must be multiples of N; gradients averaged each step), and rank 0 alone writes the "
        "logs, checkpoints and results; a rank that waits more than MSCONV_DIST_TIMEOUT seconds (default 300) "
        "for its peers fails. "
        "Exit codes: 2 bad options or data, 3 stopped on a non-finite or diverging loss or finished with non-finite "
        "validation outputs, 4 unreadable or unwritable checkpoint, 130 interrupted (Ctrl-C; --resume continues).",
        )
    _add_config_options(pt)
    pt.set_defaults(func=_cmd_train)
    pc = sub.add_parser(
        "compare", help="run several modes on the same task, data, seed and budget; summary table and plots",
        description="Run --modes on the same task, data, seed and compute budget (fine-equivalent work units; each "
        "mode's schedule is scaled to it). Writes OUT/<mode>/ runs, OUT/summary.json, OUT/summary.md and the plots "
        "OUT/psnr_vs_work_units.png, OUT/psnr_vs_wall_clock.png. Default --out runs/compare.")
    pc.add_argument("--modes", default=None,
                    help="comma-separated modes to compare (default: single,small,progressive,patches,fmg: "
                         "Full-Multiscale against single-scale and the baselines; add mge to include it)")
    _add_config_options(pc)
    pc.set_defaults(func=_cmd_compare)
    pa = sub.add_parser(
        "apply", help="restore photos with a trained run (a file or a folder; any size, gray or colour)",
        description="Restore the images of --input with the model of RUN (a run folder written by msconv train or "
        "compare, e.g. runs/compare/fmg, or its model.pt). Writes OUT/<name>.png (8-bit inputs; 16-bit ones as 16-bit "
        "PNG, or TIFF in colour) and OUT/restore.csv. A grayscale model restores each colour channel on its own. "
        "Large images are processed in overlapping tiles (--tile), so memory stays bounded. With --reference the "
        "results are scored against clean originals; with --degrade the inputs are clean photos that the run's task "
        "degrades first (seeded), and both the degraded input (OUT/<name>_input.png) and the result are scored. "
        "A volume run restores volumes (NIfTI, .npy, TIFF stacks) by a sliding window, writing NIfTI (with the "
        "input's header) or .npy.")
    _add_run_arguments(pa, "mesh-free models: the grid spacing to run at (1 = the training resolution; 2 = images "
                       "at half that resolution)")
    pa.add_argument("--input", required=True, help="an image file or a folder of images (volume runs: volumes)")
    pa.add_argument("--out", required=True, help="output folder")
    pa.add_argument("--reference", default=None, help="folder of clean originals with the inputs' names: report PSNR/SSIM")
    pa.add_argument("--degrade", action="store_true", help="the inputs are clean: degrade them with the run's task, "
                    "restore, and report PSNR/SSIM of input and result")
    pa.add_argument("--tile", type=int, default=None, help="tile side in pixels (default 512; volume runs: 96 voxels)")
    pa.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    pa.add_argument("--seed", type=int, default=0, help="--degrade: seed of the degradation")
    pa.add_argument("--no-progress", action="store_true", help="no progress bar")
    pa.set_defaults(func=_cmd_apply)
    pe = sub.add_parser(
        "export", help="write a trained run's model as ONNX, TorchScript or a torch.export program (no msconv needed)",
        description="Export the model of RUN (a run folder, or the model.pt in one). Mesh-free layers are lowered to "
        "the exact nn.Conv2d they compute on the grid of --grid-scale, so the file runs without msconv: ONNX (any "
        "input size; onnxruntime), TorchScript (torch.jit.load) or pt2 (torch.export.load).")
    _add_run_arguments(pe, "grid spacing the mesh-free layers are baked at (1 = the training resolution)")
    pe.add_argument("--format", required=True, choices=("onnx", "torchscript", "pt2"))
    pe.add_argument("--out", default=None, help="output file (default RUN/model.onnx, model.ts.pt or model.pt2)")
    pe.set_defaults(func=_cmd_export)
    pi = sub.add_parser("info", help="versions, compiled kernels, Triton, and the backend each op uses")
    pi.add_argument("--json", action="store_true", help="print as JSON")
    pi.set_defaults(func=_cmd_info)
    import os

    # The benchmarks live in a source checkout's bench/ folder, not in a wheel: advertised only where they are.
    have_bench = os.path.isdir(_bench_dir()) and bool(_bench_names(_bench_dir()))
    if not have_bench:
        sub.metavar = "{" + ",".join(n for n in sub.choices if n != "bench") + ",...}"
    pb = sub.add_parser("bench", help="run a kernel microbenchmark and print its table (CSV into bench/results/)",
                        description="Run bench/bench_<which>.py (or every one, 'all', each in turn; a failing one does "
                        "not stop the rest). Options after the name go to every benchmark run: --quick (smaller), "
                        "--smoke (tiny, checks that it runs), --out, ... CSVs go to bench/results/ or "
                        "$MSCONV_BENCH_RESULTS.")
    pb.add_argument("which", help="which benchmark: transfer, mfconv, mge, lars, ... or all")
    pb.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark (see --help there)")
    if not have_bench:
        sub._choices_actions.pop()  # keep `msconv bench` (it says where the benchmarks are), but out of --help
    pb.set_defaults(func=_cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        # Python's documented recipe: point stdout at devnull so the interpreter's final flush does not fail again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _EXIT_BROKEN_PIPE


if __name__ == "__main__":
    raise SystemExit(main())

"""Shared benchmark plumbing: the common options (:func:`bench_parser`, :func:`kernel_parser`),
timing (CPU: torch.utils.benchmark, GPU: triton.testing.do_bench; p50/p20/p80), environment
columns (device, torch and msconv versions, git sha), CSV writing and a plain-text table.

Every ``bench/bench_<name>.py`` has ``main(argv) -> int`` (the exit code) so ``msconv bench``
can run them in turn."""
from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile

import torch

# Where CSVs go by default; MSCONV_BENCH_RESULTS redirects them (tests, scratch runs).
RESULTS = os.environ.get("MSCONV_BENCH_RESULTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def bsd68_val_subset(bsd68: str, prefix: str = "bsd68_val_") -> str:
    """A temporary folder of symlinks to 10 BSD68 images (every sixth of the first 60, sorted by
    name): the validation set of the defaults sweep and of the training benchmarks read against it."""
    val = tempfile.mkdtemp(prefix=prefix)
    for n in sorted(f for f in os.listdir(bsd68) if f.lower().endswith(".png"))[:60][5::6]:
        os.symlink(os.path.join(os.path.abspath(bsd68), n), os.path.join(val, n))
    return val


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def env_columns(device: torch.device) -> dict:
    import msconv

    return {"device": device_name(device), "torch": torch.__version__, "msconv": msconv.__version__, "git": git_sha()}


def kernel_backends(device: torch.device) -> list[str]:
    """The compiled backends worth timing on ``device``: msconv.ops.available_backends without the
    reference and without Triton on CPU (the interpreter is not a performance path)."""
    from msconv.ops import available_backends

    return [b for b in available_backends(device) if b != "reference" and not (b == "triton" and device.type == "cpu")]


def time_fn(fn, device: torch.device, min_run_time: float = 0.3) -> tuple[float, float, float]:
    """(p50, p20, p80) in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return p50, p20, p80
    from torch.utils.benchmark import Timer

    fn()  # warm-up (allocator, caches)
    m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    t = torch.tensor(m.times) * 1e3
    return t.median().item(), t.quantile(0.2).item(), t.quantile(0.8).item()


def write_csv(rows: list[dict], path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    cells = [[str(r[c]) for c in cols] for r in rows]
    width = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(xs, width)))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in width]), *map(line, cells)])


SMOKE_HELP = ("the smallest sizes and a few milliseconds of timing: checks that the benchmark runs end to end "
              "(figures are not meaningful); CSV *_smoke.csv")


def program_name(name: str) -> str:
    """How the user started benchmark ``name``, for usage lines: ``python bench/bench_<name>.py``
    when run as a script, else ``msconv bench <name>`` (argparse's default would say ``msconv``)."""
    script = f"bench_{name}.py"
    return f"python bench/{script}" if os.path.basename(sys.argv[0]) == script else f"msconv bench {name}"


def bench_parser(doc: str, name: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick, --smoke, --out."""
    p = argparse.ArgumentParser(prog=program_name(name), description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    p.add_argument("--out", default=None, type=writable_csv_path,
                   help=f"CSV path (default bench/results/{name}_<device>[_quick|_smoke].csv)")
    return p


def writable_csv_path(path: str) -> str:
    """``--out``: checked before the benchmark runs (not after it, when its figures would be lost)."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    probe = None
    try:
        os.makedirs(folder, exist_ok=True)
        if os.path.isdir(path):
            raise argparse.ArgumentTypeError(f"{path!r} is a folder; give a CSV file path, e.g. {os.path.join(path, 'out.csv')}")
        probe = os.path.join(folder, f".msconv-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write {path!r} ({e.strerror or e}); give a CSV path in a folder you "
                                         "can write to") from None
    finally:
        if probe and os.path.exists(probe):
            os.unlink(probe)
    return path


def kernel_parser(doc: str, name: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every kernel microbenchmark takes: --quick, --smoke, --device, --dtype, --out."""
    p = bench_parser(doc, name, quick_help)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    return p


def size_tag(args: argparse.Namespace) -> str:
    """The CSV name suffix of the size tier: '_smoke', '_quick' or ''."""
    return "_smoke" if getattr(args, "smoke", False) else "_quick" if args.quick else ""


def report(rows: list[dict], args: argparse.Namespace, name: str, cols: list[str], note: str = "") -> str:
    """Write a kernel benchmark's CSV (default name from the device and --quick) and print its table."""
    tag = "cuda_" + torch.cuda.get_device_name().replace(" ", "_") if args.device == "cuda" else "cpu"
    out = args.out or os.path.join(RESULTS, f"{name}_{tag}{size_tag(args)}.csv")
    write_csv(rows, out)
    print(f"device: {rows[0]['device']}, torch {rows[0]['torch']}, dtype {args.dtype}{note}")
    print(table(rows, cols))
    print(f"\nwrote {out}")
    return out


def thin_metrics(path: str, steps: int = 500) -> None:
    """Rewrite a run's metrics.csv with about ``steps`` training rows (evenly spaced) plus every row
    that carries a validation, a skipped step or a stage change, so a long run's record stays a
    small file; work units, FLOPs and wall-clock are cumulative columns, so no figure is lost at
    the rows kept. A file already that small is left alone."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames, list(reader)
    if len(rows) <= 2 * steps:
        return
    every = max(1, len(rows) // steps)
    kept = [r for i, r in enumerate(rows)
            if i % every == 0 or i == len(rows) - 1 or r.get("val_psnr") or r.get("skipped") == "1"
            or (i and r.get("stage") != rows[i - 1].get("stage"))]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(kept)
    os.replace(tmp, path)

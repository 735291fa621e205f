"""Command line: ``msconv info`` and ``msconv bench transfer`` (console script and ``python -m msconv``)."""
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


def _cmd_bench(args) -> int:
    import importlib
    import os

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = os.path.join(here, "bench")
    if not os.path.isdir(bench_dir):
        print("msconv bench: the bench/ folder is not next to the package (run from a source checkout)", file=sys.stderr)
        return 2
    sys.path.insert(0, bench_dir)
    available = _bench_names(bench_dir)
    if args.which != "all" and args.which not in available:
        print(f"msconv bench: no benchmark {args.which!r}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    names = available if args.which == "all" else [args.which]
    for name in names:
        mod = importlib.import_module(f"bench_{name}")
        rc = mod.main(args.rest)
        if rc:
            return rc
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msconv", description="Multiscale training of CNNs.")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="versions, compiled kernels, Triton, and the backend each op uses")
    pi.add_argument("--json", action="store_true", help="print as JSON")
    pi.set_defaults(func=_cmd_info)
    pb = sub.add_parser("bench", help="run a kernel microbenchmark and print its table (CSV into bench/results/)")
    pb.add_argument("which", help="which benchmark: transfer, mfconv, mge, lars, ... or all")
    pb.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark (see --help there)")
    pb.set_defaults(func=_cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

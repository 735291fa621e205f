"""Per-step overhead of the training loop: the marginal seconds of one more step of a tiny model
(DnCNN 3x8 on 32² crops, batch 4), where the loop's own work (logging, the divergence guard's
copies, learning-rate handling) is a visible share, for one or more source trees side by side.

Each tree runs ``msconv train`` in a fresh process at two budgets; (time at the larger - time at the
smaller) / (extra steps) is the per-step time, which cancels start-up, data loading and validation.
Trees alternate within each repeat so a busy machine slows them alike. CSV to --out.

    python bench/engine_overhead.py --tree before=/work/before --tree after=. --repeats 5
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time


def run(tree: str, budget: int, data: str) -> float:
    out = tempfile.mkdtemp(prefix="engine_overhead_")
    cmd = [sys.executable, "-m", "msconv", "train", "--mode", "single", "--data", data, "--depth", "3", "--width", "8",
           "--crop", "32", "--batch-size", "4", "--budget", str(budget), "--val-points", "1", "--ckpt-every", "100000",
           "--no-progress", "--no-tensorboard", "--threads", "1", "--out", out]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree (repeatable)")
    p.add_argument("--data", default="bundled")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, nargs=2, default=(100, 600), help="the two run lengths in steps")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "engine_overhead_cpu.csv"))
    args = p.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    lo, hi = args.steps
    per_step = {name: [] for name in trees}
    for _ in range(args.repeats):
        for name, path in trees.items():
            per_step[name].append((run(path, 4 * hi, args.data) - run(path, 4 * lo, args.data)) / (hi - lo))
    rows = [{"tree": n, "median_ms_per_step": round(1e3 * statistics.median(v), 3),
             "min_ms_per_step": round(1e3 * min(v), 3), "repeats": len(v), "steps": f"{lo}->{hi}"}
            for n, v in per_step.items()]
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())

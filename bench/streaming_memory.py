"""Peak memory of training on a folder far larger than memory: N colour photos of 12 megapixels
(4000x3000 JPEGs made by upscaling Train400 images, written once to --photos), trained with
`msconv train --no-gray` and the default --data-memory-mb, which decodes them on demand.

Held in memory as float32 the folder would take N x 144 MB (1000 photos: 144 GB). The script runs
the training in a child process and appends its peak resident set size (ru_maxrss) and the
seconds per step to bench/results/streaming/streaming_memory.csv (--out).

    python bench/streaming_memory.py --photos /tmp/msconv_12mp --count 1000 --iterations 100
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from _common import write_csv  # noqa: E402


def make_photos(folder: str, count: int, source: str) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    have = {n for n in os.listdir(folder) if n.endswith(".jpg")}
    sources = sorted(os.path.join(source, n) for n in os.listdir(source))
    for i in range(count):
        name = f"photo_{i:04d}.jpg"
        if name in have:
            continue
        with Image.open(sources[i % len(sources)]) as im:
            big = im.convert("RGB").resize((4000, 3000), Image.BICUBIC)
        # A little per-file variation, so no two files are the same image.
        big = big.rotate(90 * (i // len(sources)) % 360, expand=False)
        big.save(os.path.join(folder, name), quality=90)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", default="/tmp/msconv_12mp", help="folder of the generated photos (made if missing)")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--source", default=os.path.join(ROOT, "..", "shared", "data", "Train400"))
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--memory-mb", type=float, default=None, help="--data-memory-mb (default: the CLI's)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "streaming"))
    args = p.parse_args(argv)
    t0 = time.time()
    make_photos(args.photos, args.count, args.source)
    made_s = time.time() - t0
    run = os.path.join(args.out, "run")
    cmd = [sys.executable, "-m", "msconv", "train", "--data", args.photos, "--no-gray", "--iterations",
           str(args.iterations), "--val-points", "2", "--val-fraction", "0.01", "--no-progress", "--threads", "1",
           "--no-tensorboard", "--overwrite", "--out", run]
    if args.memory_mb is not None:
        cmd += ["--data-memory-mb", str(args.memory_mb)]
    t0 = time.time()
    rc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}).returncode
    wall = time.time() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    import json

    result = json.load(open(os.path.join(run, "result.json"))) if rc == 0 else {}
    row = {"photos": args.count, "megapixels": 12.0, "channels": 3, "in_memory_gb": round(args.count * 0.144, 1),
           "data_memory_mb": args.memory_mb or "default", "iterations": args.iterations, "exit_code": rc,
           "peak_rss_mb": round(peak_mb), "process_wall_s": round(wall, 1),
           "train_s_per_step": round(result.get("wall_clock_s", float("nan")) / max(1, args.iterations), 3),
           "val_psnr": result.get("psnr"), "photos_made_s": round(made_s, 1)}
    path = os.path.join(args.out, "streaming_memory.csv")
    import csv

    rows = list(csv.DictReader(open(path))) if os.path.exists(path) else []  # one row per setting measured
    path = write_csv(rows + [row], path)
    print(row)
    print(f"wrote {path}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())

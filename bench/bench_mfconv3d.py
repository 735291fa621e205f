"""MFConv3d against nn.Conv3d with the same shapes: forward and forward+backward, CPU.

For each size (N, C, n³) and stride (1, 2), times

* ``conv3d``: ``nn.Conv3d(C, C, 3, stride, padding=1)``, the layer MFConv3d replaces;
* ``mf-auto``: ``MFConv3d(C, C, 3, stride)`` as it runs by default (the path in ``auto_pick``);
* ``mf-dense``, ``mf-separable``: each path forced;
* ``mf-dense-uncached``: the dense path with the per-axis filters recomputed every call, as the layer
  did before it cached them (the stencil itself is always rebuilt from θ).

forward under ``no_grad``; forward+backward with gradients of the input and every parameter. The
implementations of a configuration are timed in ``--rounds`` interleaved rounds
(torch.utils.benchmark blocked_autorange each); ``p50_ms`` is the median over rounds and
``x_vs_conv3d`` the median over rounds of the ratio to conv3d's time in the same round, so load that
comes and goes on a shared machine hits both alike. CSV into bench/results/mfconv3d_cpu[_quick|_smoke].csv.

    python bench/bench_mfconv3d.py [--quick|--smoke] [--threads 1] [--rounds 3] [--out FILE]
"""
from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import env_columns, kernel_parser, report, time_fn  # noqa: E402

from msconv.nn import mfconv3d  # noqa: E402
from msconv.nn.mfconv3d import MFConv3d  # noqa: E402

FULL = {"sizes": [(2, 16, 32), (2, 16, 48), (2, 32, 32)], "strides": [1, 2]}
QUICK = {"sizes": [(2, 16, 32), (2, 16, 48)], "strides": [1, 2]}
SMOKE = {"sizes": [(1, 2, 8)], "strides": [1, 2]}


class _Uncached(MFConv3d):
    def _filters(self):
        mfconv3d._FILTER_CACHE.clear()
        return super()._filters()


def _impls(c, stride, device, dtype):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(c, c, 3, stride, padding=1, device=device, dtype=dtype)
    mf = {name: cls(c, c, 3, stride, padding=1, device=device, dtype=dtype, method=method)
          for name, cls, method in (("mf-auto", MFConv3d, "auto"), ("mf-dense", MFConv3d, "dense"),
                                    ("mf-separable", MFConv3d, "separable"),
                                    ("mf-dense-uncached", _Uncached, "dense"))}
    for layer in list(mf.values())[1:]:
        layer.load_state_dict(mf["mf-auto"].state_dict())
    return {"conv3d": conv, **mf}


def _runner(layer, x, backward):
    if not backward:
        def fwd():
            with torch.no_grad():
                layer(x)
        return fwd
    xg = x.clone().requires_grad_()

    def fwd_bwd():
        layer.zero_grad(set_to_none=True)
        xg.grad = None
        layer(xg).sum().backward()
    return fwd_bwd


def main(argv=None) -> int:
    p = kernel_parser(__doc__, "mfconv3d", "two sizes (16 channels, 32³ and 48³)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = SMOKE if args.smoke else QUICK if args.quick else FULL
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    min_time = 0.01 if args.smoke else 0.3
    rows, env = [], env_columns(device)
    for (n, c, size) in cfg["sizes"]:
        for stride in cfg["strides"]:
            layers = _impls(c, stride, device, dtype)
            x = torch.randn(n, c, size, size, size, device=device, dtype=dtype)
            ks = [f.shape[1] for f in layers["mf-auto"]._filters()[1]]
            pick = layers["mf-auto"]._pick(x, ks)
            for backward in (False, True):
                runs = {name: _runner(layer, x, backward) for name, layer in layers.items()}
                times = {name: [] for name in runs}
                for _ in range(args.rounds):
                    for name, fn in runs.items():
                        times[name].append(time_fn(fn, device, min_time))
                for name, ts in times.items():
                    p50s = [t[0] for t in ts]
                    ratio = statistics.median(t[0] / b[0] for t, b in zip(ts, times["conv3d"]))
                    rows.append({"op": "mfconv3d", "shape": f"{n}x{c}x{size}^3", "stride": stride, "K": ks[0],
                                 "dtype": args.dtype, "pass": "fwd+bwd" if backward else "fwd", "impl": name,
                                 "auto_pick": pick, "p50_ms": f"{statistics.median(p50s):.2f}",
                                 "p20_ms": f"{statistics.median(t[1] for t in ts):.2f}",
                                 "p80_ms": f"{statistics.median(t[2] for t in ts):.2f}",
                                 "x_vs_conv3d": f"{ratio:.2f}", **env})
                print(f"{n}x{c}x{size}^3 stride {stride} {'fwd+bwd' if backward else 'fwd'} done", flush=True)
    report(rows, args, "mfconv3d", ["shape", "stride", "K", "pass", "impl", "auto_pick", "p50_ms", "x_vs_conv3d"],
           f", {args.threads} thread(s), {args.rounds} interleaved rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One command for a GPU machine: build, GPU tests, kernel benchmarks and a short training run.

    make gpu-check                       # or: python bench/gpu_check.py [options]
    python bench/gpu_check.py --dry-run  # the plan, each step simulated (runs on CPU, seconds)

Made for a machine with one CUDA GPU, torch with CUDA, triton, ninja and pybind11 installed and
no package registry, where GPU time comes rarely and briefly: the whole run fits in --budget
seconds (default 470, under 8 minutes), every step has its own timeout, a failing or timed-out
step does not stop the others, and one call gives the whole picture. Steps:

    env            device, capability, torch / triton / CUDA / cuDNN / nvcc versions, git sha, which
                   optional packages are present (they explain later failures)
    build          pip install --no-build-isolation --no-deps --no-index -e .  (the machine's python,
                   never the network; TORCH_CUDA_ARCH_LIST = this GPU's capability only)
    ext            the build has CUDA kernels: msconv.info()['cuda_ops'], backend per op on cuda
    pytest-gpu     pytest -m gpu (TRITON_INTERPRET unset: Triton compiles for the GPU), 3-D tests aside
    pytest-gpu-3d  pytest -m gpu tests/test_transfer3d.py: the 3-D CUDA and Triton kernels
    bench-transfer bench/bench_transfer.py --quick --device cuda   restrict/prolong/pyramid vs torch
    bench-transfer3d bench/bench_transfer3d.py --quick --device cuda  the 3-D ops vs avg_pool3d/interpolate
    bench-mf_jets  bench/bench_mf_jets.py  --quick --device cuda   jets kernels vs reference/dense
    bench-mfconv   bench/bench_mfconv.py   --quick --device cuda   MFConv2d vs dense stencil / 3x3 conv
    train          msconv compare --modes single,fmg --device cuda  (a short budget)

Everything goes to bench/results/gpu/<device>/ (or --out): gpu_check.csv (one row per step:
status, seconds, rc, detail, and the device, torch, triton, CUDA versions and git sha), env.json,
logs/<step>.log, the benchmark CSVs, compare/ (the training run) and summary.md (the table
printed at the end). Exit status 0 when every step passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUDGET_S = 470.0  # under the 8 minutes a GPU session is planned around, with margin
OPTIONAL = ["pytest", "pytest_timeout", "triton", "ninja", "pybind11", "numpy", "skimage", "PIL", "tqdm",
            "yaml", "matplotlib", "tensorboard", "torchmetrics"]

# Printed by the env step as one JSON line; runs in a subprocess so that this process never
# initialises CUDA (it would hold GPU memory for the whole run).
ENV_PROBE = r"""
import importlib.util, json, os, platform, shutil, subprocess, sys
import torch
d = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
     "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
     "cuda_available": torch.cuda.is_available()}
try:
    import triton
    d["triton"] = triton.__version__
except ImportError:
    d["triton"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    d.update(device=p.name, capability="%d.%d" % (p.major, p.minor), sms=p.multi_processor_count,
             memory_gib=round(p.total_memory / 2**30, 1))
nvcc = shutil.which("nvcc")
if nvcc is None:
    from torch.utils.cpp_extension import CUDA_HOME
    cand = CUDA_HOME and (CUDA_HOME + "/bin/nvcc")
    nvcc = cand if cand and os.path.exists(cand) else None
d["nvcc"] = None
if nvcc:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    d["nvcc"] = (out.strip().splitlines() or ["?"])[-1]
d["modules"] = {m: importlib.util.find_spec(m) is not None for m in sys.argv[1].split(",")}
print("ENV_JSON " + json.dumps(d))
"""

EXT_PROBE = r"""
import json, msconv
d = msconv.info()
print(json.dumps(d, indent=1))
assert d["cpp_ops"], "msconv._C did not load: the build failed (see logs/build.log)"
assert d["cuda_ops"], ("msconv was built without its CUDA kernels (no nvcc / CUDA_HOME at build time, "
                       "or a CPU torch); see logs/build.log")
print("EXT cuda backends: " + ", ".join("%s=%s" % kv for kv in d["backends"].get("cuda", {}).items()))
"""


@dataclass
class Step:
    name: str
    cmd: list
    timeout: float
    what: str
    env: dict = field(default_factory=dict)
    needs: tuple = ()  # python modules without which the step is skipped (named in the detail)


@dataclass
class Result:
    step: str
    status: str  # ok | FAIL | TIMEOUT | SKIP
    seconds: float
    rc: int | None
    timeout_s: float
    detail: str
    log: str


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def slug(name: str) -> str:
    """A directory name for a device: 'NVIDIA H200' -> 'NVIDIA_H200'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unknown-device"


def plan(py: str, out: str, args, env: dict) -> list[Step]:
    """The steps in run order (most important first, so a short budget drops the least)."""
    cap = env.get("capability")
    build_env = {"MAX_JOBS": str(os.cpu_count() or 4), "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    if cap:
        build_env["TORCH_CUDA_ARCH_LIST"] = cap  # this GPU only: a fraction of the default build time

    def pytest_cmd(xml, *where):
        cmd = [py, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "--durations=15", "-p", "no:cacheprovider",
               "--junitxml", os.path.join(out, xml), *where]
        if env.get("modules", {}).get("pytest_timeout"):
            cmd[5:5] = ["--timeout", "120"]
        return cmd

    # The 3-D kernel tests are a step of their own (Triton compiles a kernel per tap count and
    # layout there), so that they neither crowd out nor wait on the 2-D ones.
    transfer3d_tests = os.path.join("tests", "test_transfer3d.py")
    bench = lambda name, t: Step(  # noqa: E731
        f"bench-{name}", [py, os.path.join("bench", f"bench_{name}.py"), "--quick", "--device", "cuda",
                          "--out", os.path.join(out, f"{name}.csv")], t,
        f"bench/bench_{name}.py --quick on cuda -> {name}.csv")
    compare = lambda name, folder, extra, t, what: Step(  # noqa: E731
        name, [py, "-m", "msconv", "compare", "--modes", "single,fmg", "--device", "cuda",
               "--budget", str(args.train_budget), "--val-points", "8", "--seed", "0", *extra,
               "--out", os.path.join(out, folder), "--no-progress", "--no-tensorboard", "--no-count-flops"], t, what,
        needs=("skimage", "PIL", "yaml", "matplotlib", "torchmetrics"))
    return [
        Step("build", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."],
             180, "pip install -e . (CUDA kernels for this GPU, no network)", build_env),
        Step("ext", [py, "-c", EXT_PROBE], 60, "msconv imports with its CUDA kernels"),
        Step("pytest-gpu", pytest_cmd("pytest_gpu.xml", "tests", f"--ignore={transfer3d_tests}"), 150,
             "pytest -m gpu (3-D transfer tests aside)", {"TRITON_INTERPRET": None}, needs=("pytest",)),
        Step("pytest-gpu-3d", pytest_cmd("pytest_gpu_3d.xml", transfer3d_tests), 90,
             "pytest -m gpu tests/test_transfer3d.py (3-D CUDA and Triton kernels)", {"TRITON_INTERPRET": None},
             needs=("pytest",)),
        bench("transfer", 50),
        bench("transfer3d", 45),
        bench("mf_jets", 40),
        bench("mfconv", 50),
        compare("train", "compare", [], 75,
                f"msconv compare single vs fmg, {args.train_budget:g} work units, on cuda -> compare/"),
        # The same comparison with what small coarse grids need on a GPU: bf16 autocast,
        # channels_last and torch.compile with dynamic shapes (one graph for every grid size).
        compare("train-fast", "compare_fast", ["--precision", "bf16", "--channels-last", "--compile"], 90,
                "the same with --precision bf16 --channels-last --compile -> compare_fast/"),
    ]


def _kill(proc: subprocess.Popen) -> None:
    """End the step's whole process group (pytest, pip and ninja start children of their own)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, logs: str, timeout: float, env_ok: dict, left: float) -> Result:
    """Run one step with its output in logs/<step>.log; ``left``: seconds of the run's budget."""
    log = os.path.join(logs, f"{step.name}.log")
    missing = [m for m in step.needs if not env_ok.get(m, True)]
    if missing:
        with open(log, "w") as f:
            f.write(f"skipped: python modules missing on this machine: {', '.join(missing)}\n")
        return Result(step.name, "SKIP", 0.0, None, step.timeout, f"missing: {', '.join(missing)}", log)
    if left < 5:
        with open(log, "w") as f:
            f.write("skipped: the run's --budget was spent by earlier steps\n")
        return Result(step.name, "SKIP", 0.0, None, step.timeout, "out of time (--budget)", log)
    env = dict(os.environ)
    for k, v in step.env.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    env.setdefault("PYTHONUNBUFFERED", "1")
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(step.cmd if step.cmd[1:2] != ["-c"] else step.cmd[:2] + ["<script>"]) + "\n")
        f.flush()
        proc = subprocess.Popen(step.cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout)
            status = "ok" if rc == 0 else "FAIL"
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc, status = proc.returncode, "TIMEOUT"
            f.write(f"\n[gpu_check] killed after {timeout:.0f} s\n")
    seconds = time.monotonic() - t0
    with open(log, errors="replace") as f:
        text = f.read()
    detail = describe(step.name, text, status, timeout)
    return Result(step.name, status, seconds, rc, round(timeout), detail, log)


def describe(name: str, text: str, status: str, timeout: float) -> str:
    """One line for the summary table, from the step's log."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if status == "TIMEOUT":
        return f"timed out after {timeout:.0f} s"
    if name.startswith("pytest-gpu"):
        m = [ln for ln in lines if re.search(r"\d+ (passed|failed|error|skipped|deselected)", ln)]
        if m:
            return m[-1].strip("= ")
    if name == "ext" and status == "ok":
        m = [ln for ln in lines if ln.startswith("EXT ")]
        return m[-1][4:] if m else "ok"
    if name.startswith("bench-") and status == "ok":
        m = [ln for ln in lines if ln.startswith("wrote ")]
        return m[-1] if m else "ok"
    if status != "ok":
        # The last line that looks like an error says most.
        err = [ln for ln in lines if re.search(r"Error|error:|FAILED|assert", ln)]
        return (err[-1] if err else lines[-1] if lines else f"exit {status}")[:160]
    return "ok"


def train_detail(out: str, folder: str = "compare") -> str:
    try:
        with open(os.path.join(out, folder, "summary.json")) as f:
            runs = json.load(f)["runs"]
    except (OSError, ValueError, KeyError):
        return ""
    return "; ".join(f"{r['mode']} {r['psnr']:.2f} dB in {r['wall_clock_s']:.1f} s ({r['iterations']} it)"
                     for r in runs)


def table(results: list[Result]) -> str:
    rows = [("step", "status", "seconds", "detail")] + [
        (r.step, r.status, f"{r.seconds:.1f}", r.detail) for r in results]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    fmt = lambda r: f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]}"  # noqa: E731
    return "\n".join([fmt(rows[0]), fmt(["-" * x for x in w] + ["------"]), *map(fmt, rows[1:])])


def simulate(steps: list[Step], fail: set, hang: set) -> list[Step]:
    """--dry-run: the same runner, each command replaced by one that prints it (or fails / hangs)."""
    out = []
    for s in steps:
        shown = " ".join(s.cmd if s.cmd[1:2] != ["-c"] else s.cmd[:2] + ["<script>"])
        if s.name in hang:
            code = "import time; print('simulated hang'); time.sleep(600)"
        elif s.name in fail:
            code = "import sys; print('RuntimeError: simulated failure'); sys.exit(3)"
        else:
            code = f"print({('would run: ' + shown)!r})"
        out.append(Step(s.name, [sys.executable, "-c", code], s.timeout, s.what, s.env, s.needs))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="results folder (default bench/results/gpu/<device>/; --dry-run: a temp folder)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for the whole run; a step's timeout is cut to what is left (default {DEFAULT_BUDGET_S:g})")
    p.add_argument("--only", help="comma-separated steps to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out, e.g. build on a rerun")
    p.add_argument("--train-budget", type=float, default=1200, help="work units per mode of the training run (default 1200)")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every step's timeout (a slower GPU)")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU needed: print the plan and run the runner with each command simulated")
    p.add_argument("--simulate-fail", default="", help="--dry-run: comma-separated steps that fail")
    p.add_argument("--simulate-timeout", default="", help="--dry-run: comma-separated steps that hang until their timeout")
    p.add_argument("--python", default=sys.executable, help="the python that builds and runs everything (default: this one)")
    args = p.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget
    if args.budget <= 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget}")

    # env first: the results folder is named after the device.
    probe = [args.python, "-c", ENV_PROBE, ",".join(OPTIONAL)]
    env = {"device": "unknown-device"}
    t0 = time.monotonic()
    try:
        r = subprocess.run(probe, capture_output=True, text=True, timeout=90, cwd=ROOT)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("ENV_JSON ")]
        env_status = "ok" if line else "FAIL"
        if line:
            env.update(json.loads(line[-1][len("ENV_JSON "):]))
            if args.dry_run:
                env["device"] = "dry-run on " + (env["device"] if env.get("cuda_available") else "CPU")
        env_text = r.stdout + r.stderr
    except subprocess.TimeoutExpired:
        env_status, env_text = "TIMEOUT", "env probe timed out after 90 s"
    if not args.dry_run and env_status == "ok" and not env.get("cuda_available"):
        env_status = "FAIL"
        env_text += "\ntorch.cuda.is_available() is False: no GPU visible (or a CPU build of torch)\n"
    env["git"] = git_sha()
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    out = args.out or (tempfile.mkdtemp(prefix="gpu_check_dry_") if args.dry_run else
                       os.path.join(ROOT, "bench", "results", "gpu", slug(env["device"])))
    out = os.path.abspath(out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    with open(os.path.join(logs, "env.log"), "w") as f:
        f.write(env_text)
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(env, f, indent=1)
    missing = [m for m, ok in env.get("modules", {}).items() if not ok]
    env_detail = (f"{env.get('device')} sm_{str(env.get('capability', '?')).replace('.', '')}, torch {env.get('torch')}, "
                  f"CUDA {env.get('cuda')}, triton {env.get('triton')}"
                  + (f"; missing: {', '.join(missing)}" if missing else "")) if env_status == "ok" else \
        (env_text.strip().splitlines() or ["env probe failed"])[-1][:160]
    results = [Result("env", env_status, time.monotonic() - t0, 0 if env_status == "ok" else 1, 90, env_detail,
                      os.path.join(logs, "env.log"))]

    steps = plan(args.python, out, args, env)
    names = [s.name for s in steps]
    chosen = set(args.only.split(",")) if args.only else set(names)
    for n in (chosen | set(filter(None, args.skip.split(",")))) - set(names) - {"env"}:
        p.error(f"unknown step {n!r} in --only/--skip; steps are env (always run), {', '.join(names)}")
    steps = [s for s in steps if s.name in chosen and s.name not in args.skip.split(",")]
    if args.dry_run:
        print(f"gpu_check --dry-run: {len(steps)} steps, budget {args.budget:g} s, results in {out}")
        for s in steps:
            print(f"  {s.name:<16} timeout {s.timeout * args.timeout_scale:>4.0f} s  {s.what}")
        steps = simulate(steps, set(filter(None, args.simulate_fail.split(","))),
                         set(filter(None, args.simulate_timeout.split(","))))
    modules = env.get("modules", {})
    for s in steps:
        left = deadline - time.monotonic()
        timeout = min(s.timeout * args.timeout_scale, left)
        print(f"[gpu_check] {s.name}: {s.what} (timeout {max(timeout, 0):.0f} s)", flush=True)
        r = run_step(s, logs, timeout, {} if args.dry_run else modules, left)
        if s.name in ("train", "train-fast") and r.status == "ok" and not args.dry_run:
            r.detail = train_detail(out, "compare" if s.name == "train" else "compare_fast") or r.detail
        results.append(r)
        print(f"[gpu_check] {s.name}: {r.status} in {r.seconds:.1f} s  {r.detail}", flush=True)
        if r.status in ("FAIL", "TIMEOUT"):
            with open(r.log, errors="replace") as f:
                tail = f.read().splitlines()[-15:]
            print("    | " + "\n    | ".join(tail), flush=True)

    cols = {k: env.get(k) for k in ("device", "capability", "torch", "cuda", "cudnn", "triton", "nvcc", "python",
                                     "git", "date")}
    with open(os.path.join(out, "gpu_check.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "status", "seconds", "rc", "timeout_s", "detail", "log", *cols])
        w.writeheader()
        for r in results:
            w.writerow({"step": r.step, "status": r.status, "seconds": round(r.seconds, 1), "rc": r.rc,
                        "timeout_s": r.timeout_s, "detail": r.detail, "log": os.path.relpath(r.log, out), **cols})
    total = time.monotonic() - start
    head = (f"gpu_check on {env.get('device')} (torch {env.get('torch')}, CUDA {env.get('cuda')}, "
            f"triton {env.get('triton')}, git {env.get('git')}): {total:.0f} s")
    text = head + "\n\n" + table(results) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(head + "\n\n```\n" + table(results) + "\n```\n")
    print("\n" + text + f"\nresults in {out}")
    bad = [r.step for r in results if r.status != "ok"]
    if bad:
        print(f"not ok: {', '.join(bad)} (logs in {logs})")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

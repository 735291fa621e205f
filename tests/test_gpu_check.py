"""bench/gpu_check.py (`make gpu-check`) on the CPU: the plan, the runner with each command simulated
(--dry-run), a failing and a hanging step that do not stop the others, the CSV and the summary
table, and the real commands' options against the parsers they go to."""
import csv
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")
STEPS = ["env", "build", "ext", "pytest-gpu", "pytest-gpu-3d", "bench-transfer", "bench-transfer3d", "bench-mf_jets",
         "bench-mfconv", "train", "train-fast"]


def _load():
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules["gpu_check"]


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, "--dry-run", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def _rows(out):
    with open(os.path.join(out, "gpu_check.csv")) as f:
        return list(csv.DictReader(f))


def test_dry_run_lists_runs_and_records_every_step(tmp_path):
    r = _run("--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    for s in STEPS[1:]:
        assert f"  {s} " in r.stdout  # the plan
    rows = _rows(tmp_path)
    assert [x["step"] for x in rows] == STEPS
    assert {x["status"] for x in rows} == {"ok"}
    for col in ("device", "torch", "triton", "cuda", "git", "seconds", "detail"):
        assert col in rows[0], col
    assert rows[0]["git"] and rows[0]["torch"]
    # the summary table, printed and saved
    assert any(line.split() == ["step", "status", "seconds", "detail"] for line in r.stdout.splitlines())
    for s in STEPS:
        assert any(line.startswith(s + " ") for line in r.stdout.splitlines()), s
    assert (tmp_path / "summary.md").read_text().count("\n") > len(STEPS)
    assert (tmp_path / "logs" / "build.log").read_text().startswith("$ ")
    assert "would run:" in (tmp_path / "logs" / "build.log").read_text()


def test_failing_and_hanging_steps_do_not_stop_the_rest(tmp_path):
    r = _run("--out", str(tmp_path), "--simulate-fail", "ext", "--simulate-timeout", "bench-mf_jets",
             "--timeout-scale", "0.03")
    assert r.returncode == 1, r.stdout + r.stderr
    status = {x["step"]: x["status"] for x in _rows(tmp_path)}
    assert status.pop("ext") == "FAIL"
    assert status.pop("bench-mf_jets") == "TIMEOUT"
    assert set(status.values()) == {"ok"} and "train" in status
    assert "not ok: ext, bench-mf_jets" in r.stdout
    assert "simulated failure" in r.stdout  # a failing step's log tail is printed


def test_budget_spent_skips_the_remaining_steps(tmp_path):
    # Every simulated step hangs; a 6 s budget ends the first after ~1 s of budget left for it.
    r = _run("--out", str(tmp_path), "--budget", "6", "--simulate-timeout", ",".join(STEPS[1:]))
    assert r.returncode == 1
    status = [x["status"] for x in _rows(tmp_path)]
    assert status[0] == "ok" and "SKIP" in status and "ok" not in status[1:]


def test_bad_options_are_clear_errors():
    r = _run("--only", "bogus")
    assert r.returncode == 2 and "unknown step 'bogus'" in r.stderr and "pytest-gpu" in r.stderr
    r = _run("--budget", "0")
    assert r.returncode == 2 and "--budget must be > 0" in r.stderr


def test_real_commands_match_their_parsers():
    gc = _load()

    class A:
        train_budget = 1200

    steps = {s.name: s for s in gc.plan(sys.executable, "/tmp/out", A, {"capability": "9.0", "modules": {}})}
    assert set(steps) == set(STEPS[1:])
    build = steps["build"].cmd
    for flag in ("--no-build-isolation", "--no-deps", "--no-index", "-e"):
        assert flag in build  # never the network on a machine without a package registry
    assert steps["build"].env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert steps["pytest-gpu"].cmd[3:5] == ["-m", "gpu"] and steps["pytest-gpu"].env == {"TRITON_INTERPRET": None}
    # The 3-D kernel tests run once: in their own step, not again in the general one.
    t3d = os.path.join("tests", "test_transfer3d.py")
    assert steps["pytest-gpu-3d"].cmd[3:5] == ["-m", "gpu"] and steps["pytest-gpu-3d"].cmd[-1] == t3d
    assert os.path.exists(os.path.join(ROOT, t3d)) and f"--ignore={t3d}" in steps["pytest-gpu"].cmd
    assert steps["pytest-gpu-3d"].env == {"TRITON_INTERPRET": None}
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        from _common import kernel_parser
    finally:
        sys.path.pop(0)
    for name in ("transfer", "transfer3d", "mf_jets", "mfconv"):
        cmd = steps[f"bench-{name}"].cmd
        assert os.path.exists(os.path.join(ROOT, cmd[1])), cmd[1]
        a = kernel_parser("", name, "").parse_args(cmd[2:])
        assert a.device == "cuda" and a.quick and a.out.endswith(f"{name}.csv")
    from msconv.cli import build_parser

    cmd = steps["train"].cmd
    assert cmd[1:3] == ["-m", "msconv"]
    a = build_parser().parse_args(cmd[3:])
    assert a.command == "compare" and a.device == "cuda" and a.modes == "single,fmg"
    fast = build_parser().parse_args(steps["train-fast"].cmd[3:])
    assert fast.precision == "bf16" and fast.channels_last and fast.compile and fast.device == "cuda"
    # The run's budget (env probe included) plus killing the last step (<= 10 s) fits 8 minutes.
    assert gc.DEFAULT_BUDGET_S + 10 <= 8 * 60


@pytest.mark.parametrize("name,expect", [("NVIDIA H200", "NVIDIA_H200"), ("NVIDIA H100 80GB HBM3", "NVIDIA_H100_80GB_HBM3"),
                                         ("", "unknown-device")])
def test_device_folder_name(name, expect):
    assert _load().slug(name) == expect


def test_describe_reads_pytest_and_bench_logs():
    gc = _load()
    log = "....\n== 40 passed, 3 skipped, 900 deselected in 52.1s ==\n"
    assert gc.describe("pytest-gpu", log, "FAIL", 100) == "40 passed, 3 skipped, 900 deselected in 52.1s"
    assert gc.describe("bench-transfer", "table\nwrote /x/transfer.csv\n", "ok", 50) == "wrote /x/transfer.csv"
    assert gc.describe("train", "x\nRuntimeError: CUDA out of memory\nmore\n", "FAIL", 75) == \
        "RuntimeError: CUDA out of memory"
    assert gc.describe("train", "", "TIMEOUT", 75) == "timed out after 75 s"

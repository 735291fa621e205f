"""`msconv train | compare | info` end to end on a tiny configuration, through the real CLI."""
import json
import os
import subprocess
import sys

import pytest

from msconv.cli import main

from _photo_data import photo_dir  # noqa: F401 - the fixture (tests/_photo_data.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(photo_dir, out):
    return ["--data", photo_dir, "--crop", "32", "--depth", "3", "--width", "4", "--batch-size", "2",
            "--val-crop", "32", "--val-points", "3", "--no-progress", "--threads", "1", "--out", str(out)]


def test_train_writes_its_files_and_resumes(photo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    fmg = ["train", "--mode", "fmg", "--iterations", "6", "--levels", "2", "--fmg-iteration-ratio", "2"]
    assert main(fmg + ["--max-steps", "4"] + tiny_args(photo_dir, out)) == 0
    assert "stopped at step 4" in capsys.readouterr().out
    assert not (out / "result.json").exists()
    assert main(fmg + ["--resume"] + tiny_args(photo_dir, out)) == 0
    assert "fmg/standard finished" in capsys.readouterr().out
    for f in ["metrics.csv", "checkpoint.pt", "result.json", "model.pt", "config.json"]:
        assert (out / f).exists(), f
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(out / "tb"))
    r = json.loads((out / "result.json").read_text())
    assert r["iterations"] == 6 and r["mode"] == "fmg" and [s["base_level"] for s in r["stages"]] == [2, 1, 0]
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,stage,level,loss") and len(lines) == 1 + 1 + 6


def test_yaml_config_and_command_line_precedence(photo_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: inpaint\nmodel: unet\nmode: mge\nlevels: 1\niterations: 2\nwidth: 8\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--width", "4"] + tiny_args(photo_dir, out)) == 0
    c = json.loads((out / "config.json").read_text())
    assert (c["task"], c["model"], c["mode"], c["levels"], c["width"]) == ("inpaint", "unet", "mge", 1, 4)


def test_compare_cli(photo_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--modes", "single,mge,fmg", "--budget", "10"] + tiny_args(photo_dir, out)) == 0
    printed = capsys.readouterr().out
    assert "| single |" in printed and "| fmg |" in printed
    s = json.loads((out / "summary.json").read_text())
    assert [r["mode"] for r in s["runs"]] == ["single", "mge", "fmg"] and s["config"]["budget"] == 10
    for f in ["summary.md", "psnr_vs_work_units.png", "psnr_vs_wall_clock.png", "single/metrics.csv", "fmg/result.json"]:
        assert (out / f).exists(), f


def test_corrupt_image_file_is_named(photo_dir, tmp_path, capsys):
    bad = tmp_path / "data"
    bad.mkdir()
    for f in os.listdir(photo_dir):
        (bad / f).write_bytes((open(os.path.join(photo_dir, f), "rb")).read())
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00 truncated")
    args = tiny_args(str(bad), tmp_path / "run") + ["--iterations", "1"]
    assert main(["train"] + args) == 2
    assert "broken.png" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="broken.png"):
        assert main(["train", "--skip-bad-files"] + args) == 0


def test_bad_checkpoint_and_nan_exit_codes(photo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"garbage")
    assert main(["train", "--resume", "--iterations", "2"] + tiny_args(photo_dir, out)) == 4
    assert "checkpoint.pt" in capsys.readouterr().err
    out2 = tmp_path / "nan"
    rc = main(["train", "--iterations", "3", "--inject-nan-at", "2", "--on-nonfinite", "stop"] + tiny_args(photo_dir, out2))
    assert rc == 3 and "not finite" in capsys.readouterr().err


def test_bad_options_are_clear(photo_dir, tmp_path, capsys):
    assert main(["train", "--mode", "mge", "--crop", "30", "--data", photo_dir, "--out", str(tmp_path)]) == 2
    assert "--crop" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--optimizer", "adagrad"])


@pytest.mark.parametrize("cmd", ["train", "compare", "bench", "info"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage: msconv" in capsys.readouterr().out


def test_info_runs_as_a_module():
    p = subprocess.run([sys.executable, "-m", "msconv", "info"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and "torch" in p.stdout.lower()


@pytest.mark.slow
def test_torchrun_two_gloo_processes_train_and_resume_like_one(photo_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m msconv train`: each rank trains on its share of every level's
    batch with averaged gradients, so the run matches a one-process run up to float rounding; rank 0
    alone writes the files, and --resume continues under torchrun (about 30 s on 2 CPU cores)."""
    import csv

    import torch

    # Fixed allocation: the variance-matched default rounds each level up to a multiple of the
    # world size (2 here, 1 alone), so its sizes, and with them the weights, differ by design.
    args = ["--mode", "mge", "--levels", "1", "--allocation", "fixed", "--iterations", "6", "--no-tensorboard"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *args] + tiny_args(photo_dir, one)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "msconv", "train"]
    for extra in (["--max-steps", "3"] + args + tiny_args(photo_dir, two), ["--resume", "--out", str(two)]):
        p = subprocess.run(torchrun + extra, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.count("mge/standard") == 1  # rank 0 alone reports
    rows = list(csv.DictReader(open(two / "metrics.csv")))
    rows_one = list(csv.DictReader(open(one / "metrics.csv")))
    assert [r["step"] for r in rows] == [str(i) for i in range(7)]
    # The same (global) batch sizes step by step: the ranks agree on the allocation's measurements.
    assert [r["batch_sizes"] for r in rows] == [r["batch_sizes"] for r in rows_one]
    a, b = json.loads((one / "result.json").read_text()), json.loads((two / "result.json").read_text())
    assert b["processes"] == 2 and b["work_units"] == a["work_units"] and b["psnr"] == pytest.approx(a["psnr"], abs=1e-3)
    wa, wb = torch.load(one / "model.pt"), torch.load(two / "model.pt")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    assert not [n for n in os.listdir(two) if n.startswith(".")]  # no temporaries or probes left

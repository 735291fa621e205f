"""Every paper experiment script (bench/paper_*.py) runs end to end on a tiny budget.

``--tiny`` swaps the standard benchmark folders for the bundled photographs and shrinks the
model, crops and budget, so this checks the plumbing (configs, runs, CSV/JSON/plots), not the
figures; the figures come from the full runs (``make bench-paper``).
"""
import csv
import glob
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench")
SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(BENCH, "paper_*.py")))


def test_every_experiment_is_covered():
    assert SCRIPTS == ["paper_curves", "paper_denoise", "paper_large_batch", "paper_tasks", "paper_transfer",
                       "paper_variance"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_experiment_runs_on_a_tiny_budget(script, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import importlib

    mod = importlib.import_module(script)
    extra = {"paper_denoise": ["--sigmas", "25"], "paper_curves": ["--halvings", "1"],
             "paper_large_batch": ["--multipliers", "16", "--optimizers", "sgd,lars"]}.get(script, [])
    assert mod.main(["--tiny", "--out", str(tmp_path), "--runs", str(tmp_path / "runs"), *extra]) == 0
    csvs = glob.glob(str(tmp_path / "*.csv"))
    assert len(csvs) == 1
    rows = list(csv.DictReader(open(csvs[0])))
    assert rows and all(r["device"] for r in rows)
    if script not in ("paper_variance", "paper_transfer"):
        assert {r["mode"] for r in rows} <= {"single", "mge", "fmg"}
        assert all(float(r["work_units"]) > 0 and r["val_psnr"] for r in rows)
    assert glob.glob(str(tmp_path / "*.png"))


def test_missing_data_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import paper_denoise

    with pytest.raises(SystemExit, match="--data-root"):
        paper_denoise.main(["--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path)])


@pytest.mark.slow
def test_volume_fmg_quick_runs_end_to_end(tmp_path):
    """bench/volume_fmg.py --quick on the MNI T1 volume (about a minute on one core)."""
    import subprocess

    vol = os.path.join(BENCH, "..", "..", "shared", "data", "volumes", "mni_icbm152_t1.nii.gz")
    if not os.path.exists(vol):
        pytest.skip("../shared/data/volumes is not here")
    pytest.importorskip("nibabel")
    p = subprocess.run([sys.executable, os.path.join(BENCH, "volume_fmg.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "summary_quick.csv")))
    assert [r["mode"] for r in rows] == ["single", "small", "fmg"]
    assert all(float(r["val_psnr"]) > float(r["input_psnr"]) - 0.5 for r in rows)

"""One owner per run folder: a second run refuses and names the holder, a crashed run's lock is
taken over, and a fresh run never overwrites a resumable one silently."""
import json
import os
import subprocess
import sys

import pytest

from msconv.cli import main
from msconv.train import TrainConfig, Trainer
from msconv.train.compare import compare
from msconv.train.config import ConfigError
from msconv.train.folder import LOCK_NAME, run_folder_lock

from _photo_data import photo_dir  # noqa: F401 - the fixture (tests/_photo_data.py)


def tiny(photo_dir, out, **kw):
    base = dict(data=photo_dir, crop=32, depth=2, width=4, batch_size=2, iterations=4, val_crop=32, val_points=1,
                progress=False, tensorboard=False, out=str(out), threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _lock(out, pid):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, LOCK_NAME), "w") as fh:
        json.dump({"pid": pid, "host": os.uname().nodename, "started": "2026-12-06 10:00:00"}, fh)


def test_a_second_run_on_a_folder_in_use_refuses_and_names_the_holder(photo_dir, tmp_path):
    # Before: two runs with the same --out both exited 0 and interleaved their metrics.csv rows.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(tmp_path, holder.pid)
        with pytest.raises(ConfigError, match=rf"in use by another msconv run \(pid {holder.pid} on .*another --out"):
            Trainer(tiny(photo_dir, tmp_path)).run()
        assert not (tmp_path / "metrics.csv").exists()
        with pytest.raises(ConfigError, match="in use by another msconv run"):
            compare(tiny(photo_dir, tmp_path), modes=["single"])
    finally:
        holder.kill()
        holder.wait()


def test_a_crashed_runs_lock_is_taken_over_and_a_finished_run_releases_it(photo_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock(tmp_path, dead.pid)
    r = Trainer(tiny(photo_dir, tmp_path)).run()
    assert r["complete"] and not (tmp_path / LOCK_NAME).exists()
    with run_folder_lock(str(tmp_path)):
        with run_folder_lock(str(tmp_path)):  # re-entrant in one process (compare, then its modes)
            assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_fresh_run_does_not_overwrite_a_resumable_one(photo_dir, tmp_path, capsys):
    # Before: the second command silently replaced the first run's checkpoint, metrics and config.
    args = ["train", "--data", photo_dir, "--crop", "32", "--depth", "2", "--width", "4", "--iterations", "6",
            "--val-points", "1", "--no-progress", "--no-tensorboard", "--threads", "1", "--out", str(tmp_path)]
    assert main(args + ["--max-steps", "3"]) == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds an unfinished run (checkpoint at step 3)" in err and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert main(args + ["--resume"]) == 0
    assert main(args) == 0  # the run finished: a new one may start there
    assert main(args + ["--max-steps", "2"]) == 0 and main(args + ["--overwrite"]) == 0


def test_compare_refuses_a_mode_given_twice(photo_dir, tmp_path):
    with pytest.raises(ConfigError, match="single given more than once"):
        compare(tiny(photo_dir, tmp_path), modes=["single", "single"])


def test_a_fifo_named_like_an_image_is_skipped_not_waited_on(photo_dir, tmp_path):
    # Before: PIL.Image.open blocked on the FIFO and the run hung for ever.
    import shutil
    import warnings

    from msconv.data import load_folder

    d = tmp_path / "photos"
    shutil.copytree(photo_dir, d)
    os.mkfifo(d / "zz_pipe.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_folder(str(d))
    assert len(ds) == len(os.listdir(photo_dir)) and "zz_pipe.png" not in ds.names
    assert any("not a regular file" in str(w.message) for w in caught)


@pytest.mark.parametrize("kind", ["float_888", "int32_200000", "float_negative"])
def test_high_range_tiffs_are_scaled_by_their_range_not_clipped(tmp_path, kind):
    # Before: a float TIFF with values 0..888 loaded with 77% of its pixels at 1.0.
    import warnings

    import numpy as np
    from PIL import Image

    from msconv.data import load_image

    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    a = {"float_888": (ramp * 888).astype(np.float32), "int32_200000": (ramp * 200000).astype(np.int32),
         "float_negative": (ramp * 2 - 1).astype(np.float32)}[kind]
    path = str(tmp_path / "x.tif")
    Image.fromarray(a).save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = load_image(path)
    assert float(t.min()) == 0.0 and float(t.max()) == 1.0
    assert float((t >= 1.0).float().mean()) < 0.01  # not saturated
    assert np.allclose(t[0].numpy(), ramp, atol=1e-4)
    assert any("scaled by that range" in str(w.message) for w in caught)


def test_ordinary_images_load_as_before(tmp_path):
    import numpy as np
    from PIL import Image

    from msconv.data import load_image

    for a in (np.arange(256, dtype=np.uint8).reshape(16, 16), (np.arange(256).reshape(16, 16) * 200).astype(np.uint16),
              np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16),
              np.linspace(0, 255, 256, dtype=np.float32).reshape(16, 16)):
        Image.fromarray(a).save(tmp_path / "y.tif")
        t = load_image(str(tmp_path / "y.tif"))
        assert abs(float(t.max()) - float(a.max()) / {np.uint8: 255, np.uint16: 65535}.get(a.dtype.type, 255 if a.max() > 1 else 1)) < 1e-6


def test_psnr_refuses_targets_outside_the_unit_range():
    # Before: psnr_ssim(t, t) on identical 0..255 images scored -43 dB (only the prediction was clipped).
    import torch

    from msconv.train.metrics import psnr_ssim

    t = torch.rand(1, 16, 16) * 255
    with pytest.raises(ValueError, match=r"target values span \[.*\], outside \[0, 1\].*target / 255"):
        psnr_ssim(t, t)
    with pytest.raises(ValueError, match="target must be a floating image"):
        psnr_ssim(t, t.to(torch.uint8))
    u = torch.rand(1, 16, 16)
    assert psnr_ssim(u, u)[0] == 100.0


@pytest.mark.parametrize("kw,match", [
    (dict(levels=-1), "levels=-1"), (dict(batch_sizes=[]), "batch_sizes=\\[\\]"), (dict(budget=-100.0), "budget=-100"),
    (dict(budget=float("nan")), "budget=nan"), (dict(budget=None, iterations=0), "iterations=0"),
    (dict(iteration_ratio=0), "iteration_ratio=0"), (dict(iteration_ratio=-1.0), "iteration_ratio=-1"),
    (dict(mode="mge", batch_sizes=[4]), "levels \\+ 1 = 3 sizes for mode='mge'")])
def test_plan_refuses_numbers_that_make_no_plan(kw, match):
    from msconv.multilevel import plan

    args = dict(mode="fmg", levels=2, batch_sizes=[4], budget=100.0)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        plan(args.pop("mode"), args.pop("levels"), args.pop("batch_sizes"), **args)


def test_plan_honours_a_step_count_exactly():
    # Before: --mode fmg --levels 2 --iterations 3 ran 5 steps.
    from msconv.multilevel import plan

    for n in (3, 4, 7, 14, 101):
        assert sum(s.iterations for s in plan("fmg", 2, [4], iterations=n)) == n
    with pytest.raises(ValueError, match="iterations=2 is fewer than the 3 stages"):
        plan("fmg", 2, [4], iterations=2)


def test_schedule_refuses_another_schedules_state_and_momentum_is_checked(photo_dir, tmp_path):
    from msconv.multilevel import Schedule, plan

    a = Schedule(plan("fmg", 2, [2], iterations=6))
    b = Schedule(plan("single", 0, [2], iterations=6))
    with pytest.raises(ValueError, match="another schedule's"):
        b.load_state_dict(a.state_dict())
    b.load_state_dict(Schedule(plan("single", 0, [2], iterations=6)).state_dict())
    with pytest.raises(ConfigError, match=r"--momentum must be in \[0, 1\)"):
        tiny(photo_dir, tmp_path, optimizer="sgd", momentum=2.0).validated()

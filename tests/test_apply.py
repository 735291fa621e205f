"""From a training run to restored photos: load_run rebuilds the model from the run folder alone,
tiled restoration equals whole-image inference, and `msconv apply` writes gray and colour, 8- and
16-bit images of any size, scored against references or against the inputs it degraded."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import msconv
from msconv.cli import main
from msconv.restore import RunFolderError, restore_tiled

from _photo_data import photo_dir  # noqa: F401 - the fixture (tests/_photo_data.py)


def _train(data, out, *extra):
    args = ["train", "--data", str(data), "--crop", "32", "--depth", "3", "--width", "4", "--batch-size", "2",
            "--iterations", "6", "--val-crop", "32", "--val-points", "1", "--no-progress", "--no-tensorboard",
            "--threads", "1", "--out", str(out), *extra]
    assert main(args) == 0


@pytest.fixture(scope="module")
def gray_run(photo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gray_run")
    data = root / "photos"
    shutil.copytree(photo_dir, data)
    _train(data, root / "run")
    shutil.rmtree(data)  # the run must not need its training data any more
    return root / "run"


def test_load_run_rebuilds_the_trained_model_without_its_data(gray_run):
    run = msconv.load_run(str(gray_run))
    state = torch.load(gray_run / "model.pt", weights_only=True)
    assert all(torch.equal(run.model.state_dict()[k], v) for k, v in state.items())
    assert not run.model.training and run.task.name == "denoise" and run.channels == 1
    arch = json.loads((gray_run / "config.json").read_text())["architecture"]
    assert arch["depth"] == 3 and arch["width"] == 4  # the resolved sizes, not the CLI's defaults
    assert msconv.load_run(str(gray_run / "model.pt")).channels == 1  # model.pt in a run folder works too


def test_a_run_folder_missing_its_files_is_a_clear_error(tmp_path, gray_run, capsys):
    with pytest.raises(RunFolderError, match="no config.json"):
        msconv.load_run(str(tmp_path))
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(gray_run / "config.json", partial)
    with pytest.raises(RunFolderError, match="no model.pt: the run has not finished.*--resume"):
        msconv.load_run(str(partial))
    assert main(["apply", str(partial), "--input", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no model.pt" in capsys.readouterr().err


def test_a_run_config_json_starts_a_new_run_as_a_config_file(gray_run, tmp_path, photo_dir):
    cfg = json.loads((gray_run / "config.json").read_text())
    assert cfg["resume"] is False and cfg["max_steps"] is None
    assert main(["train", "--config", str(gray_run / "config.json"), "--data", photo_dir, "--out",
                 str(tmp_path / "again"), "--no-progress"]) == 0


@pytest.mark.parametrize("model,kw", [("dncnn", {"depth": 4, "width": 4}), ("unet", {"depth": 2, "width": 4})])
def test_tiled_restoration_equals_the_whole_image(model, kw):
    from msconv.models import build_model
    from msconv.multilevel.baselines import receptive_field

    torch.manual_seed(0)
    net = build_model(model, 1, 1, **kw).eval()
    for p in net.parameters():  # random weights everywhere (a zero head would hide the tiling)
        p.data.normal_(0, 0.3)
    x = torch.rand(1, 1, 150, 203)
    halo = receptive_field(net, 1) // 2 + 1
    with torch.no_grad():
        whole = net(x)
    torch.testing.assert_close(restore_tiled(net, x, 64, halo), whole, atol=1e-5, rtol=1e-5)


def _photo(path, shape, dtype):
    rng = np.random.default_rng(0)
    top = np.iinfo(dtype).max
    a = (rng.random(shape) * top).astype(dtype)
    if dtype == np.uint16 and len(shape) == 3:
        import tifffile

        tifffile.imwrite(path, a, photometric="rgb")
    else:
        Image.fromarray(a).save(path)


@pytest.mark.parametrize("name,shape,dtype", [("gray8.png", (70, 90), np.uint8), ("rgb8.png", (70, 90, 3), np.uint8),
                                             ("gray16.png", (70, 90), np.uint16),
                                             ("rgb16.tif", (70, 90, 3), np.uint16)])
def test_apply_keeps_size_channels_and_bit_depth(gray_run, tmp_path, name, shape, dtype):
    from msconv.apply import read_photo

    src = tmp_path / "in"
    src.mkdir()
    _photo(str(src / name), shape, dtype)
    out = tmp_path / "out"
    assert main(["apply", str(gray_run), "--input", str(src / name), "--out", str(out), "--no-progress",
                 "--tile", "32"]) == 0
    rows = list(csv.DictReader(open(out / "restore.csv")))
    restored, bits = read_photo(str(out / rows[0]["output"]))
    assert bits == (16 if dtype == np.uint16 else 8)
    assert tuple(restored.shape) == ((3,) if len(shape) == 3 else (1,)) + shape[:2]


def test_apply_degrade_scores_input_and_result_and_a_reference_scores_the_result(gray_run, tmp_path, photo_dir, capsys):
    out = tmp_path / "out"
    assert main(["apply", str(gray_run), "--input", photo_dir, "--out", str(out), "--degrade", "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "restore.csv")))
    assert len(rows) == len(os.listdir(photo_dir))
    for r in rows:
        assert np.isfinite(float(r["psnr"])) and np.isfinite(float(r["input_psnr"]))
    assert "mean psnr" in capsys.readouterr().out
    # The degraded inputs it wrote, restored against the clean originals: the same scores.
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    for r in rows:
        shutil.copy(out / r["output"].replace("_restored", "_input"), noisy / r["image"].replace(".png", ".png"))
    out2 = tmp_path / "out2"
    assert main(["apply", str(gray_run), "--input", str(noisy), "--out", str(out2), "--reference", photo_dir,
                 "--no-progress"]) == 0
    rows2 = list(csv.DictReader(open(out2 / "restore.csv")))
    for a, b in zip(rows, rows2):  # the 8-bit quantisation of the saved input moves PSNR a little
        assert float(b["psnr"]) == pytest.approx(float(a["psnr"]), abs=0.3)


def test_apply_with_a_super_resolution_run_upscales(photo_dir, tmp_path):
    _train(photo_dir, tmp_path / "sr", "--task", "sr", "--model", "espcn")
    src = tmp_path / "in"
    src.mkdir()
    _photo(str(src / "small.png"), (30, 41), np.uint8)
    assert main(["apply", str(tmp_path / "sr"), "--input", str(src), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert Image.open(tmp_path / "o" / "small.png").size == (82, 60)


def test_a_colour_run_restores_colour_and_gray_photos_and_degrades_both(photo_dir, tmp_path):
    _train(photo_dir, tmp_path / "rgb", "--no-gray")
    src = tmp_path / "in"
    src.mkdir()
    _photo(str(src / "gray.png"), (40, 48), np.uint8)
    _photo(str(src / "rgb.png"), (40, 48, 3), np.uint8)
    for extra in ([], ["--degrade"]):
        out = tmp_path / ("o" + "".join(extra))
        assert main(["apply", str(tmp_path / "rgb"), "--input", str(src), "--out", str(out), "--no-progress", *extra]) == 0
        rows = {r["image"]: r for r in csv.DictReader(open(out / "restore.csv"))}
        assert rows["gray.png"]["channels"] == "1" and rows["rgb.png"]["channels"] == "3"
        if extra:
            assert all(np.isfinite(float(r["psnr"])) for r in rows.values())

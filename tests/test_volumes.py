"""Volumes end to end: reading NIfTI/.npy/TIFF stacks, region splits, 3-D crops, the tasks on 5-D batches
(Gaussian, Rician, slice super-resolution), work counted per voxel, the 3-D models, 3-D SSIM, and the
CLI (train, compare, resume, apply by sliding window, export) choosing 3-D from the data."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import msconv
from msconv.cli import main
from msconv.data import CropSampler, ImageSet, load_dataset
from msconv.data.volumes import (REGION_GAP, VolumeReadError, is_volume_data, load_volume, save_volume,
                                 split_by_region)
from msconv.models import build_model
from msconv.multilevel import MGE, level_work, plan
from msconv.multilevel.baselines import plan_small_patches, receptive_field
from msconv.ops import prolong, prolong3d, pyramid, pyramid3d, restrict, restrict3d
from msconv.restore import restore_tiled
from msconv.tasks import Deblur, Denoise, Rician, SliceSR, build_task
from msconv.train.config import VOLUME_DEFAULTS, ConfigError, TrainConfig
from msconv.train.metrics import psnr_ssim

from _photo_data import photo_dir  # noqa: F401 - the fixture (tests/_photo_data.py)


def _smooth_volume(shape, seed=0) -> np.ndarray:
    """A smooth, structured volume in [0, 1] (a few Gaussian blobs), float32."""
    g = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    v = np.zeros(shape)
    for _ in range(6):
        c, s = g.uniform(0.1, 0.9, 3), g.uniform(0.08, 0.3)
        v += g.uniform(0.3, 1) * np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * s * s))
    return (v / v.max()).astype(np.float32)


@pytest.fixture(scope="module")
def volume_dir(tmp_path_factory):
    """Two 40^3 volumes as .npy and one 8-bit NIfTI copy of the first."""
    root = tmp_path_factory.mktemp("volumes")
    for i in range(2):
        np.save(root / f"v{i}.npy", _smooth_volume((40, 40, 40), i))
    return root


def test_volume_files_are_read_in_0_1_by_the_documented_scaling(tmp_path):
    nib = pytest.importorskip("nibabel")
    tifffile = pytest.importorskip("tifffile")
    a = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 256).astype(np.uint8)
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "a.nii.gz")
    v = load_volume(str(tmp_path / "a.nii.gz"))
    assert v.shape == (1, 4, 5, 6) and v.dtype == torch.float32
    assert torch.allclose(v[0], torch.from_numpy(a.astype(np.float32) / 255))  # 8-bit: by 255, as images
    ct = np.linspace(-1000, 3000, 4 * 5 * 6).reshape(4, 5, 6).astype(np.int16)
    np.save(tmp_path / "ct.npy", ct[None])  # a 4-D array with a singleton axis is squeezed
    v = load_volume(str(tmp_path / "ct.npy"))
    assert v.shape == (1, 4, 5, 6) and float(v.min()) == 0 and float(v.max()) == 1  # by its own range
    tifffile.imwrite(tmp_path / "stack.tif", (ct + 1000).astype(np.uint16), photometric="minisblack")
    assert load_volume(str(tmp_path / "stack.tif")).shape == (1, 4, 5, 6)
    np.save(tmp_path / "bad.npy", np.zeros((3, 4)))
    with pytest.raises(VolumeReadError, match="bad.npy.*shape"):
        load_volume(str(tmp_path / "bad.npy"))
    nan = np.ones((4, 4, 4), np.float32)
    nan[1, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(VolumeReadError, match="nan.npy.*non-finite"):
        load_volume(str(tmp_path / "nan.npy"))


def test_the_data_decides_between_images_and_volumes(tmp_path, volume_dir):
    tifffile = pytest.importorskip("tifffile")
    assert is_volume_data(str(volume_dir)) and is_volume_data(str(volume_dir / "v0.npy"))
    photos = tmp_path / "photos"
    photos.mkdir()
    tifffile.imwrite(photos / "rgb.tif", np.zeros((16, 16, 3), np.uint8))  # a colour TIFF photo is not a stack
    assert not is_volume_data(str(photos)) and not is_volume_data("bundled")


def test_one_volume_is_split_by_region_without_overlap(volume_dir):
    train, val = load_dataset(str(volume_dir / "v0.npy"), val_fraction=0.25)
    assert train.dims == val.dims == 3
    full = load_volume(str(volume_dir / "v0.npy"))
    n_val = round(0.25 * 40)
    assert val.images[0].shape[1] == n_val and train.images[0].shape[1] == 40 - n_val - REGION_GAP
    assert torch.equal(val.images[0], full[:, 40 - n_val:]) and torch.equal(train.images[0], full[:, :40 - n_val - REGION_GAP])
    with pytest.raises(ValueError, match="too few"):
        split_by_region(ImageSet([torch.zeros(1, 12, 8, 8)], ["thin"]), 0.2)
    train, val = load_dataset(str(volume_dir), val_fraction=0.5)  # several volumes: split by volume
    assert len(train) == len(val) == 1 and val.images[0].shape == (1, 40, 40, 40)


def test_crop_sampler_draws_cubes_and_resumes_exactly():
    ds = ImageSet([torch.rand(1, 20, 24, 28), torch.rand(1, 30, 20, 22)], ["a", "b"])
    s = CropSampler(ds, 16, seed=3)
    assert s.next_batch(3).shape == (3, 1, 16, 16, 16) and s.next_batch(2, crop=8).shape == (2, 1, 8, 8, 8)
    state = s.state_dict()
    a = s.next_batch(4)
    s.load_state_dict(state)
    assert torch.equal(a, s.next_batch(4))
    with pytest.raises(ValueError, match="crop=24 is larger"):
        CropSampler(ds, 24)


def test_transfer_ops_take_volumes_as_their_3d_versions():
    x = torch.rand(2, 3, 9, 8, 6, dtype=torch.float64)
    assert torch.equal(restrict(x, levels=2), restrict3d(x, levels=2))
    assert torch.allclose(restrict(x, levels=2, backend="reference"), restrict3d(x, levels=2))  # backend= reaches it
    assert all(torch.equal(a, b) for a, b in zip(pyramid(x, 2), pyramid3d(x, 2)))
    c = restrict(x)
    assert torch.equal(prolong(c, size=(9, 8, 6)), prolong3d(c, "linear", size=(9, 8, 6)))  # bilinear is linear
    with pytest.raises(ValueError, match="full_weighting.*no 3-D version"):
        restrict(x, "full_weighting")


def test_denoise_keeps_the_noise_std_on_coarse_volume_grids():
    g = torch.Generator().manual_seed(0)
    y = torch.full((4, 1, 32, 32, 32), 0.5)
    task = Denoise(25.0)
    x, _ = task.corrupt(y, g)
    xs, ys = task.pyramid_pair(x, y, 2)
    for l in (1, 2):  # the same draw, restricted (std / 2**(1.5 l)) and rescaled back to sigma
        assert abs(float((xs[l] - ys[l]).std()) - 25 / 255) < 0.1 * 25 / 255
    xc, yc = task.corrupt_on_grid(y, g, 2)
    assert xc.shape == (4, 1, 8, 8, 8) and abs(float((xc - yc).std()) - 25 / 255) < 0.1 * 25 / 255
    avg = Denoise(25.0, noise_restriction="average")
    xc, yc = avg.corrupt_on_grid(y, g, 1)
    assert abs(float((xc - yc).std()) - 25 / 255 / 2 ** 1.5) < 0.1 * 25 / 255 / 2 ** 1.5


def test_rician_noise_is_the_magnitude_of_complex_gaussian_noise():
    g = torch.Generator().manual_seed(0)
    zero = torch.zeros(2, 1, 24, 24, 24)
    x, _ = Rician(25.0).corrupt(zero, g)
    s = 25 / 255
    # On zero signal the magnitude is Rayleigh: mean s*sqrt(pi/2), never negative.
    assert float(x.min()) >= 0 and abs(float(x.mean()) - s * math.sqrt(math.pi / 2)) < 0.02 * s
    xc, yc = Rician(25.0).corrupt_on_grid(zero, g, 1)
    assert xc.shape == (2, 1, 12, 12, 12) and abs(float(xc.mean()) - s * math.sqrt(math.pi / 2)) < 0.05 * s
    assert build_task("rician", noise_sigma=10).noise_sigma == 10


def test_slice_super_resolution_averages_thick_slices_along_depth():
    y = torch.rand(2, 1, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    task = SliceSR(scale=2)
    x, _ = task.corrupt(y, torch.Generator())
    thick = y.reshape(2, 1, 4, 2, 6, 6).mean(3)
    assert torch.allclose(x, F.interpolate(thick, size=(8, 6, 6), mode="trilinear", align_corners=False))
    xs, ys = task.pyramid_pair(x, y, 1)  # coarse grid: the same degradation in its own slices
    assert torch.allclose(xs[1], task.corrupt(ys[1], torch.Generator())[0])
    with pytest.raises(ValueError, match="needs volumes"):
        task.corrupt(torch.rand(1, 1, 8, 8), torch.Generator())
    with pytest.raises(ValueError, match="multiple of scale"):
        task.corrupt(torch.rand(1, 1, 7, 8, 8), torch.Generator())
    with pytest.raises(ValueError, match="defined for images.*volumes use"):
        Deblur().corrupt(torch.rand(1, 1, 8, 8, 8), torch.Generator())


def test_work_is_counted_per_voxel_on_volumes():
    assert level_work(2, dims=3) == [1 + 1 / 8, 1 / 8 + 1 / 64, 1 / 64]
    model = build_model("dncnn", 1, 1, depth=2, width=4, dims=3)
    est = MGE(1, [2, 2], dims=3, count_flops=False)
    x = torch.rand(2, 1, 16, 16, 16)
    est.loss(model, F.mse_loss, [(x, x), (x, x)])
    assert est.last_cost.work_units == pytest.approx(2 * (1 + 1 / 8) + 2 / 8) == est.step_work()
    stages = plan("fmg", 2, [4], budget=150.0, crop=64, fine_crop=16, plain_stages=True, dims=3)
    assert [s.crop for s in stages] == [64, 32, 16]
    assert sum(s.iterations * s.work_per_step for s in stages) == pytest.approx(150.0, rel=0.01)
    small = plan_small_patches(64, 16, 4, 150.0, dims=3)
    assert small[0].iterations == round(150 / (4 / 64))


@pytest.mark.parametrize("name", ["dncnn", "unet", "resnet"])
@pytest.mark.parametrize("conv", ["standard", "mf"])
def test_zoo_models_have_volume_versions(name, conv):
    model = build_model(name, 1, 1, conv=conv, depth=2, width=4, blocks=1, dims=3)
    x = torch.rand(1, 1, 10, 12, 9)
    assert model(x).shape == x.shape
    assert all(p.dim() in (1, 2, 5) for p in model.parameters()) or conv == "mf"
    with pytest.raises(ValueError, match="2-D only"):
        build_model("espcn", 1, 1, dims=3)


def test_receptive_field_of_a_volume_model():
    model = build_model("dncnn", 1, 1, depth=6, width=4, dims=3)  # six 3x3x3 layers
    assert receptive_field(model, 1, probe=32, dims=3) == 13


def test_ssim_of_volumes_is_scikit_images():
    skimage_ssim = pytest.importorskip("skimage.metrics").structural_similarity
    g = torch.Generator().manual_seed(0)
    y = torch.rand(1, 12, 14, 10, generator=g, dtype=torch.float64)
    p = (y + 0.1 * torch.randn(y.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert psnr_ssim(p, y)[1] == pytest.approx(skimage_ssim(p[0].numpy(), y[0].numpy(), data_range=1.0), abs=1e-12)


def test_sliding_window_restoration_equals_whole_volume_inference():
    torch.manual_seed(0)
    model = build_model("unet", 1, 1, width=4, depth=2, dims=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    x = torch.rand(1, 1, 37, 20, 29)
    halo = math.ceil(receptive_field(model, 1, dims=3) / 2)
    with torch.no_grad():
        assert torch.allclose(restore_tiled(model, x, 16, halo), model(x), atol=1e-5)


def test_volume_data_gets_the_volume_defaults_unless_given(volume_dir):
    cfg = TrainConfig.from_dict({"data": str(volume_dir)})
    assert {k: getattr(cfg, k) for k in VOLUME_DEFAULTS} == VOLUME_DEFAULTS
    assert TrainConfig.from_dict({"data": str(volume_dir), "crop": 16}).crop == 16


def _vol_args(data, out, *extra):
    return ["--data", str(data), "--crop", "16", "--levels", "1", "--depth", "2", "--width", "4", "--batch-size", "2",
            "--val-crop", "16", "--val-points", "2", "--no-progress", "--no-tensorboard", "--threads", "1",
            "--out", str(out), *extra]


def test_cli_trains_on_volumes_resumes_exactly_and_applies_by_sliding_window(volume_dir, tmp_path, capsys):
    pytest.importorskip("nibabel")
    data = volume_dir / "v0.npy"
    args = _vol_args(data, tmp_path / "run", "--mode", "fmg", "--budget", "4", "--ckpt-every", "5")
    assert main(["train", *args, "--test-data", str(volume_dir)]) == 0
    assert json.loads((tmp_path / "run" / "result.json").read_text())["test_psnr"] > 0  # volumes as test data
    whole = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert main(["train", *_vol_args(data, tmp_path / "cut", "--mode", "fmg", "--budget", "4", "--ckpt-every", "5",
                                     "--max-steps", "7")]) == 0
    assert main(["train", "--resume", "--out", str(tmp_path / "cut")]) == 0
    resumed = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)  # bitwise exact
    arch = json.loads((tmp_path / "run" / "config.json").read_text())["architecture"]
    assert arch["dims"] == 3
    run = msconv.load_run(str(tmp_path / "run"))
    assert run.dims == 3
    # A NIfTI input comes back as NIfTI with its header; scored against itself degraded.
    import nibabel as nib

    vol = load_volume(str(data))
    save_volume(vol, str(tmp_path / "scan.nii.gz"))
    capsys.readouterr()
    assert main(["apply", str(tmp_path / "run"), "--input", str(tmp_path / "scan.nii.gz"), "--out",
                 str(tmp_path / "restored"), "--degrade", "--tile", "16", "--no-progress"]) == 0
    out = nib.load(str(tmp_path / "restored" / "scan_restored.nii.gz"))
    assert out.shape == (40, 40, 40)
    assert "psnr" in capsys.readouterr().out
    with torch.no_grad():  # the sliding window gives the whole-volume result
        x = torch.rand(1, 1, 40, 40, 40)
        assert torch.allclose(run.restore(x, tile=16), run.model(x).clamp(0, 1), atol=1e-5)


def test_cli_compare_on_volumes_runs_every_mode(volume_dir, tmp_path, capsys):
    assert main(["compare", *_vol_args(volume_dir / "v0.npy", tmp_path / "cmp", "--budget", "2",
                                       "--modes", "single,small,progressive,patches,mge,fmg")]) == 0
    text = capsys.readouterr().out
    assert "8³@1/2" in text and "(crops 16³)" in (tmp_path / "cmp" / "summary.md").read_text()
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert {r["mode"] for r in summary["runs"]} == {"single", "small", "progressive", "patches", "mge", "fmg"}


def test_volume_options_that_do_not_fit_are_clear_errors(volume_dir, tmp_path, capsys):
    assert main(["train", *_vol_args(volume_dir / "v0.npy", tmp_path / "a", "--task", "deblur", "--iterations", "2")]) == 2
    assert "--task deblur is defined for images" in capsys.readouterr().err
    assert main(["train", *_vol_args(volume_dir / "v0.npy", tmp_path / "b", "--model", "espcn", "--iterations", "2")]) == 2
    assert "--model espcn is 2-D only" in capsys.readouterr().err


def test_slice_sr_on_images_is_a_clear_error(photo_dir, tmp_path, capsys):
    assert main(["train", "--data", str(photo_dir), "--task", "slice_sr", "--crop", "32", "--iterations", "2",
                 "--val-crop", "32", "--no-progress", "--out", str(tmp_path / "o")]) == 2
    assert "slice_sr needs volumes" in capsys.readouterr().err


def test_allocations_count_volume_work():
    from msconv.multilevel import MGE

    assert MGE(2, [4, 4, 4], "average", "matched", dims=3).allocation._fine_sample_work == pytest.approx(1.0)
    assert MGE(1, [1, 1], "average", "paper", dims=3).batch_sizes == [1, 8]
    assert MGE(1, [1, 1], "average", "paper").batch_sizes == [1, 4]


def test_nifti_slice_axis_comes_first_and_results_go_back_in_the_files_axes_and_units(tmp_path):
    nib = pytest.importorskip("nibabel")
    a = np.random.default_rng(0).uniform(-1000, 3000, (6, 7, 5)).astype(np.float32)  # CT-like units
    affine = np.diag([1.0, 1.0, 3.0, 1.0])                                            # 3 mm slices on axis 2
    nib.save(nib.Nifti1Image(a, affine), tmp_path / "ct.nii.gz")
    vol, info = load_volume(str(tmp_path / "ct.nii.gz"), with_info=True)
    assert vol.shape == (1, 5, 6, 7) and info.axes == (2, 0, 1)  # the thick axis is D
    save_volume(vol, str(tmp_path / "back.nii.gz"), like=str(tmp_path / "ct.nii.gz"), info=info)
    back = nib.load(tmp_path / "back.nii.gz")
    assert np.allclose(back.get_fdata(), a, atol=1e-3 * 4000) and np.allclose(back.affine, affine)
    # Twice the slices (slice super-resolution): voxels half as thick over the same field of view.
    thin = torch.nn.functional.interpolate(vol[None], size=(10, 6, 7), mode="trilinear")[0]
    save_volume(thin, str(tmp_path / "thin.nii.gz"), like=str(tmp_path / "ct.nii.gz"), info=info)
    out = nib.load(tmp_path / "thin.nii.gz")
    assert out.shape == (6, 7, 10) and out.affine[2, 2] == pytest.approx(1.5) and out.affine[2, 3] == pytest.approx(-0.75)


def test_apply_scores_against_a_reference_on_one_scale(volume_dir, tmp_path):
    data = volume_dir / "v0.npy"
    assert main(["train", *_vol_args(data, tmp_path / "run", "--mode", "single", "--iterations", "2")]) == 0
    ct = (np.load(data) * 4000 - 1000).astype(np.float32)  # a scan in its own units
    (tmp_path / "in").mkdir()
    (tmp_path / "ref").mkdir()
    np.save(tmp_path / "ref" / "s.npy", ct)
    noisy = ct.copy()
    noisy[0, 0, 0] = 9000  # one outlier widens the input's range, not the reference's
    np.save(tmp_path / "in" / "s.npy", noisy)
    rows = msconv.apply.apply_run(msconv.load_run(str(tmp_path / "run")), str(tmp_path / "in"), str(tmp_path / "out"),
                                  reference=str(tmp_path / "ref"), progress=False)
    out = np.load(tmp_path / "out" / "s.npy")
    assert out.min() > -1100 and out.max() < 9100  # written back in the input's units
    assert rows[0]["psnr"] > 25  # a near-identity model scores near the truth, not skewed by the ranges


def test_volume_data_refuses_what_does_not_apply(volume_dir, tmp_path, capsys):
    data = volume_dir / "v0.npy"
    for opt, msg in (("--no-gray", "volumes are gray"), ("--channels-last", "layout for images")):
        assert main(["train", *_vol_args(data, tmp_path / opt, opt, "--iterations", "2")]) == 2
        assert msg in capsys.readouterr().err
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "v.npy", np.zeros((20, 20, 20), np.float32))
    from PIL import Image

    Image.fromarray(np.zeros((20, 20), np.uint8)).save(mixed / "img.png")
    assert main(["train", *_vol_args(mixed, tmp_path / "m", "--iterations", "2")]) == 2
    assert "holds volumes" in capsys.readouterr().err


def test_apply_refuses_volumes_whose_results_would_overwrite_each_other(volume_dir, tmp_path):
    assert main(["train", *_vol_args(volume_dir / "v0.npy", tmp_path / "run", "--mode", "single", "--iterations", "2")]) == 0
    for sub in ("a", "b"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        np.save(tmp_path / "in" / sub / "s.npy", np.zeros((20, 20, 20), np.float32))
    with pytest.raises(ValueError, match="several volumes named 's'"):
        msconv.apply.apply_run(msconv.load_run(str(tmp_path / "run")), str(tmp_path / "in"), str(tmp_path / "o"),
                               progress=False)


@pytest.mark.parametrize("dims", [2, 3])
def test_an_onnx_unet_takes_sizes_that_are_not_a_multiple_of_its_pooling(dims, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_model("unet", 1, 1, width=4, depth=2, dims=dims).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    names = ("height", "width") if dims == 2 else ("depth", "height", "width")
    axes = {0: "batch", **{2 + i: n for i, n in enumerate(names)}}
    example = torch.rand(2, 1, *((64, 72) if dims == 2 else (32, 40, 36)))
    torch.onnx.export(model, (example,), str(tmp_path / "u.onnx"), dynamo=False, input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": axes, "output": axes})
    x = torch.rand(1, 1, *((33, 35) if dims == 2 else (19, 23, 29)))  # the padding branch must not be frozen
    got = ort.InferenceSession(str(tmp_path / "u.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())

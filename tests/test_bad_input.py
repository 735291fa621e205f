"""Bad input to the public API: every case a clear error (naming the argument, the value and the
fix) or a correct result, never a deep traceback or a silently wrong number.

Sections, one per area: MFConv2d, convert(), transfer operators, data loading. Cases that go
through the trainer or the CLI belong in their own section below the library ones.
"""
from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import msconv
from msconv.data import CropSampler, ImageReadError, ImageSet, load_folder, load_image
from msconv.nn import PoorFitWarning, UnresolvedSigmaWarning
from msconv import _memory
from msconv.nn import mfconv
from msconv._memory import AllocationTooLargeError


@pytest.fixture
def fresh_unresolved_warnings(monkeypatch):
    """The unresolved-σ warning fires once per (σ, s) per process: start each test afresh."""
    monkeypatch.setattr(mfconv, "_WARNED_UNRESOLVED", set())


# ============================================================================ MFConv2d


@pytest.mark.parametrize("sigma", [0.05, 0.03, 0.01])
def test_mfconv_tiny_sigma_is_a_clear_error_not_nan_weights(sigma):
    # Before: NaN/inf weights, silently (the derivative taps' energy underflows the init bound).
    with pytest.raises(ValueError, match=rf"sigma={sigma:g} is too small.*sigma >= 0.5"):
        msconv.MFConv2d(2, 2, 3, sigma=sigma)


def test_mfconv_small_but_representable_sigma_still_builds():
    layer = msconv.MFConv2d(2, 2, 3, sigma=0.08)
    assert torch.isfinite(layer.weight).all()
    assert torch.isfinite(layer(torch.randn(1, 2, 8, 8))).all()


def test_mfconv_tiny_sigma_limit_depends_on_dtype():
    # float16 overflows far sooner than float32: the same check covers it.
    msconv.MFConv2d(2, 2, 3, sigma=0.1)
    with pytest.raises(ValueError, match="too small for order=2 in torch.float16"):
        msconv.MFConv2d(2, 2, 3, sigma=0.1, dtype=torch.float16)


def test_mfconv_huge_sigma_refused_before_allocating(monkeypatch):
    # Before: the allocator's "can't allocate 25601920036 bytes" traceback (or tens of GB taken).
    monkeypatch.setattr(_memory, "_host_memory_bytes", lambda: 16 * 2**30)
    layer = msconv.MFConv2d(2, 2, 3, sigma=1e4)  # building it allocates nothing large
    with pytest.raises(AllocationTooLargeError, match=r"sigma=10000 on grid_scale\(1\).*use a smaller sigma"):
        layer(torch.randn(1, 2, 8, 8))
    with pytest.raises(MemoryError):  # also a MemoryError for code that catches that
        layer(torch.randn(1, 2, 8, 8))


def test_mfconv_huge_sigma_refused_on_any_machine():
    with pytest.raises(AllocationTooLargeError, match="GiB"):
        msconv.MFConv2d(1, 1, 3, sigma=1e7)(torch.randn(1, 1, 4, 4))


def test_mfconv_huge_sigma_with_circular_padding_uses_fft_and_runs():
    layer = msconv.MFConv2d(1, 1, 3, sigma=300.0, padding_mode="circular")
    assert torch.isfinite(layer(torch.randn(1, 1, 8, 8))).all()


@pytest.mark.parametrize("value", [float("nan"), -0.1, 0.0])
def test_mfconv_learnable_sigma_gone_bad_is_a_clear_error(value):
    layer = msconv.MFConv2d(2, 2, 3, learn_sigma=True)
    with torch.no_grad():
        layer.sigma.fill_(value)
    with pytest.raises(ValueError, match="learnable sigma is now"):
        layer(torch.randn(1, 2, 8, 8))


def test_mfconv_state_dict_with_bad_sigma_is_refused():
    layer = msconv.MFConv2d(2, 2, 3)
    state = layer.state_dict()
    state["sigma"] = torch.tensor(float("nan"))
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        layer.load_state_dict(state)
    assert layer._sigma == 0.5


def test_mfconv_numpy_scalar_sigma_accepted():
    assert msconv.MFConv2d(2, 2, 3, sigma=np.float32(0.75))._sigma == 0.75


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.ones(1, 2, 8, 8, dtype=torch.int64), TypeError, "floating tensor"),
        (torch.ones(2, 8, 8), ValueError, "4 dimensions"),
        (torch.ones(1, 3, 8, 8), ValueError, "C_in=3"),
        (torch.ones(1, 2, 8, 8, dtype=torch.float64), TypeError, "move the layer"),
    ],
)
def test_mfconv_bad_input_tensors(x, error, match):
    with pytest.raises(error, match=match):
        msconv.MFConv2d(2, 2, 3)(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mfconv_under_autocast_matches_conv2d_convention(dtype):
    # Before: TypeError (weight float32 vs a bf16 input from the previous autocast layer), and a
    # float32 output where nn.Conv2d gives the autocast dtype.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    mf, _ = msconv.convert(net, warn_above=None)
    x = torch.randn(2, 3, 16, 16)
    ref = mf(x)
    with torch.autocast("cpu", dtype=dtype):
        y = mf(x)
        assert net(x).dtype == dtype
    assert y.dtype == dtype
    assert (y.float() - ref).abs().max() <= 0.05 * ref.abs().max()
    y.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mf.parameters())


def test_mfconv_float64_is_left_alone_by_autocast():
    layer = msconv.MFConv2d(2, 2, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(1, 2, 8, 8, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"stride": 2}, {"padding_mode": "circular"}, {"method": "dense"}, {"learn_sigma": True},
     {"padding_mode": "circular", "method": "fft"}],
)
def test_mfconv_keeps_channels_last(kwargs):
    # Before: NCHW output for most paths.
    layer = msconv.MFConv2d(8, 16, 3, **kwargs)
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    for s in (1.0, 0.5):
        with msconv.grid_scale(s):
            y = layer(x)
        assert y.is_contiguous(memory_format=torch.channels_last)
        with msconv.grid_scale(s):
            assert torch.allclose(y, layer(x.contiguous()), atol=1e-5)


def test_unresolved_sigma_warns_once_naming_sigma_and_grid(fresh_unresolved_warnings):
    layer = msconv.MFConv2d(2, 2, 3, sigma_floor=None)  # σ = 0.5 without a floor: resolved up to s = 1
    x = torch.randn(1, 2, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # s = 1 = 2σ: fine
    with pytest.warns(UnresolvedSigmaWarning, match=r"sigma=0.5 .*grid_scale\(4\).*sigma >= 2"):
        with msconv.grid_scale(4.0):
            layer(msconv.restrict(x, levels=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with msconv.grid_scale(4.0):
            layer(msconv.restrict(x, levels=2))
    assert not [w for w in caught if issubclass(w.category, UnresolvedSigmaWarning)]


def test_order_zero_is_never_unresolved(fresh_unresolved_warnings):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnresolvedSigmaWarning)
        with msconv.grid_scale(8.0):
            msconv.MFConv2d(2, 2, 3, order=0)(torch.randn(1, 2, 4, 4))


# ============================================================================ convert()


def test_convert_shared_conv_keeps_the_tie_and_reports_it():
    # Before: only the first use was replaced (the tie broken) and the report had one entry.
    c = nn.Conv2d(4, 4, 3, padding=1)
    net, report = msconv.convert(nn.Sequential(c, nn.ReLU(), c), warn_above=None)
    assert isinstance(net[0], msconv.MFConv2d) and net[0] is net[2]
    assert len(report) == 1 and report[0]["converted"] and report[0]["shared_with"] == ["2"]
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in net[0].parameters())


def test_convert_shared_conv_inplace_too():
    c = nn.Conv2d(4, 4, 3, padding=1)
    seq = nn.Sequential(c, nn.ReLU(), nn.Sequential(c))
    net, _ = msconv.convert(seq, inplace=True, warn_above=None)
    assert net is seq and net[0] is net[2][0] and isinstance(net[0], msconv.MFConv2d)


def test_convert_warns_on_a_poor_fit_naming_layer_and_error():
    # Before: silent (random 3×3 kernels fit to 0.56-0.67 relative).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    with pytest.warns(PoorFitWarning, match=r"layer '0' .*relative error 0\.\d\d > 0.2"):
        _, report = msconv.convert(net)
    assert report[0]["rel_error"] > 0.4


def test_convert_silent_on_a_good_fit_and_when_asked():
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PoorFitWarning)
        _, report = msconv.convert(conv)
        assert report[0]["rel_error"] < 0.2
        msconv.convert(nn.Conv2d(3, 8, 3, padding=1), warn_above=None)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sigma": float("nan")}, ValueError, "sigma must be a finite number > 0"),
        ({"sigma": float("inf")}, ValueError, "sigma must be a finite number > 0"),
        ({"sigma": True}, ValueError, "sigma must be a finite number > 0"),
        ({"sigma": 0.01}, ValueError, "too small"),
        ({"warn_above": -1}, ValueError, "warn_above"),
    ],
)
def test_convert_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        msconv.convert(nn.Conv2d(2, 2, 3, padding=1), **kwargs)


def test_convert_bad_model_and_nan_weights():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        msconv.convert(torch.randn(3, 3))
    conv = nn.Conv2d(2, 2, 3, padding=1)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite weights"):
        msconv.convert(nn.Sequential(conv))


# ============================================================================ transfer operators


def test_prolong_too_many_levels_refused_before_allocating():
    # Before: the allocator's traceback (4 GB requested for the tap tables, then more).
    with pytest.raises(AllocationTooLargeError, match=r"prolong: levels=40 .*use fewer levels"):
        msconv.prolong(torch.randn(1, 1, 4, 4), levels=40)
    assert msconv.prolong(torch.randn(1, 1, 4, 4), levels=3).shape == (1, 1, 32, 32)


# ============================================================================ data loading


def _png_declaring(path, width: int, height: int) -> None:
    """A tiny, valid-looking PNG whose IHDR declares width × height 8-bit gray pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _good_png(path) -> None:
    from PIL import Image

    Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)).save(path)


def test_decompression_bomb_is_a_clear_error(tmp_path):
    # Before: PIL's DecompressionBombError traceback.
    bomb = tmp_path / "bomb.png"
    _png_declaring(bomb, 100_000, 100_000)
    assert bomb.stat().st_size < 200
    with pytest.raises(ImageReadError, match=r"bomb\.png.*10000000000 pixels.*on_bad_file='skip'"):
        load_image(str(bomb))
    _good_png(tmp_path / "good.png")
    with pytest.raises(ImageReadError, match="bomb.png"):
        load_folder(str(tmp_path))


def test_decompression_bomb_is_skipped_with_a_warning(tmp_path):
    # Before: the same traceback even with on_bad_file='skip'.
    _png_declaring(tmp_path / "bomb.png", 100_000, 100_000)
    _good_png(tmp_path / "good.png")
    with pytest.warns(UserWarning, match=r"skipping unreadable image file .*bomb\.png.*10000000000 pixels"):
        ds = load_folder(str(tmp_path), on_bad_file="skip")
    assert ds.names == ["good.png"]


def test_float_image_with_nan_is_refused(tmp_path):
    # Before: NaN pixels were loaded silently (clamp keeps NaN) and poisoned every crop.
    from PIL import Image

    a = np.full((16, 16), 0.5, np.float32)
    a[3, 4] = np.nan
    path = tmp_path / "nan.tif"
    Image.fromarray(a, mode="F").save(path)
    with pytest.raises(ImageReadError, match="non-finite"):
        load_image(str(path))


def _set(*shapes):
    return ImageSet([torch.rand(*s) for s in shapes], [f"im{i}" for i in range(len(shapes))])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CropSampler(_set(), 8), "non-empty ImageSet"),
        (lambda: CropSampler([torch.rand(1, 16, 16)], 8), "non-empty ImageSet"),
        (lambda: CropSampler(_set((1, 16, 16)), True), "crop must be a positive int"),
        (lambda: CropSampler(_set((1, 16, 16)), 8.0), "crop must be a positive int"),
        (lambda: CropSampler(_set((1, 16, 16), (3, 16, 16)), 8), "different channel counts"),
        (lambda: CropSampler(_set((1, 16, 16)), 8).next_batch(0), "n must be a positive int"),
        (lambda: CropSampler(_set((1, 16, 16)), 8).next_batch(-2), "n must be a positive int"),
    ],
)
def test_crop_sampler_bad_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_crop_sampler_accepts_numpy_ints():
    s = CropSampler(_set((1, 16, 16)), np.int64(8), seed=np.int64(3))
    assert s.next_batch(np.int64(2)).shape == (2, 1, 8, 8)


# ============================================================================ trainer and CLI
# Through msconv.train and `msconv train` (msconv.cli.main): options, YAML, checkpoints, output
# folder, non-finite models and losses.

import json  # noqa: E402
import os  # noqa: E402

from msconv.cli import main  # noqa: E402
from msconv.train import psnr_ssim  # noqa: E402
from msconv.train.checkpoint import CheckpointError, load_checkpoint, save_atomic  # noqa: E402
from msconv.train.config import ConfigError, TrainConfig, load_yaml  # noqa: E402
from msconv.train.trainer import NonFiniteError, Trainer  # noqa: E402

from _photo_data import photo_dir  # noqa: E402,F401 - the fixture (tests/_photo_data.py)


def _cfg(photo_dir, out, **kw):
    base = dict(data=photo_dir, crop=32, depth=3, width=4, batch_size=2, levels=1, iterations=6, val_crop=32,
                val_points=2, ckpt_every=100, progress=False, tensorboard=False, out=str(out), lr=3e-3, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _cli(photo_dir, out, *extra):
    return ["train", "--data", photo_dir, "--crop", "32", "--depth", "3", "--width", "4", "--batch-size", "2",
            "--val-crop", "32", "--val-points", "2", "--iterations", "6", "--no-progress", "--no-tensorboard",
            "--threads", "1", "--out", str(out), *extra]


def test_psnr_of_a_non_finite_prediction_is_nan_never_a_score():
    # Before: NaN predictions scored PSNR 100 dB (non-finite PSNR was mapped to the cap).
    y = torch.rand(1, 16, 16)
    for bad in (float("nan"), float("inf")):
        pred = y.clone()
        pred[0, 3, 3] = bad
        p, s = psnr_ssim(pred, y)
        assert np.isnan(p) and np.isnan(s)
    assert psnr_ssim(y, y)[0] == 100.0  # an exact reconstruction keeps the cap


@pytest.fixture
def nan_models(monkeypatch):
    """The CLI's models, each made to output only NaN."""
    import msconv.train.run as run_module

    build = run_module.build_model

    def broken(*a, **kw):
        m = build(*a, **kw)
        m.register_forward_hook(lambda mod, inp, out: out * float("nan"))
        return m

    monkeypatch.setattr(run_module, "build_model", broken)


def test_cli_nan_model_fails_and_result_says_nan(photo_dir, tmp_path, nan_models, capsys):
    # Before: exit 0, "val PSNR 100.00 dB", result.json psnr 100.
    out = tmp_path / "run"
    assert main(_cli(photo_dir, out, "--max-skips", "1000")) == 3
    err = capsys.readouterr().err
    assert "validation outputs are not finite" in err and "val PSNR nan" in err
    r = json.loads((out / "result.json").read_text())
    assert np.isnan(r["psnr"]) and np.isnan(r["val_history"][-1]["psnr"])


def test_cli_mlmc_with_batch_size_one_is_refused(photo_dir, tmp_path, capsys):
    # Before: the batch sizes silently stayed "1 1" (a level's variance needs two samples).
    assert main(_cli(photo_dir, tmp_path, "--mode", "mge", "--allocation", "mlmc", "--batch-size", "1")) == 2
    assert "--batch-size 2 or more" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--batch-sizes entry >= 2"):
        TrainConfig(mode="mge", allocation="mlmc", levels=1, batch_sizes=[4, 1]).validated()
    TrainConfig(mode="mge", allocation="mlmc", levels=1, batch_size=2).validated()


@pytest.mark.parametrize(
    "text, expected",
    [("gray: 'no'\n", {"gray": False}), ("gray: 'yes'\n", {"gray": True}), ("gray: no\n", {"gray": False}),
     ("lr: 1e-3\n", {"lr": 0.001}), ("budget: 60\n", {"budget": 60.0}), ("threads: '2'\n", {"threads": 2})],
)
def test_yaml_values_are_coerced_to_the_option_type(tmp_path, text, expected):
    # Before: gray "no" was read as true (a non-empty string); lr 1e-3 (a string to PyYAML) ended in a TypeError.
    p = tmp_path / "c.yaml"
    p.write_text(text)
    cfg = TrainConfig.from_dict(load_yaml(str(p)), source=str(p))
    for k, v in expected.items():
        assert getattr(cfg, k) == v and type(getattr(cfg, k)) is type(v)


@pytest.mark.parametrize(
    "text, match",
    [("gray: maybe\n", r"gray must be true or false.*'maybe'"),
     ("threads: two\n", r"threads must be an int, got 'two'"),
     ("lr: fast\n", r"lr must be a number, got 'fast'"),
     ("out: 5\n", r"--out must be a str, got 5"),
     ("data: null\n", r"--data cannot be empty"),
     ("budget: .inf\n", r"--budget must be a finite number, got inf"),
     ("crop: 3.5\n", r"--crop must be an int, got 3.5")],
)
def test_yaml_bad_values_are_clear_errors(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(load_yaml(str(p)), source=str(p))


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_cli_non_finite_budget_names_the_option(tmp_path, capsys, value):
    # Before: --budget inf was an OverflowError traceback; nan's message did not name the option.
    assert main(["train", f"--budget={value}", "--out", str(tmp_path / "r")]) == 2
    assert f"--budget must be a finite number, got {value}" in capsys.readouterr().err


def test_cli_out_that_cannot_be_a_folder(photo_dir, tmp_path, capsys, monkeypatch):
    # Before: raw OS tracebacks (FileExistsError, NotADirectoryError, PermissionError).
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(_cli(photo_dir, a_file)) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err
    assert main(_cli(photo_dir, a_file / "run")) == 2
    assert "cannot create the output folder" in capsys.readouterr().err
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_open = open

    def refuse(path, *a, **kw):  # read-only folder (chmod does not stop root, who runs CI here)
        if str(path).startswith(str(read_only)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", refuse)
    assert main(_cli(photo_dir, read_only)) == 2
    assert "is not writable (Permission denied)" in capsys.readouterr().err


def test_orphaned_temporaries_are_cleaned_and_checkpoint_is_0644(tmp_path):
    # Before: .tmp-*.pt files left by writers killed mid-save stayed forever; checkpoint.pt was 0600.
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphans = [tmp_path / f".tmp-{dead.pid}-0badc0de.pt", tmp_path / ".tmp-abc12_xy.pt"]  # killed writer; old naming
    live = tmp_path / f".tmp-{os.getpid()}-00c0ffee.pt"  # a writer still running: left alone
    for f in orphans + [live]:
        f.write_bytes(b"partial")
    old = os.umask(0o022)
    try:
        save_atomic({"format": "x"}, str(tmp_path / "checkpoint.pt"))
    finally:
        os.umask(old)
    assert not any(f.exists() for f in orphans) and live.exists()
    assert (os.stat(tmp_path / "checkpoint.pt").st_mode & 0o777) == 0o644
    orphans[1].write_bytes(b"partial")
    with pytest.raises(CheckpointError):
        load_checkpoint(str(tmp_path / "checkpoint.pt"))  # loading cleans too
    assert not orphans[1].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint.pt", live.name])


def _checkpoint_of_a_short_run(photo_dir, out):
    Trainer(_cfg(photo_dir, out, max_steps=2)).run()
    return torch.load(out / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize(
    "damage, match",
    [("empty", r"empty \(0 bytes\), not a checkpoint"),
     ("no config", r"has no run configuration \('config'\)"),
     ("step abc", r"incomplete or incompatible \(ValueError: 'step' must be a count >= 0, got 'abc'\)"),
     ("step inf", r"'step' must be a count >= 0, got inf"),
     ("no sampler", r"incomplete or incompatible \(KeyError: 'sampler'\)")],
)
def test_cli_resume_from_a_damaged_checkpoint_is_a_clear_error(photo_dir, tmp_path, capsys, damage, match):
    # Before: an IndexError traceback for an empty file; KeyError/ValueError tracebacks for the others.
    out = tmp_path / "run"
    ck = _checkpoint_of_a_short_run(photo_dir, out)
    if damage == "empty":
        (out / "checkpoint.pt").write_bytes(b"")
    else:
        if damage == "no config":
            del ck["config"]
        elif damage == "no sampler":
            del ck["sampler"]
        else:
            ck["step"] = {"step abc": "abc", "step inf": float("inf")}[damage]
        save_atomic(ck, str(out / "checkpoint.pt"))
    assert main(_cli(photo_dir, out, "--resume")) == 4
    err = capsys.readouterr().err
    assert err.startswith("msconv: error:") and "Traceback" not in err
    assert __import__("re").search(match, err), err


def _csv_rows(path):
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cli_resume_with_only_out_and_a_new_lr(photo_dir, tmp_path, capsys):
    # Before: --resume needed every option again, and a changed --lr was refused as "a different run".
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_cli(photo_dir, full)) == 0
    assert main(_cli(photo_dir, cut, "--max-steps", "3")) == 0
    assert main(["train", "--resume", "--out", str(cut), "--lr", "1e-3"]) == 0
    assert "finished" in capsys.readouterr().out
    a, b = _csv_rows(full / "metrics.csv"), _csv_rows(cut / "metrics.csv")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a[1:], b[1:]):  # the schedule goes on from the new peak: every later rate halved
        scale = 1.0 if int(ra["step"]) <= 3 else 1e-3 / 2e-3  # from the default Adam 2e-3
        assert float(rb["lr"]) == pytest.approx(float(ra["lr"]) * scale, rel=1e-9)
    c = json.loads((cut / "config.json").read_text())
    assert c["lr"] == 1e-3 and c["iterations"] == 6 and c["data"] == photo_dir


def test_cli_resume_still_refuses_a_changed_computation(photo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_cli(photo_dir, out, "--max-steps", "2")) == 0
    assert main(["train", "--resume", "--out", str(out), "--crop", "16"]) == 4
    err = capsys.readouterr().err
    assert "different run (crop: checkpoint 32 vs now 16)" in err and "--lr, --on-nonfinite, --max-skips" in err


def test_cli_config_json_of_a_run_is_a_valid_config(photo_dir, tmp_path):
    # Before: "unknown option(s) ['engine', 'stages']".
    first = tmp_path / "first"
    assert main(_cli(photo_dir, first, "--mode", "fmg", "--fmg-iteration-ratio", "2")) == 0
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.json"), "--out", str(again)]) == 0
    a, b = json.loads((first / "result.json").read_text()), json.loads((again / "result.json").read_text())
    assert a["psnr"] == b["psnr"] and a["stages"] == b["stages"]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_stop_message_is_true(photo_dir, tmp_path, capsys, policy):
    # Before: it suggested --on-nonfinite skip when skip was in effect, and "lower --lr then --resume",
    # which resume refused.
    out = tmp_path / "run"
    nan_at = "3" if policy == "stop" else "3,4"
    extra = ["--on-nonfinite", policy, "--max-skips", "2", "--inject-nan-at", nan_at]
    assert main(_cli(photo_dir, out, *extra)) == 3
    err = capsys.readouterr().err
    assert ("--on-nonfinite skip" in err) == (policy == "stop")
    assert f"--resume --out {out}" in err and "--lr 0.0005" in err
    if policy == "skip":
        assert "--max-skips 8" in err
    # Doing what it says works: only the changed option on the command line.
    fix = ["--on-nonfinite", "skip"] if policy == "stop" else ["--max-skips", "8"]
    assert main(["train", "--resume", "--out", str(out), "--lr", "0.0005", *fix]) == 0


def test_divergence_guard_stops_at_a_truly_good_state(photo_dir, tmp_path):
    # Before: a finite but exploding loss (3.5e12) passed the check, and the "last good state" had |w| = 1.7e6.
    seen = {}

    def explode_after(trainer, step):
        seen[step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        if step == 25:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.mul_(1e3)

    cfg = _cfg(photo_dir, tmp_path, mode="single", iterations=40, on_nonfinite="stop", ckpt_every=1)
    # The guard keeps a snapshot every GUARD_SNAPSHOT_EVERY (10) steps; the newest one whose next
    # step was still good is step 20's.
    with pytest.raises(NonFiniteError, match=r"step 26: the loss .* is over 100x its running median .*divergence "
                                             r"guard.*last good state \(step 20, before the loss diverged\)"):
        Trainer(cfg, on_step=explode_after).run()
    ck = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert ck["step"] == 20
    for k, v in ck["model"].items():
        assert torch.equal(v, seen[20][k])
    # Off, the exploding run goes on.
    r = Trainer(cfg.replace(divergence_factor=0.0, out=str(tmp_path / "off")), on_step=explode_after).run()
    assert r["complete"] and r["skipped_steps"] == 0


def test_resume_is_exact_with_an_mf_sigma_that_float32_rounds(photo_dir, tmp_path):
    # Before: sigma 0.3 came back from the float32 buffer as 0.30000001192..., so a resumed run's
    # stencils (and from there its losses) differed from the uninterrupted run's in the 7th digit.
    kw = dict(conv="mf", mf_sigma=0.3, mode="single", iterations=6)
    full = Trainer(_cfg(photo_dir, tmp_path / "full", **kw))
    full.run()
    Trainer(_cfg(photo_dir, tmp_path / "cut", max_steps=3, **kw)).run()
    resumed = Trainer(_cfg(photo_dir, tmp_path / "cut", resume=True, **kw))
    resumed.run()
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    a, b = _csv_rows(tmp_path / "full" / "metrics.csv"), _csv_rows(tmp_path / "cut" / "metrics.csv")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


@pytest.mark.parametrize("timeout", [-1, 0, "5", float("nan")])
def test_init_distributed_timeout_is_checked(monkeypatch, timeout):
    from msconv.multilevel import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match="init_distributed: timeout must be a number of seconds > 0"):
        distributed.init_distributed("gloo", timeout=timeout)


def _tiny_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 3, padding=1))


@pytest.mark.parametrize("allocation", ["mlmc", "matched"])
def test_variance_allocations_survive_non_finite_losses(allocation):
    # Before: --allocation mlmc with a NaN loss crashed in the allocation ("cannot convert float NaN
    # to integer") before the trainer's non-finite policy could skip the step.
    from msconv.multilevel import MGE

    model, x = _tiny_cnn(), torch.rand(4, 1, 32, 32)
    est = MGE(2, 4, allocation=allocation)
    first = list(est.batch_sizes)
    for _ in range(4):
        loss = est.loss(model, lambda a, b: F.mse_loss(a, b) * float("nan"), [(x[:n], x[:n]) for n in est.batch_sizes])
        assert torch.isnan(loss)
        assert est.batch_sizes == first  # nothing measured, nothing moved
    # Finite steps afterwards measure (step 10, the next scheduled measurement) and reallocate as
    # usual: the NaN steps left no trace in the running variances.
    for _ in range(8):
        est.loss(model, F.mse_loss, [(torch.rand(n, 1, 32, 32),) * 2 for n in est.batch_sizes]).backward()
    state = est.allocation.state_dict()["variance"]
    assert all(v is not None and np.isfinite(v) for v in state["variance"])


def test_cli_mlmc_with_a_nan_model_reports_non_finite_not_a_traceback(photo_dir, tmp_path, nan_models, capsys):
    assert main(_cli(photo_dir, tmp_path / "run", "--mode", "mge", "--allocation", "mlmc", "--levels", "1")) == 3
    err = capsys.readouterr().err
    assert "non-finite" in err.lower() and "Traceback" not in err


@pytest.mark.parametrize(
    "loss_fn, got",
    [(lambda a, b: F.mse_loss(a, b, reduction="none"), r"shape \(4, 1, 32, 32\)"),
     (lambda a, b: (a - b).pow(2).mean((1, 2, 3)), r"shape \(4,\)"),
     (lambda a, b: None, "NoneType None"),
     (lambda a, b: 3.0, "float 3.0"),
     (lambda a, b: F.mse_loss(a, b).long(), "dtype torch.int64")],
)
def test_mge_loss_fn_that_is_not_a_scalar_mean_is_a_clear_error(loss_fn, got):
    # Before: reduction='none' was a shape mismatch deep in MGE (levels have other sizes), a per-sample
    # vector broadcast silently when the levels' batches matched, and None a TypeError on `sign * term`.
    from msconv.multilevel import MGE

    x = torch.rand(4, 1, 32, 32)
    with pytest.raises(ValueError, match=rf"loss_fn\(pred, target\) must return a scalar tensor.*level 0.*{got}"):
        MGE(2, 4).loss(_tiny_cnn(), loss_fn, [(x, x)] * 3)


def test_mge_loss_fn_returning_a_one_element_tensor_is_accepted():
    from msconv.multilevel import MGE

    x = torch.rand(4, 1, 32, 32)
    loss = MGE(1, 4).loss(_tiny_cnn(), lambda a, b: F.mse_loss(a, b).reshape(1, 1), [(x, x)] * 2)
    assert loss.shape == () and torch.isfinite(loss)


def test_inductor_compiled_mfconv_takes_new_scales_after_backward():
    # Before: after a .backward(), a new scale (s = 1.5 or 3) raised InductorError "cannot determine
    # truth value of Relational" (dynamo had made the scale symbolic).
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = msconv.MFConv2d(1, 2, 3, padding="same")
    compiled = torch.compile(layer)
    x = torch.rand(1, 1, 16, 16)
    for s in (1.0, 1.5, 3.0):
        with msconv.grid_scale(s), warnings.catch_warnings():
            warnings.simplefilter("ignore", UnresolvedSigmaWarning)
            y = compiled(x)
            y.square().sum().backward()
            torch.testing.assert_close(y, layer(x), rtol=1e-4, atol=1e-5)

"""How a run executes, without changing what it computes: --precision, --channels-last,
--compile and --deterministic, each on the CPU (the same code paths a GPU takes)."""
import json

import pytest
import torch

from _photo_data import photo_dir  # noqa: F401 - the fixture (tests/_photo_data.py)

from msconv.cli import main
from msconv.train import TrainConfig
from msconv.train.trainer import Trainer


def _cfg(photo_dir, out, **kw):
    base = dict(data=photo_dir, crop=32, depth=3, width=8, batch_size=2, mode="fmg", levels=1, iterations=12,
                fmg_iteration_ratio=2, val_crop=32, val_points=2, ckpt_every=100, progress=False, tensorboard=False,
                out=str(out), lr=3e-3, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _train(photo_dir, out, **kw):
    t = Trainer(_cfg(photo_dir, out, **kw))
    r = t.run()
    return t, r, {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def _max_diff(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def fp32_run(photo_dir, tmp_path_factory):
    return _train(photo_dir, tmp_path_factory.mktemp("fp32") / "run")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_in_that_dtype_and_stays_near_float32(photo_dir, tmp_path, fp32_run, precision):
    seen = set()
    t = Trainer(_cfg(photo_dir, tmp_path / "run", precision=precision))
    first_conv = next(m for m in t.model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda m, i, o: seen.add(o.dtype) if m.training else None)
    r = t.run()
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert seen == {want}  # the training forward ran under autocast
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # master weights stay float32
    assert r["complete"] and r["skipped_steps"] == 0
    weights = {k: v.detach() for k, v in t.model.state_dict().items()}
    diff = _max_diff(weights, fp32_run[2])
    assert 0 < diff < 0.05  # a different rounding, the same training
    assert abs(r["psnr"] - fp32_run[1]["psnr"]) < 0.5
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert (ck["grad_scaler"] is not None) == (precision == "fp16")


def test_fp16_resume_is_exact_with_the_scaler_state(photo_dir, tmp_path):
    _, full, w_full = _train(photo_dir, tmp_path / "full", precision="fp16")
    Trainer(_cfg(photo_dir, tmp_path / "cut", precision="fp16", max_steps=5)).run()
    _, resumed, w_res = _train(photo_dir, tmp_path / "cut", precision="fp16", resume=True)
    assert resumed["psnr"] == full["psnr"] and _max_diff(w_full, w_res) == 0


def test_channels_last_keeps_the_layout_and_the_result(photo_dir, tmp_path, fp32_run):
    t, r, w = _train(photo_dir, tmp_path / "run", channels_last=True)
    convs = [m for m in t.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    x, _ = t.draw([2])[0]
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert _max_diff(w, fp32_run[2]) < 1e-4 and r["psnr"] == pytest.approx(fp32_run[1]["psnr"], abs=1e-3)


def test_deterministic_runs_are_bitwise_equal(photo_dir, tmp_path):
    try:
        _, a, wa = _train(photo_dir, tmp_path / "a", deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        _, b, wb = _train(photo_dir, tmp_path / "b", deterministic=True)
    finally:
        torch.use_deterministic_algorithms(False)
    assert a["psnr"] == b["psnr"] and _max_diff(wa, wb) == 0


def test_compile_through_the_cli_matches_eager(photo_dir, tmp_path, fp32_run):
    """--compile on the CPU (inductor; about 10 s of compilation): every grid's input size runs
    through one dynamic-shape graph, and the weights match the eager run's."""
    opts = ["train", "--data", photo_dir, "--crop", "32", "--depth", "3", "--width", "8", "--batch-size", "2",
            "--mode", "fmg", "--levels", "1", "--iterations", "12", "--fmg-iteration-ratio", "2", "--val-crop", "32",
            "--val-points", "2", "--no-progress", "--no-tensorboard", "--threads", "1", "--lr", "3e-3", "--compile",
            "--out", str(tmp_path / "run")]
    assert main(opts) == 0
    r = json.loads((tmp_path / "run" / "result.json").read_text())
    w = torch.load(tmp_path / "run" / "model.pt")
    assert not any(k.startswith("_orig_mod") for k in w)  # saved as the plain module
    assert _max_diff(w, fp32_run[2]) < 1e-4 and r["psnr"] == pytest.approx(fp32_run[1]["psnr"], abs=1e-3)


def test_precision_option_values():
    from msconv.train.config import ConfigError

    assert TrainConfig.from_dict({"precision": 32}, source="run.yaml").precision == "32"  # YAML reads 32 as a number
    with pytest.raises(ConfigError, match=r"--precision: 'fp8' is not one of \['32', 'bf16', 'fp16'\]"):
        TrainConfig.from_dict({"precision": "fp8"}, source="run.yaml")

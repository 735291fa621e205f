"""The baselines a practitioner would run instead of multiscale training: their plans (Composer's
progressive-resizing schedule, Restormer's progressive patches, small patches), their work
accounting at equal budgets, and compare's summary against the best of them."""
import json

import pytest
import torch
from _photo_data import photo_dir  # noqa: F401 - the fixture (tests/_photo_data.py)
from _run_records import run_record

from msconv.models import build_model
from msconv.multilevel import MGE
from msconv.multilevel.baselines import (RESTORMER_ITERATIONS, plan_progressive_patches, plan_progressive_resizing,
                                         plan_small_patches, progressive_resizing_side, receptive_field)
from msconv.train import TrainConfig, Trainer
from msconv.train.compare import DEFAULT_MODES, best_baseline, compare, summarize
from msconv.train.config import ConfigError


def tiny(photo_dir, out, **kw):
    base = dict(data=photo_dir, crop=32, depth=3, width=4, batch_size=2, levels=2, budget=48, fmg_iteration_ratio=2.0,
                val_crop=32, val_points=4, ckpt_every=100, progress=False, tensorboard=False, out=str(out), lr=3e-3,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_progressive_resizing_side_follows_composers_schedule():
    # Composer's ProgressiveResizing defaults (initial_scale 0.5, delay 0.5, finetune 0.2, size
    # increment 4): half size until half-way, then linear to full size at 80% of training.
    side = lambda p, **kw: progressive_resizing_side(p, 128, **kw)  # noqa: E731
    assert [side(p) for p in (0.0, 0.3, 0.49, 0.5)] == [64] * 4
    assert side(0.55) == 76  # scale 0.5 + 0.5 * (0.05 / 0.3) = 0.583 -> 74.7 px -> nearest multiple of 4
    assert side(0.65) == 96 and side(0.8) == 128 and side(0.99) == 128
    assert side(0.0, initial_scale=0.25) == 32
    assert side(0.0, initial_scale=0.01) == 4  # never below one size increment


def test_progressive_resizing_plan_spends_the_budget_on_composers_timeline():
    stages = plan_progressive_resizing(128, 4, 1200.0)
    steps = sum(s.iterations for s in stages)
    work = sum(s.iterations * s.work_per_step for s in stages)
    assert abs(work - 1200) <= 4  # within one full-size step
    # half size for the first half (and a few steps of the ramp that still round to 64 pixels)
    assert stages[0].resize == 64 and steps / 2 <= stages[0].iterations <= steps / 2 + steps * 0.3 * 2 / 64 + 1
    assert stages[-1].resize is None and 0.2 * steps <= stages[-1].iterations <= 0.2 * steps + steps * 0.3 * 2 / 64 + 1
    assert all(s.levels == 0 and s.crop == 128 for s in stages)
    assert [s.resize for s in stages[:-1]] == sorted(s.resize for s in stages[:-1])
    assert stages[0].spacing == 2.0 and stages[0].area == 0.25


def test_progressive_patches_follow_restormers_proportions():
    stages = plan_progressive_patches(128, 4, 1200.0)
    assert [s.crop for s in stages] == [40, 56, 64, 88, 104, 128]
    work = [s.iterations * s.work_per_step for s in stages]
    assert sum(work) == pytest.approx(1200, rel=0.02)
    share = [w / sum(work) for w in work]
    assert share == pytest.approx([i / sum(RESTORMER_ITERATIONS) for i in RESTORMER_ITERATIONS], abs=0.01)
    # every phase's batch holds about the final batch's pixels
    assert all(abs(s.batch_sizes[0] * s.crop ** 2 / (4 * 128 ** 2) - 1) < 0.15 for s in stages)


def test_small_patches_buy_more_samples_for_the_same_work():
    (s,) = plan_small_patches(128, 32, 4, 1200.0)
    assert (s.crop, s.batch_sizes, s.iterations, s.work_per_step) == (32, [4], 4800, 0.25)
    with pytest.raises(ValueError, match="patch=256 is larger"):
        plan_small_patches(128, 256, 4, 100.0)


def test_receptive_field_is_measured():
    for depth in (3, 5):
        model = build_model("dncnn", 1, 1, depth=depth, width=4)
        assert receptive_field(model, 1) == 2 * depth + 1
        assert model.training and all(p.grad is None for p in model.parameters())


def test_work_units_count_small_and_resized_samples_against_the_reference_crop():
    model = torch.nn.Conv2d(1, 1, 3, padding=1)
    est = MGE(0, [8], unit_pixels=128 * 128)
    x = torch.rand(8, 1, 32, 32)
    est.loss(model, None, [(x, x)])
    assert est.last_cost.work_units == 8 * 32 * 32 / (128 * 128)
    with pytest.raises(ValueError, match="grid_spacing"):
        MGE(0, [8], grid_spacing=0)


@pytest.mark.parametrize("mode,allocation", [(m, "auto") for m in DEFAULT_MODES] + [("mge", "fixed"), ("mge", "auto")])
def test_every_mode_spends_its_budget(photo_dir, tmp_path, mode, allocation):
    # Equal work is what makes a comparison fair: every mode within 2% of the budget, and its
    # validation points spanning the run (the last one at its end). Matched MGE (auto) sets its
    # batch sizes as it trains, so it runs until the budget is spent.
    t = Trainer(tiny(photo_dir, tmp_path, mode=mode, budget=96, allocation=allocation))
    r = t.run()
    assert abs(r["work_units"] - 96) <= 0.02 * 96, (mode, r["work_units"], r["stages"])
    assert r["val_history"][-1]["work_units"] == r["work_units"]
    assert r["val_history"][1]["work_units"] <= 96 / 8


def test_small_patch_default_and_fmg_crop_reach_the_stages(photo_dir, tmp_path):
    t = Trainer(tiny(photo_dir, tmp_path, mode="small"))
    assert t.stages[0].crop == 16  # the 7-pixel receptive field of a 3-layer DnCNN, to a multiple of 8, >= 16
    from msconv.train.run import small_patch_rule

    assert [small_patch_rule(rf, 128) for rf in (7, 17, 21, 35, 300)] == [16, 16, 24, 32, 32]
    assert small_patch_rule(17, 8) == 8  # never above the crop
    assert small_patch_rule(17, 128, multiple=3) == 24  # sr x3-style size multiples: lcm(8, 3)
    t = Trainer(tiny(photo_dir, tmp_path, mode="fmg", fmg_crop=8))
    assert [s.crop for s in t.stages] == [32, 16, 8]  # coarsest first: the full crop fits there
    first = next(iter(t.schedule))
    assert first.batches[0][0].shape[-1] == 32 // 4  # the coarsest stage's grid (level 2) of a 32-pixel crop


@pytest.mark.parametrize("kw,match", [(dict(small_crop=64), "--small-crop 64 is larger than --crop 32"),
                                      (dict(fmg_crop=6), r"--fmg-crop 6 must be a multiple of 2\*\*levels = 4"),
                                      (dict(progressive_initial_scale=0.0), "--progressive-initial-scale"),
                                      (dict(progressive_delay=0.9), "--progressive-delay")])
def test_baseline_options_are_checked(photo_dir, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny(photo_dir, tmp_path, **kw).validated()


def test_summary_measures_against_the_best_baseline(tmp_path):
    single = [(0.0, 20.0), (10.0, 24.0), (100.0, 27.0)]
    small = [(0.0, 20.0), (10.0, 26.0), (50.0, 27.5), (100.0, 28.0)]
    fmg = [(0.0, 20.0), (10.0, 27.95), (100.0, 28.5)]
    results = [run_record("single", single), run_record("small", small), run_record("fmg", fmg)]
    assert best_baseline(results)["mode"] == "small"
    s = summarize(TrainConfig(), results, str(tmp_path))
    assert s["best_baseline"] == "small" and "best baseline (small) learned" in s["verdict"]
    f = s["runs"][2]
    assert f["delta_psnr_vs_best_baseline"] == pytest.approx(0.5)
    assert f["work_units_to_best_baseline_quality"] == 10.0 and f["x_less_work_than_best_baseline"] == 10.0
    assert s["runs"][0]["delta_psnr_vs_best_baseline"] == pytest.approx(-1.0)
    assert s["vs_baselines"]["fmg"]["single"]["x_less_work"] == 10.0  # single reached 27 only at 100
    md = (tmp_path / "summary.md").read_text()
    assert "best baseline, small" in md and "| fmg | +1.50 dB / 10.00× / 10.00× | +0.50 dB / 10.00× / 10.00× |" in md
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["best_baseline"] == "small"


def test_summary_reports_a_loss_to_the_best_baseline(tmp_path):
    small = [(0.0, 20.0), (10.0, 26.0), (100.0, 29.0)]
    fmg = [(0.0, 20.0), (10.0, 27.0), (100.0, 28.5)]
    s = summarize(TrainConfig(), [run_record("small", small), run_record("fmg", fmg)], str(tmp_path))
    f = s["runs"][1]
    assert f["delta_psnr_vs_best_baseline"] == pytest.approx(-0.5) and f["x_less_work_than_best_baseline"] is None
    line = [l for l in (tmp_path / "summary.md").read_text().splitlines() if l.startswith("| fmg")][0]
    assert "| -0.50 |" in line and line.endswith("| — | — | — | — |")


def test_compare_runs_the_baselines_by_default(photo_dir, tmp_path):
    s = compare(tiny(photo_dir, tmp_path, budget=24, val_points=2))
    assert [r["mode"] for r in s["runs"]] == list(DEFAULT_MODES)
    assert set(s["vs_baselines"]) == {"fmg"} and set(s["vs_baselines"]["fmg"]) == {"single", "small", "progressive",
                                                                                    "patches"}


def test_fmg_plain_stages_train_each_grid_with_the_plain_loss(photo_dir, tmp_path):
    t = Trainer(tiny(photo_dir, tmp_path, mode="fmg", fmg_plain_stages=True, fmg_crop=8, fmg_batch_ratio=1.0))
    assert [(s.base_level, s.levels, s.batch_sizes, s.crop) for s in t.stages] == [(2, 0, [2], 32), (1, 0, [2], 16),
                                                                                  (0, 0, [2], 8)]
    r = t.run()
    assert abs(r["work_units"] - 48) <= 0.02 * 48

"""The training driver: schedules, resume equality, non-finite handling, checkpoints, logs."""
import csv
import json
import os

import numpy as np
import pytest
import torch

from msconv.data import load_dataset
from msconv.multilevel import step_work
from msconv.train import plan_stages
from msconv.train.checkpoint import CheckpointError, load_checkpoint, save_atomic
from msconv.train.compare import compare, summarize, to_single_quality
from msconv.train.config import ConfigError, TrainConfig, load_yaml
from msconv.train.trainer import NonFiniteError, Trainer

from _photo_data import photo_dir  # noqa: F401 - the fixture (tests/_photo_data.py)
from _run_records import run_record


def tiny(photo_dir, out, **kw):
    # The product defaults' 8:1 Full-Multiscale ratio would leave the finest stage no steps at 8 iterations.
    # Full-Multiscale with MGE stages and full crops (the schedule these tests were written for;
    # the default plain-stage, small-patch schedule is tested in test_baselines.py).
    base = dict(data=photo_dir, crop=32, depth=3, width=4, blocks=1, batch_size=2, levels=2, iterations=8,
                fmg_iteration_ratio=2.0, fmg_batch_ratio=2.0, fmg_plain_stages=False, fmg_crop=32,
                val_crop=32, val_points=4, ckpt_every=100, progress=False, tensorboard=False, out=str(out),
                lr=3e-3, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_step_work_and_budget_scaling():
    assert step_work([4], 0) == 4
    assert step_work([4, 8, 16], 0) == 4 * 1.25 + 8 * (1 / 4 + 1 / 16) + 16 / 16
    single = plan_stages(TrainConfig(budget=100, batch_size=4))
    assert [(s.base_level, s.levels, s.batch_sizes, s.iterations) for s in single] == [(0, 0, [4], 25)]
    mge = plan_stages(TrainConfig(mode="mge", allocation="fixed", budget=130, batch_size=4, levels=2))
    assert mge[0].batch_sizes == [4, 4, 4] and mge[0].iterations == 20  # 6.5 work units per step
    mge_stages = dict(fmg_iteration_ratio=2.0, fmg_batch_ratio=2.0, fmg_plain_stages=False, fmg_crop=128)
    fmg = plan_stages(TrainConfig(mode="fmg", budget=165, batch_size=4, levels=2, **mge_stages))
    # Coarsest first; iterations halve and batches halve per finer stage.
    assert [s.base_level for s in fmg] == [2, 1, 0]
    assert [s.batch_sizes for s in fmg] == [[16], [8, 8], [4, 4, 4]]
    assert [s.iterations for s in fmg] == [40, 20, 10]
    assert abs(sum(s.iterations * s.work_per_step for s in fmg) - 165) < 1e-9
    fixed = plan_stages(TrainConfig(mode="fmg", iterations=14, levels=2, **mge_stages))
    assert sum(s.iterations for s in fixed) == 14


def test_config_errors_name_the_option(tmp_path):
    with pytest.raises(ConfigError, match="--crop 90 must be a multiple of 4"):
        TrainConfig(mode="mge", crop=90, levels=2).validated()
    with pytest.raises(ConfigError, match="--batch-sizes must be 3"):
        TrainConfig(mode="mge", batch_sizes=[4, 4], levels=2).validated()
    with pytest.raises(ConfigError, match="unknown option"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ConfigError, match="--mode mge needs --levels >= 1"):
        TrainConfig(mode="mge", levels=0).validated()
    p = tmp_path / "c.yaml"
    p.write_text("task: deblur\nbatch-sizes: 2,4,8\nlevels: 2\nlr: 0.01\n")
    cfg = TrainConfig.from_dict(load_yaml(str(p)))
    assert cfg.task == "deblur" and cfg.batch_sizes == [2, 4, 8] and cfg.resolved_noise_sigma == 2.55
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(str(p))


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _rows(path):
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k != "wall_clock_s"} for r in csv.DictReader(fh)]


@pytest.mark.parametrize("mode", ["mge", "fmg", "small", "progressive", "patches"])
def test_resume_after_interruption_is_exact(photo_dir, tmp_path, mode):
    data = load_dataset(photo_dir)
    full = Trainer(tiny(photo_dir, tmp_path / "full", mode=mode), data=data)
    full.run()

    class Killed(Exception):
        pass

    def kill(trainer, step):
        if step == 4:  # between checkpoints: step 4 is lost and must be redone identically
            raise Killed

    cfg = tiny(photo_dir, tmp_path / "cut", mode=mode, ckpt_every=3)
    with pytest.raises(Killed):
        Trainer(cfg, on_step=kill, data=data).run()
    assert load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))["step"] == 3
    resumed = Trainer(cfg.replace(resume=True), data=data)
    r = resumed.run()
    assert r["complete"] and r["iterations"] == full.state.step
    for k, v in _weights(full.model).items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert r["work_units"] == full.state.work_units and r["flops"] == full.state.flops
    assert [h["psnr"] for h in r["val_history"]] == [h["psnr"] for h in full.state.val_history]
    assert _rows(tmp_path / "cut" / "metrics.csv") == _rows(tmp_path / "full" / "metrics.csv")
    assert torch.equal(full.optimizer.state_dict()["state"][0]["exp_avg"],
                       resumed.optimizer.state_dict()["state"][0]["exp_avg"])


def test_nan_loss_is_skipped_without_touching_the_weights(photo_dir, tmp_path):
    seen = {}
    tr = Trainer(tiny(photo_dir, tmp_path, mode="single", inject_nan_at=[3]),
                 on_step=lambda t, s: seen.__setitem__(s, _weights(t.model)))
    r = tr.run()
    assert r["complete"] and r["skipped_steps"] == 1 and r["iterations"] == 8
    for k in seen[2]:
        assert torch.equal(seen[2][k], seen[3][k])  # the NaN step changed nothing
        assert not torch.equal(seen[3][k], seen[4][k]) or "bias" in k  # training went on
    assert all(torch.isfinite(v).all() for v in tr.model.state_dict().values())
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["skipped"] for r in rows if r["step"] == "3"] == ["1"]
    assert all(torch.isfinite(v).all() for v in tr.optimizer.state_dict()["state"][0].values())


def test_nan_loss_stops_with_a_message_and_a_good_checkpoint(photo_dir, tmp_path):
    seen = {}
    tr = Trainer(tiny(photo_dir, tmp_path, mode="mge", inject_nan_at=[4], on_nonfinite="stop"),
                 on_step=lambda t, s: seen.__setitem__(s, _weights(t.model)))
    with pytest.raises(NonFiniteError, match=r"step 4: .*not finite.*--on-nonfinite stop.*checkpoint\.pt"):
        tr.run()
    ck = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert ck["step"] == 4 and ck["skipped_total"] == 1
    for k, v in ck["model"].items():
        assert torch.isfinite(v).all() and torch.equal(v, seen[3][k])


def test_too_many_consecutive_skips_stop(photo_dir, tmp_path):
    tr = Trainer(tiny(photo_dir, tmp_path, inject_nan_at=[1, 2, 3], max_skips=3))
    with pytest.raises(NonFiniteError, match="3 consecutive skipped steps"):
        tr.run()


def test_unreadable_and_foreign_checkpoints(photo_dir, tmp_path):
    cfg = tiny(photo_dir, tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(cfg).run()
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*checkpoint\.pt.*start fresh"):
        Trainer(cfg).run()
    Trainer(cfg.replace(resume=False, max_steps=2)).run()
    good = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(good[: len(good) // 2])  # torn write (what atomic saving prevents)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        Trainer(cfg).run()
    (tmp_path / "checkpoint.pt").write_bytes(good)
    with pytest.raises(CheckpointError, match="different run.*task"):
        Trainer(cfg.replace(task="deblur")).run()


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    save_atomic({"format": "msconv-train-1", "v": 1}, path)

    def broken(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"format": "msconv-train-1", "v": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["v"] == 1
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_tensorboard_events_are_readable_by_tensorboard(photo_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(tiny(photo_dir, tmp_path, mode="mge", iterations=3, val_points=1, tensorboard=True)).run()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/work_units", "val/psnr", "val/ssim", "val/psnr_vs_work_units"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [e.value for e in acc.Scalars("val/psnr")] == pytest.approx([float(r["val_psnr"]) for r in rows if r["val_psnr"]])
    # Where each step trained, a sample restoration per validation, and the options with the final scores.
    assert [e.value for e in acc.Scalars("train/level")] == [float(r["level"]) for r in rows if r.get("loss")]
    images = acc.Images("val/input_restored_clean")
    assert len(images) == len(acc.Scalars("val/psnr")) and images[0].width == 3 * images[0].height
    tags = set()
    for name in os.listdir(tmp_path / "tb"):  # add_hparams writes a file of its own
        hp = EventAccumulator(str(tmp_path / "tb" / name))
        tags |= set(hp.Reload().Tags()["scalars"])
    assert {"hparam/val_psnr", "hparam/work_units"} <= tags


def test_to_single_quality():
    h = [{"psnr": 20.0, "work_units": 0, "wall_clock_s": 0}, {"psnr": 25.95, "work_units": 10, "wall_clock_s": 1.5},
         {"psnr": 26.5, "work_units": 20, "wall_clock_s": 3.0}]
    assert to_single_quality(h, 26.0) == (10, 1.5)
    assert to_single_quality(h, 27.0) == (None, None)


@pytest.mark.parametrize("task,model,conv", [("deblur", "resnet", "standard"), ("inpaint", "unet", "standard"),
                                             ("sr", "espcn", "standard"), ("sr", "dncnn", "standard"),
                                             ("denoise", "dncnn", "mf")])
def test_every_task_trains_with_mge(photo_dir, tmp_path, task, model, conv):
    r = Trainer(tiny(photo_dir, tmp_path, task=task, model=model, conv=conv, mode="mge", iterations=2, levels=1,
                     val_points=1, mf_sigma=1.0 if conv == "mf" else None)).run()
    assert r["complete"] and np.isfinite(r["psnr"]) and r["work_units"] > 0


def test_mesh_free_layers_too_narrow_for_the_coarsest_grid_are_flagged_once(photo_dir, tmp_path):
    import warnings

    from msconv.nn import UnresolvedSigmaWarning

    # With the σ floor off, the run says it once up front, in the CLI's terms; the layers' own
    # warning on the coarse steps does not repeat it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(tiny(photo_dir, tmp_path, conv="mf", mode="fmg", levels=2, mf_sigma_floor=0, iterations=3,
                     val_points=1)).run()
    flagged = [str(w.message) for w in caught if "resolved" in str(w.message)]
    assert len(flagged) == 1 and "--mf-sigma 2" in flagged[0] and "--mf-sigma-floor 0.5" in flagged[0], flagged
    assert not [w for w in caught if issubclass(w.category, UnresolvedSigmaWarning)]
    # The default floor, or a σ the coarsest grid resolves: nothing to say.
    for kw in (dict(), dict(mf_sigma=2.0, mf_sigma_floor=0)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            Trainer(tiny(photo_dir, tmp_path, conv="mf", mode="fmg", levels=2, **kw))


def test_mf_sigma_floor_reaches_the_layers_and_rejects_bad_values(photo_dir, tmp_path):
    from msconv.nn import MFConv2d
    from msconv.train.config import ConfigError

    def floors(**kw):
        t = Trainer(tiny(photo_dir, tmp_path, conv="mf", mode="fmg", levels=2, **kw))
        return {m.sigma_floor for m in t.model.modules() if isinstance(m, MFConv2d)}

    assert floors() == {0.5}
    assert floors(mf_sigma_floor=0.25) == {0.25}
    assert floors(mf_sigma_floor=0) == {None}
    for bad in (-1.0, float("nan"), "x", True):
        with pytest.raises(ConfigError, match="--mf-sigma-floor"):
            Trainer(tiny(photo_dir, tmp_path, conv="mf", mf_sigma_floor=bad))


def test_compare_writes_summary(photo_dir, tmp_path):
    s = compare(tiny(photo_dir, tmp_path, iterations=None, budget=12, count_flops=True, test_data=photo_dir),
                modes=["single", "mge", "fmg"])
    assert [r["mode"] for r in s["runs"]] == ["single", "mge", "fmg"]
    keys = {"mode", "conv", "psnr", "ssim", "test_psnr", "test_ssim", "work_units", "flops", "wall_clock_s",
            "iterations", "work_units_to_single_quality", "wall_clock_to_single_quality_s", "start_psnr",
            "ratio_resolution", "delta_psnr_vs_best_baseline", "work_units_to_best_baseline_quality",
            "wall_clock_to_best_baseline_quality_s", "x_less_work_than_best_baseline", "x_less_time_than_best_baseline"}
    on_disk = json.load(open(tmp_path / "summary.json"))
    assert set(on_disk) == {"config", "runs", "baseline_learned", "verdict", "best_baseline", "vs_baselines"}
    assert all(set(r) == keys for r in on_disk["runs"])
    for r in on_disk["runs"]:
        assert abs(r["work_units"] - 12) <= 3 and r["flops"] > 0
        assert np.isfinite(r["test_psnr"]) and 0 < r["test_ssim"] <= 1  # full test images, once at the end
    single = on_disk["runs"][0]
    md = (tmp_path / "summary.md").read_text()
    assert md.count("\n| ") == 4 and "× less work" in md
    gain = single["psnr"] - single["start_psnr"]
    assert on_disk["baseline_learned"] == (gain >= 1.0)
    if on_disk["baseline_learned"]:
        assert single["work_units_to_single_quality"] is not None  # single reaches its own final PSNR
    else:  # 12 work units of a 3-layer model: no ratio may be claimed
        assert all(r["work_units_to_single_quality"] is None for r in on_disk["runs"]) and "did not learn" in md
    for png in ("psnr_vs_work_units.png", "psnr_vs_wall_clock.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_summary_gives_no_savings_when_the_baseline_did_not_learn(tmp_path):
    # The user-reported failure: every mode ended at the input's PSNR and the summary claimed
    # "work to quality 0.0" for all of them.
    flat = [(0.0, 20.28), (10.0, 20.28), (100.0, 20.29)]
    s = summarize(TrainConfig(), [run_record("single", flat), run_record("fmg", flat)], str(tmp_path))
    assert s["baseline_learned"] is False and "did not learn" in s["verdict"] and "--budget" in s["verdict"]
    assert all(r["work_units_to_single_quality"] is None for r in s["runs"])
    md = (tmp_path / "summary.md").read_text()
    rows = [l for l in md.splitlines() if l.startswith("| single") or l.startswith("| fmg")]
    assert "did not learn" in md and len(rows) == 2 and all(l.endswith("| — | — | — | — |") for l in rows)


def test_summary_reports_nan_as_nan_and_never_divides_by_zero(tmp_path):
    single = [(0.0, 20.3), (1.0, 24.0), (10.0, 27.0), (100.0, 28.0)]
    nan_run = [(0.0, 20.3), (1.0, float("nan")), (100.0, float("nan"))]
    s = summarize(TrainConfig(), [run_record("single", single), run_record("mge", nan_run)], str(tmp_path))
    assert s["baseline_learned"] is True
    mge = s["runs"][1]
    assert mge["work_units_to_single_quality"] is None
    line = [l for l in (tmp_path / "summary.md").read_text().splitlines() if l.startswith("| mge")][0]
    assert "| nan |" in line


def test_summary_ratio_and_its_resolution(tmp_path):
    single = [(0.0, 20.0), (6.25, 22.0), (12.5, 24.0), (25.0, 26.0), (50.0, 27.0), (100.0, 28.0)]
    fmg = [(0.0, 20.0), (6.25, 25.0), (12.5, 28.0), (25.0, 28.5), (50.0, 28.6), (100.0, 28.7)]
    fast = [(0.0, 20.0), (6.25, 28.0), (100.0, 28.9)]
    s = summarize(TrainConfig(), [run_record("single", single), run_record("fmg", fmg), run_record("mge", fast)], str(tmp_path))
    assert s["runs"][1]["work_units_to_single_quality"] == 12.5 and s["runs"][0]["work_units_to_single_quality"] == 100
    assert s["runs"][1]["ratio_resolution"] == 2.0  # crossed between 6.25 and 12.5 work units
    assert s["runs"][2]["ratio_resolution"] == float("inf")  # already there at the first point
    md = (tmp_path / "summary.md").read_text()
    assert "| 8.00 |" in md and "fmg 2.00×" in md and "mge reached it at the first validation point" in md


def test_validation_points_are_log_spaced_over_the_budget(photo_dir, tmp_path):
    tr = Trainer(tiny(photo_dir, tmp_path, iterations=None, budget=512, batch_size=2, val_points=5))
    from msconv.train.evaluate import val_threshold

    th = [val_threshold(j, 5, tr.planned_work) for j in range(6)]
    assert th[0] == 0 and th[-1] == pytest.approx(tr.planned_work)
    assert th[1] == pytest.approx(tr.planned_work / 256)
    assert all(b / a == pytest.approx(4.0) for a, b in zip(th[1:], th[2:]))


def test_a_budget_too_small_to_learn_warns_and_names_the_option(photo_dir, tmp_path):
    with pytest.warns(UserWarning, match="--budget 200 or more"):
        plan_stages(tiny(photo_dir, tmp_path, iterations=None, budget=8, batch_size=2))


def test_fmg_adaptive_moves_on_when_validation_stalls(photo_dir, tmp_path):
    # lr = 0: the weights never change, so the stage-grid validation never improves and every
    # stage but the finest ends after `patience` validations without improvement.
    tr = Trainer(tiny(photo_dir, tmp_path, mode="fmg", lr=0.0, fmg_adaptive=True, fmg_validate_every=1,
                      fmg_patience=1))
    r = tr.run()
    assert [s["iterations"] for s in r["stages"]] == [5, 2, 1]
    assert [st.steps_run for st in tr.schedule.stages] == [2, 2, 1] and tr.schedule.stages[0].advanced_early
    assert r["complete"] and r["iterations"] == 5 and r["work_units"] < tr.planned_work


SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "BSD68")), reason="../shared/data/BSD68 not present")
def test_trains_on_the_shared_benchmarks_by_path(tmp_path):
    r = Trainer(TrainConfig(data=os.path.join(SHARED, "Train400"), val_data=os.path.join(SHARED, "BSD68"),
                            mode="fmg", crop=64, depth=4, width=8, batch_size=4, iterations=6, val_crop=64,
                            val_points=1, progress=False, tensorboard=False, out=str(tmp_path))).run()
    assert r["complete"] and r["psnr"] > 15


@pytest.mark.parametrize("optimizer", ["sgd", "lars", "lamb"])
def test_optimizers_train_and_resume(photo_dir, tmp_path, optimizer):
    cfg = tiny(photo_dir, tmp_path, optimizer=optimizer, lr=None, mode="mge", allocation="paper", batch_size=1,
               iterations=3, val_points=1)
    first = Trainer(cfg.replace(max_steps=2))
    first.run()
    r = Trainer(cfg.replace(resume=True)).run()
    assert r["complete"] and np.isfinite(r["psnr"]) and r["stages"][0]["batch_sizes"] == [1, 4, 16]


@pytest.mark.parametrize("shape", [(1, 64, 48), (3, 40, 40), (1, 9, 7)])
def test_psnr_ssim_match_scikit_image(shape):
    """torchmetrics, configured as scikit-image's defaults, gives scikit-image's figures."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from msconv.train import psnr_ssim

    g = torch.Generator().manual_seed(0)
    target = torch.nn.functional.avg_pool2d(torch.rand(1, *shape, generator=g, dtype=torch.float64), 3, 1, 1)[0]
    pred = target + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)  # leaves [0, 1]: clipped
    p, t = pred.clamp(0, 1).numpy(), target.numpy()
    ref_psnr = peak_signal_noise_ratio(t, p, data_range=1.0)
    ref_ssim = (structural_similarity(t[0], p[0], data_range=1.0) if shape[0] == 1
                else structural_similarity(t, p, data_range=1.0, channel_axis=0))
    psnr, ssim = psnr_ssim(pred.float(), target.float())
    assert abs(psnr - ref_psnr) < 1e-3 and abs(ssim - ref_ssim) < 1e-5
    assert psnr_ssim(target, target) == (100.0, pytest.approx(1.0))  # exact: capped, not inf
    with pytest.raises(ValueError, match="at least 7x7"):
        psnr_ssim(target[:, :5, :5], target[:, :5, :5])


def test_learning_rate_is_one_function_of_the_position_and_resume_takes_a_new_peak(photo_dir, tmp_path):
    # The loop writes lr(t) * stage scale before every step; nothing is stepped or saved, so a
    # resumed run recomputes it and --resume --lr continues the same curve from the new peak.
    cfg = tiny(photo_dir, tmp_path, mode="single", iterations=10, warmup=0.2, lr=1e-2)
    Trainer(cfg.replace(max_steps=4)).run()
    r = Trainer(cfg.replace(resume=True, lr=5e-3)).run()
    rows = [x for x in csv.DictReader(open(tmp_path / "metrics.csv")) if x["lr"]]
    lrs = [float(x["lr"]) for x in rows]
    from msconv.optim.schedule import warmup_poly_factor

    want = [(1e-2 if t < 4 else 5e-3) * warmup_poly_factor(t, 2, 10, 1.0) for t in range(10)]
    assert r["complete"] and lrs == pytest.approx(want, rel=1e-12)


def test_a_checkpoint_of_the_previous_format_resumes(photo_dir, tmp_path):
    # Checkpoints written while the loop stepped a torch LR scheduler carry its state; the rate
    # is now a function of the schedule position, and such a checkpoint continues exactly.
    data = load_dataset(photo_dir)
    full = Trainer(tiny(photo_dir, tmp_path / "full", mode="fmg"), data=data)
    full.run()
    cfg = tiny(photo_dir, tmp_path / "cut", mode="fmg")
    Trainer(cfg.replace(max_steps=3), data=data).run()
    ck = load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))
    ck["scheduler"] = {"base_lrs": [3e-3], "last_epoch": 3, "lr_lambdas": [{}]}
    save_atomic(ck, str(tmp_path / "cut" / "checkpoint.pt"))
    resumed = Trainer(cfg.replace(resume=True), data=data)
    resumed.run()
    for k, v in _weights(full.model).items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_a_full_multiscale_run_from_before_the_new_options_resumes_as_it_ran(photo_dir, tmp_path):
    # Its config.json and checkpoint have no fmg_plain_stages / fmg_crop / coarse_task: they ran MGE
    # stages on full crops, which `--resume --out` must rebuild (today's defaults would be plain
    # stages on small patches, silently another run).
    from msconv.cli import main

    args = ["train", "--mode", "fmg", "--data", photo_dir, "--crop", "32", "--depth", "2", "--width", "4",
            "--levels", "2", "--iterations", "8", "--fmg-iteration-ratio", "2", "--fmg-batch-ratio", "2",
            "--no-fmg-plain-stages", "--fmg-crop", "32", "--val-points", "1", "--no-progress", "--no-tensorboard",
            "--threads", "1"]
    assert main(args + ["--out", str(tmp_path / "full")]) == 0
    cut = tmp_path / "cut"
    assert main(args + ["--out", str(cut), "--max-steps", "3"]) == 0
    cfg = json.load(open(cut / "config.json"))
    ck = load_checkpoint(str(cut / "checkpoint.pt"))
    for k in ("fmg_plain_stages", "fmg_crop", "coarse_task"):
        cfg.pop(k)
        ck["config"].pop(k)
    json.dump(cfg, open(cut / "config.json", "w"))
    save_atomic(ck, str(cut / "checkpoint.pt"))
    assert main(["train", "--resume", "--out", str(cut), "--no-progress"]) == 0
    a, b = torch.load(tmp_path / "full" / "model.pt"), torch.load(cut / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)

"""Full-Multiscale schedule: stage order, iterations, batch sizes, estimator per stage,
state carried over, one LR schedule, adaptive advance, resume, non-finite steps, errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import msconv
from msconv.multilevel import MGE, FullMultiscale
from msconv.optim import warmup_poly_factor
from test_multilevel_data import IndexImages, ids

F64 = torch.float64


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 1, 3, padding=1)).double()


def make_sampler(seed: int = 0, size: int = 16):
    """Deterministic synthetic batches: ``sample_batches(sizes) -> [(x, y), …]``."""
    g = torch.Generator().manual_seed(seed)

    def sample_batches(sizes):
        out = []
        for n in sizes:
            x = torch.rand(n, 1, size, size, generator=g, dtype=F64)
            out.append((x, x.roll(1, -1)))
        return out

    return sample_batches


def test_default_plan_runs_coarse_to_fine_halving_iterations_and_batches():
    fmg = FullMultiscale(2, 8, 8, dataset=IndexImages(400, size=8))
    assert [(s.level, s.iterations, s.batch_sizes) for s in fmg.stages] == [
        (2, 8, [8]), (1, 4, [4, 4]), (0, 2, [2, 2, 2])]
    assert [(s.estimator.levels, s.estimator.base_level) for s in fmg.stages] == [(0, 2), (1, 1), (2, 0)]
    assert fmg.total_steps == 14
    # work: 8·8/16 + 4·4·(1/4 + 1/16 + 1/16) + 2·2·(1 + 1/4 + 1/4 + 1/16 + 1/16)
    assert fmg.planned_work() == 8 * 8 / 16 + 4 * 4 * (0.25 + 0.0625 + 0.0625) + 2 * 2 * (1 + 0.5 + 0.125)

    model = nn.Conv2d(1, 1, 3, padding=1).double()
    scales = []
    model.register_forward_pre_hook(lambda m, a: scales.append((msconv.current_grid_scale(), a[0].shape[-1])))
    log, seen = [], []
    for step in fmg:
        assert [x.shape[0] for x, _ in step.batches] == step.batch_sizes
        seen += [i for x, _ in step.batches for i in ids(x)]
        scales.clear()
        step.loss(model, None, [(x.double(), y.double()) for x, y in step.batches]).backward()
        log.append((step.stage.level, step.iteration, step.global_step, sorted(set(scales))))
    assert [r[:3] for r in log] == (
        [(2, i, i) for i in range(8)] + [(1, i, 8 + i) for i in range(4)] + [(0, i, 12 + i) for i in range(2)])
    assert log[0][3] == [(4.0, 2)] and log[8][3] == [(2.0, 4), (4.0, 2)] and log[-1][3] == [(1.0, 8), (2.0, 4), (4.0, 2)]
    assert len(seen) == len(set(seen)) == 64 + 32 + 12  # one shared stream: no sample twice in the run


def test_explicit_plans_and_paper_allocation_per_stage():
    fmg = FullMultiscale(1, [5, 3], [[6], [2, 4]])
    assert [(s.iterations, s.batch_sizes) for s in fmg.stages] == [(5, [6]), (3, [2, 4])]
    fmg = FullMultiscale(2, 4, 8, allocation="paper")
    assert [s.batch_sizes for s in fmg.stages] == [[8], [4, 16], [2, 8, 32]]
    fmg = FullMultiscale(2, 4, 4, world_size=2, rank=1)
    assert [s.batch_sizes for s in fmg.stages] == [[4], [2, 2], [2, 2, 2]]  # halved, kept a multiple of the world


def test_weights_and_optimizer_state_carry_over_like_one_manual_loop():
    fmg = FullMultiscale(2, [3, 2, 2], [4, 2, 2], sample_batches=make_sampler(1), estimator_kwargs={"count_flops": False})
    model = tiny_model()
    manual = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    history = fmg.fit(model, opt)
    assert [h["level"] for h in history] == [2, 2, 2, 1, 1, 0, 0]

    opt2 = torch.optim.SGD(manual.parameters(), lr=0.1, momentum=0.9)  # one optimizer for all stages
    sample = make_sampler(1)
    for k, (iters, sizes) in zip((2, 1, 0), ((3, [4]), (2, [2, 2]), (2, [2, 2, 2]))):
        est = MGE(2 - k, sizes, base_level=k, count_flops=False)
        for _ in range(iters):
            opt2.zero_grad()
            est.loss(manual, None, sample(sizes)).backward()
            opt2.step()
    for p, q in zip(model.parameters(), manual.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_one_lr_schedule_spans_all_stages_also_when_a_stage_ends_early():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    calls = []

    def validate():  # never improves after the first call: every non-final stage ends early
        calls.append(fmg.stage.level)
        return 1.0

    fmg = FullMultiscale(2, [6, 6, 4], 2, sample_batches=make_sampler(2), validate=validate, validate_every=2,
                         patience=1)
    sched = fmg.lr_scheduler(opt, warmup_steps=2, power=2.0)
    assert fmg.total_steps == 16
    lrs = {}
    for step in fmg:
        lrs[step.global_step] = opt.param_groups[0]["lr"]
        opt.zero_grad()
        step.loss(model).backward()
        opt.step()
        sched.step()  # the loop owns the scheduler; the schedule only fast-forwards it over skipped iterations
    # Stage 1 (level 2) validates at steps 2 and 4 and stops after 4 of its 6; stage 2 likewise.
    assert [(s.steps_run, s.advanced_early) for s in fmg.stages] == [(4, True), (4, True), (4, False)]
    assert calls == [2, 2, 1, 1]
    assert sorted(lrs) == [0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15]  # skipped iterations skip the schedule
    for t, lr in lrs.items():
        assert lr == pytest.approx(0.5 * warmup_poly_factor(t, 2, 16, 2.0), abs=1e-15)
    assert fmg.global_step == 16


def test_resume_from_state_dict_continues_the_same_data_lr_and_weights():
    """A run stopped after any step and resumed from (model, optimizer, scheduler, schedule) states
    sees the same batches and learning rates and ends with the same weights."""

    def run(stop_after=None, saved=None):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        fmg = FullMultiscale(1, [4, 3], [6, [2, 2]], dataset=IndexImages(30, size=8), seed=3)
        sched = fmg.lr_scheduler(opt, warmup_steps=1)
        if saved is not None:
            for obj, st in zip((model, opt, sched, fmg), saved):
                obj.load_state_dict(copy.deepcopy(st))
        seen = []
        for step in fmg:
            seen.append((step.stage.level, step.global_step, opt.param_groups[0]["lr"],
                         [ids(x) for x, _ in step.batches]))
            opt.zero_grad()
            step.loss(model, None, [(x.double(), y.double()) for x, y in step.batches]).backward()
            opt.step()
            sched.step()
            if step.global_step == stop_after:
                return seen, [copy.deepcopy(o.state_dict()) for o in (model, opt, sched, fmg)]
        return seen, model

    full, model = run()
    for stop in (2, 3, 5):  # inside stage 0, at its last step, inside stage 1
        head, saved = run(stop_after=stop)
        tail, resumed = run(saved=saved)
        assert head + tail == full
        for p, q in zip(model.parameters(), resumed.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_nonfinite_loss_is_skipped_or_stops_without_touching_the_weights():
    def nan_loss(pred, y):
        return F.mse_loss(pred, y) * float("nan")

    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    fmg = FullMultiscale(1, 2, 2, sample_batches=make_sampler(3))
    history = fmg.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), nan_loss)
    assert [h["skipped"] for h in history] == [True] * 3
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(FloatingPointError, match="non-finite loss.*nonfinite='skip'"):
        FullMultiscale(1, 2, 2, sample_batches=make_sampler(3)).fit(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                                   nan_loss, nonfinite="raise")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_bad_schedule_configuration_errors_name_the_argument_and_the_fix():
    with pytest.raises(ValueError, match=r"iterations has 2 entries but levels=2 gives 3 stages"):
        FullMultiscale(2, [4, 2], 4)
    with pytest.raises(ValueError, match=r"levels must be an int >= 0"):
        FullMultiscale(-1, 4, 4)
    with pytest.raises(ValueError, match=r"stage 1 \(finest level 0\).*batch_sizes must be positive"):
        FullMultiscale(1, 4, [4, [2, 0]])
    with pytest.raises(ValueError, match=r"dataset= or sample_batches=, not both"):
        FullMultiscale(1, 4, 4, dataset=IndexImages(10), sample_batches=make_sampler())
    with pytest.raises(ValueError, match=r"patience must be an int >= 1"):
        FullMultiscale(1, 4, 4, patience=0)
    step = next(iter(FullMultiscale(1, 4, 4)))
    with pytest.raises(ValueError, match=r"no data source; pass batches="):
        step.loss(tiny_model())
    step = next(iter(FullMultiscale(3, 4, 4, sample_batches=make_sampler(size=4))))
    with pytest.raises(ValueError, match=r"restricted only 2 time\(s\).*use fewer levels or larger images"):
        step.loss(tiny_model())


def test_full_multiscale_trains_a_mesh_free_model_at_every_grid_scale():
    torch.manual_seed(0)
    model = nn.Sequential(msconv.MFConv2d(1, 4, 3), nn.Tanh(), msconv.MFConv2d(4, 1, 3)).double()
    scales = set()
    model[0].register_forward_pre_hook(lambda m, a: scales.add(msconv.current_grid_scale()))
    fmg = FullMultiscale(2, 2, 4, sample_batches=make_sampler(4))
    history = fmg.fit(model, torch.optim.SGD(model.parameters(), lr=0.05))
    assert scales == {1.0, 2.0, 4.0}
    assert all(not h["skipped"] and h["flops"] > 0 for h in history)


def test_single_mge_and_full_multiscale_are_one_schedule_type_sized_by_one_work_formula():
    from msconv.multilevel import Schedule, plan, step_work

    single = plan("single", 2, [4, 4, 4], budget=100)
    mge = plan("mge", 2, [4, 4, 4], budget=130)
    fmg = plan("fmg", 2, [4, 4, 4], budget=165)
    assert [(s.base_level, s.levels, s.batch_sizes, s.iterations) for s in single] == [(0, 0, [4], 25)]
    assert [(s.base_level, s.levels, s.batch_sizes, s.iterations) for s in mge] == [(0, 2, [4, 4, 4], 20)]
    assert [(s.base_level, s.levels, s.batch_sizes, s.iterations) for s in fmg] == [
        (2, 0, [16], 40), (1, 1, [8, 8], 20), (0, 2, [4, 4, 4], 10)]
    for stages, budget in ((single, 100), (mge, 130), (fmg, 165)):
        assert sum(s.iterations * step_work(s.batch_sizes, s.base_level) for s in stages) == pytest.approx(budget)
        sched = Schedule(stages, sample_batches=make_sampler(5))
        assert sched.planned_work() == pytest.approx(budget)
        assert sum(1 for _ in sched) == sched.total_steps
    assert [s.lr_scale for s in plan("fmg", 2, [4, 4, 4], iterations=7, lr_batch_power=0.5)] == [2.0, 2.0 ** 0.5, 1.0]
    with pytest.raises(ValueError, match="exactly one of budget"):
        plan("mge", 1, [2, 2])

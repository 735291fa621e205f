"""Coarse Full-Multiscale stages draw their batches on their own grid (no fine-grid pixels that
would only be averaged away): the same distribution, the same loss and the same work units."""
import pytest
import torch
import torch.nn as nn

import msconv
from msconv.multilevel import MGE, Schedule, plan
from msconv.tasks import Deblur, Denoise


@pytest.mark.parametrize("rule", ["preserve", "average"])
def test_denoise_on_a_coarse_grid_has_the_fine_routes_noise_level(rule):
    y = torch.rand(64, 1, 64, 64)
    task = Denoise(25, rule)
    x2, y2 = task.corrupt_on_grid(y, torch.Generator().manual_seed(0), 2)
    assert x2.shape == y2.shape == (64, 1, 16, 16)
    assert torch.equal(y2, msconv.restrict(y, levels=2))
    # The fine route: corrupt at level 0, then restrict the pair as MGE does.
    xf, yf = task.restrict_pair(*task.corrupt(y, torch.Generator().manual_seed(1)), 2)
    direct, fine = (x2 - y2).std().item(), (xf - yf).std().item()
    expected = 25 / 255 / (1 if rule == "preserve" else 4)
    assert direct == pytest.approx(expected, rel=0.03) and fine == pytest.approx(expected, rel=0.03)
    # White on the coarse grid, like cell averages of white noise: neighbours uncorrelated.
    n = (x2 - y2)[..., :, :]
    corr = (n[..., 1:] * n[..., :-1]).mean() / n.var()
    assert abs(float(corr)) < 0.03


def test_other_tasks_and_restrictions_take_the_fine_route_exactly():
    y = torch.rand(3, 1, 32, 32)
    for task, kind in ((Deblur(1.6, 2.55, coarse="restricted"), "average"), (Denoise(25, "preserve"), "full_weighting")):
        a = task.corrupt_on_grid(y, torch.Generator().manual_seed(3), 1, kind)
        b = task.restrict_pair(*task.corrupt(y, torch.Generator().manual_seed(3)), 1, kind)
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_mge_on_batches_drawn_on_its_finest_grid_matches_the_fine_route():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))
    fine = [(torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64)) for _ in range(2)]
    coarse = [(msconv.restrict(x, levels=2), msconv.restrict(y, levels=2)) for x, y in fine]
    a = MGE(1, [2, 2], base_level=2)
    b = MGE(1, [2, 2], base_level=2, data_level=2)
    la, lb = a.loss(model, None, fine), b.loss(model, None, coarse)
    assert torch.allclose(la, lb, rtol=1e-5, atol=1e-7)
    assert a.last_cost.work_units == b.last_cost.work_units == 2 * (1 / 16 + 1 / 64) + 2 / 64
    with pytest.raises(ValueError, match="data_level=3 is coarser than base_level=2"):
        MGE(1, [2, 2], base_level=2, data_level=3)


def test_schedule_hands_each_stage_its_own_grid_level():
    seen = []

    def draw(sizes, level):
        seen.append(level)
        side = 32 // 2**level
        return [(torch.rand(n, 1, side, side), torch.rand(n, 1, side, side)) for n in sizes]

    stages = plan("fmg", 2, [2, 2, 2], iterations=6, iteration_ratio=2.0, batch_ratio=2.0)
    sched = Schedule(stages, sample_batches=draw, batches_on_stage_grid=True)
    model = nn.Conv2d(1, 1, 3, padding=1)
    for step in sched:
        step.estimator.loss(model, None, step.batches).backward()
    assert sorted(set(seen)) == [0, 1, 2] and seen[0] == 2 and seen[-1] == 0
    with pytest.raises(ValueError, match="needs sample_batches"):
        Schedule(stages, batches_on_stage_grid=True)

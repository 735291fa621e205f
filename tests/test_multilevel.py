"""MGE estimator: exact collapse, unbiasedness, fusion, cost accounting, allocation, errors.

References are written out here: the fine loss and its gradient from plain autograd, the
telescoping sum term by term, FLOPs and work units counted by hand.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import msconv
from msconv.multilevel import MGE, MLMC, IndexStream, Paper, batch_coupled_modules, mlmc_batch_sizes, paper_batch_sizes

F64 = torch.float64


def small_model(seed: int = 0, dtype=F64, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.Tanh()]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers.append(nn.Conv2d(4, 3, 3, padding=1))
    return nn.Sequential(*layers).to(dtype)


def smooth_images(n: int, size: int, seed: int, noise: float = 0.0) -> torch.Tensor:
    """Band-limited random fields (a few low-frequency waves) plus optional white noise."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.arange(size, dtype=F64) + 0.5) / size
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    k = torch.randint(1, 3, (n, 3, 2, 2), generator=g).to(F64)
    ph = torch.rand(n, 3, 2, generator=g, dtype=F64) * 2 * math.pi
    img = sum(
        torch.sin(2 * math.pi * (k[:, :, i, 0, None, None] * xx + k[:, :, i, 1, None, None] * yy) + ph[:, :, i, None, None])
        for i in range(2)
    )
    return img + noise * torch.randn(img.shape, generator=g, dtype=F64)


def grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def mge_grad(est, model, batches, loss_fn=None):
    model.zero_grad()
    loss = est.loss(model, loss_fn, batches)
    loss.backward()
    return loss.detach(), grads(model)


def fine_grad(model, x, y, loss_fn=F.mse_loss):
    model.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss.detach(), grads(model)


# ------------------------------------------------------------------------- exact collapse


@pytest.mark.parametrize("levels", [0, 1, 3])
@pytest.mark.parametrize("restriction", ["average", "full_weighting", "nearest"])
@pytest.mark.parametrize("fuse", ["auto", False])
def test_same_batch_at_every_level_gives_exactly_the_fine_loss_and_gradient(levels, restriction, fuse):
    model = small_model()
    x = smooth_images(3, 16, seed=1, noise=0.3)
    y = torch.tanh(x) + 0.1 * smooth_images(3, 16, seed=2)
    est = MGE(levels, [3] * (levels + 1), restriction=restriction, fuse=fuse, count_flops=False)
    loss, g = mge_grad(est, model, [(x, y)] * (levels + 1))
    loss0, g0 = fine_grad(model, x, y)
    assert abs(loss.item() - loss0.item()) <= 1e-12
    torch.testing.assert_close(g, g0, rtol=0, atol=1e-12)
    assert est.last_cost.fused == (fuse == "auto")


@pytest.mark.parametrize("levels", [1, 2])
def test_a_task_pyramid_keeps_the_collapse_exact_and_reaches_every_level(levels):
    # Denoise(preserve) makes coarse inputs that are not restrictions of the fine one; the
    # telescoping sum still collapses to the fine gradient when every level gets the same batch.
    from msconv.tasks import Denoise

    task = Denoise(25, noise_restriction="preserve")
    model = small_model()
    y = smooth_images(3, 16, seed=4)
    x, _ = task.corrupt(y, torch.Generator().manual_seed(0))
    x = x.to(y.dtype)
    est = MGE(levels, [3] * (levels + 1), count_flops=False, pyramid_fn=task.pyramid_pair)
    seen = []
    hook = model[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    loss, g = mge_grad(est, model, [(x, y)] * (levels + 1))
    hook.remove()
    loss0, g0 = fine_grad(model, x, y)
    assert abs(loss.item() - loss0.item()) <= 1e-12
    torch.testing.assert_close(g, g0, rtol=0, atol=1e-12)
    xs, _ = task.pyramid_pair(x, y, levels)
    assert torch.equal(seen[-1][-3:], xs[levels])  # the coarsest grid got the task's input
    with pytest.raises(TypeError, match="pyramid_fn"):
        MGE(1, 2, pyramid_fn="preserve")


def test_collapse_at_a_coarse_base_level_is_the_plain_loss_on_that_grid():
    # Full-Multiscale stage k: the finest grid is level k; the data still arrives at level 0.
    model, x = small_model(), smooth_images(2, 16, seed=3)
    y = x.flip(-1)
    est = MGE(2, [2, 2, 2], base_level=1, count_flops=False)
    seen = []
    hook = model[0].register_forward_pre_hook(lambda m, a: seen.append((msconv.current_grid_scale(), a[0].shape[-1])))
    loss, g = mge_grad(est, model, [(x, y)] * 3)
    hook.remove()
    xr, yr = msconv.restrict(x, levels=1), msconv.restrict(y, levels=1)
    with msconv.grid_scale(2.0):
        loss0, g0 = fine_grad(model, xr, yr)
    assert abs(loss.item() - loss0.item()) <= 1e-12
    torch.testing.assert_close(g, g0, rtol=0, atol=1e-12)
    assert seen == [(2.0, 8), (4.0, 4), (8.0, 2)]  # one fused call per grid, each in its grid scale


def test_non_image_targets_pass_through_unrestricted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    x, labels = smooth_images(4, 8, seed=4), torch.tensor([0, 3, 1, 4])
    est = MGE(2, 4, count_flops=False)
    loss, g = mge_grad(est, model, [(x, labels)] * 3, F.cross_entropy)
    loss0, g0 = fine_grad(model, x, labels, F.cross_entropy)
    assert abs(loss.item() - loss0.item()) <= 1e-12
    torch.testing.assert_close(g, g0, rtol=0, atol=1e-12)


def test_loss_is_the_telescoping_sum_of_per_level_losses_on_independent_batches():
    model = small_model()
    xs = [smooth_images(n, 16, seed=10 + l, noise=0.2) for l, n in enumerate([2, 3, 4])]
    batches = [(x, 0.5 * x) for x in xs]
    est = MGE(2, [2, 3, 4], count_flops=False)
    model.zero_grad()
    est.loss(model, None, batches).backward()
    g = grads(model)

    def level_loss(x, y, level):
        xr, yr = msconv.restrict(x, levels=level), msconv.restrict(y, levels=level)
        with msconv.grid_scale(2.0**level):
            return F.mse_loss(model(xr), yr)

    model.zero_grad()
    (level_loss(*batches[0], 0) - level_loss(*batches[0], 1) + level_loss(*batches[1], 1)
     - level_loss(*batches[1], 2) + level_loss(*batches[2], 2)).backward()
    torch.testing.assert_close(g, grads(model), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------- unbiasedness


def test_mean_of_the_estimate_matches_the_fine_gradient_within_its_standard_error():
    """Over many independent multilevel draws from a finite pool, the mean of ĝ equals the
    gradient of the mean fine loss over the pool (the exact expectation). Tolerance: 5 standard
    errors per coordinate, the standard error measured from the draws themselves. The same
    criterion must reject a biased estimator (the coarsest loss alone), so it has power."""
    model = small_model(seed=5)
    pool_x = smooth_images(48, 8, seed=6, noise=0.5)
    pool_y = smooth_images(48, 8, seed=6)  # clean target: a denoising task
    _, g_true = fine_grad(model, pool_x, pool_y)

    sizes, draws = [2, 4, 8], 120
    est = MGE(2, sizes, count_flops=False)
    coarse_only = MGE(0, 2, base_level=2, count_flops=False)
    stream = IndexStream(len(pool_x), seed=7)
    ghat, gbiased = [], []
    for _ in range(draws):
        block = stream.take(sum(sizes))
        idx = [block[:2], block[2:6], block[6:]]
        _, g = mge_grad(est, model, [(pool_x[i], pool_y[i]) for i in idx])
        ghat.append(g)
        _, g = mge_grad(coarse_only, model, [(pool_x[idx[0]], pool_y[idx[0]])])
        gbiased.append(g)
    for samples, unbiased in ((torch.stack(ghat), True), (torch.stack(gbiased), False)):
        se = samples.std(0) / math.sqrt(draws)
        z = ((samples.mean(0) - g_true).abs() / (se + 1e-15)).max().item()
        assert (z < 5.0) == unbiased, f"max |z| = {z:.2f} (unbiased={unbiased})"


# ------------------------------------------------------------------------- fusion and BatchNorm


def test_batchnorm_in_training_mode_is_detected_and_fusion_falls_back_with_a_warning():
    model = small_model(bn=True)
    assert batch_coupled_modules(model) == ["2"]
    x = smooth_images(2, 8, seed=8)
    est = MGE(1, 2, count_flops=False)
    with pytest.warns(UserWarning, match="BatchNorm"):
        est.loss(model, None, [(x, x), (x, x)])
    assert not est.last_cost.fused and "BatchNorm" in est.last_cost.fusion_note
    assert [lc.forward_calls for lc in est.last_cost.levels] == [1, 2]
    with pytest.raises(ValueError, match="fuse=True"):
        MGE(1, 2, fuse=True).loss(model, None, [(x, x), (x, x)])
    model.eval()  # running statistics: no coupling, fusion is back
    assert batch_coupled_modules(model) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MGE(1, 2, count_flops=False).loss(model, None, [(x, x), (x, x)])


def test_fused_and_unfused_estimates_agree_on_independent_batches():
    model = small_model()
    batches = [(x, x.roll(1, -1)) for x in (smooth_images(n, 16, seed=20 + n) for n in (1, 2, 3))]
    out = [mge_grad(MGE(2, [1, 2, 3], fuse=f, count_flops=False), model, batches) for f in (True, False)]
    assert abs(out[0][0].item() - out[1][0].item()) <= 1e-12
    torch.testing.assert_close(out[0][1], out[1][1], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------- cost accounting


def test_cost_matches_a_hand_count_for_a_single_conv():
    """One 3×3 conv, 1→1 channel, no bias, batches of 2 and 4 samples of 8×8, levels=1.
    Grid 0: 2 samples × 64 px; grid 1: (2 + 4) samples × 16 px.
    Work units: 2·64/64 + 6·16/64 = 3.5. Forward FLOPs: 2·9 per output pixel (multiply-add)
    = 18·(128 + 96) = 4032. Backward: only the weight gradient (the input needs none),
    the same 2·9 per pixel = 4032."""
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False).double()
    b0, b1 = torch.rand(2, 1, 8, 8, dtype=F64), torch.rand(4, 1, 8, 8, dtype=F64)
    est = MGE(1, [2, 4])
    loss = est.loss(conv, None, [(b0, b0), (b1, b1)])
    c = est.last_cost
    assert c.work_units == 3.5 and est.step_work([2, 4]) == 3.5
    assert [(lc.level, lc.grid_scale, lc.samples, lc.pixels, lc.work_units) for lc in c.levels] == [
        (0, 1.0, 2, 128, 2.0), (1, 2.0, 6, 96, 1.5)]
    assert [lc.flops_forward for lc in c.levels] == [18 * 128, 18 * 96]
    assert c.flops_forward == 4032 and c.flops_backward == 2 * 4032 and not c.flops_backward_measured
    est.backward(loss)
    assert c.flops_backward == 4032 and c.flops_backward_measured and c.flops == 8064
    assert c.seconds_forward > 0 and c.seconds_backward > 0
    row = c.as_dict()
    assert row["work_units_l1"] == 1.5 and row["flops"] == 8064 and row["batch_sizes"] == [2, 4]


def test_work_units_are_relative_to_the_grid_the_data_arrives_on():
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False).double()
    x = torch.rand(4, 1, 8, 8, dtype=F64)
    est = MGE(0, 4, base_level=1, count_flops=False)  # a coarse Full-Multiscale stage: plain loss at level 1
    est.loss(conv, None, [(x, x)])
    assert est.last_cost.work_units == 1.0 == est.step_work([4])  # 4 samples at a quarter of the pixels


# ------------------------------------------------------------------------- allocation


def test_paper_allocation_multiplies_by_four_per_coarser_level():
    assert MGE(3, 2, allocation="paper").batch_sizes == [2, 8, 32, 128]
    assert MGE(2, [3, 99, 99], allocation="paper").batch_sizes == [3, 12, 48]
    assert paper_batch_sizes(3, 2, multiple_of=2) == [4, 12, 48]
    assert MGE(2, 3, allocation=Paper()).batch_sizes == [3, 12, 48]  # the strategy object and its name agree


def test_mlmc_allocation_is_giles_optimum_under_the_budget():
    v, c, budget = [4.0, 1.0, 0.25], [1.25, 0.3125, 0.0625], 100.0
    n = mlmc_batch_sizes(v, c, budget)
    denom = sum(math.sqrt(a * b) for a, b in zip(v, c))
    expect = [budget * math.sqrt(a / b) / denom for a, b in zip(v, c)]
    assert n == [round(e) for e in expect]
    assert abs(sum(a * b for a, b in zip(n, c)) - budget) < max(c)
    assert mlmc_batch_sizes([0.0, 1.0], [1.0, 0.25], 10.0, minimum=2) == [2, 40]
    assert mlmc_batch_sizes(v, c, budget, multiple_of=4) == [4 * round(e / 4) for e in expect]


def test_mlmc_estimator_reallocates_from_running_loss_difference_variances():
    """variance="loss": V_l is the variance over samples of ℓ_i(l) − ℓ_i(l+1); after the
    warm-up the sizes are Giles' optimum for those variances and the per-sample work."""
    model = small_model()
    est = MGE(2, [8, 8, 8], allocation=MLMC(warmup_steps=1, variance_decay=0.0, variance="loss"), count_flops=False)
    budget = est.allocation.budget
    assert budget == 8 * (1.25 + 0.3125 + 0.0625)
    xs = [smooth_images(8, 16, seed=30 + l, noise=0.5) for l in range(3)]
    batches = [(x, smooth_images(8, 16, seed=30 + l)) for l, x in enumerate(xs)]
    est.loss(model, None, batches)

    def per_sample(x, y, level):
        with torch.no_grad(), msconv.grid_scale(2.0**level):
            xr, yr = msconv.restrict(x, levels=level), msconv.restrict(y, levels=level)
            return (model(xr) - yr).pow(2).flatten(1).mean(1)

    v = [float((per_sample(*batches[l], l) - per_sample(*batches[l], l + 1)).var()) for l in range(2)]
    v.append(float(per_sample(*batches[2], 2).var()))
    torch.testing.assert_close(torch.tensor(est.allocation.variance.variance), torch.tensor(v), rtol=1e-9, atol=0)
    assert est.batch_sizes == mlmc_batch_sizes(v, est.level_work(), budget)
    assert est.batch_sizes != [8, 8, 8]


def test_mlmc_gradient_variance_is_the_half_batch_estimate_of_the_level_terms_covariance_trace():
    """variance="gradient": V_l = m/2 · ‖∇(Δℓ_A − Δℓ_B)‖², A and B the halves (m samples) of
    level l's batch, Δℓ = ℓ(level l) − ℓ(level l+1) (ℓ(level L) on the coarsest); its extra
    backward is booked in the step's cost."""
    model = small_model()
    est = MGE(1, [4, 6], allocation=MLMC(warmup_steps=1, variance_decay=0.0))
    batches = [(x, 0.5 * x) for x in (smooth_images(4, 8, seed=40, noise=0.3), smooth_images(6, 8, seed=41, noise=0.3))]
    est.loss(model, None, batches)

    def lvl(x, y, level):
        with msconv.grid_scale(2.0**level):
            return F.mse_loss(model(msconv.restrict(x, levels=level)), msconv.restrict(y, levels=level))

    def sqnorm_grad(loss):
        model.zero_grad()
        loss.backward()
        return float(grads(model).pow(2).sum())

    (x0, y0), (x1, y1) = batches
    v0 = 2 / 2 * sqnorm_grad(lvl(x0[:2], y0[:2], 0) - lvl(x0[:2], y0[:2], 1) - lvl(x0[2:], y0[2:], 0) + lvl(x0[2:], y0[2:], 1))
    v1 = 3 / 2 * sqnorm_grad(lvl(x1[:3], y1[:3], 1) - lvl(x1[3:], y1[3:], 1))
    torch.testing.assert_close(torch.tensor(est.allocation.variance.variance, dtype=F64), torch.tensor([v0, v1], dtype=F64), rtol=1e-9, atol=0)
    assert est.batch_sizes == mlmc_batch_sizes([v0, v1], est.level_work(), est.allocation.budget, minimum=2)
    c = est.last_cost
    assert c.work_units_variance == pytest.approx(2 / 3 * (4 + 10 * 0.25)) and c.flops_variance > 0
    assert c.work_units == pytest.approx(4 + 10 * 0.25 + c.work_units_variance)


# ------------------------------------------------------------------------- errors


def test_bad_configuration_errors_name_the_argument_and_the_fix():
    with pytest.raises(ValueError, match=r"levels must be an int >= 0"):
        MGE(-1, 4)
    with pytest.raises(ValueError, match=r"batch_sizes has 2 entries but levels=2 needs 3"):
        MGE(2, [4, 4])
    with pytest.raises(ValueError, match=r"batch_sizes must be positive ints"):
        MGE(1, [4, 0])
    with pytest.raises(ValueError, match=r"batch_sizes must be positive ints"):
        MGE(1, -2)
    with pytest.raises(ValueError, match=r"restriction='cubic'.*average"):
        MGE(1, 4, restriction="cubic")
    with pytest.raises(ValueError, match=r"allocation='giles'.*mlmc"):
        MGE(1, 4, allocation="giles")
    with pytest.raises(ValueError, match=r"fuse must be"):
        MGE(1, 4, fuse="yes")

    model, x = small_model(), smooth_images(2, 8, seed=9)
    with pytest.raises(ValueError, match=r"levels \+ 1 = 3 pairs.*got 2 pairs"):
        MGE(2, 2).loss(model, None, [(x, x)] * 2)
    with pytest.raises(ValueError, match=r"restricted only 3 time\(s\).*levels=4.*use fewer levels or larger images"):
        MGE(4, 2).loss(model, None, [(x, x)] * 5)
    with pytest.raises(ValueError, match=r"batches\[1\]\[0\] must be a floating \(N, C, H, W\)"):
        MGE(1, 2).loss(model, None, [(x, x), (x[0], x[0])])
    with pytest.raises(ValueError, match=r"batches\[0\] is empty"):
        MGE(1, 2).loss(model, None, [(x[:0], x[:0]), (x, x)])
    with pytest.raises(ValueError, match=r"x and y must hold the same samples"):
        MGE(1, 2).loss(model, None, [(x, x[:1]), (x, x)])
    valid = nn.Conv2d(3, 3, 3).double()  # no padding: the output is 2 pixels smaller than the target
    with pytest.raises(ValueError, match=r"level 0 the model output has shape \(2, 3, 6, 6\).*\(2, 3, 8, 8\)"):
        MGE(1, 2).loss(valid, None, [(x, x), (x, x)])


# ------------------------------------------------------------------------- benchmark script


def test_bench_mge_writes_a_row_per_estimator_and_level_difference(tmp_path):
    import csv
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_mge.py"
    spec = importlib.util.spec_from_file_location("bench_mge", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "mge.csv"
    assert bench.main(["--draws", "2", "--crop", "8", "--levels", "1", "--width", "2", "--noise", "50",
                       "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    models = ["conv2d"] + (["mfconv2d"] if hasattr(msconv, "MFConv2d") else [])
    assert [(r["model"], r["input"], r["estimator"]) for r in rows] == [
        (m, "noise50", e) for m in models for e in ("single", "fixed", "paper", "mlmc", "diff")]
    for r in rows:
        if r["estimator"] == "single":
            assert float(r["efficiency"]) == 1.0 and float(r["work_units"]) == 4.0
        if r["estimator"] == "paper":
            assert r["batch_sizes"] == "4/16" and float(r["work_units"]) == 4 * 1.25 + 16 * 0.25
        assert float(r["grad_var"]) > 0
    assert (tmp_path / "mge.png").stat().st_size > 0


def test_a_new_allocation_rule_is_one_class_and_each_estimator_binds_its_own_copy():
    from msconv.multilevel import Allocation, FullMultiscale

    class Halving(Allocation):
        """Halve the coarsest level's batch after every step (a toy rule with state)."""

        name = "halving"

        def bind(self, levels, level_work, multiple_of, count_flops):
            bound = super().bind(levels, level_work, multiple_of, count_flops)
            bound.seen = 0
            return bound

        def reallocate(self, step, level_costs):
            self.seen = step
            return None if self.levels == 0 else [8] * self.levels + [max(1, 8 >> step)]

    rule = Halving()
    est = MGE(1, 8, allocation=rule, count_flops=False)
    assert est.allocation is not rule and est.batch_sizes == [8, 8]
    x = smooth_images(8, 8, seed=11)
    est.loss(small_model(), None, [(x, x), (x, x)])
    assert est.batch_sizes == [8, 4] and est.allocation.seen == 1 and not hasattr(rule, "seen")
    fmg = FullMultiscale(1, 2, 8, allocation=rule)
    assert fmg.stages[0].estimator.allocation is not fmg.stages[1].estimator.allocation
    with pytest.raises(ValueError, match=r"allocation='variance'.*Allocation object"):
        MGE(1, 4, allocation="variance")


# ------------------------------------------------------------------------- variance-matched allocation


def test_matched_sizes_are_the_least_cost_sizes_that_reach_the_variance_target():
    from msconv.multilevel import matched_batch_sizes

    v, c, target = [0.5, 2.0, 8.0], [1.25, 0.3125, 0.0625], 0.25
    lam = sum(math.sqrt(a * b) for a, b in zip(v, c)) / target
    real = [lam * math.sqrt(a / b) for a, b in zip(v, c)]  # Giles' rule with λ from Σ V/N = target
    assert sum(a / n for a, n in zip(v, real)) == pytest.approx(target)
    n = matched_batch_sizes(v, c, target)
    assert n == [round(r) for r in real]
    # A floor holds a level and the others share the rest of the target (the constrained optimum).
    floored = matched_batch_sizes([0.01, 2.0, 8.0], c, target, minimum=2)
    assert floored[0] == 2
    left = target - 0.01 / 2
    lam2 = sum(math.sqrt(a * b) for a, b in zip([2.0, 8.0], c[1:])) / left
    assert floored[1:] == [round(lam2 * math.sqrt(a / b)) for a, b in zip([2.0, 8.0], c[1:])]
    # Rounding never leaves the variance more than the tolerance above the target; sizes are multiples.
    for mult in (1, 2, 4):
        got = matched_batch_sizes([0.3, 0.7, 5.0], c, 0.9, multiple_of=mult, tolerance=0.05)
        assert all(x % mult == 0 and x >= mult for x in got)
        assert sum(a / x for a, x in zip([0.3, 0.7, 5.0], got)) <= 0.9 * 1.05
    with pytest.raises(ValueError, match="target must be > 0"):
        matched_batch_sizes(v, c, 0.0)


def _level_loss(model, x, y, level):
    with msconv.grid_scale(2.0**level):
        return F.mse_loss(model(msconv.restrict(x, levels=level)), msconv.restrict(y, levels=level))


def _sqnorm_grad(model, loss):
    model.zero_grad()
    loss.backward()
    return float(grads(model).pow(2).sum())


def _train_batches(sizes, seed):
    return [(smooth_images(n, 8, seed=seed + l, noise=0.3), smooth_images(n, 8, seed=seed + l)) for l, n in enumerate(sizes)]


@pytest.mark.filterwarnings("ignore:Matched. MGE cannot pay")
def test_matched_measures_single_scale_variance_from_level_zero_and_matches_it():
    """V_single = m/2 · ‖∇(ℓ_A − ℓ_B)‖² of level 0's fine evaluation alone; V_0 is still the level
    term's; after the warm-up the sizes are matched_batch_sizes of the ratios for target 1/B, on a
    measuring step at least 2 per level, on the others at least 1."""
    from msconv.multilevel import Matched, matched_batch_sizes

    model = small_model()
    est = MGE(1, 4, allocation=Matched(warmup_steps=1, variance_decay=0.0, variance_every=2, max_work=None),
              count_flops=False)
    assert est.batch_sizes == [2, 2]  # the warm-up: the least that measures
    batches = _train_batches([2, 2], 50)
    est.loss(model, None, batches)
    lvl = lambda x, y, level: _level_loss(model, x, y, level)  # noqa: E731
    sqnorm_grad = lambda loss: _sqnorm_grad(model, loss)  # noqa: E731

    (x0, y0), (x1, y1) = batches
    a_, b_ = slice(0, 1), slice(1, 2)  # halves of m = 1 sample: V = m/2 · ‖∇(ℓ_A − ℓ_B)‖²
    vs = sqnorm_grad(lvl(x0[a_], y0[a_], 0) - lvl(x0[b_], y0[b_], 0)) / 2
    v0 = sqnorm_grad(lvl(x0[a_], y0[a_], 0) - lvl(x0[a_], y0[a_], 1) - lvl(x0[b_], y0[b_], 0) + lvl(x0[b_], y0[b_], 1)) / 2
    v1 = sqnorm_grad(lvl(x1[a_], y1[a_], 1) - lvl(x1[b_], y1[b_], 1)) / 2
    a = est.allocation
    assert a.single.variance[0] == pytest.approx(vs, rel=1e-9)
    assert a.variance.variance == pytest.approx([v0, v1], rel=1e-9)
    costs = est.level_work()
    assert est.batch_sizes == matched_batch_sizes([v0, v1], costs, vs / 4, minimum=1)  # step 1 does not measure
    assert a.last["variance"] == pytest.approx(sum(v / n for v, n in zip([v0, v1], est.batch_sizes)))
    assert a.last["predicted_work_ratio"] == pytest.approx((math.sqrt(v0 * 1.25) + math.sqrt(v1 * 0.25)) ** 2 / vs)
    est.loss(model, None, _train_batches(est.batch_sizes, 60))  # step 1: no measurement, no change
    assert est.last_cost.work_units_variance == 0
    assert all(n >= 2 for n in est.batch_sizes)  # step 2 measures: two halves per level
    state = est.state_dict()
    again = MGE(1, 4, allocation=Matched(warmup_steps=1, variance_decay=0.0, variance_every=2, max_work=None),
                count_flops=False)
    again.load_state_dict(state)
    assert again.allocation.variance.variance == a.variance.variance and again.batch_sizes == est.batch_sizes


def test_matched_caps_a_step_at_single_scale_work_and_warns_with_the_ratios_when_mge_cannot_pay():
    from msconv.multilevel import Matched, budget_batch_sizes

    est = MGE(2, 4, allocation=Matched(warmup_steps=1, variance_decay=0.0), count_flops=False)
    a = est.allocation
    # Variances that grow on coarse grids (white noise seen through 4x fewer pixels per level).
    a.observe_single(1.0)
    for l, v in enumerate([2.0, 8.0, 32.0]):
        a.observe(l, v)
    a._measuring_now = True
    with pytest.warns(UserWarning, match=r"cannot pay.*capped at 1x.*V_l / V_single = \[2, 8, 32\].*finest difference alone has 2x single-scale.s per-sample variance at 1.25x"):
        sizes = a.reallocate(1, est.level_work())
    assert a.last["capped"] and a.predicted_work_ratio > 1
    # Averaged over a measurement period (9 plain steps, one at >= 2 per level with its extra
    # backward pass) a step costs at most single-scale's 4 fine samples, and little less.
    measuring = [max(n, 2) for n in sizes]
    average = (9 * est.step_work(sizes) + 5 / 3 * est.step_work(measuring)) / 10
    assert 0.9 * 4.0 <= average <= 4.0 + 1e-9
    assert sizes == budget_batch_sizes([2.0, 8.0, 32.0], est.level_work(), est.step_work(sizes), minimum=1)
    assert budget_batch_sizes([1.0, 1.0], [1.0, 0.25], 0.5, minimum=1) == [1, 1]  # floors over the budget


def test_matched_bad_batch_is_an_error_or_warning_naming_the_option_and_the_nearest_valid_value():
    from msconv.multilevel import Matched

    with pytest.raises(ValueError, match=r"batch=3 .*multiple of the world size 2.*batch=4 \(--batch-size 4\)"):
        MGE(3, 3, allocation=Matched(), multiple_of=2, count_flops=False)
    with pytest.warns(UserWarning, match=r"batch=1 is too small for levels=3.*--batch-size 2"):
        MGE(3, 1, allocation="matched", count_flops=False)
    with pytest.raises(ValueError, match=r"max_work must be > 0"):
        Matched(max_work=0)
    with pytest.raises(ValueError, match=r"batch must be an int >= 1"):
        Matched(batch=0)


def test_matched_mge_runs_on_its_budget_with_single_scale_steps_as_its_lr_axis():
    from msconv.train.config import TrainConfig
    from msconv.train.run import WORK_DRIVEN_STEP_CAP, plan_stages, work_driven

    cfg = TrainConfig(mode="mge", allocation="matched", budget=400.0, batch_size=4)
    # its steps cost what its allocation decides as it trains: the plan is a cap, the run stops on the budget
    assert work_driven(cfg) and [s.iterations for s in plan_stages(cfg)] == [100 * WORK_DRIVEN_STEP_CAP]
    assert not work_driven(cfg.replace(allocation="fixed")) and plan_stages(cfg.replace(allocation="fixed"))[0].iterations < 100
    assert not work_driven(cfg.replace(iterations=50))


@pytest.mark.filterwarnings("ignore:Matched. MGE cannot pay")
def test_matched_measures_the_next_step_when_a_measuring_step_came_with_batches_too_small_to_split():
    """A loader that draws one step ahead hands a measuring step the previous step's sizes (one
    sample on a level): the measurement is lost, so the next step measures instead."""
    from msconv.multilevel import Matched

    model = small_model()
    est = MGE(1, 2, allocation=Matched(variance_decay=0.0, variance_every=3), count_flops=False)
    measured = []
    for step in range(6):
        drawn = [1, 1] if step == 3 else est.batch_sizes  # step 3 measures but gets a stale one-sample level
        est.loss(model, None, _train_batches(drawn, 70 + 10 * step))
        measured.append(est.allocation._measuring_now)
    assert measured == [True, False, False, True, True, False]  # step 3 lost, step 4 measured
    assert est.allocation.variance.updates == [2, 2]


def test_matched_ratios_are_not_biased_by_a_noisy_single_scale_measurement():
    """One V_single measurement comes from one pair of half batches and scatters widely around its
    mean; averaging the per-measurement ratios V_l / V_single would give E[V_l / V_single], several
    times V_l / E[V_single]. The quotient of the two running averages is not."""
    from msconv.multilevel import Matched

    est = MGE(1, 4, allocation=Matched(warmup_steps=1, variance_decay=0.5), count_flops=False)
    a = est.allocation
    for step, vs in enumerate([0.1, 1.9] * 10):  # mean 1.0; the mean of 1 / vs is 5.26
        a.observe_single(vs)
        for l in range(2):
            a.observe(l, 1.0)
        a._measuring_now = True
        a.reallocate(step + 1, est.level_work())
    ratio = a.last["variances"][0] / a.last["single_variance"]
    # The running ratio at the last measurement: 1 / (decayed average of vs) = 1 / 1.3 at decay 0.5
    # with the last draw 1.9 (the per-measurement-ratio average would be about 3.7).
    assert ratio == pytest.approx(1 / 1.3, rel=0.01)

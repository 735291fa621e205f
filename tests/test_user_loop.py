"""The plain-loop conventions a PyTorch user relies on: the loop steps the LR scheduler, once."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import msconv


def sampler(size=8):
    g = torch.Generator().manual_seed(0)

    def draw(sizes):
        return [(torch.rand(n, 1, size, size, generator=g), torch.rand(n, 1, size, size, generator=g)) for n in sizes]

    return draw


def test_loop_steps_the_scheduler_once_per_step():
    model = nn.Conv2d(1, 1, 3, padding=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fmg = msconv.FullMultiscale(levels=2, iterations=8, batch_sizes=4, sample_batches=sampler(),
                                estimator_kwargs={"count_flops": False})
    sched = fmg.lr_scheduler(opt, warmup_steps=2)
    steps, lrs = 0, []
    for step in fmg:
        opt.zero_grad()
        step.loss(model, F.mse_loss).backward()
        opt.step()
        sched.step()  # as every PyTorch loop does; the schedule must not step it too
        steps += 1
        lrs.append(opt.param_groups[0]["lr"])
    assert steps == fmg.total_steps == 14
    assert sched.last_epoch == steps
    assert all(lr > 0 for lr in lrs[:-1])  # a doubled schedule would reach 0 halfway


def test_fit_steps_the_scheduler_once_per_step():
    model = nn.Conv2d(1, 1, 3, padding=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fmg = msconv.FullMultiscale(levels=1, iterations=4, batch_sizes=2, sample_batches=sampler(),
                                estimator_kwargs={"count_flops": False})
    sched = fmg.lr_scheduler(opt)
    history = fmg.fit(model, opt)
    assert len(history) == sched.last_epoch == fmg.total_steps

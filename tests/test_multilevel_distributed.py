"""Distributed MGE: 2 processes, gloo on CPU, each rank its share of every level.

Each rank trains (a) a DistributedDataParallel model (whose all-reduces are counted with a
communication hook) and (b) a plain model whose gradients go
through ``allreduce_gradients``, on ``multilevel_loader`` shares, and writes its parameters; the
parent checks both ranks agree and match one process trained on the combined batches. A third
estimator uses ``mlmc`` allocation: the ranks must keep identical batch sizes.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from msconv.multilevel import MGE, MLMC, allreduce_gradients, multilevel_loader, shard_batches
from test_multilevel_data import IndexImages

SIZES, STEPS, SEED = [4, 4, 8], 3, 11


class SmoothImages(IndexImages):
    """Deterministic float64 images that depend on the index (so shares really differ)."""

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.rand(1, self.size, self.size, generator=g, dtype=torch.float64)
        return x, x.flip(-1)


def model_and_opt():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 1, 3, padding=1)).double()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train(model, opt, rank, world, sync=None, shapes=None):
    est = MGE(2, SIZES, count_flops=False)
    for batches in multilevel_loader(SmoothImages(48, size=8), est, steps=STEPS, seed=SEED, rank=rank, world_size=world):
        if shapes is not None:
            shapes.append([x[:, 0, 0, 0].tolist() for x, _ in batches])
        opt.zero_grad()
        est.loss(model, None, batches).backward()
        if sync is not None:
            sync(model)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, world, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A file store, not a TCP port: a port picked free by the parent can be taken before the
    # ranks bind it.
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=world)
    try:
        model, opt = model_and_opt()
        ddp = nn.parallel.DistributedDataParallel(model)
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        reductions = []

        def counting_allreduce(state, bucket):  # counts DDP's gradient all-reduces
            reductions.append(bucket.buffer().numel())
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_allreduce)
        seen = []
        p_ddp = train(ddp, opt, None, None, shapes=seen)  # rank and world size from torch.distributed
        model, opt = model_and_opt()
        p_flat = train(model, opt, None, None, sync=allreduce_gradients)
        model, _ = model_and_opt()
        est = MGE(2, SIZES, allocation=MLMC(warmup_steps=1), count_flops=False)
        sizes = []
        for batches in multilevel_loader(SmoothImages(48, size=8), est, steps=3, seed=SEED):
            est.loss(model, None, batches).backward()
            sizes.append(list(est.batch_sizes))
        torch.save({"ddp": p_ddp, "flat": p_flat, "mlmc_sizes": sizes, "seen": seen,
                    "reductions": reductions}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_agree_and_match_one_process_with_the_combined_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    model, opt = model_and_opt()
    seen = []
    single = train(model, opt, 0, 1, shapes=seen)
    # Each rank got the r-th half of every level of the combined batch.
    for t in range(STEPS):
        assert [a + b for a, b in zip(r0["seen"][t], r1["seen"][t])] == seen[t]
        assert [len(a) for a in r0["seen"][t]] == [n // 2 for n in SIZES]
    for key in ("ddp", "flat"):
        for a, b, c in zip(r0[key], r1[key], single):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            torch.testing.assert_close(a, c, rtol=0, atol=1e-12)
    # One all-reduce per step, carrying every gradient, although MGE made 3 forward calls per step.
    n_params = sum(p.numel() for p in single)
    assert r0["reductions"] == r1["reductions"] == [n_params] * STEPS
    assert r0["mlmc_sizes"] == r1["mlmc_sizes"]
    assert all(n % 2 == 0 for s in r0["mlmc_sizes"] for n in s)  # multiples of the world size
    assert r0["mlmc_sizes"][-1] != SIZES


def test_shard_batches_splits_every_level_into_contiguous_rank_shares():
    x = [torch.arange(n, dtype=torch.float64).view(n, 1, 1, 1).expand(n, 1, 2, 2) for n in (2, 4)]
    shares = [shard_batches([(a, a) for a in x], r, 2) for r in range(2)]
    assert [[s[:, 0, 0, 0].tolist() for s, _ in sh] for sh in shares] == [[[0.0], [0.0, 1.0]], [[1.0], [2.0, 3.0]]]
    with pytest.raises(ValueError, match=r"level 0 has 3 samples, not divisible by world_size=2"):
        shard_batches([(x[1][:3], x[1][:3])], 0, 2)

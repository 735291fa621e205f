"""Multi-process MGE under ``torchrun``.

How to wire it (every rank runs the same script)::

    # torchrun --nproc_per_node=4 train.py
    rank, world, device = msconv.multilevel.init_distributed()       # reads torchrun's env
    model = DistributedDataParallel(build_model().to(device))        # one all-reduce per backward
    est = msconv.MGE(levels=2, batch_sizes=[32, 64, 128])            # GLOBAL sizes, multiples of world
    for batches in msconv.multilevel.multilevel_loader(ds, est, steps=1000, num_workers=2):
        opt.zero_grad()
        est.loss(model, F.mse_loss, batches).backward()               # batches = this rank's shares
        opt.step()

Why this is the combined-batch gradient: every rank walks the same seeded index stream, so all
agree on each step's block, and takes the r-th contiguous share ``N_l / world`` of every level's
batch. Its loss weights its share by ``1 / (N_l / world)``; DDP averages the gradients over the
ranks, ``(1/world) Σ_r (world/N_l) Σ_{i∈share_r} = (1/N_l) Σ_{i∈B_l}``: exactly ĝ of the
combined batch, with one gradient all-reduce per step (per DDP bucket: a model under DDP's
25 MB ``bucket_cap_mb`` is one bucket; tests/test_multilevel_distributed.py counts them with a
communication hook). MGE runs several forward calls (one per grid) before the single backward;
DDP accepts that since every parameter's gradient is accumulated once per backward.

Without DDP (e.g. a model DDP cannot wrap), call :func:`allreduce_gradients` after
``backward()``: one flat all-reduce of every gradient.

``mlmc`` allocation: each rank measures variances on its own share; :class:`MGE` averages them
over the ranks (one small all-reduce per step, only with ``mlmc``) so all ranks keep the same
batch sizes.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["init_distributed", "allreduce_gradients", "shard_batches"]


def init_distributed(backend: str | None = None, timeout: float | None = 300.0) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``); returns ``(rank, world_size, device)``.

    Outside torchrun (no ``WORLD_SIZE``) nothing is initialised and ``(0, 1, device)`` comes back.
    ``backend`` defaults to ``nccl`` with CUDA, else ``gloo``. ``timeout`` (seconds; None: torch's
    default, 10 min for gloo) bounds the rendezvous and every collective, so a rank that hangs or
    dies makes its peers fail with an error instead of waiting forever.
    """
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        import datetime

        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"init_distributed: timeout must be a number of seconds > 0 or None, got timeout={timeout!r}")
        kw = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), **kw)
    return dist.get_rank(), dist.get_world_size(), device


def allreduce_gradients(params: nn.Module | Iterable[torch.Tensor], group=None) -> None:
    """Average ``.grad`` over all ranks with one all-reduce of a flat buffer (parameters without
    a gradient count as zero on that rank, so ranks never disagree on the buffer layout)."""
    params = list(params.parameters() if isinstance(params, nn.Module) else params)
    if not params:
        return
    world = dist.get_world_size(group)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset : offset + n].view_as(p)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n


def shard_batches(batches: Sequence, rank: int, world_size: int) -> list:
    """This rank's share of globally drawn batches: the r-th contiguous ``N_l / world`` slice of
    every level (what :class:`MultilevelBatchSampler` gives each rank)."""
    out = []
    for l, (x, y) in enumerate(batches):
        n = x.shape[0]
        if n % world_size:
            raise ValueError(
                f"shard_batches: level {l} has {n} samples, not divisible by world_size={world_size}; "
                f"draw batch sizes that are multiples of {world_size}"
            )
        s = n // world_size
        sl = slice(rank * s, (rank + 1) * s)
        out.append((x[sl], y[sl] if isinstance(y, torch.Tensor) and y.shape[:1] == x.shape[:1] else y))
    return out

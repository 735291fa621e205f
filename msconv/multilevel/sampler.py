"""Multilevel data: fresh, independent samples for every level of every step .

The official research code draws its multilevel batches from an ``IterableDataset`` that every
DataLoader worker copies, so every level and every step sees the same images, and its
inpainting "multiscale" run uses one batch for all levels (the telescoping sum then collapses to
the plain fine loss). msconv instead hands out *indices* from the main process:

* :class:`IndexStream` — an endless stream of indices, one fresh permutation per epoch;
  ``take(k)`` returns k distinct indices and advances, so consecutive steps walk through the
  data set and each epoch uses every sample exactly once.
* :class:`MultilevelBatchSampler` — a ``batch_sampler`` for ``torch.utils.data.DataLoader``: for
  each step it takes one block of ``Σ N_l`` distinct indices and splits it into the levels'
  batches, so the levels of a step are disjoint. Because a batch sampler runs in the main
  process and workers only fetch the indices they are sent, any number of workers never
  duplicates a sample. Under torch.distributed every rank walks the same stream (same seed)
  and takes its own contiguous share of every level's batch.
* :func:`multilevel_loader` — the DataLoader wiring that yields ``[(x_0, y_0), …, (x_L, y_L)]``,
  ready for :meth:`MGE.loss`.

Epoch boundary: when a step's block runs past the end of a permutation, the indices already
taken for that step are moved to the end of the next permutation, so the block stays disjoint
and every epoch is still a permutation.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from torch.utils.data._utils.collate import default_collate

__all__ = ["LevelIndex", "IndexStream", "MultilevelBatchSampler", "MultilevelDataset", "collate_levels", "multilevel_loader",
           "resolve_rank_world"]


class LevelIndex(NamedTuple):
    """A data-set index tagged with the level whose batch it belongs to."""

    index: int
    level: int


def _dataset_len(data_source) -> int:
    n = data_source if isinstance(data_source, int) else len(data_source)
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"multilevel sampler: the data set must hold at least one sample, got len={n!r}")
    return n


class IndexStream:
    """Endless stream of indices 0..n-1, a fresh permutation every epoch (or in order if not ``shuffle``).

    Seeded: two streams built with the same ``(n, shuffle, seed)`` give the same indices, which is
    what lets every distributed rank agree on a step's block without communication.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed = _dataset_len(n), shuffle, seed
        self.epoch = 0
        self.position = 0
        self.perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        """``k`` distinct indices, the next ones in the stream."""
        if k > self.n:
            raise ValueError(
                f"IndexStream.take: a step needs {k} distinct samples but the data set has only {self.n}; "
                "use smaller batch_sizes or a larger data set"
            )
        out: list[int] = []
        while len(out) < k:
            if self.position == self.n:
                self._next_epoch(exclude=set(out))
            m = min(k - len(out), self.n - self.position)
            out += self.perm[self.position : self.position + m]
            self.position += m
        return out

    def _next_epoch(self, exclude: set[int]) -> None:
        self.epoch += 1
        perm = self._permutation(self.epoch)
        self.perm = [i for i in perm if i not in exclude] + [i for i in perm if i in exclude]
        self.position = 0

    def state_dict(self) -> dict:
        return {"n": self.n, "shuffle": self.shuffle, "seed": self.seed, "epoch": self.epoch,
                "position": self.position, "perm": list(self.perm)}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(f"IndexStream.load_state_dict: saved for a data set of {state['n']} samples, this one has {self.n}")
        self.shuffle, self.seed, self.epoch = state["shuffle"], state["seed"], state["epoch"]
        self.position, self.perm = state["position"], list(state["perm"])


def resolve_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): the given values, else torch.distributed's when initialised, else (0, 1)."""
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    world_size = world_size if world_size is not None else (dist.get_world_size() if on else 1)
    rank = rank if rank is not None else (dist.get_rank() if on else 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"MultilevelBatchSampler: rank={rank} is not in [0, world_size={world_size})")
    return rank, world_size


class MultilevelBatchSampler(Sampler):
    """Batch sampler giving every level of every step its own fresh samples.

    Args:
        data_source: the data set (or its length).
        batch_sizes: the global N_l per level, finest first; a list, an object with a
            ``batch_sizes`` attribute (an :class:`MGE`, whose ``mlmc`` allocation then reaches the
            sampler every step), or a callable returning the list.
        steps: number of steps to yield (``None``: endless).
        shuffle, seed: a fresh seeded permutation per epoch, or the data set in order.
        rank, world_size: this process's share; default from torch.distributed when initialised.
            Every N_l must be divisible by ``world_size``.
        stream: an :class:`IndexStream` to continue (Full-Multiscale stages share one).

    Yields, per step, a flat list of :class:`LevelIndex` (level 0's indices first). Use it as
    ``DataLoader(MultilevelDataset(ds), batch_sampler=sampler, collate_fn=collate_levels)`` or
    through :func:`multilevel_loader`; :meth:`iter_levels` gives the plain index lists.
    """

    def __init__(
        self,
        data_source,
        batch_sizes,
        *,
        steps: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        stream: IndexStream | None = None,
    ) -> None:
        if isinstance(data_source, IterableDataset):
            raise TypeError(
                "MultilevelBatchSampler: data_source is an IterableDataset; every loader worker would copy it and "
                "replay the same samples on every level (the official code's defect). Pass a map-style Dataset"
            )
        self.n = _dataset_len(data_source)
        self.stream = stream if stream is not None else IndexStream(self.n, shuffle, seed)
        if self.stream.n != self.n:
            raise ValueError(f"MultilevelBatchSampler: stream is over {self.stream.n} samples, data_source has {self.n}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"MultilevelBatchSampler: steps must be None or an int >= 0, got steps={steps!r}")
        self.steps = steps
        self.rank, self.world_size = resolve_rank_world(rank, world_size)
        self._sizes = batch_sizes
        self.current_sizes()  # validate now, not in the first step

    def current_sizes(self) -> list[int]:
        src = self._sizes
        sizes = src.batch_sizes if hasattr(src, "batch_sizes") else src() if callable(src) else src
        sizes = list(sizes)
        if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
            raise ValueError(f"MultilevelBatchSampler: batch_sizes must be a non-empty list of positive ints, got {sizes!r}")
        if any(s % self.world_size for s in sizes):
            raise ValueError(
                f"MultilevelBatchSampler: batch_sizes={sizes} must be divisible by world_size={self.world_size} so every "
                f"rank takes an equal share of every level; round them to multiples of {self.world_size} "
                f"(MGE(..., multiple_of={self.world_size}) does)"
            )
        if sum(sizes) > self.n:
            raise ValueError(
                f"MultilevelBatchSampler: one step needs sum(batch_sizes)={sum(sizes)} distinct samples but the data set "
                f"has {self.n}; use smaller batch_sizes or a larger data set"
            )
        return sizes

    def iter_levels(self) -> Iterator[list[list[int]]]:
        """Per step: this rank's index list of every level, finest first."""
        step = 0
        while self.steps is None or step < self.steps:
            sizes = self.current_sizes()
            block = self.stream.take(sum(sizes))
            out, start = [], 0
            for n in sizes:
                share = n // self.world_size
                out.append(block[start + self.rank * share : start + (self.rank + 1) * share])
                start += n
            yield out
            step += 1

    def __iter__(self) -> Iterator[list[LevelIndex]]:
        for levels in self.iter_levels():
            yield [LevelIndex(i, l) for l, idx in enumerate(levels) for i in idx]

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("MultilevelBatchSampler: an endless sampler (steps=None) has no len(); pass steps=")
        return self.steps


class MultilevelDataset(Dataset):
    """Wraps a map-style data set so that ``ds[LevelIndex(i, l)]`` is ``(l, ds[i])``."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: LevelIndex):
        return key[1], self.dataset[key[0]]


def collate_levels(samples: Sequence[tuple[int, object]], collate: Callable = default_collate) -> list:
    """Group ``(level, sample)`` items by level (finest first) and collate each group.

    A sample that is an ``(x, y)`` pair gives a tuple ``(x_batch, y_batch)`` per level.
    """
    groups: dict[int, list] = {}
    for level, sample in samples:
        groups.setdefault(level, []).append(sample)
    out = []
    for level in sorted(groups):
        batch = collate(groups[level])
        out.append(tuple(batch) if isinstance(batch, list) else batch)
    return out


def multilevel_loader(
    dataset,
    batch_sizes,
    *,
    steps: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    stream: IndexStream | None = None,
    **loader_kwargs,
) -> DataLoader:
    """A DataLoader yielding ``[(x_0, y_0), …, (x_L, y_L)]`` per step, level l holding this rank's
    share of ``batch_sizes[l]`` fresh samples (see :class:`MultilevelBatchSampler`).

    ``loader_kwargs`` go to DataLoader (``num_workers``, ``pin_memory``, ...). With workers,
    a changing ``batch_sizes`` (``mlmc``) reaches batches already prefetched a few steps late;
    :meth:`MGE.loss` weights each level by the samples it actually received, so that is harmless.

    Example::

        >>> est = msconv.MGE(2, [8, 8, 8])
        >>> for batches in multilevel_loader(ds, est, steps=100, num_workers=2):
        ...     est.loss(model, F.mse_loss, batches).backward()
    """
    for bad in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
        if bad in loader_kwargs:
            raise ValueError(f"multilevel_loader: {bad}= is set by the multilevel sampler; remove it (use batch_sizes=, shuffle=)")
    sampler = MultilevelBatchSampler(dataset, batch_sizes, steps=steps, shuffle=shuffle, seed=seed, rank=rank,
                                     world_size=world_size, stream=stream)
    loader_kwargs.setdefault("collate_fn", collate_levels)
    return DataLoader(MultilevelDataset(dataset), batch_sampler=sampler, **loader_kwargs)

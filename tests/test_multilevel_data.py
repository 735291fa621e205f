"""Multilevel data: fresh samples per level and step, disjoint within a step, every
sample once per epoch, no duplicates across loader workers or ranks."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

from msconv.multilevel import MGE, IndexStream, MultilevelBatchSampler, multilevel_loader


class IndexImages(Dataset):
    """Sample i is an image whose every pixel is i (and its target i + 0.5), so a batch says
    which indices it holds after any collation and restriction."""

    def __init__(self, n: int, size: int = 4) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        x = torch.full((1, self.size, self.size), float(i))
        return x, x + 0.5


def ids(x: torch.Tensor) -> list[int]:
    return x[:, 0, 0, 0].long().tolist()


def test_levels_of_a_step_are_disjoint_and_steps_walk_through_the_data():
    sampler = MultilevelBatchSampler(50, [3, 5, 7], steps=10, seed=1)
    steps = list(sampler.iter_levels())
    assert [[len(l) for l in s] for s in steps] == [[3, 5, 7]] * 10
    for s in steps:
        flat = [i for l in s for i in l]
        assert len(set(flat)) == len(flat)  # disjoint across levels, also across epoch boundaries
    flat = [i for s in steps for l in s for i in l]
    assert len(set(flat[:45])) == 45  # the first three steps share nothing: fresh samples every step
    # 10 steps × 15 = 150 = 3 epochs: every sample used exactly 3 times, each epoch a permutation.
    assert Counter(flat) == {i: 3 for i in range(50)}
    assert sorted(flat[:50]) == list(range(50)) and sorted(flat[50:100]) == list(range(50))


def test_epoch_boundary_moves_the_steps_indices_to_the_end_of_the_next_permutation():
    s = IndexStream(5, shuffle=False)
    assert s.take(3) == [0, 1, 2]
    block = s.take(4)  # 3, 4 from epoch 0, then epoch 1 without 3 and 4 (they go to its end)
    assert block == [3, 4, 0, 1] and s.perm == [0, 1, 2, 3, 4] and s.take(3) == [2, 3, 4]
    s2 = IndexStream(7, seed=3)
    s2.take(5)
    block = s2.take(6)
    assert len(set(block)) == 6 and sorted(s2.perm) == list(range(7))


def test_stream_state_round_trip_resumes_the_same_indices():
    a = IndexStream(20, seed=4)
    a.take(13)
    state = a.state_dict()
    expect = [a.take(9) for _ in range(4)]
    b = IndexStream(20, seed=4)
    b.load_state_dict(state)
    assert [b.take(9) for _ in range(4)] == expect


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_gives_each_level_its_own_samples_without_repeats_across_workers(workers):
    ds = IndexImages(40)
    loader = multilevel_loader(ds, [2, 4, 6], steps=8, seed=5, num_workers=workers)
    seen = []
    for batches in loader:
        assert len(batches) == 3
        assert [x.shape for x, _ in batches] == [(n, 1, 4, 4) for n in (2, 4, 6)]
        for x, y in batches:
            torch.testing.assert_close(y, x + 0.5)  # x and y of one sample stay together
        step = [ids(x) for x, _ in batches]
        flat = [i for l in step for i in l]
        assert len(set(flat)) == len(flat)
        seen += flat
    # 8 steps × 12 = 96 = 2 epochs + 16: 40 distinct in every aligned epoch window, nothing repeated.
    assert sorted(seen[:40]) == list(range(40)) and sorted(seen[40:80]) == list(range(40))
    ref = MultilevelBatchSampler(40, [2, 4, 6], steps=8, seed=5)
    assert seen == [i for s in ref.iter_levels() for l in s for i in l]  # workers change nothing


def test_ranks_take_disjoint_shares_whose_union_is_the_combined_batch():
    one = list(MultilevelBatchSampler(30, [2, 4, 8], steps=5, seed=6, rank=0, world_size=1).iter_levels())
    shares = [list(MultilevelBatchSampler(30, [2, 4, 8], steps=5, seed=6, rank=r, world_size=2).iter_levels())
              for r in range(2)]
    for t in range(5):
        for l in range(3):
            assert shares[0][t][l] + shares[1][t][l] == one[t][l]
            assert len(shares[0][t][l]) == [1, 2, 4][l]


def test_sampler_follows_an_estimators_changing_allocation():
    est = MGE(1, [2, 2], count_flops=False)
    it = MultilevelBatchSampler(20, est, seed=7).iter_levels()
    assert [len(l) for l in next(it)] == [2, 2]
    est.batch_sizes = [1, 5]  # what an mlmc reallocation does
    assert [len(l) for l in next(it)] == [1, 5]


def test_bad_data_configuration_errors_name_the_argument_and_the_fix():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(3)

    with pytest.raises(TypeError, match="IterableDataset.*map-style"):
        MultilevelBatchSampler(Stream(), [1, 1])
    with pytest.raises(ValueError, match=r"divisible by world_size=2.*multiples of 2"):
        MultilevelBatchSampler(10, [2, 3], rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"sum\(batch_sizes\)=12 distinct samples but the data set has 10"):
        MultilevelBatchSampler(10, [4, 8])
    with pytest.raises(ValueError, match="positive ints"):
        MultilevelBatchSampler(10, [4, 0])
    with pytest.raises(ValueError, match=r"rank=2 is not in \[0, world_size=2\)"):
        MultilevelBatchSampler(10, [2], rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size= is set by the multilevel sampler"):
        multilevel_loader(IndexImages(10), [2, 2], batch_size=4)
    with pytest.raises(TypeError, match="endless sampler"):
        len(MultilevelBatchSampler(10, [2]))

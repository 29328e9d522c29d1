"""RepeatAugSampler: DeiT's epoch length, repeat coverage, seeding and rank defaults."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch.distributed as dist
from timm.data.distributed_sampler import RepeatAugSampler as TimmRepeatAugSampler

from kdrun.data.samplers import RepeatAugSampler


class Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def per_rank(n: int, replicas: int, **kw) -> list[list[int]]:
    return [list(RepeatAugSampler(Sized(n), num_replicas=replicas, rank=r, **kw)) for r in range(replicas)]


def test_wraps_timm():
    assert issubclass(RepeatAugSampler, TimmRepeatAugSampler)


@pytest.mark.parametrize("replicas, repeats", [(3, 3), (2, 4), (4, 2), (1, 3)])
def test_every_index_repeated_across_ranks_before_truncation(replicas, repeats):
    n = 120  # n * repeats divisible by replicas: no wrap-around padding
    # selected_round=0, selected_ratio=replicas/repeats keeps the whole stream (no DeiT truncation).
    streams = per_rank(n, replicas, num_repeats=repeats, selected_round=0,
                       selected_ratio=replicas / repeats)
    assert all(len(s) == n * repeats // replicas for s in streams)
    counts = Counter(i for s in streams for i in s)
    assert set(counts) == set(range(n))
    assert set(counts.values()) == {repeats}


def test_repeats_land_on_different_ranks():
    # With as many ranks as repeats, every rank sees the same images in the same order, each
    # with its own augmentation: the point of repeated augmentation.
    streams = per_rank(1000, 3, num_repeats=3)
    assert streams[0] == streams[1] == streams[2]
    assert len(set(streams[0])) == len(streams[0])


@pytest.mark.parametrize("n", [256, 1000, 2573, 50_000])
@pytest.mark.parametrize("replicas", [1, 2, 3, 8])
def test_epoch_length_is_deits_formula(n, replicas):
    expected = math.floor(n // 256 * 256 / replicas)
    for rank in {0, replicas - 1}:
        s = RepeatAugSampler(Sized(n), num_replicas=replicas, rank=rank)
        assert len(s) == expected
        assert len(list(s)) == expected


def test_small_dataset_is_not_empty():
    # DeiT's formula gives 0 below 256 images; timm falls back to ceil(n / replicas).
    for replicas in (1, 2, 3):
        s = RepeatAugSampler(Sized(100), num_replicas=replicas, rank=0)
        assert len(s) == len(list(s)) == math.ceil(100 / replicas)


def test_deterministic_for_seed_and_epoch():
    a = RepeatAugSampler(Sized(600), num_replicas=2, rank=1, seed=5)
    b = RepeatAugSampler(Sized(600), num_replicas=2, rank=1, seed=5)
    first = list(a)
    assert first == list(b) == list(a)
    assert a.epoch == 0  # iterating does not leave the seed offset behind
    a.set_epoch(1)
    second = list(a)
    assert second != first
    b.set_epoch(1)
    assert list(b) == second
    a.set_epoch(0)
    assert list(a) == first
    other_seed = RepeatAugSampler(Sized(600), num_replicas=2, rank=1, seed=6)
    assert list(other_seed) != first


def test_seed_zero_matches_timm_order():
    ours = RepeatAugSampler(Sized(700), num_replicas=2, rank=1)
    timms = TimmRepeatAugSampler(Sized(700), num_replicas=2, rank=1)
    for epoch in (0, 3):
        ours.set_epoch(epoch)
        timms.set_epoch(epoch)
        assert list(ours) == list(timms)


def test_defaults_without_distributed():
    assert not (dist.is_available() and dist.is_initialized())
    s = RepeatAugSampler(Sized(300))
    assert (s.num_replicas, s.rank, s.num_repeats) == (1, 0, 3)
    idx = list(s)
    assert len(idx) == 256
    # One process: the stream is [a, a, a, b, b, b, ...] cut to 256.
    assert all(idx[3 * k] == idx[3 * k + 1] == idx[3 * k + 2] for k in range(85))


def test_defaults_from_initialised_process_group(monkeypatch):
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 4)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 2)
    s = RepeatAugSampler(Sized(1024))
    assert (s.num_replicas, s.rank) == (4, 2)
    assert len(s) == 256


@pytest.mark.parametrize("kw", [dict(num_replicas=2, rank=2), dict(num_replicas=0, rank=0),
                                dict(num_replicas=2, rank=-1), dict(num_repeats=0)])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        RepeatAugSampler(Sized(10), **kw)

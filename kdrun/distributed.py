"""Process-group helpers: rank facts, reductions, and samplers that are exact under DDP.

Everything here is a no-op on one process, so the engine has a single code path. Launching several
processes (torch's elastic launcher, torchrun/SLURM join) is the scale-out layer's job; this module
only assumes that ``torch.distributed`` may have been initialised.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_mean(t: Tensor) -> Tensor:
    """Average across ranks (a new tensor; the input is untouched)."""
    if not is_dist():
        return t
    out = t.detach().clone() if not t.requires_grad else t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(t: Tensor) -> Tensor:
    if not is_dist():
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier() -> None:
    if is_dist():
        dist.barrier()


class TrainSampler(Sampler[int]):
    """Shuffled, rank-sharded indices whose order depends only on (seed, epoch), with a start offset.

    The order is torch.randperm seeded with ``seed + epoch`` (as ``DistributedSampler``), so an
    interrupted run resumed at step s of an epoch sees exactly the batches it would have seen:
    ``set_epoch(e, skip=s * batch_size)`` drops the indices already consumed. Each rank takes every
    ``world``-th index of the permutation, truncated so all ranks get the same number (``drop_last``
    semantics; training never pads with duplicates).
    """

    def __init__(self, length: int, seed: int, num_replicas: int | None = None, rank_: int | None = None) -> None:
        self.length, self.seed = length, seed
        self.world = world_size() if num_replicas is None else num_replicas
        self.rank = rank() if rank_ is None else rank_
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def per_rank(self) -> int:
        return self.length // self.world

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.length, generator=g)
        mine = perm[self.rank::self.world][: self.per_rank()]
        return iter(mine[self.skip:].tolist())

    def __len__(self) -> int:
        return max(0, self.per_rank() - self.skip)


class EvalSampler(Sampler[int]):
    """Rank ``r`` takes indices r, r+world, …: every sample is evaluated exactly once (no padding),
    and per-rank counts are summed, so distributed top-1 equals single-process top-1."""

    def __init__(self, length: int) -> None:
        self.length, self.world, self.rank = length, world_size(), rank()

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world))

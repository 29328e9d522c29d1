"""Samplers the engine picks from :class:`~kdrun.data.base.DataModule` settings.

:class:`RepeatAugSampler` is timm's ``timm.data.distributed_sampler.RepeatAugSampler`` (itself taken from
DeiT's ``RASampler``), not a re-implementation: DeiT's reported numbers depend on its exact epoch length
and index order, and reusing the code DeiT's successors use keeps them. The subclass only adds what timm
lacks: ``num_replicas``/``rank`` default to a single process when ``torch.distributed`` is not initialised
(timm's raises), argument checks, and a ``seed`` so that runs with different seeds see different orders
(timm seeds with the epoch alone; ``seed=0`` reproduces timm's and DeiT's order exactly).

How an epoch is built: the dataset indices are shuffled (seed + epoch), each index is repeated
``num_repeats`` times in a row (``[a, a, a, b, b, b, ...]``), the stream is padded by wrap-around to
``ceil(len(dataset) * num_repeats / num_replicas) * num_replicas`` and dealt round-robin to the ranks, so
the repeats of one image land on different ranks with different augmentations. Each rank then keeps only
the first

    ``floor(len(dataset) // 256 * 256 / num_replicas)``  samples per epoch

(DeiT's formula: an "epoch" stays about ``len(dataset)`` samples summed over ranks, though only about
``len(dataset) / num_repeats`` distinct images are seen in it). For data sets smaller than 256 images
DeiT's formula gives 0; timm then uses ``ceil(len(dataset) / num_replicas)``. ``selected_round`` (256)
and ``selected_ratio`` (0: ``num_replicas``) are timm's knobs for the 256 and the divisor.
"""
from __future__ import annotations

from typing import Iterator, Sized

import torch.distributed as dist
from timm.data.distributed_sampler import RepeatAugSampler as _TimmRepeatAugSampler

__all__ = ["RepeatAugSampler"]


class RepeatAugSampler(_TimmRepeatAugSampler):
    """DeiT's repeated-augmentation sampler (timm's), usable without ``torch.distributed``."""

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        num_repeats: int = 3,
        seed: int = 0,
        selected_round: int = 256,
        selected_ratio: float = 0,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"RepeatAugSampler needs num_replicas >= 1 and 0 <= rank < num_replicas, "
                             f"got num_replicas={num_replicas}, rank={rank}.")
        if num_repeats < 1:
            raise ValueError(f"RepeatAugSampler needs num_repeats >= 1, got {num_repeats}.")
        if len(dataset) == 0:
            raise ValueError("RepeatAugSampler got an empty dataset.")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         num_repeats=num_repeats, selected_round=selected_round,
                         selected_ratio=selected_ratio)
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        # timm seeds its generator with ``self.epoch``; offset it by the seed for the duration of the
        # call, materialising the indices inside so the offset cannot leak or be missed.
        epoch = self.epoch
        self.epoch = self.seed + epoch
        try:
            indices = list(super().__iter__())
        finally:
            self.epoch = epoch
        return iter(indices)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle: every rank must call this with the same epoch before iterating."""
        self.epoch = epoch

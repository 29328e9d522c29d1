"""Synthetic images: random tensors of any shape and class count, for benchmarks and tests.

Each sample is drawn from a per-index seeded generator, so the data set is identical across runs,
workers and ranks and costs no memory. With ``learnable=true`` each class gets a fixed random template
added to the noise (signal-to-noise ``snr``), so a model can actually learn it; otherwise labels are
independent of the images (throughput benchmarks only).
"""
from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdrun.config import Ge
from kdrun.data.base import DataModule


class SyntheticImages(Dataset):
    def __init__(self, length: int, num_classes: int, in_chans: int, image_size: int,
                 seed: int, learnable: bool, snr: float, template_seed: int) -> None:
        self.length, self.num_classes = length, num_classes
        self.shape = (in_chans, image_size, image_size)
        self.seed, self.learnable, self.snr = seed, learnable, snr
        # Templates depend on template_seed only, so train and val share them.
        g = torch.Generator().manual_seed(template_seed + 7919)
        self.templates = torch.randn((num_classes, *self.shape), generator=g) if learnable else None

        self._targets: Tensor | None = None

    def __len__(self) -> int:
        return self.length

    @property
    def targets(self) -> Tensor:
        """Every sample's label (torchvision's name, read by :meth:`DataModule.train_labels`): the first
        draw of each sample's generator, as in ``__getitem__``; computed once, on first use."""
        if self._targets is None:
            self._targets = torch.tensor([self._label(torch.Generator().manual_seed(self.seed * 1_000_003 + i))
                                          for i in range(self.length)], dtype=torch.long)
        return self._targets

    def _label(self, g: torch.Generator) -> int:
        return int(torch.randint(0, self.num_classes, (1,), generator=g))

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        y = self._label(g)
        x = torch.randn(self.shape, generator=g)
        if self.templates is not None:
            x = x + self.snr * self.templates[y]
        return x, y


def build(
    num_classes: Annotated[int, Ge(2)] = 10,
    in_chans: Annotated[int, Ge(1)] = 3,
    image_size: Annotated[int, Ge(1)] = 32,
    train_size: Annotated[int, Ge(1)] = 512,
    val_size: Annotated[int, Ge(1)] = 128,
    learnable: bool = True,
    snr: Annotated[float, Ge(0.0)] = 1.0,
    seed: int = 0,
) -> DataModule:
    common = dict(num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                  learnable=learnable, snr=snr, template_seed=seed)
    return DataModule(
        train=SyntheticImages(train_size, seed=seed, **common),
        val=SyntheticImages(val_size, seed=seed + 1, **common),
        num_classes=num_classes,
        in_chans=in_chans,
        image_size=image_size,
    )

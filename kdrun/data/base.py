"""What a dataset builder returns, and the errors it raises."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset


class DatasetError(ValueError):
    """A missing or malformed data set; the message shows the expected layout."""


@dataclass
class DataModule:
    """Train and val splits plus what the engine and models need to know about them.

    Attributes:
        train, val: map-style datasets yielding ``(image_tensor, int_label)``.
        num_classes, in_chans, image_size: shape facts; must equal the ``dataset.*`` keys that the
            model configs interpolate.
        mixup: a callable ``(x, y) -> (x, y_soft)`` applied to training batches on the device
            (timm's ``Mixup``), or ``None``.
        repeated_augmentation: number of repeats for DeiT's repeated-augmentation sampler (0: off).
        collate_fn: optional collate function for the loaders.
    """

    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    mixup: Callable[..., Any] | None = None
    repeated_augmentation: int = 0
    collate_fn: Callable[..., Any] | None = None

    def train_labels(self) -> Tensor | None:
        """The training labels as a long tensor ``[len(train)]``, index-aligned with ``train``, or
        ``None`` when the data set cannot say without loading every sample. Reads the torchvision
        convention (``targets``, as CIFAR and ImageFolder keep them); data sets without it may override."""
        targets = getattr(self.train, "targets", None)
        if targets is None:
            return None
        t = torch.as_tensor(targets, dtype=torch.long)
        return t if t.ndim == 1 and t.numel() == len(self.train) else None  # type: ignore[arg-type]


def check_shape(name: str, built: dict[str, int], declared: dict[str, int]) -> None:
    """The config's declared shape facts must match the data, or models would be built wrong."""
    for k, v in declared.items():
        if built[k] != v:
            raise DatasetError(f"dataset.{k}={v} but the {name} data has {k}={built[k]}; fix the config.")

"""scikit-learn's bundled ``digits`` (1,797 8×8 grey images of 10 digits): the offline data set.

No download: the data ship inside scikit-learn. Images are scaled to [0, 1], upsampled bilinearly to
``image_size`` and standardised with the training split's mean and std. The split is a fixed,
stratified ``val_fraction`` (seeded by ``split_seed``), the same on every machine. ``augment`` adds a
random ±1-pixel translation (padding + crop) to training images, on the fly and seeded by the loader.
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from kdrun.config import Ge, Gt, Le
from kdrun.data.base import DataModule, DatasetError, check_shape


class TensorImages(Dataset):
    """In-memory images with an optional random-translation augmentation."""

    def __init__(self, images: Tensor, labels: Tensor, pad: int = 0) -> None:
        self.images, self.labels, self.pad = images, labels, pad

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def targets(self) -> Tensor:
        """The labels under torchvision's name, which :meth:`DataModule.train_labels` reads."""
        return self.labels

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.images[i]
        if self.pad:
            h, w = x.shape[-2:]
            x = F.pad(x, (self.pad,) * 4)
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[:, dy:dy + h, dx:dx + w]
        return x, int(self.labels[i])


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - dev extra installs it
        raise DatasetError(
            "dataset=digits needs scikit-learn (it ships the data): pip install scikit-learn "
            "(or pip install -e '.[dev]')."
        ) from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y


def stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = int(round(len(idx) * val_fraction))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def build(
    image_size: Annotated[int, Ge(8)] = 16,
    val_fraction: Annotated[float, Gt(0.0), Le(0.9)] = 0.2,
    split_seed: int = 0,
    augment: bool = True,
    num_classes: int = 10,
    in_chans: int = 1,
) -> DataModule:
    x, y = load_digits_tensors()
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    tr, va = stratified_split(y, val_fraction, split_seed)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    check_shape("digits", {"num_classes": 10, "in_chans": 1},
                {"num_classes": num_classes, "in_chans": in_chans})
    pad = max(1, image_size // 8) if augment else 0
    return DataModule(
        train=TensorImages(x[tr], y[tr], pad=pad),
        val=TensorImages(x[va], y[va]),
        num_classes=10,
        in_chans=1,
        image_size=image_size,
    )

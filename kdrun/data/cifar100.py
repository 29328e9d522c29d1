"""CIFAR-100 (Krizhevsky 2009) via torchvision, with the augmentation used across the KD literature.

The CIFAR distillation benchmarks (FitNets, AT, CRD, DKD, ...) all train with a 4-pixel-padded random
32×32 crop plus a horizontal flip and normalise with the CIFAR-100 training-set statistics; evaluation is
normalisation only. Numbers are only comparable with the published tables under exactly this protocol,
so it is fixed here rather than made configurable. ``augment=false`` switches the training split to the
evaluation transform (for feature caching or debugging).

``image_size`` other than 32 upsamples the images first (bicubic) and scales the crop padding with it
(``image_size // 8``), for teachers that expect larger inputs.

The data are never fetched unless ``download=true``: a missing data set is a config mistake reported as a
:class:`~kdrun.data.base.DatasetError` that shows the expected layout, not a silent 160 MB download.
"""
from __future__ import annotations

import os
from typing import Annotated

from torchvision import transforms as T
from torchvision.datasets import CIFAR100

from kdrun.config import Ge
from kdrun.data.base import DataModule, DatasetError, check_shape

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
NATIVE_SIZE = 32


def transforms(image_size: int, augment: bool) -> tuple[T.Compose, T.Compose]:
    """(train, val) transforms of the standard CIFAR KD protocol, upsampling if ``image_size != 32``."""
    resize = ([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
              if image_size != NATIVE_SIZE else [])
    tail = [T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)]
    val = T.Compose(resize + tail)
    if not augment:
        return val, val
    train = T.Compose(resize + [T.RandomCrop(image_size, padding=max(1, image_size // 8)),
                                T.RandomHorizontalFlip()] + tail)
    return train, val


def _missing_message(root: str, cause: str) -> str:
    base = os.path.join(root, CIFAR100.base_folder)
    return (
        f"CIFAR-100 is missing or corrupted under dataset.root={root!r} (torchvision: {cause}). Expected the "
        f"python version of the data set unpacked as {base}/{{train,test,meta}} (the layout of "
        f"cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, files unmodified: "
        "their md5 sums are checked). Set dataset.download=true to fetch and unpack it there (~160 MB), "
        "or point dataset.root (or the KDRUN_DATA environment variable) at the directory that holds "
        f"{CIFAR100.base_folder}/."
    )


def build(
    root: str,
    download: bool = False,
    image_size: Annotated[int, Ge(8)] = 32,
    num_classes: int = 100,
    in_chans: int = 3,
    augment: bool = True,
) -> DataModule:
    root = os.path.expanduser(str(root))
    train_tf, val_tf = transforms(image_size, augment)
    try:
        # With download=False torchvision only checks the files (md5) and raises RuntimeError if they
        # are missing or corrupted; it never touches the network.
        train = CIFAR100(root, train=True, transform=train_tf, download=download)
        val = CIFAR100(root, train=False, transform=val_tf, download=False)
    except RuntimeError as e:
        raise DatasetError(_missing_message(root, str(e).split(". ")[0])) from None
    except OSError as e:  # download=True without network, or an unwritable root
        if not download:
            raise
        raise DatasetError(
            f"Downloading CIFAR-100 into dataset.root={root!r} failed ({e}). Download "
            "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html by other means, "
            f"unpack it so that {os.path.join(root, CIFAR100.base_folder)}/{{train,test,meta}} exist, "
            "and rerun with dataset.download=false."
        ) from None
    chans = int(train.data.shape[-1]) if train.data.ndim == 4 else 1
    check_shape("cifar100", {"num_classes": len(train.classes), "in_chans": chans},
                {"num_classes": num_classes, "in_chans": in_chans})
    return DataModule(
        train=train,
        val=val,
        num_classes=len(train.classes),
        in_chans=chans,
        image_size=image_size,
    )

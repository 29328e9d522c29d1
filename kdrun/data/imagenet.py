"""ImageNet-1k (or any ImageFolder tree) with DeiT's training recipe (Touvron et al. 2021).

DeiT-style distillation results are only reproducible with DeiT's data pipeline, so the defaults here are
its defaults: RandAugment ``rand-m9-mstd0.5-inc1``, bicubic random-resized crops, random erasing
(p=0.25, per-pixel noise), Mixup 0.8 / CutMix 1.0 with label smoothing 0.1, and repeated augmentation
(3 repeats, :class:`kdrun.data.samplers.RepeatAugSampler`). The transforms come from timm's factory, the
one DeiT itself uses, so the two cannot drift apart. ``color_jitter`` is passed through but timm ignores it
while an ``auto_augment`` policy is set (DeiT's 0.3 is inert for the same reason).

Evaluation resizes the shorter side to ``int(image_size / crop_pct)`` and centre-crops ``image_size``.

Mixup/CutMix and label smoothing are *not* applied here: they mix whole batches, so :attr:`DataModule.mixup`
carries a callable the engine applies to each device batch, which turns the integer labels into soft
targets of shape ``(B, num_classes)``. Label smoothing lives inside that callable (timm's ``Mixup`` when
``mixup > 0`` or ``cutmix > 0``, otherwise a smoothing-only :class:`SmoothTargets`); the loss must therefore
be a soft-target cross-entropy without smoothing of its own, or it would be smoothed twice. With both mixes
and smoothing off, ``mixup`` is ``None`` and labels stay integers. timm's ``Mixup`` needs an even batch size
(``mixup_mode=batch``/``pair``), so the training loader should use ``drop_last=True``.

Expected layout (the official validation tarball is flat: sort it into class folders first, e.g. with the
widely used ``valprep.sh``)::

    <root>/train/<wnid>/*.JPEG
    <root>/val/<wnid>/*.JPEG
"""
from __future__ import annotations

import os
from typing import Annotated, Literal, Optional

import torch
from torch import Tensor
from torchvision.datasets import ImageFolder

from kdrun.config import Ge, Gt, Le
from kdrun.data.base import DataModule, DatasetError, check_shape

LAYOUT = """\
    {root}/
      train/
        n01440764/   one folder per class (WordNet id), holding its images
          n01440764_10026.JPEG
          ...
        n01443537/
        ...
      val/
        n01440764/   the same class folders as train/
          ILSVRC2012_val_00000293.JPEG
          ...
        ..."""


def _error(root: str, problem: str) -> DatasetError:
    return DatasetError(
        f"ImageNet data set at dataset.root={root!r}: {problem} Expected an ImageFolder tree with the "
        f"same class folders in train/ and val/ (the flat official val/ must be sorted into class "
        f"folders first):\n{LAYOUT.format(root=root.rstrip(os.sep) or os.sep)}"
    )


def _class_dirs(root: str, split: str) -> list[str]:
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise _error(root, f"the {split}/ directory is missing.")
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if not classes:
        raise _error(root, f"{split}/ has no class folders.")
    return classes


def _preview(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


class SmoothTargets:
    """Label smoothing without mixing, so targets have one format whatever ``mixup``/``cutmix`` say."""

    def __init__(self, num_classes: int, smoothing: float) -> None:
        self.num_classes, self.smoothing = num_classes, smoothing

    def __call__(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        off = self.smoothing / self.num_classes
        y = torch.full((target.shape[0], self.num_classes), off, device=target.device)
        return x, y.scatter_(1, target.long().view(-1, 1), 1.0 - self.smoothing + off)


def build(
    root: str,
    image_size: Annotated[int, Ge(8)] = 224,
    num_classes: Annotated[int, Ge(2)] = 1000,
    in_chans: int = 3,
    augment: bool = True,
    crop_pct: Annotated[float, Gt(0.0), Le(1.0)] = 0.875,
    hflip: Annotated[float, Ge(0.0), Le(1.0)] = 0.5,
    color_jitter: Annotated[float, Ge(0.0)] = 0.3,
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
    interpolation: Literal["bilinear", "bicubic", "random"] = "bicubic",
    re_prob: Annotated[float, Ge(0.0), Le(1.0)] = 0.25,
    re_mode: Literal["const", "rand", "pixel"] = "pixel",
    re_count: Annotated[int, Ge(1)] = 1,
    mixup: Annotated[float, Ge(0.0)] = 0.8,
    cutmix: Annotated[float, Ge(0.0)] = 1.0,
    mixup_prob: Annotated[float, Ge(0.0), Le(1.0)] = 1.0,
    mixup_switch_prob: Annotated[float, Ge(0.0), Le(1.0)] = 0.5,
    mixup_mode: Literal["batch", "pair", "elem"] = "batch",
    label_smoothing: Annotated[float, Ge(0.0), Le(1.0)] = 0.1,
    repeated_augmentation: Annotated[int, Ge(0)] = 3,
) -> DataModule:
    from timm.data import Mixup, create_transform  # lazy: config validation imports this module

    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise _error(root, "the directory does not exist.")
    train_classes, val_classes = _class_dirs(root, "train"), _class_dirs(root, "val")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise _error(root, "train/ and val/ have different class folders (only in train/: "
                           f"{_preview(only_train) or 'none'}; only in val/: {_preview(only_val) or 'none'}).")
    if len(train_classes) != num_classes:
        raise _error(root, f"it has {len(train_classes)} class folders but dataset.num_classes="
                           f"{num_classes}; fix one or the other.")
    check_shape("imagenet", {"in_chans": 3}, {"in_chans": in_chans})  # the loader converts to RGB

    eval_tf = create_transform(image_size, is_training=False, interpolation=interpolation
                               if interpolation != "random" else "bicubic", crop_pct=crop_pct)
    train_tf = create_transform(
        image_size, is_training=True, hflip=hflip, color_jitter=color_jitter,
        auto_augment=auto_augment or None, interpolation=interpolation,
        re_prob=re_prob, re_mode=re_mode, re_count=re_count,
    ) if augment else eval_tf
    splits = {}
    for split, tf in (("train", train_tf), ("val", eval_tf)):
        try:
            splits[split] = ImageFolder(os.path.join(root, split), transform=tf)
        except FileNotFoundError as e:  # "Found no valid file for the classes a, b. Supported ..."
            empty = str(e).split(". ")[0].rpartition("classes ")[2]
            raise _error(root, f"{split}/ has class folders without any image file: {empty}.") from None

    if mixup > 0 or cutmix > 0:
        mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob,
                    switch_prob=mixup_switch_prob, mode=mixup_mode,
                    label_smoothing=label_smoothing, num_classes=num_classes)
    elif label_smoothing > 0:
        mix = SmoothTargets(num_classes, label_smoothing)
    else:
        mix = None
    return DataModule(
        train=splits["train"],
        val=splits["val"],
        num_classes=num_classes,
        in_chans=3,
        image_size=image_size,
        mixup=mix,
        repeated_augmentation=repeated_augmentation,
    )

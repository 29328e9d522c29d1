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

:func:`build_three_augment` (``dataset=imagenet_3aug``) is the same data with DeiT III's *3-Augment*
training transform (Touvron et al. 2022), the augmentation VkD (Miles & Deng 2024) trains with and that
DTO-KD §4 / MoKD §4 follow ("for data augmentation, we follow [VkD]"). It is VkD's ``augment.py``
``aug_generator`` (roymiles/vkd@4b48050, L82-117), itself DeiT's ``augment.py`` ``new_data_aug_generator``
(facebookresearch/deit@7e160fe, L90-123):

* ``RandomResizedCropAndInterpolation(image_size, scale=(0.08, 1.0), interpolation="bicubic")`` (timm's
  class, the one both files import) and ``RandomHorizontalFlip(0.5)``; with ``simple_random_crop``
  (DeiT's ``--src``; off in VkD's ``scripts/train.sh``) ``Resize(image_size, bicubic)`` +
  ``RandomCrop(image_size, padding=4, padding_mode="reflect")`` + flip instead;
* exactly one of, uniformly (``RandomChoice``): grayscale (3 channels), solarize (PIL
  ``ImageOps.solarize``, threshold 128), Gaussian blur (PIL ``ImageFilter.GaussianBlur``, radius
  U(0.1, 2.0));
* ``ColorJitter(0.3, 0.3, 0.3)`` (brightness, contrast, saturation; no hue) when ``color_jitter`` > 0;
* ``ToTensor`` + ImageNet mean/std normalisation.

No RandAugment, no random erasing: VkD's ``train.py`` (L113) *replaces* the timm transform of its
``datasets.py`` (which would have them) by ``aug_generator``, so this builder has no ``auto_augment`` /
``re_*`` keys at all (setting one fails at validation). Mixup 0.8 / CutMix 1.0 with label smoothing 0.1
stay on (VkD ``train.py`` L125-133 builds timm's ``Mixup`` from ``main_distributed.py``'s defaults and
applies it in ``engine.py`` L66-67; the loss is ``SoftTargetCrossEntropy``, L248-250). No repeated
augmentation: VkD's train sampler is a plain ``DistributedSampler`` (``train.py`` L87-89; its
``--repeated-aug`` flag, ``main_distributed.py`` L97-99, is never read), hence ``repeated_augmentation=0``. Evaluation is DeiT's, as in
VkD's ``datasets.py`` L79-89: resize to ``int(image_size / crop_pct)`` (bicubic), centre crop.

Expected layout (the official validation tarball is flat: sort it into class folders first, e.g. with the
widely used ``valprep.sh``)::

    <root>/train/<wnid>/*.JPEG
    <root>/val/<wnid>/*.JPEG
"""
from __future__ import annotations

import os
import random
from typing import Annotated, Any, Callable, Literal, Optional

import torch
from PIL import Image, ImageFilter
from torch import Tensor
from torchvision import transforms as T
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


# Value types shared by both builders' signatures (the config validator reads them).
Prob = Annotated[float, Ge(0.0), Le(1.0)]
NonNeg = Annotated[float, Ge(0.0)]
CropPct = Annotated[float, Gt(0.0), Le(1.0)]
MixupMode = Literal["batch", "pair", "elem"]

THREE_AUGMENT_SCALE = (0.08, 1.0)   # DeiT augment.py L95 / VkD augment.py L87
BLUR_RADIUS = (0.1, 2.0)            # DeiT/VkD GaussianBlur(radius_min=0.1, radius_max=2.)
SOLARIZE_THRESHOLD = 128            # PIL ImageOps.solarize's default, which both call
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class RandomGaussianBlurPIL:
    """PIL's Gaussian blur with a radius drawn from U(lo, hi) (DeiT/VkD ``augment.py`` ``GaussianBlur``
    with p=1). torchvision's ``GaussianBlur`` is a different filter (a finite kernel, sigma instead of
    PIL's radius), so it is written here."""

    def __init__(self, radius: tuple[float, float] = BLUR_RADIUS) -> None:
        self.radius = radius

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.radius)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(radius={self.radius})"


def three_augment_transform(image_size: int, hflip: float = 0.5, color_jitter: float = 0.3,
                            interpolation: str = "bicubic", simple_random_crop: bool = False) -> T.Compose:
    """DeiT III's 3-Augment training transform as VkD uses it (module docstring)."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    if simple_random_crop:
        primary: list[Any] = [T.Resize(image_size, interpolation=T.InterpolationMode(interpolation)),
                              T.RandomCrop(image_size, padding=4, padding_mode="reflect")]
    else:
        primary = [RandomResizedCropAndInterpolation(image_size, scale=THREE_AUGMENT_SCALE,
                                                     interpolation=interpolation)]
    primary.append(T.RandomHorizontalFlip(hflip))
    secondary: list[Any] = [T.RandomChoice([T.Grayscale(num_output_channels=3),
                                            T.RandomSolarize(SOLARIZE_THRESHOLD, p=1.0),
                                            RandomGaussianBlurPIL(BLUR_RADIUS)])]
    if color_jitter:
        secondary.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    return T.Compose([*primary, *secondary, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def build(
    root: str,
    image_size: Annotated[int, Ge(8)] = 224,
    num_classes: Annotated[int, Ge(2)] = 1000,
    in_chans: int = 3,
    augment: bool = True,
    crop_pct: CropPct = 0.875,
    hflip: Prob = 0.5,
    color_jitter: NonNeg = 0.3,
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
    interpolation: Literal["bilinear", "bicubic", "random"] = "bicubic",
    re_prob: Prob = 0.25,
    re_mode: Literal["const", "rand", "pixel"] = "pixel",
    re_count: Annotated[int, Ge(1)] = 1,
    mixup: NonNeg = 0.8, cutmix: NonNeg = 1.0, mixup_prob: Prob = 1.0, mixup_switch_prob: Prob = 0.5,
    mixup_mode: MixupMode = "batch", label_smoothing: Prob = 0.1,
    repeated_augmentation: Annotated[int, Ge(0)] = 3,
) -> DataModule:
    """DeiT's recipe (module docstring): timm's RandAugment/random-erasing transform."""
    from timm.data import create_transform  # lazy: config validation imports this module

    def train_transform(eval_tf: Callable) -> Callable:
        return create_transform(
            image_size, is_training=True, hflip=hflip, color_jitter=color_jitter,
            auto_augment=auto_augment or None, interpolation=interpolation,
            re_prob=re_prob, re_mode=re_mode, re_count=re_count,
        ) if augment else eval_tf

    return _build(root, image_size, num_classes, in_chans, crop_pct, interpolation, train_transform, mixup,
                  cutmix, mixup_prob, mixup_switch_prob, mixup_mode, label_smoothing, repeated_augmentation)


def build_three_augment(
    root: str,
    image_size: Annotated[int, Ge(8)] = 224,
    num_classes: Annotated[int, Ge(2)] = 1000,
    in_chans: int = 3,
    augment: bool = True,
    crop_pct: CropPct = 0.875,
    hflip: Prob = 0.5,
    color_jitter: NonNeg = 0.3,
    interpolation: Literal["bilinear", "bicubic"] = "bicubic",
    simple_random_crop: bool = False,
    mixup: NonNeg = 0.8, cutmix: NonNeg = 1.0, mixup_prob: Prob = 1.0, mixup_switch_prob: Prob = 0.5,
    mixup_mode: MixupMode = "batch", label_smoothing: Prob = 0.1,
    repeated_augmentation: Annotated[int, Ge(0)] = 0,
) -> DataModule:
    """VkD's recipe: DeiT III's 3-Augment, no RandAugment/erasing/repeats, Mixup/CutMix kept (module
    docstring)."""

    def train_transform(eval_tf: Callable) -> Callable:
        return three_augment_transform(image_size, hflip, color_jitter, interpolation,
                                       simple_random_crop) if augment else eval_tf

    return _build(root, image_size, num_classes, in_chans, crop_pct, interpolation, train_transform, mixup,
                  cutmix, mixup_prob, mixup_switch_prob, mixup_mode, label_smoothing, repeated_augmentation)


def _build(root: str, image_size: int, num_classes: int, in_chans: int, crop_pct: float, interpolation: str,
           train_transform: Callable[[Callable], Callable], mixup: float, cutmix: float, mixup_prob: float,
           mixup_switch_prob: float, mixup_mode: str, label_smoothing: float,
           repeated_augmentation: int) -> DataModule:
    """The layout checks, the datasets and the batch-level mixing both recipes share."""
    from timm.data import Mixup, create_transform

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
    train_tf = train_transform(eval_tf)
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

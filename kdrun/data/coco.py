"""COCO 2017 detection (Lin et al., ECCV 2014) with DETR's augmentation, and a synthetic COCO-format set.

Data: torchvision's ``CocoDetection`` (pycocotools reads the annotations). Each sample is
``(image [3, H, W], target)`` with ``target`` a dict:

* ``boxes`` ``[n, 4]`` float, cxcywh normalised by the (augmented, un-padded) image size — what the
  detector predicts and the task's L1/GIoU losses compare;
* ``labels`` ``[n]`` int64: the COCO category ids (1..90; the detector has 91 outputs, index 0 and the
  unused ids simply never occur as targets, as in DETR/ViDT);
* ``image_id`` (int), ``orig_size`` / ``size`` ``[2]`` (h, w) before / after augmentation, ``area``,
  ``iscrowd``. Crowd annotations are dropped from the targets (they stay in the COCO ground truth that
  evaluation reads).

Augmentation (DETR, Carion et al. 2020, §A.4; ViDT uses it unchanged): horizontal flip (p 0.5), then with
equal probability either a resize of the shorter side to one of ``scales`` (480…800 step 32, the longer
side at most ``max_size`` 1333) or resize to one of ``crop_scales`` (400/500/600) → a random crop of
``crop_size`` (384…600) per side → the multi-scale resize. Evaluation: shorter side ``eval_size`` (800),
longer at most ``eval_size · 1333 / 800``. Images are normalised with the ImageNet mean/std. The loader's
:func:`collate` pads a batch to its largest image and returns an :class:`~kdrun.models.vidt.ImageBatch`
(tensor + padding mask) and the list of targets.

All sizes are knobs (``scales``, ``max_size``, ``crop_scales``, ``crop_size``, ``eval_size``), so tests
and the synthetic set run on tiny images.

:func:`make_synthetic_coco` writes a small COCO-format data set of drawn rectangles and ellipses (one
class per shape/colour pair) and :func:`build_synthetic` builds the data module over it (generated once
into ``$KDRUN_CACHE``); ``scripts/make_synthetic_coco.py`` is its command line.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any, Callable, Sequence

import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor

from kdrun.config import Ge, Le
from kdrun.data.base import DataModule, DatasetError

DETR_SCALES = tuple(range(480, 801, 32))
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

LAYOUT = """\
    {root}/
      train2017/                          training images (*.jpg)
      val2017/                            validation images
      annotations/
        instances_train2017.json          COCO-format instances
        instances_val2017.json"""

Target = dict[str, Any]


# ---------------------------------------------------------------------------------------------------
# DETR-style transforms on (PIL image, target with absolute xyxy boxes).


def _resize_size(w: int, h: int, size: int, max_size: int | None) -> tuple[int, int]:
    """(h, w) with the shorter side ``size``, shrunk so the longer side stays ≤ ``max_size`` (DETR)."""
    if max_size is not None:
        lo, hi = float(min(w, h)), float(max(w, h))
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(img: Image.Image, target: Target, size: int, max_size: int | None) -> tuple[Image.Image, Target]:
    oh, ow = _resize_size(img.width, img.height, size, max_size)
    rw, rh = ow / img.width, oh / img.height
    img = img.resize((ow, oh), Image.BILINEAR)
    target = dict(target)
    target["boxes"] = target["boxes"] * torch.tensor([rw, rh, rw, rh])
    target["area"] = target["area"] * (rw * rh)
    target["size"] = torch.tensor([oh, ow])
    return img, target


def hflip(img: Image.Image, target: Target) -> tuple[Image.Image, Target]:
    w = img.width
    target = dict(target)
    b = target["boxes"]
    target["boxes"] = b[:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1, -1, 1]) + torch.tensor([w, 0.0, w, 0])
    return img.transpose(Image.FLIP_LEFT_RIGHT), target


def crop(img: Image.Image, target: Target, top: int, left: int, h: int, w: int) -> tuple[Image.Image, Target]:
    """Crop and keep the boxes that still have positive area, clipped to the crop (DETR's ``crop``)."""
    img = img.crop((left, top, left + w, top + h))
    target = dict(target)
    boxes = (target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)).view(-1, 2, 2)
    boxes = torch.min(boxes, torch.tensor([w, h], dtype=torch.float32)).clamp(min=0)
    keep = (boxes[:, 1] > boxes[:, 0]).all(dim=1)
    target["boxes"] = boxes.view(-1, 4)[keep]
    target["area"] = (boxes[:, 1] - boxes[:, 0]).prod(dim=1)[keep]
    for k in ("labels", "iscrowd"):
        target[k] = target[k][keep]
    target["size"] = torch.tensor([h, w])
    return img, target


class DetrTransform:
    """The training (``train=True``) or evaluation transform; see the module docstring."""

    def __init__(self, train: bool, scales: Sequence[int], max_size: int, crop_scales: Sequence[int],
                 crop_size: tuple[int, int], eval_size: int, eval_max_size: int, hflip: float = 0.5) -> None:
        self.train, self.scales, self.max_size = train, list(scales), max_size
        self.crop_scales, self.crop_size = list(crop_scales), crop_size
        self.eval_size, self.eval_max_size, self.hflip = eval_size, eval_max_size, hflip

    def __call__(self, img: Image.Image, target: Target) -> tuple[Tensor, Target]:
        if self.train:
            if random.random() < self.hflip:
                img, target = hflip(img, target)
            if random.random() < 0.5:
                img, target = resize(img, target, random.choice(self.scales), self.max_size)
            else:
                img, target = resize(img, target, random.choice(self.crop_scales), None)
                lo, hi = self.crop_size
                w = random.randint(min(lo, img.width), min(img.width, hi))
                h = random.randint(min(lo, img.height), min(img.height, hi))
                top, left = random.randint(0, img.height - h), random.randint(0, img.width - w)
                img, target = crop(img, target, top, left, h, w)
                img, target = resize(img, target, random.choice(self.scales), self.max_size)
        else:
            img, target = resize(img, target, self.eval_size, self.eval_max_size)
        x = TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)
        h, w = x.shape[-2:]
        b = target["boxes"]
        # xyxy (pixels) → cxcywh normalised by the un-padded image: the detector's output space
        target["boxes"] = torch.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                                       (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], dim=-1)
        return x, target


# ---------------------------------------------------------------------------------------------------
# Data set and collate.


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The parsed JSON of ``path``, or a :class:`DatasetError` naming the file (unreadable, not UTF-8 text,
    or not JSON: a truncated download or copy ends mid-value)."""
    fix = "download, copy or generate it again"
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise DatasetError(f"{what} {path} cannot be read ({e.strerror or e}); check the path.") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{what} {path} is not text (a binary or damaged file?); {fix}.") from None
    try:
        return json.loads(text)
    except ValueError as e:
        pos = getattr(e, "pos", None)  # where the parser stopped: at the very end, or in an open string
        cut = " (it ends mid-value: truncated?)" if pos is not None and (
            pos >= len(text.rstrip()) or "Unterminated" in str(e)) else ""
        raise DatasetError(f"{what} {path} is not valid JSON{cut}: {e}; {fix}.") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_annotations(data: Any, path: str | os.PathLike, num_classes: int | None = None) -> dict[str, Any]:
    """``data`` (a parsed COCO instances file) if it can be trained and evaluated on, else a
    :class:`DatasetError` naming ``path`` and what is wrong.

    pycocotools accepts a file without ``annotations`` (or with categories the detector cannot output):
    the run then trained on no boxes and reported AP −1.00. Checked: the ``images``, ``annotations`` and
    ``categories`` lists (none empty), every annotation's ``image_id`` (listed in ``images``),
    ``category_id`` (listed in ``categories``) and ``bbox`` (four numbers), and, given the detector's
    ``num_classes``, every category id in ``0 .. num_classes − 1``."""
    what = f"COCO annotation file {path}"
    if not isinstance(data, dict):
        raise DatasetError(f"{what} holds a JSON {type(data).__name__}, not an object with images, annotations "
                           "and categories; point it at a COCO instances file (instances_<split>.json).")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{what} has no `{key}` (its keys: {', '.join(map(str, data)) or 'none'}); a COCO "
                               "instances file (instances_<split>.json) holds images, annotations and categories, "
                               "so use that file (not a captions or image-info one).")
        if not isinstance(data[key], list):
            raise DatasetError(f"{what}: `{key}` is a JSON {type(data[key]).__name__}, not a list; "
                               "use a COCO instances file (instances_<split>.json).")
        if not data[key]:
            raise DatasetError(f"{what} has an empty `{key}` list: there is nothing to train on or evaluate "
                               "(COCO AP would be -1); use a split that holds images with annotated objects.")
    bad = next((im for im in data["images"] if not isinstance(im, dict) or not _is_int(im.get("id"))
                or not isinstance(im.get("file_name"), str)), None)
    if bad is not None:
        raise DatasetError(f"{what}: an entry of `images` has no integer id and file_name ({str(bad)[:80]}); "
                           "every image needs both.")
    bad = next((c for c in data["categories"] if not isinstance(c, dict) or not _is_int(c.get("id"))), None)
    if bad is not None:
        raise DatasetError(f"{what}: an entry of `categories` has no integer id ({str(bad)[:80]}); every "
                           "category needs one.")
    images = {im["id"] for im in data["images"]}
    cats = {c["id"] for c in data["categories"]}
    for a in data["annotations"]:
        box = a.get("bbox") if isinstance(a, dict) else None
        if not isinstance(a, dict) or not _is_int(a.get("image_id")) or not _is_int(a.get("category_id")) \
                or not isinstance(box, list) or len(box) != 4 \
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise DatasetError(f"{what}: an annotation lacks an integer image_id and category_id or a bbox of "
                               f"four numbers ({str(a)[:120]}); every annotation needs all three.")
        if a["image_id"] not in images:
            raise DatasetError(f"{what}: annotation {a.get('id')} is of image {a['image_id']}, which `images` "
                               "does not list; the file is inconsistent: use an unmodified COCO instances file.")
        if a["category_id"] not in cats:
            raise DatasetError(f"{what}: annotation {a.get('id')} has category_id {a['category_id']}, which "
                               f"`categories` does not list (ids {_id_range(cats)}); every object needs a listed "
                               "category: use an unmodified COCO instances file.")
    if num_classes is not None:
        outside = sorted(c for c in cats if not 0 <= c < num_classes)
        if outside:
            raise DatasetError(
                f"{what} has category {'id' if len(outside) == 1 else 'ids'} {', '.join(map(str, outside[:5]))}"
                f"{' ...' if len(outside) > 5 else ''} that a detector with dataset.num_classes={num_classes} "
                f"outputs (ids 0..{num_classes - 1}) cannot represent; set dataset.num_classes="
                f"{max(max(cats) + 1, num_classes)} (the largest category id + 1; 91 for COCO)"
                + (" and use ids >= 0" if min(cats) < 0 else "") + ".")
    return data


def _id_range(ids: set[int]) -> str:
    s = sorted(ids)
    return ", ".join(map(str, s)) if len(s) <= 6 else f"{s[0]}..{s[-1]}"


def check_detections(dets: Any, path: str | os.PathLike, image_ids: set[int] | None = None) -> list[dict[str, Any]]:
    """``dets`` (a parsed COCO results file) if every entry is a detection of one of ``image_ids`` (the
    ground truth's images; None: not checked), else a :class:`DatasetError` naming ``path``. The same
    rules as pycocotools' ``loadRes``, which asserts instead (a traceback), and TIDE, which dropped
    detections of unknown images without a word."""
    what = f"detections file {path}"
    form = "a COCO results list [{image_id, category_id, bbox: [x, y, w, h], score}, ...]"
    fix = "re-run the evaluation that writes it (kdrun eval RUN_DIR --save-detections PATH)"
    if not isinstance(dets, list):
        raise DatasetError(f"{what} holds a JSON {type(dets).__name__}, not {form}; {fix}.")
    for d in dets:
        box = d.get("bbox") if isinstance(d, dict) else None
        if not isinstance(d, dict) or not _is_int(d.get("image_id")) or not _is_int(d.get("category_id")) \
                or not isinstance(d.get("score"), (int, float)) or isinstance(d.get("score"), bool) \
                or not isinstance(box, list) or len(box) != 4 \
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise DatasetError(f"{what} has an entry that is not a detection ({str(d)[:120]}); it must be {form}; "
                               f"{fix}.")
    if image_ids is not None:
        strangers = sorted({d["image_id"] for d in dets} - image_ids)
        if strangers:
            raise DatasetError(f"{what} has detections of {len(strangers)} image id(s) that the ground truth does "
                               f"not have (e.g. {strangers[0]}): detections of another data set or split? Compare "
                               "them with the annotation file they were made on (--gt).")
    return dets


def load_coco(path: str | os.PathLike, num_classes: int | None = None) -> Any:
    """The pycocotools ``COCO`` of an annotation file, checked first (:func:`check_annotations`); the file
    is parsed once, by us, so that a damaged one is named instead of failing inside pycocotools."""
    from pycocotools.coco import COCO

    data = check_annotations(read_json(path, "COCO annotation file"), path, num_classes)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its indexing steps
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


class CocoDetection(torchvision.datasets.CocoDetection):
    """torchvision's COCO reader + DETR's target preparation + a :class:`DetrTransform`.

    ``self.coco`` is the pycocotools ``COCO`` of the annotation file: evaluation reads the ground
    truth from it. The file is read by :func:`load_coco` (checked; errors name it), so torchvision's
    ``__init__``, which hands the path to pycocotools, is bypassed for ``VisionDataset``'s."""

    def __init__(self, img_folder: str, ann_file: str, transform: Callable[..., Any],
                 num_classes: int | None = None) -> None:
        torchvision.datasets.VisionDataset.__init__(self, img_folder)
        self.coco = load_coco(ann_file, num_classes)
        self.ids = list(sorted(self.coco.imgs.keys()))
        # Missing image files would fail mid-epoch in a loader worker; one listing finds them all now.
        present = set(os.listdir(img_folder))
        missing = [im["file_name"] for im in self.coco.dataset["images"] if im["file_name"] not in present
                   and not os.path.isfile(os.path.join(img_folder, im["file_name"]))]  # a name with a folder
        if missing:
            raise DatasetError(f"{len(missing)} image(s) that {ann_file} lists are not in {img_folder} (e.g. "
                               f"{missing[0]}); copy or extract the split's images there, or use the annotation "
                               "file of the images you have.")
        self._detr_transform = transform

    def __getitem__(self, idx: int) -> tuple[Tensor, Target]:
        image_id = self.ids[idx]
        img = self._load_image(image_id)
        anns = [a for a in self._load_target(image_id) if not a.get("iscrowd", 0)]
        w, h = img.size
        boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=w)
        boxes[:, 1::2].clamp_(min=0, max=h)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {
            "boxes": boxes[keep],
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)[keep],
            "image_id": int(image_id),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32)[keep],
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64)[keep],
            "orig_size": torch.tensor([h, w]),
            "size": torch.tensor([h, w]),
        }
        return self._detr_transform(img, target)


def collate(batch: Sequence[tuple[Tensor, Target]]) -> tuple[Any, list[Target]]:
    """Pad the images of a batch to the largest height and width (bottom/right, zeros) and return
    (:class:`~kdrun.models.vidt.ImageBatch` with its padding mask, list of targets)."""
    from kdrun.models.vidt.detector import ImageBatch

    images = [b[0] for b in batch]
    c = images[0].shape[0]
    h = max(int(im.shape[1]) for im in images)
    w = max(int(im.shape[2]) for im in images)
    tensors = images[0].new_zeros((len(images), c, h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool)
    for i, im in enumerate(images):
        tensors[i, :, :im.shape[1], :im.shape[2]].copy_(im)
        mask[i, :im.shape[1], :im.shape[2]] = False
    return ImageBatch(tensors, mask), [b[1] for b in batch]


# ---------------------------------------------------------------------------------------------------
# Builders.


def _error(root: str, problem: str) -> DatasetError:
    return DatasetError(f"COCO data set at dataset.root={root!r}: {problem} Expected the COCO 2017 layout:\n"
                        f"{LAYOUT.format(root=root.rstrip(os.sep) or os.sep)}")


def build(
    root: str,
    num_classes: Annotated[int, Ge(2)] = 91,
    in_chans: Annotated[int, Ge(3), Le(3)] = 3,
    train_split: str = "train2017",
    val_split: str = "val2017",
    augment: bool = True,
    scales: Sequence[int] = DETR_SCALES,
    max_size: Annotated[int, Ge(1)] = 1333,
    crop_scales: Sequence[int] = (400, 500, 600),
    crop_size: Sequence[int] = (384, 600),
    eval_size: Annotated[int, Ge(1)] = 800,
    eval_max_size: Annotated[int, Ge(0)] = 0,
) -> DataModule:
    """COCO detection with DETR's augmentation (see the module docstring).

    ``<root>/<split>/`` holds the images and ``<root>/annotations/instances_<split>.json`` the
    annotations. ``num_classes`` is the detector's number of class outputs: the largest category id
    + 1 (91 for COCO). ``augment=false`` uses the evaluation transform for training too.
    ``eval_max_size`` 0 means ``eval_size · 1333 / 800`` (ViDT's rule)."""
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise _error(root, "the directory does not exist.")
    paths = {}
    for split in (train_split, val_split):
        img_dir, ann = os.path.join(root, split), os.path.join(root, "annotations", f"instances_{split}.json")
        if not os.path.isdir(img_dir):
            raise _error(root, f"the image folder {split}/ is missing.")
        if not os.path.isfile(ann):
            raise _error(root, f"the annotation file annotations/instances_{split}.json is missing.")
        paths[split] = (img_dir, ann)
    if len(list(crop_size)) != 2 or crop_size[0] > crop_size[1]:
        raise DatasetError(f"dataset.crop_size={list(crop_size)} must be [min, max] with min <= max.")
    common = dict(scales=[int(s) for s in scales], max_size=int(max_size),
                  crop_scales=[int(s) for s in crop_scales], crop_size=(int(crop_size[0]), int(crop_size[1])),
                  eval_size=int(eval_size), eval_max_size=int(eval_max_size) or int(eval_size) * 1333 // 800)
    train = CocoDetection(*paths[train_split], transform=DetrTransform(train=augment, **common),
                          num_classes=num_classes)
    val = CocoDetection(*paths[val_split], transform=DetrTransform(train=False, **common), num_classes=num_classes)
    return DataModule(train=train, val=val, num_classes=num_classes, in_chans=3, image_size=int(eval_size),
                      collate_fn=collate)


# ---------------------------------------------------------------------------------------------------
# Synthetic COCO-format data.

PALETTE = ((220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 200, 30), (200, 60, 200), (30, 200, 210),
           (240, 140, 30), (140, 90, 40))


def synthetic_categories(num_classes: int) -> list[dict[str, Any]]:
    """Category ids 1..K: odd ids rectangles, even ids ellipses, each with its own colour."""
    if not 1 <= num_classes <= len(PALETTE):
        raise ValueError(f"synthetic COCO supports 1..{len(PALETTE)} classes, not {num_classes}")
    return [{"id": k + 1, "name": f"{'rectangle' if k % 2 == 0 else 'ellipse'}_{k + 1}",
             "supercategory": "shape"} for k in range(num_classes)]


def make_synthetic_coco(root: str | os.PathLike, num_train: int = 64, num_val: int = 16, image_size: int = 128,
                        num_classes: int = 3, max_objects: int = 4, min_object: int = 8, seed: int = 0,
                        val_equals_train: bool = False) -> Path:
    """Write a COCO-format detection set of drawn shapes to ``root`` (the COCO 2017 layout).

    Each image (PNG, ``image_size`` ± 25 % per side, noisy grey background) holds 1..``max_objects``
    filled shapes; class k+1 is a rectangle (k even) or ellipse (k odd) in ``PALETTE[k]``, sizes from
    ``min_object`` to 3/4 of the image side, so COCO's small/medium/large ranges all occur. With
    ``val_equals_train`` the val split holds the same images as train (for overfitting tests).
    Returns ``root``."""
    import numpy as np
    from PIL import ImageDraw

    root = Path(root)
    cats = synthetic_categories(num_classes)
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)

    def make_split(split: str, n: int, id_base: int) -> dict[str, Any]:
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            w = rng.randint(int(image_size * 0.75), int(image_size * 1.25))
            h = rng.randint(int(image_size * 0.75), int(image_size * 1.25))
            base = rng.randint(60, 190)
            arr = np.clip(base + nrng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
            draw = ImageDraw.Draw(img)
            image_id = id_base + i
            for _ in range(rng.randint(1, max_objects)):
                k = rng.randrange(num_classes)
                bw = rng.randint(min_object, max(min_object, int(0.75 * w)))
                bh = rng.randint(min_object, max(min_object, int(0.75 * h)))
                x0, y0 = rng.randint(0, w - bw), rng.randint(0, h - bh)
                colour = tuple(int(c) for c in np.clip(np.array(PALETTE[k]) + nrng.integers(-20, 21, 3), 0, 255))
                shape = [x0, y0, x0 + bw - 1, y0 + bh - 1]  # PIL draws both end pixels
                (draw.rectangle if k % 2 == 0 else draw.ellipse)(shape, fill=colour)
                if k % 2 == 0:
                    poly = [x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]
                else:  # a 24-gon: tools that read `segmentation` (e.g. tidecv's loader) get a mask
                    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
                    poly = np.stack([x0 + bw / 2 * (1 + np.cos(t)), y0 + bh / 2 * (1 + np.sin(t))], 1).ravel()
                anns.append({"id": len(anns) + 1 + id_base * 100, "image_id": image_id, "category_id": k + 1,
                             "bbox": [float(x0), float(y0), float(bw), float(bh)], "area": float(bw * bh),
                             "iscrowd": 0, "segmentation": [[round(float(v), 2) for v in poly]]})
            name = f"{image_id:012d}.png"
            img.save(root / split / name)
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        return {"images": images, "annotations": anns, "categories": cats,
                "info": {"description": f"kdrun synthetic COCO (seed {seed})"}, "licenses": []}

    (root / "annotations").mkdir(parents=True, exist_ok=True)
    train = make_split("train2017", num_train, 1)
    if val_equals_train:
        shutil.copytree(root / "train2017", root / "val2017", dirs_exist_ok=True)
        val = train
    else:
        val = make_split("val2017", num_val, 100_000)
    for split, data in (("train2017", train), ("val2017", val)):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def build_synthetic(
    root: str | None = None,
    num_classes: Annotated[int, Ge(2), Le(9)] = 4,
    in_chans: Annotated[int, Ge(3), Le(3)] = 3,
    train_size: Annotated[int, Ge(1)] = 64,
    val_size: Annotated[int, Ge(1)] = 16,
    image_size: Annotated[int, Ge(16)] = 128,
    max_objects: Annotated[int, Ge(1)] = 4,
    val_equals_train: bool = False,
    seed: int = 0,
    augment: bool = True,
    scales: Sequence[int] = (96, 112, 128),
    max_size: Annotated[int, Ge(1)] = 160,
    crop_scales: Sequence[int] = (80, 96, 112),
    crop_size: Sequence[int] = (64, 112),
    eval_size: Annotated[int, Ge(1)] = 128,
) -> DataModule:
    """The synthetic COCO-format set (:func:`make_synthetic_coco`) with the COCO pipeline at small scale.

    ``num_classes`` is the detector's output count: shape classes 1..num_classes−1 (id 0 unused, as in
    COCO). ``root`` null: generated once into ``$KDRUN_CACHE/coco_synthetic/<parameters>`` (written to a
    temporary folder and renamed, so concurrent runs never see half a data set)."""
    params = dict(num_train=train_size, num_val=val_size, image_size=image_size, num_classes=num_classes - 1,
                  max_objects=max_objects, seed=seed, val_equals_train=val_equals_train)
    if root is None:
        cache = Path(os.environ.get("KDRUN_CACHE", Path.home() / ".cache" / "kdrun"))
        key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        path = cache / "coco_synthetic" / key
        if not (path / "annotations" / "instances_val2017.json").is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{key}-"))
            make_synthetic_coco(tmp, **params)
            try:
                os.rename(tmp, path)
            except OSError:  # another process won the race: use its copy
                shutil.rmtree(tmp, ignore_errors=True)
        root = str(path)
    elif not (Path(root) / "annotations" / "instances_val2017.json").is_file():
        make_synthetic_coco(root, **params)
    return build(root, num_classes=num_classes, augment=augment, scales=scales, max_size=max_size,
                 crop_scales=crop_scales, crop_size=crop_size, eval_size=eval_size)

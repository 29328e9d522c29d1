"""Finite-view augmentation: the CIFAR protocol's random crop + flip, drawn exactly as torchvision draws it,
applied deterministically, and reported as a view id.

The CIFAR KD protocol (:mod:`kdrun.data.cifar100`) trains with ``RandomCrop(S, padding=p)`` followed by
``RandomHorizontalFlip()``. That augmentation has a *finite* set of outcomes: a crop offset ``(i, j)`` in
``[0, H + 2p - S] × [0, W + 2p - S]`` and a flip bit, i.e. ``(2p + 1)² · 2 = 162`` views of a 32×32 image
with ``p = 4``. The teacher-output cache (:mod:`kdrun.teacher_cache`) stores the frozen teacher's output
for every (image, view) once; for the cached output to be the one the live teacher would have produced,
the loader must say which view it drew. This module provides:

* :class:`CropFlipViews` — the view geometry: ``num_views``, ``encode``/``decode`` between
  ``(i, j, flip)`` and the id, :meth:`~CropFlipViews.draw` (the random draw) and
  :meth:`~CropFlipViews.apply` (the deterministic crop/flip of view ``v``);
* :class:`FiniteViewPipeline` — a torchvision ``Compose`` split into deterministic steps before the crop,
  the crop + flip, and deterministic steps after it; ``pipeline(img) -> (x, view)`` and
  ``pipeline.render(img, view) -> x``. Pipelines with any other random step (random-resized crop, colour
  jitter, RandAugment, random erasing, ...) are refused with :class:`ContinuousAugmentationError`;
* :class:`ViewDataset` — ``(x, y, index, view)`` samples from a torchvision-style data set (one with a
  ``transform`` attribute applied to a raw image), plus ``render(index, view)`` and
  ``render_views(index)`` (every view of one image at once, :meth:`FiniteViewPipeline.render_all`) for
  the cache fill.

**Same random numbers, same images.** :meth:`CropFlipViews.draw` makes torchvision's calls in
torchvision's order (torchvision 0.29 ``transforms.py``: ``RandomCrop.forward`` pads, then
``RandomCrop.get_params`` draws ``torch.randint(0, h - th + 1, size=(1,))`` then
``torch.randint(0, w - tw + 1, size=(1,))`` — no draw at all when the padded image already has the crop
size — and ``RandomHorizontalFlip.forward`` draws ``torch.rand(1) < p``), and :meth:`apply` calls the
same ``torchvision.transforms.functional`` ops (``pad``, ``crop``, ``hflip``) with the same arguments.
So for the same torch RNG state (per DataLoader worker: the same seed) the images are bit-identical to
the plain ``Compose`` and the global RNG ends in the same state (``tests/data/test_views.py``).

View id layout: ``v = (i · cols + j) · 2 + flip`` with ``cols = W + pad_left + pad_right - S_w + 1``.

**All views at once, bit-exact.** The cache fill needs every view of every image; rendering them one by
one repeats the PIL conversion, pad, ``ToTensor`` and ``Normalize`` 162 times per CIFAR image.
:meth:`FiniteViewPipeline.render_all` runs ``pre`` once, pads once (the same ``F.pad`` call as
:meth:`CropFlipViews.apply`), runs ``post`` once on the *padded* image and then takes every crop and its
flip by indexing. That equals cropping first and running ``post`` on each crop only when every ``post``
step is **pixel-wise** — an output pixel depends only on the same input pixel, through the same float
ops whatever the image size — so that crop/flip commute with it. :data:`PIXELWISE` lists the steps
for which that holds by their code (torchvision 0.29 ``transforms/functional.py``: ``to_tensor``
L127-L178 is a copy, a permute and an elementwise ``.div(255)``; ``pil_to_tensor`` L181-L213 a copy;
``_functional_tensor.py`` ``convert_image_dtype`` L66-L115 an elementwise cast/scale; ``normalize``
L905-L928 an elementwise ``sub_(mean).div_(std)`` with per-channel constants): IEEE division and
subtraction are correctly rounded, so SIMD and scalar loops, on a crop or on the padded image, give the
same bits. Resize, CenterCrop, Pad, Grayscale (or a subclass of a pixel-wise step, which may override
it) after the crop are not pixel-wise or not proven so: for those :attr:`FiniteViewPipeline.renders_all_fast`
is false and :meth:`~FiniteViewPipeline.render_all` stacks the per-view :meth:`~FiniteViewPipeline.render`
calls instead (exact, slow). ``tests/data/test_views.py`` checks the fast path against ``render`` bit for
bit on every view.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as F

from kdrun.config import ConfigError

# Transforms that draw no random numbers and whose output depends only on their input, so they may
# run before or after the crop + flip (the CIFAR protocol uses Resize before and ToTensor/Normalize after).
DETERMINISTIC = (T.ToTensor, T.PILToTensor, T.ConvertImageDtype, T.Normalize, T.Resize, T.CenterCrop,
                 T.Pad, T.Grayscale)
# Post-crop steps that are pixel-wise (module doc: crop/flip commute with them, bit for bit). Matched by
# exact type: a subclass may override forward.
PIXELWISE = (T.ToTensor, T.PILToTensor, T.ConvertImageDtype, T.Normalize)
# torch dtypes with a numpy twin (``Tensor.numpy()`` works): copied with numpy, single-threaded (apply_all)
NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.uint8, torch.int8, torch.int16, torch.int32,
                 torch.int64, torch.bool)


class ContinuousAugmentationError(ConfigError):
    """A transform pipeline whose outcomes are not a finite set of views (teacher caching is impossible).
    A :class:`~kdrun.config.ConfigError`: the CLI shows the message, exit status 2."""


def _padding_ltrb(padding: int | Sequence[int] | None) -> tuple[int, int, int, int]:
    """torchvision's padding argument as (left, top, right, bottom) (``F.pad``'s documented forms)."""
    if padding is None:
        return (0, 0, 0, 0)
    if isinstance(padding, int):
        return (padding,) * 4  # type: ignore[return-value]
    p = [int(v) for v in padding]
    if len(p) == 1:
        return (p[0],) * 4  # type: ignore[return-value]
    if len(p) == 2:  # left/right, top/bottom
        return (p[0], p[1], p[0], p[1])
    if len(p) == 4:
        return (p[0], p[1], p[2], p[3])
    raise ValueError(f"padding must be an int or a sequence of 1, 2 or 4 ints, got {padding!r}")


@dataclass(frozen=True)
class CropFlipViews:
    """The views of ``RandomCrop(crop, padding, fill, padding_mode)`` + ``RandomHorizontalFlip(flip_p)``
    on images of ``height × width`` (the size entering the crop)."""

    height: int
    width: int
    crop_h: int
    crop_w: int
    padding: Any = None          # torchvision's argument as given (passed to F.pad unchanged)
    fill: Any = 0
    padding_mode: str = "constant"
    flip_p: float = 0.5

    @classmethod
    def from_transforms(cls, crop: T.RandomCrop, flip: T.RandomHorizontalFlip, height: int,
                        width: int) -> "CropFlipViews":
        if crop.pad_if_needed:
            raise ContinuousAugmentationError(
                "RandomCrop(pad_if_needed=True) is not supported by the finite-view pipeline (its padding "
                "depends on the image size); pad explicitly with padding=... instead.")
        th, tw = (int(crop.size[0]), int(crop.size[1]))
        return cls(height, width, th, tw, crop.padding, crop.fill, crop.padding_mode, float(flip.p))

    @property
    def padded(self) -> tuple[int, int]:
        left, top, right, bottom = _padding_ltrb(self.padding)
        return self.height + top + bottom, self.width + left + right

    @property
    def rows(self) -> int:
        return self.padded[0] - self.crop_h + 1

    @property
    def cols(self) -> int:
        return self.padded[1] - self.crop_w + 1

    @property
    def num_views(self) -> int:
        return self.rows * self.cols * 2

    def __post_init__(self) -> None:
        ph, pw = self.padded
        if ph < self.crop_h or pw < self.crop_w:
            raise ValueError(f"crop {(self.crop_h, self.crop_w)} is larger than the padded image {(ph, pw)}")

    def encode(self, i: int, j: int, flip: int) -> int:
        return (i * self.cols + j) * 2 + int(flip)

    def decode(self, view: int) -> tuple[int, int, int]:
        if not 0 <= view < self.num_views:
            raise IndexError(f"view {view} out of range [0, {self.num_views})")
        pos, flip = divmod(int(view), 2)
        i, j = divmod(pos, self.cols)
        return i, j, flip

    def draw(self) -> int:
        """A random view id, from torchvision's random calls in torchvision's order (module doc)."""
        ph, pw = self.padded
        if ph == self.crop_h and pw == self.crop_w:
            i = j = 0  # RandomCrop.get_params returns without drawing
        else:
            i = int(torch.randint(0, ph - self.crop_h + 1, size=(1,)).item())
            j = int(torch.randint(0, pw - self.crop_w + 1, size=(1,)).item())
        flip = int(bool(torch.rand(1) < self.flip_p))
        return self.encode(i, j, flip)

    def _check_size(self, img: Any) -> None:
        _, h, w = F.get_dimensions(img)
        if (h, w) != (self.height, self.width):
            raise ValueError(f"image of size {(h, w)} entering the crop, but the view set was built for "
                             f"{(self.height, self.width)}: view ids would not name the same views")

    def apply(self, img: Any, view: int) -> Any:
        """View ``view`` of ``img`` (PIL or tensor), with RandomCrop/RandomHorizontalFlip's own ops."""
        i, j, flip = self.decode(view)
        self._check_size(img)
        if self.padding is not None:
            img = F.pad(img, self.padding, self.fill, self.padding_mode)
        img = F.crop(img, i, j, self.crop_h, self.crop_w)
        return F.hflip(img) if flip else img

    def apply_all(self, img: Any, post: Callable[[Any], Any]) -> Tensor:
        """Every view of ``img`` (PIL or tensor) as one tensor ``[num_views, ..., crop_h, crop_w]`` in view-id
        order, ``post`` (pixel-wise: module doc) applied once to the padded image before the crops."""
        self._check_size(img)
        if self.padding is not None:
            img = F.pad(img, self.padding, self.fill, self.padding_mode)  # apply()'s call
        elif isinstance(img, Tensor):
            img = img.clone()  # an in-place post step (Normalize(inplace=True)) must not write into the data
        t = post(img)
        if not isinstance(t, Tensor):
            raise TypeError(f"the steps after the crop produce {type(t).__name__}, not a tensor: end the "
                            "training transform with ToTensor (or PILToTensor) to render all views at once.")
        if tuple(t.shape[-2:]) != self.padded:
            raise ValueError(f"the steps after the crop changed the image size {self.padded} to "
                             f"{tuple(t.shape[-2:])}: they are not pixel-wise")
        d = t.ndim
        if t.device.type == "cpu" and t.dtype in NUMPY_DTYPES:
            # numpy copies on one thread: torch's parallel copy of these ~0.5M-element strided views waits
            # on OpenMP when the cores are busy (24 ms against numpy's 0.2 ms per CIFAR image, 2-core VM)
            a = t.numpy()
            win = np.moveaxis(sliding_window_view(a, (self.crop_h, self.crop_w), axis=(d - 2, d - 1)),
                              (d - 2, d - 1), (0, 1))  # [rows, cols, ..., crop_h, crop_w], no copy
            out_np = np.empty((self.rows, self.cols, 2, *win.shape[2:]), dtype=a.dtype)
            out_np[:, :, 0], out_np[:, :, 1] = win, win[..., ::-1]  # [rows, cols, flip]: view id order
            return torch.from_numpy(out_np).reshape(self.num_views, *win.shape[2:])
        # [..., rows, cols, crop_h, crop_w] windows (views, no copy), then rows/cols to the front
        win_t = t.unfold(d - 2, self.crop_h, 1).unfold(d - 1, self.crop_w, 1).movedim((d - 2, d - 1), (0, 1))
        out = torch.stack([win_t, win_t.flip(-1)], dim=2)  # one fresh contiguous copy, view id order
        return out.reshape(self.num_views, *out.shape[3:])

    def describe(self) -> dict[str, Any]:
        return {"kind": "crop_flip", "input": [self.height, self.width], "crop": [self.crop_h, self.crop_w],
                "padding": list(_padding_ltrb(self.padding)), "fill": repr(self.fill),
                "padding_mode": self.padding_mode, "flip_p": self.flip_p, "num_views": self.num_views}


def _steps(transform: Any) -> list[Any]:
    if transform is None:
        return []
    if isinstance(transform, T.Compose):
        return [s for t in transform.transforms for s in _steps(t)]
    return [transform]


class FiniteViewPipeline:
    """A transform pipeline as ``pre`` (deterministic) → crop + flip → ``post`` (deterministic).

    ``example`` is one raw image of the data set: the crop's input size is ``pre(example)``'s. A pipeline
    without crop and flip has one view (id 0)."""

    def __init__(self, transform: Any, example: Any) -> None:
        steps = _steps(transform)
        self.description = [repr(s) for s in steps]
        crop_at = [k for k, s in enumerate(steps) if isinstance(s, T.RandomCrop)]
        flip_at = [k for k, s in enumerate(steps) if isinstance(s, T.RandomHorizontalFlip)]
        other = [s for s in steps if not isinstance(s, (T.RandomCrop, T.RandomHorizontalFlip, *DETERMINISTIC))]
        if other:
            raise ContinuousAugmentationError(
                f"the training transform contains {', '.join(type(s).__name__ for s in other)}, which is "
                "continuous or not known to be deterministic: the teacher cache needs a finite set of views "
                "(RandomCrop followed by RandomHorizontalFlip, with only "
                f"{', '.join(t.__name__ for t in DETERMINISTIC)} around them). Use teacher.cache=null "
                "(the live teacher) for this pipeline.")
        if not crop_at and not flip_at:
            self.pre, self.post, self.views = steps, [], None
        elif len(crop_at) == 1 and len(flip_at) == 1 and flip_at[0] == crop_at[0] + 1:
            k = crop_at[0]
            self.pre, self.post = steps[:k], steps[k + 2:]
            _, h, w = F.get_dimensions(self._run(self.pre, example))
            self.views = CropFlipViews.from_transforms(steps[k], steps[k + 1], h, w)
        else:
            raise ContinuousAugmentationError(
                "the finite-view pipeline supports exactly one RandomCrop immediately followed by one "
                f"RandomHorizontalFlip (the CIFAR protocol); got {self.description}.")

    @staticmethod
    def _run(steps: list[Any], img: Any) -> Any:
        for s in steps:
            img = s(img)
        return img

    @property
    def num_views(self) -> int:
        return self.views.num_views if self.views is not None else 1

    def __call__(self, img: Any) -> tuple[Any, int]:
        """``(x, view)``: the same random calls and the same image as the original ``Compose``."""
        img = self._run(self.pre, img)
        view = self.views.draw() if self.views is not None else 0
        return self.render_pre(img, view), view

    def render_pre(self, pre_img: Any, view: int) -> Any:
        if self.views is not None:
            pre_img = self.views.apply(pre_img, view)
        elif view != 0:
            raise IndexError(f"view {view} out of range [0, 1)")
        return self._run(self.post, pre_img)

    def render(self, img: Any, view: int) -> Any:
        """View ``view`` of a raw image, deterministically (no random numbers drawn)."""
        return self.render_pre(self._run(self.pre, img), view)

    @property
    def renders_all_fast(self) -> bool:
        """Whether :meth:`render_all` takes the fast path (pre, pad and post once per image): every step
        after the crop is pixel-wise (:data:`PIXELWISE`, module doc), or there is no crop/flip (1 view)."""
        return self.views is None or all(type(s) in PIXELWISE for s in self.post)

    def render_all(self, img: Any) -> Tensor:
        """Every view of a raw image as one tensor ``[num_views, C, H, W]`` (row ``v`` = view id ``v``), bit
        for bit ``torch.stack([render(img, v) for v in range(num_views)])``; fast when
        :attr:`renders_all_fast`, else exactly that stack (module doc)."""
        if self.views is None:
            return torch.stack([self.render(img, 0)])
        if not self.renders_all_fast:
            return torch.stack([self.render(img, v) for v in range(self.num_views)])
        return self.views.apply_all(self._run(self.pre, img), lambda x: self._run(self.post, x))

    def describe(self) -> dict[str, Any]:
        """What the cache key records about the transform (every step's repr and the view geometry)."""
        return {"steps": self.description,
                "views": self.views.describe() if self.views is not None else {"kind": "none", "num_views": 1}}


class ViewDataset(Dataset):
    """``(x, y, index, view)`` from a torchvision-style data set ``base`` (``base[i]`` applies
    ``base.transform`` to a raw image). ``base`` itself is not modified: a shallow copy without the
    transform yields the raw images."""

    def __init__(self, base: Dataset, transform: Any = None) -> None:
        if not hasattr(base, "transform"):
            raise ContinuousAugmentationError(
                f"{type(base).__name__} has no `transform` attribute: the finite-view pipeline needs a "
                "torchvision-style data set that applies its transform to a raw image.")
        self.base = base
        self.raw = copy.copy(base)
        self.raw.transform = None  # type: ignore[attr-defined]
        tf = transform if transform is not None else base.transform  # type: ignore[attr-defined]
        self.pipeline = FiniteViewPipeline(tf, self.raw[0][0]) if len(self) else None

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    @property
    def num_views(self) -> int:
        return self.pipeline.num_views if self.pipeline is not None else 1

    def __getitem__(self, index: int) -> tuple[Any, Any, int, int]:
        img, y = self.raw[index][:2]
        x, view = self.pipeline(img)  # type: ignore[misc]
        return x, y, index, view

    def render(self, index: int, view: int) -> Any:
        """View ``view`` of image ``index`` (the cache fill)."""
        return self.pipeline.render(self.raw[index][0], view)  # type: ignore[union-attr]

    @property
    def renders_all_fast(self) -> bool:
        """Whether :meth:`render_views` is the fast path (:attr:`FiniteViewPipeline.renders_all_fast`)."""
        return self.pipeline is not None and self.pipeline.renders_all_fast

    def render_views(self, index: int) -> Tensor:
        """Every view of image ``index``, ``[num_views, C, H, W]`` in view-id order (the cache fill):
        :meth:`FiniteViewPipeline.render_all`, bit-identical to ``render(index, v)`` for every ``v``."""
        return self.pipeline.render_all(self.raw[index][0])  # type: ignore[union-attr]

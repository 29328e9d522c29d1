"""Finite-view augmentation: same random calls and bit-identical images as torchvision's pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets import CIFAR100

from kdrun.data.cifar100 import transforms as cifar_transforms
from kdrun.data.views import ContinuousAugmentationError, CropFlipViews, FiniteViewPipeline, ViewDataset


def fake_cifar(n: int, size: int = 32, transform=None, seed: int = 0) -> CIFAR100:
    """A torchvision CIFAR100 object over random uint8 images (no files: __init__ is bypassed, and
    __getitem__ reads only data/targets/transform/target_transform)."""
    ds = CIFAR100.__new__(CIFAR100)
    rng = np.random.default_rng(seed)
    ds.data = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    ds.targets = [int(v) for v in rng.integers(0, 100, n)]
    ds.transform, ds.target_transform = transform, None
    return ds


@pytest.mark.parametrize("image_size", [32, 40])
def test_bit_identical_to_the_cifar_pipeline_and_same_rng_state(image_size: int) -> None:
    train_tf, _ = cifar_transforms(image_size, augment=True)
    plain = fake_cifar(24, transform=train_tf)
    views = ViewDataset(plain)
    assert views.num_views == (2 * max(1, image_size // 8) + 1) ** 2 * 2
    torch.manual_seed(123)
    ref = [plain[i] for i in range(24)]
    after_ref = torch.rand(1)
    torch.manual_seed(123)
    got = [views[i] for i in range(24)]
    after_got = torch.rand(1)
    assert torch.equal(after_ref, after_got)  # the same number of draws, so later code is unaffected
    drawn = set()
    for i, ((x0, y0), (x1, y1, idx, v)) in enumerate(zip(ref, got)):
        assert torch.equal(x0, x1) and y0 == y1 and idx == i
        assert torch.equal(views.render(i, v), x1)  # rendering the reported view reproduces the image
        drawn.add(v)
    assert len(drawn) > 12  # several distinct views were drawn (the ids are not constant)


def test_162_views_are_exactly_the_distinct_outcomes() -> None:
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    pipe = FiniteViewPipeline(tf, img)
    assert pipe.num_views == 162
    rendered = {pipe.render(img, v).tobytes() for v in range(162)}
    assert len(rendered) == 162  # a random image: every view differs
    # Brute force over torchvision's own ops: (i, j, flip) -> id is a bijection onto 0..161.
    ids = set()
    for i in range(9):
        for j in range(9):
            for f in range(2):
                ref = T.functional.crop(T.functional.pad(img, 4), i, j, 32, 32)
                ref = T.functional.hflip(ref) if f else ref
                v = pipe.views.encode(i, j, f)
                assert pipe.views.decode(v) == (i, j, f)
                assert pipe.render(img, v).tobytes() == ref.tobytes()
                ids.add(v)
    assert ids == set(range(162))
    with pytest.raises(IndexError):
        pipe.render(img, 162)


def test_generic_geometry_tensor_images_and_no_draw_when_no_room() -> None:
    # Tensor input, non-square, padding (l, t, r, b), crop smaller than the image.
    v = CropFlipViews(height=6, width=8, crop_h=5, crop_w=6, padding=(1, 0, 2, 1))
    assert (v.rows, v.cols, v.num_views) == (6 - 5 + 1 + 1, 8 + 3 - 6 + 1, 2 * 3 * 6)
    x = torch.randn(3, 6, 8)
    crop, flip = T.RandomCrop((5, 6), padding=(1, 0, 2, 1)), T.RandomHorizontalFlip()
    pipe = FiniteViewPipeline(T.Compose([crop, flip]), x)
    torch.manual_seed(5)
    ref = [flip(crop(x)) for _ in range(30)]
    torch.manual_seed(5)
    for r in ref:
        y, view = pipe(x)
        assert torch.equal(y, r) and torch.equal(pipe.render(x, view), r)
    # padding 0, crop == size: RandomCrop draws nothing, only the flip draws.
    flat = FiniteViewPipeline(T.Compose([T.RandomCrop(8), T.RandomHorizontalFlip()]), torch.randn(1, 8, 8))
    assert flat.num_views == 2
    torch.manual_seed(0)
    flat(torch.randn(1, 8, 8))
    a = torch.rand(1)
    torch.manual_seed(0)
    torch.randn(1, 8, 8), torch.rand(1)
    assert torch.equal(a, torch.rand(1))


def test_no_augmentation_is_one_view() -> None:
    _, val_tf = cifar_transforms(32, augment=True)
    ds = ViewDataset(fake_cifar(3, transform=val_tf))
    assert ds.num_views == 1
    x, _, _, v = ds[2]
    assert v == 0 and torch.equal(ds.render(2, 0), x)


@pytest.mark.parametrize("tf", [
    T.Compose([T.RandomResizedCrop(32), T.ToTensor()]),
    T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ColorJitter(0.4), T.ToTensor()]),
    T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(32, padding=4)]),  # other draw order
    T.Compose([T.RandomCrop(32, padding=4, pad_if_needed=True), T.RandomHorizontalFlip()]),
    T.Compose([T.ToTensor(), T.RandomErasing()]),
])
def test_continuous_or_unknown_augmentation_is_refused(tf) -> None:
    with pytest.raises(ContinuousAugmentationError, match="RandomCrop|continuous|pad_if_needed"):
        ViewDataset(fake_cifar(2, transform=tf))


def test_wrong_image_size_is_an_error() -> None:
    pipe = FiniteViewPipeline(T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]),
                              torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="built for"):
        pipe(torch.zeros(3, 30, 30))

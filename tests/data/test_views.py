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


# -- every view at once (the cache fill's fast path) ------------------------------------------------------


def assert_all_views_bitwise(pipe: FiniteViewPipeline, img) -> torch.Tensor:
    """``render_all(img)`` against the per-view ``render(img, v)`` (the reference), bit for bit (the int
    views tell -0.0 from 0.0, which torch.equal does not)."""
    got = pipe.render_all(img)
    assert got.shape[0] == pipe.num_views and got.is_contiguous()
    for v in range(pipe.num_views):
        ref = pipe.render(img, v)
        assert got[v].dtype == ref.dtype and got[v].shape == ref.shape, v
        bits = torch.int16 if ref.element_size() == 2 else torch.int32 if ref.element_size() == 4 else None
        a, b = (got[v].view(bits), ref.view(bits)) if bits is not None and ref.is_floating_point() else (got[v], ref)
        assert torch.equal(a, b), f"view {v} = {pipe.views.decode(v) if pipe.views else 0} differs"
    return got


def rgb(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("image_size, views", [(32, 162), (40, 242)])  # pad 4 / Resize(40) + pad 5
def test_render_all_equals_every_view_on_the_cifar_transform(image_size: int, views: int) -> None:
    train_tf, _ = cifar_transforms(image_size, augment=True)
    ds = ViewDataset(fake_cifar(3, transform=train_tf))
    assert ds.num_views == views and ds.renders_all_fast
    for i in range(3):
        got = assert_all_views_bitwise(ds.pipeline, ds.raw[i][0])
        assert torch.equal(ds.render_views(i), got)
    assert len({got[v].numpy().tobytes() for v in range(views)}) == views  # a random image: all views differ


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("padding, fill, padding_mode", [
    ((1, 2, 3, 0), 0, "constant"),        # asymmetric (left, top, right, bottom)
    ((2, 1), 0, "constant"),              # (left/right, top/bottom)
    (3, 77, "constant"),                  # a non-zero fill
    ((2, 3, 1, 2), 0, "reflect"),
    (2, 0, "edge"),
    ((1, 2, 2, 1), 0, "symmetric"),
    (None, 0, "constant"),                # crop without padding
])
def test_render_all_non_square_padding_fill_and_modes(mode: str, padding, fill, padding_mode: str) -> None:
    fill = (10, 200, 30) if (mode == "RGB" and fill) else fill
    crop = T.RandomCrop((17, 20), padding=padding, fill=fill, padding_mode=padding_mode)
    c = 1 if mode == "L" else 3
    tail = [T.ToTensor(), T.Normalize((0.3, 0.5, 0.7)[:c], (0.2, 0.3, 0.4)[:c])]
    img = rgb(19, 23, seed=3, mode=mode)
    pipe = FiniteViewPipeline(T.Compose([crop, T.RandomHorizontalFlip()] + tail), img)
    assert pipe.renders_all_fast and pipe.num_views > 2
    got = assert_all_views_bitwise(pipe, img)
    assert got.shape[1:] == (1 if mode == "L" else 3, 17, 20)


def test_render_all_tensor_images_and_integer_and_bfloat16_outputs() -> None:
    img = rgb(12, 10, seed=5)
    # pre = PILToTensor (the crop sees a uint8 tensor), post = a cast and Normalize; reflect needs float input
    # in torchvision's tensor pad, so edge padding here
    tf = T.Compose([T.PILToTensor(), T.RandomCrop((9, 8), padding=(1, 2), padding_mode="edge"),
                    T.RandomHorizontalFlip(), T.ConvertImageDtype(torch.float32), T.Normalize((0.5,) * 3, (0.25,) * 3)])
    assert_all_views_bitwise(FiniteViewPipeline(tf, img), img)
    # uint8 out (no float step at all) and bfloat16 out (no numpy twin: torch's copy path)
    for tail in ([T.PILToTensor()], [T.PILToTensor(), T.ConvertImageDtype(torch.bfloat16)]):
        pipe = FiniteViewPipeline(T.Compose([T.RandomCrop(9, padding=2, fill=9), T.RandomHorizontalFlip(), *tail]), img)
        assert pipe.renders_all_fast
        assert_all_views_bitwise(pipe, img)
    # a raw tensor image, no padding, in-place Normalize: the data are not written into
    x = torch.rand(2, 7, 9)
    before = x.clone()
    pipe = FiniteViewPipeline(T.Compose([T.RandomCrop((5, 9)), T.RandomHorizontalFlip(),
                                         T.Normalize((0.5, 0.5), (0.1, 0.2), inplace=True)]), x)
    got = pipe.render_all(x)
    assert torch.equal(x, before) and pipe.num_views == 3 * 1 * 2
    assert torch.equal(got[2], (x[:, 1:6] - 0.5) / torch.tensor([0.1, 0.2]).view(2, 1, 1))  # view (1, 0, no flip)


def test_render_all_without_crop_is_one_view() -> None:
    _, val_tf = cifar_transforms(32, augment=True)
    ds = ViewDataset(fake_cifar(2, transform=val_tf))
    assert ds.renders_all_fast
    got = ds.render_views(1)
    assert got.shape == (1, 3, 32, 32) and torch.equal(got[0], ds.render(1, 0))


class MyNormalize(T.Normalize):  # a subclass may override forward: not known to be pixel-wise
    pass


@pytest.mark.parametrize("post", [
    [T.Resize(12), T.ToTensor()],
    [T.ToTensor(), T.CenterCrop(14)],
    [T.Pad(1), T.ToTensor()],
    [T.Grayscale(), T.ToTensor()],
    [T.ToTensor(), MyNormalize((0.5,) * 3, (0.2,) * 3)],
])
def test_a_step_that_is_not_pixel_wise_takes_the_per_view_path(post) -> None:
    img = rgb(16, 16, seed=2)
    pipe = FiniteViewPipeline(T.Compose([T.RandomCrop(16, padding=2), T.RandomHorizontalFlip(), *post]), img)
    assert not pipe.renders_all_fast
    assert_all_views_bitwise(pipe, img)  # still exact: the stack of per-view renders


def test_render_all_refuses_a_non_tensor_result_and_a_wrong_size() -> None:
    img = rgb(8, 8)
    pipe = FiniteViewPipeline(T.Compose([T.RandomCrop(8, padding=1), T.RandomHorizontalFlip()]), img)
    with pytest.raises(TypeError, match="ToTensor"):
        pipe.render_all(img)
    pipe = FiniteViewPipeline(T.Compose([T.RandomCrop(8, padding=1), T.RandomHorizontalFlip(), T.ToTensor()]), img)
    with pytest.raises(ValueError, match="built for"):
        pipe.render_all(rgb(9, 8))

"""ImageNet builder on a tiny ImageFolder tree written with PIL (3 classes × 4 images of 64×64)."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import Mixup
from torchvision import transforms as T

from kdrun.data import imagenet
from kdrun.data.base import DatasetError

CLASSES = ("n01440764", "n01443537", "n01484850")
PER_CLASS = 4


def make_tree(root, classes=CLASSES, per_class=PER_CLASS, splits=("train", "val")) -> str:
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
                # Mixed formats and a non-square image: ImageFolder must take them all.
                if i == 1:
                    img.save(os.path.join(d, f"{c}_{i}.png"))
                elif i == 2:
                    img.resize((80, 64)).save(os.path.join(d, f"{c}_{i}.JPEG"), quality=90)
                else:
                    img.save(os.path.join(d, f"{c}_{i}.JPEG"), quality=90)
    return str(root)


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "imagenet")


def small(root: str, **kw) -> object:
    return imagenet.build(root, image_size=32, num_classes=len(CLASSES), **kw)


def test_shapes_labels_and_settings(tree):
    dm = small(tree)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (3, 3, 32)
    assert (len(dm.train), len(dm.val)) == (12, 12)
    for ds in (dm.train, dm.val):
        labels = set()
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32
            labels.add(y)
        assert labels == {0, 1, 2}
    assert dm.train.classes == dm.val.classes == list(CLASSES)
    assert dm.repeated_augmentation == 3


def test_eval_transform_is_resize_then_center_crop(tree):
    dm = small(tree, crop_pct=0.875)
    steps = dm.val.transform.transforms
    resize = next(t for t in steps if isinstance(t, T.Resize))
    crop = next(t for t in steps if isinstance(t, T.CenterCrop))
    assert resize.size in (36, [36], (36, 36)) and int(32 / 0.875) == 36
    assert resize.interpolation == T.InterpolationMode.BICUBIC
    assert tuple(crop.size) == (32, 32)
    assert steps.index(resize) < steps.index(crop)
    assert torch.equal(dm.val[2][0], dm.val[2][0])  # deterministic


def test_train_transform_is_deit_style_and_random(tree):
    dm = small(tree)
    names = " ".join(type(t).__name__ for t in dm.train.transform.transforms)
    for part in ("RandomResizedCrop", "RandomHorizontalFlip", "RandAugment", "RandomErasing"):
        assert part in names, names
    erase = next(t for t in dm.train.transform.transforms if type(t).__name__ == "RandomErasing")
    assert erase.probability == 0.25 and erase.mode == "pixel"
    torch.manual_seed(0)
    draws = [dm.train[0][0] for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    # augment=false: training images get the deterministic eval transform.
    plain = small(tree, augment=False)
    assert torch.equal(plain.train[0][0], plain.train[0][0])
    assert plain.train.transform is plain.val.transform


def test_mixup_gives_soft_targets(tree):
    dm = small(tree)
    assert isinstance(dm.mixup, Mixup)
    assert dm.mixup.label_smoothing == 0.1 and dm.mixup.mixup_alpha == 0.8 and dm.mixup.cutmix_alpha == 1.0
    torch.manual_seed(0)
    np.random.seed(0)  # timm draws lambda with numpy
    xs, ys = zip(*(dm.train[i] for i in (0, 4, 8, 5)))
    x, y = torch.stack(xs), torch.tensor(ys)
    x_mixed, y_soft = dm.mixup(x.clone(), y)
    assert x_mixed.shape == x.shape
    assert y_soft.shape == (4, 3)
    assert torch.allclose(y_soft.sum(1), torch.ones(4))
    assert (y_soft > 0).all()  # smoothing leaves no zero
    assert not torch.equal(x_mixed, x)  # prob=1.0: the batch is always mixed


def test_no_mixup_still_smooths_labels(tree):
    dm = small(tree, mixup=0.0, cutmix=0.0, label_smoothing=0.3)
    assert dm.mixup is not None and not isinstance(dm.mixup, Mixup)
    x = torch.randn(3, 3, 32, 32)
    x2, y = dm.mixup(x, torch.tensor([0, 2, 1]))
    assert x2 is x
    expected = torch.full((3, 3), 0.1)
    expected[0, 0] = expected[1, 2] = expected[2, 1] = 0.8
    assert torch.allclose(y, expected)
    assert small(tree, mixup=0.0, cutmix=0.0, label_smoothing=0.0).mixup is None


def _missing_root(root):
    return os.path.join(root, "does-not-exist")


def _no_train(root):
    shutil.rmtree(os.path.join(root, "train"))
    return root


def _no_val(root):
    shutil.rmtree(os.path.join(root, "val"))
    return root


def _empty_class(root):
    d = os.path.join(root, "train", CLASSES[1])
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    open(os.path.join(d, "README.txt"), "w").close()  # not an image either
    return root


def _class_mismatch(root):
    os.rename(os.path.join(root, "val", CLASSES[2]), os.path.join(root, "val", "n99999999"))
    return root


def _no_classes(root):
    for split in ("train", "val"):
        shutil.rmtree(os.path.join(root, split))
        os.makedirs(os.path.join(root, split))
    return root


def _flat_val(root):
    # The official val tarball: images directly in val/, no class folders.
    val = os.path.join(root, "val")
    for c in CLASSES:
        for f in os.listdir(os.path.join(val, c)):
            os.rename(os.path.join(val, c, f), os.path.join(val, f))
        os.rmdir(os.path.join(val, c))
    return root


@pytest.mark.parametrize("breaker, needle", [
    (_missing_root, "does not exist"),
    (_no_train, "train/ directory is missing"),
    (_no_val, "val/ directory is missing"),
    (_empty_class, f"train/ has class folders without any image file: {CLASSES[1]}."),
    (_class_mismatch, "n99999999"),
    (_no_classes, "no class folders"),
    (_flat_val, "val/ has no class folders"),
])
def test_malformed_layouts_show_expected_tree(tree, breaker, needle):
    root = breaker(tree)
    with pytest.raises(DatasetError) as ei:
        small(root)
    msg = str(ei.value)
    assert needle in msg
    assert repr(root) in msg
    assert f"{root}/\n" in msg and "train/\n" in msg and "val/\n" in msg and ".JPEG" in msg


def test_class_count_must_match_num_classes(tree):
    with pytest.raises(DatasetError) as ei:
        imagenet.build(tree, image_size=32, num_classes=1000)
    msg = str(ei.value)
    assert "3 class folders" in msg and "num_classes=1000" in msg and "train/\n" in msg


def test_in_chans_must_be_rgb(tree):
    with pytest.raises(DatasetError, match="in_chans"):
        small(tree, in_chans=1)


# ---------------------------------------------------------------------------------------------------
# dataset=imagenet_3aug: DeiT III's 3-Augment as VkD trains with it (roymiles/vkd augment.py aug_generator).


def small3(root: str, **kw) -> object:
    return imagenet.build_three_augment(root, image_size=32, num_classes=len(CLASSES), **kw)


def test_three_augment_pipeline_is_vkds(tree):
    dm = small3(tree)
    steps = dm.train.transform.transforms
    names = [type(t).__name__ for t in steps]
    assert names == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandomChoice", "ColorJitter",
                     "ToTensor", "Normalize"]
    crop, flip, choice, jitter, _, norm = steps
    assert crop.scale == (0.08, 1.0) and crop.ratio == (3 / 4, 4 / 3) and crop.size == (32, 32)
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    assert flip.p == 0.5
    gray, sol, blur = choice.transforms
    assert isinstance(gray, T.Grayscale) and gray.num_output_channels == 3
    assert isinstance(sol, T.RandomSolarize) and sol.threshold == 128 and sol.p == 1.0
    assert isinstance(blur, imagenet.RandomGaussianBlurPIL) and blur.radius == (0.1, 2.0)
    assert choice.p is None  # uniform over the three (torchvision's RandomChoice, as DeiT's)
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.7, 1.3) and jitter.hue is None
    assert tuple(norm.mean) == (0.485, 0.456, 0.406) and tuple(norm.std) == (0.229, 0.224, 0.225)
    assert dm.repeated_augmentation == 0
    assert isinstance(dm.mixup, Mixup) and dm.mixup.label_smoothing == 0.1
    assert dm.mixup.mixup_alpha == 0.8 and dm.mixup.cutmix_alpha == 1.0
    # The evaluation transform is DeiT's (the same as dataset=imagenet).
    assert repr(dm.val.transform) == repr(small(tree).val.transform)
    x, y = dm.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    # color_jitter=0 drops the jitter; simple_random_crop is DeiT III's --src
    names = [type(t).__name__ for t in small3(tree, color_jitter=0.0, simple_random_crop=True).train.transform.transforms]
    assert names == ["Resize", "RandomCrop", "RandomHorizontalFlip", "RandomChoice", "ToTensor", "Normalize"]
    src = small3(tree, simple_random_crop=True).train.transform.transforms[1]
    assert src.padding == 4 and src.padding_mode == "reflect"
    plain = small3(tree, augment=False)
    assert plain.train.transform is plain.val.transform


def _image() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


def test_three_augment_ops_equal_deits_formulas():
    """Each op against the code DeiT's/VkD's augment.py runs: ImageOps.solarize(img) (threshold 128),
    ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.)), transforms.Grayscale(3)."""
    import random

    from PIL import ImageFilter, ImageOps

    img = _image()
    gray, sol, blur = imagenet.three_augment_transform(32).transforms[2].transforms
    assert np.array_equal(np.asarray(sol(img)), np.asarray(ImageOps.solarize(img)))
    g = np.asarray(gray(img))
    assert g.shape == (40, 48, 3) and np.array_equal(g[..., 0], np.asarray(img.convert("L")))
    assert np.array_equal(g[..., 0], g[..., 2])
    for seed in range(5):
        random.seed(seed)
        got = np.asarray(blur(img))
        random.seed(seed)
        want = np.asarray(img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0))))
        assert np.array_equal(got, want)
    # The radius really is drawn from [0.1, 2]: the extremes blur differently.
    assert not np.array_equal(np.asarray(img.filter(ImageFilter.GaussianBlur(0.1))),
                              np.asarray(img.filter(ImageFilter.GaussianBlur(2.0))))


def test_three_augment_picks_exactly_one_op_uniformly():
    import random

    choice = imagenet.three_augment_transform(32).transforms[2]
    img = _image()
    gray, sol = np.asarray(choice.transforms[0](img)), np.asarray(choice.transforms[1](img))
    counts = {"gray": 0, "solarize": 0, "blur": 0}
    random.seed(0)
    for _ in range(600):
        out = np.asarray(choice(img))
        kind = "gray" if np.array_equal(out, gray) else "solarize" if np.array_equal(out, sol) else "blur"
        counts[kind] += 1
    assert all(150 < c < 250 for c in counts.values()), counts  # 200 expected each


def test_three_augment_has_no_randaugment_or_erasing_keys():
    """VkD replaces timm's transform: RandAugment/erasing keys do not exist for this option."""
    from omegaconf import OmegaConf

    from kdrun.config import ConfigError, validate_target_node

    node = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "..", "conf", "dataset", "imagenet_3aug.yaml"))
    node.root = "/nonexistent"
    validate_target_node("dataset", node)  # the shipped option is valid
    for key, value in (("auto_augment", "rand-m9-mstd0.5-inc1"), ("re_prob", 0.25)):
        bad = node.copy()
        OmegaConf.set_struct(bad, False)
        bad[key] = value
        with pytest.raises(ConfigError, match=key):
            validate_target_node("dataset", bad)
    assert node.repeated_augmentation == 0 and node.mixup == 0.8 and node.cutmix == 1.0
    assert node.label_smoothing == 0.1 and node.color_jitter == 0.3 and node.crop_pct == 0.875

"""CIFAR-100 builder on a tiny fake ``cifar-100-python`` directory written in torchvision's format."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
import torchvision.datasets.utils as tv_utils
from torchvision import transforms as T

from kdrun.data import cifar100
from kdrun.data.base import DatasetError

N_TRAIN, N_TEST = 64, 48
# The published CIFAR-100 statistics, spelled out here so a wrong constant in the builder is caught.
MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)


def _write_split(path: str, n: int, rng: np.random.Generator) -> np.ndarray:
    # Pixel values drawn with CIFAR-100's own per-channel statistics, so normalised data should come out
    # roughly zero-mean, unit-variance per channel (and not if the channels' stats were mixed up).
    mean = np.array(MEAN)[:, None] * 255
    std = np.array(STD)[:, None] * 255
    data = rng.normal(mean, std, size=(n, 3, 1024)).clip(0, 255).round().astype(np.uint8)
    # The real files are Python 2 pickles whose keys unpickle as str under torchvision's
    # encoding="latin1" (b'data' etc. only under encoding="bytes"), so str keys reproduce what it reads.
    entry = {
        "data": data.reshape(n, 3072),  # rows: 1024 R, then 1024 G, then 1024 B
        "fine_labels": [int(i % 100) for i in range(n)],
        "coarse_labels": [int(i % 20) for i in range(n)],
        "filenames": [f"img_{i}.png" for i in range(n)],
        "batch_label": os.path.basename(path),
    }
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    return data.reshape(n, 3, 32, 32)


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(0)
    _write_split(str(base / "train"), N_TRAIN, rng)
    test_data = _write_split(str(base / "test"), N_TEST, rng)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class_{i}" for i in range(100)],
                     "coarse_label_names": [f"super_{i}" for i in range(20)]}, f, protocol=2)
    # torchvision md5-checks every file, in CIFAR10._check_integrity (train/test) *and* in _load_meta
    # (meta), both through the module-level `check_integrity`; fake files cannot match the real sums,
    # so that one function is patched to check existence only. Patching CIFAR100._check_integrity
    # alone would not do: _load_meta would still reject the fake meta file.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    return tmp_path, test_data


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if anything tries to fetch data."""
    def boom(*a, **k):
        raise AssertionError(f"a download was attempted: {a} {k}")
    for mod in (tv_cifar, tv_utils):
        for name in ("download_and_extract_archive", "download_url"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, boom)


def test_shapes_and_labels(fake_root, no_download):
    root, _ = fake_root
    dm = cifar100.build(str(root))
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (100, 3, 32)
    assert (len(dm.train), len(dm.val)) == (N_TRAIN, N_TEST)
    x, y = dm.train[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y == 5
    xv, yv = dm.val[7]
    assert xv.shape == (3, 32, 32) and yv == 7
    assert dm.mixup is None and dm.repeated_augmentation == 0


def test_val_normalisation_uses_cifar100_stats(fake_root, no_download):
    root, raw = fake_root
    dm = cifar100.build(str(root))
    xs = torch.stack([dm.val[i][0] for i in range(N_TEST)])
    # Exact: undoing the normalisation with the CIFAR-100 stats gives back the stored pixels (RGB order).
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    restored = (xs * std + mean) * 255
    assert torch.allclose(restored, torch.from_numpy(raw).float(), atol=1e-3)
    # Rough: data drawn with CIFAR-100's statistics come out standardised per channel.
    per_chan = xs.transpose(0, 1).reshape(3, -1)
    assert per_chan.mean(1).abs().max() < 0.05
    assert ((per_chan.std(1) - 1).abs() < 0.1).all()


def test_augmentation_changes_train_but_not_val(fake_root, no_download):
    root, _ = fake_root
    dm = cifar100.build(str(root))
    torch.manual_seed(0)
    train_draws = [dm.train[3][0] for _ in range(6)]
    assert any(not torch.equal(train_draws[0], d) for d in train_draws[1:])
    val_draws = [dm.val[3][0] for _ in range(6)]
    assert all(torch.equal(val_draws[0], d) for d in val_draws[1:])

    plain = cifar100.build(str(root), augment=False)
    # Without augmentation a training image is exactly its normalised pixels, every time.
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    expected = (torch.from_numpy(plain.train.data[3]).permute(2, 0, 1).float() / 255 - mean) / std
    for _ in range(4):
        assert torch.allclose(plain.train[3][0], expected, atol=1e-5)


def test_train_pipeline_is_the_kd_protocol(fake_root, no_download):
    root, _ = fake_root
    steps = cifar100.build(str(root)).train.transform.transforms
    assert [type(t) for t in steps] == [T.RandomCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert tuple(steps[0].size) == (32, 32) and steps[0].padding == 4
    assert steps[1].p == 0.5
    assert tuple(steps[3].mean) == MEAN and tuple(steps[3].std) == STD


def test_upsampled_image_size(fake_root, no_download):
    root, _ = fake_root
    dm = cifar100.build(str(root), image_size=40)
    assert dm.image_size == 40
    assert dm.train[0][0].shape == (3, 40, 40)
    assert dm.val[0][0].shape == (3, 40, 40)


def test_declared_shape_must_match(fake_root, no_download):
    root, _ = fake_root
    with pytest.raises(DatasetError, match="num_classes=10"):
        cifar100.build(str(root), num_classes=10)
    with pytest.raises(DatasetError, match="in_chans=1"):
        cifar100.build(str(root), in_chans=1)


def test_missing_root_names_layout_and_does_not_download(tmp_path, no_download):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as ei:
        cifar100.build(str(root), download=False)
    msg = str(ei.value)
    assert str(root) in msg
    assert os.path.join(str(root), "cifar-100-python") + "/{train,test,meta}" in msg
    assert "dataset.download=true" in msg
    assert "\n\n" not in msg  # one paragraph
    assert not root.exists()  # nothing was created either


def test_corrupted_files_are_reported_without_download(fake_root, no_download, monkeypatch):
    root, _ = fake_root
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: False)  # md5 mismatch
    with pytest.raises(DatasetError, match="cifar-100-python"):
        cifar100.build(str(root))


def test_download_true_failure_is_a_dataset_error(tmp_path, monkeypatch):
    calls = []

    def offline(*a, **k):
        calls.append(a)
        raise OSError("network is unreachable")
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(DatasetError, match="Downloading CIFAR-100"):
        cifar100.build(str(tmp_path), download=True)
    assert calls, "download=true should have tried to download"

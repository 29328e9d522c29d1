"""The CIFAR-100 KD model zoo (kdrun.models.cifar): sizes, forward, taps and checkpoint loading."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from torch import nn

from kdrun.models import cifar
from kdrun.models.taps import Tapped, classifier_module

REPO = Path(__file__).resolve().parents[2]

# name -> (constructor, parameters in millions at 100 classes (CRD/RepDistiller table), state_dict entries,
#          keys of the RepDistiller layout that a released checkpoint holds)
RESNET_KEYS = ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
               "layer3.0.downsample.1.running_var", "layer3.0.bn2.num_batches_tracked", "fc.weight", "fc.bias"]
WRN_KEYS = ["conv1.weight", "block1.layer.0.bn1.weight", "block2.layer.0.convShortcut.weight",
            "block3.layer.0.conv2.weight", "bn1.running_var", "fc.bias"]
VGG_KEYS = ["block0.0.weight", "block0.0.bias", "block0.1.running_mean", "block4.0.weight", "classifier.weight"]
RESNET_IN_KEYS = ["conv1.weight", "bn1.weight", "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.running_mean",
                  "layer4.0.conv1.weight", "linear.weight"]

ZOO: dict[str, tuple[Callable[..., nn.Module], float, int, list[str]]] = {
    "resnet8": (cifar.resnet8, 0.08, 56, RESNET_KEYS),
    "resnet14": (cifar.resnet14, 0.18, 92, RESNET_KEYS),
    "resnet20": (cifar.resnet20, 0.28, 128, RESNET_KEYS + ["layer3.2.conv2.weight"]),
    "resnet32": (cifar.resnet32, 0.47, 200, RESNET_KEYS),
    "resnet44": (cifar.resnet44, 0.67, 272, RESNET_KEYS),
    "resnet56": (cifar.resnet56, 0.86, 344, RESNET_KEYS + ["layer3.8.bn2.weight"]),
    "resnet110": (cifar.resnet110, 1.74, 668, RESNET_KEYS + ["layer3.17.bn2.weight"]),
    "resnet8x4": (cifar.resnet8x4, 1.23, 62, RESNET_KEYS + ["layer1.0.downsample.0.weight"]),
    "resnet32x4": (cifar.resnet32x4, 7.43, 206, RESNET_KEYS + ["layer1.0.downsample.0.weight"]),
    "wrn_16_1": (cifar.wrn_16_1, 0.18, 82, WRN_KEYS),
    "wrn_16_2": (cifar.wrn_16_2, 0.70, 83, WRN_KEYS + ["block1.layer.0.convShortcut.weight"]),
    "wrn_40_1": (cifar.wrn_40_1, 0.57, 226, WRN_KEYS + ["block3.layer.5.conv2.weight"]),
    "wrn_40_2": (cifar.wrn_40_2, 2.26, 227, WRN_KEYS + ["block1.layer.0.convShortcut.weight"]),
    "vgg8": (cifar.vgg8, 3.97, 37, VGG_KEYS),
    "vgg11": (cifar.vgg11, 9.28, 58, VGG_KEYS + ["block2.3.weight"]),
    "vgg13": (cifar.vgg13, 9.46, 72, VGG_KEYS + ["block1.3.weight", "block4.4.running_var"]),
    "vgg16": (cifar.vgg16, 14.77, 93, VGG_KEYS + ["block3.6.weight"]),
    "vgg19": (cifar.vgg19, 20.09, 114, VGG_KEYS + ["block2.9.weight"]),
    "mobilenetv2": (cifar.mobilenetv2, 0.81, 320, ["conv1.0.weight", "conv1.1.running_var", "blocks.0.0.conv.0.weight",
                                                   "blocks.6.0.conv.7.running_mean", "conv2.0.weight",
                                                   "classifier.0.weight", "classifier.0.bias"]),
    "shufflev1": (cifar.ShuffleV1, 0.95, 296, ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight",
                                               "layer2.7.conv3.weight", "layer3.3.bn3.running_var", "linear.weight"]),
    "shufflev2": (cifar.ShuffleV2, 1.36, 338, ["conv1.weight", "layer1.0.conv5.weight", "layer1.0.bn4.running_mean",
                                               "layer2.7.conv3.weight", "conv2.weight", "bn2.weight", "linear.weight"]),
    "resnet18": (cifar.ResNet18, 11.22, 122, RESNET_IN_KEYS + ["layer4.1.bn2.running_var"]),
    "resnet34": (cifar.ResNet34, 21.33, 218, RESNET_IN_KEYS + ["layer3.5.conv2.weight"]),
    "resnet50": (cifar.ResNet50, 23.71, 320, RESNET_IN_KEYS + ["layer1.0.shortcut.0.weight", "layer4.2.conv3.weight"]),
    "resnet101": (cifar.ResNet101, 42.70, 626, RESNET_IN_KEYS + ["layer1.0.shortcut.0.weight", "layer3.22.bn3.weight"]),
}
NAMES = list(ZOO)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _build(name: str, **kwargs: int) -> nn.Module:
    return ZOO[name][0](**kwargs).eval()


def _randomise(model: nn.Module) -> None:
    """Give every parameter and BN statistic non-default values, like a trained checkpoint has."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("num_batches_tracked"):
                b.fill_(1000)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_the_benchmark(name: str) -> None:
    ctor, millions, n_entries, keys = ZOO[name]
    model = _build(name)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - millions) <= 0.01, f"{name}: {n / 1e6:.4f}M, expected {millions}M"
    sd = model.state_dict()
    assert len(sd) == n_entries
    missing = [k for k in keys if k not in sd]
    assert not missing, f"{name} lacks RepDistiller state_dict keys {missing}"
    params = inspect.signature(ctor).parameters
    assert params["num_classes"].default == 100 and params["in_chans"].default == 3


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_feature_taps(name: str) -> None:
    model = _build(name)
    taps = list(model.FEATURE_TAPS)
    assert "stage1" in taps and "pool" in taps
    tapped = Tapped(model, ["pre_logits", *taps]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        out = tapped(x)
    assert isinstance(plain, torch.Tensor) and plain.shape == (2, 100)
    torch.testing.assert_close(out.logits, plain)
    feats = out.features
    assert set(feats) == {"pre_logits", *taps}
    clf_name, clf = classifier_module(model)
    assert clf_name == type(model).CLASSIFIER and isinstance(clf, nn.Linear)
    assert feats["pre_logits"].shape == (2, clf.in_features)
    with torch.no_grad():
        torch.testing.assert_close(clf(feats["pre_logits"]), plain)
    assert feats["pool"].shape == (2, clf.in_features, 1, 1)
    stages = sorted(t for t in taps if t.startswith("stage"))
    sizes = []
    for t in stages:
        f = feats[t]
        assert f.dim() == 4 and f.shape[0] == 2 and f.shape[2] == f.shape[3], (t, f.shape)
        sizes.append(f.shape[2])
    assert sizes == sorted(sizes, reverse=True), f"{name}: stage resolutions {sizes} should not grow"
    assert 2 <= sizes[-1] <= 8


@pytest.mark.parametrize("name", NAMES)
def test_num_classes_and_in_chans(name: str) -> None:
    model = _build(name, num_classes=10, in_chans=1)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_strict(name: str) -> None:
    src = _build(name)
    _randomise(src)
    dst = _build(name)
    result = dst.load_state_dict(src.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8", "mobilenetv2", "shufflev1", "shufflev2", "resnet18"])
def test_loads_a_repdistiller_style_checkpoint(name: str, tmp_path: Path) -> None:
    trained = _build(name)
    _randomise(trained)
    path = tmp_path / f"{name}_best.pth"
    torch.save({"epoch": 240, "model": trained.state_dict(), "best_acc": 73.5}, path)

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    fresh = _build(name)
    fresh.load_state_dict(ckpt["model"], strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_configs_name_every_zoo_model(role: str) -> None:
    """conf/model/<name>.yaml defines the architecture once; conf/<role>/<name>.yaml selects it."""
    for name, (ctor, *_rest) in ZOO.items():
        model_text = (REPO / "conf" / "model" / f"{name}.yaml").read_text()
        assert model_text.startswith("# ") and "CRD/RepDistiller" in model_text.splitlines()[0]
        model_cfg = yaml.safe_load(model_text)
        module, _, attr = model_cfg["_target_"].rpartition(".")
        assert getattr(importlib.import_module(module), attr) is ctor
        assert model_cfg["num_classes"] == "${dataset.num_classes}"
        assert model_cfg["in_chans"] == "${dataset.in_chans}"
        text = (REPO / "conf" / role / f"{name}.yaml").read_text()
        cfg = yaml.safe_load(text)
        assert {"/model@model": name} in cfg["defaults"]
        assert cfg["checkpoint"] is None
        if role == "teacher":
            assert cfg["fit_if_missing_epochs"] == 0
            assert "teacher.checkpoint=" in text
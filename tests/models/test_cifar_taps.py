"""The CIFAR zoo's taps are RepDistiller's features: ``stageK`` = ``forward(is_feat=True)`` feature K,
``preact_stageK`` = ``forward(is_feat=True, preact=True)`` feature K (mdistiller's ``feats`` /
``preact_feats``), for every zoo model, in eval, train and inference mode.

The reference forwards (``repdistiller_ref.py``) are re-derived from the RepDistiller code using the
model's own conv/BN/linear modules and plain functional ops, so a tap that reads the wrong tensor (pre-
vs post-ReLU, overwritten in place) fails.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdrun.models import cifar
from kdrun.models.taps import Tapped
from tests.models.repdistiller_ref import REFS, randomise, ref_shufflev2

@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _check(name: str, mode: str, forwards: int = 1) -> None:
    model = getattr(cifar, name)()
    randomise(model)
    model.train(mode == "train")
    ref_model = copy.deepcopy(model)  # the reference runs on its own copy (train-mode BN statistics)
    # 16x16 for the heavy four-stage nets (their RepDistiller pooling is adaptive) to keep the test fast
    size = 16 if name.startswith(("ResNet", "vgg")) else 32
    x = torch.randn(2, 3, size, size)
    n = sum(1 for t in model.FEATURE_TAPS if t.startswith("stage"))
    taps = [f"stage{k}" for k in range(n)] + [f"preact_stage{k}" for k in range(n)] + ["pre_logits"]
    tapped = Tapped(model, taps)
    ctx = torch.inference_mode() if mode == "inference" else torch.enable_grad()
    for _ in range(forwards):  # the first forward probes which taps in-place ops overwrite; later ones reuse it
        with ctx:
            out = tapped(x)
        with torch.no_grad():
            feats, pres, pooled = REFS[name](ref_model, x)
            logits = ref_model.get_submodule(type(model).CLASSIFIER)(pooled)
        for k in range(n):
            torch.testing.assert_close(out.features[f"stage{k}"], feats[k], msg=f"{name} stage{k}")
            torch.testing.assert_close(out.features[f"preact_stage{k}"], pres[k], msg=f"{name} preact_stage{k}")
        torch.testing.assert_close(out.features["pre_logits"], pooled)
        torch.testing.assert_close(out.logits, logits)
    # The features the RepDistiller lists distinguish really differ (otherwise the test could not fail).
    if name != "mobilenetv2":
        assert not torch.allclose(pres[1], feats[1]), f"{name}: preact_stage1 equals stage1"
        assert bool((pres[1] < 0).any())
    assert bool((feats[0] >= 0).all()) or name.startswith("wrn")  # f0 is post-ReLU except WRN's conv1


@pytest.mark.parametrize("name", sorted(REFS))
def test_taps_are_repdistiller_features_eval(name: str) -> None:
    _check(name, "eval")


@pytest.mark.parametrize("name", ["resnet20", "wrn_16_2", "vgg8", "ShuffleV1", "ShuffleV2", "ResNet18",
                                  "mobilenetv2"])
def test_taps_are_repdistiller_features_train(name: str) -> None:
    _check(name, "train", forwards=2)


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_40_1", "vgg13", "ResNet50"])
def test_taps_are_repdistiller_features_inference_mode(name: str) -> None:
    _check(name, "inference")


def test_shufflev2_gradients_match_the_reference() -> None:
    """ShuffleV2's unit applies the ReLU to cat([x1, branch]) (x1 is already a ReLU output); values and
    gradients equal RepDistiller's cat([x1, relu(branch)])."""
    model = cifar.ShuffleV2()
    randomise(model)
    model.train()
    ref_model = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    _, _, pooled = ref_shufflev2(ref_model, x)
    ref_model.linear(pooled).square().sum().backward()
    scale = max(float(q.grad.abs().max()) for q in ref_model.parameters())
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        # the same math; only the float summation order differs (cat then ReLU vs ReLU then cat)
        # atol relative to the largest gradient: some BN-bias gradients are analytically 0 (a BN
        # follows) and numerically noise; a real difference (a lost gradient path) is O(scale).
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale, msg=n)


def test_bn_before_relu_declared_as_mdistiller() -> None:
    """BN_BEFORE_RELU names mdistiller's get_bn_before_relu modules (the BN behind preact_stage1..)."""
    assert cifar.resnet56().BN_BEFORE_RELU == ("layer1.8.bn2", "layer2.8.bn2", "layer3.8.bn2")
    assert cifar.ResNet50().BN_BEFORE_RELU == ("layer1.2.bn3", "layer2.3.bn3", "layer3.5.bn3", "layer4.2.bn3")
    assert cifar.wrn_40_2().BN_BEFORE_RELU == ("block2.layer.0.bn1", "block3.layer.0.bn1", "bn1")
    assert cifar.vgg13().BN_BEFORE_RELU == ("block1.4", "block2.4", "block3.4", "block4.4")
    for name in ("resnet56", "ResNet50", "wrn_40_2", "vgg13"):
        m = getattr(cifar, name)()
        assert all(isinstance(m.get_submodule(p), nn.BatchNorm2d) for p in m.BN_BEFORE_RELU)
    assert not hasattr(cifar.ShuffleV1(), "BN_BEFORE_RELU")

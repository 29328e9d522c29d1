"""Feature taps on the digits ConvNet and timm models; teacher freezing; config-built models."""
from __future__ import annotations

import pytest
import timm
import torch
from omegaconf import OmegaConf

from kdrun.models.build import build_model
from kdrun.models.convnet import ConvNet
from kdrun.models.taps import TapError, Tapped, freeze


def test_convnet_taps_match_a_manual_forward() -> None:
    m = ConvNet([4, 8, 16], num_classes=10, in_chans=1).eval()
    t = Tapped(m, ["pre_logits", "stage2", "stages.0.0"])
    x = torch.randn(3, 1, 16, 16)
    out = t(x)
    h1 = m.stages[0](x)
    h2 = m.stages[1](h1)
    pooled = m.pool(m.stages[2](h2)).flatten(1)
    assert torch.allclose(out.features["stage2"], h2)
    assert torch.allclose(out.features["pre_logits"], pooled)
    assert torch.allclose(out.features["stages.0.0"], m.stages[0][0](x))
    assert torch.allclose(out.logits, m.fc(pooled))


def test_unknown_tap_lists_valid_names() -> None:
    with pytest.raises(TapError, match="valid taps are logits, pre_logits, stage1"):
        Tapped(ConvNet([4, 8]), ["stage9"])


def test_timm_models_tap_pre_logits_and_distillation_head() -> None:
    m = timm.create_model("resnet18", num_classes=10, in_chans=1)
    out = Tapped(m, ["pre_logits"]).eval()(torch.randn(2, 1, 32, 32))
    assert out.features["pre_logits"].shape == (2, 512) and out.logits.shape == (2, 10)

    deit = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, num_classes=10)
    tapped = Tapped(deit, ["pre_logits", "dist_logits"]).train()
    out = tapped(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 10) and out.features["dist_logits"].shape == (2, 10)
    assert out.features["pre_logits"].shape == (2, 192)
    ev = tapped.eval()(torch.randn(2, 3, 32, 32))  # eval: the two heads' average, no dist tap
    assert ev.logits.shape == (2, 10) and "dist_logits" not in ev.features
    with pytest.raises(TapError, match="distillation token"):
        Tapped(m, ["dist_logits"])


def test_patch_mean_tap_pools_patch_tokens_only() -> None:
    deit = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    out = Tapped(deit, ["patch_mean"])(x)
    tokens = deit.forward_features(x)  # (B, 2 prefix + 4 patches, 192)
    assert deit.num_prefix_tokens == 2
    assert torch.allclose(out.features["patch_mean"], tokens[:, 2:].mean(1), atol=1e-6)
    with pytest.raises(TapError, match="needs a timm ViT"):
        Tapped(ConvNet([4, 8]), ["patch_mean"])


def test_build_model_from_config_and_freeze() -> None:
    node = OmegaConf.create({"model": {"_target_": "timm.create_model", "model_name": "resnet18",
                                       "num_classes": 5, "in_chans": 1, "pretrained": False},
                             "checkpoint": None})
    m = freeze(build_model(node))
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert m.get_classifier().out_features == 5

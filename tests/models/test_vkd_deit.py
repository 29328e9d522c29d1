"""VkD's DeiT student against a transcription of roymiles/vkd models/deit.py (DistilledVisionTransformer)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdrun.models.taps import Tapped
from kdrun.models.vkd_deit import VkDDeiT, vkd_deit_small, vkd_deit_tiny


def small_model() -> VkDDeiT:
    torch.manual_seed(0)
    return VkDDeiT(embed_dim=48, num_heads=3, depth=2, num_classes=7, img_size=32).eval()


def vkd_reference(m: VkDDeiT, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """models/deit.py L52-72 (forward_features) and L74-83 (forward), on this model's modules."""
    B = x.shape[0]
    x_conv = m.conv_embed.proj(m.conv_embed.conv(x))
    x_conv = x_conv.flatten(2).transpose(1, 2)
    cls_tokens = m.cls_token.expand(B, -1, -1)
    dist_token = x_conv.mean(1, keepdim=True)
    h = torch.cat((cls_tokens, dist_token, x_conv), dim=1)
    h = h + m.pos_embed
    h = m.pos_drop(h)
    for blk in m.blocks:
        h = blk(h)
    h = m.norm(h)
    return m.head(h[:, 0]), m.head_dist(h[:, 1]), h[:, 2:]


def test_forward_equals_vkds_code() -> None:
    m = small_model()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cls, dist, patches = vkd_reference(m, x)
    assert torch.allclose(m(x), (cls + dist) / 2, atol=1e-6)  # eval: the average of both heads
    m.train()
    torch.manual_seed(2)
    got = m(x)
    torch.manual_seed(2)
    ref = vkd_reference(m, x)
    assert isinstance(got, tuple) and torch.allclose(got[0], ref[0], atol=1e-6) and torch.allclose(got[1], ref[1], atol=1e-6)
    m.set_distilled_training(False)
    assert isinstance(m(x), torch.Tensor)


def test_taps_read_vkds_features() -> None:
    """patch_mean = VkD's z_s.mean(1) (engine.py), dist_logits = head_dist of the mean token."""
    m = small_model().train()
    tapped = Tapped(m, ["dist_logits", "patch_mean", "pre_logits"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = tapped(x)
    cls, dist, patches = vkd_reference(m, x)
    assert torch.allclose(out.logits, cls, atol=1e-6) and torch.allclose(out.features["dist_logits"], dist, atol=1e-6)
    assert torch.allclose(out.features["patch_mean"], patches.mean(1), atol=1e-6)
    assert out.features["pre_logits"].shape == (2, 48)


def test_structure_and_state_dict_keys_are_vkds() -> None:
    m = vkd_deit_tiny()
    sd = m.state_dict()
    assert tuple(sd["pos_embed"].shape) == (1, 14 * 14 + 2, 192)
    assert "dist_token" not in sd and "patch_embed.proj.weight" not in sd  # no learned token, no patch embed
    convs = [k for k in sd if k.startswith("conv_embed.") and k.endswith("weight") and sd[k].ndim == 4]
    assert convs == ["conv_embed.conv.0.weight", "conv_embed.conv.3.weight", "conv_embed.conv.6.weight",
                     "conv_embed.proj.weight"]
    assert [tuple(sd[k].shape) for k in convs] == [(64, 3, 7, 7), (64, 64, 3, 3), (64, 64, 3, 3), (192, 64, 8, 8)]
    assert "conv_embed.proj.bias" in sd and "conv_embed.conv.0.bias" not in sd
    assert tuple(sd["head_dist.weight"].shape) == (1000, 192) and len(m.blocks) == 12
    stem = sum(p.numel() for p in m.conv_embed.parameters())
    assert stem == 3 * 64 * 49 + 2 * 64 * 64 * 9 + 3 * 2 * 64 + 64 * 192 * 64 + 192
    dp = [b.drop_path1 for b in m.blocks]
    assert all(isinstance(d, nn.Identity) for d in dp)  # VkD passes no drop_path to the model
    s = vkd_deit_small(num_classes=2, img_size=16)
    assert s.embed_dim == 384 and s.blocks[0].attn.num_heads == 6 and len(s.blocks) == 12
    with pytest.raises(ValueError, match="divisible by 16"):
        VkDDeiT(48, 3, img_size=40)


def test_student_options_build() -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    for name in ("vkd_deit_tiny", "vkd_deit_small"):
        node = OmegaConf.load(f"conf/model/{name}.yaml")
        assert node._target_ == f"kdrun.models.vkd_deit.{name}" and node.drop_path_rate == 0.0
    node = OmegaConf.load("conf/model/vkd_deit_tiny.yaml")
    node.num_classes, node.img_size, node.in_chans = 10, 32, 3
    m = instantiate(node)
    assert isinstance(m, VkDDeiT) and m.embed_dim == 192 and m.num_classes == 10

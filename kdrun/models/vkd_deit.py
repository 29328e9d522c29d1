"""VkD's DeiT student (Miles & Deng, CVPR 2024): ``DistilledVisionTransformer`` of roymiles/vkd
``models/deit.py`` (commit 4b48050), which differs from DeiT's / timm's ``deit_*_distilled_patch16_224``:

* **Stem** (``conv_embed``, L12-31, "the same conv embed used by co-advise CiVT"): conv 7×7 stride 2
  (3→64, no bias) + BN + ReLU, two conv 3×3 (64→64, no bias) + BN + ReLU, then conv 8×8 stride 8
  (64→D, bias): 224 px → 14 × 14 tokens, the same grid as a 16-px patch embedding but ~0.87 M
  parameters instead of 0.15 M (DeiT-Ti). Conv weights are Kaiming-normal (``init_weight``, L47-50).
* **Distillation token** (L61): not a learned parameter but the *mean of the patch tokens* of the stem,
  ``dist_token = x_conv.mean(1, keepdim=True)``, concatenated after the class token; the position
  embedding covers 196 + 2 tokens (L40, truncated normal std .02).
* Heads: ``head`` on the class token, ``head_dist`` on the distillation token; training returns both
  ``(cls, dist)``, evaluation their average (L76-83), as DeiT.
* VkD builds it with only ``num_classes`` and ``img_size`` (``train.py`` L154-157), so its
  ``--drop-path 0.1`` never reaches the model: **no stochastic depth** (``drop_path_rate`` 0 here).

Everything else is timm's ``VisionTransformer`` (patch 16, depth 12, MLP ratio 4, qkv bias, LayerNorm
eps 1e-6), so the state_dict keys are VkD's (``conv_embed.*``, ``cls_token``, ``pos_embed``,
``blocks.*``, ``norm.*``, ``head.*``, ``head_dist.*``): a student state_dict of a VkD checkpoint loads
once its ``projector.*`` keys (VkD keeps its orthogonal projector on the student; kdrun's lives in the
loss term) are removed. One difference we cannot pin: ``cls_token`` is initialised by the installed
timm (normal, std 1e-6 in timm ≥ 0.6; DeiT's timm 0.4 used a truncated normal, std .02) — VkD names
no timm version. VkD hard-codes the 14 × 14 grid; here it is ``(img_size // 16)²`` (the same at 224).

kdrun's taps work unchanged: ``dist_logits`` (:meth:`set_distilled_training`), ``patch_mean`` (the
mean of the final-norm tokens after the two prefix tokens = VkD's ``z_s.mean(1)``, ``engine.py``),
``pre_logits`` (the input of ``head``).
"""
from __future__ import annotations

from functools import partial
from typing import Annotated

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from kdrun.config import Ge


class ConvEmbed(nn.Module):
    """VkD's / CiVT's convolutional stem: (B, C, H, W) → (B, H/16 · W/16, D)."""

    def __init__(self, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(True),
            nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(True),
            nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(True),
        )
        self.proj = nn.Conv2d(64, embed_dim, kernel_size=8, stride=8)
        for m in self.modules():  # VkD's init_weight: Kaiming-normal conv weights (proj included)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.conv(x)).flatten(2).transpose(1, 2)


class VkDDeiT(VisionTransformer):
    """DeiT with VkD's convolutional stem and mean-pooled distillation token (module docstring)."""

    def __init__(self, embed_dim: int, num_heads: int, depth: int = 12, num_classes: int = 1000,
                 img_size: int = 224, in_chans: int = 3, drop_path_rate: float = 0.0) -> None:
        if img_size % 16:
            raise ValueError(f"VkDDeiT needs img_size divisible by 16 (the stem's stride), got {img_size}")
        super().__init__(img_size=img_size, patch_size=16, in_chans=in_chans, num_classes=num_classes,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4, qkv_bias=True,
                         norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=drop_path_rate)
        del self.patch_embed
        self.conv_embed = ConvEmbed(embed_dim, in_chans)
        self.num_patches = (img_size // 16) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 2, embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist.apply(self._init_weights)
        self.num_prefix_tokens = 2  # class + distillation token (kdrun's patch_mean tap skips them)
        self.distilled_training = True  # VkD: (cls, dist) logits in training mode

    def set_distilled_training(self, enable: bool = True) -> None:
        """timm's API (the ``dist_logits`` tap calls it); with False, training returns the average."""
        self.distilled_training = enable

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Final-norm tokens (B, 2 + N, D): class, distillation (= mean of the stem's tokens), patches."""
        tokens = self.conv_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat((cls, tokens.mean(1, keepdim=True), tokens), dim=1) + self.pos_embed
        x = self.blocks(self.pos_drop(x))
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:  # type: ignore[override]
        x = self.forward_features(x)
        cls, dist = self.head(x[:, 0]), self.head_dist(x[:, 1])
        if self.training and self.distilled_training:
            return cls, dist
        return (cls + dist) / 2


def vkd_deit_tiny(num_classes: Annotated[int, Ge(1)] = 1000, img_size: Annotated[int, Ge(16)] = 224,
                  in_chans: Annotated[int, Ge(1)] = 3, drop_path_rate: Annotated[float, Ge(0.0)] = 0.0) -> VkDDeiT:
    """VkD's ``deit_ti_distilled`` (``deit_tiny_distilled_patch16_224``): D 192, 3 heads."""
    return VkDDeiT(192, 3, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                   drop_path_rate=drop_path_rate)


def vkd_deit_small(num_classes: Annotated[int, Ge(1)] = 1000, img_size: Annotated[int, Ge(16)] = 224,
                   in_chans: Annotated[int, Ge(1)] = 3, drop_path_rate: Annotated[float, Ge(0.0)] = 0.0) -> VkDDeiT:
    """VkD's ``deit_s_distilled`` (``deit_small_distilled_patch16_224``): D 384, 6 heads."""
    return VkDDeiT(384, 6, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                   drop_path_rate=drop_path_rate)

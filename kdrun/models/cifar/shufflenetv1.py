"""ShuffleNetV1 for CIFAR (RepDistiller's ``ShuffleV1``).

ShuffleNet (Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile
Devices", CVPR 2018) with 3 groups and stage widths 240/480/960 (4/8/4 units), in the CIFAR form of
the CRD/RepDistiller benchmark (Tian et al., ICLR 2020), also used by mdistiller: a 1x1 stem to 24
channels, stages ``layer1..layer3`` that each halve the resolution in their first unit (32 -> 16 -> 8
-> 4), and a ``linear`` classifier.

Taps (RepDistiller ``models/ShuffleNetv1.py`` lines 95-113, ``forward(is_feat=True[, preact=True])``):
``stage0`` is ``f0`` = relu(bn1(conv1(x))) (the parameter-free stem ``relu``), ``stageK`` the output of
``layerK``; ``preact_stageK`` (K >= 1) is ``fK_pre``, the last unit's concatenation/sum before its final
ReLU (the unit's parameter-free ``preact`` module, lines 46-48 there); ``preact_stage0`` is ``f0``.
RepDistiller gives ShuffleNet no ``get_bn_before_relu`` (line 92), so OFD has no BN margin for it as a
teacher.

Differences from the RepDistiller code, none of which changes the state_dict: ``forward`` returns
logits only, the stem takes ``in_chans`` channels, the stem ReLU is the module ``relu``, every unit has
a parameter-free ``preact`` (identity) module, and the global pooling is a parameter-free ``avgpool``
module (adaptive; identical to its ``avg_pool2d(out, 4)`` on 32x32 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ShuffleBlock(nn.Module):
    """Channel shuffle: [N, g*c, H, W] -> [N, c*g, H, W]."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        g = self.groups
        return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """ShuffleNet unit: grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1; a stride-2 unit
    concatenates an average-pooled shortcut instead of adding it."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        g = 1 if in_planes == 24 else groups  # the first unit after the 24-channel stem is ungrouped
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))
        self.preact = nn.Identity()  # its output is the unit's result before the final ReLU (a tap point)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        out = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(self.preact(out))


class ShuffleNetV1(nn.Module):
    """ShuffleNetV1 with stage widths ``out_planes``, units per stage ``num_blocks`` and ``groups``."""

    CLASSIFIER = "linear"

    def __init__(
        self,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[2], num_classes)
        # stageK / preact_stageK: RepDistiller's feat[K] with preact False / True (module docstring).
        self.FEATURE_TAPS = {
            "stage0": "relu", "stage1": "layer1", "stage2": "layer2", "stage3": "layer3",
            "preact_stage0": "relu",
            **{f"preact_stage{k}": f"layer{k}.{num_blocks[k - 1] - 1}.preact" for k in (1, 2, 3)},
            "pool": "avgpool",
        }

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            stride = 2 if i == 0 else 1
            cat_planes = self.in_planes if i == 0 else 0  # the stride-2 unit concatenates its input
            layers.append(Bottleneck(self.in_planes, out_planes - cat_planes, stride=stride, groups=groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.avgpool(out).flatten(1)
        return self.linear(out)


def ShuffleV1(num_classes: int = 100, in_chans: int = 3) -> ShuffleNetV1:
    """ShuffleNetV1, g=3 (Zhang et al. 2018; CRD/RepDistiller definition), 0.95M parameters at 100 classes."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes, in_chans=in_chans)

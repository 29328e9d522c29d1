"""Half-width MobileNetV2 for CIFAR (RepDistiller's ``mobile_half``).

MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018)
in the CIFAR form of the CRD/RepDistiller benchmark (Tian et al., ICLR 2020), also used by
mdistiller: expansion ratio 6, width multiplier 0.5 (the 1280-channel head is kept), a stride-2 3x3
stem and the standard seven inverted-residual stages held in ``blocks`` (an ``nn.ModuleList`` of
``nn.Sequential``), then ``conv2`` (1x1 to 1280) and ``classifier`` (``nn.Sequential`` of one
``nn.Linear``, so its parameters are ``classifier.0.*``).

Taps (RepDistiller ``models/mobilenetv2.py`` lines 132-158, ``forward(is_feat=True)``): ``stage0`` is
``f0`` = ``conv1``'s output (post-ReLU), ``stage1..4`` the outputs of ``blocks[1]``, ``blocks[2]``,
``blocks[4]``, ``blocks[6]``. RepDistiller's ``preact=True`` returns the same list (and mdistiller's
MobileNetV2 has no ``preact_feats``), so ``preact_stageK`` names the same modules as ``stageK``.

Differences from the RepDistiller code, none of which changes the state_dict: ``forward`` returns
logits only, the stem takes ``in_chans`` channels, and the pooling is adaptive (identical to its
``AvgPool2d(2, ceil_mode=True)`` on 32x32 inputs).
"""
from __future__ import annotations

import math

from torch import Tensor, nn


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def _conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """Expand (1x1) - depthwise 3x3 - project (1x1, linear), with identity residual when shapes agree."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        hidden = inp * expand_ratio
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with expansion ``T`` and width multiplier ``width_mult`` for 32x32 inputs."""

    CLASSIFIER = "classifier.0"
    # Stage ends as RepDistiller indexes its features: f1 = blocks[1] (16x16), f2 = blocks[2] (8x8),
    # f3 = blocks[4] (4x4), f4 = blocks[6] (2x2).
    FEATURE_TAPS = {
        "stage0": "conv1",
        "stage1": "blocks.1",
        "stage2": "blocks.2",
        "stage3": "blocks.4",
        "stage4": "blocks.6",
        "preact_stage0": "conv1",
        "preact_stage1": "blocks.1",
        "preact_stage2": "blocks.2",
        "preact_stage3": "blocks.4",
        "preact_stage4": "blocks.6",
        "pool": "avgpool",
    }

    # t (expansion), c (channels), n (repeats), s (first stride)
    SETTINGS = [
        [1, 16, 1, 1],
        [None, 24, 2, 1],
        [None, 32, 3, 2],
        [None, 64, 4, 2],
        [None, 96, 3, 1],
        [None, 160, 3, 2],
        [None, 320, 1, 1],
    ]

    def __init__(self, T: int = 6, num_classes: int = 100, width_mult: float = 0.5, in_chans: int = 3) -> None:
        super().__init__()
        input_channel = int(32 * width_mult)
        self.conv1 = _conv_bn(in_chans, input_channel, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in self.SETTINGS:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, T if t is None else t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_1x1_bn(input_channel, self.last_channel)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        for block in self.blocks:
            out = block(out)
        out = self.conv2(out)
        out = self.avgpool(out).flatten(1)
        return self.classifier(out)


def mobilenetv2(num_classes: int = 100, in_chans: int = 3) -> MobileNetV2:
    """Half-width MobileNetV2 (Sandler et al. 2018; CRD/RepDistiller ``mobile_half``), 0.81M parameters at
    100 classes."""
    return MobileNetV2(T=6, num_classes=num_classes, width_mult=0.5, in_chans=in_chans)


def mobile_half(num_classes: int = 100, in_chans: int = 3) -> MobileNetV2:
    """RepDistiller's name for :func:`mobilenetv2` (Sandler et al. 2018; CRD/RepDistiller definition)."""
    return mobilenetv2(num_classes=num_classes, in_chans=in_chans)

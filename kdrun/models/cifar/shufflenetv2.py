"""ShuffleNetV2 (1x) for CIFAR (RepDistiller's ``ShuffleV2``).

ShuffleNet V2 (Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design", ECCV 2018) at width 1x (stage widths 116/232/464, 3/7/3 basic units after each down-sampling
unit, a 1x1 head to 1024 channels) in the CIFAR form of the CRD/RepDistiller benchmark (Tian et al.,
ICLR 2020), also used by mdistiller: a 1x1 stem to 24 channels, stages ``layer1..layer3`` (32 -> 16
-> 8 -> 4), ``conv2``/``bn2`` and a ``linear`` classifier.

Taps (RepDistiller ``models/ShuffleNetv2.py`` lines 140-159, ``forward(is_feat=True[, preact=True])``):
``stage0`` is ``f0`` = relu(bn1(conv1(x))) (the parameter-free stem ``relu``), ``stageK`` the output of
``layerK``; ``preact_stageK`` (K >= 1) is ``fK_pre`` of the stage's last unit: ``cat([x1, bn3(...)])``
before the branch ReLU and *without* the channel shuffle that the unit's output gets (lines 52-57
there; the unit's parameter-free ``preact`` module); ``preact_stage0`` is ``f0``. RepDistiller gives
ShuffleNetV2 no ``get_bn_before_relu`` (line 137), so OFD has no BN margin for it as a teacher.

Differences from the RepDistiller code, none of which changes the state_dict: ``forward`` returns
logits only, the stem takes ``in_chans`` channels, the stem ReLU is the module ``relu``, every basic
unit has a parameter-free ``preact`` (identity) module, and the global pooling is a parameter-free
``avgpool`` module (adaptive; identical to its ``avg_pool2d(out, 4)`` on 32x32 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIGS: dict[float, dict[str, tuple[int, ...]]] = {
    0.2: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 3, 3)},
    0.3: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 7, 3)},
    0.5: {"out_channels": (48, 96, 192, 1024), "num_blocks": (3, 7, 3)},
    1: {"out_channels": (116, 232, 464, 1024), "num_blocks": (3, 7, 3)},
    1.5: {"out_channels": (176, 352, 704, 1024), "num_blocks": (3, 7, 3)},
    2: {"out_channels": (224, 488, 976, 2048), "num_blocks": (3, 7, 3)},
}


class ShuffleBlock(nn.Module):
    """Channel shuffle: [N, g*c, H, W] -> [N, c*g, H, W]."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        g = self.groups
        return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class SplitBlock(nn.Module):
    """Split the channels into the first ``ratio`` and the rest."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class BasicBlock(nn.Module):
    """Stride-1 unit: half the channels pass through, the other half go 1x1 - dw 3x3 - 1x1; then shuffle."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock()
        self.preact = nn.Identity()  # its output is RepDistiller's unshuffled preact (a tap point)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        preact = self.preact(torch.cat([x1, self.bn3(self.conv3(out))], 1))
        # RepDistiller: shuffle(cat([x1, relu(bn3(...))])). x1 is a ReLU output (the stem, DownBlock and
        # basic-unit outputs all are), so relu(x1) = x1 and this is the same tensor, values and gradients.
        return self.shuffle(F.relu(preact))


class DownBlock(nn.Module):
    """Stride-2 unit: two branches (dw 3x3 - 1x1, and 1x1 - dw 3x3 - 1x1) concatenated, then shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock()

    def forward(self, x: Tensor) -> Tensor:
        out1 = self.bn1(self.conv1(x))
        out1 = F.relu(self.bn2(self.conv2(out1)))
        out2 = F.relu(self.bn3(self.conv3(x)))
        out2 = self.bn4(self.conv4(out2))
        out2 = F.relu(self.bn5(self.conv5(out2)))
        return self.shuffle(torch.cat([out1, out2], 1))


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 of width ``net_size`` (a key of :data:`CONFIGS`)."""

    CLASSIFIER = "linear"

    def __init__(self, net_size: float = 1, num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        out_channels = CONFIGS[net_size]["out_channels"]
        num_blocks = CONFIGS[net_size]["num_blocks"]
        self.conv1 = nn.Conv2d(in_chans, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_channels[3], num_classes)
        # stageK / preact_stageK: RepDistiller's feat[K] with preact False / True (module docstring);
        # layerK holds one DownBlock then num_blocks basic units, so its last unit is index num_blocks.
        self.FEATURE_TAPS = {
            "stage0": "relu", "stage1": "layer1", "stage2": "layer2", "stage3": "layer3",
            "preact_stage0": "relu",
            **{f"preact_stage{k}": f"layer{k}.{num_blocks[k - 1]}.preact" for k in (1, 2, 3)},
            "pool": "avgpool",
        }

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.avgpool(out).flatten(1)
        return self.linear(out)


def ShuffleV2(num_classes: int = 100, in_chans: int = 3) -> ShuffleNetV2:
    """ShuffleNetV2 1x (Ma et al. 2018; CRD/RepDistiller definition), 1.36M parameters at 100 classes."""
    return ShuffleNetV2(net_size=1, num_classes=num_classes, in_chans=in_chans)

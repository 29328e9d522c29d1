"""ImageNet-style ResNets with a CIFAR stem: ResNet18, ResNet34, ResNet50, ResNet101.

The ImageNet ResNet-18/34/50/101 stage layout (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016) with a 3x3 stride-1 stem and no stem max-pool, so that the four stages run
at 32/16/8/4 on CIFAR images. The definition (attribute names ``conv1, bn1, layer1..layer4, linear``,
``shortcut`` projections) follows the CRD/RepDistiller benchmark (Tian et al., ICLR 2020;
``resnetv2.py`` there), also used by mdistiller, so that released checkpoints load with
``strict=True``.

Taps (RepDistiller ``models/resnetv2.py`` lines 141-160, ``forward(is_feat=True[, preact=True])``):
``stage0`` is ``f0`` = relu(bn1(conv1(x))) (the parameter-free stem ``relu``), ``stageK`` the output of
``layerK`` (post-ReLU); ``preact_stageK`` (K >= 1) is ``fK_pre``, the last block's residual sum before
its final ReLU (the block's parameter-free ``preact`` module, lines 33-35 / 66-68 there);
``preact_stage0`` is ``f0``.

Differences from the RepDistiller code, none of which changes the state_dict: ``forward`` returns
logits only, the stem takes ``in_chans`` channels, the stem ReLU is the module ``relu`` and every
block has a parameter-free ``preact`` (identity) module on its residual sum.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (post-activation)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )
        self.preact = nn.Identity()  # its output is the residual sum before the final ReLU (a tap point)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(self.preact(out + self.shortcut(x)))


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck with a residual connection (expansion 4)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )
        self.preact = nn.Identity()  # its output is the residual sum before the final ReLU (a tap point)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(self.preact(out + self.shortcut(x)))


class ImageNetStyleResNet(nn.Module):
    """Four-stage ResNet (widths 64/128/256/512 x expansion) with a 3x3 stride-1 stem."""

    CLASSIFIER = "linear"

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: list[int],
        num_classes: int = 100,
        in_chans: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        last_bn = "bn3" if block is Bottleneck else "bn2"
        # stageK / preact_stageK: RepDistiller's feat[K] with preact False / True (module docstring).
        self.FEATURE_TAPS = {
            "stage0": "relu", **{f"stage{k}": f"layer{k}" for k in (1, 2, 3, 4)},
            "preact_stage0": "relu",
            **{f"preact_stage{k}": f"layer{k}.{num_blocks[k - 1] - 1}.preact" for k in (1, 2, 3, 4)},
            "pool": "avgpool",
        }
        # RepDistiller's get_bn_before_relu (models/resnetv2.py lines 116-130): the last block's last BN.
        self.BN_BEFORE_RELU = tuple(f"layer{k}.{num_blocks[k - 1] - 1}.{last_bn}" for k in (1, 2, 3, 4))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, num_blocks: int, stride: int
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.avgpool(out).flatten(1)
        return self.linear(out)


def ResNet18(num_classes: int = 100, in_chans: int = 3) -> ImageNetStyleResNet:
    """ResNet-18, CIFAR stem (He et al. 2016; CRD/RepDistiller definition), 11.22M parameters at 100 classes."""
    return ImageNetStyleResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans)


def ResNet34(num_classes: int = 100, in_chans: int = 3) -> ImageNetStyleResNet:
    """ResNet-34, CIFAR stem (He et al. 2016; CRD/RepDistiller definition), 21.33M parameters at 100 classes."""
    return ImageNetStyleResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans)


def ResNet50(num_classes: int = 100, in_chans: int = 3) -> ImageNetStyleResNet:
    """ResNet-50, CIFAR stem (He et al. 2016; CRD/RepDistiller definition), 23.71M parameters at 100 classes."""
    return ImageNetStyleResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans)


def ResNet101(num_classes: int = 100, in_chans: int = 3) -> ImageNetStyleResNet:
    """ResNet-101, CIFAR stem (He et al. 2016; CRD/RepDistiller definition), 42.70M parameters at 100 classes."""
    return ImageNetStyleResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, in_chans=in_chans)

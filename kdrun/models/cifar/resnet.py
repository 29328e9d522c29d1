"""CIFAR ResNets: resnet8 ... resnet110, resnet8x4 and resnet32x4.

Deep residual networks (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016) in
their CIFAR form: a 3x3 stem and three stages of 6n+2 layers. The definition (attribute names, block
layout, widths) follows the CRD/RepDistiller benchmark (Tian et al., ICLR 2020), also used by
mdistiller, so that the benchmark's released teacher checkpoints load with ``strict=True``.
``resnet8x4``/``resnet32x4`` are that benchmark's 4x-wide variants (stage widths 64/128/256).

Taps (RepDistiller ``models/resnet.py`` lines 178-200, ``forward(is_feat=True[, preact=True])``):
``stage0`` is ``f0`` = relu(bn1(conv1(x))) (the stem's ``relu``), ``stageK`` the output of ``layerK``
(post-ReLU); ``preact_stageK`` (K >= 1) is ``fK_pre``, the last block's residual sum before its final
ReLU (the block's parameter-free ``preact`` module, lines 51-53 there), ``preact_stage0`` is ``f0``.

Differences from the RepDistiller code, none of which changes the state_dict: ``forward`` returns
logits only (features are read with :class:`kdrun.models.taps.Tapped`), the first conv takes
``in_chans`` channels, every block has a parameter-free ``preact`` (identity) module on its residual
sum, and the final pooling is adaptive (identical to its ``AvgPool2d(8)`` on 32x32 inputs, and it also
accepts other input sizes).
"""
from __future__ import annotations

from torch import Tensor, nn


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (post-activation)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.preact = nn.Identity()  # its output is the residual sum before the final ReLU (a tap point)

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.preact(out + residual).relu()


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck with a residual connection (expansion 4)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.preact = nn.Identity()  # its output is the residual sum before the final ReLU (a tap point)

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.preact(out + residual).relu()


class ResNet(nn.Module):
    """CIFAR ResNet of the given depth; ``num_filters`` = (stem, stage1, stage2, stage3) widths."""

    CLASSIFIER = "fc"

    def __init__(
        self,
        depth: int,
        num_filters: list[int],
        block_name: str = "basicblock",
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        block: type[BasicBlock] | type[Bottleneck]
        if block_name.lower() == "basicblock":
            if (depth - 2) % 6 != 0:
                raise ValueError(f"a BasicBlock CIFAR ResNet needs depth 6n+2, got {depth}")
            n, block = (depth - 2) // 6, BasicBlock
        elif block_name.lower() == "bottleneck":
            if (depth - 2) % 9 != 0:
                raise ValueError(f"a Bottleneck CIFAR ResNet needs depth 9n+2, got {depth}")
            n, block = (depth - 2) // 9, Bottleneck
        else:
            raise ValueError(f"block_name must be 'basicblock' or 'bottleneck', got {block_name!r}")

        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_chans, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, num_filters[1], n)
        self.layer2 = self._make_layer(block, num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(block, num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3] * block.expansion, num_classes)
        last_bn = "bn3" if block is Bottleneck else "bn2"
        # stageK / preact_stageK: RepDistiller's feat[K] with preact False / True (module docstring).
        self.FEATURE_TAPS = {
            "stage0": "relu", "stage1": "layer1", "stage2": "layer2", "stage3": "layer3",
            "preact_stage0": "relu", **{f"preact_stage{k}": f"layer{k}.{n - 1}.preact" for k in (1, 2, 3)},
            "pool": "avgpool",
        }
        # RepDistiller's get_bn_before_relu (models/resnet.py lines 164-176): the last block's last BN.
        self.BN_BEFORE_RELU = tuple(f"layer{k}.{n - 1}.{last_bn}" for k in (1, 2, 3))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x).flatten(1)
        return self.fc(x)


def resnet8(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """ResNet-8 (He et al. 2016; CRD/RepDistiller definition), 0.08M parameters at 100 classes."""
    return ResNet(8, [16, 16, 32, 64], "basicblock", num_classes=num_classes, in_chans=in_chans)


def resnet14(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """ResNet-14 (He et al. 2016; CRD/RepDistiller definition), 0.18M parameters at 100 classes."""
    return ResNet(14, [16, 16, 32, 64], "basicblock", num_classes=num_classes, in_chans=in_chans)


def resnet20(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """ResNet-20 (He et al. 2016; CRD/RepDistiller definition), 0.28M parameters at 100 classes."""
    return ResNet(20, [16, 16, 32, 64], "basicblock", num_classes=num_classes, in_chans=in_chans)


def resnet32(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """ResNet-32 (He et al. 2016; CRD/RepDistiller definition), 0.47M parameters at 100 classes."""
    return ResNet(32, [16, 16, 32, 64], "basicblock", num_classes=num_classes, in_chans=in_chans)


def resnet44(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """ResNet-44 (He et al. 2016; CRD/RepDistiller definition), 0.67M parameters at 100 classes."""
    return ResNet(44, [16, 16, 32, 64], "basicblock", num_classes=num_classes, in_chans=in_chans)


def resnet56(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """ResNet-56 (He et al. 2016; CRD/RepDistiller definition), 0.86M parameters at 100 classes."""
    return ResNet(56, [16, 16, 32, 64], "basicblock", num_classes=num_classes, in_chans=in_chans)


def resnet110(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """ResNet-110 (He et al. 2016; CRD/RepDistiller definition), 1.74M parameters at 100 classes."""
    return ResNet(110, [16, 16, 32, 64], "basicblock", num_classes=num_classes, in_chans=in_chans)


def resnet8x4(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """4x-wide ResNet-8 (He et al. 2016; CRD/RepDistiller definition), 1.23M parameters at 100 classes."""
    return ResNet(8, [32, 64, 128, 256], "basicblock", num_classes=num_classes, in_chans=in_chans)


def resnet32x4(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """4x-wide ResNet-32 (He et al. 2016; CRD/RepDistiller definition), 7.43M parameters at 100 classes."""
    return ResNet(32, [32, 64, 128, 256], "basicblock", num_classes=num_classes, in_chans=in_chans)

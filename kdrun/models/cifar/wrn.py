"""Wide residual networks for CIFAR: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Wide ResNets (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016): pre-activation basic
blocks in three stages of widths 16k/32k/64k, depth 6n+4. The definition (attribute names
``conv1, block1..block3, bn1, relu, fc`` and the block layout) follows the CRD/RepDistiller benchmark
(Tian et al., ICLR 2020), also used by mdistiller, so that its released checkpoints load with
``strict=True``.

Taps (RepDistiller ``models/wrn.py`` lines 103-122, ``forward(is_feat=True[, preact=True])``):
``stage0`` is ``f0`` = conv1(x), ``stageK`` the output of ``blockK`` (a pre-activation network: the
raw residual sums). ``preact_stageK`` is RepDistiller's ``preact=True`` feature K, the BN that the next
stage applies first: ``block2.layer.0.bn1`` (K = 1), ``block3.layer.0.bn1`` (K = 2), the final ``bn1``
(K = 3), each followed by an in-place ReLU, which :class:`~kdrun.models.taps.Tapped` does not let
overwrite the tap; ``preact_stage0`` is ``f0``. RepDistiller *re-applies* those BNs to the stage
outputs after the forward (lines 119-121; mdistiller does so in every forward), which in training mode
updates their running statistics a second time; here the tap reads the forward's own BN output (the
same values), so the running statistics are updated once.

Differences from the RepDistiller code, none of which changes the state_dict: ``forward`` returns
logits only, the first conv takes ``in_chans`` channels, and the global pooling is a parameter-free
``avgpool`` module (adaptive; identical to its ``avg_pool2d(out, 8)`` on 32x32 inputs) so that it can
be tapped as ``"pool"``.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, with a 1x1 shortcut when shapes change."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        # The shortcut is the raw input when shapes agree, else a 1x1 conv of the activated input.
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage: ``nb_layers`` basic blocks, the first with the stage's stride (as ``self.layer``)."""

    def __init__(
        self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 inputs."""

    CLASSIFIER = "fc"
    # stageK / preact_stageK: RepDistiller's feat[K] with preact False / True (module docstring).
    FEATURE_TAPS = {
        "stage0": "conv1", "stage1": "block1", "stage2": "block2", "stage3": "block3",
        "preact_stage0": "conv1", "preact_stage1": "block2.layer.0.bn1", "preact_stage2": "block3.layer.0.bn1",
        "preact_stage3": "bn1",
        "pool": "avgpool",
    }
    # mdistiller's get_bn_before_relu (models/cifar/wrn.py lines 116-121): the BNs behind preact_stage1..3.
    BN_BEFORE_RELU = ("block2.layer.0.bn1", "block3.layer.0.bn1", "bn1")

    def __init__(
        self,
        depth: int,
        num_classes: int = 100,
        widen_factor: int = 1,
        drop_rate: float = 0.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"a WideResNet needs depth 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        out = self.avgpool(out).flatten(1)
        return self.fc(out)


def wrn_16_1(num_classes: int = 100, in_chans: int = 3) -> WideResNet:
    """WRN-16-1 (Zagoruyko & Komodakis 2016; CRD/RepDistiller definition), 0.18M parameters at 100 classes."""
    return WideResNet(16, num_classes=num_classes, widen_factor=1, in_chans=in_chans)


def wrn_16_2(num_classes: int = 100, in_chans: int = 3) -> WideResNet:
    """WRN-16-2 (Zagoruyko & Komodakis 2016; CRD/RepDistiller definition), 0.70M parameters at 100 classes."""
    return WideResNet(16, num_classes=num_classes, widen_factor=2, in_chans=in_chans)


def wrn_40_1(num_classes: int = 100, in_chans: int = 3) -> WideResNet:
    """WRN-40-1 (Zagoruyko & Komodakis 2016; CRD/RepDistiller definition), 0.57M parameters at 100 classes."""
    return WideResNet(40, num_classes=num_classes, widen_factor=1, in_chans=in_chans)


def wrn_40_2(num_classes: int = 100, in_chans: int = 3) -> WideResNet:
    """WRN-40-2 (Zagoruyko & Komodakis 2016; CRD/RepDistiller definition), 2.26M parameters at 100 classes."""
    return WideResNet(40, num_classes=num_classes, widen_factor=2, in_chans=in_chans)

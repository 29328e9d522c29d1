"""VGG networks for CIFAR: vgg8, vgg11, vgg13, vgg16, vgg19 (all with batch norm).

VGG (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015) in the CIFAR form of the CRD/RepDistiller benchmark (Tian et al., ICLR 2020), also used by
mdistiller: five conv blocks ``block0..block4`` separated by ``pool0..pool3`` max-pools, a global
average pool ``pool4`` and a single linear ``classifier`` on 512 features. As in that benchmark's
model table, the names ``vgg8``...``vgg19`` denote the batch-norm variants (``vgg8_bn``... in the
RepDistiller code). ``vgg8`` is the benchmark's shallow 5-conv member.

Faithful detail: each block ends with its last BatchNorm (the ReLU after it is applied in
``forward``), and ``pool3`` is skipped for 32x32 inputs (it is used only for 64x64 inputs), so the
last two blocks both run at 4x4.

Taps (RepDistiller ``models/vgg.py`` lines 64-98, ``forward(is_feat=True[, preact=True])``): ``stageK``
is ``feat[K]``, the *post-ReLU* block output (the parameter-free ``act0..act4`` ReLU modules, so that a
hook sees it); ``preact_stageK`` (K >= 1) is ``fK_pre``, the block's BatchNorm output before that ReLU
(``blockK``); ``preact_stage0`` is ``f0``, post-ReLU, as in RepDistiller's ``preact=True`` list.

Differences from the RepDistiller code, none of which changes the state_dict: ``forward`` returns
logits only, the first conv takes ``in_chans`` channels, and the functional ReLUs after the blocks are
the parameter-free modules ``act0..act4``.
"""
from __future__ import annotations

import math

from torch import Tensor, nn

CFG: dict[str, list[list[int]]] = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
    "S": [[64], [128], [256], [512], [512]],
}


class VGG(nn.Module):
    """VGG with five conv blocks; ``cfg`` lists the conv widths of each block."""

    CLASSIFIER = "classifier"
    # stageK: RepDistiller's feat[K] (post-ReLU); preact_stageK: its preact=True list (block BN output).
    FEATURE_TAPS = {
        "stage0": "act0",
        "stage1": "act1",
        "stage2": "act2",
        "stage3": "act3",
        "stage4": "act4",
        "preact_stage0": "act0",
        "preact_stage1": "block1",
        "preact_stage2": "block2",
        "preact_stage3": "block3",
        "preact_stage4": "block4",
        "pool": "pool4",
    }


    def __init__(
        self, cfg: list[list[int]], batch_norm: bool = True, num_classes: int = 100, in_chans: int = 3
    ) -> None:
        super().__init__()
        self.block0 = self._make_layers(cfg[0], batch_norm, in_chans)
        self.block1 = self._make_layers(cfg[1], batch_norm, cfg[0][-1])
        self.block2 = self._make_layers(cfg[2], batch_norm, cfg[1][-1])
        self.block3 = self._make_layers(cfg[3], batch_norm, cfg[2][-1])
        self.block4 = self._make_layers(cfg[4], batch_norm, cfg[3][-1])

        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        # Not in-place: the pre-activation block outputs stay intact for the preact_stageK taps.
        self.act0, self.act1, self.act2, self.act3, self.act4 = (nn.ReLU() for _ in range(5))
        # mdistiller's get_bn_before_relu (models/cifar/vgg.py lines 61-66): the BNs whose outputs are
        # preact_stage1..4, read by OFD for its margin.
        self.BN_BEFORE_RELU = tuple(f"block{k}.{len(getattr(self, f'block{k}')) - 1}" for k in range(1, 5))

        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        self._initialize_weights()

    @staticmethod
    def _make_layers(widths: list[int], batch_norm: bool, in_channels: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for v in widths:
            conv = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            layers += [conv, nn.BatchNorm2d(v), nn.ReLU(inplace=True)] if batch_norm else [conv, nn.ReLU(inplace=True)]
            in_channels = v
        return nn.Sequential(*layers[:-1])  # the block's last ReLU is applied in forward()

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
        h = x.shape[2]
        x = self.pool0(self.act0(self.block0(x)))
        x = self.pool1(self.act1(self.block1(x)))
        x = self.pool2(self.act2(self.block2(x)))
        x = self.act3(self.block3(x))
        if h == 64:
            x = self.pool3(x)
        x = self.act4(self.block4(x))
        x = self.pool4(x).flatten(1)
        return self.classifier(x)


def vgg8(num_classes: int = 100, in_chans: int = 3) -> VGG:
    """VGG-8 with BN (Simonyan & Zisserman 2015; CRD/RepDistiller definition), 3.97M parameters at 100 classes."""
    return VGG(CFG["S"], batch_norm=True, num_classes=num_classes, in_chans=in_chans)


def vgg11(num_classes: int = 100, in_chans: int = 3) -> VGG:
    """VGG-11 with BN (Simonyan & Zisserman 2015; CRD/RepDistiller definition), 9.28M parameters at 100 classes."""
    return VGG(CFG["A"], batch_norm=True, num_classes=num_classes, in_chans=in_chans)


def vgg13(num_classes: int = 100, in_chans: int = 3) -> VGG:
    """VGG-13 with BN (Simonyan & Zisserman 2015; CRD/RepDistiller definition), 9.46M parameters at 100 classes."""
    return VGG(CFG["B"], batch_norm=True, num_classes=num_classes, in_chans=in_chans)


def vgg16(num_classes: int = 100, in_chans: int = 3) -> VGG:
    """VGG-16 with BN (Simonyan & Zisserman 2015; CRD/RepDistiller definition), 14.77M parameters at 100 classes."""
    return VGG(CFG["D"], batch_norm=True, num_classes=num_classes, in_chans=in_chans)


def vgg19(num_classes: int = 100, in_chans: int = 3) -> VGG:
    """VGG-19 with BN (Simonyan & Zisserman 2015; CRD/RepDistiller definition), 20.09M parameters at 100 classes."""
    return VGG(CFG["E"], batch_norm=True, num_classes=num_classes, in_chans=in_chans)

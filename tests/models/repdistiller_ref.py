"""RepDistiller's ``forward(is_feat=True[, preact=True])`` re-derived for every CIFAR zoo model.

Written from the RepDistiller code (HobbitLong/RepDistiller ``models/*.py``, cited per function) with
the model's own conv/BN/linear modules and plain functional ops (non-in-place ReLUs, a re-derived channel
shuffle and split), so that a kdrun tap reading another tensor differs. Each function returns
(feats, preact feats, pooled feature), stage 0 first: mdistiller's ``feats`` / ``preact_feats`` /
``pooled_feat``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.models import cifar

Feats = tuple[list[Tensor], list[Tensor], Tensor]  # (feats, preact feats, pooled), stage 0 first


def _shuffle(x: Tensor, g: int) -> Tensor:
    n, c, h, w = x.shape  # RepDistiller ShuffleBlock: [N,g,C/g,H,W] -> [N,C/g,g,H,W]
    return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def _ref_residual(m: nn.Module, x: Tensor, layers: list[nn.Module]) -> Feats:
    """The post-activation residual stages both RepDistiller ResNet files share: relu(bn1(conv1(x))), then
    per block relu(bn(conv(...)) + shortcut(x)); the stage's preact is the last block's sum."""
    x = F.relu(m.bn1(m.conv1(x)))
    feats, pres = [x], [x]
    for layer in layers:
        for b in layer:
            out = F.relu(b.bn1(b.conv1(x)))
            if hasattr(b, "conv3"):
                out = b.bn3(b.conv3(F.relu(b.bn2(b.conv2(out)))))
            else:
                out = b.bn2(b.conv2(out))
            shortcut = getattr(b, "shortcut", None) or getattr(b, "downsample", None)
            pre = out + (x if shortcut is None or len(shortcut) == 0 else shortcut(x))
            x = F.relu(pre)
        feats.append(x)
        pres.append(pre)
    return feats, pres, x.mean(dim=(2, 3))


def ref_resnet(m: nn.Module, x: Tensor) -> Feats:
    """RepDistiller models/resnet.py: BasicBlock lines 38-57, Bottleneck 77-100, forward 178-200."""
    return _ref_residual(m, x, [m.layer1, m.layer2, m.layer3])


def ref_resnetv2(m: nn.Module, x: Tensor) -> Feats:
    """RepDistiller models/resnetv2.py: BasicBlock lines 30-39, Bottleneck 62-72, forward 141-160."""
    return _ref_residual(m, x, [m.layer1, m.layer2, m.layer3, m.layer4])


def ref_wrn(m: nn.Module, x: Tensor) -> Feats:
    """RepDistiller models/wrn.py: BasicBlock lines 29-37, forward 103-122 (preact: the next stage's
    first BN applied to the stage output, lines 119-121)."""
    out = m.conv1(x)
    feats = [out]
    for stage in (m.block1, m.block2, m.block3):
        for b in stage.layer:
            if b.convShortcut is not None:
                a = F.relu(b.bn1(out))
                res = b.convShortcut(a)
            else:
                a = F.relu(b.bn1(out))
                res = out
            out = res + b.conv2(F.relu(b.bn2(b.conv1(a))))
        feats.append(out)
    pres = [feats[0], m.block2.layer[0].bn1(feats[1]), m.block3.layer[0].bn1(feats[2]), m.bn1(feats[3])]
    return feats, pres, F.relu(m.bn1(out)).mean(dim=(2, 3))


def ref_vgg(m: nn.Module, x: Tensor) -> Feats:
    """RepDistiller models/vgg.py lines 64-98."""
    h = x.shape[2]
    x = F.relu(m.block0(x))
    feats, pres = [x], [x]
    for k in (1, 2, 3, 4):
        if k < 4 or h == 64:  # pool0..pool2 always, pool3 only for 64x64 inputs
            x = F.max_pool2d(x, 2)
        x = getattr(m, f"block{k}")(x)
        pres.append(x)
        x = F.relu(x)
        feats.append(x)
    return feats, pres, x.mean(dim=(2, 3))


def ref_mobilenetv2(m: nn.Module, x: Tensor) -> Feats:
    """RepDistiller models/mobilenetv2.py lines 132-160 (preact=True returns the same list)."""
    out = m.conv1(x)
    feats = [out]
    for i, block in enumerate(m.blocks):
        out = block(out)
        if i in (1, 2, 4, 6):
            feats.append(out)
    pooled = m.conv2(out).mean(dim=(2, 3))
    return feats, list(feats), pooled


def ref_shufflev1(m: nn.Module, x: Tensor) -> Feats:
    """RepDistiller models/ShuffleNetv1.py: Bottleneck lines 41-53, forward 95-113."""
    x = F.relu(m.bn1(m.conv1(x)))
    feats, pres = [x], [x]
    for layer in (m.layer1, m.layer2, m.layer3):
        for b in layer:
            out = F.relu(b.bn1(b.conv1(x)))
            out = _shuffle(out, b.shuffle1.groups)
            out = F.relu(b.bn2(b.conv2(out)))
            out = b.bn3(b.conv3(out))
            if b.stride == 2:
                pre = torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
            else:
                pre = out + x
            x = F.relu(pre)
        feats.append(x)
        pres.append(pre)
    return feats, pres, x.mean(dim=(2, 3))


def ref_shufflev2(m: nn.Module, x: Tensor) -> Feats:
    """RepDistiller models/ShuffleNetv2.py: BasicBlock lines 48-61 (preact is *not* shuffled), DownBlock
    88-99, forward 140-159."""
    x = F.relu(m.bn1(m.conv1(x)))
    feats, pres = [x], [x]
    for layer in (m.layer1, m.layer2, m.layer3):
        d = layer[0]
        out1 = F.relu(d.bn2(d.conv2(d.bn1(d.conv1(x)))))
        out2 = F.relu(d.bn5(d.conv5(d.bn4(d.conv4(F.relu(d.bn3(d.conv3(x))))))))
        x = _shuffle(torch.cat([out1, out2], 1), 2)
        for b in list(layer)[1:]:
            c = int(x.shape[1] * 0.5)
            x1, x2 = x[:, :c], x[:, c:]
            out = F.relu(b.bn1(b.conv1(x2)))
            out = b.bn2(b.conv2(out))
            pre_branch = b.bn3(b.conv3(out))
            pre = torch.cat([x1, pre_branch], 1)
            x = _shuffle(torch.cat([x1, F.relu(pre_branch)], 1), 2)
        feats.append(x)
        pres.append(pre)
    return feats, pres, F.relu(m.bn2(m.conv2(x))).mean(dim=(2, 3))


REFS = {
    **{n: ref_resnet for n in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                               "resnet8x4", "resnet32x4")},
    **{n: ref_wrn for n in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")},
    **{n: ref_vgg for n in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "mobilenetv2": ref_mobilenetv2,
    "ShuffleV1": ref_shufflev1,
    "ShuffleV2": ref_shufflev2,
    **{n: ref_resnetv2 for n in ("ResNet18", "ResNet34", "ResNet50", "ResNet101")},
}
assert set(REFS) == {n for n in cifar.__all__ if n != "mobile_half"}


def randomise(model: nn.Module) -> None:
    """Trained-like weights: BN affine parameters and statistics away from their init, so that the
    pre-activation features have negative values and the ReLU matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "bn" in name or p.dim() == 1 else 0.01))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)

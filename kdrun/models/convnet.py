"""A small VGG-style CNN for the offline ``digits`` data set (quickstart, tests, CPU demos).

``stages`` × [conv3×3 → BN → ReLU] blocks of the given ``widths``, each stage followed by 2×2 max
pooling, then global average pooling and a linear classifier. ``norm="none"`` drops the BatchNorm
(the convolutions get a bias instead): a model whose output does not depend on how a batch is split
across processes, which the DDP equivalence tests need. It exists because the papers' models
(timm ViTs/RegNets, the CIFAR zoo) take minutes per epoch on a laptop CPU, while a quickstart must
distil a teacher into a student in well under three minutes. Feature taps: ``stage1``… and
``pre_logits`` (the pooled feature).
"""
from __future__ import annotations

from typing import Annotated, Literal

from torch import Tensor, nn

from kdrun.config import Ge


class ConvNet(nn.Module):
    CLASSIFIER = "fc"

    def __init__(self, widths: list[int], num_classes: Annotated[int, Ge(1)] = 10,
                 in_chans: Annotated[int, Ge(1)] = 1, convs_per_stage: Annotated[int, Ge(1)] = 1,
                 norm: Literal["bn", "none"] = "bn") -> None:
        super().__init__()
        stages, c = [], in_chans
        for w in widths:
            layers: list[nn.Module] = []
            for _ in range(convs_per_stage):
                if norm == "bn":
                    layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)]
                else:
                    layers += [nn.Conv2d(c, w, 3, padding=1, bias=True)]
                layers.append(nn.ReLU(inplace=True))
                c = w
            layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        self.FEATURE_TAPS = {f"stage{i + 1}": f"stages.{i}" for i in range(len(widths))}

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(x)).flatten(1))

"""OFD: A Comprehensive Overhaul of Feature Distillation (Heo, Kim, Yun, Park, Kwak & Choi, ICCV 2019).

At each tapped stage j a connector r_j (1x1 conv + BN, He-normal init) maps the student's feature to
the teacher's channels, and the teacher's *pre-ReLU* feature T is first passed through the margin ReLU
σ_m(T) = max(T, m) with the per-channel margin m = E[T | T < 0]. The partial L2 distance ignores
positions where the student is already below a negative target:

    d_p(T, S) = Σ_pos (σ_m(T) − S)² · 1[S > σ_m(T) or σ_m(T) > 0],
    ℓ = (1/B) Σ_i Σ_j d_p(T_j,i, r_j(S_j,i)) / 2^{L−1−j},

with later stages weighted more (L stages), the teacher map average-pooled to the student's size, and
the per-sample sum averaged over the batch — exactly mdistiller's ``feat_loss(...).mean(0).sum()``.
Benchmark term weight: 1e-3 (mdistiller ``CFG.OFD.LOSS.FEAT_WEIGHT``, the official CIFAR code's
``/ 1000``); taps stage1–stage3 (mdistiller's ``preact_feats[1:]``).

Approximations (taps read module *outputs*):

* The margin. The paper derives m per channel from the statistics of the teacher's BN before the ReLU
  (the conditional mean of a Gaussian below 0). A loss term cannot see the teacher's modules, so here m
  is estimated from the data: the running mean of the teacher's negative responses per channel,
  accumulated over the training forwards that run with autograd (buffers ``neg_sum_j``/``neg_count_j``,
  saved in checkpoints; the teacher is frozen, so the estimate converges to E[T | T < 0] without the
  Gaussian assumption; a no-grad re-evaluation of a batch does not count it twice).
* Pre-ReLU features. The CIFAR ResNets' stage outputs are post-ReLU (their final ReLU is functional), so
  ``stage1``.. carry no negative values, the estimated margin is 0, and the loss becomes: match the
  teacher where it is positive, push the student's connector output to ≤ 0 where the teacher is 0. Where
  a model has an activation *module* after its last residual sum (timm ResNets: ``layerX.N.act2`` /
  ``act3``), the tap ``"layerX.N.act2:input"`` is the true pre-ReLU feature and the method is exact up
  to the margin estimate. The student side tolerates post-ReLU features (the connector's BN output is
  signed anyway), at the cost of the information the ReLU removed.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.losses._common import as_taps, need_setup
from kdrun.losses.base import DistillLoss, tap
from kdrun.models.taps import ModelOutput


def connector(s_channels: int, t_channels: int) -> nn.Sequential:
    """OFD's connector: 1x1 conv (no bias, N(0, 2/(k²·C_out))) + BatchNorm (γ = 1, β = 0)."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / t_channels))
    bn = nn.BatchNorm2d(t_channels)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


def ofd_stage_loss(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    """Partial L2 with the margin ReLU, summed per sample and averaged over the batch."""
    m = margin.to(source).view(1, -1, 1, 1)
    target = torch.maximum(target, m)
    mask = (source > target) | (target > 0)
    return ((source - target).pow(2) * mask).flatten(1).sum(1).mean()


class OFD(DistillLoss):
    def __init__(self, student_taps: Sequence[str] = ("stage1", "stage2", "stage3"),
                 teacher_taps: Sequence[str] = ("stage1", "stage2", "stage3")) -> None:
        super().__init__()
        self.student_taps = as_taps(student_taps, "student_taps")
        self.teacher_taps = as_taps(teacher_taps, "teacher_taps")
        if len(self.student_taps) != len(self.teacher_taps):
            raise ValueError("OFD pairs stages: student_taps and teacher_taps must have the same length")
        self.connectors: nn.ModuleList | None = None

    def setup(self, student: dict[str, Any], teacher: dict[str, Any]) -> None:
        conns = []
        for j, (a, b) in enumerate(zip(self.student_taps, self.teacher_taps)):
            s_shape, t_shape = tuple(student[a]), tuple(teacher[b])
            if len(s_shape) != 3 or len(t_shape) != 3:
                raise ValueError(f"OFD needs [C, H, W] feature maps; taps {a}/{b} give {s_shape}/{t_shape}")
            conns.append(connector(int(s_shape[0]), int(t_shape[0])))
            c = int(t_shape[0])
            self.register_buffer(f"neg_sum_{j}", torch.zeros(c, dtype=torch.float64))
            self.register_buffer(f"neg_count_{j}", torch.zeros(c, dtype=torch.float64))
        self.connectors = nn.ModuleList(conns)

    def margin(self, j: int) -> Tensor:
        """The current per-channel margin estimate E[T | T < 0] of stage j (0 where no negatives seen)."""
        total, count = getattr(self, f"neg_sum_{j}"), getattr(self, f"neg_count_{j}")
        return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total)).float()

    @torch.no_grad()
    def _observe(self, j: int, ft: Tensor) -> None:
        neg = ft.double().clamp(max=0)
        getattr(self, f"neg_sum_{j}").add_(neg.sum(dim=(0, 2, 3)))
        getattr(self, f"neg_count_{j}").add_((ft < 0).sum(dim=(0, 2, 3)).double())

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:
        need_setup(self, self.connectors)
        assert self.connectors is not None
        n = len(self.student_taps)
        losses = []
        for j, (a, b) in enumerate(zip(self.student_taps, self.teacher_taps)):
            fs = self.connectors[j](tap(s, a)).float()
            ft = tap(t, b).detach().float()
            if self.training and torch.is_grad_enabled():  # not in a no-grad re-evaluation of the batch
                self._observe(j, ft)
            ft = F.adaptive_avg_pool2d(ft, fs.shape[-2:])
            losses.append(ofd_stage_loss(fs, ft, self.margin(j)) / 2 ** (n - j - 1))
        return torch.stack(losses).sum()

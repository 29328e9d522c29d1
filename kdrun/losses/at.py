"""Attention Transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

For a feature map F ∈ ℝ^{C×H×W} the spatial attention map is a(F) = vec((1/C) Σ_c F_c^p) normalised to
unit L2 norm (p = 2). For every tapped stage j,

    ℓ_j = (1/(B·H_j·W_j)) Σ_i ‖a(F_s,i^j) − a(F_t,i^j)‖²,     ℓ = Σ_j ℓ_j,

i.e. ``(at(f_s) − at(f_t)).pow(2).mean()`` summed over stages, as in the CRD/RepDistiller and
mdistiller benchmarks (weight β = 1000; stages 1–3 of the CIFAR networks: mdistiller uses ``feats[1:]``
of [stem, stage1, stage2, stage3]). If the student and teacher maps of a stage differ in resolution the
larger one is average-pooled to the smaller (mdistiller). Zero when the maps are equal (up to a
positive channel-mean scale); per-sample mean, so batch-size invariant.
"""
from __future__ import annotations

from typing import Annotated, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdrun.config import Gt
from kdrun.losses._common import as_taps
from kdrun.losses.base import DistillLoss, tap
from kdrun.models.taps import ModelOutput


def attention_map(f: Tensor, p: float) -> Tensor:
    """Unit-norm spatial attention map vec(mean_c F_c^p), one row per sample."""
    return F.normalize(f.float().pow(p).mean(1).reshape(f.shape[0], -1), dim=1)


def at_stage_loss(fs: Tensor, ft: Tensor, p: float) -> Tensor:
    sh, th = fs.shape[-2:], ft.shape[-2:]
    if sh != th:  # pool the larger map to the smaller (mdistiller)
        if sh[0] * sh[1] > th[0] * th[1]:
            fs = F.adaptive_avg_pool2d(fs, th)
        else:
            ft = F.adaptive_avg_pool2d(ft, sh)
    return (attention_map(fs, p) - attention_map(ft.detach(), p)).pow(2).mean()


class AT(DistillLoss):
    def __init__(self, student_taps: Sequence[str] = ("stage1", "stage2", "stage3"),
                 teacher_taps: Sequence[str] = ("stage1", "stage2", "stage3"),
                 p: Annotated[float, Gt(0.0)] = 2.0) -> None:
        super().__init__()
        self.student_taps = as_taps(student_taps, "student_taps")
        self.teacher_taps = as_taps(teacher_taps, "teacher_taps")
        if len(self.student_taps) != len(self.teacher_taps):
            raise ValueError(f"AT pairs stages: student_taps {self.student_taps} and teacher_taps "
                             f"{self.teacher_taps} must have the same length")
        self.p = float(p)

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:
        return torch.stack([at_stage_loss(tap(s, a), tap(t, b), self.p)
                            for a, b in zip(self.student_taps, self.teacher_taps)]).sum()

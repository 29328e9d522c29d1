"""Smooth-L1 feature matching through a projector (VkD: Miles, Elezi & Deng, CVPR 2024; the feature
term MoKD builds on).

With z_s, z_t the student and teacher features pooled to one vector per sample (``pre_logits`` by
default: the classifier inputs) and (ẑ_s, ẑ_t) = P(z_s, z_t) the projector's output (VkD: an orthogonal
map on the student and a non-affine layer norm on the teacher; MoKD: the subspace projector),

    ℓ = (1/(B·D)) Σ_{i,d} SmoothL1_β(ẑ_s[i,d] − ẑ_t[i,d]),
    SmoothL1_β(x) = 0.5 x² / β if |x| < β else |x| − 0.5 β,

i.e. ``F.smooth_l1_loss`` with its mean reduction, as in VkD's training code (β = 1, weight α = 1).
Zero when the projected features coincide; a per-sample mean, so batch-size invariant.

``projector`` is the projector config group's partial (``projector: ${projector}`` in the yaml); None is
the identity (dims must match).
"""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from torch import Tensor

from kdrun.config import Gt
from kdrun.losses._common import ProjectedFeatureLoss, ProjectorFactory
from kdrun.losses.base import tap
from kdrun.models.taps import ModelOutput


class SmoothL1(ProjectedFeatureLoss):
    def __init__(self, projector: ProjectorFactory | None = None, student_tap: str = "pre_logits",
                 teacher_tap: str = "pre_logits", beta: Annotated[float, Gt(0.0)] = 1.0) -> None:
        super().__init__()
        self._init_projected(projector, student_tap, teacher_tap)
        self.beta = float(beta)

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:
        zs, zt = self.projected(tap(s, self.student_tap), tap(t, self.teacher_tap))
        return F.smooth_l1_loss(zs, zt, beta=self.beta)

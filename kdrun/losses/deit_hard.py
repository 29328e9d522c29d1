"""DeiT hard-label distillation (Touvron et al., ICML 2021, §5 "Hard-label distillation").

ℓ = CE(ψ(z_dist), y_t) with y_t = argmax_c z_t(c): the student's distillation-token head learns the
teacher's hard decision. This is what DeiT's reported "(KD)" rows use (``--distillation-type hard``),
and DeiT's own ablation found it better than soft KL for a convnet teacher. The global objective in
DeiT is ½·CE(class head, y) + ½·this term (``balancer=fixed`` with 0.5/0.5 does that).

``student_logits`` selects the student head (``dist_logits`` for a ``deit_*_distilled_*`` student,
``logits`` for any other model). Computed in fp32; batch-mean.
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from kdrun.losses.base import DistillLoss, tap
from kdrun.models.taps import ModelOutput


class DeiTHard(DistillLoss):
    def __init__(self, student_logits: Literal["logits", "dist_logits"] = "dist_logits") -> None:
        super().__init__()
        self.student_logits = student_logits
        self.student_taps = (student_logits,)
        self.teacher_taps = ("logits",)

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:
        return F.cross_entropy(tap(s, self.student_logits).float(), t.logits.detach().argmax(dim=-1))

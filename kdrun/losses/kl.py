"""Hinton et al. (2015) logit distillation: T² · KL(p_teacher^T ‖ p_student^T).

ℓ = T² · Σ_c p_t(c) [log p_t(c) − log p_s(c)], with p^T = softmax(z / T), averaged over the batch
(``batchmean``, the true KL per sample). The T² keeps the gradient magnitude independent of T
(Hinton et al. §2). The loss is computed in fp32 whatever the autocast dtype, because log-softmax of
bf16 logits divided by T loses the small probabilities KD is about.

``student_logits`` selects which student head is distilled: ``logits`` (default) or ``dist_logits``
(DeiT's distillation token, Touvron et al. 2021). Teacher probabilities carry no gradient.

``standardize=True`` is logit standardisation (Sun et al., CVPR 2024): both logit vectors are z-scored
over the classes (:func:`~kdrun.losses._common.standardize_logits`) before the division by T, which then
acts as a *base* temperature, and the T² factor stays — as the official code does
(sunshangquan/logit-standardization-KD @ f6e5aa5, ``mdistiller/distillers/KD.py`` lines 12-19: normalise
both when ``logit_stand``, then the usual KD at ``temperature``, ``loss_kd *= temperature**2``). The
student's standardisation is inside the graph (its gradient flows through the mean and std), the
teacher's is on detached logits. ``conf/distill/kl_ls.yaml`` holds the paper's CIFAR-100 setting.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch.nn.functional as F
from torch import Tensor

from kdrun.config import Gt
from kdrun.losses._common import standardize_logits
from kdrun.losses.base import DistillLoss, tap
from kdrun.models.taps import ModelOutput


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                  standardize: bool = False) -> Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), mean over the batch; with ``standardize``, s and t are
    z-scored per sample first (logit standardisation)."""
    t = temperature
    zs, zt = student_logits.float(), teacher_logits.detach().float()
    if standardize:
        zs, zt = standardize_logits(zs), standardize_logits(zt)
    log_ps = F.log_softmax(zs / t, dim=-1)
    log_pt = F.log_softmax(zt / t, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * (t * t)


class KL(DistillLoss):
    def __init__(self, temperature: Annotated[float, Gt(0.0)] = 4.0,
                 student_logits: Literal["logits", "dist_logits"] = "logits", standardize: bool = False) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.standardize = bool(standardize)
        self.student_logits = student_logits
        self.student_taps = (student_logits,)
        self.teacher_taps = ("logits",)

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:
        return kl_divergence(tap(s, self.student_logits), t.logits, self.temperature, self.standardize)

"""Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu & Liang, CVPR 2022).

The KD loss is split at the target class t. With p = softmax(z / T) for student (s) and teacher (𝒯):

* binary probabilities b = (p_t, 1 − p_t) and TCKD = KL(b^𝒯 ‖ b^s);
* the distribution over the non-target classes p̂_c = p_c / (1 − p_t), c ≠ t, and NCKD = KL(p̂^𝒯 ‖ p̂^s);

    ℓ = w(step) · T² · (α · TCKD + β · NCKD),   averaged over the batch,

with w(step) the warm-up of the official code: mdistiller multiplies by min(epoch / 20, 1) with 1-based
epochs (``mdistiller/distillers/DKD.py`` line 72), a staircase that
:func:`~kdrun.losses._common.warmup_factor` reproduces at every optimiser step (``warmup: epoch``;
``warmup: linear`` ramps per step instead). Everything is computed from log-sum-exps in fp32, so
p_t → 1 does not produce log 0 (mdistiller takes ``log`` of the summed binary probabilities).

Defaults follow mdistiller's CIFAR-100 configuration (``CFG.DKD``): α = 1, β = 8, T = 4, and
``conf/distill/dkd.yaml`` sets its warm-up of 20 epochs (``warmup_epochs``; the class default 0 is
off). The steps per epoch come from :meth:`bind` (the loader's real count: 781 on CIFAR-100 at batch
64 with ``drop_last``), the step from :meth:`set_progress` (0-based optimiser step).

Note: a balancer that works on log L (MoKD/DTO-style ∇log L) is blind to a multiplicative warm-up,
since ∇log(w·L) = ∇log L.

``standardize=True`` is logit standardisation (Sun et al., CVPR 2024): both logit vectors are z-scored
over the classes (:func:`~kdrun.losses._common.standardize_logits`) before everything above, T becomes a
base temperature and T² stays, as in the official code (sunshangquan/logit-standardization-KD @ f6e5aa5,
``mdistiller/distillers/DKD.py`` lines 12-14: normalise both when ``logit_stand``, before the masks and
the division by T). ``conf/distill/dkd_ls.yaml`` holds the paper's CIFAR-100 setting.

Targets must be class indices ``[B]``; soft targets ``[B, C]`` (mixup) are reduced to their arg-max,
because DKD needs one target class per sample.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdrun.config import Ge, Gt
from kdrun.losses._common import WarmupMode, standardize_logits, warmup_factor
from kdrun.losses.base import DataInfo, DistillLoss, tap
from kdrun.models.taps import ModelOutput


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float, beta: float,
             temperature: float, standardize: bool = False) -> Tensor:
    """T² · (α · TCKD + β · NCKD), mean over the batch (no warm-up); with ``standardize``, both logit
    vectors are z-scored per sample first (logit standardisation)."""
    t = temperature
    zs, zt = student_logits.float(), teacher_logits.detach().float()
    if standardize:
        zs, zt = standardize_logits(zs), standardize_logits(zt)
    zs, zt = zs / t, zt / t
    if target.dim() > 1:
        target = target.argmax(dim=-1)
    gt = F.one_hot(target.long(), zs.shape[-1]).bool()
    neg_inf = torch.finfo(zs.dtype).min

    def binary_log_probs(z: Tensor) -> Tensor:
        lse = torch.logsumexp(z, dim=-1)
        log_target = z.masked_select(gt) - lse
        log_other = torch.logsumexp(z.masked_fill(gt, neg_inf), dim=-1) - lse
        return torch.stack([log_target, log_other], dim=-1)

    log_bs, log_bt = binary_log_probs(zs), binary_log_probs(zt)
    tckd = (log_bt.exp() * (log_bt - log_bs)).sum(-1)
    # Non-target distribution: the target logit is pushed to -1e4 so that its probability is exactly 0
    # (finite, unlike -inf, so 0·(log 0 − log 0) never appears).
    log_ps_other = F.log_softmax(zs.masked_fill(gt, -1e4), dim=-1)
    log_pt_other = F.log_softmax(zt.masked_fill(gt, -1e4), dim=-1)
    nckd = (log_pt_other.exp() * (log_pt_other - log_ps_other)).sum(-1)
    return (alpha * tckd + beta * nckd).mean() * (t * t)


class DKD(DistillLoss):
    def __init__(self, alpha: Annotated[float, Ge(0.0)] = 1.0, beta: Annotated[float, Ge(0.0)] = 8.0,
                 temperature: Annotated[float, Gt(0.0)] = 4.0, warmup_epochs: Annotated[float, Ge(0.0)] = 0.0,
                 warmup: WarmupMode = "epoch",
                 student_logits: Literal["logits", "dist_logits"] = "logits", standardize: bool = False) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.warmup_epochs = float(warmup_epochs)
        self.warmup = warmup
        self.steps_per_epoch: int | None = None  # from bind()
        self.standardize = bool(standardize)
        self.student_logits = student_logits
        self.student_taps = (student_logits,)
        self.teacher_taps = ("logits",)

    def bind(self, info: DataInfo) -> None:
        self.steps_per_epoch = int(info.steps_per_epoch)

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:
        loss = dkd_loss(tap(s, self.student_logits), t.logits, target, self.alpha, self.beta,
                        self.temperature, self.standardize)
        return loss * warmup_factor(self.progress_step, self.warmup_epochs, self.steps_per_epoch, self.warmup)

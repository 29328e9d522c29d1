"""Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018; TNNLS 2020).

Each batch defines, per sample i, a distribution over the batch from cosine similarities of the pooled
features (``pre_logits``): k_ij = (cos(f_i, f_j) + 1)/2 and p_{j|i} = k_ij / Σ_j k_ij, for student (q)
and teacher (p). The loss is the KL divergence between them, with ε = 1e-7 as in the reference code:

    ℓ = (1/B²) Σ_i Σ_j p_{j|i} log((p_{j|i} + ε)/(q_{j|i} + ε)),

the mean over the B×B matrix, as the peers normalise it (``torch.mean`` in RepDistiller's
``distiller_zoo/PKT.py`` line 40 and mdistiller's ``distillers/PKT.py`` lines 31-34), so that the
published weight 30000 (``conf/distill/pkt.yaml``) means the same at every batch size. This is the mean
row KL divided by B, not a per-sample mean: a deliberate exception to the
:class:`~kdrun.losses.base.DistillLoss` batch-mean convention, because the benchmark's numbers come from
this scale (its gradient per sample shrinks as the batch grows, in the peers' code too).

Batch structure: the distributions live on the batch, so the loss depends on its composition. When the
batch is duplicated every row KL is unchanged, so the loss halves (1/B²); it is zero when the student's
features equal the teacher's up to positive per-sample scales.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdrun.losses.base import DistillLoss, tap
from kdrun.models.taps import ModelOutput


def _conditional(f: Tensor, eps: float) -> Tensor:
    f = f / (f.norm(dim=1, keepdim=True) + eps)
    f = torch.nan_to_num(f)  # the reference code zeroes NaNs of zero vectors
    k = (f @ f.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


def pkt_loss(fs: Tensor, ft: Tensor, eps: float = 1e-7) -> Tensor:
    """Mean over the B×B matrix of p log((p + ε)/(q + ε)) = (1/B²) Σ_i KL_i, the peers' normalisation."""
    q = _conditional(fs.float().reshape(fs.shape[0], -1), eps)
    with torch.no_grad():
        p = _conditional(ft.detach().float().reshape(ft.shape[0], -1), eps)
    return (p * torch.log((p + eps) / (q + eps))).mean()


class PKT(DistillLoss):
    def __init__(self, student_tap: str = "pre_logits", teacher_tap: str = "pre_logits") -> None:
        super().__init__()
        self.student_tap = str(student_tap)
        self.teacher_tap = str(teacher_tap)
        self.student_taps = (self.student_tap,)
        self.teacher_taps = (self.teacher_tap,)

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:
        return pkt_loss(tap(s, self.student_tap), tap(t, self.teacher_tap))

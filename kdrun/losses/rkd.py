"""Relational Knowledge Distillation (Park, Kim, Lu & Cho, CVPR 2019).

On the pooled penultimate features e_i (``pre_logits``), RKD matches pairwise distances and triplet
angles of the batch:

    ψ_D(i, j) = ‖e_i − e_j‖ / μ,   μ = mean of the non-zero pairwise distances,
    ψ_A(i, j, k) = ⟨(e_i − e_j)/‖e_i − e_j‖, (e_k − e_j)/‖e_k − e_j‖⟩,
    ℓ = w_D · mean_{i,j} SmoothL1(ψ_D^s − ψ_D^t) + w_A · mean_{i,j,k} SmoothL1(ψ_A^s − ψ_A^t),

with w_D = 25, w_A = 50 (the paper's and the CRD/mdistiller benchmarks' weights; term weight 1), the
Huber loss with β = 1, and ε = 1e-12 under the square root of the distances — the benchmark code
line by line. Zero when the student's features equal the teacher's (or are a scaled copy: ψ_D and
ψ_A are scale-invariant).

Batch structure: RKD is a loss on the batch's relations, not a mean of per-sample losses, so it changes
with the batch composition. It is not even invariant to duplicating the batch: a duplicated sample is at
distance √ε from its copy, which enters the mean distance μ. It is invariant to permuting the batch.
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor

from kdrun.config import Ge, Gt
from kdrun.losses.base import DistillLoss, tap
from kdrun.models.taps import ModelOutput


def pairwise_distances(e: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """‖e_i − e_j‖ (clamped at ε before the root), with an exact zero diagonal."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def angles(e: Tensor) -> Tensor:
    """⟨unit(e_i − e_j), unit(e_k − e_j)⟩ for all (j, i, k), flattened."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


def rkd_loss(fs: Tensor, ft: Tensor, distance_weight: float, angle_weight: float, eps: float = 1e-12,
             squared: bool = False) -> Tensor:
    s = fs.float().reshape(fs.shape[0], -1)
    t = ft.detach().float().reshape(ft.shape[0], -1)
    with torch.no_grad():
        td = pairwise_distances(t, squared, eps)
        td = td / td[td > 0].mean()
        ta = angles(t)
    sd = pairwise_distances(s, squared, eps)
    sd = sd / sd[sd > 0].mean()
    loss_d = F.smooth_l1_loss(sd, td)
    loss_a = F.smooth_l1_loss(angles(s), ta)
    return distance_weight * loss_d + angle_weight * loss_a


class RKD(DistillLoss):
    def __init__(self, student_tap: str = "pre_logits", teacher_tap: str = "pre_logits",
                 distance_weight: Annotated[float, Ge(0.0)] = 25.0, angle_weight: Annotated[float, Ge(0.0)] = 50.0,
                 eps: Annotated[float, Gt(0.0)] = 1e-12, squared: bool = False) -> None:
        super().__init__()
        self.student_tap = str(student_tap)
        self.teacher_tap = str(teacher_tap)
        self.student_taps = (self.student_tap,)
        self.teacher_taps = (self.teacher_tap,)
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)
        self.eps = float(eps)
        self.squared = bool(squared)

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:
        return rkd_loss(tap(s, self.student_tap), tap(t, self.teacher_tap), self.distance_weight,
                        self.angle_weight, self.eps, self.squared)

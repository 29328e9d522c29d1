"""DIST: Knowledge Distillation from A Stronger Teacher (Huang, You, Wang, Qian & Xu, NeurIPS 2022).

Relations instead of exact matching. With Y^s = softmax(Z^s / τ), Y^𝒯 = softmax(Z^𝒯 / τ) ∈ ℝ^{B×C} and
ρ the Pearson correlation,

    inter = 1 − (1/B) Σ_i ρ(Y^s_{i,:}, Y^𝒯_{i,:})      (per sample, across classes)
    intra = 1 − (1/C) Σ_c ρ(Y^s_{:,c}, Y^𝒯_{:,c})      (per class, across the batch)
    ℓ = τ² (β · inter + γ · intra),

exactly as the official implementation (ρ computed as the cosine of the centred vectors with ε = 1e-8
in the denominator). ℓ = 0 when the student's predictions equal the teacher's. The intra-class term
correlates across the batch, so the loss depends on the batch as a whole; it is unchanged when a batch
is duplicated (a correlation of repeated samples equals that of the originals).

Defaults: the class defaults β = γ = 1, τ = 1 are the paper's ImageNet setting; the official code's
``dist_t4`` variant, used for CIFAR-100, is τ = 4 with β = γ = 1, which ``conf/distill/dist.yaml`` uses.
"""
from __future__ import annotations

from typing import Annotated, Literal

from torch import Tensor

from kdrun.config import Ge, Gt
from kdrun.losses.base import DistillLoss, tap
from kdrun.models.taps import ModelOutput


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float, gamma: float, tau: float) -> Tensor:
    """τ² (β · inter-class + γ · intra-class relation loss)."""
    ys = (student_logits.float() / tau).softmax(dim=1)
    yt = (teacher_logits.detach().float() / tau).softmax(dim=1)
    inter = 1.0 - _pearson_rows(ys, yt).mean()
    intra = 1.0 - _pearson_rows(ys.t(), yt.t()).mean()
    return (tau * tau) * (beta * inter + gamma * intra)


class DIST(DistillLoss):
    def __init__(self, beta: Annotated[float, Ge(0.0)] = 1.0, gamma: Annotated[float, Ge(0.0)] = 1.0,
                 tau: Annotated[float, Gt(0.0)] = 1.0,
                 student_logits: Literal["logits", "dist_logits"] = "logits") -> None:
        super().__init__()
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.tau = float(tau)
        self.student_logits = student_logits
        self.student_taps = (student_logits,)
        self.teacher_taps = ("logits",)

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:
        return dist_loss(tap(s, self.student_logits), t.logits, self.beta, self.gamma, self.tau)

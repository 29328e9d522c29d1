"""FAMO: Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023), as a baseline.

FAMO's step (its Algorithm 1 / reference code): π = softmax(ξ); the model descends
Σ πᵢ log Lᵢ / c with c = Σ πᵢ/Lᵢ (raw-gradient weights (πᵢ/Lᵢ)/c, summing to 1); after the
optimiser step, δᵢ = log Lᵢ(θₜ) − log Lᵢ(θₜ₊₁) on the same batch, ξ's gradient is J_softmax(ξ)ᵀ δ, and
``Adam(lr=β, weight_decay=γ)`` steps ξ.

DTO-KD's amortised algorithm *is* this update (DTO-KD §3.1 builds on Liu et al. 2023 and its
practical algorithm keeps FAMO's two-stage loop), so this class is
:class:`kdrun.balancers.dto.DTOAmortised` with ``update="famo"`` fixed: one implementation, two names
(the baseline tables list FAMO separately). FAMO's optional per-objective lower bounds L*
(``log(L − L* + 1e-8)``) are taken as 0, as in its code's default; losses are clamped at ``eps``
instead of shifted by it.

Defaults: β = lr = 0.025 and γ = weight_decay = 0.01 (FAMO's settings for its main benchmarks, also
DTO-KD's), ``optimizer="adam_l2"`` (FAMO's ``torch.optim.Adam`` with L2 weight decay, Cranial-XIX/FAMO
famo.py:20 @0a6ad06 — where DTO-KD's own default is the papers' AdamW),
``next_loss="same_batch"`` (FAMO's extra no-grad forward of the same batch). Corner cases: see
:mod:`kdrun.balancers.dto`. Any k ≥ 2.
"""
from __future__ import annotations

from typing import Annotated, Literal

from kdrun.balancers.dto import DTOAmortised
from kdrun.config import Ge, Gt


class FAMO(DTOAmortised):
    def __init__(
        self,
        lr: Annotated[float, Gt(0.0)] = 0.025,
        weight_decay: Annotated[float, Ge(0.0)] = 0.01,
        next_loss: Literal["same_batch", "lagged"] = "same_batch",
        optimizer: Literal["adam_l2", "adamw", "sgd"] = "adam_l2",
        eps: Annotated[float, Gt(0.0)] = 1e-8,
    ) -> None:
        super().__init__(next_loss=next_loss, update="famo", lr=lr, weight_decay=weight_decay,
                         optimizer=optimizer, eps=eps)

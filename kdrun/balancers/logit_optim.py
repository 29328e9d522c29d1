"""The balancers' own optimiser for their internal parameters (logits, log-variances, task weights).

The engine's optimiser holds only model parameters, so a balancer that *learns* something (FAMO's /
amortised DTO-KD's logits ξ, the uncertainty weighting's log-variances s, GradNorm's task weights w)
steps it itself in ``after_step``. The update is written by hand on plain tensors instead of using a
``torch.optim`` object so that

* its whole state (parameter, first/second moments, step count) lives in the balancer's buffers and
  therefore in the checkpoint's ``state_dict`` (a resumed run continues bit-for-bit), and
* it is a pure function that the tests check against the formulas.

Everything is float64 (the vectors have k ≈ 2 entries; the cost is nil and the arithmetic is then
reproducible across devices to the last bit of a float32 weight).

Rules (``kind``), for a parameter x, gradient g, learning rate η, weight decay λ and step t ≥ 1:

* ``adam_l2`` — ``torch.optim.Adam(weight_decay=λ)``: g ← g + λx (L2 penalty folded into the
  gradient, which is what FAMO's reference code does with ``Adam(lr=0.025, weight_decay=γ)``), then
  Adam: m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², x ← x − η m̂ / (√v̂ + ε) with m̂ = m/(1−β₁ᵗ),
  v̂ = v/(1−β₂ᵗ).
* ``adamw`` — ``torch.optim.AdamW``: decoupled decay x ← x(1 − ηλ) first, then Adam on the raw g.
* ``sgd`` — plain gradient descent with L2 penalty: x ← x − η(g + λx) (m, v unused).

β₁ = 0.9, β₂ = 0.999, ε = 1e-8 (torch's defaults, which FAMO's code uses).

``adam_l2`` and ``adamw`` are not interchangeable for the balancers' logits: DTO-KD §4 / MoKD §4 state AdamW
(lr 0.025, weight decay 0.01: conf/balancer/dto.yaml), FAMO's code Adam with L2 (Cranial-XIX/FAMO famo.py:20,
conf/balancer/famo.yaml). Under a small persistent log-improvement gap Adam-L2 stops where the mean gradient
(penalty included) vanishes, π near the middle, while AdamW's normalised step outgrows its decoupled decay
and drives π to a vertex; tests/balancers/test_logit_optim_kinds.py shows both on this very function.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

OptimKind = Literal["adam_l2", "adamw", "sgd"]

BETA1 = 0.9
BETA2 = 0.999
ADAM_EPS = 1e-8


class OptimState(NamedTuple):
    """Parameter and optimiser state after one update (all float64; ``step`` is a 0-d int64)."""

    param: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: Tensor


def optim_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    lr: float,
    weight_decay: float,
    kind: OptimKind,
) -> OptimState:
    """One optimiser step; returns new tensors and leaves the inputs untouched (pure)."""
    x = param.double()
    g = grad.double().to(x.device)
    t = step.to(x.device) + 1
    if kind == "sgd":
        return OptimState(x - lr * (g + weight_decay * x), exp_avg.clone(), exp_avg_sq.clone(), t)
    if kind == "adam_l2":
        g = g + weight_decay * x
    elif kind == "adamw":
        x = x * (1.0 - lr * weight_decay)
    else:  # pragma: no cover - guarded by the constructors' Literal
        raise ValueError(f"unknown optimiser kind {kind!r}")
    m = BETA1 * exp_avg.double() + (1.0 - BETA1) * g
    v = BETA2 * exp_avg_sq.double() + (1.0 - BETA2) * g * g
    tf = t.double()
    bc1 = 1.0 - BETA1 ** tf
    bc2 = 1.0 - BETA2 ** tf
    # Same association as torch.optim.Adam's single-tensor path: denom = √v/√bc2 + ε, step = η/bc1.
    denom = v.sqrt() / bc2.sqrt() + ADAM_EPS
    x = x - (lr / bc1) * m / denom
    return OptimState(x, m, v, t)


def new_state(k: int) -> dict[str, Tensor]:
    """Zero moments and step count for a k-vector parameter (register these as buffers)."""
    return {
        "exp_avg": torch.zeros(k, dtype=torch.float64),
        "exp_avg_sq": torch.zeros(k, dtype=torch.float64),
        "step": torch.zeros((), dtype=torch.int64),
    }

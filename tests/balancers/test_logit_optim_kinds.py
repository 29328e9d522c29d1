"""The π optimiser matters: FAMO's Adam-L2 and the papers' AdamW behave differently on the same signal.

DTO-KD §4 / MoKD §4 state "AdamW with a learning rate of 0.025 and a weight decay of 0.01" for the trade-off
optimisation; FAMO's code steps its logits with ``torch.optim.Adam(lr, weight_decay=γ)`` (an L2 penalty:
Cranial-XIX/FAMO famo.py:20 @0a6ad06). The synthetic signal below is the amortised update's (FAMO /
DTO-KD amortised): ξ descends J_softmax(ξ)ᵀ δ, δ the per-objective log-loss improvement, here with a small
persistent gap (objective 0 improves 1e-3 faster per step) under noise 1e-2.

* Adam-L2 folds λξ into the gradient before Adam's normalisation, so ξ stops where the *mean* gradient
  vanishes: λ(ξ₀ − ξ₁) = −2 π₀π₁ · gap, i.e. ξ₀ − ξ₁ ≈ −0.05 and π₀ ≈ σ(−0.05) ≈ 0.4875: π stays put.
* AdamW's step has size ≈ lr × (signal/noise) whatever the gradient's scale (signal and noise both carry the
  factor π₀π₁), while its decoupled decay shrinks ξ by lr·λ·ξ: the balance sits at |ξ| ≈ SNR/λ ≫ 1, so π
  runs to a vertex (weight moves to the slower objective), as DTO-KD Fig. 3 / MoKD App. C.3 show π moving.
  Without a gap AdamW's π is a random walk whose steps do not shrink: chains scatter to both sides.

The real optimiser (kdrun.balancers.logit_optim.optim_update) runs 16 independent chains at once (it is
elementwise), 3000 steps (the 50k-step picture is the same, only more extreme: AdamW π₀ < 1e-3).
"""
from __future__ import annotations

import math

import torch

from kdrun.balancers.logit_optim import OptimKind, optim_update

LR, DECAY = 0.025, 0.01  # DTO-KD §4 / FAMO's defaults


def run_chains(kind: OptimKind, gap: float, steps: int = 3000, chains: int = 16, noise: float = 1e-2,
               seed: int = 0) -> torch.Tensor:
    """π after ``steps`` amortised updates on the synthetic gap; one row per chain."""
    gen = torch.Generator().manual_seed(seed)
    xi = torch.zeros(chains, 2, dtype=torch.float64)
    m, v, t = torch.zeros_like(xi), torch.zeros_like(xi), torch.zeros((), dtype=torch.int64)
    mean = torch.tensor([gap, 0.0], dtype=torch.float64)
    for _ in range(steps):
        delta = mean + noise * torch.randn(chains, 2, generator=gen, dtype=torch.float64)
        pi = torch.softmax(xi, -1)
        grad = pi * (delta - (pi * delta).sum(-1, keepdim=True))  # J_softmaxᵀ δ (J symmetric)
        xi, m, v, t = optim_update(xi, grad, m, v, t, lr=LR, weight_decay=DECAY, kind=kind)
    return torch.softmax(xi, -1)


def test_adam_l2_keeps_pi_near_its_stationary_point() -> None:
    pi0 = run_chains("adam_l2", gap=1e-3)[:, 0]
    # The stationary point of the mean gradient: ξ₀ − ξ₁ = −2·π₀π₁·gap/λ ≈ −0.05.
    expect = 1.0 / (1.0 + math.exp(0.05))
    assert abs(pi0.mean().item() - expect) < 0.025, pi0
    assert ((pi0 > 0.35) & (pi0 < 0.65)).all(), pi0  # every chain stays in the middle


def test_adamw_drives_pi_to_the_slower_objectives_vertex() -> None:
    pi0 = run_chains("adamw", gap=1e-3)[:, 0]
    assert (pi0 < 0.15).all(), pi0  # weight leaves the faster-improving objective (FAMO's rule)
    assert pi0.mean().item() < 0.05, pi0


def test_without_a_gap_there_is_no_preferred_direction() -> None:
    # The control: AdamW's one-sided drift comes from the persistent gap, not from the noise alone.
    l2 = run_chains("adam_l2", gap=0.0)[:, 0]
    assert ((l2 > 0.35) & (l2 < 0.65)).all() and abs(l2.mean().item() - 0.5) < 0.03, l2
    w = run_chains("adamw", gap=0.0)[:, 0]
    assert (w > 0.5).sum() >= 4 and (w < 0.5).sum() >= 4 and abs(w.mean().item() - 0.5) < 0.15, w

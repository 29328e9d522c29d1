"""Distillation decay: a fixed schedule baseline (cross-batch-kd §3.3, "distill-decay" in Table 2).

The paper's description, in full: "gradually reduces the KL loss weight α (initialized as 0.9) to 0 and
increases the CE loss weight γ (initialized as 1.0 − α = 0.1) to 1.0 after the midpoint of training,
while additionally introducing a KD regularization term with coefficient β in later epochs."

Our reading (every unstated detail is a documented choice):

* progress p = step / (``total_steps`` − 1) (0-based steps, so the last step has p = 1); before ``decay_start`` (0.5 = "the midpoint") the weights are
  (w_distill, w_task) = (``kl_start``, ``ce_start``) = (0.9, 0.1);
* from ``decay_start`` to the end they move **linearly** ("gradually"):
  w_distill = kl_start + s (kl_end − kl_start), w_task = ce_start + s (ce_end − ce_start),
  s = (p − decay_start) / (1 − decay_start) ∈ [0, 1] (reaching (0, 1) at the last step);
* the "KD regularization term with coefficient β in later epochs" is not defined further; with only
  the ``distill`` objective available we add β · L_distill from ``decay_start`` on, i.e.
  w_distill += β in the second half, so the teacher signal does not vanish entirely. β = 0 by default
  (the paper gives no value): the pure decay.

``total_steps``: the engine sets ``balancer.total_steps`` (an int, the planned number of optimiser
steps) before training. If it is unset (None) or ≤ 0, there is **no decay**: the weights stay at
(kl_start, ce_start) for the whole run, without β.

Objectives named ``task`` and ``distill`` (exactly 2; looked up by name). Loss-level: one ordinary
backward of Σ wᵢ Lᵢ; π = ``raw_weights`` = w (not renormalised). No state: the schedule is a function
of ``ctx.step``, so a resumed run continues it exactly.
"""
from __future__ import annotations

from typing import Annotated

import torch

from kdrun.balancers.base import BalancerConfigError, LossWeighting, StepContext, Weights
from kdrun.config import Ge, Le


def decay_weights(step: int, total_steps: int | None, kl_start: float, kl_end: float,
                  ce_start: float, ce_end: float, decay_start: float,
                  beta: float) -> tuple[float, float]:
    """(w_distill, w_task) at ``step`` (see the module docstring)."""
    if total_steps is None or total_steps <= 0:
        return kl_start, ce_start
    p = step / max(total_steps - 1, 1)  # steps are 0-based: the last one (total − 1) has p = 1
    if p < decay_start:
        return kl_start, ce_start
    s = 1.0 if decay_start >= 1.0 else min(1.0, (p - decay_start) / (1.0 - decay_start))
    return kl_start + s * (kl_end - kl_start) + beta, ce_start + s * (ce_end - ce_start)


class DistillDecay(LossWeighting):
    min_objectives = 2
    max_objectives = 2

    def __init__(
        self,
        kl_start: Annotated[float, Ge(0.0)] = 0.9,
        kl_end: Annotated[float, Ge(0.0)] = 0.0,
        ce_start: Annotated[float, Ge(0.0)] = 0.1,
        ce_end: Annotated[float, Ge(0.0)] = 1.0,
        decay_start: Annotated[float, Ge(0.0), Le(1.0)] = 0.5,
        beta: Annotated[float, Ge(0.0)] = 0.0,
    ) -> None:
        super().__init__()
        self.kl_start, self.kl_end = float(kl_start), float(kl_end)
        self.ce_start, self.ce_end = float(ce_start), float(ce_end)
        self.decay_start = float(decay_start)
        self.beta = float(beta)
        self.total_steps: int | None = None  # set by the engine before training

    def on_bind(self) -> None:
        if set(self.objectives) != {"task", "distill"}:
            raise BalancerConfigError(
                f"balancer DistillDecay needs the objectives 'task' and 'distill', got "
                f"{', '.join(self.objectives)}.")

    def loss_weights(self, ctx: StepContext) -> Weights:
        w_d, w_t = decay_weights(ctx.step, self.total_steps, self.kl_start, self.kl_end,
                                 self.ce_start, self.ce_end, self.decay_start, self.beta)
        like = self.objectives_like(ctx)
        by_name = {"distill": w_d, "task": w_t}
        # In the losses' dtype, as the backward uses them: the logged π is the weight actually applied.
        w = torch.tensor([by_name[n] for n in self.objectives], dtype=like.dtype, device=like.device)
        return Weights(w, w)

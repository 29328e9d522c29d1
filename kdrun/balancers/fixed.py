"""Fixed weights: the classic KD objective.

DTO-KD Eq. 3: L_tot(θ) = α₁ L_distill(θ) + α₂ L_task(θ), one ordinary backward (Eq. 4:
g_tot = α₁ g_distill + α₂ g_task). With the ``kl`` distill term this is Hinton et al. (2015):
CE + T²·KL(teacher ‖ student) at temperature T (the T² lives in the loss term).

For k objectives, ``alphas`` maps every objective name to its weight; ``alpha_task`` and
``alpha_distill`` are the weights of the default two objectives ``task`` and ``distill`` and are used
for any objective ``alphas`` does not name (objective ``task`` → ``alpha_task``, any other →
``alpha_distill``). Weights may be any non-negative numbers; they are *not* renormalised (CIFAR's
CE 0.1 / KD 0.9 and DeiT's ½/½ are both expressible). No state.
"""
from __future__ import annotations

from typing import Annotated

import torch

from kdrun.balancers.base import BalancerConfigError, LossWeighting, StepContext, Weights
from kdrun.config import Ge


class Fixed(LossWeighting):
    min_objectives = 1

    def __init__(
        self,
        alpha_task: Annotated[float, Ge(0.0)] = 1.0,
        alpha_distill: Annotated[float, Ge(0.0)] = 1.0,
        alphas: dict[str, Annotated[float, Ge(0.0)]] | None = None,
    ) -> None:
        super().__init__()
        self.alpha_task = float(alpha_task)
        self.alpha_distill = float(alpha_distill)
        self.alphas = dict(alphas or {})
        for name, a in self.alphas.items():  # validation checks the config; this, direct construction
            if a < 0:
                raise BalancerConfigError(f"balancer.alphas.{name}={a} is negative; weights must be >= 0.")

    def named_objectives(self) -> dict[str, list[str]]:
        return {"alphas": list(self.alphas)}

    def on_bind(self) -> None:
        w = [self.alphas.get(n, self.alpha_task if n == "task" else self.alpha_distill)
             for n in self.objectives]
        self.register_buffer("_w", torch.tensor(w, dtype=torch.float32), persistent=False)

    def loss_weights(self, ctx: StepContext) -> Weights:
        w = self._w.to(self.objectives_like(ctx).device)
        return Weights(w, w)

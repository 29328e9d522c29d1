"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, "End-to-end multi-task learning with
attention", Eq. 7).

    wᵢ(t) = K · exp(rᵢ(t−1)/T) / Σⱼ exp(rⱼ(t−1)/T),   rᵢ(t−1) = L̄ᵢ(t−1) / L̄ᵢ(t−2)

with K = number of objectives (weights sum to K), temperature T = 2 (the paper's value), L̄ᵢ(e) the
average loss of objective i over "epoch" e, and wᵢ = 1 for the first two epochs (no ratio yet).

"Epoch": the engine does not tell balancers where epochs end, so an epoch here is a **window of
``window`` successful optimiser steps** (default 100). The state keeps the running sum and count of
the current window and the averages of the last two completed windows (all in the ``state_dict``);
the weights change only when a window completes, as DWA's change once per epoch. Set ``window`` to
the number of steps per epoch to reproduce the paper exactly.

Loss-level: one ordinary backward of Σ wᵢ Lᵢ (π = ``raw_weights`` = w). Losses added to the window are
rank-averaged (``ctx.all_reduce_mean``) so all DDP ranks agree. Corner cases: a previous-window
average below ``eps`` is clamped (ratio stays finite); a non-finite loss is not accumulated (the
engine only calls ``after_step`` for finite steps anyway). ``step()`` never changes state. k ≥ 2.
"""
from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor

from kdrun.balancers.base import LossWeighting, StepContext, Weights
from kdrun.config import Ge, Gt


def dwa_weights(last: Tensor, before_last: Tensor, temperature: float, eps: float = 1e-8) -> Tensor:
    """K · softmax(r / T) with r = L̄(e−1)/L̄(e−2) (Eq. 7), float64."""
    r = last.double() / before_last.double().clamp_min(eps)
    return last.numel() * torch.softmax(r / temperature, dim=0)


class DWA(LossWeighting):
    def __init__(
        self,
        temperature: Annotated[float, Gt(0.0)] = 2.0,
        window: Annotated[int, Ge(1)] = 100,
        eps: Annotated[float, Gt(0.0)] = 1e-8,
    ) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.window = int(window)
        self.eps = float(eps)

    def on_bind(self) -> None:
        k = len(self.objectives)
        self.register_buffer("window_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("window_count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("avg_last", torch.ones(k, dtype=torch.float64))
        self.register_buffer("avg_before_last", torch.ones(k, dtype=torch.float64))
        self.register_buffer("windows_done", torch.zeros((), dtype=torch.int64))

    def current_weights(self) -> Tensor:
        if int(self.windows_done) < 2:
            return torch.ones(len(self.objectives), dtype=torch.float64,
                              device=self.avg_last.device)
        return dwa_weights(self.avg_last, self.avg_before_last, self.temperature, self.eps)

    def loss_weights(self, ctx: StepContext) -> Weights:
        w = self.current_weights().to(self.objectives_like(ctx).device)
        return Weights(w, w)

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        losses = ctx.all_reduce_mean(self.stack(ctx.objectives).detach().double())
        losses = losses.to(self.window_sum.device)
        if not bool(torch.isfinite(losses).all()):
            return
        self.window_sum.add_(losses)
        self.window_count.add_(1)
        if int(self.window_count) >= self.window:
            self.avg_before_last.copy_(self.avg_last)
            self.avg_last.copy_(self.window_sum / self.window_count.double())
            self.window_sum.zero_()
            self.window_count.zero_()
            self.windows_done.add_(1)

"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, Eq. 7/10).

Learnable log-variances sᵢ = log σᵢ² (init 0, i.e. σ = 1) and the joint objective

    L(θ, s) = Σᵢ exp(−sᵢ) Lᵢ(θ) + sᵢ.

½ convention: Kendall et al. write ½σ⁻²L + log σ for regression and σ⁻²L + log σ for classification.
We use the common uniform form exp(−s)L + s (= 2 × the regression form), as most re-implementations
do: it treats all objectives alike and has the same stationary point sᵢ* = log Lᵢ as either paper
form (∂/∂sᵢ = −exp(−sᵢ)Lᵢ + 1 = 0); the factor ½ would only halve the model's gradient, which the
learning rate absorbs.

Model step: one ordinary backward of Σ exp(−sᵢ)Lᵢ (the +sᵢ term has no θ-gradient); π =
``raw_weights`` = exp(−s). The sᵢ update: the engine's optimiser holds only model parameters, so the
balancer steps s itself in ``after_step`` with the **analytic** gradient
∂L/∂sᵢ = 1 − exp(−sᵢ) Lᵢ(θₜ) at the losses of this step (rank-averaged with ``ctx.all_reduce_mean``
so every DDP rank holds the same s) — the gradient a joint optimiser would have applied at θₜ, with
no autograd graph for s. Kendall et al. train s with the network's optimiser; ours is a separate
hand-written one (:mod:`kdrun.balancers.logit_optim`, default Adam, lr 0.025 like the other learned
balancer states, no weight decay) whose state (s, moments, step count) is in the ``state_dict``.

Corner cases: L ≥ 0 is assumed (the gradient pushes s to log L, so s → −∞ as L → 0: losses are
clamped at ``eps`` in the s-gradient, which bounds s ≳ log eps); a non-finite loss skips the s update.
``step()`` never changes state. Any k ≥ 1.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor

from kdrun.balancers.base import LossWeighting, StepContext, Weights
from kdrun.balancers.logit_optim import OptimKind, new_state, optim_update
from kdrun.config import Ge, Gt


def log_variance_grad(log_vars: Tensor, losses: Tensor, eps: float = 1e-8) -> Tensor:
    """∂/∂sᵢ [exp(−sᵢ)Lᵢ + sᵢ] = 1 − exp(−sᵢ) Lᵢ (float64)."""
    s = log_vars.double()
    return 1.0 - torch.exp(-s) * losses.double().to(s.device).clamp_min(eps)


class Uncertainty(LossWeighting):
    min_objectives = 1

    def __init__(
        self,
        lr: Annotated[float, Gt(0.0)] = 0.025,
        weight_decay: Annotated[float, Ge(0.0)] = 0.0,
        optimizer: Literal["adam_l2", "adamw", "sgd"] = "adam_l2",
        eps: Annotated[float, Gt(0.0)] = 1e-8,
    ) -> None:
        super().__init__()
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.optimizer: OptimKind = optimizer
        self.eps = float(eps)

    def on_bind(self) -> None:
        k = len(self.objectives)
        self.register_buffer("log_vars", torch.zeros(k, dtype=torch.float64))
        for name, t in new_state(k).items():
            self.register_buffer(f"optim_{name}", t)

    def loss_weights(self, ctx: StepContext) -> Weights:
        w = torch.exp(-self.log_vars.to(self.objectives_like(ctx).device))
        extras = {f"log_var/{n}": self.log_vars[i].float() for i, n in enumerate(self.objectives)}
        return Weights(w, w, extras)

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        losses = ctx.all_reduce_mean(self.stack(ctx.objectives).detach().double())
        grad = log_variance_grad(self.log_vars, losses, self.eps)
        if not bool(torch.isfinite(grad).all()):
            return
        st = optim_update(self.log_vars, grad, self.optim_exp_avg, self.optim_exp_avg_sq,
                          self.optim_step, lr=self.lr, weight_decay=self.weight_decay,
                          kind=self.optimizer)
        self.log_vars.copy_(st.param)
        self.optim_exp_avg.copy_(st.exp_avg)
        self.optim_exp_avg_sq.copy_(st.exp_avg_sq)
        self.optim_step.copy_(st.step)

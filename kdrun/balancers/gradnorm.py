"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, Eq. 1–2 and §3.2).

Task weights wᵢ(t) (init 1). On W = the *last shared layer*, per step:

    G_W⁽ⁱ⁾ = ‖∇_W wᵢLᵢ‖,  Ḡ_W = meanᵢ G_W⁽ⁱ⁾,  L̃ᵢ = Lᵢ(t)/Lᵢ(0),  rᵢ = L̃ᵢ / meanⱼ L̃ⱼ,
    L_grad = Σᵢ |G_W⁽ⁱ⁾ − Ḡ_W · rᵢ^α|                       (Eq. 2; the target Ḡ_W rᵢ^α is a constant)

The model descends Σ wᵢ(t) Lᵢ; the weights descend L_grad,
∂L_grad/∂wᵢ = sign(G_W⁽ⁱ⁾ − target_i) · ‖∇_W Lᵢ‖, and are then renormalised to Σ wᵢ = k (§3.2).
α = 1.5 (the paper's NYUv2 value; α = 0 equalises the gradient norms).

"Last shared layer" here: the Jacobian's rows restricted to the *last shared parameter tensor with
≥ 2 dimensions* in the Jacobian's parameter order (the engine passes the student's parameters in
``model.parameters()`` order, so this is the deepest shared weight matrix/kernel; a trailing bias is
skipped, falling back to the last shared tensor if every shared tensor is 1-D). No extra backward:
the Jacobian the engine computes once per step already holds ∇_W Lᵢ. The model update is written from
the same Jacobian (``write_grad(w)``), so GradNorm is gradient-level (``uses_ddp_backward = False``);
the Jacobian is rank-averaged and the losses go through ``ctx.all_reduce_mean``, so all ranks agree.

Weight optimiser: the paper steps wᵢ with the network's optimiser; the engine's holds only model
parameters, so we use a hand-written one (:mod:`kdrun.balancers.logit_optim`, default Adam, lr 0.025;
Adam makes the step independent of the gradient norms' scale). The new weights are computed in
``step`` but committed in ``after_step`` (contract rule 1), together with Lᵢ(0), which is recorded at
the first successful step (until then L̃ = 1, r = 1). Weights are clamped at 1e-6 before the
renormalisation so none turns negative. Any k ≥ 2.
"""
from __future__ import annotations

from typing import Annotated, Literal, NamedTuple

import torch
from torch import Tensor

from kdrun.balancers.base import GradientWeighting, StepContext, Weights
from kdrun.balancers.gradients import Jacobian
from kdrun.balancers.logit_optim import OptimKind, OptimState, new_state, optim_update
from kdrun.config import Ge, Gt

MIN_WEIGHT = 1e-6


def last_shared_columns(jac: Jacobian) -> slice:
    """Column range of the Jacobian for the last shared parameter tensor (≥ 2-D preferred)."""
    sizes = [p.numel() for p in jac.shared]
    if not sizes:
        raise RuntimeError("GradNorm needs at least one parameter shared by all objectives")
    idx = max((j for j, p in enumerate(jac.shared) if p.dim() >= 2), default=len(sizes) - 1)
    start = sum(sizes[:idx])
    return slice(start, start + sizes[idx])


class GradNormUpdate(NamedTuple):
    weight_grad: Tensor
    grad_norms: Tensor  # G_W⁽ⁱ⁾ = wᵢ‖∇_W Lᵢ‖
    targets: Tensor


def gradnorm_weight_grad(weights: Tensor, layer_grad_norms: Tensor, losses: Tensor,
                         initial_losses: Tensor, alpha: float, eps: float = 1e-8) -> GradNormUpdate:
    """∂L_grad/∂w (Eq. 2) from ‖∇_W Lᵢ‖, Lᵢ(t) and Lᵢ(0)."""
    w = weights.double()
    n = layer_grad_norms.double().to(w.device)
    g = w * n
    ratio = losses.double().to(w.device) / initial_losses.double().to(w.device).clamp_min(eps)
    r = ratio / ratio.mean().clamp_min(eps)
    target = g.mean() * r.pow(alpha)
    return GradNormUpdate(torch.sign(g - target) * n, g, target)


def renormalise(weights: Tensor) -> Tensor:
    """Clamp at MIN_WEIGHT and rescale to Σ wᵢ = k."""
    w = weights.clamp_min(MIN_WEIGHT)
    return w * (w.numel() / w.sum())


class GradNorm(GradientWeighting):
    """Gradient-level although the update is Σ wᵢ(t) gᵢ with w from the state alone: the *next* w needs
    ‖∇_W Lᵢ‖ of the last shared layer, a slice of the Jacobian (module doc)."""

    supports_feature_space = False  # needs parameter gradients (see kdrun.balancers.gradients.FeatureJacobian)

    def __init__(
        self,
        alpha: Annotated[float, Ge(0.0)] = 1.5,
        lr: Annotated[float, Gt(0.0)] = 0.025,
        weight_decay: Annotated[float, Ge(0.0)] = 0.0,
        optimizer: Literal["adam_l2", "adamw", "sgd"] = "adam_l2",
        eps: Annotated[float, Gt(0.0)] = 1e-8,
    ) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.optimizer: OptimKind = optimizer
        self.eps = float(eps)
        self._pending: tuple[int, OptimState, Tensor] | None = None

    def on_bind(self) -> None:
        k = len(self.objectives)
        self.register_buffer("task_weights", torch.ones(k, dtype=torch.float64))
        for name, t in new_state(k).items():
            self.register_buffer(f"optim_{name}", t)
        self.register_buffer("initial_losses", torch.ones(k, dtype=torch.float64))
        self.register_buffer("has_initial", torch.zeros((), dtype=torch.bool))

    def jacobian_weights(self, jac: Jacobian, ctx: StepContext) -> Weights:
        dev = self.task_weights.device
        losses = ctx.all_reduce_mean(self.stack(ctx.objectives).detach().double()).to(dev)
        initial = self.initial_losses if bool(self.has_initial) else losses
        cols = last_shared_columns(jac)
        norms = jac.matrix[:, cols].double().norm(dim=1).to(dev) / jac.scale
        upd = gradnorm_weight_grad(self.task_weights, norms, losses, initial, self.alpha, self.eps)
        st = optim_update(self.task_weights, upd.weight_grad, self.optim_exp_avg,
                          self.optim_exp_avg_sq, self.optim_step, lr=self.lr,
                          weight_decay=self.weight_decay, kind=self.optimizer)
        st = st._replace(param=renormalise(st.param))
        self._pending = (ctx.step, st, initial.clone())  # staged; after_step commits it (contract rule 4)
        w = self.task_weights.clone().to(jac.matrix.device)
        extras = {}
        for i, n in enumerate(self.objectives):
            extras[f"grad_norm/{n}"] = upd.grad_norms[i].float()
            extras[f"target/{n}"] = upd.targets[i].float()
        return Weights(w, w, extras)

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if self._pending is None or self._pending[0] != ctx.step:
            return
        _, st, initial = self._pending
        self._pending = None
        if not bool(torch.isfinite(st.param).all()):
            return
        self.task_weights.copy_(st.param)
        self.optim_exp_avg.copy_(st.exp_avg)
        self.optim_exp_avg_sq.copy_(st.exp_avg_sq)
        self.optim_step.copy_(st.step)
        if not bool(self.has_initial):
            self.initial_losses.copy_(initial)
            self.has_initial.fill_(True)

"""Per-objective gradient clipping around any weighting balancer (DTO-KD Table 4's "gradient clipping" column).

DTO-KD Table 4 (``dto-kd.txt`` line 333): "We also applied gradient clipping as a pre-processing step to
both objectives to see its impact with and without DTO." The paper gives no formula; kdrun's reading:

* *each objective's* gradient gᵢ = ∇_θ Lᵢ (over every trainable parameter the objective reaches, shared
  and private alike — so the clip is that of ``torch.nn.utils.clip_grad_norm_`` applied to the gradient
  objective i alone would produce) is rescaled to at most ``max_norm``:

      cᵢ = min(1, max_norm / (‖gᵢ‖₂ + 1e-6)),   ĝᵢ = cᵢ gᵢ

  (the ``1e-6`` and the clamp are ``clip_grad_norm_``'s; a zero gradient stays zero, a gradient
  already under the threshold is unchanged);
* "pre-processing": the clip happens *before* balancing — the wrapped balancer sees the clipped
  per-objective gradients (a gradient-level balancer computes its weights from the clipped Jacobian)
  and the update written is Σ wᵢ ĝᵢ. A loss-level balancer (fixed, amortised DTO, FAMO, uncertainty …)
  still chooses its weights from the losses as it always does. Either way the wrapper asks the inner
  method for its weights only (:meth:`~kdrun.balancers.base.WeightedBalancer.step_weights`, the
  weighting apart from its application, kdrun/balancers/base.py) and writes Σ wᵢ ĝᵢ itself; the inner
  method's own backward or write never runs.

The trainer's global clip (``trainer.grad_clip``, ViDT's ``--clip_max_norm 0.1``) still applies to the
combined update afterwards; this wrapper does not replace it.

Costs and consequences: the per-objective gradients are needed, so the wrapper is gradient-level
(``uses_ddp_backward = False``: the engine computes the Jacobian, rank-averaged, outside DDP's reducer)
and a loss-level balancer pays k backward passes instead of one (``trainer.jacobian=auto`` batches
them). The Jacobian is the engine's cached one, so the gradient diagnostics still log the *unclipped*
gradients; ``balancer/clip/norm/<obj>`` (unclipped ‖gᵢ‖) and ``balancer/clip/coef/<obj>`` (cᵢ) are logged, and
``raw_weights`` are the effective weights on the raw gradients, wᵢ·cᵢ. Feature-space Jacobians
(``trainer.grad_space=features``) are refused: a gradient w.r.t. a representation is not the
parameter gradient whose norm is clipped. Norms are of the *unscaled* gradients (the fp16 loss scale
is divided out), so ``max_norm`` means the same with and without GradScaler.

The wrapped balancer must be a :class:`~kdrun.balancers.base.WeightedBalancer` (every kdrun balancer but
this one and DOT, whose update is a momentum step, is): its update is Σ wᵢ ∇Lᵢ for weights it can state, which is what makes "weigh the clipped
gradients instead" well defined.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

import torch
from torch import Tensor

from kdrun.balancers.base import Balancer, BalancerConfigError, StepContext, StepResult, WeightedBalancer
from kdrun.balancers.gradients import FeatureJacobian, Jacobian
from kdrun.config import Gt

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: clip_coef = max_norm / (total_norm + 1e-6)


def objective_norms(jac: Jacobian) -> Tensor:
    """‖gᵢ‖₂ per objective over shared and private parameters, loss scale divided out. (k,) fp64."""
    sq = jac.matrix.double().pow(2).sum(dim=1)
    for i, row in enumerate(jac.private):
        for g in row:
            if g is not None:
                sq[i] = sq[i] + g.double().pow(2).sum()
    return sq.sqrt() / float(jac.scale)


def clip_coefficients(norms: Tensor, max_norm: float) -> Tensor:
    """cᵢ = min(1, max_norm / (‖gᵢ‖ + 1e-6)), as ``clip_grad_norm_`` computes its coefficient."""
    return (max_norm / (norms.double() + CLIP_EPS)).clamp(max=1.0)


def scale_jacobian(jac: Jacobian, coef: Tensor) -> Jacobian:
    """The Jacobian with objective i's gradient (shared row and private parts) multiplied by cᵢ."""
    c = coef.to(device=jac.matrix.device, dtype=torch.float32)
    private = [[None if g is None else g * c[i].to(g.device) for g in row] for i, row in enumerate(jac.private)]
    return dataclasses.replace(jac, matrix=jac.matrix * c[:, None], private=private)


def _no_backward(loss: Tensor) -> None:
    raise RuntimeError("objective_clip writes the update itself; the wrapped balancer's weighting must not "
                       "call ctx.backward")


class ObjectiveClip(Balancer):
    """``inner`` with every objective's gradient clipped to ``max_norm`` before balancing (module doc)."""

    uses_ddp_backward = False
    supports_feature_space = False

    def __init__(self, inner: WeightedBalancer, max_norm: Annotated[float, Gt(0.0)] = 0.1) -> None:
        super().__init__()
        if isinstance(inner, ObjectiveClip):
            raise BalancerConfigError("balancer.inner is itself objective_clip, which would clip twice; pick the "
                                      "balancer to wrap with balancer@balancer.inner=NAME (e.g. fixed or dto).")
        if not isinstance(inner, WeightedBalancer):
            what = ("a balancer that writes its own update rather than stating weights"
                    if isinstance(inner, Balancer) else type(inner).__name__)
            raise BalancerConfigError(f"balancer.inner must be a weighting balancer (a LossWeighting or "
                                      f"GradientWeighting of kdrun/balancers/base.py), got {what}; pick one "
                                      "with balancer@balancer.inner=NAME (e.g. fixed or dto).")
        self.inner = inner
        inner.config_key = "balancer.inner"  # bind's messages name the inner balancer's settings there
        self.max_norm = float(max_norm)
        # The engine reads these flags from the instance; they are the wrapped method's.
        self.needs_aux_batch = inner.needs_aux_batch
        self.needs_recompute = inner.needs_recompute
        self.min_objectives = inner.min_objectives
        self.max_objectives = inner.max_objectives

    def on_bind(self) -> None:
        self.inner.bind(self.objectives)

    def set_total_steps(self, total_steps: int) -> None:
        # The engine calls this on the outer balancer only; a schedule inside (distill_decay) needs it.
        super().set_total_steps(total_steps)
        self.inner.set_total_steps(total_steps)

    def _clipped(self, jac: Jacobian) -> tuple[Jacobian, Tensor, Tensor]:
        if isinstance(jac, FeatureJacobian):
            raise RuntimeError("objective_clip needs parameter gradients; use trainer.grad_space=params")
        norms = objective_norms(jac)
        coef = clip_coefficients(norms, self.max_norm)
        return scale_jacobian(jac, coef), norms, coef

    def step(self, ctx: StepContext) -> StepResult:
        clipped, norms, coef = self._clipped(ctx.jacobian())
        inner_ctx = dataclasses.replace(
            ctx, backward=_no_backward, jacobian=lambda: clipped,
            gradients=lambda objs: self._clipped(ctx.gradients(objs))[0])
        # The inner method's weights on its (clipped) gradients, in objective order (= the Jacobian's rows,
        # GradientWeighting's docstring); fp32, the precision write_grad combines in.
        w = self.inner.step_weights(inner_ctx)
        raw = w.raw.detach().float().to(clipped.matrix.device)
        clipped.write_grad(raw)
        c = coef.to(device=raw.device, dtype=torch.float32)
        extras = dict(w.extras)
        for i, n in enumerate(clipped.names):
            extras[f"clip/norm/{n}"] = norms[i].float()
            extras[f"clip/coef/{n}"] = c[i]
        return StepResult(weights=w.pi.float(), raw_weights=raw * c, extras=extras)

    def after_step(self, ctx: StepContext) -> None:
        self.inner.after_step(ctx)

"""Per-objective gradient clipping around any balancer (DTO-KD Table 4's "gradient clipping" column).

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
  still chooses its weights from the losses as it always does; only its backward is replaced:
  the weights it applied are read back as wᵢ = ∂s/∂Lᵢ of the scalar s it passes to ``ctx.backward``
  (one tiny autograd call through the weighted sum only), and Σ wᵢ ĝᵢ is written instead.

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

Assumption on the wrapped balancer: the gradient of its backward scalar w.r.t. the model reaches the
model only through the objectives (true of every kdrun balancer: their state is buffers, never a
parameter in the autograd graph).
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

import torch
from torch import Tensor

from kdrun.balancers.base import Balancer, BalancerConfigError, StepContext, StepResult
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


class ObjectiveClip(Balancer):
    """``inner`` with every objective's gradient clipped to ``max_norm`` before balancing (module doc)."""

    uses_ddp_backward = False
    supports_feature_space = False

    def __init__(self, inner: Balancer, max_norm: Annotated[float, Gt(0.0)] = 0.1) -> None:
        super().__init__()
        if not isinstance(inner, Balancer):
            raise BalancerConfigError(f"balancer.inner must be a balancer, got {type(inner).__name__}; pick one "
                                      "with balancer@balancer.inner=NAME (e.g. fixed or dto).")
        if isinstance(inner, ObjectiveClip):
            raise BalancerConfigError("balancer.inner is itself objective_clip, which would clip twice; pick the "
                                      "balancer to wrap with balancer@balancer.inner=NAME (e.g. fixed or dto).")
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
        names = clipped.names
        wrote: list[Tensor] = []

        def backward(s: Tensor) -> None:
            # The weights the loss-level method applied: ∂s/∂Lᵢ (the graph behind Lᵢ is not traversed).
            objs = [ctx.objectives[n] for n in names]
            grads = torch.autograd.grad(s, objs, allow_unused=True)
            w = torch.stack([torch.zeros((), device=s.device) if g is None else g.detach().float()
                             for g in grads])
            clipped.write_grad(w)
            wrote.append(w)

        inner_ctx = dataclasses.replace(
            ctx, backward=backward, jacobian=lambda: clipped,
            gradients=lambda objs: self._clipped(ctx.gradients(objs))[0])
        result = self.inner.step(inner_ctx)
        w = wrote[-1] if wrote else result.raw_weights if result.raw_weights is not None else result.weights
        c = coef.to(device=w.device, dtype=torch.float32)
        extras = dict(result.extras)
        for i, n in enumerate(names):
            extras[f"clip/norm/{n}"] = norms[i].float()
            extras[f"clip/coef/{n}"] = c[i]
        return StepResult(weights=result.weights, raw_weights=w.float() * c, extras=extras)

    def after_step(self, ctx: StepContext) -> None:
        self.inner.after_step(ctx)

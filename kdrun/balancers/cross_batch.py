"""Cross-batch gradient consistency for adaptive KD loss balancing (cross-batch-kd §2, Eq. 4–11).

Objectives: exactly two, named ``task`` (the paper's CE) and ``distill`` (its KL term); looked up by
name. Per step, with g_ce, g_kl the gradients of the current batch B₁ and 𝒢_ce = ∇L_task(B₂) the
*reference* gradient of an independently drawn batch B₂ at the current parameters (no update;
``ctx.aux_objectives()`` + ``ctx.gradients``):

1. u = [g_ceᵀ𝒢_ce, g_klᵀ𝒢_ce] (Eq. 6) and QP weights w = (w_ce, w_kl) (Eq. 5–6, see (a), (b)).
2. Eq. 7–8: g'ᵢ = wᵢ gᵢ, w̃ᵢ = wᵢ (‖g'_ce‖ + ‖g'_kl‖) / ‖g'ᵢ‖; Eq. 9: w_ce^final = 1,
   w_kl^final = w̃_kl / w̃_ce (see (c) for the corners).
3. g₀ = ½(g_ce + g_kl), g_w = w_ce^final g_ce + w_kl^final g_kl, λ = α‖g₀‖/‖g_w‖ (Eq. 10),
   g_final = g₀ + λ g_w (Eq. 11). g_final is a linear combination of the two gradients, so it is
   written as ``raw_weights`` = (½ + λ w_ce^final, ½ + λ w_kl^final) — shared parameters get exactly
   g_final, private parameters (heads touched by one objective) the same per-objective weights.

Inner products and norms are taken over the whole student gradient (shared and private parameters;
a parameter an objective does not touch contributes 0), as in the paper, which works with "the
gradients of the student".

Resolved inconsistencies of the paper (each a deliberate choice):

(a) **Feasible set.** Eq. 5's 𝒲 = {w ≥ 0, w_ce + w_kl ≤ 1} contains w = 0, which makes
    (g_wᵀ𝒢_ce)² = 0 for every input: the literal QP always returns the trivial minimiser and the
    method would never update. We use the simplex w_ce + w_kl = 1, w ≥ 0 — the largest
    non-degenerate face of 𝒲 (the paper's own sum constraint made tight), on which the weights are a
    genuine trade-off. On it, with p = w_ce, f(p) = (p u_ce + (1−p) u_kl)²:
    * u's of opposite sign (or one zero): the root p* = u_kl/(u_kl − u_ce) ∈ [0, 1] makes g_w ⟂ 𝒢_ce;
    * same sign: no root; the minimiser is the vertex of the objective with the smaller |u|;
    * u_ce = u_kl (incl. both zero): f is constant; we return (½, ½).
(b) **Orthogonal vs aligned.** The abstract/introduction say the combined update is *aligned* with
    the reference, Eq. 5 makes it *orthogonal* (g_wᵀ𝒢_ce = 0: to first order the step leaves the
    held-out CE unchanged). ``objective="orthogonal"`` (default) is Eq. 5 as printed;
    ``objective="align"`` maximises the first-order decrease of the held-out CE, max_{w∈Δ} uᵀw: the
    vertex of the larger u (ties → (½, ½)). (Orthogonal picks, when both gradients agree with the
    reference, the *less* aligned one — a consequence of Eq. 5 we keep as printed.)
(c) **Eq. 8–9 corners.** Whenever both QP weights are positive, w̃ᵢ = (‖g'_ce‖+‖g'_kl‖)/‖gᵢ‖ and
    Eq. 9 gives w_kl^final = ‖g_ce‖/‖g_kl‖ whatever the QP returned: the QP then only decides the
    *support*. We keep that literal consequence and define the corners without dividing by zero:
    * w_kl = 0 (QP switched KL off): w_kl^final = 0 (g_w = g_ce). The limit w_kl → 0⁺ of Eq. 8–9 would
      be ‖g_ce‖/‖g_kl‖ again; we honour the QP's decision instead of the limit.
    * w_ce = 0 (QP switched CE off): Eq. 9 cannot hold CE at 1 (w̃_kl/w̃_ce = x/0). Since λ (Eq. 10)
      rescales g_w to α‖g₀‖, g_final depends on g_w only through its direction; we set
      w_ce^final = 0, w_kl^final = 1 (g_w ∝ g_kl).
    * both positive but ‖g_kl‖ = 0: g_kl contributes nothing; w_kl^final = 0. ‖g_ce‖ = 0: Eq. 8 gives
      w̃_ce = ∞, so w_kl^final = 0 (= ‖g_ce‖/‖g_kl‖).
    * ‖g_w‖ = 0 (λ undefined): λ = 0, g_final = g₀.

Extras logged: ``w_ce``, ``w_kl`` (QP), ``w_kl_final``, ``lambda``, ``u_ce``, ``u_kl`` and
``cos_final_ref`` = cos(g_final, 𝒢_ce) (0 when either is zero). ``weights`` (π) are the QP weights,
``raw_weights`` the effective weights of g_final. Gradient-level: the Jacobians from ``ctx`` are
rank-averaged, so every DDP rank computes the same update. α default 1.0 (the paper gives no value).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor

from kdrun.balancers.base import BalancerConfigError, GradientWeighting, StepContext, Weights
from kdrun.balancers.gradients import Jacobian
from kdrun.config import Ge

Objective = Literal["orthogonal", "align"]


# ---------------------------------------------------------------------------------------------------
# Pure math (tested without a model). Index 0 = CE/task, 1 = KL/distill, 2 = reference 𝒢_ce.


def qp_weights(u: Tensor, objective: Objective = "orthogonal") -> Tensor:
    """(w_ce, w_kl) on the simplex from u = (u_ce, u_kl) (Eq. 5–6 with resolutions (a), (b))."""
    u = u.detach().double()
    u_ce, u_kl = float(u[0]), float(u[1])
    half = torch.full((2,), 0.5, dtype=torch.float64, device=u.device)
    if u_ce == u_kl:
        return half
    if objective == "align":
        p = 1.0 if u_ce > u_kl else 0.0
    else:
        p = u_kl / (u_kl - u_ce)  # root of p·u_ce + (1−p)·u_kl = 0
        if not 0.0 <= p <= 1.0:  # same sign: vertex with the smaller |u|
            p = 1.0 if abs(u_ce) < abs(u_kl) else 0.0
    return torch.tensor([p, 1.0 - p], dtype=torch.float64, device=u.device)


def final_weights(w: Tensor, norm_ce: float, norm_kl: float) -> tuple[float, float]:
    """(w_ce^final, w_kl^final) from Eq. 7–9 with the corner rules (c)."""
    w_ce, w_kl = float(w[0]), float(w[1])
    if w_ce <= 0.0:
        return 0.0, 1.0
    if w_kl <= 0.0:
        return 1.0, 0.0
    if norm_kl <= 0.0 or norm_ce <= 0.0:
        return 1.0, 0.0
    g_ce, g_kl = w_ce * norm_ce, w_kl * norm_kl  # ‖g'ᵢ‖ (Eq. 7)
    tilde_ce = w_ce * (g_ce + g_kl) / g_ce  # Eq. 8
    tilde_kl = w_kl * (g_ce + g_kl) / g_kl
    return 1.0, tilde_kl / tilde_ce  # Eq. 9 (= ‖g_ce‖/‖g_kl‖)


@dataclass
class CrossBatchResult:
    w: Tensor  # QP weights (w_ce, w_kl)
    w_final: Tensor  # (w_ce^final, w_kl^final)
    lam: float
    raw: Tensor  # effective weights of g_final on (g_ce, g_kl)
    u: Tensor
    cos_final_ref: float


def cross_batch_weights(gram: Tensor, objective: Objective = "orthogonal",
                        alpha: float = 1.0) -> CrossBatchResult:
    """The whole rule from the 3×3 Gram matrix of (g_ce, g_kl, 𝒢_ce) (Eq. 5–11)."""
    g = gram.detach().double()
    u = g[:2, 2]
    w = qp_weights(u, objective)
    n_ce, n_kl = float(g[0, 0].clamp_min(0).sqrt()), float(g[1, 1].clamp_min(0).sqrt())
    wf = torch.tensor(final_weights(w, n_ce, n_kl), dtype=torch.float64, device=g.device)
    g2 = g[:2, :2]
    half = torch.full((2,), 0.5, dtype=torch.float64, device=g.device)
    norm_g0 = float((half @ g2 @ half).clamp_min(0).sqrt())
    norm_gw = float((wf @ g2 @ wf).clamp_min(0).sqrt())
    lam = alpha * norm_g0 / norm_gw if norm_gw > 0.0 else 0.0  # Eq. 10
    raw = half + lam * wf  # Eq. 11: g_final = g₀ + λ g_w
    norm_final = float((raw @ g2 @ raw).clamp_min(0).sqrt())
    norm_ref = float(g[2, 2].clamp_min(0).sqrt())
    den = norm_final * norm_ref
    cos = float(raw @ u) / den if den > 0.0 else 0.0
    return CrossBatchResult(w, wf, lam, raw, u, cos)


# ---------------------------------------------------------------------------------------------------


def _flat_full(jac: Jacobian) -> tuple[Tensor, list[Tensor]]:
    """Per-objective gradients over shared + private parameters as one (k, N) matrix."""
    cols = [jac.matrix]
    for j, p in enumerate(jac.private_params):
        cols.append(torch.stack([
            (g.reshape(-1).to(jac.matrix) if g is not None
             else torch.zeros(p.numel(), dtype=jac.matrix.dtype, device=jac.matrix.device))
            for g in (jac.private[i][j] for i in range(len(jac.names)))
        ]))
    return torch.cat(cols, dim=1), list(jac.shared) + list(jac.private_params)


def _aligned_reference(ref: Jacobian, params: list[Tensor], like: Tensor) -> Tensor:
    """The single-objective reference gradient laid out like ``params`` (0 where it is absent)."""
    full, ref_params = _flat_full(ref)
    slices: dict[int, Tensor] = {}
    off = 0
    for p in ref_params:
        slices[id(p)] = full[0, off:off + p.numel()]
        off += p.numel()
    parts = [slices[id(p)].to(like) if id(p) in slices else like.new_zeros(p.numel()) for p in params]
    return torch.cat(parts) if parts else like.new_zeros(0)


class CrossBatch(GradientWeighting):
    """Cross-batch KD weighting; see the module docstring. A weighting of the Jacobian, not of its Gram
    matrix alone: the 3 × 3 Gram it needs spans the private parameters and a reference gradient that is
    not a row of the Jacobian."""

    supports_feature_space = False  # needs parameter gradients (see kdrun.balancers.gradients.FeatureJacobian)
    needs_aux_batch = True
    min_objectives = 2
    max_objectives = 2

    def __init__(
        self,
        objective: Literal["orthogonal", "align"] = "orthogonal",
        alpha: Annotated[float, Ge(0.0)] = 1.0,
    ) -> None:
        super().__init__()
        self.objective: Objective = objective
        self.alpha = float(alpha)

    def on_bind(self) -> None:
        if set(self.objectives) != {"task", "distill"}:
            raise BalancerConfigError(
                f"balancer CrossBatch needs the objectives 'task' and 'distill', got "
                f"{', '.join(self.objectives)}; it weights the distillation term against the task "
                "loss, whose held-out gradient is the reference.")

    def jacobian_weights(self, jac: Jacobian, ctx: StepContext) -> Weights:
        if ctx.aux_objectives is None:
            raise RuntimeError("CrossBatch needs ctx.aux_objectives (balancer.needs_aux_batch=True)")
        full, params = _flat_full(jac)
        i_ce, i_kl = jac.names.index("task"), jac.names.index("distill")
        aux = ctx.aux_objectives()
        ref = _aligned_reference(ctx.gradients({"task": aux["task"]}), params, full)
        m = torch.stack([full[i_ce], full[i_kl], ref]).double()
        res = cross_batch_weights(m @ m.T, self.objective, self.alpha)
        raw_by = {"task": res.raw[0], "distill": res.raw[1]}
        pi_by = {"task": res.w[0], "distill": res.w[1]}
        raw = torch.stack([raw_by[n] for n in self.objectives])
        pi = torch.stack([pi_by[n] for n in self.objectives])
        extras = {
            "w_ce": res.w[0].float(), "w_kl": res.w[1].float(),
            "w_kl_final": res.w_final[1].float(), "lambda": torch.tensor(res.lam),
            "u_ce": res.u[0].float(), "u_kl": res.u[1].float(),
            "cos_final_ref": torch.tensor(res.cos_final_ref),
        }
        return Weights(pi, raw, extras)

"""DTO-KD: Dynamic Trade-off Optimisation (DTO-KD §3.1, Eq. 6–18, Theorem 3.1, Algorithm 1; MoKD §3.1).

Notation: ℓᵢ = log Lᵢ, gᵢ = ∇ log Lᵢ = ∇Lᵢ / Lᵢ, J = [g₁; g₂] (Eq. 8), G = J Jᵀ (Eq. 13–15),
Δ = the probability simplex. Losses enter logs clamped, L̃ = max(L, ``eps``), because log needs L > 0.

Two classes, one per algorithm, so that what the engine reads (``uses_ddp_backward``) is a property
of the class, not of a ``mode`` string: :class:`DTOExact` (``conf/balancer/dto_exact.yaml``)
and :class:`DTOAmortised` (``conf/balancer/dto.yaml``, the papers' practical algorithm).

:class:`DTOExact` — Eq. 9 solved exactly on the log-loss Gram matrix (gradient-level, any k ≥ 2)
-----------------------------------------------------------------------------------------------
G_log = D G D with D = diag(1/L̃) (:func:`kdrun.balancers.gradients.log_space`; no extra backward), then
π* = argmin_{π∈Δ} πᵀ G_log π (Eq. 9) by :func:`kdrun.balancers.min_norm.min_norm_weights`. For k = 2
that is Theorem 3.1,

    π₁* = (g₂₂ − g₁₂) / (g₁₁ + g₂₂ − 2g₁₂)      (Eq. 11),   π₂* = 1 − π₁*   (Eq. 12)

**clipped to [0, 1]**. Theorem 3.1 solves Eq. 10, whose only constraint is π₁ + π₂ = 1; the problem
the method actually poses, Eq. 9, is over the simplex Δ. The 1-D objective ½‖J π‖² is a convex
quadratic in π₁ with curvature g₁₁ + g₂₂ − 2g₁₂ = ‖g₁ − g₂‖² ≥ 0, so the exact minimiser over Δ is the
unconstrained one projected onto [0, 1]: clipping gives the exact Eq. 9 solution. Whenever the clip is
active (g₁₂ ≥ g₂₂ or g₁₂ ≥ g₁₁: one gradient's projection on the other exceeds the other's length),
g* is the shorter gradient, and Cor. 3.3's equal contribution ⟨g*, g₁⟩ = ⟨g*, g₂⟩ **no longer holds**
(⟨g*, g_short⟩ = ‖g_short‖² ≤ ⟨g*, g_long⟩). Cor. 3.2 (⟨g*, gᵢ⟩ ≥ 0) holds in both cases: it is the
optimality condition of the min-norm point of a convex set.

Degenerate denominator: when ‖g₁ − g₂‖² ≤ ``DEGENERATE_RTOL`` · (g₁₁ + g₂₂) (relative tolerance 1e-10,
which also covers g₁ = g₂ = 0), the two log-gradients are equal up to rounding, every π ∈ Δ gives the
same update, and we return π = (½, ½) (the paper's initial value) instead of dividing 0 by 0. The
update then differs from the exact min-norm point by at most ‖g₁ − g₂‖ ≤ √(1e-10 · (g₁₁ + g₂₂)), i.e.
1e-5 relative; below that level the Gram entries (fp64 sums of fp32 products) cannot resolve the
denominator anyway.

The update is g* = Σ πᵢ ∇log Lᵢ, written as ``raw_weights`` = πᵢ / L̃ᵢ on the raw gradients ∇Lᵢ.
This is exactly MGDA's two-objective min-norm solution (Sener & Koltun 2018, Alg. 1:
γ = clip((g₂ − g₁)ᵀg₂ / ‖g₁ − g₂‖², 0, 1)) applied to ∇log L instead of ∇L.

Notes on the corollaries (checked by the tests): with the interior solution,
‖g*‖² = (g₁₁g₂₂ − g₁₂²) / ‖g₁ − g₂‖² — the proofs of Cor. 3.4/3.5 (MoKD App. B) drop the −g₁₂²
term. Consequently Cor. 3.4 (‖g*‖ ≥ min‖gᵢ‖/√2) holds only for non-conflicting gradients (g₁₂ ≥ 0);
anti-parallel gradients give g* = 0. Cor. 3.5 holds with |‖g₁‖ − ‖g₂‖| in the denominator (the main
text's ‖g₁‖ − ‖g₂‖ can be negative) whenever the norms differ.

Amortised (:class:`DTOAmortised`) — the papers' practical algorithm = FAMO (Liu et al. 2023)
-----------------------------------------------------------------------------------------
Logits ξ (init 0, i.e. π = ½ as in Algorithm 1 line 2), π = softmax(ξ). The model step (Alg. 1
line 8–9) descends Σ πᵢ log Lᵢ, normalised as FAMO's code does so that the effective weights on the
raw gradients sum to one: ``raw_weights`` wᵢ = (πᵢ/L̃ᵢ) / Σⱼ(πⱼ/L̃ⱼ), one ordinary backward of
Σ wᵢ Lᵢ with w detached (= ∇ of Σ πᵢ log Lᵢ / c, c = Σ πⱼ/Lⱼ, for L ≥ eps; below ``eps`` the log's
derivative is capped at 1/eps, as FAMO's ``log(L + 1e-8)`` does). The weights use the rank-averaged
losses so every DDP rank uses the same w.

Then, in ``after_step`` (only after a successful optimiser step):

* ``update="famo"`` (default): δᵢ = log L̃ᵢ(θₜ) − log L̃ᵢ(θₜ₊₁) (Eq. 6's rates in log form: δᵢ ≈ rᵢ),
  ∇_ξ = J_softmax(ξ)ᵀ δ = π ⊙ (δ − πᵀδ), and the ξ-optimiser *descends* it (FAMO Alg. 1: the
  objective that improved more loses weight). Why this amortises Eq. 9 without a second backward:
  after an SGD model step θₜ₊₁ = θₜ − η g with g = Σ wᵢ∇Lᵢ = (1/c) Σ πᵢ ∇log Lᵢ, to first order
  δᵢ ≈ η ⟨∇log Lᵢ, g⟩, i.e. δ ≈ (η/c) G_log π = (η/c) ∇_π ½‖Σ πᵢ ∇log Lᵢ‖² — the gradient of
  Eq. 9's objective, measured by the losses instead of by a Jacobian.

  - ``next_loss="same_batch"`` (default): Lᵢ(θₜ₊₁) from ``ctx.recompute_objectives()`` — the same
    batch at the new parameters, no grad (Algorithm 1 line 10; one extra forward per step).
  - ``next_loss="lagged"``: the next step's losses stand in for Lᵢ(θₜ₊₁): ``after_step`` of step t+1
    updates ξ with δ = log L(θₜ; batch t) − log L(θₜ₊₁; batch t+1) (previous losses kept in a buffer;
    no extra forward, but δ then also contains the batch-to-batch loss noise). The first step only
    stores its losses.

* ``update="eq18"``: DTO-KD Eq. 18 / MoKD Eq. 15 *as written*:
  π ← π − η ∇_π ½‖π_d log L_d + π_t log L_t‖², then softmax renormalisation. We read "π" on the left
  as the unnormalised vector that the softmax maps back onto Δ, i.e. the logits: with s = πᵀℓ,
  ∇_π ½ s² = s ℓ and ξ ← ξ − η s ℓ (through the configured ξ-optimiser), π = softmax(ξ). (The other
  literal reading, softmax applied to an updated *probability* vector, is not a renormalisation — it
  moves every point of Δ, e.g. softmax(1, 0) = (0.73, 0.27) — and confines π to
  [1/(1+e), e/(1+e)] forever; we reject it.) ``next_loss`` has no effect (only L(θₜ) is used).

  How Eq. 18 differs from FAMO, honestly: it uses only the current loss *values* ℓ = log L(θₜ); it
  uses neither the improvement δ (Algorithm 1 line 11 computes the rates r and then never uses
  them) nor any gradient information, so it does not estimate ∇_π of Eq. 9 and is not an
  amortisation of Theorem 3.1. Its dynamics: log(π₁/π₂) moves by −η s (ℓ₁ − ℓ₂).
  - If the log-losses have opposite signs (one L > 1, one L < 1) the flow drives s → 0, a stable
    fixed point with π₁ℓ₁ + π₂ℓ₂ = 0, i.e. πᵢ ∝ 1/|log Lᵢ|.
  - If they have the same sign (both L > 1 or both L < 1), s never vanishes and π moves
    monotonically towards the vertex of the objective with the **smaller |log L|** (the loss closest
    to 1), the minimiser of ½(πᵀℓ)² over Δ (reached only asymptotically through the softmax; the
    weight decay on ξ holds it at a finite point).
  - In every case weight flows to the loss whose value is closest to 1, which depends on the losses'
    units: multiplying one loss by a constant (a temperature T², a loss weight) shifts ℓ and moves
    the fixed point. FAMO's δ and the exact rule's G_log are invariant to such rescaling.
  - It stops moving when ℓ₁ = ℓ₂ or s = 0, regardless of gradient conflict.

ξ-optimiser (``optimizer``): ``adamw`` (default, decoupled weight decay: DTO-KD §4, dto-kd.txt:238,
and MoKD §4, mokd.txt:197, name "AdamW with a learning rate of 0.025 and a weight decay of 0.01"; the
same default as ``conf/balancer/dto.yaml``), ``adam_l2`` (FAMO's code: ``torch.optim.Adam(lr=0.025,
weight_decay=γ)``, an L2 penalty, Cranial-XIX/FAMO famo.py:20; :class:`kdrun.balancers.famo.FAMO`'s
default), or ``sgd`` (plain η-step, the literal reading of Eq. 18). The two Adams are not
interchangeable (tests/balancers/test_logit_optim_kinds.py). Defaults
lr = 0.025, weight decay = 0.01 (DTO-KD §4 implementation details; FAMO's β and γ). The optimiser is
hand-written (:mod:`kdrun.balancers.logit_optim`) and its state — ξ, Adam moments, step count (and
the lagged losses) — is in this module's ``state_dict`` (float64).

Corner cases: losses below ``eps`` are clamped (log L ≥ log eps); a non-finite δ (e.g. the
recomputed loss overflowed) skips the ξ update rather than poisoning ξ with NaN; ``step()`` never
changes state (contract rule 1), all updates happen in ``after_step``; losses that feed ξ go through
``ctx.all_reduce_mean`` so every DDP rank holds the same ξ.

k ≥ 3 objectives (exact): Theorem 3.1 is a two-objective closed form, but the problem it solves, Eq. 9,
(dto-kd.txt:150, a minimum over the simplex Δ) is defined for any k; MoKD Remark A.1 (mokd.txt:369)
considers three-objective groupings such as (L_kl, L_kd, L_cls). There is no closed form; the
exact min-norm point of the k log-gradients is a convex QP, solved exactly by
:func:`kdrun.balancers.min_norm.min_norm_weights` (an interior-point start polished by an active-set
KKT solve; k = 2 is the closed form above, the same function). At the optimum every objective in the
support (πᵢ > 0) gets the same contribution ⟨g*, gᵢ⟩ = ‖g*‖² (Cor. 3.3 generalised, the KKT
condition) and every objective outside it at least that much (Cor. 3.2). ``raw_weights`` are
πᵢ / L̃ᵢ as for k = 2.

Objectives: any k ≥ 2 in both classes (exact: Eq. 9 via the QP above; amortised: FAMO is defined
for any k). No objective is looked up by position: π is reported in
``self.objectives`` order, and both rules are symmetric in the objectives.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor

from kdrun.balancers.base import GradientWeighting, LossWeighting, StepContext, Weights
from kdrun.balancers.gradients import Jacobian, log_space
from kdrun.balancers.logit_optim import OptimKind, new_state, optim_update
from kdrun.balancers.min_norm import DEGENERATE_RTOL, min_norm_weights
from kdrun.config import Ge, Gt

__all__ = ["DEGENERATE_RTOL", "DTOAmortised", "DTOExact", "amortised_raw_weights", "closed_form_weights",
           "eq18_logit_grad", "famo_logit_grad", "log_improvement"]


# ---------------------------------------------------------------------------------------------------
# Pure math (tested without a model).


def closed_form_weights(gram: Tensor) -> Tensor:
    """Theorem 3.1 (Eq. 11–12) clipped to the simplex: argmin_{π∈Δ} ½‖Jᵀπ‖² for a 2×2 Gram matrix.

    Returns a float64 (2,) tensor on ``gram``'s device. ``gram`` is whatever Gram matrix the rule is
    applied to (DTO-KD uses the log-loss one). Degenerate denominator (g₁ ≈ g₂, incl. both zero, or a
    non-finite G) → (½, ½). One implementation with the k ≥ 3 solver: this is
    :func:`~kdrun.balancers.min_norm.min_norm_weights`'s k = 2 branch (the same formula and
    ``DEGENERATE_RTOL``), computed on G divided by its largest diagonal entry (π is invariant to it).
    """
    if gram.shape != (2, 2):
        raise ValueError(f"closed_form_weights needs a 2x2 Gram matrix, got {tuple(gram.shape)}")
    return min_norm_weights(gram).to(gram.device)


def amortised_raw_weights(pi: Tensor, losses: Tensor, eps: float) -> Tensor:
    """FAMO's normalised weights on the raw gradients: wᵢ = (πᵢ/L̃ᵢ) / Σⱼ πⱼ/L̃ⱼ (sum to 1)."""
    r = pi.double() / losses.detach().double().clamp_min(eps)
    return r / r.sum()


def log_improvement(before: Tensor, after: Tensor, eps: float) -> Tensor:
    """δ = log L̃(θₜ) − log L̃(θₜ₊₁) (positive where the loss went down)."""
    return before.double().clamp_min(eps).log() - after.double().clamp_min(eps).log()


def famo_logit_grad(logits: Tensor, delta: Tensor) -> Tensor:
    """∇_ξ of FAMO: J_softmax(ξ)ᵀ δ = π ⊙ (δ − πᵀδ) (the softmax Jacobian is symmetric)."""
    pi = torch.softmax(logits.double(), dim=0)
    d = delta.double().to(pi.device)
    return pi * (d - (pi * d).sum())


def eq18_logit_grad(logits: Tensor, log_losses: Tensor) -> Tensor:
    """Eq. 18's gradient ∇_π ½(πᵀℓ)² = (πᵀℓ) ℓ at π = softmax(ξ), applied to ξ (see module doc)."""
    pi = torch.softmax(logits.double(), dim=0)
    ell = log_losses.double().to(pi.device)
    return (pi * ell).sum() * ell


# ---------------------------------------------------------------------------------------------------


class DTOExact(GradientWeighting):
    """Eq. 9 on the log-loss Gram matrix, exactly: Theorem 3.1 clipped to the simplex for k = 2, the
    min-norm QP for k ≥ 3 (module doc).

    Gradient-level: the forward runs outside DDP's reducer and the rank-averaged Jacobian gives every
    rank the same π. Not a :class:`~kdrun.balancers.base.GramWeighting`: its Gram matrix is the
    log-losses' D G D, which needs the (rank-averaged) losses besides G, and π ≠ the raw weights π/L̃.
    Stateless."""

    def __init__(self, eps: Annotated[float, Gt(0.0)] = 1e-8) -> None:
        super().__init__()
        self.eps = float(eps)

    def jacobian_weights(self, jac: Jacobian, ctx: StepContext) -> Weights:
        losses = ctx.all_reduce_mean(self.stack(ctx.objectives).detach().double()).to(jac.matrix.device)
        g_log = log_space(jac.gram(), losses, self.eps)
        pi = self.weights(g_log).to(losses.device)
        raw = pi / losses.clamp_min(self.eps)
        return Weights(pi, raw, self.extras(g_log, pi))

    @staticmethod
    def weights(g_log: Tensor) -> Tensor:
        """π* = argmin_{π∈Δ} πᵀ G_log π (Eq. 9), float64 on the CPU: for k = 2 Theorem 3.1 clipped
        (:func:`closed_form_weights`), for k ≥ 3 the exact QP; one call for both."""
        return min_norm_weights(g_log)

    @staticmethod
    def extras(g_log: Tensor, pi: Tensor) -> dict[str, Tensor]:
        """``clipped``: the optimum is on a face of Δ (some πᵢ = 0, or 1 for k = 2), so the objectives no
        longer contribute equally (Cor. 3.3 fails); ``degenerate``: π is the fallback of a G whose
        optimum is not unique (k = 2: g₁ ≈ g₂; any k: all-zero or non-finite G); k = 2 also logs the
        cosine of the two log-gradients."""
        tiny = torch.finfo(torch.float64).tiny
        if len(pi) == 2:
            g11, g22, g12 = g_log[0, 0], g_log[1, 1], g_log[0, 1]
            return {
                "log_grad_cosine": (g12 / (g11 * g22).sqrt().clamp_min(tiny)).float(),
                "clipped": ((pi == 0) | (pi == 1)).any().float(),
                "degenerate": (~(g11 + g22 - 2.0 * g12 > DEGENERATE_RTOL * (g11 + g22))).float(),
            }
        diag = g_log.diagonal()
        return {"clipped": (pi == 0).any().float(),
                "degenerate": (~(torch.isfinite(g_log).all() & (diag.max() > 0))).float()}


class DTOAmortised(LossWeighting):
    """The amortised π update (FAMO's, or Eq. 18 as written); loss-level, any k ≥ 2 (module doc).

    ``needs_recompute`` is the one flag that depends on the configuration (``update=famo`` with
    ``next_loss=same_batch`` re-evaluates the batch after the step), so it is set per instance."""

    def __init__(
        self,
        next_loss: Literal["same_batch", "lagged"] = "same_batch",
        update: Literal["famo", "eq18"] = "famo",
        lr: Annotated[float, Gt(0.0)] = 0.025,
        weight_decay: Annotated[float, Ge(0.0)] = 0.01,
        optimizer: Literal["adam_l2", "adamw", "sgd"] = "adamw",
        eps: Annotated[float, Gt(0.0)] = 1e-8,
    ) -> None:
        super().__init__()
        self.next_loss = next_loss
        self.update = update
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.optimizer: OptimKind = optimizer
        self.eps = float(eps)
        self.needs_recompute = update == "famo" and next_loss == "same_batch"

    # -- state -----------------------------------------------------------------------------------

    def on_bind(self) -> None:
        k = len(self.objectives)
        self.register_buffer("logits", torch.zeros(k, dtype=torch.float64))
        for name, t in new_state(k).items():
            self.register_buffer(f"optim_{name}", t)
        if self.update == "famo" and self.next_loss == "lagged":
            self.register_buffer("prev_losses", torch.ones(k, dtype=torch.float64))
            self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))

    def _losses(self, ctx: StepContext, objectives: dict[str, Tensor]) -> Tensor:
        """Detached, rank-averaged loss vector in ``self.objectives`` order."""
        return ctx.all_reduce_mean(self.stack(objectives).detach().double())

    def _step_logits(self, grad: Tensor) -> None:
        st = optim_update(self.logits, grad, self.optim_exp_avg, self.optim_exp_avg_sq,
                          self.optim_step, lr=self.lr, weight_decay=self.weight_decay,
                          kind=self.optimizer)
        self.logits.copy_(st.param)
        self.optim_exp_avg.copy_(st.exp_avg)
        self.optim_exp_avg_sq.copy_(st.exp_avg_sq)
        self.optim_step.copy_(st.step)

    # -- step ------------------------------------------------------------------------------------

    def loss_weights(self, ctx: StepContext) -> Weights:
        mean_losses = self._losses(ctx, ctx.objectives)
        pi = torch.softmax(self.logits.to(mean_losses.device), dim=0)
        w = amortised_raw_weights(pi, mean_losses, self.eps)
        extras = {f"logit/{n}": self.logits[i].float() for i, n in enumerate(self.objectives)}
        return Weights(pi, w, extras)

    # -- after the optimiser step ----------------------------------------------------------------

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        now = self._losses(ctx, ctx.objectives).to(self.logits.device)
        if self.update == "eq18":
            ell = now.clamp_min(self.eps).log()
            grad = eq18_logit_grad(self.logits, ell)
            if bool(torch.isfinite(grad).all()):
                self._step_logits(grad)
            return
        if self.next_loss == "same_batch":
            if ctx.recompute_objectives is None:
                raise RuntimeError("DTOAmortised(next_loss='same_batch') needs ctx.recompute_objectives "
                                   "(the engine provides it when balancer.needs_recompute is True)")
            after = self._losses(ctx, ctx.recompute_objectives()).to(self.logits.device)
            delta = log_improvement(now, after, self.eps)
            if bool(torch.isfinite(delta).all()):
                self._step_logits(famo_logit_grad(self.logits, delta))
            return
        # lagged: this step's losses stand in for L(θ_t+1) of the previous step.
        if bool(self.has_prev):
            delta = log_improvement(self.prev_losses, now, self.eps)
            if bool(torch.isfinite(delta).all()):
                self._step_logits(famo_logit_grad(self.logits, delta))
        if bool(torch.isfinite(now).all()):
            self.prev_losses.copy_(now)
            self.has_prev.fill_(True)

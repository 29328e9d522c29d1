"""Gradient-aggregation baselines whose weights are a function of the Gram matrix G = J Jᵀ, via torchjd.

Each class wraps the maintained implementation in ``torchjd.aggregation`` (torchjd ≥ 0.18; MGDA by
default uses kdrun's exact min-norm solver instead, :mod:`kdrun.balancers.min_norm`): a
*weighting* maps the k × k Gramian of the per-objective gradients to a weight vector w, and the
update is Jᵀw (``Jacobian.write_grad(w)``), which is exactly what the corresponding torchjd
*aggregator* returns for J (the tests check ``.grad`` against the aggregator on random J).

Why one file with seven thin classes rather than seven files or one class with a name switch: the
math lives in torchjd, so every method here is a constructor plus at most a few lines; a separate
class per method keeps each method's hyper-parameters in its own typed signature (the config validator
checks ``balancer.c`` for CAGrad, rejects it for MGDA), and each method still has its own
``conf/balancer/<name>.yaml``.

| class     | paper                                   | torchjd weighting          | defaults |
| --------- | --------------------------------------- | -------------------------- | -------- |
| ``MGDA``     | Sener & Koltun 2018, Eq. 3 (min-norm point) | exact: ``min_norm.py``; or ``MGDAWeighting`` | solver exact (frank_wolfe: epsilon 1e-3, max_iters 100) |
| ``PCGrad``   | Yu et al. 2020, Alg. 1                  | ``PCGradWeighting``        | seed 0 |
| ``CAGrad``   | Liu et al. 2021, Alg. 1                 | ``CAGradWeighting``        | c 0.4, norm_eps 1e-4 |
| ``FairGrad`` | Ban & Ji 2024, Eq. 4 (α-fairness)       | ``FairGradWeighting``      | alpha 1.0 |
| ``IMTLG``    | Liu et al. 2021 (IMTL-G), torchjd's generalisation | ``IMTLGWeighting`` | — |
| ``NashMTL``  | Navon et al. 2022, Alg. 1               | ``NashMTL``'s weighting    | max_norm 1.0, every 1, niter 20 |
| ``UPGrad``   | Quinton & Rey 2024                      | ``UPGradWeighting``        | norm_eps 1e-4, reg_eps 1e-4 |

All are gradient-level (``uses_ddp_backward = False``; ``ctx.jacobian()`` is rank-averaged so every
rank computes the same w). The weights are computed on G / scale² (the loss scale of fp16 training
divided out): most rules are invariant to scaling J, but FairGrad (Gw = w^{-1/α}) and Nash-MTL's
``max_norm`` clip are not, and must see the true gradients. Computation is in float64 on the CPU.

Corner cases: zero rows and identical rows give finite weights for every rule (tested). PCGrad's
random projection order uses torch's global CPU generator inside torchjd; we run it under
``torch.random.fork_rng`` with a generator seeded from (``seed``, step), so training's RNG stream is
untouched and a resumed run reproduces the same order. For k = 2 the order does not matter.
Nash-MTL is stateful (warm start α_{t−1} and a step counter for ``update_weights_every``): that state
lives in this module's buffers, is set into torchjd's object before each solve and committed only in
``after_step`` (contract rule 1). torchjd's optional solver dependencies (``quadprog``/``qpsolvers``
for UPGrad, ``cvxpy`` with ``clarabel`` for CAGrad and with ``ecos`` for Nash-MTL) are checked when
the balancer is constructed; torchjd's ImportError names the extra to install
(``pip install "torchjd[full]"``).
"""
from __future__ import annotations

import warnings
from importlib.util import find_spec
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from kdrun.balancers.base import GramWeighting, StepContext
from kdrun.balancers.min_norm import min_norm_weights
from kdrun.config import Ge, Gt


class GramianBalancer(GramWeighting):
    """w = weighting(G) for a torchjd ``Weighting`` (or any G → w function) set by the constructor; the
    update Jᵀw and the loss-scale division are :class:`~kdrun.balancers.base.GramWeighting`'s."""

    def _set_weighting(self, weighting: Any) -> None:
        # Not registered as a submodule: torchjd's objects hold no tensors we want in the
        # state_dict (and cvxpy problems must not be moved between devices).
        object.__setattr__(self, "_weighting", weighting)

    def weights_from_gram(self, gram: Tensor, step: int = 0) -> Tensor:
        """Weights (float64, CPU) from the true-scale Gram matrix; pure w.r.t. the module state."""
        with torch.no_grad():
            return self._weighting(gram.detach().double().cpu()).double()


class MGDA(GramianBalancer):
    """MGDA-UB's min-norm point of the convex hull of the gradients.

    ``solver="exact"`` (default): :func:`kdrun.balancers.min_norm.min_norm_weights` — the closed form for
    k = 2, an exact QP (Clarabel + active-set polish) for k ≥ 3. ``solver="frank_wolfe"``: torchjd's
    ``MGDAWeighting`` (Sener & Koltun 2018, Alg. 2) with ``epsilon``/``max_iters``, which are used only
    by it; with its defaults it stops up to 2.4 ‖g*‖ from the min-norm point on conflicting
    three-objective problems (issue #11). For k = 2 both are exact (one exact line search on a segment).
    """

    def __init__(
        self,
        solver: Literal["exact", "frank_wolfe"] = "exact",
        epsilon: Annotated[float, Gt(0.0)] = 1e-3,  # frank_wolfe: stop when the step γ̂ < epsilon
        max_iters: Annotated[int, Ge(1)] = 100,     # frank_wolfe: iterations at most
    ) -> None:
        super().__init__()
        self.solver = solver
        if solver == "frank_wolfe":
            from torchjd.aggregation import MGDAWeighting

            self._set_weighting(MGDAWeighting(epsilon=epsilon, max_iters=max_iters))
        else:
            self._set_weighting(min_norm_weights)


class PCGrad(GramianBalancer):
    """PCGrad: project each gradient onto the normal plane of conflicting ones, then sum."""

    def __init__(self, seed: Annotated[int, Ge(0)] = 0) -> None:
        super().__init__()
        from torchjd.aggregation import PCGradWeighting

        self.seed = int(seed)
        self._set_weighting(PCGradWeighting())

    def weights_from_gram(self, gram: Tensor, step: int = 0) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed * 1_000_003 + int(step))
            return super().weights_from_gram(gram, step)


class CAGrad(GramianBalancer):
    """CAGrad: maximise the worst-case local improvement within a ball around the mean gradient."""

    def __init__(
        self,
        c: Annotated[float, Ge(0.0)] = 0.4,  # radius scale; 0.4 in the CAGrad paper's MTL runs
        norm_eps: Annotated[float, Ge(0.0)] = 1e-4,
    ) -> None:
        super().__init__()
        from torchjd.aggregation import CAGradWeighting

        self._set_weighting(CAGradWeighting(c=c, norm_eps=norm_eps))


class FairGrad(GramianBalancer):
    """FairGrad: α-fair allocation, solves G w = w^{-1/α} (w ≥ 0)."""

    def __init__(
        self,
        alpha: Annotated[float, Ge(0.0)] = 1.0,  # 1 = proportional fairness; 0 = mean
        max_iters: Annotated[int, Ge(1)] | None = None,  # None: scipy's default (100·k evaluations)
    ) -> None:
        super().__init__()
        from torchjd.aggregation import FairGradWeighting

        self._set_weighting(FairGradWeighting(alpha=alpha, max_iters=max_iters))


class IMTLG(GramianBalancer):
    """IMTL-G: the update has equal projections on every unit gradient (pinv-based, rank-safe)."""

    def __init__(self) -> None:
        super().__init__()
        from torchjd.aggregation import IMTLGWeighting

        self._set_weighting(IMTLGWeighting())


class UPGrad(GramianBalancer):
    """UPGrad: average of each gradient projected onto the dual cone of all gradients."""

    def __init__(
        self,
        norm_eps: Annotated[float, Ge(0.0)] = 1e-4,
        reg_eps: Annotated[float, Ge(0.0)] = 1e-4,
    ) -> None:
        super().__init__()
        from torchjd.linalg import QuadprogProjector
        from torchjd.aggregation import UPGradWeighting

        self._set_weighting(UPGradWeighting(
            projector=QuadprogProjector(norm_eps=norm_eps, reg_eps=reg_eps)))


class NashMTL(GramianBalancer):
    """Nash-MTL: the Nash bargaining solution G w = 1/w, via torchjd's sequential CCP (cvxpy/ECOS).

    torchjd's Nash-MTL weighting takes the Jacobian, but uses it only through JJᵀ (and ‖Jᵀα‖ =
    √(αᵀGα) for ``max_norm``); we pass a k × k square root M of G (M Mᵀ = G, from ``eigh``), which
    gives the same weights without copying the n-column Jacobian to the CPU.
    """

    def __init__(
        self,
        max_norm: Annotated[float, Ge(0.0)] = 1.0,  # clip ‖Jᵀα‖ to this (0 disables); paper code 1.0
        update_weights_every: Annotated[int, Ge(1)] = 1,
        optim_niter: Annotated[int, Ge(1)] = 20,
    ) -> None:
        super().__init__()
        missing = [m for m in ("numpy", "cvxpy", "ecos") if find_spec(m) is None]
        if missing:
            raise ImportError(f"NashMTL requires {missing} to be installed. Install them with: "
                              'pip install "torchjd[nash_mtl]"')
        self.max_norm = float(max_norm)
        self.update_weights_every = int(update_weights_every)
        self.optim_niter = int(optim_niter)
        self._pending: tuple[int, Tensor, int] | None = None

    def on_bind(self) -> None:
        from torchjd.aggregation import NashMTL as _Agg

        k = len(self.objectives)
        self._set_weighting(_Agg(n_tasks=k, max_norm=self.max_norm,
                                 update_weights_every=self.update_weights_every,
                                 optim_niter=self.optim_niter).weighting)
        self.register_buffer("prev_alpha", torch.ones(k, dtype=torch.float64))
        self.register_buffer("solve_step", torch.zeros((), dtype=torch.int64))

    def weights_from_gram(self, gram: Tensor, step: int = 0) -> Tensor:
        import numpy as np

        wt = self._weighting
        # Load our (checkpointed) state into torchjd's object before every call, so that its own
        # mutation is never the source of truth.
        if getattr(wt, "prob", None) is None:
            wt._init_optim_problem()
        wt.step = float(self.solve_step.item())
        wt.prvs_alpha = self.prev_alpha.cpu().numpy().astype(np.float32)
        g = gram.detach().double().cpu()
        if not bool(g.diagonal().sum() > 0):
            # All gradients zero (or non-finite): torchjd would divide by ‖G‖ = 0 and hand NaN to
            # cvxpy. The update is zero whatever w is; keep the previous α and count the step.
            self._pending = (step, self.prev_alpha.detach().cpu().clone(),
                             int(self.solve_step.item()) + 1)
            return self.prev_alpha.detach().cpu().clone()
        evals, evecs = torch.linalg.eigh(0.5 * (g + g.T))
        root = evecs * evals.clamp_min(0.0).sqrt()
        with torch.no_grad(), warnings.catch_warnings():
            # cvxpy warns that torchjd's problem is not DPP (no compilation cache); harmless.
            warnings.filterwarnings("ignore", message=".*not DPP.*")
            # numpy noise from cvxpy evaluating 1/α at α = 0 on rank-deficient G; the result is finite.
            warnings.filterwarnings("ignore", category=RuntimeWarning, module="cvxpy")
            w = wt(root).double()
        self._pending = (step, torch.as_tensor(np.asarray(wt.prvs_alpha), dtype=torch.float64),
                         int(wt.step))
        return w

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if self._pending is None or self._pending[0] != ctx.step:
            return
        _, alpha, count = self._pending
        self.prev_alpha.copy_(alpha)
        self.solve_step.fill_(count)
        self._pending = None

"""The balancer seam: the engine hands a balancer the objective vector, the balancer writes ``.grad``.

Every kind of method fits behind one interface without the engine knowing which one runs. Every
kdrun method's update is a weighted sum Σ wᵢ ∇Lᵢ, so a method states only its *weighting* and one of two
bases applies it (the split of torchjd 0.18's ``aggregation/_aggregator_bases.py``: ``WeightedAggregator``,
line 48, applies a ``Weighting`` of the Jacobian as ``weights @ matrix``, line 67;
``GramianWeightedAggregator``, line 76, a ``Weighting`` of its Gramian, ``weighting << compute_gramian``,
line 87):

* **loss-level** (:class:`LossWeighting`: ``fixed``, amortised DTO, FAMO, uncertainty, DWA, distill-decay):
  implement ``loss_weights(ctx)``, weights from the losses and the method's own state; the base does
  the one ``ctx.backward(Σ wᵢ Lᵢ)``. Under DDP this is the ordinary single backward, so DDP's all-reduce
  averages the gradient.
* **gradient-level** (:class:`GradientWeighting`: exact DTO, GradNorm, cross-batch; :class:`GramWeighting`:
  MGDA, PCGrad, CAGrad, FairGrad, IMTL-G, Nash-MTL, UPGrad): implement ``jacobian_weights(jac, ctx)``
  (or, when the weights are a function of the Gram matrix alone, ``weights_from_gram(G, step)``); the
  base asks ``ctx.jacobian()`` for the per-objective gradients (already averaged across ranks, so every
  rank computes the same weights) and writes Σ wᵢ gᵢ with
  :meth:`kdrun.balancers.gradients.Jacobian.write_grad`. ``uses_ddp_backward = False``, so the engine
  runs the forward outside DDP's reducer.
* **wrappers** (:class:`~kdrun.balancers.objective_clip.ObjectiveClip`) write their own ``step`` and call
  the wrapped method's :meth:`WeightedBalancer.step_weights`.
* **extra-batch** (cross-batch): set ``needs_aux_batch = True`` and call ``ctx.aux_objectives()`` for
  the objective vector of an independently drawn batch at the current parameters.
* **recomputing** (amortised DTO/FAMO with ``next_loss=same_batch``): set ``needs_recompute = True`` and
  call ``ctx.recompute_objectives()`` in ``after_step`` for the same batch's objectives at the updated
  parameters; the engine provides it only to balancers that declare it (else it is ``None``).

The engine builds the :class:`StepContext` with :func:`kdrun.engine.context.step_context` (the balancer
tests use the same function) and runs the step in :class:`kdrun.engine.step.KDStep`.

Contract (the engine relies on it):

1. ``step`` must leave ``.grad`` set on every trainable parameter that received gradient and must
   **not** mutate the balancer's state: a step whose gradient turns out non-finite is skipped, and the
   balancer must then be exactly as it was. State changes go in ``after_step``, which the engine calls
   only after a successful optimiser step.
2. ``weights`` in the returned :class:`StepResult` are the method's π (logged as ``pi/<objective>``);
   ``raw_weights`` are the effective weights on the *raw* loss gradients ∇Lᵢ (equal to π for methods
   that weight raw losses), used for the diagnostics.
3. All state lives in buffers/parameters/``extra state`` of this ``nn.Module`` so that it is in the
   checkpoint's ``state_dict``.
4. A weighting (``loss_weights``, ``jacobian_weights``, ``weights_from_gram``) is rule 1's ``step`` minus
   the write: it returns the step's weights and must not change the state either. It may *stage* an
   update computed from what only the step sees (GradNorm's and Nash-MTL's, keyed by ``ctx.step``) for
   ``after_step`` to commit.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from kdrun.balancers.gradients import Jacobian


class BalancerConfigError(ValueError):
    """A balancer used with an objective set it is not defined for."""


@dataclass
class StepResult:
    """What a balancer reports for one step (all tensors; the logger syncs them on log steps only)."""

    weights: Tensor
    raw_weights: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Weights:
    """One step's weighting, before it is applied (what a :class:`WeightedBalancer` computes).

    ``pi``: the method's π (``StepResult.weights``); ``raw``: the weights on the raw gradients ∇Lᵢ that
    the base applies, in ``Balancer.objectives`` order, kept in the precision the method computed them in
    (float64 for most) so that the backward's cast to the losses' dtype rounds once; ``extras``: logged as
    ``balancer/<key>``.
    """

    pi: Tensor
    raw: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)

    def result(self) -> StepResult:
        """The engine's view: fp32 π and raw weights (the logger stacks them with the fp32 losses)."""
        return StepResult(weights=self.pi.float(), raw_weights=self.raw.float(), extras=self.extras)


@dataclass
class StepContext:
    """Everything a balancer may ask of the engine during one step.

    Attributes:
        step: global optimiser step (0-based) about to be taken.
        objectives: the objective vector of this step, in ``Balancer.objectives`` order.
        backward: backward of a scalar through the normal path (loss scaling, DDP all-reduce).
        jacobian: per-objective gradients on the shared parameters, rank-averaged; cached, so the
            engine's diagnostics and the balancer share one computation.
        gradients: the same for any objective dict (e.g. an auxiliary batch's), not cached.
        aux_objectives: objective vector on an independently drawn batch (extra-batch balancers).
        recompute_objectives: no-grad objective vector of the *same* batch at the current parameters
            (DTO-KD Algorithm 1 line 10, after the optimiser step); ``None`` unless the balancer sets
            ``needs_recompute``.
        all_reduce_mean: average a tensor across ranks (identity on one process).
        diagnostics: whether this step's gradient statistics are logged.
        params: the trainable parameters the Jacobian is taken over, in the model's order (the same in a
            resumed run), for state kept per parameter (DOT's momentum buffers).
    """

    step: int
    objectives: dict[str, Tensor]
    backward: Callable[[Tensor], None]
    jacobian: Callable[[], "Jacobian"]
    gradients: Callable[[dict[str, Tensor]], "Jacobian"]
    aux_objectives: Callable[[], dict[str, Tensor]] | None = None
    recompute_objectives: Callable[[], dict[str, Tensor]] | None = None
    all_reduce_mean: Callable[[Tensor], Tensor] = lambda t: t
    diagnostics: bool = False
    params: Sequence[Tensor] = ()


class Balancer(nn.Module):
    """Base class; see the module docstring for the contract."""

    uses_ddp_backward: ClassVar[bool] = True
    needs_aux_batch: ClassVar[bool] = False
    needs_recompute: ClassVar[bool] = False
    # Whether the weight rule works from the Gram matrix alone, so that trainer.grad_space=features
    # (gradients w.r.t. a shared representation, one backward per step) can serve it.
    supports_feature_space: ClassVar[bool] = True
    min_objectives: ClassVar[int] = 2
    max_objectives: ClassVar[int | None] = None
    # The run's planned number of optimiser steps, for schedules (distill_decay); None until the engine
    # calls set_total_steps, and in unit tests that never do.
    total_steps: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.objectives: tuple[str, ...] = ()
        # Where this balancer's settings live in the config, for the messages of bind (a wrapper such as
        # objective_clip sets its inner balancer's to "balancer.inner").
        self.config_key = "balancer"

    @classmethod
    def check_run(cls, cfg: DictConfig) -> None:
        """Called by :func:`kdrun.config.validate` with the composed config, before anything is built: a
        balancer whose method constrains other parts of the run (DOT: a plain SGD) raises
        :class:`kdrun.config.ConfigError` here. Default: nothing."""

    def named_objectives(self) -> dict[str, list[str]]:
        """The objective names this balancer's settings name, per setting (``{"alphas": ["distill"]}``).

        :meth:`bind` checks them against the run's objectives, so that a setting naming an objective the
        run does not have is an error instead of being ignored (``balancer.alphas={foo: 1}`` used to train
        with the default weights). Every balancer with such a setting overrides this. Default: none."""
        return {}

    def set_total_steps(self, total_steps: int) -> None:
        """Called once by the engine, before the first step, with the planned number of optimiser
        steps (``trainer.max_steps`` or epochs × steps per epoch, whichever is smaller)."""
        self.total_steps = int(total_steps)

    def bind(self, objectives: tuple[str, ...]) -> None:
        """Called once by the engine with the objective names, before any step or state load."""
        k = len(objectives)
        hi = self.max_objectives
        if k < self.min_objectives or (hi is not None and k > hi):
            want = f"exactly {hi}" if hi == self.min_objectives else (
                f"at least {self.min_objectives}" + (f" and at most {hi}" if hi else ""))
            raise BalancerConfigError(
                f"balancer {type(self).__name__} is defined for {want} objectives, got {k} "
                f"({', '.join(objectives)}); change `objectives` or pick another balancer."
            )
        for key, names in self.named_objectives().items():
            unknown = [str(n) for n in names if n not in objectives]
            if unknown:
                example = ", ".join(f"{n}: 1.0" for n in objectives)
                # The usual way to lose `distill`: a run without distill terms, or task.objectives naming
                # the distillation objectives itself.
                why = (" (there is a distill objective only with distill terms and the default task.objectives)"
                       if "distill" in unknown else "")
                raise BalancerConfigError(
                    f"{self.config_key}.{key} names {', '.join(repr(n) for n in unknown)}, which "
                    f"{'is not an objective' if len(unknown) == 1 else 'are not objectives'} of this run{why}: "
                    f"its objectives are {', '.join(objectives)} (task.objectives groups the loss terms into "
                    f"them); use those names, e.g. {self.config_key}.{key}={{{example}}}."
                )
        self.objectives = tuple(objectives)
        self.on_bind()

    def on_bind(self) -> None:
        """Create objective-count dependent state (e.g. logits). Default: nothing."""

    def stack(self, objectives: dict[str, Tensor]) -> Tensor:
        """The objective vector as a (k,) tensor in ``self.objectives`` order."""
        return torch.stack([objectives[n] for n in self.objectives])

    def step(self, ctx: StepContext) -> StepResult:  # pragma: no cover - interface
        raise NotImplementedError

    def after_step(self, ctx: StepContext) -> None:
        """Commit state after a successful optimiser step. Default: nothing."""


class WeightedBalancer(Balancer, ABC):
    """A balancer whose update is Σᵢ wᵢ ∇Lᵢ: the weighting apart from applying it.

    torchjd 0.18's ``aggregation/_aggregator_bases.py`` separates a ``Weighting`` (matrix → weights) from
    the ``WeightedAggregator`` that applies it (``WeightedAggregator.forward``, lines 70–73: ``weights =
    self.weighting(matrix)``, then ``weights @ matrix``); here :meth:`step_weights` is the weighting and the
    two subclasses' ``step`` the application, so a wrapper (objective_clip) can ask any method for its
    weights and apply them to gradients of its own."""

    @abstractmethod
    def step_weights(self, ctx: StepContext) -> Weights:
        """This step's weights (rule 4 of the module docstring: no state change)."""


class LossWeighting(WeightedBalancer):
    """Loss-level: one ordinary backward of Σ wᵢ Lᵢ with w detached (∇ of it is Σ wᵢ ∇Lᵢ).

    A subclass implements :meth:`loss_weights` (and its state update in ``after_step``)."""

    uses_ddp_backward = True

    @abstractmethod
    def loss_weights(self, ctx: StepContext) -> Weights:
        """The weights from the losses ``ctx.objectives`` (read detached), ``ctx.step`` and the state."""

    def step_weights(self, ctx: StepContext) -> Weights:
        return self.loss_weights(ctx)

    def step(self, ctx: StepContext) -> StepResult:
        w = self.loss_weights(ctx)
        losses = self.stack(ctx.objectives)
        ctx.backward((w.raw.detach().to(device=losses.device, dtype=losses.dtype) * losses).sum())
        return w.result()

    def objectives_like(self, ctx: StepContext) -> Tensor:
        """One objective of the step, for the device and dtype the weights are made on (no graph op)."""
        return ctx.objectives[self.objectives[0]]


class GradientWeighting(WeightedBalancer):
    """Gradient-level: the update Σ wᵢ gᵢ written from the per-objective gradients ``ctx.jacobian()``.

    A subclass implements :meth:`jacobian_weights`. The Jacobian's rows are in ``self.objectives`` order:
    the engine binds the balancer to ``tuple(groups)`` (kdrun/engine/build.py ``balancer.bind``) and builds
    the objectives from the same dict (kdrun/tasks/base.py ``group``), so raw weights index both alike."""

    uses_ddp_backward = False

    @abstractmethod
    def jacobian_weights(self, jac: Jacobian, ctx: StepContext) -> Weights:
        """The weights from the rank-averaged per-objective gradients ``jac`` (rows = objectives)."""

    def step_weights(self, ctx: StepContext) -> Weights:
        return self.jacobian_weights(ctx.jacobian(), ctx)

    def step(self, ctx: StepContext) -> StepResult:
        jac = ctx.jacobian()  # once: a context without a cache would otherwise compute it twice
        w = self.jacobian_weights(jac, ctx)
        jac.write_grad(w.raw)
        return w.result()


class GramWeighting(GradientWeighting):
    """Gradient-level with weights = f(G) alone, G = J Jᵀ at true scale (torchjd's
    ``GramianWeightedAggregator``: the weighting sees the Gramian, the update is Jᵀw); π = raw weights.

    A subclass implements :meth:`weights_from_gram`. Because only G is needed, ``trainer.grad_space=features``
    (a Gram matrix of representation gradients) serves these methods too."""

    @abstractmethod
    def weights_from_gram(self, gram: Tensor, step: int = 0) -> Tensor:
        """Weights (float64) from the k × k Gram matrix with the fp16 loss scale divided out."""

    def jacobian_weights(self, jac: Jacobian, ctx: StepContext) -> Weights:
        # The loss scale is divided out: FairGrad (Gw = w^{-1/α}) and Nash-MTL's max_norm clip are not
        # invariant to the scale of J, and must see the true gradients.
        gram = jac.gram() / (jac.scale * jac.scale)
        w = self.weights_from_gram(gram, ctx.step).to(jac.matrix.device)
        return Weights(w, w)

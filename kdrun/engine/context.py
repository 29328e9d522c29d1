"""The balancer's :class:`~kdrun.balancers.base.StepContext` for one step, built in one place.

The engine's :class:`~kdrun.engine.step.KDStep` and the balancer tests both call :func:`step_context`, so a
balancer is tested against the context it really gets in a run: the same Jacobian cache (shared by the
balancer and the gradient diagnostics), the same loss scale, the same rank averaging.
"""
from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor

from kdrun.runtime import distributed
from kdrun.balancers.base import StepContext
from kdrun.balancers.gradients import Jacobian, JacobianMode, compute_feature_jacobian, compute_jacobian


def step_context(
    step: int,
    objectives: dict[str, Tensor],
    params: Sequence[Tensor],
    *,
    backward: Callable[[Tensor], None] = lambda loss: loss.backward(),
    scale: float = 1.0,
    feature: Tensor | None = None,
    jacobian_mode: JacobianMode | None = None,
    aux_objectives: Callable[[], dict[str, Tensor]] | None = None,
    recompute_objectives: Callable[[], dict[str, Tensor]] | None = None,
    all_reduce_mean: Callable[[Tensor], Tensor] = distributed.all_reduce_mean,
    all_reduce_sum: Callable[[Tensor], Tensor] = distributed.all_reduce_sum,
    world_size: int | None = None,
    diagnostics: bool = False,
) -> StepContext:
    """Everything a balancer may ask of one step.

    ``backward`` is the normal backward path (the engine's scales the loss for fp16 and goes through
    DDP's reducer); ``scale`` is the loss scale it applies, which the Jacobian carries so diagnostics
    can divide it out. ``feature`` set: the Jacobian is taken w.r.t. that shared representation
    (``trainer.grad_space=features``) instead of ``params``. ``diagnostics`` keeps the graph after the
    Jacobian (``retain_graph``), because the diagnostic steps compute it before the balancer, whose
    own backward may still need the graph.
    """
    cache: dict[str, Jacobian] = {}

    def jacobian() -> Jacobian:
        if "j" not in cache:  # one computation per step, shared by the balancer and the diagnostics
            if feature is not None:
                cache["j"] = compute_feature_jacobian(
                    objectives, feature, backward, scale=scale, all_reduce_sum=all_reduce_sum,
                    world_size=distributed.world_size() if world_size is None else world_size)
            else:
                cache["j"] = compute_jacobian(objectives, params, retain_graph=diagnostics, scale=scale,
                                              mode=jacobian_mode, all_reduce_mean=all_reduce_mean)
        return cache["j"]

    return StepContext(
        step=step, objectives=objectives, backward=backward, jacobian=jacobian,
        gradients=lambda objs: compute_jacobian(objs, params, scale=scale, all_reduce_mean=all_reduce_mean),
        aux_objectives=aux_objectives, recompute_objectives=recompute_objectives,
        all_reduce_mean=all_reduce_mean, diagnostics=diagnostics, params=tuple(params),
    )

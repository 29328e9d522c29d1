"""DOT, the Distillation-Oriented Trainer (Zhao, Cui, Song & Liang, ICCV 2023, arXiv:2307.08436): SGD whose
momentum is kept twice, once for the task gradient and once for the distillation gradient, the task's
lighter (β − Δ) and the distillation's heavier (β + Δ), so that the distillation loss dominates the
direction where the two conflict.

Source: the official code, megvii-research/mdistiller@a08d46f. ``mdistiller/engine/trainer.py`` L229-297
(class ``DOT``): L232-233 ``m_task = MOMENTUM - DOT.DELTA``, ``m_kd = MOMENTUM + DOT.DELTA``; L273-279 one step
is ``loss_kd.backward(retain_graph=True); step_kd(); zero_grad(set_to_none=True); loss_ce.backward();
step()``, where ``loss_ce`` = CE_WEIGHT·CE and ``loss_kd`` = KD_WEIGHT·KD (``distillers/KD.py``; CIFAR-100
0.1 / 0.9, ``engine/cfg.py`` L63-64). ``mdistiller/engine/dot.py`` L15-55 (function ``dot``) is the update;
per parameter p with task gradient g_t and distillation gradient g_d of this step (wd = weight decay,
β̄ = (β_t + β_d)/2 = β, dampening 0 as the trainer never sets it):

* task side, every p that g_t reaches (L27-42): d = g_t + wd·p (L29-30, the decay is *here*); the task buffer
  is d at its first step (L33-35), else β_t·b_t + d when the distillation loss reaches p too (L36-37), else
  β̄·b_t + d (L38-39, a task-only parameter, e.g. a classifier that only the CE reads); p ← p − lr·b_t (L42);
* distillation side, every p that g_d reaches (L44-55): the distillation buffer is g_d at its first step
  (L46-48), else β_d·b_d + g_d when the task reaches p too (L49-50, no decay: it came with the task side),
  else β̄·b_d + g_d + wd·p (L51-54, a distillation-only parameter, e.g. a projector); p ← p − lr·b_d (L55).
  As in the code, a distillation-only parameter's *first* step carries no decay (L46-48 clone before L52-53).

A parameter neither loss reaches is left alone (no gradient, no decay), as ``step``/``step_kd`` skip
``p.grad is None`` (L112, L144). Buffers are per parameter and persist when a parameter moves between the
cases (the check is per step: ``check_in``, L36 and L49).

**Where DOT lives, and why here** (issue #25 item 2): DOT needs the two losses' gradients separately, which
kdrun's engine hands only to balancers (``ctx.jacobian()``: per-objective gradients, already averaged across
DDP ranks, kdrun/balancers/gradients.py ``compute_jacobian``); an optimiser sees only the one ``.grad``. So DOT
is a balancer that keeps both momentum buffers and writes ``.grad = b_t + b_d`` (the whole step direction,
weight decay included), and the optimiser is plain SGD, ``p ← p − lr·grad`` (``optimizer=sgd_plain``: the
learning rate, its schedule and per-group ``lr_mult`` stay the optimiser's, as mdistiller's buffers hold no
lr either). The engine's other guarantees then hold unchanged: a non-finite step is skipped before
``after_step``, which alone commits the buffers (the base's rule 1); the buffers are this module's state,
so they are in the checkpoint's ``balancer`` entry; every rank gets the same Jacobian and writes the same
update. The cost of the choice is the constraint on the optimiser, checked at config time
(:meth:`DOT.check_run`): SGD with no momentum, weight decay or Nesterov of its own, and no
``trainer.grad_clip`` (it would clip DOT's momentum direction, not a gradient). Making DOT an optimiser
instead would have needed the engine to pass a second gradient to the optimiser beside ``.grad``, outside
the unscale, finiteness check and clipping that ``.grad`` goes through.

Differences from mdistiller, all at the last bit: a parameter both losses reach moves by −lr·(b_t + b_d) in
one SGD step where mdistiller adds −lr·b_t then −lr·b_d (two roundings); the loss weights multiply the
per-objective gradients (α·∇L) where mdistiller differentiates α·L. tests/balancers/test_dot.py compares
k steps of both on the same model and batches. mdistiller's one-parameter-group assertion (L103, L132) is
not kept: DOT's weight decay applies to every parameter alike (mdistiller's single group decays all of
them), and SGD's groups give each its own lr.

Objectives: exactly ``task`` and ``distill`` (kdrun's default grouping), looked up by name. State: one
buffer per (side, parameter) that has had a step, ``task_momentum_<i>`` / ``distill_momentum_<i>`` with i the
parameter's index in the step's trainable parameters (``StepContext.params``, the model's order, the
same in a resumed run).
"""
from __future__ import annotations

import inspect
import re
from typing import Annotated, Any

import torch
from torch import Tensor

from kdrun.balancers.base import Balancer, BalancerConfigError, StepContext, StepResult
from kdrun.balancers.gradients import FeatureJacobian, Jacobian
from kdrun.config import ConfigError, Ge

SIDES = ("task", "distill")
_BUFFER = re.compile(r"(task|distill)_momentum_(\d+)")
PLAIN_SGD = "kdrun.optim.optimizer.sgd"


def buffer_name(side: str, index: int) -> str:
    return f"{side}_momentum_{index}"


class DOT(Balancer):
    """DOT's two momentum buffers; writes the step direction for a plain SGD (module docstring)."""

    uses_ddp_backward = False  # the per-objective gradients come from the rank-averaged Jacobian
    supports_feature_space = False  # the buffers are per parameter: a representation's gradient will not do
    min_objectives = 2
    max_objectives = 2

    def __init__(
        self,
        momentum: Annotated[float, Ge(0.0)] = 0.9,
        delta: Annotated[float, Ge(0.0)] = 0.075,
        weight_decay: Annotated[float, Ge(0.0)] = 5e-4,
        alpha_task: Annotated[float, Ge(0.0)] = 0.1,
        alpha_distill: Annotated[float, Ge(0.0)] = 0.9,
    ) -> None:
        super().__init__()
        if momentum - delta < 0:  # mdistiller's DistillationOrientedTrainer refuses a negative momentum (L84-85)
            raise BalancerConfigError(f"balancer.delta={delta} exceeds balancer.momentum={momentum}: the task "
                                      "momentum β − Δ would be negative; lower balancer.delta.")
        # Computed as mdistiller does (trainer.py L232-233, dot.py L39/L54), so β̄ is its float, not β's.
        self.momentum_task = momentum - delta
        self.momentum_distill = momentum + delta
        self.momentum_single = (self.momentum_distill + self.momentum_task) / 2.0
        self.weight_decay = float(weight_decay)
        self.alphas = {"task": float(alpha_task), "distill": float(alpha_distill)}
        # (step, {name: new buffer}) from step(), committed by after_step of the same step
        self._staged: tuple[int, dict[str, Tensor]] | None = None

    def on_bind(self) -> None:
        if set(self.objectives) != set(SIDES):
            raise BalancerConfigError(
                f"balancer DOT keeps a task and a distillation momentum, so it needs the objectives 'task' and "
                f"'distill', got {', '.join(self.objectives)}; use the default task.objectives.")

    @classmethod
    def check_run(cls, cfg: Any) -> None:
        """DOT is the whole momentum and weight decay: the optimiser must only apply ``lr × grad``, and the
        task momentum β − Δ must not be negative (checked before a teacher fit or a build)."""
        node, defaults = cfg.balancer, inspect.signature(cls).parameters
        momentum, delta = (float(node.get(k, defaults[k].default)) for k in ("momentum", "delta"))
        if momentum - delta < 0:
            raise ConfigError(f"balancer.delta={delta} exceeds balancer.momentum={momentum}: DOT's task momentum "
                              f"β − Δ would be negative; lower balancer.delta (mdistiller's CIFAR-100 value is "
                              f"0.075 with β = 0.9).")
        opt, trainer = cfg.optimizer, cfg.get("trainer") or {}
        found, fixes = [], []
        if str(opt.get("_target_")) != PLAIN_SGD:
            found.append(f"optimizer._target_={opt.get('_target_')}")
            fixes.append("optimizer=sgd_plain (optimizer.lr=... sets its learning rate)")
        else:
            own = [k for k in ("momentum", "weight_decay", "nesterov") if opt.get(k)]
            found += [f"optimizer.{k}={opt.get(k)}" for k in own]
            if own:
                zero = " ".join(f"optimizer.{k}={'false' if k == 'nesterov' else 0}" for k in own)
                fixes.append(f"{zero} (keeps this run's learning rate) or optimizer=sgd_plain")
        if trainer.get("grad_clip"):
            found.append(f"trainer.grad_clip={trainer.get('grad_clip')}")
            fixes.append("trainer.grad_clip=0")
        if found:
            raise ConfigError(
                "balancer=dot keeps DOT's momentum (task β − Δ, distillation β + Δ) and weight decay itself and "
                "writes the whole step direction into the gradients, so the optimiser must be plain SGD "
                "(p ← p − lr·grad) and the gradients must not be clipped (that would clip DOT's momentum, not a "
                f"gradient); this run has {', '.join(found)}. Set {'; and '.join(fixes)}. DOT's own momentum and "
                "decay are balancer.momentum, balancer.delta and balancer.weight_decay.")

    # -- one step ----------------------------------------------------------------------------------------

    def step(self, ctx: StepContext) -> StepResult:
        jac = ctx.jacobian()
        if isinstance(jac, FeatureJacobian) or not ctx.params:
            raise BalancerConfigError("balancer=dot needs the per-parameter gradients of trainer.grad_space=params "
                                      "(and a step context that lists the parameters).")
        index = {id(p): i for i, p in enumerate(ctx.params)}
        staged: dict[str, Tensor] = {}
        with torch.no_grad():
            for p, g_task, g_distill in self.per_objective(jac):
                i = index[id(p)]
                sides = []
                if g_task is not None:
                    sides.append(self.advance("task", i, p, g_task, shared=g_distill is not None, staged=staged))
                if g_distill is not None:
                    sides.append(self.advance("distill", i, p, g_distill, shared=g_task is not None, staged=staged))
                # task first, as dot.py; a copy, so that nothing done to .grad reaches a staged buffer
                direction = sides[0] + sides[1] if len(sides) == 2 else sides[0].clone()
                if jac.scale != 1.0:  # the engine unscales .grad by the fp16 loss scale: hand it scaled
                    direction = direction * jac.scale
                p.grad = direction.to(p.dtype)
        self._staged = (ctx.step, staged)
        w = torch.tensor([self.alphas[n] for n in self.objectives], device=jac.matrix.device)
        return StepResult(weights=w, raw_weights=w)

    def per_objective(self, jac: Jacobian) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
        """(p, α_task·g_task, α_distill·g_distill) for every parameter a loss reaches, unscaled; ``None``
        where that loss does not reach p."""
        rows = {n: self.objectives.index(n) for n in SIDES}
        scale = jac.scale

        def weighted(g: Tensor, side: str) -> Tensor:
            g = g / scale if scale != 1.0 else g
            return g * self.alphas[side]

        out: list[tuple[Tensor, Tensor | None, Tensor | None]] = []
        offset = 0
        for p in jac.shared:
            n = p.numel()
            g = [jac.matrix[rows[s], offset:offset + n].view_as(p) for s in SIDES]
            out.append((p, weighted(g[0], "task"), weighted(g[1], "distill")))
            offset += n
        for j, p in enumerate(jac.private_params):
            g_t, g_d = (jac.private[rows[s]][j] for s in SIDES)
            out.append((p, None if g_t is None else weighted(g_t, "task"),
                        None if g_d is None else weighted(g_d, "distill")))
        return out

    def advance(self, side: str, i: int, p: Tensor, g: Tensor, *, shared: bool, staged: dict[str, Tensor]) -> Tensor:
        """The new buffer of ``side`` for parameter ``p`` (dot.py L29-39 for the task, L46-54 for the
        distillation side); staged, not stored."""
        name = buffer_name(side, i)
        old = self._buffers.get(name)
        wd = self.weight_decay
        if side == "task" and wd != 0:
            g = g.add(p, alpha=wd)  # L29-30: every parameter the task reaches, first step included
        if old is None:
            new = g.clone()  # L33-35 / L46-48 (the distillation side's first step: no decay)
        else:
            if old.shape != p.shape:
                raise BalancerConfigError(f"balancer=dot: the stored momentum {name} has shape {tuple(old.shape)} "
                                          f"but parameter {i} has {tuple(p.shape)}; the state is another model's.")
            old = old.to(device=p.device, dtype=g.dtype)  # a restored buffer arrives on the CPU
            if shared:
                momentum = self.momentum_task if side == "task" else self.momentum_distill  # L37 / L50
            else:
                momentum = self.momentum_single  # L39 / L54
                if side == "distill" and wd != 0:
                    g = g.add(p, alpha=wd)  # L52-53: decay of a distillation-only parameter
            new = old.mul(momentum).add(g)
        staged[name] = new
        return new

    def after_step(self, ctx: StepContext) -> None:
        """Commit the buffers of this step (only a finite step reaches here)."""
        if self._staged is None or self._staged[0] != ctx.step:
            return
        for name, value in self._staged[1].items():
            self.register_buffer(name, value)
        self._staged = None

    # -- checkpoint --------------------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """The buffers exist once a parameter has had a step, so a fresh balancer (a resumed run) takes the
        stored set as it is: the ones it lacks are created, the ones the state lacks dropped."""
        stored = {k[len(prefix):]: v for k, v in state_dict.items()
                  if k.startswith(prefix) and _BUFFER.fullmatch(k[len(prefix):])}
        for name in [n for n in self._buffers if _BUFFER.fullmatch(n) and n not in stored]:
            del self._buffers[name]
        for name, value in stored.items():
            self.register_buffer(name, torch.empty_like(value))
        self._staged = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

"""One optimiser step of knowledge distillation, as a standalone object (DTO-KD Algorithm 1's body):

    batch → mixup/cutmix → teacher forward → student forward → objectives → balancer (writes .grad)
          → unscale → finite? → optimiser step (+ scheduler, balancer.after_step, the student's EMA)  |  skip

**The teacher sees the student's input.** Mixup/cutmix is applied first and the teacher is called on
the *mixed* batch, so the KL, hard-label and feature targets describe the image the student is shown.
This is DeiT's order: ``engine.py`` applies ``mixup_fn`` before the model and the criterion
(facebookresearch/deit@7e160fe ``engine.py`` L38 ``samples, targets = mixup_fn(samples, targets)``, L47
``outputs = model(samples)``, L49 ``criterion(samples, outputs, targets)``), and ``DistillationLoss``
calls the teacher on those same ``inputs`` (``losses.py`` L48 ``teacher_outputs = self.teacher_model(inputs)``).

**The teacher-output cache** (``teacher.cache``, :mod:`kdrun.teacher_cache`): the train loader then yields
``(x, y, index, view)`` (:class:`kdrun.data.views.ViewDataset`) and the teacher's output is read from the
cache at (index, view) — the CPU tensors of the raw batch, so no host sync — instead of the forward.
Mixup is refused with the cache (the mixed batch is not a cached view), so the order above is unchanged.

**Non-finite steps change nothing.** The balancer's ``step`` must not mutate its state; the one host sync
per step decides whether the gradient norm and the objectives are finite, and only then do the
optimiser, the scheduler, ``balancer.after_step`` and the EMA update (``trainer.ema``,
:mod:`kdrun.engine.ema`) run. (The forward still moves BatchNorm running statistics, as any training
forward does.)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from kdrun.runtime import distributed
from kdrun.balancers.base import Balancer, StepContext, StepResult
from kdrun.balancers.gradients import JacobianMode, diagnostics
from kdrun.engine.context import step_context
from kdrun.engine.ema import StudentEma
from kdrun.engine.environment import autocast
from kdrun.engine.teacher import Teacher
from kdrun.engine.trainable import Trainable, freeze_bn_stats
from kdrun.errors import NonFiniteError
from kdrun.models.taps import ModelOutput
from kdrun.tasks.base import group
from kdrun.teacher_cache import TeacherCache


@dataclass
class Prepared:
    """A batch ready for the student (:meth:`KDStep.prepare`): inputs and targets on the device after
    mixup/cutmix, the data set indices (or None), and the teacher's outputs on those inputs (None without
    a teacher). Read-only for the student side: a group hands the same one to every student."""

    x: Any
    y: Any
    index: Tensor | None
    teacher: ModelOutput | None


@dataclass
class StepOutcome:
    """What one step did: ``finite`` (False: skipped, nothing changed), the number of images it saw on
    this rank, the balancer's result, and the values to log (empty between log steps)."""

    finite: bool
    images: int
    result: StepResult
    values: dict[str, Tensor] = field(default_factory=dict)


def forward_sync(model: nn.Module, balancer: Balancer, feature_space: bool,
                 distributed: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """The context the training forward runs in. Gradient-level balancers average their own Jacobians
    outside DDP's reducer (``uses_ddp_backward = False``), so their forward runs under ``no_sync``;
    loss-level balancers and feature-space Jacobians (whose update is an ordinary backward) keep the
    reducer on."""
    if balancer.uses_ddp_backward or feature_space or not distributed:
        return contextlib.nullcontext
    return model.no_sync  # type: ignore[return-value]


@dataclass
class StepSettings:
    """The ``trainer``/``logger`` settings a step reads (see :class:`kdrun.config.TrainerConfig`)."""

    precision: str = "fp32"
    grad_clip: float = 0.0
    nonfinite: str = "skip"
    max_nonfinite_streak: int = 0  # > 0: that many skipped steps in a row stop the run (NonFiniteError)
    grad_feature: str | None = None  # set: trainer.grad_space=features on this tap
    jacobian: str = "loop"
    channels_last: bool = False
    log_every: int = 1
    grad_stats_every: int = 0


class KDStep:
    """``step(batch, i) -> StepOutcome`` for the i-th (0-based) optimiser step; see the module doc.

    ``model`` is what the forward calls (the :class:`Trainable` itself, or its DDP/compiled wrapper);
    ``trainable`` the bare module whose parameters are updated. ``aux`` draws a raw batch of the
    auxiliary stream (extra-batch balancers); ``skipped`` counts skipped steps. ``cache`` (the teacher-output
    cache) replaces the teacher forward: batches are then ``(x, y, index, view)``. ``ema`` (``trainer.ema``)
    averages in the student after every finite step."""

    def __init__(self, *, model: nn.Module, trainable: Trainable, teacher: Teacher | None, task: Any,
                 groups: dict[str, list[str]], balancer: Balancer, optimizer: torch.optim.Optimizer,
                 scheduler: Any, scaler: torch.amp.GradScaler, device: torch.device,
                 settings: StepSettings, mixup: Callable[[Any, Any], tuple[Any, Any]] | None = None,
                 aux: Callable[[], Any] | None = None, skipped: int = 0,
                 cache: TeacherCache | None = None, ema: StudentEma | None = None) -> None:
        if cache is not None and (teacher is None or mixup is not None):
            raise ValueError("the teacher cache needs a teacher and no mixup (kdrun.teacher_cache.refuse_mixup)")
        self.model, self.trainable, self.teacher, self.task, self.groups = model, trainable, teacher, task, groups
        self.balancer, self.optimizer, self.scheduler, self.scaler = balancer, optimizer, scheduler, scaler
        self.device, self.step_settings, self.mixup, self.aux, self.skipped = device, settings, mixup, aux, skipped
        self.cache, self.ema = cache, ema
        self.params = [p for p in trainable.parameters() if p.requires_grad]
        self.streak = 0  # consecutive skipped steps (from the finiteness flag already on the host)
        self.jac_mode = JacobianMode(settings.jacobian)  # keeps its auto decision across steps
        self.sync = forward_sync(model, balancer, settings.grad_feature is not None, distributed.is_dist())

    def to_device(self, batch: Any) -> tuple[Any, Any, Tensor | None]:
        x, y, idx = self.task.batch_to_device(batch, self.device)
        if self.step_settings.channels_last and isinstance(x, Tensor):
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y, idx

    def __call__(self, batch: Any, step: int) -> StepOutcome:
        return self.learn(self.prepare(batch), step)

    def prepare(self, batch: Any) -> Prepared:
        """The data side of the step: the batch on the device, mixed, and the teacher's outputs on it.
        The loop runs it on the data stream (:mod:`kdrun.engine.streams`); the students of a group
        (:mod:`kdrun.engine.group`) share one."""
        x, y, idx = self.to_device(batch)
        if self.mixup is not None:  # before the teacher: both models see the mixed batch (module doc)
            x, y = self.mixup(x, y)
        return Prepared(x, y, idx, self.teacher_outputs(batch, x))                     # 1. teacher

    def learn(self, batch: Prepared, step: int) -> StepOutcome:
        """The student side of the step on a prepared batch: forward, objectives, balancer, update."""
        x, y, idx, t_out = batch.x, batch.y, batch.index, batch.teacher
        self.trainable.set_progress(step)
        with self.sync(), autocast(self.device, self.step_settings.precision):
            s_out, terms = self.model(x, y, t_out, index=idx)                          # 2. student
        objectives = group(terms, self.groups)                                         # 3. objectives
        restores: list[Callable[[], None]] = []
        ctx = self.context(step, objectives, s_out, restores, (x, y, t_out, idx))
        if ctx.diagnostics:
            ctx.jacobian()  # before the balancer, which then reuses the cached Jacobian
        result = self.balancer.step(ctx)                                               # 4. balancer
        for restore in restores:
            restore()
        finite, grad_norm = self.update(ctx)                                           # 5. optimiser
        values = self.log_values(ctx, terms, result, grad_norm) if (
            ctx.diagnostics or (step + 1) % self.step_settings.log_every == 0) else {}
        return StepOutcome(finite, self.task.batch_size(x), result, values)

    def teacher_outputs(self, batch: Any, x: Any) -> ModelOutput | None:
        """The live teacher on ``x``, or its cached output for the raw batch's (index, view)."""
        if self.cache is not None:
            if len(batch) != 4:
                raise ValueError("with the teacher cache, training batches must be (x, y, index, view) "
                                 "(make_loaders(..., views=True))")
            return self.cache.get(batch[2], batch[3], self.device)
        return self.teacher(x) if self.teacher is not None else None

    # -- the balancer's view of the step -----------------------------------------------------------

    def scale(self) -> float:
        """The fp16 loss scale the balancer multiplies its objectives by (1 without a GradScaler).
        Gradient-level balancers scale their objectives by this float instead of calling
        ``scaler.scale(loss)``; but it is that call that creates the scaler's scale tensor, without which
        ``unscale_`` fails on the first step ("_scale is None"). Scaling a zero creates it (once: later
        calls reuse the tensor)."""
        if not self.scaler.is_enabled():
            return 1.0
        self.scaler.scale(torch.zeros((), device=self.device))
        return self.scaler.get_scale()

    def context(self, step: int, objectives: dict[str, Tensor], s_out: ModelOutput,
                restores: list[Callable[[], None]], batch: tuple[Any, Any, ModelOutput | None, Any]) -> StepContext:
        x, y, t_out, idx = batch
        groups, trainable = self.groups, self.trainable

        def aux_objectives() -> dict[str, Tensor]:
            xa, ya, _ = self.to_device(self.aux())  # type: ignore[misc]
            # The auxiliary forward must not move BatchNorm statistics; they are restored after the
            # balancer step, because its backward still needs the saved tensors.
            restores.append(freeze_bn_stats(trainable))
            with self.sync(), autocast(self.device, self.step_settings.precision):
                _, aterms = trainable(xa, ya, None, with_distill=False)
            # Only objectives whose terms need no teacher (the task) exist on the auxiliary batch.
            return group(aterms, {g: m for g, m in groups.items() if all(n in aterms for n in m)})

        def recompute_objectives() -> dict[str, Tensor]:
            restore = freeze_bn_stats(trainable)
            with torch.no_grad(), autocast(self.device, self.step_settings.precision):
                _, rterms = trainable(x, y, t_out, index=idx)
            restore()
            return {k: v.detach() for k, v in group(rterms, groups).items()}

        every = self.step_settings.grad_stats_every
        return step_context(
            step, objectives, self.params, backward=lambda loss: self.scaler.scale(loss).backward(),
            scale=self.scale(), jacobian_mode=self.jac_mode,
            feature=s_out.features[self.step_settings.grad_feature] if self.step_settings.grad_feature is not None else None,
            aux_objectives=aux_objectives if self.balancer.needs_aux_batch else None,
            recompute_objectives=recompute_objectives if self.balancer.needs_recompute else None,
            diagnostics=every > 0 and step % every == 0)

    # -- optimiser or skip -------------------------------------------------------------------------

    def update(self, ctx: StepContext) -> tuple[bool, Tensor]:
        """Unscale, check finiteness (the one host sync per step), then step or skip; zero the grads."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        # A non-finite objective can still give finite gradients (a NaN constant has zero gradient):
        # both must be finite for the step to count.
        loss_vec = torch.stack([v.detach().float() for v in ctx.objectives.values()])
        finite = bool((torch.isfinite(grad_norm) & torch.isfinite(loss_vec).all()).item())
        if finite:
            if self.step_settings.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.step_settings.grad_clip, grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.balancer.after_step(ctx)
            if self.ema is not None:  # after the optimiser step (timm train.py, DeiT engine.py: kdrun.engine.ema)
                self.ema.update(self.trainable.student)
            self.streak = 0
        else:
            if self.scaler.is_enabled():
                self.scaler.update()  # fp16 overflow: lower the scale, as GradScaler does
            elif self.step_settings.nonfinite == "raise":
                bad = [k for k, v in ctx.objectives.items() if not torch.isfinite(v).all()]
                raise NonFiniteError(f"non-finite gradient at step {ctx.step} (objectives with non-finite "
                                     f"values: {', '.join(bad) or 'none; the gradient overflowed'}); "
                                     "trainer.nonfinite=raise stops the run here (trainer.nonfinite=skip "
                                     "skips such steps).")
            self.skipped += 1
            self.streak += 1
            if 0 < self.step_settings.max_nonfinite_streak <= self.streak:
                raise NonFiniteError(
                    f"the last {self.streak} steps (up to step {ctx.step}) were all non-finite and skipped "
                    f"({self.skipped} skipped in all), so the model stopped learning; the run is stopped "
                    "instead of ending as if it had trained. Lower the learning rate, set trainer.grad_clip, "
                    "or use trainer.precision=bf16/fp32; trainer.max_nonfinite_streak (0: never stop) sets "
                    "how many in a row are tolerated.")
        self.optimizer.zero_grad(set_to_none=True)
        return finite, grad_norm

    def log_values(self, ctx: StepContext, terms: dict[str, Tensor], result: StepResult,
                   grad_norm: Tensor) -> dict[str, Tensor]:
        """Tensors only: the logger syncs them in one transfer on log steps."""
        objectives, names = ctx.objectives, self.balancer.objectives
        values = {f"loss/{k}": v.detach() for k, v in terms.items()}
        values.update({f"objective/{k}": v.detach() for k, v in objectives.items()})
        values.update({f"pi/{n}": result.weights[i].detach() for i, n in enumerate(names)})
        values.update({f"balancer/{k}": v.detach() if isinstance(v, Tensor) else torch.tensor(float(v))
                       for k, v in result.extras.items()})
        if result.raw_weights is not None:
            w = result.raw_weights.detach().to(self.device)
            values["loss/total"] = (w * torch.stack([objectives[n].detach() for n in names])).sum()
        values["grad/update_norm"] = grad_norm.detach()  # after unscale_: the loss scale is already out
        values["lr"] = torch.tensor(self.optimizer.param_groups[0]["lr"])
        values["train/nonfinite_skipped"] = torch.tensor(float(self.skipped))
        if ctx.diagnostics:
            j = ctx.jacobian()
            values.update(diagnostics(j.gram(), j.names, result.raw_weights, j.scale))
        return values

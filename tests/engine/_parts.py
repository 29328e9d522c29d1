"""A tiny KD setup around the real :class:`kdrun.engine.step.KDStep`: conv student and teacher on 8×8
images, the real Classification task, KL plus a projected-feature term (its projector is a private
parameter of the distill objective; the classifier is private to the task), CPU, fp32. The step is put
together by the engine's own functions (loaders, term bind/setup, the step from the parts), so what a test
checks is what a run does."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from kdrun.balancers.base import Balancer
from kdrun.runtime.checkpoint import TrainState
from kdrun.config import TrainerConfig
from kdrun.data.base import DataModule
from kdrun.data.loaders import make_loaders
from kdrun.engine.build import Parts, build_trainable
from kdrun.engine.run import make_step as engine_make_step
from kdrun.engine.step import KDStep, StepSettings
from kdrun.engine.teacher import Teacher
from kdrun.losses.base import DistillLoss
from kdrun.losses.kl import KL
from kdrun.models.taps import ModelOutput, Tapped
from kdrun.tasks.classification import Classification

CLASSES = 4
CPU = torch.device("cpu")


class TinyNet(nn.Module):
    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(h)


class ProjectedL2(DistillLoss):
    """MSE between a linear projection of the student's pre-logits and the teacher's pre-logits."""

    student_taps = ("pre_logits",)
    teacher_taps = ("pre_logits",)

    def setup(self, student: dict[str, torch.Size], teacher: dict[str, torch.Size]) -> None:
        torch.manual_seed(7)
        self.proj = nn.Linear(student["pre_logits"][0], teacher["pre_logits"][0])

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:
        return F.mse_loss(self.proj(s.features["pre_logits"]), t.features["pre_logits"])


class NaNAtStep(DistillLoss):
    """Zero loss that is NaN during the given optimiser steps (by ``progress_step``, so extra forwards
    such as the amortised DTO's recompute do not shift it)."""

    def __init__(self, at: list[int]) -> None:
        super().__init__()
        self.at = set(at)

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:
        value = (s.logits * 0).sum() / len(s.logits)
        return value + torch.nan if self.progress_step in self.at else value


def batches(n: int, size: int = 8, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, CLASSES, (size,), generator=g))
            for _ in range(n)]


def tiny_data(mixup: Callable[[Any, Any], Any] | None = None) -> DataModule:
    """The first batch of :func:`batches` as the training set (one step per epoch): what the terms are
    bound to and probed with (:func:`kdrun.engine.build.setup_terms`)."""
    x, y = batches(1)[0]
    train = TensorDataset(x, y)
    return DataModule(train=train, val=train, num_classes=CLASSES, in_chans=3, image_size=8, mixup=mixup)


def trainer_for(s: StepSettings) -> tuple[TrainerConfig, Any]:
    """The ``trainer`` and ``logger`` settings from which the engine derives the step settings ``s``
    (:func:`kdrun.engine.run.make_step`); one batch of 8 per epoch, no loader workers."""
    t = TrainerConfig(epochs=1, batch_size=8, num_workers=0, accelerator="cpu", grad_clip=s.grad_clip,
                      max_nonfinite_streak=s.max_nonfinite_streak, channels_last=s.channels_last,
                      grad_space="features" if s.grad_feature is not None else "params",
                      grad_feature=s.grad_feature or TrainerConfig.grad_feature,
                      # StepSettings types these as str; the step accepts exactly TrainerConfig's choices
                      precision=s.precision, nonfinite=s.nonfinite, jacobian=s.jacobian)  # type: ignore[arg-type]
    cfg = OmegaConf.create({"logger": {"log_every": s.log_every, "grad_stats_every": s.grad_stats_every}})
    return t, cfg


def make_step(balancer: Balancer, *, extra: dict[str, DistillLoss] | None = None, lr: float = 0.1,
              momentum: float = 0.9, mixup: Callable[[Any, Any], Any] | None = None,
              settings: StepSettings | None = None) -> KDStep:
    """The engine's step (:func:`kdrun.engine.run.make_step`) over the tiny parts: the terms bound to the
    data and the teacher and set up from a probe batch by the engine's own builder, ``settings`` reached
    through the ``trainer``/``logger`` settings a run would have, SGD(lr, momentum) with a 1/(1+s) schedule."""
    settings = settings or StepSettings()
    t, cfg = trainer_for(settings)
    task = Classification()
    distill: dict[str, DistillLoss] = {"kl": KL(temperature=4.0), "feat": ProjectedL2(), **(extra or {})}
    teacher = Teacher(Tapped(TinyNet(6, seed=1), ["pre_logits"]), CPU, "fp32")
    student = Tapped(TinyNet(5, seed=2), ["pre_logits"])
    data = tiny_data(mixup)
    groups = task.objective_groups(distill)
    balancer.bind(tuple(groups))
    loaders = make_loaders(data, t, 0, CPU, aux=balancer.needs_aux_batch, task=task)
    steps_per_epoch = len(loaders.train)
    trainable = build_trainable(distill, {}, data, task, student, teacher, steps_per_epoch, CPU)
    opt = torch.optim.SGD(trainable.parameters(), lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    parts = Parts(trainer=t, device=CPU, seed=0, data=data, task=task, teacher=teacher, student=student,
                  trainable=trainable, model=trainable, groups=groups, balancer=balancer, loaders=loaders,
                  optimizer=opt, scheduler=sched, scaler=torch.amp.GradScaler("cpu", enabled=False),
                  steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * t.epochs)
    step = engine_make_step(parts, cfg, TrainState())  # type: ignore[arg-type]
    assert step.step_settings == settings, (step.step_settings, settings)  # the engine read the settings asked for
    return step


def trained_state(step: KDStep) -> dict[str, Tensor]:
    """Parameters (not BatchNorm statistics: any training forward moves them), optimiser and balancer
    state, scheduler position, flattened into one comparable dict."""
    out = {f"param/{k}": v.detach().clone() for k, v in step.trainable.named_parameters()}
    for i, s in step.optimizer.state_dict()["state"].items():
        out.update({f"optim/{i}/{k}": v.clone() for k, v in s.items() if isinstance(v, Tensor)})
    out.update({f"balancer/{k}": v.clone() for k, v in step.balancer.state_dict().items()})
    out["sched/last_epoch"] = torch.tensor(step.scheduler.last_epoch)
    out["lr"] = torch.tensor(step.optimizer.param_groups[0]["lr"])
    return out


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

"""A tiny KD setup around the real :class:`kdrun.engine.step.KDStep`: conv student and teacher on 8×8
images, the real Classification task, KL plus a projected-feature term (its projector is a private
parameter of the distill objective; the classifier is private to the task), CPU, fp32."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.balancers.base import Balancer
from kdrun.engine.step import KDStep, StepSettings
from kdrun.engine.teacher import Teacher
from kdrun.engine.trainable import Trainable
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


def make_step(balancer: Balancer, *, extra: dict[str, DistillLoss] | None = None, lr: float = 0.1,
              momentum: float = 0.9, mixup: Callable[[Any, Any], Any] | None = None,
              settings: StepSettings | None = None, aux: Callable[[], Any] | None = None) -> KDStep:
    task = Classification()
    distill: dict[str, DistillLoss] = {"kl": KL(temperature=4.0), "feat": ProjectedL2(), **(extra or {})}
    teacher = Teacher(Tapped(TinyNet(6, seed=1), ["pre_logits"]), CPU, "fp32")
    student = Tapped(TinyNet(5, seed=2), ["pre_logits"])
    x0 = batches(1)[0][0]
    with torch.no_grad():
        s0, t0 = student(x0), teacher(x0)
    shape = lambda o: {"logits": o.logits.shape[1:], **{k: v.shape[1:] for k, v in o.features.items()}}  # noqa: E731
    for d in distill.values():
        d.setup(shape(s0), shape(t0))
    trainable = Trainable(student, distill, {}, task)
    groups = task.objective_groups(distill)
    balancer.bind(tuple(groups))
    opt = torch.optim.SGD(trainable.parameters(), lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return KDStep(model=trainable, trainable=trainable, teacher=teacher, task=task, groups=groups,
                  balancer=balancer, optimizer=opt, scheduler=sched,
                  scaler=torch.amp.GradScaler("cpu", enabled=False), device=CPU,
                  settings=settings or StepSettings(), mixup=mixup, aux=aux)


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

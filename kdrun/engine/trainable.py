"""What DDP wraps and the optimiser updates: the student plus every trainable module of the loss terms
(projectors, regressors, CRD's embeddings). The frozen teacher is never part of it."""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from kdrun.losses.base import DistillLoss
from kdrun.models.taps import ModelOutput, Tapped


class Trainable(nn.Module):
    """Student (+ distillation modules). ``forward`` returns the student output and the named terms."""

    def __init__(self, student: Tapped, distill: dict[str, DistillLoss], weights: dict[str, float],
                 task: Any) -> None:
        super().__init__()
        self.student = student
        self.distill = nn.ModuleDict(distill)
        self.weights = dict(weights)
        self.task = task

    def set_progress(self, step: int) -> None:
        """Tell every term the 0-based optimiser step about to be taken (DKD/ReviewKD warm-up)."""
        for loss in self.distill.values():
            loss.set_progress(step)

    def forward(self, x: Any, target: Any, teacher: ModelOutput | None,
                with_distill: bool = True, index: Tensor | None = None) -> tuple[ModelOutput, dict[str, Tensor]]:
        s = self.student(x)
        terms = self.task.losses(s, target)
        if with_distill and teacher is not None:
            for name, loss in self.distill.items():
                w = self.weights.get(name, 1.0)
                # CRD-style terms need each sample's position in the training set (its memory slot).
                kw = {"index": index} if loss.needs_index else {}
                value = loss(s, teacher, target, **kw).float()
                terms[name] = value * w if w != 1.0 else value
        return s, terms


def freeze_bn_stats(module: nn.Module) -> Callable[[], None]:
    """Snapshot BatchNorm running statistics; the returned function restores them. Used around the
    extra forwards (recomputed or auxiliary losses, the shape probe) so that they leave the model as
    it was."""
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             and m.running_mean is not None]

    def restore() -> None:
        for m, mean, var, n in saved:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)

    return restore

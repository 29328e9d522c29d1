"""The distillation-loss interface.

A loss term is an ``nn.Module`` (it may own parameters: a FitNet regressor, a projector, CRD's
memory) that reads what it needs from the student's and the teacher's
:class:`~kdrun.models.taps.ModelOutput`:

* ``student_taps`` / ``teacher_taps`` name the features it reads (``"logits"``, ``"pre_logits"``,
  ``"stage2"``, …); the engine asks the models for exactly these.
* :meth:`setup` is called once, before training, with the per-sample shapes of those taps (from a
  probe forward on one batch), so that modules whose size depends on the models (projectors,
  regressors) are built before the optimiser and DDP see the parameters.
* :meth:`forward` returns a scalar: the *mean over the batch* (so that losses are batch-size
  invariant and DDP's gradient averaging is exact).

* :meth:`bind` is called once, before :meth:`setup`, with what the run knows about its training data
  (:class:`DataInfo`: size, optimiser steps per epoch, the training labels when the data set knows them),
  so that terms with per-sample state (CRD's memory, its class-aware negatives) or epoch-based
  schedules (DKD/ReviewKD warm-up) need no undeclared attributes.
* :meth:`set_progress` is called before every training forward with the 0-based index of the optimiser
  step about to be taken; step-scheduled terms read ``self.progress_step``.
* ``needs_index = True`` asks the engine to pass ``index=`` (each sample's position in the training set)
  to :meth:`forward`.

In a config a term may carry ``weight`` (default 1); the engine multiplies the term by it before the
terms are summed into objectives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from kdrun.models.taps import ModelOutput


def tap(out: ModelOutput, name: str) -> Tensor:
    """``out.logits`` for ``"logits"``, else the named feature (with a clear error if absent)."""
    if name == "logits":
        return out.logits
    try:
        return out.features[name]
    except KeyError:
        raise KeyError(f"feature '{name}' was not tapped; available: "
                       f"{', '.join(['logits', *out.features])}") from None


@dataclass(frozen=True)
class DataInfo:
    """What the run knows about its training data, given to every term once (:meth:`DistillLoss.bind`).

    Attributes:
        num_data: training-set size (every rank: the whole set, not its shard).
        steps_per_epoch: optimiser steps per epoch as the loader really yields them (``drop_last``).
        labels: the training labels as a long tensor ``[num_data]`` (index-aligned with the ``index``
            passed to :meth:`DistillLoss.forward`), or ``None`` when the data set cannot say cheaply.
    """

    num_data: int
    steps_per_epoch: int
    labels: Tensor | None = None


class DistillLoss(nn.Module):
    """Base class for distillation terms; see the module docstring."""

    student_taps: tuple[str, ...] = ("logits",)
    teacher_taps: tuple[str, ...] = ("logits",)
    needs_index: ClassVar[bool] = False  # forward(..., index=) gets each sample's training-set index
    progress_step: int = 0  # 0-based index of the optimiser step being taken (set_progress)

    def bind(self, info: DataInfo) -> None:
        """Called once by the engine before :meth:`setup`. Default: nothing to remember."""

    def bind_teacher(self, teacher: nn.Module) -> None:
        """Called once by the engine, after :meth:`bind` and before :meth:`setup`, with the frozen teacher
        network (no taps, no wrapper), for terms whose constants come from the teacher's parameters (OFD's
        margin from its BatchNorms, as mdistiller's ``get_margin_from_BN``). Default: nothing."""

    def set_progress(self, step: int) -> None:
        """Called by the engine before every training forward with the 0-based optimiser step."""
        self.progress_step = int(step)

    def setup(self, student: dict[str, torch.Size], teacher: dict[str, torch.Size]) -> None:
        """Build shape-dependent submodules. ``student``/``teacher`` map tap name → shape without
        the batch dimension. Default: nothing to build."""

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

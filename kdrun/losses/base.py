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

In a config a term may carry ``weight`` (default 1); the engine multiplies the term by it before the
terms are summed into objectives.
"""
from __future__ import annotations

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


class DistillLoss(nn.Module):
    """Base class for distillation terms; see the module docstring."""

    student_taps: tuple[str, ...] = ("logits",)
    teacher_taps: tuple[str, ...] = ("logits",)

    def setup(self, student: dict[str, torch.Size], teacher: dict[str, torch.Size]) -> None:
        """Build shape-dependent submodules. ``student``/``teacher`` map tap name → shape without
        the batch dimension. Default: nothing to build."""

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

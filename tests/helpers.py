"""Test-only loss terms (importable as Hydra ``_target_``s)."""
from __future__ import annotations

import torch
from torch import Tensor

from kdrun.losses.base import DistillLoss
from kdrun.models.taps import ModelOutput


class NaNAt(DistillLoss):
    """Zero loss that turns NaN at the given forward calls (0-based), to exercise the non-finite skip."""

    def __init__(self, at: list[int]) -> None:
        super().__init__()
        self.at = set(at)
        self.calls = 0

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:
        bad = self.calls in self.at
        self.calls += 1
        value = (s.logits * 0).sum() / len(s.logits)
        return value + torch.nan if bad else value

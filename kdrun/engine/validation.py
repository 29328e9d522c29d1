"""Validation: the task's metrics for a model on the val split (every sample once, reduced across ranks)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from kdrun.engine.environment import autocast


def evaluate(model: nn.Module, loader: DataLoader, task: Any, device: torch.device,
             precision: str = "fp32", channels_last: bool = False,
             results_path: Path | None = None) -> dict[str, float]:
    """The task's val metrics for ``model``. Tasks that save their predictions (detection: the COCO
    results json that ``kdrun tide`` reads) write them to ``results_path`` (``Task.results_path``)."""
    task.results_path = results_path
    return task.evaluate(model, loader, device, lambda: autocast(device, precision),
                         channels_last=channels_last)

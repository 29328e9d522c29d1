"""The task interface: what the engine asks of a task (classification, detection).

A task owns everything that depends on what is being predicted:

* ``batch_to_device(batch, device)`` → ``(inputs, targets, index)``: ``inputs`` is what the models are
  called with (an image tensor, or for detection whatever the detector's ``forward`` takes, e.g. a
  padded image tensor plus mask); ``targets`` whatever ``losses`` and the loss terms need; ``index`` the
  samples' positions in the training set when the loader yields them (CRD), else ``None``.
* ``batch_size(inputs)`` → number of images (for images/s and sampler offsets).
* ``losses(student_output, targets)`` → the task's named loss terms (``{"ce": …}`` or
  ``{"class": …, "bbox": …, "giou": …}``), each a scalar mean over the batch.
* ``task_terms``: the names ``losses`` returns; ``objective_groups(distill_terms)`` groups terms into
  the balancer's objectives (default: ``distill`` = every distillation term, ``task`` = the task terms).
* ``evaluate(model, loader, device, autocast_ctx, channels_last=False) -> dict[str, float]``: metrics on
  the val split, every sample exactly once, reduced across ranks (``channels_last``: convert the image
  tensors to channels-last memory format, as ``trainer.channels_last`` trains); ``primary_metric`` names
  the one that decides ``best.pt`` (higher is better) and ``metric_keys`` the ones logged as ``val/<key>``.
* ``collate_fn``: the loaders' collate function, or ``None`` for torch's default (a data set's own
  ``DataModule.collate_fn`` takes precedence).
* ``results_path``: where ``evaluate`` saves the predictions it makes, or ``None`` (save nothing); the
  engine sets it before every evaluation (detection writes the COCO results json ``kdrun tide`` reads;
  classification saves nothing).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from kdrun.config import ConfigError


class Task(Protocol):
    task_terms: tuple[str, ...]
    primary_metric: str
    metric_keys: tuple[str, ...]
    collate_fn: Callable[..., Any] | None
    results_path: str | os.PathLike | None

    def batch_to_device(self, batch: Any, device: torch.device) -> tuple[Any, Any, Tensor | None]: ...

    def batch_size(self, inputs: Any) -> int: ...

    def losses(self, s: Any, targets: Any) -> dict[str, Tensor]: ...

    def objective_groups(self, distill_terms: Any) -> dict[str, list[str]]: ...

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device, autocast_ctx: Any,
                 channels_last: bool = False) -> dict[str, float]: ...


def objective_groups(task_terms: tuple[str, ...], spec: dict[str, list[str]] | None,
                     distill_terms: list[str]) -> dict[str, list[str]]:
    """Default grouping or a validated explicit one (every term used exactly once)."""
    if spec is None:
        groups = {"distill": list(distill_terms)} if distill_terms else {}
        groups["task"] = list(task_terms)
        return groups
    terms = list(distill_terms) + list(task_terms)
    used = [t for ts in spec.values() for t in ts]
    unknown = sorted(set(used) - set(terms))
    missing = sorted(set(terms) - set(used))
    twice = sorted({t for t in used if used.count(t) > 1})
    if unknown or missing or twice:
        raise ConfigError(
            "task.objectives must use every loss term exactly once; terms are "
            f"{', '.join(terms)}" + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            + (f"; unused: {', '.join(missing)}" if missing else "")
            + (f"; used twice: {', '.join(twice)}" if twice else "") + "."
        )
    return {k: list(v) for k, v in spec.items()}


def group(terms: dict[str, Tensor], groups: dict[str, list[str]]) -> dict[str, Tensor]:
    """Sum the terms of each objective."""
    return {name: sum(terms[t] for t in members) for name, members in groups.items()}  # type: ignore[misc]

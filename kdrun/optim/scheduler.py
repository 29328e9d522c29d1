"""Learning-rate schedules, stepped once per optimiser step (so warm-up is smooth).

Configs are partials: the engine calls ``factory(optimizer, steps_per_epoch=…, epochs=…)``; epoch
boundaries in the configs (milestones, warm-up) are converted to steps. All are ``LambdaLR`` over the
optimiser's base learning rates, so their state (``last_epoch``) is a plain int in the checkpoint.

* ``multistep``: CIFAR-100 KD protocol (×``gamma`` at epochs 150/180/210 of 240), optional linear warm-up.
* ``cosine``: DeiT protocol — linear warm-up from ``warmup_lr_ratio``·lr over ``warmup_epochs``, then
  half-cosine to ``min_lr_ratio``·lr at the last step.
* ``constant``.
"""
from __future__ import annotations

import math
from typing import Annotated, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from kdrun.config import Ge, Le


def _warm(step: int, warmup: int, start: float) -> float:
    return start + (1.0 - start) * step / warmup if step < warmup else 1.0


def multistep(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int,
              milestones: Sequence[int] = (150, 180, 210), gamma: Annotated[float, Ge(0.0)] = 0.1,
              warmup_epochs: Annotated[float, Ge(0.0)] = 0.0,
              warmup_lr_ratio: Annotated[float, Ge(0.0), Le(1.0)] = 0.0) -> LambdaLR:
    bounds = sorted(int(m * steps_per_epoch) for m in milestones)
    warm = int(warmup_epochs * steps_per_epoch)

    def f(step: int) -> float:
        return _warm(step, warm, warmup_lr_ratio) * gamma ** sum(step >= b for b in bounds)

    return LambdaLR(optimizer, f)


def cosine(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int,
           warmup_epochs: Annotated[float, Ge(0.0)] = 5.0,
           warmup_lr_ratio: Annotated[float, Ge(0.0), Le(1.0)] = 1e-3,
           min_lr_ratio: Annotated[float, Ge(0.0), Le(1.0)] = 1e-2) -> LambdaLR:
    total = max(1, steps_per_epoch * epochs)
    warm = min(int(warmup_epochs * steps_per_epoch), total - 1)

    def f(step: int) -> float:
        if step < warm:
            return _warm(step, warm, warmup_lr_ratio)
        t = (step - warm) / max(1, total - warm - 1)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return LambdaLR(optimizer, f)


def constant(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: 1.0)

"""The training engine, one concept per module:

* :mod:`~kdrun.engine.run` — ``train(cfg, run_dir)``: validate → build → restore → loop → results;
* :mod:`~kdrun.engine.build` — :class:`~kdrun.engine.build.Parts` and one builder per part;
* :mod:`~kdrun.engine.teacher` — the frozen teacher call; fitting a missing teacher before the run;
* :mod:`~kdrun.engine.step` — :class:`~kdrun.engine.step.KDStep`, one optimiser step
  (mixup → teacher → student → objectives → balancer → optimiser or skip);
* :mod:`~kdrun.engine.context` — the balancer's StepContext, built in one place;
* :mod:`~kdrun.engine.loop` — epochs, stop rules, validation, saves;
* :mod:`~kdrun.engine.trainable` — what DDP wraps (student + loss modules);
* :mod:`~kdrun.engine.validation` — the task's val metrics;
* :mod:`~kdrun.engine.environment` — device, seeds, backend flags, autocast.

Loaders are :mod:`kdrun.data.loaders`; checkpoints (keys, rotation, restore) :mod:`kdrun.runtime.checkpoint`.
The names below are what other modules import from ``kdrun.engine``.
"""
from __future__ import annotations

from kdrun.data.loaders import close_loaders, make_loaders
from kdrun.engine.context import step_context
from kdrun.engine.run import train
from kdrun.engine.environment import autocast, pick_device, sync_batchnorm
from kdrun.engine.step import KDStep, StepOutcome, StepSettings
from kdrun.engine.teacher import Teacher
from kdrun.engine.trainable import Trainable
from kdrun.engine.validation import evaluate

TASK_API = 1  # tasks are used only through kdrun.tasks.base.Task

__all__ = ["KDStep", "StepOutcome", "StepSettings", "TASK_API", "Teacher", "Trainable", "autocast", "close_loaders",
           "evaluate", "make_loaders", "pick_device", "step_context", "sync_batchnorm", "train"]

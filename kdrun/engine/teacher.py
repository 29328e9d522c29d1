"""The frozen teacher: its call during training, and fitting a missing one before the run is built.

The teacher is called on the batch the student sees, *after* mixup/cutmix (see :mod:`kdrun.engine.step`),
in eval mode under ``torch.inference_mode`` and its own precision (``trainer.teacher_precision``). Its
outputs are cloned out of inference mode so that loss terms may save them for backward.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun import checkpoint as ckpt
from kdrun import distributed as D
from kdrun.engine.runtime import autocast
from kdrun.models.taps import ModelOutput, Tapped, freeze


class Teacher:
    """``teacher(x) -> ModelOutput``: one frozen, gradient-free forward of the tapped teacher."""

    def __init__(self, model: Tapped, device: torch.device, precision: str) -> None:
        self.model = freeze(model)
        self.device, self.precision = device, precision

    def __call__(self, x: Any) -> ModelOutput:
        with torch.inference_mode(), autocast(self.device, self.precision):
            out = self.model(x)
        return ModelOutput(out.logits.clone(), {k: v.clone() for k, v in out.features.items()})


def teacher_checkpoint(cfg: DictConfig) -> Path | None:
    p = cfg.teacher.get("checkpoint")
    return Path(os.path.expanduser(str(p))) if p else None


def needs_fit(cfg: DictConfig) -> Path | None:
    """The checkpoint path to fit when ``teacher.checkpoint`` is missing and ``fit_if_missing_epochs``
    asks for a fit, else ``None``."""
    if cfg.get("teacher") is None:
        return None
    path = teacher_checkpoint(cfg)
    if path is None or path.is_file() or int(cfg.teacher.get("fit_if_missing_epochs", 0)) <= 0:
        return None
    return path


def fit_config(cfg: DictConfig) -> DictConfig:
    """The teacher fit as a run of its own: the teacher's model as the student, plain supervision (no
    teacher, no distillation, ``fixed`` balancer), ``fit_if_missing_epochs`` epochs, never resumed."""
    sub = copy.deepcopy(cfg)
    OmegaConf.set_struct(sub, False)
    sub.student = {"model": cfg.teacher.model, "checkpoint": None}
    sub.teacher = None
    sub.distill = {}
    sub.balancer = {"_target_": "kdrun.balancers.fixed.Fixed"}
    sub.task.objectives = None
    sub.trainer.epochs = int(cfg.teacher.fit_if_missing_epochs)
    sub.trainer.resume = None
    sub.trainer.max_steps = -1
    return sub


def fit_teacher(cfg: DictConfig, path: Path, train: Callable[[DictConfig, Path], dict[str, Any]]) -> dict[str, Any]:
    """Run the fit (``train`` = :func:`kdrun.engine.run.train`, a complete run of its own that finishes
    before the distillation run builds anything) and save the weights to ``path``, so that this and
    every later run finds them. Returns the fit's results (a preempted fit saves no teacher; the next
    run fits it again)."""
    sub = fit_config(cfg)
    run_dir = path.with_suffix("").with_name(path.stem + "_fit")
    if D.is_main():
        print(f"[kdrun] no teacher checkpoint at {path}: training the teacher for "
              f"{sub.trainer.epochs} epochs (run dir {run_dir})", flush=True)
    results = train(sub, run_dir)
    if results.get("preempted"):
        return results
    if D.is_main():
        last = ckpt.load(run_dir / "last.pt")
        ckpt.save_atomic({"student": last["student"], "config": last["config"],
                          "val_metrics": results["final"]}, path)
    D.barrier()
    return results

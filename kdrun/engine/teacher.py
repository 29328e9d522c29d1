"""The frozen teacher: its call during training, and fitting a missing one before the run is built.

The teacher is called on the batch the student sees, *after* mixup/cutmix (see :mod:`kdrun.engine.step`),
in eval mode under ``torch.inference_mode`` and its own precision (``trainer.teacher_precision``). Its
outputs leave inference mode as ordinary tensors, so that loss terms may save them for backward: the
logits are cloned out, and every feature tap is copied once, when it is taken (:class:`Tapped`).
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
from kdrun.config import ConfigError
from kdrun.engine.runtime import autocast
from kdrun.logger import console_phase
from kdrun.models.taps import ModelOutput, Tapped, freeze


class Teacher:
    """``teacher(x) -> ModelOutput``: one frozen, gradient-free forward of the tapped teacher."""

    def __init__(self, model: Tapped, device: torch.device, precision: str) -> None:
        self.model = freeze(model)
        self.device, self.precision = device, precision

    def __call__(self, x: Any) -> ModelOutput:
        with torch.inference_mode(), autocast(self.device, self.precision):
            out = self.model(x)
        # Only inference tensors are cloned out: hooked taps are already ordinary copies (Tapped._keep).
        return ModelOutput(_out_of_inference(out.logits),
                           {k: _out_of_inference(v) for k, v in out.features.items()})


def _out_of_inference(t: Any) -> Any:
    return t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t


def teacher_checkpoint(cfg: DictConfig) -> Path | None:
    p = cfg.teacher.get("checkpoint")
    return Path(os.path.expanduser(str(p))) if p else None


def cache_dir() -> Path:
    """Where kdrun keeps what it makes for later runs: ``$KDRUN_CACHE``, default ``~/.cache/kdrun`` (the
    default of the teacher configs' and recipes' ``checkpoint``: conf/teacher/convnet_l.yaml,
    scripts/gen_recipes.py ``TEACHER_CKPT``)."""
    return Path(os.path.expanduser(os.environ.get("KDRUN_CACHE") or "~/.cache/kdrun"))


def teacher_cache() -> Path:
    """The only place a missing teacher is fitted into (:func:`needs_fit`)."""
    return cache_dir() / "teachers"


def in_teacher_cache(path: Path) -> bool:
    cache = teacher_cache()
    return any(Path(f(path)).is_relative_to(Path(f(cache))) for f in (os.path.abspath, os.path.realpath))


def needs_fit(cfg: DictConfig) -> Path | None:
    """The checkpoint path to fit when ``teacher.checkpoint`` is missing and ``fit_if_missing_epochs``
    asks for a fit, else ``None``.

    A fit only ever writes into the teacher cache (``$KDRUN_CACHE/teachers/``), where the recipes put
    their teachers: a missing checkpoint elsewhere is a typo or a file not copied yet, and fitting a
    teacher there would silently train a new one at a made-up path (once: a directory at the file-system
    root). That is an error naming the path and the cache."""
    if cfg.get("teacher") is None:
        return None
    path = teacher_checkpoint(cfg)
    if path is None or path.is_file() or int(cfg.teacher.get("fit_if_missing_epochs", 0)) <= 0:
        return None
    if not in_teacher_cache(path):
        raise ConfigError(
            f"teacher.checkpoint={path} does not exist. teacher.fit_if_missing_epochs="
            f"{cfg.teacher.fit_if_missing_epochs} fits a missing teacher only in the teacher cache "
            f"{teacher_cache()}/ (where the recipes' teacher.checkpoint points by default, e.g. "
            f"{teacher_cache() / path.name}; $KDRUN_CACHE moves it), never at another path. Fix the path, copy "
            "the checkpoint there, or leave teacher.checkpoint at the recipe's default.")
    return path


def has_weights(cfg: DictConfig) -> bool:
    """Whether the teacher gets trained weights: ``teacher.checkpoint``, a timm model with ``pretrained:
    true`` or a ``checkpoint_path``, or a ViDT with the original release's ``weights``. (ViDT's
    ``backbone_weights`` alone is an ImageNet body under a random detector: not a teacher.) A fit writes
    the checkpoint first, so this is asked after it."""
    node = cfg.teacher
    model = node.get("model") or {}
    return any(bool(v) for v in (node.get("checkpoint"), model.get("pretrained"), model.get("checkpoint_path"),
                                 model.get("weights")))


def check_teacher_weights(cfg: DictConfig) -> None:
    """Refuse a teacher with random weights unless ``teacher.allow_random=true``: distilling from a random
    network runs to the end and produces numbers that look like a result."""
    if cfg.get("teacher") is None or has_weights(cfg) or bool(cfg.teacher.get("allow_random", False)):
        return
    raise ConfigError(
        "The teacher has random weights: teacher.checkpoint is null, no fit was asked for "
        "(teacher.fit_if_missing_epochs=0) and the model is not pretrained, so distillation would learn from "
        "noise. Set teacher.checkpoint=PATH (a trained teacher), teacher.fit_if_missing_epochs=N with a "
        f"checkpoint path under {teacher_cache()}/ (fits it there first), or teacher.allow_random=true if a "
        "random teacher is what you want (tests, speed measurements).")


def fit_config(cfg: DictConfig, resume: bool = False) -> DictConfig:
    """The teacher fit as a run of its own: the teacher's model as the student, plain supervision (no
    teacher, no distillation, ``fixed`` balancer), ``fit_if_missing_epochs`` epochs. ``resume``: continue
    the fit's own ``last.pt`` (a fit stopped by a signal); otherwise the fit directory is started over
    (it is kdrun's cache, holding nothing of the user's: a fit that died before its first checkpoint)."""
    sub = copy.deepcopy(cfg)
    OmegaConf.set_struct(sub, False)
    sub.student = {"model": cfg.teacher.model, "checkpoint": None}
    sub.teacher = None
    sub.distill = {}
    sub.balancer = {"_target_": "kdrun.balancers.fixed.Fixed"}
    sub.task.objectives = None
    sub.trainer.epochs = int(cfg.teacher.fit_if_missing_epochs)
    sub.trainer.resume = "auto" if resume else None
    sub.trainer.overwrite = not resume
    sub.trainer.max_steps = -1
    return sub


def fit_dir(path: Path) -> Path:
    """The fit's run directory, beside the checkpoint it makes: ``<cache>/teachers/<name>_fit/``."""
    return path.with_suffix("").with_name(path.stem + "_fit")


def fit_teacher(cfg: DictConfig, path: Path, train: Callable[[DictConfig, Path], dict[str, Any]]) -> dict[str, Any]:
    """Run the fit (``train`` = :func:`kdrun.engine.run.train`, a complete run of its own that finishes
    before the distillation run builds anything) and save the weights to ``path``, so that this and
    every later run finds them. Returns the fit's results (a preempted fit saves no teacher; the next
    run with the same teacher continues the fit from its ``last.pt``)."""
    run_dir = fit_dir(path)
    # Rank 0 looks (a shared file system may show the file to other nodes later).
    resume = bool(D.broadcast_object((run_dir / "last.pt").is_file() if D.is_main() else None))
    sub = fit_config(cfg, resume)
    if D.is_main():
        print(f"[kdrun] no teacher checkpoint at {path}: " + ("continuing the stopped teacher fit" if resume else
              "training the teacher") + f" for {sub.trainer.epochs} epochs (run dir {run_dir}); re-running the "
              "same command after an interruption continues it", flush=True)
    with console_phase("teacher fit"):  # every console line of the fit says it is the teacher's
        results = train(sub, run_dir)
    if results.get("preempted"):
        return results
    if D.is_main():
        last = ckpt.load(run_dir / "last.pt")
        ckpt.save_atomic({"student": last["student"], "config": last["config"],
                          "val_metrics": results["final"]}, path)
        print(f"[kdrun] teacher fit done: saved {path}; distillation starts", flush=True)
    D.barrier()
    return results

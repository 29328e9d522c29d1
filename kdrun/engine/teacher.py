"""The frozen teacher: its call during training, and fitting a missing one before the run is built.

The teacher is called on the batch the student sees, *after* mixup/cutmix (see :mod:`kdrun.engine.step`),
in eval mode under ``torch.inference_mode`` and its own precision (``trainer.teacher_precision``). Its
outputs leave inference mode as ordinary tensors, so that loss terms may save them for backward: the
logits are cloned out, and every feature tap is copied once, when it is taken (:class:`Tapped`).

A missing teacher (``teacher.fit_if_missing_epochs``) is fitted in the teacher cache as a run of its own
(:func:`fit_teacher`), once however many runs miss it at the same time: one claims the fit
(:class:`FitClaim`), the others wait for its teacher (:func:`wait_for_fit`).
"""
from __future__ import annotations

import copy
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun.runtime import checkpoint as ckpt
from kdrun.runtime import distributed
from kdrun.runtime.rundir import create_exclusive, describe, heartbeat, holder_dead, move_aside, read_holder
from kdrun.config import ConfigError
from kdrun.engine.environment import autocast
from kdrun.runtime.logger import console_phase
from kdrun.models.build import (CheckpointError, CheckpointPermissionError, CheckpointUnreadable, damage,
                                not_a_file_message)
from kdrun.models.taps import ModelOutput, Tapped, freeze
from kdrun.teacher_cache import unusable_dir


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


def _out_of_inference(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


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
    if path.exists():  # a directory given as the checkpoint: it exists, so "does not exist" would mislead
        raise CheckpointError(f"teacher.checkpoint: {not_a_file_message(path)}")
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
    # The fit yields raw weights (the teacher file is its student): no EMA, which would also make the fit's
    # own resume depend on the trainer.ema of whichever run resumes it (kdrun.runtime.checkpoint).
    sub.trainer.ema = None
    return sub


def fit_dir(path: Path) -> Path:
    """The fit's run directory, beside the checkpoint it makes: ``<cache>/teachers/<name>_fit/``."""
    return path.with_suffix("").with_name(path.stem + "_fit")


def cache_env() -> str:
    """How the user set the cache, for messages: ``KDRUN_CACHE=VALUE`` or that it is unset (the default)."""
    env = os.environ.get("KDRUN_CACHE")
    return f"KDRUN_CACHE={env}" if env else "KDRUN_CACHE is unset, so the default ~/.cache/kdrun"


def check_fit_place(path: Path) -> None:
    """The teacher fit writes ``path`` and its run directory under ``$KDRUN_CACHE/teachers/``: a cache that
    is a file or not writable is an error naming ``KDRUN_CACHE`` (the fit's own run-directory check would
    advise another ``hydra.run.dir``, which is not what places the fit)."""
    why = unusable_dir(fit_dir(path))
    if why is not None:
        raise ConfigError(
            f"The missing teacher {path} cannot be fitted: its place in the teacher cache cannot be written "
            f"({why}). Fits go to $KDRUN_CACHE/teachers/ and {cache_env()}: point KDRUN_CACHE at a writable "
            "directory (it is created if missing), e.g. export KDRUN_CACHE=$HOME/.cache/kdrun, and run again.")


def teacher_load_error(cfg: DictConfig, e: CheckpointError) -> CheckpointError:
    """The error of a ``teacher.checkpoint`` that cannot be loaded, saying ``teacher.checkpoint``; for a
    damaged teacher in the teacher cache (a fit's output, kdrun's own file) the way on is to delete it so
    that it is made again, not to look for "another checkpoint of the same run"."""
    path = teacher_checkpoint(cfg)
    if isinstance(e, CheckpointPermissionError) or path is None or not in_teacher_cache(path):
        return CheckpointError(f"teacher.checkpoint: {e}")
    fit = fit_dir(path)
    epochs = int(cfg.teacher.get("fit_if_missing_epochs", 0))
    anew = (f"teacher.fit_if_missing_epochs={epochs} then fits it anew" if epochs > 0 else
            "then copy a good teacher there, or set teacher.fit_if_missing_epochs=N to fit it in the cache")
    if isinstance(e, CheckpointUnreadable):
        what, delete = damage(path, e.why), str(path)
        if epochs > 0 and (fit / "last.pt").is_file():  # the fit that made it: its weights are saved again
            anew = (f"the teacher is then saved again from its fit's last checkpoint {fit / 'last.pt'} (if that "
                    f"is damaged too, delete {fit} as well: the teacher is then fitted anew)")
    else:  # another architecture under this name: the fit directory beside it is of that one too
        what, delete = str(e), str(path) + (f" and its fit directory {fit}" if fit.exists() else "")
    return CheckpointError(f"teacher.checkpoint: {what} It is the cached teacher in {teacher_cache()}/ "
                           f"({cache_env()}): delete {delete} and run again; {anew}.")


# -- one fit per teacher: concurrent runs wait for it ------------------------------------------------------
#
# Runs that start together and miss the same teacher (two quickstarts, a sweep's jobs) must not both fit
# it: the fit directory has one writer (its run lock), so the second used to fail. As the teacher-output
# cache's fill does (kdrun.teacher_cache "Concurrent runs"), the first run claims the fit atomically
# (``<teacher>.fitting``, kdrun.runtime.rundir.create_exclusive) and touches it while fitting; the others wait until the
# teacher is saved. A claim whose holder died is taken over and the fit continues from its last.pt:
# same host and the pid is gone, or no heartbeat for FIT_STALE_AFTER_S: the fit directory's own run-lock
# rule (kdrun.runtime.rundir.RunLock), with a margin, so that the takeover also gets that lock.

FIT_CLAIM_SUFFIX = ".fitting"
FIT_HEARTBEAT_S = 10.0
# RunLock's stale_after_s (300 s) plus its heartbeat period (30 s): the claim's last beat can precede the
# fit-directory lock's by up to that period, and the takeover must find that lock stale too.
FIT_STALE_AFTER_S = 330.0


class FitClaim:
    """``<teacher path>.fitting``: which process is fitting this teacher, with a heartbeat while it does."""

    def __init__(self, teacher_path: Path, heartbeat_s: float = FIT_HEARTBEAT_S,
                 stale_after_s: float = FIT_STALE_AFTER_S) -> None:
        self.teacher = Path(teacher_path)
        self.path = self.teacher.with_name(self.teacher.name + FIT_CLAIM_SUFFIX)
        self.heartbeat_s, self.stale_after_s = float(heartbeat_s), float(stale_after_s)
        self.token = uuid.uuid4().hex
        self.note: str | None = None  # set when a dead holder's claim was taken over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._thread is not None

    def _create(self) -> bool:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time(), "token": self.token}
        if not create_exclusive(self.path, record):
            return False
        self._thread = threading.Thread(target=self._beat, name="kdrun-fit-claim", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        heartbeat(self.path, self._stop, self.heartbeat_s)

    def holder(self) -> dict[str, Any] | None:
        """The claim's holder (with the heartbeat's ``mtime``), or None when nobody holds it."""
        return read_holder(self.path)

    def dead(self, holder: dict[str, Any]) -> str | None:
        """Why the holder is dead, or None if it may be alive (the rule of kdrun.runtime.rundir.RunLock)."""
        return holder_dead(holder, self.stale_after_s)

    def take(self) -> dict[str, Any] | None:
        """Claim the fit: None when this process holds it now, else the live holder. A dead holder's
        claim is moved aside under a unique name (of two processes taking it over, one rename wins)."""
        for _ in range(3):
            if self._create():
                return None
            holder = self.holder()
            if holder is None:
                continue  # released meanwhile
            why = self.dead(holder)
            if why is None:
                return holder
            if not move_aside(self.path, self.token):
                continue
            self.note = f"took over the teacher fit of {describe(holder)}: {why}"
        return self.holder() or {}

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        holder = self.holder()
        if holder is not None and holder.get("token") == self.token:  # never remove another's claim
            self.path.unlink(missing_ok=True)


def wait_for_fit(claim: FitClaim, poll_s: float = 2.0, say: Callable[[str], None] | None = None
                 ) -> Literal["done", "released", "dead"]:
    """Wait while another process fits the teacher: ``done`` (the teacher is saved), ``released`` (the
    fit ended without a teacher: it failed or was stopped; claim it and continue it) or ``dead`` (its
    holder died: take the claim over)."""
    said = False
    while True:
        if claim.teacher.is_file():
            return "done"
        holder = claim.holder()
        if holder is None:
            return "done" if claim.teacher.is_file() else "released"
        if claim.dead(holder) is not None:
            return "dead"
        if not said and say is not None:
            say(f"[kdrun] another process ({describe(holder)}) is fitting the teacher {claim.teacher}; "
                f"waiting for it to finish (its console: {fit_dir(claim.teacher) / 'cli.log'})")
            said = True
        time.sleep(poll_s)


def fit_teacher(cfg: DictConfig, path: Path, train: Callable[[DictConfig, Path], dict[str, Any]],
                poll_s: float = 2.0) -> dict[str, Any]:
    """Fit the missing teacher at ``path`` once, however many runs miss it at the same time: this process
    claims the fit (:class:`FitClaim`) and runs it (:func:`run_fit`), or waits for the process that holds
    the claim and then uses its teacher. Returns the fit's results (``{}`` when another process fitted
    it; a preempted fit saves no teacher, and the next run with the same teacher continues it)."""
    check_fit_place(path)
    say = (lambda m: print(m, flush=True)) if distributed.is_main() else None
    while True:
        # Rank 0 claims and tells the others; a live holder elsewhere makes every rank wait on the file
        # system (no collective runs for as long as the other fit takes, as for the teacher-output cache).
        claim = FitClaim(path) if distributed.is_main() else None
        state = None
        if claim is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            state = "done" if path.is_file() else ("busy" if claim.take() is not None else "claimed")
            if state == "claimed" and path.is_file():  # saved by another process between the two looks
                claim.release()
                state = "done"
        state = distributed.broadcast_object(state)
        if state == "claimed":
            try:
                if claim is not None and claim.note and say is not None:
                    say(f"[kdrun] {claim.note}; continuing it")
                return run_fit(cfg, path, train)
            finally:
                if claim is not None:
                    claim.release()
        if state == "busy":
            outcome = wait_for_fit(FitClaim(path), poll_s, say)
            state = distributed.broadcast_object(outcome if distributed.is_main() else None)
        if state == "done":
            if say is not None:
                say(f"[kdrun] the teacher {path} was fitted by another process; distillation starts")
            distributed.barrier()
            return {}
        # released or dead: the other fit ended without a teacher; this process claims it on the next pass


def run_fit(cfg: DictConfig, path: Path, train: Callable[[DictConfig, Path], dict[str, Any]]) -> dict[str, Any]:
    """Run the fit (``train`` = :func:`kdrun.engine.run.train`, a complete run of its own that finishes
    before the distillation run builds anything) and save the weights to ``path``, so that this and
    every later run finds them."""
    run_dir = fit_dir(path)
    # Rank 0 looks (a shared file system may show the file to other nodes later).
    resume = bool(distributed.broadcast_object((run_dir / "last.pt").is_file() if distributed.is_main() else None))
    sub = fit_config(cfg, resume)
    if distributed.is_main():
        print(f"[kdrun] no teacher checkpoint at {path}: " + ("continuing the stopped teacher fit" if resume else
              "training the teacher") + f" for {sub.trainer.epochs} epochs (run dir {run_dir}); re-running the "
              "same command after an interruption continues it", flush=True)
    try:
        with console_phase("teacher fit"):  # every console line of the fit says it is the teacher's
            results = train(sub, run_dir)
    except CheckpointUnreadable as e:
        if not Path(e.path).is_relative_to(run_dir):
            raise
        # the fit's own resume advice (trainer.resume=...) is not the user's to follow: the fit is kdrun's
        raise CheckpointError(
            f"{damage(Path(e.path), e.why)} It is the stopped teacher fit's checkpoint, in kdrun's teacher cache "
            f"({cache_env()}): delete the fit directory {run_dir} and run again to fit the teacher anew."
        ) from None
    if results.get("preempted"):
        return results
    if distributed.is_main():
        last = ckpt.load(run_dir / "last.pt")
        # a fit found finished (its teacher file was deleted) reports no "final": its last val is stored
        final = results.get("final") or dict(last.get("metrics") or {})
        ckpt.save_atomic({"student": last["student"], "config": last["config"], "val_metrics": final}, path)
        print(f"[kdrun] teacher fit done: saved {path}; distillation starts", flush=True)
    distributed.barrier()
    return results

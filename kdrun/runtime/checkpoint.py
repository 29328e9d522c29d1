"""Checkpoints: the full training state, written atomically, read with ``weights_only=True``.

A checkpoint is a plain dict of tensors, numbers, strings and lists (no pickled objects, so
``torch.load(weights_only=True)`` reads it and a checkpoint cannot execute code):

``format``, ``student`` (the bare student's state_dict, loadable into the plain model),
``trainable`` (student + projectors + loss modules), ``optimizer``, ``scheduler``, ``balancer``,
``scaler``, ``epoch`` (epochs completed), ``step`` (optimiser steps taken), ``epoch_step`` (steps
taken in the current epoch, for mid-epoch resume), ``best_top1``, ``rng`` (torch CPU/CUDA, Python,
NumPy), ``config`` (the resolved config as a YAML string), ``metrics``; with ``trainer.ema``, ``ema``
(``{"student": the averaged bare student's state_dict, "updates": n}``, :mod:`kdrun.engine.ema`).

Writing goes to ``<name>.tmp.<pid>`` in the same directory, is flushed and fsynced, then renamed over
the target (``os.replace`` is atomic on POSIX), so a crash leaves either the old or the new file,
never a truncated one.

**Rotation.** :func:`keep_previous` keeps the checkpoint being replaced as ``<name>.prev`` (a hard
link, so it costs no copy), so a ``last.pt`` damaged after it was written (a full disk, a bad copy)
leaves the previous good one beside it; :func:`load_resume` names it when a checkpoint cannot be read.

:class:`Checkpointer` is the one place that knows the key list: :meth:`Checkpointer.save` writes it and
:meth:`Checkpointer.restore` reads the same keys back (the counters are the fields of :class:`TrainState`).
"""
from __future__ import annotations

import errno
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from kdrun.runtime import distributed
from kdrun.models.build import (CheckpointError, CheckpointPermissionError, CheckpointUnreadable, check_fits,
                               damage, first_line, load_file)

FORMAT = "kdrun/1"


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a kdrun checkpoint; errors name the file and never touch other checkpoints."""
    state = load_file(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a kdrun training checkpoint (format {FORMAT}): give a last.pt or "
                              "best.pt that `kdrun train` wrote (or its run directory).")
    return state


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    """``null`` → start fresh; ``auto`` → ``run_dir/last.pt`` if it exists; else that path."""
    if not resume:
        return None
    if resume == "auto":
        p = run_dir / "last.pt"
        return p if p.is_file() else None
    p = Path(resume).expanduser()
    if p.is_dir():  # "does not exist" would be wrong advice: the path is there, it is not a file
        last = p / "last.pt"
        raise CheckpointError(
            f"trainer.resume={resume} is a directory; trainer.resume takes a checkpoint file"
            + (f": trainer.resume={last}, or continue that run in its own directory with hydra.run.dir={p} "
               "trainer.resume=auto." if last.is_file() else
               f", and {p} holds no last.pt (a run that stopped before its first checkpoint, or "
               "trainer.save_last=false): give the path of a last.pt, or start a fresh run."))
    if not p.is_file():
        raise CheckpointError(f"trainer.resume={resume}: no such checkpoint file"
                              + (" (it is not a regular file)." if p.exists() else "."))
    return p


# ---------------------------------------------------------------------------------------------------
# Rotation.


def previous_path(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def keep_previous(path: Path) -> None:
    """Keep the current ``path`` (if any) as ``path.prev`` before it is replaced.

    A hard link under a temporary name renamed over ``.prev``: ``path`` itself is never missing and
    ``.prev`` is always a complete file (the rename is atomic). Falls back to a copy on file systems
    without hard links.
    """
    if not path.is_file():
        return
    prev = previous_path(path)
    tmp = prev.with_name(f"{prev.name}.tmp.{os.getpid()}")
    try:
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copy2(path, tmp)
        os.replace(tmp, prev)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_resume(path: Path, trainable: nn.Module) -> dict[str, Any]:
    """Read a training checkpoint for ``trainable``; errors name the file and what to do instead.

    A checkpoint that cannot be read (truncated, corrupted) points at the previous good one, which
    rotation kept untouched (``last.pt.prev``, ``best.pt``); a checkpoint of another model names the
    mismatched keys (:func:`kdrun.models.build.check_fits`) instead of torch's bare RuntimeError."""
    path = Path(path)
    try:
        s = load(path)
    except CheckpointPermissionError:
        raise  # the file may be fine: no older checkpoint to suggest
    except CheckpointError as e:
        good = [p for p in (previous_path(path), path.with_name("best.pt")) if p.is_file() and p != path]
        hint = (" The previous good checkpoint is untouched: resume from it with "
                + " or ".join(f"trainer.resume={p}" for p in good) + ".") if good else (
            " No other checkpoint of that run is beside it: resume from a good copy of it, or start a fresh "
            "run (trainer.resume=null; trainer.overwrite=true to start over in that run directory)."
            if isinstance(e, CheckpointUnreadable) else "")
        # the resume advice replaces load_file's generic "use another checkpoint of the same run"
        if isinstance(e, CheckpointUnreadable):  # still one: a caller may know better ways on (a teacher fit)
            raise CheckpointUnreadable(f"{damage(path, e.why)}{hint}", path, e.why) from None
        raise CheckpointError(f"{e}{hint}") from None
    if not isinstance(s.get("trainable"), dict):
        raise CheckpointError(f"{path} holds no training state (no 'trainable'); resume needs a last.pt "
                              "or best.pt written by `kdrun train`.")
    check_fits(trainable, s["trainable"], path)
    return s


# The parts whose class a resume must keep: their state (balancer logits and optimiser moments, an
# optimiser's parameter groups) means nothing to another class, and a run that changes its method midway
# is not the run its results.json describes. (Hyperparameters of the same class may change on resume.)
SAME_CLASS_ON_RESUME = ("balancer", "optimizer")


def _targets(node: Any) -> list[str]:
    """Every ``_target_`` of a config node, depth first (a wrapper balancer names its inner one too)."""
    if isinstance(node, dict):
        own = [str(node["_target_"])] if "_target_" in node else []
        return own + [t for k, v in node.items() if k != "_target_" for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def _config_targets(config_yaml: str, key: str) -> list[str] | None:
    """The ``_target_``s of ``key`` in a stored config (YAML); None when it cannot be read (an old or
    hand-made checkpoint: then nothing is compared and load_state_dict has the last word)."""
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.to_container(OmegaConf.create(config_yaml), resolve=False).get(key)  # type: ignore[union-attr]
    except Exception:
        return None
    return _targets(node) if node is not None else None


def check_same_method(path: Path, stored_config: Any, config_yaml: str) -> None:
    """Refuse to resume a checkpoint whose balancer or optimiser class differs from this run's, naming both
    (torch's ``load_state_dict`` would fail with missing keys, or silently load a stateless one). The
    student's weights alone can start a fresh run: ``student.checkpoint`` reads a kdrun checkpoint."""
    if not isinstance(stored_config, str):
        return
    for key in SAME_CLASS_ON_RESUME:
        theirs, ours = _config_targets(stored_config, key), _config_targets(config_yaml, key)
        if theirs is None or ours is None or theirs == ours:
            continue
        raise CheckpointError(
            f"trainer.resume: checkpoint {path} was written with {key} {' > '.join(theirs)}, but this run asks "
            f"for {key} {' > '.join(ours)}. A resumed run continues the same method: resume with the "
            f"checkpoint's {key} (see {stored_config_place(path)}), or start a fresh run from its student's "
            f"weights only with trainer.resume=null student.checkpoint={path} in a new run directory (the "
            "balancer, optimiser, schedule and projectors then start anew).")


def stored_config_place(path: Path) -> str:
    """Where a user reads the config a checkpoint was written with."""
    beside = path.parent / "config.yaml"
    return str(beside) if beside.is_file() else "the 'config' entry stored in the checkpoint"


def disk_full_error(path: Path, state: TrainState, e: OSError) -> CheckpointError:
    """The one-paragraph error of a save that ran out of space. The write went to a temporary file that
    :func:`save_atomic` removed, so the checkpoint at ``path`` (if any) is the previous good one."""
    run_dir = path.parent
    last = run_dir / "last.pt"
    if last.is_file():
        resume = (f"The previous good checkpoint {last} is intact (the failed write never replaced it); free "
                  f"space, then continue from it with trainer.resume=auto and the same "
                  f"hydra.run.dir={run_dir} (the steps after it are run again).")
    else:
        resume = (f"No checkpoint of this run was written before, so there is nothing to resume: free space "
                  f"and start the run again (trainer.overwrite=true in hydra.run.dir={run_dir}).")
    return CheckpointError(f"The disk is full ({e.strerror or e}): saving {path.name} after step {state.step} "
                           f"(epoch {state.epoch}) failed and that state is lost. {resume}")


# ---------------------------------------------------------------------------------------------------
# The training state and the one object that saves and restores it.


@dataclass
class TrainState:
    """The run's counters; every field is a checkpoint key of the same name."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    epoch_step: int = 0  # steps taken in the current epoch (mid-epoch resume)
    best_metric: float = -math.inf  # the task's primary metric (top-1, AP)
    skipped: int = 0  # non-finite steps skipped
    aux_batches: int = 0  # auxiliary batches drawn (cross-batch), so a resumed run draws the next ones
    wall_time_s: float = 0.0  # wall time of the run so far, summed over its sessions (resumes)
    teacher_metrics: dict[str, float] = field(default_factory=dict)  # teacher's val metrics, measured once
    history: list[dict[str, float]] = field(default_factory=list)


# What a checkpoint holds besides the TrainState fields: the ``state_dict`` of each of these parts.
STATEFUL = ("trainable", "optimizer", "scheduler", "balancer", "scaler")


class Checkpointer:
    """Saves and restores the full training state of one run (see the module docstring for the keys).

    ``parts`` maps each name of :data:`STATEFUL` to an object with ``state_dict``/``load_state_dict``;
    ``student`` is the bare student model (saved alone under ``student``, loadable into the plain
    model by ``kdrun eval``/``export`` and by a teacher fit). ``ema``: the student's EMA
    (:class:`kdrun.engine.ema.StudentEma`, ``trainer.ema``) or None. ``save`` is collective: every rank calls
    it at the same points, because each rank's RNG state goes into the checkpoint."""

    def __init__(self, run_dir: Path, parts: dict[str, Any], student: nn.Module, config_yaml: str,
                 ema: Any = None) -> None:
        if set(parts) != set(STATEFUL):
            raise ValueError(f"Checkpointer needs exactly the parts {STATEFUL}, got {tuple(parts)}")
        self.run_dir, self.parts, self.student, self.config_yaml = Path(run_dir), parts, student, config_yaml
        self.ema = ema
        self._wall_before, self._session_start = 0.0, time.perf_counter()

    def wall_time(self) -> float:
        """Seconds of the whole run: the earlier sessions' (from the restored checkpoint) plus this one's
        since the parts were built. Saved into every checkpoint, so a resumed run's results.json covers
        the run, not only its last session."""
        return self._wall_before + time.perf_counter() - self._session_start

    def save(self, name: str, state: TrainState, metrics: dict[str, float] | None = None) -> None:
        """Write ``name`` (collective: every rank calls it); a full disk is a :class:`CheckpointError`
        naming the checkpoint that is still good and how to continue (:func:`disk_full_error`)."""
        rngs = distributed.all_gather_object(rng_state())
        state.wall_time_s = self.wall_time()
        if not distributed.is_main():
            return
        path = self.run_dir / name
        if name == "last.pt":
            keep_previous(path)  # last.pt.prev: the previous good checkpoint
        try:
            self._write(path, state, metrics, rngs)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise disk_full_error(path, state, e) from None

    def _write(self, path: Path, state: TrainState, metrics: dict[str, float] | None, rngs: list[Any]) -> None:
        save_atomic({
            "format": FORMAT,
            "student": self.student.state_dict(),
            **{k: part.state_dict() for k, part in self.parts.items()},
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            **asdict(state),
            "world_size": distributed.world_size(), "rng": rngs[0], "rng_ranks": rngs,
            "config": self.config_yaml,
            "metrics": dict(metrics or {}),
        }, path)

    def restore(self, resume: str | None, reseed: Callable[[int], None]) -> TrainState | None:
        """Load ``trainer.resume`` into the parts and return its :class:`TrainState` (``None``: fresh).

        Rank 0 decides which file (a shared file system may show a fresh file to some nodes later than
        to others); every rank then reads the same file, after a barrier, onto the CPU. Every rank
        looks, so that a missing ``trainer.resume=PATH`` fails on all of them alike. Each rank continues
        its own random stream; a checkpoint from another world size calls ``reseed(step)`` instead."""
        path = distributed.broadcast_object(find_resume(self.run_dir, resume))
        distributed.barrier()
        if path is None:
            return None
        s = load_resume(path, self.parts["trainable"])
        check_same_method(path, s.get("config"), self.config_yaml)
        for k, part in self.parts.items():
            try:
                part.load_state_dict(s[k])
            except (KeyError, RuntimeError, ValueError) as e:  # a checkpoint that check_same_method let by
                raise CheckpointError(
                    f"trainer.resume: the {k} state in checkpoint {path} does not fit this run's "
                    f"{type(part).__name__} ({first_line(e)}): that run configured its {k} differently. Resume "
                    f"with that run's settings (see {stored_config_place(path)}), or start a fresh run from the "
                    f"student's weights only with trainer.resume=null student.checkpoint={path} in a new run "
                    "directory.") from None
        self._restore_ema(path, s)
        keys = TrainState.__dataclass_fields__
        state = TrainState(**{k: s[k] for k in keys if k in s})  # older files lack skipped/aux_batches/wall
        self._wall_before, self._session_start = float(state.wall_time_s), time.perf_counter()
        state.history, state.teacher_metrics = list(state.history), dict(state.teacher_metrics or {})
        rngs = s.get("rng_ranks") or [s["rng"]]
        if len(rngs) == distributed.world_size():
            set_rng_state(rngs[distributed.rank()])
        else:
            reseed(state.step)
            if distributed.is_main():
                print(f"[kdrun] warning: {path} was written by {len(rngs)} process(es), this run has "
                      f"{distributed.world_size()}: random streams are re-seeded and the rest of epoch {state.epoch + 1} "
                      "is sharded differently, so the run is not bit-identical to an uninterrupted one.",
                      file=sys.stderr, flush=True)
        if distributed.is_main():
            print(f"[kdrun] resumed from {path} at epoch {state.epoch}, step {state.step}"
                  + (f" (step {state.epoch_step} of the epoch)" if state.epoch_step else ""), flush=True)
        return state

    def _restore_ema(self, path: Path, s: dict[str, Any]) -> None:
        """The EMA continues from the checkpoint's. One started now would average only the steps after the
        resume while the run's results call it the run's EMA, so a checkpoint without one is refused; a
        checkpoint's EMA that this run does not keep (``trainer.ema=null``) is left behind, with a warning."""
        theirs = s.get("ema")
        if self.ema is None:
            if theirs is not None and distributed.is_main():
                print(f"[kdrun] warning: {path} holds the student's EMA weights, but this run has trainer.ema=null: "
                      "the EMA is not continued and this run's checkpoints will not hold it (resume with the "
                      "run's trainer.ema to keep it).", file=sys.stderr, flush=True)
            return
        if not isinstance(theirs, dict) or not isinstance(theirs.get("student"), dict):
            raise CheckpointError(
                f"trainer.resume: checkpoint {path} holds no EMA weights (that run had trainer.ema=null), but this "
                "run asks for trainer.ema: an EMA started now would average only the steps after the resume. "
                "Resume with trainer.ema=null, or start a fresh run with the EMA from the student's weights "
                f"with trainer.resume=null student.checkpoint={path} in a new run directory.")
        check_fits(self.ema.module.model, theirs["student"], path)
        self.ema.load_state_dict(theirs)

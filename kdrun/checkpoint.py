"""Checkpoints: the full training state, written atomically, read with ``weights_only=True``.

A checkpoint is a plain dict of tensors, numbers, strings and lists (no pickled objects, so
``torch.load(weights_only=True)`` reads it and a checkpoint cannot execute code):

``format``, ``student`` (the bare student's state_dict, loadable into the plain model),
``trainable`` (student + projectors + loss modules), ``optimizer``, ``scheduler``, ``balancer``,
``scaler``, ``epoch`` (epochs completed), ``step`` (optimiser steps taken), ``epoch_step`` (steps
taken in the current epoch, for mid-epoch resume), ``best_top1``, ``rng`` (torch CPU/CUDA, Python,
NumPy), ``config`` (the resolved config as a YAML string), ``metrics``.

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

from kdrun import distributed as D
from kdrun.models.build import CheckpointError, CheckpointPermissionError, check_fits, load_file

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
        raise CheckpointError(f"{path} is not a kdrun training checkpoint (format {FORMAT}).")
    return state


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    """``null`` → start fresh; ``auto`` → ``run_dir/last.pt`` if it exists; else that path."""
    if not resume:
        return None
    if resume == "auto":
        p = run_dir / "last.pt"
        return p if p.is_file() else None
    p = Path(resume).expanduser()
    if not p.is_file():
        raise CheckpointError(f"trainer.resume={resume}: no such checkpoint file.")
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
                + " or ".join(f"trainer.resume={p}" for p in good) + ".") if good else ""
        raise CheckpointError(f"{e}{hint}") from None
    if not isinstance(s.get("trainable"), dict):
        raise CheckpointError(f"{path} holds no training state (no 'trainable'); resume needs a last.pt "
                              "or best.pt written by `kdrun train`.")
    check_fits(trainable, s["trainable"], path)
    return s


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
    model by ``kdrun eval``/``export`` and by a teacher fit). ``save`` is collective: every rank calls
    it at the same points, because each rank's RNG state goes into the checkpoint."""

    def __init__(self, run_dir: Path, parts: dict[str, Any], student: nn.Module, config_yaml: str) -> None:
        if set(parts) != set(STATEFUL):
            raise ValueError(f"Checkpointer needs exactly the parts {STATEFUL}, got {tuple(parts)}")
        self.run_dir, self.parts, self.student, self.config_yaml = Path(run_dir), parts, student, config_yaml
        self._wall_before, self._session_start = 0.0, time.perf_counter()

    def wall_time(self) -> float:
        """Seconds of the whole run: the earlier sessions' (from the restored checkpoint) plus this one's
        since the parts were built. Saved into every checkpoint, so a resumed run's results.json covers
        the run, not only its last session."""
        return self._wall_before + time.perf_counter() - self._session_start

    def save(self, name: str, state: TrainState, metrics: dict[str, float] | None = None) -> None:
        """Write ``name`` (collective: every rank calls it); a full disk is a :class:`CheckpointError`
        naming the checkpoint that is still good and how to continue (:func:`disk_full_error`)."""
        rngs = D.all_gather_object(rng_state())
        state.wall_time_s = self.wall_time()
        if not D.is_main():
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
            **asdict(state),
            "world_size": D.world_size(), "rng": rngs[0], "rng_ranks": rngs,
            "config": self.config_yaml,
            "metrics": dict(metrics or {}),
        }, path)

    def restore(self, resume: str | None, reseed: Callable[[int], None]) -> TrainState | None:
        """Load ``trainer.resume`` into the parts and return its :class:`TrainState` (``None``: fresh).

        Rank 0 decides which file (a shared file system may show a fresh file to some nodes later than
        to others); every rank then reads the same file, after a barrier, onto the CPU. Every rank
        looks, so that a missing ``trainer.resume=PATH`` fails on all of them alike. Each rank continues
        its own random stream; a checkpoint from another world size calls ``reseed(step)`` instead."""
        path = D.broadcast_object(find_resume(self.run_dir, resume))
        D.barrier()
        if path is None:
            return None
        s = load_resume(path, self.parts["trainable"])
        for k, part in self.parts.items():
            part.load_state_dict(s[k])
        keys = TrainState.__dataclass_fields__
        state = TrainState(**{k: s[k] for k in keys if k in s})  # older files lack skipped/aux_batches/wall
        self._wall_before, self._session_start = float(state.wall_time_s), time.perf_counter()
        state.history, state.teacher_metrics = list(state.history), dict(state.teacher_metrics or {})
        rngs = s.get("rng_ranks") or [s["rng"]]
        if len(rngs) == D.world_size():
            set_rng_state(rngs[D.rank()])
        else:
            reseed(state.step)
            if D.is_main():
                print(f"[kdrun] warning: {path} was written by {len(rngs)} process(es), this run has "
                      f"{D.world_size()}: random streams are re-seeded and the rest of epoch {state.epoch + 1} "
                      "is sharded differently, so the run is not bit-identical to an uninterrupted one.",
                      file=sys.stderr, flush=True)
        if D.is_main():
            print(f"[kdrun] resumed from {path} at epoch {state.epoch}, step {state.step}"
                  + (f" (step {state.epoch_step} of the epoch)" if state.epoch_step else ""), flush=True)
        return state

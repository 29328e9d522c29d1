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
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdrun.models.build import CheckpointError, load_file

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

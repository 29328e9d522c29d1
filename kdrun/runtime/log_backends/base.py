"""What a logging backend is: the three calls :class:`kdrun.runtime.logger.RunLogger` makes, and what a
backend is opened with.

A backend is opened once per session of a run, on the main rank, after the run directory was accepted
(:func:`kdrun.runtime.log_backends.open_backends`). It is given every value RunLogger logs (the values
``metrics.jsonl`` holds: losses, π, gradient diagnostics, lr, val and teacher metrics) with the step, the
resolved config once, and closed when the session ends (finished, or stopped by a signal: a resumed run
opens it again and continues the same tracker run through its id in ``trackers.json``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol

from kdrun.config import ConfigError

# {backend name: its own run id} of the backends that continue a run across sessions (W&B, MLflow).
IDS_FILE = "trackers.json"


class BackendStartError(ConfigError):
    """A backend could not start its run (no W&B login, an MLflow store that refuses); the message names the
    backend, its own words and the ways on."""


@dataclass(frozen=True)
class BackendRun:
    """What a backend is opened with."""

    run_dir: Path
    name: str  # the run directory's name: 0_fixed_seed0 in a sweep, the start time of a single run
    group: Optional[str]  # logger.group: a sweep job's sweep directory (W&B group, MLflow tag kdrun.sweep)
    resumed_at: Optional[int]  # the checkpoint's step of a resumed session, None for a fresh run
    resume_id: Optional[str]  # this backend's run id from trackers.json, when the session resumes one


class Backend(Protocol):
    """One destination of the run's scalars."""

    name: str  # its name in logger.backends
    # Whether the backend hides what an earlier session logged after the checkpoint (TensorBoard's
    # purge_step). W&B and MLflow cannot: RunLogger does not send them the steps they already hold.
    rewinds: bool
    # The id that continues this backend's run when the run is resumed (None: nothing to keep).
    run_id: Optional[str]

    def log_params(self, config: Mapping[str, Any]) -> None:
        """The resolved config of the run (once per session)."""

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """The values logged at ``step`` (finite or not, as metrics.jsonl has them)."""

    def close(self) -> None:
        """End this session's part of the run (flush, mark the tracker run finished)."""


def read_ids(run_dir: Path) -> dict[str, str]:
    """The backends' run ids kept in ``run_dir`` (empty when there are none or the file is unreadable: a
    backend then starts a new tracker run, which is what it would do without resuming)."""
    try:
        ids = json.loads((Path(run_dir) / IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in ids.items()} if isinstance(ids, dict) else {}


def write_ids(run_dir: Path, ids: Mapping[str, str]) -> None:
    """Keep the backends' run ids in ``run_dir`` (atomically: a kill mid-write leaves the old file)."""
    path = Path(run_dir) / IDS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(dict(ids), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"trainer": {"epochs": 3}}`` → ``{"trainer.epochs": 3}``; lists stay values (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out

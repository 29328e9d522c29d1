"""A refused or failed ``kdrun train`` changes nothing that existed, and leaves nothing behind.

Hydra prepares the output directories before kdrun's task runs: it creates the run directory (and
``hydra.sweep.dir`` with its ``multirun.yaml`` for ``-m``), writes ``.hydra/`` and opens a job log. A
command that kdrun then refuses (a finished run in the directory, a config that fails validation) would
leave a stub directory behind, or replace a finished run's ``.hydra/`` with a config that never ran. So:

* ``conf/config.yaml`` sets ``hydra.output_subdir: null`` and a job logging without a file: Hydra writes
  nothing into a run directory. kdrun writes ``.hydra/{config,hydra,overrides}.yaml`` itself, with
  Hydra's content, when the run starts (:func:`hydra_record`, written by the engine once the run
  directory is accepted and the checkpoint, if any, restored); ``cli.log`` likewise
  (:mod:`kdrun.runtime.console_log`).
* :class:`RunDirGuard`, a Hydra callback (``hydra.callbacks.run_guard``), notes before Hydra creates
  anything which directories exist and what ``multirun.yaml`` holds. When the command fails
  (:func:`undo`, called by the CLI), the directories this command created and that are still empty are
  removed again, and a ``multirun.yaml`` that no started job belongs to is put back as it was.

A run that started (its ``config.yaml`` was written by this command) keeps its directory whatever
happens later: its checkpoints and metrics are results.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

try:  # Hydra's callback base (hydra-core >= 1.1); a plain base keeps the module importable without it
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]

STARTED_MARK = "config.yaml"  # written by the engine when a run starts (kdrun.engine.run)


@dataclass
class _Record:
    """What one command found before Hydra created anything."""

    started_at: float = field(default_factory=time.time)
    created: list[Path] = field(default_factory=list)      # directories this command will have created
    sweep_dir: Path | None = None
    multirun_yaml: bytes | None = None                     # the earlier multirun.yaml's bytes, if any
    job_dirs: list[Path] = field(default_factory=list)     # run directories the task was given


_RECORD: _Record | None = None


def begin() -> None:
    """Start recording for one command (the CLI calls it before Hydra runs)."""
    global _RECORD
    _RECORD = _Record()


def missing_dirs(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, deepest first (what ``mkdir -p`` would create)."""
    out: list[Path] = []
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


class RunDirGuard(Callback):  # type: ignore[misc]
    """Hydra callback: notes what exists before Hydra creates the output directories (module docstring)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _RECORD is not None:
            _RECORD.created += missing_dirs(Path(str(config.hydra.run.dir)))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _RECORD is None:
            return
        sweep = Path(os.path.abspath(str(config.hydra.sweep.dir)))
        _RECORD.sweep_dir = sweep
        _RECORD.created += missing_dirs(sweep)
        if (sweep / "multirun.yaml").is_file():
            _RECORD.multirun_yaml = (sweep / "multirun.yaml").read_bytes()


def note_job_dir(run_dir: Path) -> None:
    """The task's run directory (every job of a sweep). A job directory inside an existing sweep directory
    was created by this command when it is empty and changed since the command began."""
    if _RECORD is None:
        return
    run_dir = Path(os.path.abspath(run_dir))
    _RECORD.job_dirs.append(run_dir)
    if run_dir in _RECORD.created:
        return
    try:
        fresh = not any(run_dir.iterdir()) and run_dir.stat().st_ctime >= _RECORD.started_at - 1.0
    except OSError:
        fresh = False
    if fresh:
        _RECORD.created.append(run_dir)


def started(run_dir: Path, since: float) -> bool:
    """Whether a run started in ``run_dir`` during this command (the engine wrote its config.yaml)."""
    try:
        return (run_dir / STARTED_MARK).stat().st_mtime >= since - 1.0
    except OSError:
        return False


def undo() -> list[Path]:
    """After a failed or refused command: remove the directories it created that are still empty (deepest
    first), and put ``multirun.yaml`` back as it was unless a job of this command started. Returns the
    removed directories. Never raises: the command's own error is what the user needs to see."""
    record = _RECORD
    if record is None:
        return []
    removed: list[Path] = []
    any_started = any(started(d, record.started_at) for d in record.job_dirs)
    if record.sweep_dir is not None and not any_started:
        target = record.sweep_dir / "multirun.yaml"
        try:
            if record.multirun_yaml is not None:
                if not target.is_file() or target.read_bytes() != record.multirun_yaml:
                    tmp = target.with_name(".multirun.yaml.restore")
                    tmp.write_bytes(record.multirun_yaml)
                    os.replace(tmp, target)
            elif record.sweep_dir in record.created:
                target.unlink(missing_ok=True)
        except OSError:
            pass
    # Deepest first, so that a parent is empty once its created children are gone.
    for d in sorted(set(record.created), key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()  # only an empty directory: a started run's files are never touched
            removed.append(d)
        except OSError:
            pass
    return removed


def hydra_record(task_cfg: DictConfig) -> dict[str, str]:
    """The three files Hydra would have written into ``<run_dir>/.hydra/`` (Hydra 1.3
    ``hydra/core/utils.py:run_job``: ``config.yaml`` = the task's config, unresolved; ``hydra.yaml`` = the
    hydra node; ``overrides.yaml`` = the task overrides), as ``{relative path: YAML text}``; only
    ``config.yaml`` outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    files = {".hydra/config.yaml": OmegaConf.to_yaml(task_cfg)}
    if HydraConfig.initialized():
        files[".hydra/hydra.yaml"] = OmegaConf.to_yaml(HydraConfig.instance().cfg)
        files[".hydra/overrides.yaml"] = OmegaConf.to_yaml(OmegaConf.create(list(HydraConfig.get().overrides.task)))
    return files


def write_record(run_dir: Path, files: dict[str, str]) -> None:
    """Write ``files`` (relative path → text) into ``run_dir``, each atomically."""
    for rel, text in files.items():
        path = Path(run_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

"""Where a run's scalars go besides ``metrics.jsonl``: ``logger.backends``, a list of ``tensorboard`` (the
default: ``tb/``), ``wandb`` and ``mlflow`` (the extras of the same names); one module per backend, each a
:class:`~kdrun.runtime.log_backends.base.Backend`.

1. :func:`kdrun.config.validate` checks the names.
2. :func:`check_backends`, before anything is written (``kdrun train`` before it starts workers, the engine
   before it takes the run directory): the packages are installed (else one paragraph naming the extra,
   :mod:`kdrun.extras`) and the store can be opened (:func:`kdrun.runtime.log_backends.mlflow.preflight`).
3. :func:`name_sweep_group`: a sweep job's ``logger.group`` is its sweep directory.
4. :func:`open_backends`, on the main rank when the run starts (:class:`kdrun.runtime.logger.RunLogger`):
   the trackers first, so that one that cannot start (no W&B login) fails before ``tb/`` and
   ``metrics.jsonl`` are written; their run ids are kept in ``trackers.json`` for a resumed run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig

from kdrun.config import ConfigError
from kdrun.extras import missing_backend_message
from kdrun.runtime.log_backends.base import Backend, BackendRun, read_ids, write_ids


def check_backends(names: Sequence[str]) -> None:
    """Refuse backends that cannot run here (a missing extra, an MLflow store MLflow cannot open)."""
    for name in names:
        message = missing_backend_message(name)
        if message is not None:
            raise ConfigError(message)
    if "mlflow" in names:
        from kdrun.runtime.log_backends.mlflow import preflight

        preflight()


def name_sweep_group(cfg: DictConfig, hydra_cfg: Any) -> None:
    """Set ``logger.group`` of a sweep job that has none to the sweep directory as Hydra resolved it
    (``multirun/2026-12-07/12-00-00-123456``, relative when given so): the same for every job of the sweep,
    as Hydra gives each job the resolver cache (``${now:...}``) of the sweep's config."""
    from hydra.types import RunMode

    logger = cfg.get("logger")
    if isinstance(logger, DictConfig) and logger.get("group") is None and hydra_cfg.mode == RunMode.MULTIRUN:
        logger.group = str(hydra_cfg.sweep.dir)


def open_backend(name: str, run: BackendRun) -> Backend:
    """The backend ``name`` (a name :func:`kdrun.config.validate` accepted), started."""
    if name == "tensorboard":
        from kdrun.runtime.log_backends.tensorboard import TensorBoardBackend

        return TensorBoardBackend(run)
    if name == "wandb":
        from kdrun.runtime.log_backends.wandb import WandbBackend

        return WandbBackend(run)
    if name == "mlflow":
        from kdrun.runtime.log_backends.mlflow import MlflowBackend

        return MlflowBackend(run)
    raise ConfigError(f"logger.backends: {name!r} is not a logging backend.")  # validate() refuses it first


def open_backends(names: Sequence[str], run_dir: Path, resumed_at: Optional[int],
                  group: Optional[str]) -> list[Backend]:
    """Start every backend of ``names`` (each once), trackers first; a resumed session (``resumed_at``: the
    checkpoint's step) continues the tracker runs named in ``trackers.json``. If one fails to start, those
    already started are closed and the error is raised."""
    run_dir = Path(run_dir)
    ids = read_ids(run_dir) if resumed_at is not None else {}
    order = sorted(dict.fromkeys(names), key=lambda n: n == "tensorboard")
    opened: list[Backend] = []
    try:
        for name in order:
            opened.append(open_backend(name, BackendRun(run_dir, run_dir.name, group, resumed_at, ids.get(name))))
    except BaseException:
        for backend in opened:
            backend.close()
        raise
    kept = {name: backend.run_id for name, backend in zip(order, opened) if backend.run_id}
    if kept:
        write_ids(run_dir, {**ids, **kept})
    return opened

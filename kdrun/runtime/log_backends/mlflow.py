"""``logger.backends=[...,mlflow]``: an MLflow run per kdrun run (the ``[mlflow]`` extra, mlflow-skinny).

The store is ``$MLFLOW_TRACKING_URI`` (a tracking server ``http://HOST:5000``, ``databricks``, or a local
store: ``sqlite:///PATH/mlflow.db`` needs the full ``mlflow`` package, ``file:PATH`` needs
``MLFLOW_ALLOW_FILE_STORE=true`` in recent MLflow, e.g. 3.18); :func:`preflight` refuses a store the installed MLflow
cannot open before anything is written. The experiment is ``$MLFLOW_EXPERIMENT_NAME`` (``kdrun`` when
unset); the run is named after the run directory.

**A sweep is a tag, not an experiment or a parent run**: every job's run carries ``kdrun.sweep`` =
``logger.group`` (the sweep directory) in the one experiment. An experiment per sweep would split the
runs that one compares across sweeps (a seed added later, a baseline from another sweep) into separate
tables, and a parent run needs one process that owns it for the sweep's lifetime, which kdrun's jobs do
not have (SLURM runs them in parallel on different nodes, and a sweep can be extended or resumed later);
a tag needs no coordination and MLflow filters (``tags.kdrun.sweep = '...'``) and groups by it.
``kdrun.run_dir`` names the run directory.

The resolved config becomes the run's params (dotted keys). MLflow params cannot change: a resumed run
adds the keys that are new and records the changed ones in the tag ``kdrun.changed_on_resume``.
"""
from __future__ import annotations

import atexit
import os
import re
import sys
import time
from importlib.util import find_spec
from typing import Any, Mapping, Optional
from urllib.parse import urlparse

from kdrun.config import ConfigError
from kdrun.runtime.log_backends.base import BackendRun, BackendStartError, flatten

# MLflow stores these through SQLAlchemy, which mlflow-skinny does not install.
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# MLflow's limits: at most 100 params per log_batch; names of letters, digits and _ - . space /.
PARAMS_PER_BATCH = 100
UNNAMEABLE = re.compile(r"[^\w\-. /]")


def preflight() -> None:
    """Refuse, before the run writes anything, a tracking store the installed MLflow cannot open."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    given = f"MLFLOW_TRACKING_URI={uri}" if os.environ.get("MLFLOW_TRACKING_URI") else \
        f"MLFLOW_TRACKING_URI is unset, so MLflow's default {uri}"
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme in DATABASE_SCHEMES and find_spec("sqlalchemy") is None:
        raise ConfigError(
            f"logger.backends includes mlflow, whose tracking store is a database ({given}), which needs the "
            "full mlflow package; the [mlflow] extra installs mlflow-skinny. Set MLFLOW_TRACKING_URI to your "
            "tracking server (http://HOST:5000), or pip install mlflow for a local database store.")
    allow = getattr(getattr(mlflow, "environment_variables", None), "MLFLOW_ALLOW_FILE_STORE", None)
    if scheme in ("", "file") and allow is not None and not allow.get():
        raise ConfigError(
            f"logger.backends includes mlflow, whose tracking store is a directory ({given}), which MLflow "
            f"{mlflow.__version__} opens only with MLFLOW_ALLOW_FILE_STORE=true: set that, or set "
            "MLFLOW_TRACKING_URI to your tracking server (http://HOST:5000).")


def mlflow_name(key: str) -> str:
    """``key`` as a metric or param name MLflow accepts (other characters become ``_``; at most 250)."""
    return UNNAMEABLE.sub("_", key)[:250]


class MlflowBackend:
    name = "mlflow"
    rewinds = False

    def __init__(self, run: BackendRun) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI
        self.resumed, self.ended = False, False
        try:
            self.run_id: Optional[str] = self.continued(run.resume_id) or self.created(run)
        except MlflowException as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BackendStartError(
                f"logger.backends includes mlflow, but MLflow could not start a run in "
                f"{self.client.tracking_uri}: {first} Check MLFLOW_TRACKING_URI (and the server), or leave "
                "mlflow out of logger.backends.") from None
        atexit.register(self.end, "FAILED")  # a run that dies unclosed is not left RUNNING forever

    def continued(self, run_id: Optional[str]) -> Optional[str]:
        """The run ``run_id`` marked running again, or None when there is none (a new store, deleted)."""
        from mlflow.exceptions import MlflowException

        if run_id is None:
            return None
        try:
            found = self.client.get_run(run_id)
        except MlflowException:
            found = None
        if found is None or found.info.lifecycle_stage == "deleted":
            print(f"[kdrun] MLflow run {run_id} is not in {self.client.tracking_uri}; this session starts a "
                  "new one.", file=sys.stderr, flush=True)
            return None
        self.client.update_run(run_id, status="RUNNING")
        self.resumed = True
        return run_id

    def created(self, run: BackendRun) -> str:
        from mlflow.exceptions import MlflowException

        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "kdrun"
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(experiment_name)
            except MlflowException:  # another job of the sweep created it first
                experiment_id = self.client.get_experiment_by_name(experiment_name).experiment_id
        tags = {"kdrun.run_dir": str(run.run_dir), **({"kdrun.sweep": run.group} if run.group else {})}
        return str(self.client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id)

    def log_params(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils import validation

        limit = int(getattr(validation, "MAX_PARAM_VAL_LENGTH", 500))  # 6000 in MLflow 3.18, 500 in old versions
        params = {mlflow_name(k): str(v)[:limit] for k, v in flatten(config).items()}
        if self.resumed:  # params are immutable: the new keys go, the changed ones are named in a tag
            old = self.client.get_run(self.run_id).data.params
            changed = [f"{k}={v}" for k, v in params.items() if k in old and old[k] != v]
            if changed:
                self.client.set_tag(self.run_id, "kdrun.changed_on_resume", ", ".join(changed)[:5000])
            params = {k: v for k, v in params.items() if k not in old}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + PARAMS_PER_BATCH])

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_name(k), float(v), now, step)
                                                    for k, v in values.items()])

    def close(self) -> None:
        import mlflow

        flush = getattr(mlflow, "flush_async_logging", None)  # MLFLOW_ENABLE_ASYNC_LOGGING=true queues the values
        if flush is not None:
            flush()
        self.end("FINISHED")

    def end(self, status: str) -> None:
        if self.ended:
            return
        self.ended = True
        atexit.unregister(self.end)
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:  # at exit, or a store gone: the values are in metrics.jsonl regardless
            print(f"[kdrun] MLflow run {self.run_id} could not be marked {status}: {e}", file=sys.stderr,
                  flush=True)

"""``kdrun train -m ... hydra/launcher=kdrun_shared``: the kdrun side of the shared launcher
(``hydra_plugins/kdrun_shared_launcher`` does Hydra's side: job configs, output directories, callbacks,
``JobReturn``s).

Which jobs share is :mod:`kdrun.runtime.sharing` (the config rule) plus one condition here: a group trains
in this one process (:func:`sharing_class`), so jobs that start workers (``trainer.devices`` > 1) or join a
torchrun/srun job run one by one as under Hydra's basic launcher.

Every job of a group runs its own ``kdrun train`` task (:func:`kdrun.commands.train.train_task`: the run's
record, validation, the end summary, user errors as one paragraph), as under the basic launcher; only its
training call differs. While a :class:`GroupSession` is active, :func:`kdrun.commands.launch.dispatch` hands
the job to it instead of training it: the launcher runs each job's task once to *collect* the jobs (the task
stops at its training call, :class:`Collected`), trains them together (:func:`train_jobs`, i.e.
:func:`kdrun.engine.group.train_group` through :func:`kdrun.commands.launch.dispatch_group`: one loader, one teacher forward per step, every student its own
step), then runs each job's task again to *report*: there the training call returns the job's result (or
raises its error), and the task ends the job as it ends a job trained alone."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig

from kdrun.config import ConfigError


class Collected(BaseException):
    """Ends a job's task at its training call in the collecting pass. Not an ``Exception``: no error handler
    on the way (kdrun's task wrapper, Hydra's ``run_job``) may take it for a failure."""


class JobRefused(ConfigError):
    """A job of a group was refused (its run directory, a diverged student, ...): the engine's paragraph."""


class JobCrashed(RuntimeError):
    """A job of a group raised (not a user error); the message is its traceback as the engine caught it."""


@dataclass
class GroupSession:
    """The jobs of one group while the launcher collects them, then their results while it reports them."""

    jobs: dict[Path, dict[str, Any]] = field(default_factory=dict)   # run dir → the training call's arguments
    results: dict[Path, dict[str, Any]] = field(default_factory=dict)

    def take(self, cfg: DictConfig, checked: DictConfig, settings: Any, run_dir: Path,
             record: dict[str, str]) -> dict[str, Any]:
        """The training call of a job (:func:`kdrun.commands.launch.dispatch`'s arguments)."""
        run_dir = Path(run_dir)
        if run_dir not in self.results:
            self.jobs[run_dir] = {"cfg": cfg, "checked": checked, "settings": settings, "run_dir": run_dir,
                                  "record": record}
            raise Collected()
        result = self.results[run_dir]
        if "error" not in result:
            return result
        if result.get("user_error", True):
            raise JobRefused(str(result["error"]))
        raise JobCrashed(str(result.get("traceback") or result["error"]))

    def train(self) -> None:
        """Train the collected jobs together; their results are what their tasks' training calls return."""
        jobs = list(self.jobs.values())
        results = train_jobs(*([j[k] for j in jobs] for k in ("cfg", "checked", "settings", "run_dir", "record")))
        self.results = {j["run_dir"]: r for j, r in zip(jobs, results)}


_ACTIVE: Optional[GroupSession] = None


def active_session() -> Optional[GroupSession]:
    """The group whose jobs' tasks are running now (``None``: a job trains where it runs)."""
    return _ACTIVE


@contextlib.contextmanager
def session(group: GroupSession) -> Iterator[GroupSession]:
    global _ACTIVE
    _ACTIVE = group
    try:
        yield group
    finally:
        _ACTIVE = None


def sharing_class(cfg: DictConfig) -> Optional[str]:
    """The job's sharing key (:func:`kdrun.runtime.sharing.sharing_key`), or ``None`` when it must run alone:
    its config does not validate (it is then refused exactly as under the basic launcher), or it does not
    train in this process (``trainer.devices`` > 1 starts workers; under torchrun/srun every rank joins one
    job)."""
    from kdrun.commands.launch import resolve_devices
    from kdrun.config import validate
    from kdrun.runtime import distributed
    from kdrun.runtime.sharing import sharing_key

    try:
        trainer = validate(copy.deepcopy(cfg)).trainer
        _, nproc = resolve_devices(trainer.accelerator, trainer.devices)
        job_env = distributed.launch_env()
    except Exception:  # noqa: BLE001 — reported by the job itself, run alone
        return None
    if nproc > 1 or (job_env is not None and job_env.world_size > 1):
        return None
    return sharing_key(cfg)


def train_jobs(cfgs: list[DictConfig], checked: list[DictConfig], settings: list[Any], run_dirs: list[Path],
               records: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Train one group where it runs (:func:`kdrun.commands.launch.dispatch_group`, which trains it in this
    process for the groups :func:`sharing_class` forms): each job's results as ``kdrun.engine.train`` returns
    them alone, or ``{"error": ...}`` for a job that failed (kdrun.engine.group.train_group). What fails in
    the part the jobs share (the data, the teacher) fails every job of the group, each as it would alone."""
    import traceback

    from kdrun.commands.launch import dispatch_group
    from kdrun.errors import find_user_error

    try:
        return dispatch_group(cfgs, checked, settings[0], run_dirs, records)
    except Exception as e:  # noqa: BLE001 — every job gets the error; the sweep goes on with other groups
        user = find_user_error(e)
        error = {"error": str(user if user is not None else e), "user_error": user is not None,
                 "traceback": traceback.format_exc()}
        return [{"run_dir": str(d), **error} for d in run_dirs]

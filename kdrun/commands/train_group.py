"""``kdrun train -m ... hydra/launcher=kdrun_shared``: the kdrun side of the shared launcher
(``hydra_plugins/kdrun_shared_launcher`` does Hydra's side: job configs, output directories, callbacks,
``JobReturn``s).

Which jobs share is :mod:`kdrun.runtime.sharing` (the config rule; :func:`sharing_class` leaves a job whose
config does not validate alone, to be refused as under Hydra's basic launcher).

Every job of a group runs its own ``kdrun train`` task (:func:`kdrun.commands.train.train_task`: the run's
record, validation, the end summary, user errors as one paragraph), as under the basic launcher; only its
training call differs. While a :class:`GroupSession` is active, :func:`kdrun.commands.launch.dispatch` hands
the job to it instead of training it: the launcher runs each job's task once to *collect* the jobs (the task
stops at its training call, :class:`Collected`), then each job's task again to *report*: the first such call
trains the group (:func:`train_jobs`, i.e. :func:`kdrun.engine.group.train_group` through
:func:`kdrun.commands.launch.dispatch_group`: one loader, one teacher forward per step, every student its
own step), and each training call returns its job's result (or ends the job with its error), so that the
task ends the job as it ends a job trained alone."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig



class Collected(BaseException):
    """Ends a job's task at its training call in the collecting pass. Not an ``Exception``: no error handler
    on the way (kdrun's task wrapper, Hydra's ``run_job``) may take it for a failure."""


class JobCrashed(RuntimeError):
    """A job of a group failed inside kdrun or a component (not a user error); the engine printed its
    traceback, and the job fails as a job that raised does under Hydra's basic launcher."""


@dataclass
class GroupSession:
    """The jobs of one group while the launcher collects them, then their results while it reports them.

    The group trains inside the task of the first job that reports (:meth:`take`), so that the task's own
    handling applies to what goes wrong there (``HYDRA_FULL_ERROR`` as the user set it, a user error as one
    paragraph): the launcher runs the tasks inside Hydra, where kdrun's CLI has set that variable for Hydra."""

    jobs: dict[Path, dict[str, Any]] = field(default_factory=dict)   # run dir → the training call's arguments
    collecting: bool = True
    results: Optional[dict[Path, dict[str, Any]]] = None
    failure: Optional[BaseException] = None  # what ended the group's training as a whole (its shared part)

    def take(self, cfg: DictConfig, checked: DictConfig, settings: Any, run_dir: Path,
             record: dict[str, str]) -> dict[str, Any]:
        """The training call of a job (:func:`kdrun.commands.launch.dispatch`'s arguments)."""
        from kdrun.errors import find_user_error

        run_dir = Path(run_dir)
        if self.collecting:
            self.jobs[run_dir] = {"cfg": cfg, "checked": checked, "settings": settings, "run_dir": run_dir,
                                  "record": record}
            raise Collected()
        if self.results is None and self.failure is None:
            try:
                self.train()
            except Exception as e:  # this job's task reports it; the others of the group end with it below
                self.failure = e
                raise
        if self.failure is not None:  # said by the first job's task, which ended as this one does
            if find_user_error(self.failure) is not None or getattr(self.failure, "exit_code", None) == 2:
                raise SystemExit(2)  # a user error (in the workers: kdrun.commands.launch.WorkerFailed, 2)
            raise JobCrashed(f"the group's training failed: {self.failure!r} (its traceback is above)")
        assert self.results is not None
        result = self.results[run_dir]
        if "error" not in result:
            return result
        if result.get("user_error", True):  # train_group said it (and wrote it into the job's cli.log)
            raise SystemExit(2)
        raise JobCrashed(str(result["error"]))

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
    """The job's sharing key (:func:`kdrun.runtime.sharing.sharing_key`), or ``None`` when it must run alone
    because its config does not validate (it is then refused exactly as under the basic launcher). A group
    trains where its jobs would (:func:`kdrun.commands.launch.dispatch_group`): in this process, in
    ``trainer.devices`` local workers, or in the ranks torchrun/srun started (``trainer.devices`` is on the
    data side of the rule, equal in a group)."""
    from kdrun.config import validate
    from kdrun.runtime.sharing import sharing_key

    try:
        validate(copy.deepcopy(cfg))
    except Exception:  # noqa: BLE001 — reported by the job itself, run alone
        return None
    return sharing_key(cfg)


def train_jobs(cfgs: list[DictConfig], checked: list[DictConfig], settings: list[Any], run_dirs: list[Path],
               records: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Train one group where it runs (:func:`kdrun.commands.launch.dispatch_group`, which trains it in this
    process for the groups :func:`sharing_class` forms): each job's results as ``kdrun.engine.train`` returns
    them alone, or ``{"run_dir": ..., "error": paragraph}`` for a job that failed, which
    :func:`kdrun.engine.group.train_group` has said on the console and in the job's ``cli.log``."""
    from kdrun.commands.launch import dispatch_group

    return dispatch_group(cfgs, checked, settings[0], run_dirs, records)

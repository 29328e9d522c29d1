"""kdrun's shared launcher for Hydra (``hydra/launcher=kdrun_shared``): the jobs of a sweep that differ only on
the student side (:mod:`kdrun.runtime.sharing`) train as one group in this process, one data pipeline and
one teacher forward per step for all their students (:func:`kdrun.engine.group.train_group`); every other
job runs as under Hydra's basic launcher.

Hydra instantiates launchers only from the ``hydra_plugins`` package, so the class is defined here;
conf/hydra/launcher/kdrun_shared.yaml names it as ``_target_``. It follows Hydra 1.3's ``BasicLauncher``
(hydra/_internal/core_plugins/basic_launcher.py ``launch``) and ``run_job`` (hydra/core/utils.py): each job's
sweep config (``load_sweep_config``, ``hydra.job.id``/``num``), its output directory
(``hydra.sweep.dir``/``hydra.sweep.subdir``), ``HydraConfig`` set to the job's while its directory, its
``.hydra/`` record and its summary are made, the callbacks' ``on_job_start``/``on_job_end`` and a
``JobReturn`` per job, in sweep order. A job alone in its group is run by ``run_job`` itself, as the basic
launcher runs it. What differs: the groups run in the order of their first job, and a refused job (a user
error: one paragraph) does not stop the sweep; the other jobs run and the sweep exits 2 at its end.

kdrun is imported inside the methods: Hydra imports every plugin module at the start of every command (and
executes it without entering it in ``sys.modules``: no ``from __future__ import annotations`` here, whose
string annotations a dataclass would look up there).
"""
import copy
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobRuntime, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One job of the sweep: its number, overrides and sweep config (the ``hydra`` node included)."""

    idx: int
    overrides: List[str]
    config: DictConfig


class KdrunSharedLauncher(Launcher):
    """Hydra's basic launcher, with the jobs that can share grouped into one process each."""

    def __init__(self) -> None:
        super().__init__()
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = [self.job(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        groups = self.plan(jobs)
        log.info(f"Launching {len(jobs)} jobs locally in {len(groups)} group(s): "
                 + ", ".join("#" + "+#".join(str(jobs[i].idx) for i in g) for g in groups))
        returns: List[Optional[JobReturn]] = [None] * len(jobs)
        refused: List[int] = []
        for group in groups:
            for i, job in zip(group, self.run_group([jobs[i] for i in group], refused)):
                returns[i] = job
        if refused:  # each said why in its own paragraph already
            print(f"kdrun: error: {len(refused)} of the sweep's {len(jobs)} jobs were refused (#"
                  + ", #".join(map(str, sorted(refused))) + "), each for the reason said above.", file=sys.stderr,
                  flush=True)
            sys.exit(2)
        return [r for r in returns if r is not None]

    def job(self, idx: int, overrides: List[str]) -> Job:
        """The job's sweep config, as the basic launcher makes it."""
        assert self.hydra_context is not None and self.config is not None
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = idx
            config.hydra.job.num = idx
        return Job(idx, overrides, config)

    def plan(self, jobs: List[Job]) -> List[List[int]]:
        """The groups (indices into ``jobs``): kdrun's sharing rule on each job's task config, read with the
        job's Hydra config set (``${hydra:...}``). A job that changes directory (``hydra.job.chdir``) or its
        environment (``hydra.job.env_set``) per job runs alone."""
        from kdrun.commands.train_group import sharing_class
        from kdrun.runtime.sharing import groups_by_key

        keys: List[Optional[str]] = []
        saved = HydraConfig.instance().cfg
        try:
            for job in jobs:
                HydraConfig.instance().set_config(job.config)
                alone = bool(job.config.hydra.job.get("chdir")) or bool(job.config.hydra.job.get("env_set"))
                keys.append(None if alone else sharing_class(task_config(job.config)))
        finally:
            HydraConfig.instance().cfg = saved
        return groups_by_key(keys)

    def run_group(self, jobs: List[Job], refused: List[int]) -> List[Optional[JobReturn]]:
        """One group: a single job through Hydra's ``run_job``; several trained together. One ``JobReturn``
        per job (``None`` for a refused one)."""
        assert self.hydra_context is not None and self.task_function is not None
        if len(jobs) == 1:
            try:
                return [run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                config=jobs[0].config, job_dir_key="hydra.sweep.dir",
                                job_subdir_key="hydra.sweep.subdir")]
            except SystemExit as e:
                if e.code != 2:  # a stop signal (or another exit): the sweep ends, as under the basic launcher
                    raise
                refused.append(jobs[0].idx)  # a user error, already said in one paragraph
                return [None]
        return self.train_together(jobs, refused)

    def train_together(self, jobs: List[Job], refused: List[int]) -> List[Optional[JobReturn]]:
        """Several jobs in one group (kdrun.commands.train_group): each job prepared as ``run_job`` prepares
        it and its kdrun task run up to its training call; each task run again (the first one trains the
        group) to end its job, and the job ended as ``run_job`` ends it. A stop signal ends the sweep after
        every job said so."""
        from kdrun.commands.train_group import Collected, GroupSession, session

        saved = HydraConfig.instance().cfg
        rets = [self.enter(job) for job in jobs]
        stop = None
        try:
            with session(GroupSession()) as group:
                collected = []
                for job, ret in zip(jobs, rets):
                    try:
                        self.task(job, ret, refused)
                    except Collected:
                        collected.append((job, ret))
                group.collecting = False  # the first task from here on trains the group (GroupSession.take)
                for job, ret in collected:
                    try:
                        self.task(job, ret, refused)
                    except SystemExit as e:  # a stop signal: report_end's exit, after the others said so
                        stop = e.code
        finally:
            HydraConfig.instance().cfg = saved
        if stop is not None:
            raise SystemExit(stop)
        return [self.leave(job, ret) if ret.status != JobStatus.UNKNOWN else None for job, ret in zip(jobs, rets)]

    def task(self, job: Job, ret: JobReturn, refused: List[int]) -> None:
        """Run the job's task (``kdrun train``'s) with the job's Hydra config set, as ``run_job`` runs it; its
        result into ``ret``. A user error (reported by the task in one paragraph, exit 2) refuses the job
        alone; anything else a task raises fails the job, as under ``run_job``."""
        assert self.task_function is not None
        HydraConfig.instance().set_config(job.config)
        configure_log(job.config.hydra.job_logging, job.config.hydra.verbose)
        try:
            ret.return_value = self.task_function(ret.cfg)
            ret.status = JobStatus.COMPLETED
        except SystemExit as e:
            if e.code != 2:
                raise
            refused.append(job.idx)
        except Exception as e:  # noqa: BLE001 — what run_job does with a task that raised
            ret.return_value = e
            ret.status = JobStatus.FAILED

    def leave(self, job: Job, ret: JobReturn) -> JobReturn:
        """``run_job`` after the task call: the task's name, ``on_job_end`` (with the job's Hydra config)."""
        assert self.hydra_context is not None
        saved = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(job.config)
        try:
            ret.task_name = JobRuntime.instance().get("name")
            self.hydra_context.callbacks.on_job_end(config=job.config, job_return=ret)
        finally:
            HydraConfig.instance().cfg = saved
        return ret

    def enter(self, job: Job) -> JobReturn:
        """``run_job`` up to the task call: the output directory, ``HydraConfig``, the ``JobReturn``, the
        directory created, ``.hydra/`` if Hydra is to write it, ``on_job_start``."""
        from hydra.core.utils import _save_config

        assert self.hydra_context is not None
        config = job.config
        HydraConfig.instance().set_config(config)
        output_dir = os.path.join(str(OmegaConf.select(config, "hydra.sweep.dir")),
                                  str(OmegaConf.select(config, "hydra.sweep.subdir")))
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = os.path.abspath(output_dir)
        HydraConfig.instance().set_config(config)
        ret = JobReturn(overrides=OmegaConf.to_container(config.hydra.overrides.task),  # type: ignore[arg-type]
                        cfg=task_config(config), hydra_cfg=copy.deepcopy(HydraConfig.instance().cfg),
                        working_dir=os.getcwd())
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if config.hydra.output_subdir is not None:  # kdrun's conf sets null: kdrun writes .hydra/ itself
            where = Path(config.hydra.runtime.output_dir) / str(config.hydra.output_subdir)
            _save_config(ret.cfg, "config.yaml", where)
            _save_config(ret.hydra_cfg, "hydra.yaml", where)
            _save_config(config.hydra.overrides.task, "overrides.yaml", where)
        self.hydra_context.callbacks.on_job_start(config=config, task_function=self.task_function)
        return ret


def task_config(config: DictConfig) -> DictConfig:
    """The task's config: the sweep config without its ``hydra`` node (``run_job``'s ``task_cfg``)."""
    task_cfg = copy.deepcopy(config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    return task_cfg

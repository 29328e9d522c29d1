"""``train_group(cfgs, run_dirs, records)``: the jobs of a sweep that differ only on the student side
(:mod:`kdrun.runtime.sharing`), trained in one process: one loader, one augmentation and mixup draw and one
teacher forward per step, then each student's own step.

Each job stays an ordinary run: its own run directory (lock, fresh-run rule), ``cli.log``, ``metrics.jsonl``,
TensorBoard events, ``last.pt``/``best.pt`` and ``results.json``. Each student's run is bit-identical to the
same job trained alone (:func:`kdrun.engine.run.train`), because

* the teacher side (data, task, terms, teacher) is built once, from the seed, as every build starts;
  each student then builds its own task and loss terms from the random state the data left, and its model,
  balancer, projectors, optimiser and schedule from the state the teacher left, exactly as it would alone
  (:func:`build_group`);
* the data side of every step is drawn on the data stream of that step and the auxiliary batches on the
  auxiliary stream (:mod:`kdrun.engine.streams`): functions of (seed, rank, count), not of the students;
* each student runs on its own model stream (:class:`~kdrun.engine.streams.OwnStream`: initialisation,
  dropout, drop-path, balancer randomness, the random state its checkpoints save);
* each student's step is :meth:`KDStep.learn` on the shared :class:`~kdrun.engine.step.Prepared` batch, and
  its bookkeeping, validation and saves are its own :class:`~kdrun.engine.loop.Loop`'s.

A student that fails (its step raises, it diverges: ``trainer.max_nonfinite_streak``) is dropped with its
error in its own ``cli.log`` and result; the others go on. A stop signal stops every student after the same
step, each writing its ``last.pt``, so ``trainer.resume=auto`` resumes the group in lockstep.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from kdrun.config import ConfigError, validate
from kdrun.data.loaders import Loaders, close_loaders
from kdrun.engine.build import TeacherSide, build_loaders, build_teacher_side, build_terms, finish_student, start_student
from kdrun.engine.environment import pick_device, set_backend_flags
from kdrun.engine.group_loop import Group, GroupConsole, GroupLoop, Member, SharedAux
from kdrun.engine.loop import Loop
from kdrun.engine.run import (finished_run, fit_missing_teacher, make_checkpointer, make_logger, make_step,
                              measure_teacher, protect, restore_run, start_run, stopped_in_fit, write_results)
from kdrun.engine.streams import OwnStream, RandomState
from kdrun.runtime import distributed
from kdrun.runtime import preemption
from kdrun.runtime.checkpoint import TrainState
from kdrun.runtime.rundir import RunDirError
from kdrun.runtime.sharing import differences


def train_group(cfgs: list[DictConfig], run_dirs: list[Path], records: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Train the jobs of one group together; one result per job, in order: what
    :func:`kdrun.engine.run.train` returns for it alone, or ``{"run_dir": ..., "error": paragraph}`` for a
    job that was refused (its config, its run directory) or failed. Raises :class:`ConfigError` when the
    jobs do not share their data and teacher side. Every rank of a process group calls it alike."""
    members = [Member(i, copy.deepcopy(cfg), Path(d), dict(rec or {})) for i, (cfg, d, rec)
               in enumerate(zip(cfgs, run_dirs, records))]
    for m in members:
        try:
            m.settings = validate(m.cfg)
            preemption.parse_signals(m.settings.trainer.preempt_signals)
        except ConfigError as e:
            m.refuse(str(e))
    check_shared(members)
    for m in members:
        if m.alive:
            try:
                m.lock = protect(m.run_dir, m.settings.trainer.resume, m.settings.trainer.overwrite)
            except RunDirError as e:
                m.refuse(str(e))
    try:
        with GroupConsole(members, enabled=distributed.is_main()) as console:
            group = Group(members, console)
            group.agree()
            if group.alive():
                run_group(group)
    finally:
        for m in members:
            if m.lock is not None:
                m.lock.release()
    return [m.result for m in members]  # type: ignore[misc]


def check_shared(members: list[Member]) -> None:
    """Refuse a group whose jobs differ on the data or teacher side (the rule: :mod:`kdrun.runtime.sharing`)."""
    alive = [m for m in members if m.alive]
    for m in alive[1:]:
        diff = differences(alive[0].cfg, m.cfg)
        if diff:
            shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise ConfigError(
                f"The jobs in {alive[0].run_dir} and {m.run_dir} cannot train as one group: they differ at {shown}, "
                "which the students of a group share (one loader, one teacher forward per step). Only the student "
                "side may differ inside a group (kdrun/runtime/sharing.py STUDENT_SIDE); run them in separate groups.")


def run_group(group: Group) -> None:
    """The group once its run directories are this process's: fit → build → restore → (the runs start) →
    loop → results, each member's result in ``member.result``."""
    lead = group.alive()[0]
    trainer, seed = lead.settings.trainer, lead.settings.seed
    device = pick_device(trainer.accelerator)
    set_backend_flags(trainer, device)
    if device.type == "cuda":  # every random state the build captures holds the CUDA generator's too
        torch.cuda.init()
    fitted = fit_missing_teacher(lead.cfg)  # the teacher is data side: the same for every member
    if fitted is not None:
        for m in group.alive():
            m.result = stopped_in_fit(fitted, m.run_dir)
        return
    loaders = build_group(group, device, seed)
    try:
        if restore_group(group, seed):
            start_group(group, loaders, seed)
            if group.alive():
                finish_group(group, GroupLoop(group, loaders, seed, trainer).run())
    finally:
        close_loaders(loaders)


def build_group(group: Group, device: Any, seed: int) -> Loaders:
    """The teacher side and the loaders once; each member's own parts from the random states a run alone
    builds them from (module doc). A member whose build fails is dropped."""
    members = group.alive()
    lead = members[0]
    side = build_teacher_side(lead.cfg, lead.settings.trainer, device, seed)
    after_teacher = RandomState.capture()
    assert side.after_data is not None
    for m in members:
        with group.guard(m):
            side.after_data.restore()
            task, distill, weights = build_terms(m.cfg)
            after_teacher.restore()
            m.side = TeacherSide(side.data, task, distill, weights, side.teacher)
            m.start = start_student(m.cfg, m.settings.trainer, m.side, device)
            m.stream = OwnStream()
    group.agree()
    aux = any(m.start.balancer.needs_aux_batch for m in group.alive() if m.start is not None)
    loaders, cache = build_loaders(lead.cfg, lead.settings.trainer, side, device, seed, aux=aux)
    group.each(lambda m: setattr(m, "parts", finish_student(m.cfg, m.settings.trainer, device, seed, m.side,
                                                              m.start, loaders, cache)))
    return loaders


def restore_group(group: Group, seed: int) -> bool:
    """Each member's checkpoint (``trainer.resume``) on its own stream. The students train in lockstep, so
    a member whose checkpoint is at another step than the group's (the most advanced one) is refused. A
    group that is finished is left as it was (each result says so). False: nothing left to train."""
    def restore(m: Member) -> None:
        m.ckpt = make_checkpointer(m.parts, m.cfg, m.run_dir)
        m.restored = restore_run(m.ckpt, m.settings.trainer, seed)
        m.state = m.restored or TrainState()

    group.each(restore)
    alive = group.alive()
    if not alive:
        return False
    at = max(alive, key=lambda m: m.state.step)
    for m in alive:
        if (m.state.step, m.state.epoch, m.state.epoch_step) != (at.state.step, at.state.epoch, at.state.epoch_step):
            m.refuse(f"The job in {m.run_dir} is at step {m.state.step} (epoch {m.state.epoch}), the others of its "
                     f"group at step {at.state.step} (epoch {at.state.epoch}): the students of a group train in "
                     "lockstep, so it cannot rejoin them. Train it alone (without hydra/launcher=kdrun_shared) with "
                     "trainer.resume=auto to continue it.", group.console)
    for m in alive:
        finished = finished_run(m.state, m.settings.trainer, m.run_dir) if m.restored is not None and m.alive else None
        if finished is not None:
            m.result = finished
    return bool(group.alive())


def start_group(group: Group, loaders: Loaders, seed: int) -> None:
    """The runs start (their directories are written from here on): logger, step and loop per member, then
    the teacher's val metrics, measured once for all."""
    aux = SharedAux(loaders, group.alive()[0].parts.trainer.batch_size, seed)

    def start(m: Member) -> None:
        logger = make_logger(m.cfg, m.run_dir, m.restored)  # first: a tracker that cannot start fails before the run's files
        if distributed.is_main():
            start_run(m.run_dir, m.cfg, m.record, group.console.logs[m.index])
        step = make_step(m.parts, m.cfg, m.state, aux.draws(m.state) if m.parts.balancer.needs_aux_batch else None)
        m.loop = Loop(m.parts, step, m.state, m.ckpt, logger, m.run_dir, m.cfg.logger.progress)

    group.each(start)
    measured: dict[str, Any] = {"metrics": None, "by": None}

    def teacher(m: Member) -> None:
        fresh = not m.state.teacher_metrics
        if fresh and measured["by"] is not None:
            copy_teacher_detections(measured["by"], m.run_dir)
        metrics = measure_teacher(m.parts, m.loop, measured["metrics"])
        if fresh and measured["by"] is None:
            measured["by"] = m.run_dir
        measured["metrics"] = measured["metrics"] or metrics

    group.each(teacher)


def copy_teacher_detections(source: Path, run_dir: Path) -> None:
    """A detection teacher's val detections, written once by the member that measured it, into another
    member's run directory (each run keeps its own copy)."""
    path = source / "teacher_val_detections.json"
    if distributed.is_main() and path.is_file():
        shutil.copy2(path, run_dir / path.name)


def finish_group(group: Group, preempt: preemption.Preemption) -> None:
    """After the loop: each surviving member's results.json, or, after a stop signal, its last.pt and
    marker; then the handler that was there before ours (once for the group)."""
    if preempt.agreed:
        group.each(lambda m: setattr(m, "result", m.loop.save_stopped()))
        preempt.chain()
        return
    group.each(lambda m: setattr(m, "result", write_results(m.parts, m.loop, m.cfg, m.run_dir)))

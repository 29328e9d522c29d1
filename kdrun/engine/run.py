"""``train(cfg, run_dir)``: validate → (fit a missing teacher) → build → restore → loop → results."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from kdrun import distributed as D
from kdrun import preemption as P
from kdrun.checkpoint import Checkpointer, TrainState
from kdrun.config import TrainerConfig, validate
from kdrun.console_log import ConsoleLog
from kdrun.data.loaders import AuxStream, close_loaders
from kdrun.engine.build import Parts, build
from kdrun.engine.loop import Loop
from kdrun.engine.runtime import git_commit, pick_device, seed_everything, set_backend_flags
from kdrun.engine.step import KDStep, StepSettings
from kdrun.engine.teacher import check_teacher_weights, fit_teacher, needs_fit
from kdrun.logger import RunLogger
from kdrun.rundir import RunDirError, RunLock, check_fresh, check_usable
from kdrun.run_guard import write_record


def train(cfg: DictConfig, run_dir: Path, record: dict[str, str] | None = None) -> dict[str, Any]:
    """Validate ``cfg``, build everything, train, and return the results (also in results.json).

    Before anything is written into ``run_dir`` (teacher fit, logger, config.yaml), the main rank applies
    the run-directory rules of :mod:`kdrun.rundir` (a fresh run needs an empty directory; one writer per
    directory: the lock is held until this function returns or raises); a refusal there fails every rank.
    Nothing is written into ``run_dir`` until the run starts (:func:`start_run`: after the build and the
    restore of a checkpoint succeeded), so a refused or failed command leaves an existing run as it was.
    ``record``: files (relative path → text) written then too, e.g. Hydra's ``.hydra/`` record
    (:func:`kdrun.run_guard.hydra_record`). A run that is already finished is left untouched: the result
    is ``{"finished": True, ...}``."""
    cfg = copy.deepcopy(cfg)
    validate(cfg)
    t = TrainerConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))  # validated above
    P.parse_signals(t.preempt_signals)  # a bad signal name fails now, not at the first step
    run_dir = Path(run_dir)
    lock = protect(run_dir, t.resume, t.overwrite)
    try:
        with ConsoleLog(run_dir, enabled=D.is_main()) as console:  # cli.log, from the run's start on
            return _train(cfg, t, run_dir, lambda: start_run(run_dir, cfg, record or {}, console))
    finally:
        if lock is not None:
            lock.release()


def start_run(run_dir: Path, cfg: DictConfig, record: dict[str, str], console: ConsoleLog) -> None:
    """The run starts (main rank): from here on it writes into its directory. The stop marker of an
    earlier session goes, the config (``config.yaml``, ``.hydra/``) is recorded, and ``cli.log`` starts
    with what the console showed so far."""
    P.clear_marker(run_dir)
    write_record(run_dir, {**record, "config.yaml": OmegaConf.to_yaml(cfg)})
    console.start()


def finished_run(st: TrainState, t: TrainerConfig, run_dir: Path) -> dict[str, Any] | None:
    """``trainer.resume`` restored a run that has nothing left to do (its epochs, or ``max_steps``, are
    done): the result that says so, or None. The run's files stay as they are."""
    if st.epoch >= t.epochs:
        why = f"all {t.epochs} epochs done, step {st.step}"
    elif 0 < t.max_steps <= st.step:  # the loop's stop rule (-1: no step limit)
        why = f"trainer.max_steps={t.max_steps} reached at step {st.step}"
    else:
        return None
    return {"run_dir": str(run_dir), "finished": why, "steps": st.step, "epochs": st.epoch,
            "results": str(run_dir / "results.json")}


def protect(run_dir: Path, resume: str | None, overwrite: bool) -> RunLock | None:
    """Rank 0: check the directory is usable, take its writer lock, then apply the fresh-run rule (under
    the lock, so that two runs starting at once cannot both find the directory empty). The verdict is
    broadcast, so that a refusal on rank 0 fails every rank with the same message before any of them
    builds or writes anything. Returns the held lock (rank 0) or None."""
    lock, error, notes = None, None, []
    if D.is_main():
        try:
            check_usable(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir).acquire()
            notes = [n for n in (lock.note, check_fresh(run_dir, resume, overwrite)) if n]
        except (RunDirError, OSError) as e:  # OSError too: the other ranks wait for the verdict below
            error = str(e) if isinstance(e, RunDirError) else (
                f"The run directory {run_dir} cannot be prepared ({e}); choose another hydra.run.dir.")
            if lock is not None:
                lock.release()
                lock = None
        for n in notes:
            print(f"[kdrun] {n}", flush=True)
    error = D.broadcast_object(error)
    if error is not None:
        raise RunDirError(error)
    return lock


def _train(cfg: DictConfig, t: TrainerConfig, run_dir: Path, begin: Callable[[], None]) -> dict[str, Any]:
    """:func:`train` once the run directory is this process's: fit → build → restore → (the run starts:
    ``begin``) → loop → results."""
    main = D.is_main()
    device = pick_device(t.accelerator)
    seed = int(t.seed if t.seed is not None else cfg.get("seed", 0))
    set_backend_flags(t, device)
    fit_path = needs_fit(cfg)
    if fit_path is not None:  # a run of its own, finished before this run builds anything
        fitted = fit_teacher(cfg, fit_path, train)
        if fitted.get("preempted"):
            return stopped_in_fit(fitted, run_dir)
    check_teacher_weights(cfg)
    p = build(cfg, t, device, seed)
    checkpointer = Checkpointer(run_dir, {"trainable": p.trainable, "optimizer": p.optimizer,
                                          "scheduler": p.scheduler, "balancer": p.balancer, "scaler": p.scaler},
                                p.student.model, OmegaConf.to_yaml(cfg))
    restored = checkpointer.restore(t.resume, lambda step: seed_everything(seed + D.rank() + 1_000_003 * step))
    st = restored or TrainState()
    finished = finished_run(st, t, run_dir) if restored is not None else None
    if finished is not None:
        close_loaders(p.loaders)
        return finished
    if main:
        begin()
    logger = RunLogger(run_dir, cfg.logger.tensorboard, cfg.logger.jsonl, enabled=main,
                       resumed_at=st.step if restored is not None else None)
    loop = Loop(p, make_step(p, cfg, st), st, checkpointer, logger, run_dir, cfg.logger.progress)
    if p.teacher is not None and not st.teacher_metrics:  # measured once per run, kept in checkpoints
        st.teacher_metrics = loop.validate(p.teacher.model, "teacher_val_detections.json", p.teacher.precision)
        logger.log(0, {f"teacher/val_{k}": st.teacher_metrics[k] for k in p.task.metric_keys}, kind="teacher")
    loop.run()
    if loop.preempt.agreed:
        close_loaders(p.loaders)
        return loop.stopped()
    logger.close()
    out = results(p, loop, cfg, run_dir)
    if main:
        (run_dir / "results.json").write_text(json.dumps(json_safe(out), indent=2, allow_nan=False))
    D.barrier()
    close_loaders(p.loaders)
    return out


def stopped_in_fit(fitted: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A stop signal ended the teacher fit: the advice the CLI prints names *this* run's directory, where
    re-running the same command (or ``trainer.resume=auto``, which finds no checkpoint there yet and
    starts fresh) resumes the fit from its own ``last.pt`` (:func:`kdrun.engine.teacher.fit_config`). The
    launcher of local workers looks for the marker here too."""
    if D.is_main():
        marker = P.read_marker(Path(fitted["run_dir"]))
        if marker is not None:
            P.write_marker(run_dir, {**marker, "teacher_fit": fitted["run_dir"]})
    D.barrier()
    return {**fitted, "run_dir": str(run_dir), "teacher_fit_dir": fitted["run_dir"]}


def make_step(p: Parts, cfg: DictConfig, st: TrainState) -> KDStep:
    t = p.t
    settings = StepSettings(precision=t.precision, grad_clip=t.grad_clip, nonfinite=t.nonfinite,
                            max_nonfinite_streak=t.max_nonfinite_streak,
                            grad_feature=t.grad_feature if t.grad_space == "features" else None,
                            jacobian=t.jacobian, channels_last=t.channels_last,
                            log_every=int(cfg.logger.log_every), grad_stats_every=int(cfg.logger.grad_stats_every))
    aux = AuxStream(p.loaders, t.batch_size, p.seed, st) if p.balancer.needs_aux_batch else None
    return KDStep(model=p.model, trainable=p.trainable, teacher=p.teacher, task=p.task, groups=p.groups,
                  balancer=p.balancer, optimizer=p.optimizer, scheduler=p.scheduler, scaler=p.scaler,
                  device=p.device, settings=settings, mixup=p.data.mixup, aux=aux, skipped=st.skipped,
                  cache=p.teacher_cache)


def results(p: Parts, loop: Loop, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """results.json: final and best val metrics, the teacher's, counters, throughput, provenance."""
    task, st, last = p.task, loop.st, loop.last_val
    best = max(st.history, key=lambda h: h[task.primary_metric]) if st.history else last
    return {
        "run_dir": str(run_dir),
        "primary_metric": task.primary_metric,
        "final": {k: last[k] for k in task.metric_keys},
        "best": {**{k: best[k] for k in task.metric_keys}, "epoch": best.get("epoch"), "step": best.get("step")},
        "teacher": {k: st.teacher_metrics[k] for k in task.metric_keys} if st.teacher_metrics else None,
        "val_samples": last.get("samples"),  # every val sample once, summed over ranks
        "epochs": st.epoch, "steps": st.step, "nonfinite_skipped": st.skipped,
        # wall time of the whole run, every session since the first (kept in the checkpoints' TrainState);
        # images/s is this session's (the throughput of the hardware it ran on)
        "wall_time_s": loop.ckpt.wall_time(), "session_wall_time_s": loop.wall,
        "images_per_s": loop.images / max(loop.wall, 1e-9),
        "world_size": D.world_size(), "device": str(p.device),
        "git_commit": git_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def json_safe(obj: Any) -> Any:
    """Valid JSON: NaN and ±inf become ``null`` (``json.dumps`` would write the non-standard
    ``NaN``/``Infinity``, which strict parsers reject); other non-JSON leaves become strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)

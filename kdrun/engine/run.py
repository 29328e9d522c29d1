"""``train(cfg, run_dir)``: validate → (fit a missing teacher) → build → restore → loop → results."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from kdrun.runtime import distributed
from kdrun.runtime import preemption
from kdrun.runtime.checkpoint import Checkpointer, TrainState
from kdrun.config import RunSettings, TrainerConfig, validate
from kdrun.runtime.console_log import ConsoleLog
from kdrun.data.loaders import AuxStream, close_loaders
from kdrun.engine.build import Parts, build
from kdrun.engine.ema import ema_metrics
from kdrun.engine.loop import Loop
from kdrun.engine.environment import git_commit, pick_device, seed_everything, set_backend_flags
from kdrun.engine.step import KDStep, StepSettings
from kdrun.engine.streams import aux_draws
from kdrun.engine.teacher import check_teacher_weights, fit_teacher, needs_fit
from kdrun.runtime.log_backends import check_backends
from kdrun.runtime.logger import RunLogger
from kdrun.runtime.rundir import RunDirError, RunLock, check_fresh, check_usable
from kdrun.runtime.run_guard import write_record


def train(cfg: DictConfig, run_dir: Path, record: dict[str, str] | None = None) -> dict[str, Any]:
    """Validate ``cfg``, build everything, train, and return the results (also in results.json).

    Before anything is written into ``run_dir`` (teacher fit, logger, config.yaml), the main rank applies
    the run-directory rules of :mod:`kdrun.runtime.rundir` (a fresh run needs an empty directory; one writer per
    directory: the lock is held until this function returns or raises); a refusal there fails every rank.
    Nothing is written into ``run_dir`` until the run starts (:func:`start_run`: after the build and the
    restore of a checkpoint succeeded), so a refused or failed command leaves an existing run as it was.
    ``record``: files (relative path → text) written then too, e.g. Hydra's ``.hydra/`` record
    (:func:`kdrun.runtime.run_guard.hydra_record`). A run that is already finished is left untouched: the result
    is ``{"finished": True, ...}``."""
    cfg = copy.deepcopy(cfg)
    settings = validate(cfg)
    check_backends(settings.logger.backends)  # a missing extra fails here, before anything is written
    trainer = settings.trainer
    preemption.parse_signals(trainer.preempt_signals)  # a bad signal name fails now, not at the first step
    run_dir = Path(run_dir)
    lock = protect(run_dir, trainer.resume, trainer.overwrite)
    try:
        with ConsoleLog(run_dir, enabled=distributed.is_main()) as console:  # cli.log, from the run's start on
            return _train(cfg, settings, run_dir, lambda: start_run(run_dir, cfg, record or {}, console))
    finally:
        if lock is not None:
            lock.release()


def start_run(run_dir: Path, cfg: DictConfig, record: dict[str, str], console: ConsoleLog) -> None:
    """The run starts (main rank): from here on it writes into its directory. The stop marker of an
    earlier session goes, the config (``config.yaml``, ``.hydra/``) is recorded, and ``cli.log`` starts
    with what the console showed so far."""
    preemption.clear_marker(run_dir)
    write_record(run_dir, {**record, "config.yaml": OmegaConf.to_yaml(cfg)})
    console.start()


def finished_run(state: TrainState, trainer: TrainerConfig, run_dir: Path) -> dict[str, Any] | None:
    """``trainer.resume`` restored a run that has nothing left to do (its epochs, or ``max_steps``, are
    done): the result that says so, or None. The run's files stay as they are."""
    if state.epoch >= trainer.epochs:
        why = f"all {trainer.epochs} epochs done, step {state.step}"
    elif 0 < trainer.max_steps <= state.step:  # the loop's stop rule (-1: no step limit)
        why = f"trainer.max_steps={trainer.max_steps} reached at step {state.step}"
    else:
        return None
    return {"run_dir": str(run_dir), "finished": why, "steps": state.step, "epochs": state.epoch,
            "results": str(run_dir / "results.json")}


def protect(run_dir: Path, resume: str | None, overwrite: bool) -> RunLock | None:
    """Rank 0: check the directory is usable, take its writer lock, then apply the fresh-run rule (under
    the lock, so that two runs starting at once cannot both find the directory empty). The verdict is
    broadcast, so that a refusal on rank 0 fails every rank with the same message before any of them
    builds or writes anything. Returns the held lock (rank 0) or None."""
    lock, error, notes = None, None, []
    if distributed.is_main():
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
    error = distributed.broadcast_object(error)
    if error is not None:
        raise RunDirError(error)
    return lock


def _train(cfg: DictConfig, settings: RunSettings, run_dir: Path, begin: Callable[[], None]) -> dict[str, Any]:
    """:func:`train` once the run directory is this process's: fit → build → restore → (the run starts:
    ``begin``) → loop → results."""
    main = distributed.is_main()
    trainer, seed = settings.trainer, settings.seed
    device = pick_device(trainer.accelerator)
    set_backend_flags(trainer, device)
    fitted = fit_missing_teacher(cfg)
    if fitted is not None:
        return stopped_in_fit(fitted, run_dir)
    parts = build(cfg, trainer, device, seed)
    checkpointer = make_checkpointer(parts, cfg, run_dir)
    restored = restore_run(checkpointer, trainer, seed)
    state = restored or TrainState()
    finished = finished_run(state, trainer, run_dir) if restored is not None else None
    if finished is not None:
        close_loaders(parts.loaders)
        return finished
    logger = make_logger(cfg, run_dir, restored)  # first: a tracker that cannot start fails before the run's files
    if main:
        begin()
    loop = Loop(parts, make_step(parts, cfg, state), state, checkpointer, logger, run_dir, cfg.logger.progress)
    measure_teacher(parts, loop)
    loop.run()
    if loop.preempt.agreed:
        close_loaders(parts.loaders)
        return loop.stopped()
    out = write_results(parts, loop, cfg, run_dir)
    close_loaders(parts.loaders)
    return out


def fit_missing_teacher(cfg: DictConfig) -> dict[str, Any] | None:
    """Fit a missing teacher (a run of its own, finished before this run builds anything), then refuse a
    random one. The fit's results when a stop signal ended it, else None."""
    fit_path = needs_fit(cfg)
    if fit_path is not None:
        fitted = fit_teacher(cfg, fit_path, train)
        if fitted.get("preempted"):
            return fitted
    check_teacher_weights(cfg)
    return None


def make_checkpointer(parts: Parts, cfg: DictConfig, run_dir: Path) -> Checkpointer:
    return Checkpointer(run_dir, {"trainable": parts.trainable, "optimizer": parts.optimizer,
                                  "scheduler": parts.scheduler, "balancer": parts.balancer, "scaler": parts.scaler},
                        parts.student.model, OmegaConf.to_yaml(cfg), ema=parts.ema)


def restore_run(checkpointer: Checkpointer, trainer: TrainerConfig, seed: int) -> TrainState | None:
    """``trainer.resume`` into the parts (and the global random state); None: a fresh run."""
    return checkpointer.restore(trainer.resume, lambda step: seed_everything(seed + distributed.rank() + 1_000_003 * step))


def make_logger(cfg: DictConfig, run_dir: Path, restored: TrainState | None) -> RunLogger:
    return RunLogger(run_dir, list(cfg.logger.backends), cfg.logger.jsonl, enabled=distributed.is_main(),
                     resumed_at=restored.step if restored is not None else None,
                     config=OmegaConf.to_container(cfg, resolve=True), group=cfg.logger.group)


def measure_teacher(parts: Parts, loop: Loop, measured: dict[str, float] | None = None) -> dict[str, float] | None:
    """The teacher's val metrics, measured once per run (kept in the checkpoints) and logged; ``measured``:
    already measured (a group's students share the teacher). Returns them."""
    state = loop.state
    if parts.teacher is not None and not state.teacher_metrics:
        state.teacher_metrics = measured or loop.validate(parts.teacher.model, "teacher_val_detections.json",
                                                          parts.teacher.precision)
        loop.logger.log(0, {f"teacher/val_{k}": state.teacher_metrics[k] for k in parts.task.metric_keys},
                        kind="teacher")
    return state.teacher_metrics or None


def write_results(parts: Parts, loop: Loop, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The end of a finished run: the logger closed, results.json written (main rank), every rank past it."""
    loop.logger.close()
    out = results(parts, loop, cfg, run_dir)
    if distributed.is_main():
        (run_dir / "results.json").write_text(json.dumps(json_safe(out), indent=2, allow_nan=False))
    distributed.barrier()
    return out


def stopped_in_fit(fitted: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A stop signal ended the teacher fit: the advice the CLI prints names *this* run's directory, where
    re-running the same command (or ``trainer.resume=auto``, which finds no checkpoint there yet and
    starts fresh) resumes the fit from its own ``last.pt`` (:func:`kdrun.engine.teacher.fit_config`). The
    launcher of local workers looks for the marker here too."""
    if distributed.is_main():
        marker = preemption.read_marker(Path(fitted["run_dir"]))
        if marker is not None:
            preemption.write_marker(run_dir, {**marker, "teacher_fit": fitted["run_dir"]})
    distributed.barrier()
    return {**fitted, "run_dir": str(run_dir), "teacher_fit_dir": fitted["run_dir"]}


def make_step(parts: Parts, cfg: DictConfig, state: TrainState, aux: Callable[[], Any] | None = None) -> KDStep:
    """The run's step; ``aux``: the auxiliary batches to draw from (a group's shared ones; default: the
    run's own :class:`AuxStream`, when the balancer needs one)."""
    trainer = parts.trainer
    settings = StepSettings(precision=trainer.precision, grad_clip=trainer.grad_clip, nonfinite=trainer.nonfinite,
                            max_nonfinite_streak=trainer.max_nonfinite_streak,
                            grad_feature=trainer.grad_feature if trainer.grad_space == "features" else None,
                            jacobian=trainer.jacobian, channels_last=trainer.channels_last,
                            log_every=int(cfg.logger.log_every), grad_stats_every=int(cfg.logger.grad_stats_every))
    if parts.balancer.needs_aux_batch and aux is None:
        aux = aux_draws(AuxStream(parts.loaders, trainer.batch_size, parts.seed, state), parts.seed, state)
    return KDStep(model=parts.model, trainable=parts.trainable, teacher=parts.teacher, task=parts.task, groups=parts.groups,
                  balancer=parts.balancer, optimizer=parts.optimizer, scheduler=parts.scheduler, scaler=parts.scaler,
                  device=parts.device, settings=settings, mixup=parts.data.mixup, aux=aux, skipped=state.skipped,
                  cache=parts.teacher_cache, ema=parts.ema)


def results(parts: Parts, loop: Loop, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """results.json: final and best val metrics, the teacher's, counters, throughput, provenance."""
    task, state, last = parts.task, loop.state, loop.last_val
    best = max(state.history, key=lambda h: h[task.primary_metric]) if state.history else last
    return {
        "run_dir": str(run_dir),
        "primary_metric": task.primary_metric,
        "final": {k: last[k] for k in task.metric_keys},
        "best": {**{k: best[k] for k in task.metric_keys}, "epoch": best.get("epoch"), "step": best.get("step")},
        "teacher": {k: state.teacher_metrics[k] for k in task.metric_keys} if state.teacher_metrics else None,
        "ema": ema_results(parts, loop),
        "val_samples": last.get("samples"),  # every val sample once, summed over ranks
        "epochs": state.epoch, "steps": state.step, "nonfinite_skipped": state.skipped,
        # wall time of the whole run, every session since the first (kept in the checkpoints' TrainState);
        # images/s is this session's (the throughput of the hardware it ran on)
        "wall_time_s": loop.ckpt.wall_time(), "session_wall_time_s": loop.wall,
        "images_per_s": loop.images / max(loop.wall, 1e-9),
        "world_size": distributed.world_size(), "device": str(parts.device),
        "git_commit": git_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def ema_results(parts: Parts, loop: Loop) -> dict[str, Any] | None:
    """results.json's ``ema`` (``None`` without ``trainer.ema``): the EMA's final val metrics, its best epoch's
    (by the task's primary metric, over the evaluations that had an EMA), its settings and update count."""
    settings = parts.trainer.ema
    if parts.ema is None or settings is None or not loop.ema_val:
        return None
    keys, primary = parts.task.metric_keys, f"ema_{parts.task.primary_metric}"
    rows = [h for h in loop.state.history if primary in h] or [ema_metrics(loop.ema_val, keys)]
    best = max(rows, key=lambda h: h[primary])
    return {"final": {k: loop.ema_val[k] for k in keys},
            "best": {**{k: best[f"ema_{k}"] for k in keys}, "epoch": best.get("epoch"), "step": best.get("step")},
            "decay": settings.decay, "warmup": settings.warmup, "updates": parts.ema.updates}


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

"""``train(cfg, run_dir)``: validate → (fit a missing teacher) → build → restore → loop → results."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdrun import distributed as D
from kdrun import preemption as P
from kdrun.checkpoint import Checkpointer, TrainState
from kdrun.config import TrainerConfig, validate
from kdrun.data.loaders import AuxStream, close_loaders
from kdrun.engine.build import Parts, build
from kdrun.engine.loop import Loop
from kdrun.engine.runtime import git_commit, pick_device, seed_everything, set_backend_flags
from kdrun.engine.step import KDStep, StepSettings
from kdrun.engine.teacher import fit_teacher, needs_fit
from kdrun.logger import RunLogger


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Validate ``cfg``, build everything, train, and return the results (also in results.json)."""
    cfg = copy.deepcopy(cfg)
    validate(cfg)
    t = TrainerConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))  # validated above
    P.parse_signals(t.preempt_signals)  # a bad signal name fails now, not at the first step
    run_dir, main = Path(run_dir), D.is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(t.accelerator)
    seed = int(t.seed if t.seed is not None else cfg.get("seed", 0))
    set_backend_flags(t, device)
    fit_path = needs_fit(cfg)
    if fit_path is not None:  # a run of its own, finished before this run builds anything
        fitted = fit_teacher(cfg, fit_path, train)
        if fitted.get("preempted"):
            return fitted
    p = build(cfg, t, device, seed)
    checkpointer = Checkpointer(run_dir, {"trainable": p.trainable, "optimizer": p.optimizer,
                                          "scheduler": p.scheduler, "balancer": p.balancer, "scaler": p.scaler},
                                p.student.model, OmegaConf.to_yaml(cfg))
    restored = checkpointer.restore(t.resume, lambda step: seed_everything(seed + D.rank() + 1_000_003 * step))
    st = restored or TrainState()
    if main:
        P.clear_marker(run_dir)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    logger = RunLogger(run_dir, cfg.logger.tensorboard, cfg.logger.jsonl, enabled=main,
                       purge_step=st.step if restored is not None else None)
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


def make_step(p: Parts, cfg: DictConfig, st: TrainState) -> KDStep:
    t = p.t
    settings = StepSettings(precision=t.precision, grad_clip=t.grad_clip, nonfinite=t.nonfinite,
                            grad_feature=t.grad_feature if t.grad_space == "features" else None,
                            jacobian=t.jacobian, channels_last=t.channels_last,
                            log_every=int(cfg.logger.log_every), grad_stats_every=int(cfg.logger.grad_stats_every))
    aux = AuxStream(p.loaders, t.batch_size, p.seed, st) if p.balancer.needs_aux_batch else None
    return KDStep(model=p.model, trainable=p.trainable, teacher=p.teacher, task=p.task, groups=p.groups,
                  balancer=p.balancer, optimizer=p.optimizer, scheduler=p.scheduler, scaler=p.scaler,
                  device=p.device, settings=settings, mixup=p.data.mixup, aux=aux, skipped=st.skipped)


def results(p: Parts, loop: Loop, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """results.json: final and best val metrics, the teacher's, counters, throughput, provenance."""
    task, st, last = p.task, loop.st, loop.last_val
    best = max(st.history, key=lambda h: h[task.primary_metric]) if st.history else last
    return {
        "run_dir": str(run_dir),
        "primary_metric": task.primary_metric,
        "final": {k: last[k] for k in task.metric_keys},
        "best": {**{k: best[k] for k in task.metric_keys}, "epoch": best.get("epoch")},
        "teacher": {k: st.teacher_metrics[k] for k in task.metric_keys} if st.teacher_metrics else None,
        "val_samples": last.get("samples"),  # every val sample once, summed over ranks
        "epochs": st.epoch, "steps": st.step, "nonfinite_skipped": st.skipped,
        "wall_time_s": loop.wall, "images_per_s": loop.images / max(loop.wall, 1e-9),
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

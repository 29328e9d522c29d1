"""Everything a run is made of, built from a validated config: :class:`Parts` and one builder per part.

The order matters for reproducibility and is kept fixed: every rank builds from the same seed (a
teacher without a checkpoint, projectors and balancer state must agree across ranks; DDP would only
broadcast the Trainable), and the per-rank random stream (seed + rank: dropout, drop-path, the model
side's draws; the data side has its own streams, :mod:`kdrun.engine.streams`) starts after building
(:func:`build`).
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from kdrun.runtime import distributed
from kdrun.balancers.base import Balancer
from kdrun.config import TrainerConfig, teacher_cache_config
from kdrun.data.base import DataModule
from kdrun.data.loaders import Loaders, collate_fn, make_loaders
from kdrun.engine.ema import StudentEma
from kdrun.engine.environment import seed_everything, sync_batchnorm
from kdrun.engine.streams import RandomState
from kdrun.engine.teacher import Teacher, teacher_load_error
from kdrun.engine.trainable import Trainable, freeze_bn_stats
from kdrun.losses.base import DataInfo, DistillLoss
from kdrun.models.build import CheckpointError, build_model
from kdrun.models.taps import ModelOutput, Tapped
from kdrun.teacher_cache import TeacherCache
from kdrun.teacher_cache.orchestrate import build_teacher_cache


@dataclass
class Parts:
    """The built run. ``model`` is what the forward calls (``trainable``, DDP-wrapped and/or compiled)."""

    trainer: TrainerConfig
    device: torch.device
    seed: int
    data: DataModule
    task: Any
    teacher: Teacher | None
    student: Tapped
    trainable: Trainable
    model: nn.Module
    groups: dict[str, list[str]]
    balancer: Balancer
    loaders: Loaders
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    total_steps: int
    teacher_cache: TeacherCache | None = None  # teacher.cache: the step reads outputs instead of the teacher
    ema: StudentEma | None = None  # trainer.ema: the student's weight EMA (kdrun.engine.ema)


def build_distill(cfg: DictConfig) -> tuple[dict[str, DistillLoss], dict[str, float]]:
    """The loss terms (``distill``: name → node) and their ``weight`` (default 1; not a term argument)."""
    nodes = dict(cfg.get("distill") or {})
    weights = {k: float(v.get("weight", 1.0)) for k, v in nodes.items()}
    distill: dict[str, DistillLoss] = {}
    for name, node in nodes.items():
        node = copy.deepcopy(node)
        OmegaConf.set_struct(node, False)
        node.pop("weight", None)
        distill[name] = instantiate(node, _convert_="all")
    return distill, weights


def build_teacher(cfg: DictConfig, trainer: TrainerConfig, distill: dict[str, DistillLoss],
                  device: torch.device) -> Teacher | None:
    """The frozen, tapped teacher (``None`` without ``teacher``), with the taps the terms read."""
    if cfg.get("teacher") is None:
        return None
    try:
        bare = build_model(cfg.teacher)
    except CheckpointError as e:  # says teacher.checkpoint; a damaged cached teacher: the file to delete
        raise teacher_load_error(cfg, e) from None
    model = Tapped(bare, [tp for d in distill.values() for tp in d.teacher_taps])
    model.to(device)
    if trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    return Teacher(model, device, trainer.precision if trainer.teacher_precision == "same" else trainer.teacher_precision)


@dataclass
class TeacherSide:
    """The start of every build: the parts the teacher's outputs depend on (its weights, when it has no
    checkpoint, are drawn from the seed after the data, the task and the loss terms; its taps come from the
    terms), built in :func:`build`'s order. ``kdrun cache-teacher`` builds exactly this, so the cache key it
    computes is the run's."""

    data: DataModule
    task: Any
    distill: dict[str, DistillLoss]
    weights: dict[str, float]
    teacher: Teacher | None
    after_data: RandomState | None = None  # the global RNG after the data set: a group's students build their task and terms from it


def build_terms(cfg: DictConfig) -> tuple[Any, dict[str, DistillLoss], dict[str, float]]:
    """The task and the loss terms with their weights, in the build's order."""
    task = instantiate(cfg.task, _convert_="all")
    distill, weights = build_distill(cfg)
    return task, distill, weights


def build_teacher_side(cfg: DictConfig, trainer: TrainerConfig, device: torch.device, seed: int) -> TeacherSide:
    """Seed, then data, task, loss terms and the frozen teacher, in the order every build uses. The
    teacher's cache is opened later by the caller (:mod:`kdrun.teacher_cache.orchestrate`): a run keys it on
    its train loader's data set, and those loaders need parts built after this (the balancer)."""
    seed_everything(seed)
    data: DataModule = instantiate(cfg.dataset, _convert_="all")
    after_data = RandomState.capture()
    task, distill, weights = build_terms(cfg)
    teacher = build_teacher(cfg, trainer, distill, device)
    return TeacherSide(data, task, distill, weights, teacher, after_data)


def build_student(cfg: DictConfig, trainer: TrainerConfig, distill: dict[str, DistillLoss],
                  device: torch.device) -> Tapped:
    taps = [tp for d in distill.values() for tp in d.student_taps]
    student = Tapped(build_model(cfg.student), taps + ([trainer.grad_feature] if trainer.grad_space == "features" else []))
    student.to(device)
    if trainer.channels_last:
        student.to(memory_format=torch.channels_last)
    return student


def shapes(out: ModelOutput) -> dict[str, torch.Size]:
    return {"logits": out.logits.shape[1:], **{k: v.shape[1:] for k, v in out.features.items()}}


def setup_terms(distill: dict[str, DistillLoss], data: DataModule, task: Any, student: Tapped,
                teacher: Teacher | None, steps_per_epoch: int, device: torch.device) -> None:
    """``bind`` every term to the training data, then ``setup`` it from a probe forward on one batch,
    so that shape-dependent modules (projectors) exist before the optimiser and DDP see the parameters."""
    if not distill:
        return
    info = DataInfo(num_data=len(data.train), steps_per_epoch=steps_per_epoch,  # type: ignore[arg-type]
                    labels=data.train_labels())
    probe = DataLoader(data.train, batch_size=2, collate_fn=collate_fn(data, task))
    x0, _, _ = task.batch_to_device(next(iter(probe)), device)
    with torch.no_grad():
        restore = freeze_bn_stats(student)
        s0 = student(x0)
        restore()
    assert teacher is not None, "config validation lets distill terms through only with a teacher"
    t0 = teacher(x0)
    for d in distill.values():
        d.bind(info)
        d.bind_teacher(teacher.model.model)  # the frozen network itself (OFD's margin reads its BatchNorms)
        d.setup(shapes(s0), shapes(t0))


def build_trainable(distill: dict[str, DistillLoss], weights: dict[str, float], data: DataModule, task: Any,
                    student: Tapped, teacher: Teacher | None, steps_per_epoch: int,
                    device: torch.device) -> Trainable:
    """What DDP wraps: the student and the loss terms, every term bound and set up first (:func:`setup_terms`),
    so that the optimiser sees the projectors' parameters."""
    setup_terms(distill, data, task, student, teacher, steps_per_epoch, device)
    return Trainable(student, distill, weights, task).to(device)


def wrap(trainable: Trainable, trainer: TrainerConfig, device: torch.device) -> nn.Module:
    """SyncBatchNorm and DDP (only the Trainable: the frozen teacher never is), then torch.compile."""
    model: nn.Module = trainable
    if distributed.is_dist():
        from torch.nn.parallel import DistributedDataParallel as DDP

        # No buffer sync in forward: BatchNorm statistics stay per rank (use SyncBatchNorm to share
        # them) and large loss buffers (CRD's memory bank) are not re-sent every step. (Newer torch
        # spells it forward_sync_buffers; its one sync at construction is harmless, since every rank
        # built the same buffers from the same seed.)
        sync_kw = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                   else {"broadcast_buffers": False})
        model = DDP(trainable, device_ids=[device.index] if device.type == "cuda" else None, **sync_kw)
    if trainer.compile:
        model = torch.compile(model)
    return model


def build(cfg: DictConfig, trainer: TrainerConfig, device: torch.device, seed: int) -> Parts:
    """Build every part in a fixed order from ``seed``; the per-rank stream starts at the end. (A group,
    :mod:`kdrun.engine.group`, builds the teacher side and the loaders once and each student in this order
    from the same random state.)"""
    side = build_teacher_side(cfg, trainer, device, seed)
    start = start_student(cfg, trainer, side, device)
    loaders, cache = build_loaders(cfg, trainer, side, device, seed, aux=start.balancer.needs_aux_batch)
    return finish_student(cfg, trainer, device, seed, side, start, loaders, cache)


@dataclass
class StudentStart:
    """What a student's build makes before the loaders: the model, its objectives and its balancer."""

    student: Tapped
    groups: dict[str, list[str]]
    balancer: Balancer


def start_student(cfg: DictConfig, trainer: TrainerConfig, side: TeacherSide, device: torch.device) -> StudentStart:
    student = build_student(cfg, trainer, side.distill, device)
    groups = side.task.objective_groups(side.distill)
    balancer: Balancer = instantiate(cfg.balancer, _convert_="all")
    balancer.bind(tuple(groups))
    balancer.to(device)
    return StudentStart(student, groups, balancer)


def build_loaders(cfg: DictConfig, trainer: TrainerConfig, side: TeacherSide, device: torch.device, seed: int,
                  aux: bool) -> tuple[Loaders, TeacherCache | None]:
    """The loaders (``aux``: with the auxiliary one) and the teacher-output cache; they draw no global
    random numbers."""
    teacher = side.teacher
    caching = teacher is not None and teacher_cache_config(cfg) is not None
    loaders = make_loaders(side.data, trainer, seed, device, aux=aux,
                           with_index=any(d.needs_index for d in side.distill.values()), task=side.task, views=caching)
    # Off the global RNG stream: a run that fills the cache trains on the same random numbers as one
    # that finds it filled (and as the live-teacher run).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        cache = build_teacher_cache(cfg, trainer, side.data, teacher, loaders.train.dataset, device,
                                    progress=bool(cfg.logger.get("progress", False))) if caching else None
    return loaders, cache


def finish_student(cfg: DictConfig, trainer: TrainerConfig, device: torch.device, seed: int, side: TeacherSide,
                   start: StudentStart, loaders: Loaders, cache: TeacherCache | None) -> Parts:
    """The rest of a student's build (terms set up, DDP, optimiser, schedule), then the per-rank stream."""
    data, task, distill, weights, teacher = side.data, side.task, side.distill, side.weights, side.teacher
    student, groups, balancer = start.student, start.groups, start.balancer
    steps_per_epoch = len(loaders.train)
    planned = steps_per_epoch * trainer.epochs
    total_steps = planned if trainer.max_steps < 0 else min(trainer.max_steps, planned)
    balancer.set_total_steps(total_steps)
    trainable = build_trainable(distill, weights, data, task, student, teacher, steps_per_epoch, device)
    if distributed.is_dist() and trainer.sync_batchnorm:
        trainable = sync_batchnorm(trainable, device)  # type: ignore[assignment]
    # The EMA copies the bare student (on its device, SyncBatchNorm already in place) before DDP/compile wrap it.
    ema = StudentEma(trainable.student, trainer.ema) if trainer.ema is not None else None
    model = wrap(trainable, trainer, device)
    optimizer = instantiate(cfg.optimizer)(trainable)
    scheduler = instantiate(cfg.scheduler)(optimizer, steps_per_epoch=steps_per_epoch, epochs=trainer.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=trainer.precision == "fp16")
    seed_everything(seed + distributed.rank())
    return Parts(trainer, device, seed, data, task, teacher, student, trainable, model, groups, balancer, loaders,
                 optimizer, scheduler, scaler, steps_per_epoch, total_steps, cache, ema)

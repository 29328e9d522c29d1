"""Everything a run is made of, built from a validated config: :class:`Parts` and one builder per part.

The order matters for reproducibility and is kept fixed: every rank builds from the same seed (a
teacher without a checkpoint, projectors and balancer state must agree across ranks; DDP would only
broadcast the Trainable), and the per-rank random stream (seed + rank: augmentation, dropout) starts
after building (:func:`build`).
"""
from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from kdrun import distributed as D
from kdrun.balancers.base import Balancer
from kdrun.config import TeacherCacheConfig, TrainerConfig, teacher_cache_config, warn_once
from kdrun.data.base import DataModule
from kdrun.data.loaders import Loaders, collate_fn, make_loaders
from kdrun.engine.runtime import seed_everything, sync_batchnorm
from kdrun.engine.teacher import Teacher, teacher_load_error
from kdrun.engine.trainable import Trainable, freeze_bn_stats
from kdrun.losses.base import DataInfo, DistillLoss
from kdrun.models.build import CheckpointError, build_model
from kdrun.models.taps import ModelOutput, Tapped
from kdrun.teacher_cache import (CacheBuilder, CacheBusy, CacheError, TeacherCache, cache_state, default_dir,
                                 make_key, refuse_mixup, wait_for_fill)


@dataclass
class Parts:
    """The built run. ``model`` is what the forward calls (``trainable``, DDP-wrapped and/or compiled)."""

    t: TrainerConfig
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


def build_teacher(cfg: DictConfig, t: TrainerConfig, distill: dict[str, DistillLoss],
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
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    return Teacher(model, device, t.precision if t.teacher_precision == "same" else t.teacher_precision)


def build_student(cfg: DictConfig, t: TrainerConfig, distill: dict[str, DistillLoss],
                  device: torch.device) -> Tapped:
    taps = [tp for d in distill.values() for tp in d.student_taps]
    student = Tapped(build_model(cfg.student), taps + ([t.grad_feature] if t.grad_space == "features" else []))
    student.to(device)
    if t.channels_last:
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


def cache_root(conf: TeacherCacheConfig) -> str:
    """``teacher.cache.dir``, by default ``$KDRUN_CACHE/teacher_outputs`` (``~/.cache/kdrun`` without it)."""
    return conf.dir or os.path.join(os.environ.get("KDRUN_CACHE", "~/.cache/kdrun"), "teacher_outputs")


def cache_compute(t: TrainerConfig, teacher: Teacher, device: torch.device) -> dict[str, Any]:
    """The conditions of the live teacher call, part of the cache key (kdrun.teacher_cache module doc)."""
    return {"device": device.type, "precision": teacher.precision, "channels_last": bool(t.channels_last)}


def teacher_input(t: TrainerConfig, device: torch.device) -> Any:
    """What KDStep.to_device does to a batch before the teacher sees it (device, memory format)."""
    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if t.channels_last else x
    return prepare


def cache_key_and_path(cfg: DictConfig, t: TrainerConfig, conf: TeacherCacheConfig, teacher: Teacher,
                       train_set: Any, device: torch.device) -> tuple[Any, Path]:
    """The cache key of this run's teacher outputs (teacher weights and config, training data, transform,
    taps, storage dtype, call conditions) and the directory it names."""
    key = make_key(teacher.model.model, train_set, teacher.model.taps, conf.dtype,
                   cache_compute(t, teacher, device), OmegaConf.to_yaml(cfg.teacher.model, resolve=True))
    return key, default_dir(cache_root(conf), key)


def fill_cache(path: Path, key: Any, conf: TeacherCacheConfig, t: TrainerConfig, teacher: Teacher,
               train_set: Any, device: torch.device, progress: bool) -> bool:
    """Fill the cache at ``path``: rank 0 creates it, every rank fills a contiguous slice of the images,
    rank 0 checksums and moves it into place (ranks must share the file system: one node, or a shared
    ``teacher.cache.dir``). False: another process created the fill first (``CacheBusy``; every rank
    returns at once and the caller waits for it)."""
    prepare = teacher_input(t, device)
    # Every rank plans (one probe forward): a tap too large to cache fails on every rank, not only rank 0.
    specs = CacheBuilder.plan(key, train_set, teacher, prepare, int(conf.max_tap_gib * 2**30))
    builder: CacheBuilder | None = None
    if D.is_main():
        try:
            builder = CacheBuilder.create(path, key, specs)
        except CacheBusy:
            pass
    # Also the barrier between rank 0's create and the other ranks' attach.
    if not D.broadcast_object(builder is not None if D.is_main() else None):
        return False
    builder = builder or CacheBuilder.attach(path, key)
    n, r, w = len(train_set), D.rank(), D.world_size()
    per = -(-n // w)
    bs = conf.fill_batch_size or t.val_batch_size or 2 * t.batch_size
    builder.fill(teacher, train_set, bs, prepare, rows=range(min(n, r * per), min(n, (r + 1) * per)),
                 progress=progress)
    D.barrier()
    if D.is_main():
        builder.finalize({"world_size": w})
    else:
        builder.arrays.clear()
    D.barrier()
    return True


def fill_or_wait(path: Path, key: Any, conf: TeacherCacheConfig, t: TrainerConfig, teacher: Teacher,
                 train_set: Any, device: torch.device, progress: bool, fill_missing: bool) -> bool:
    """Make sure a finished cache is at ``path`` (not yet checked against ``key``): fill it when it is
    missing and ``fill_missing`` (every rank takes part), or wait while another process fills it. True:
    this process filled it."""
    # Rank 0 decides and tells the others: a rank that looked for itself could find rank 0's fresh
    # .partial, skip the fill and then fail (or leave rank 0 waiting at the fill's barrier).
    state = D.broadcast_object(cache_state(path) if D.is_main() else None)
    filled = False
    if state == "missing":
        if not fill_missing:
            raise CacheError(f"no teacher cache at {path} and teacher.cache.fill=false; build it with "
                             "`kdrun cache-teacher` (same overrides as this run) or set teacher.cache.fill=true.")
        filled = fill_cache(path, key, conf, t, teacher, train_set, device, progress)
        state = "ready" if filled else "busy"  # busy: another run of the sweep created the fill first
    if state == "busy":
        # Another process is filling it (kdrun.teacher_cache "Concurrent runs"); a killed fill is an error.
        # Every rank waits on the file system: no collective runs for as long as the other fill takes.
        wait_for_fill(path, say=(lambda m: print(m, flush=True)) if D.is_main() else None)
    return filled


def build_teacher_cache(cfg: DictConfig, t: TrainerConfig, data: DataModule, teacher: Teacher | None,
                        train_set: Any, device: torch.device, progress: bool = False) -> TeacherCache | None:
    """The teacher-output cache of this run (``teacher.cache``), opened and checked against this run's key;
    filled first when it does not exist and ``teacher.cache.fill`` (every rank takes part). A stale,
    mismatched, damaged or half-filled cache is an error, never refilled or used. ``None``: cache off."""
    conf = teacher_cache_config(cfg)
    if conf is None or teacher is None:
        return None
    refuse_mixup(data.mixup)
    key, path = cache_key_and_path(cfg, t, conf, teacher, train_set, device)
    fill_or_wait(path, key, conf, t, teacher, train_set, device, progress and D.is_main(), conf.fill)
    cache = TeacherCache.open(path, key, verify=conf.verify)
    if not cache.exact:
        warn_once(f"the teacher cache at {path} is not bit-exact ("
                  + ("fp16 storage" if conf.dtype == "fp16" else
                     "the teacher's kernels are not batch-invariant on this device")
                  + "): cached outputs differ from the live teacher's by float rounding.")
    return cache


def wrap(trainable: Trainable, t: TrainerConfig, device: torch.device) -> nn.Module:
    """SyncBatchNorm and DDP (only the Trainable: the frozen teacher never is), then torch.compile."""
    model: nn.Module = trainable
    if D.is_dist():
        from torch.nn.parallel import DistributedDataParallel as DDP

        # No buffer sync in forward: BatchNorm statistics stay per rank (use SyncBatchNorm to share
        # them) and large loss buffers (CRD's memory bank) are not re-sent every step. (Newer torch
        # spells it forward_sync_buffers; its one sync at construction is harmless, since every rank
        # built the same buffers from the same seed.)
        sync_kw = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                   else {"broadcast_buffers": False})
        model = DDP(trainable, device_ids=[device.index] if device.type == "cuda" else None, **sync_kw)
    if t.compile:
        model = torch.compile(model)
    return model


def build(cfg: DictConfig, t: TrainerConfig, device: torch.device, seed: int) -> Parts:
    """Build every part in a fixed order from ``seed``; the per-rank stream starts at the end."""
    seed_everything(seed)
    data: DataModule = instantiate(cfg.dataset, _convert_="all")
    task = instantiate(cfg.task, _convert_="all")
    distill, weights = build_distill(cfg)
    teacher = build_teacher(cfg, t, distill, device)
    student = build_student(cfg, t, distill, device)
    groups = task.objective_groups(distill)
    balancer: Balancer = instantiate(cfg.balancer, _convert_="all")
    balancer.bind(tuple(groups))
    balancer.to(device)
    caching = teacher is not None and teacher_cache_config(cfg) is not None
    loaders = make_loaders(data, t, seed, device, aux=balancer.needs_aux_batch,
                           with_index=any(d.needs_index for d in distill.values()), task=task, views=caching)
    # Off the global RNG stream: a run that fills the cache trains on the same random numbers as one
    # that finds it filled (and as the live-teacher run).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        cache = build_teacher_cache(cfg, t, data, teacher, loaders.train.dataset, device,
                                    progress=bool(cfg.logger.get("progress", False))) if caching else None
    steps_per_epoch = len(loaders.train)
    planned = steps_per_epoch * t.epochs
    total_steps = planned if t.max_steps < 0 else min(t.max_steps, planned)
    balancer.set_total_steps(total_steps)
    setup_terms(distill, data, task, student, teacher, steps_per_epoch, device)
    trainable = Trainable(student, distill, weights, task).to(device)
    if D.is_dist() and t.sync_batchnorm:
        trainable = sync_batchnorm(trainable, device)  # type: ignore[assignment]
    model = wrap(trainable, t, device)
    optimizer = instantiate(cfg.optimizer)(trainable)
    scheduler = instantiate(cfg.scheduler)(optimizer, steps_per_epoch=steps_per_epoch, epochs=t.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    seed_everything(seed + D.rank())
    return Parts(t, device, seed, data, task, teacher, student, trainable, model, groups, balancer, loaders,
                 optimizer, scheduler, scaler, steps_per_epoch, total_steps, cache)

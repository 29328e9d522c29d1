"""A run's teacher cache from its settings (``teacher.cache``): the key of this run's teacher outputs and
the directory it names, the fill (every rank a slice) or the wait for another process's fill, and the
opened, checked cache (:func:`open_run_cache`). :func:`kdrun.engine.build.build` (through
:func:`build_teacher_cache`) and ``kdrun cache-teacher`` both come here, so a run finds the cache the
command filled for the same overrides.

The ranks: rank 0 decides whether the cache is missing and creates the fill; every rank fills a contiguous
slice of the images and waits on the file system for another process's fill (package doc, "Concurrent
runs"). Ranks must share the file system (one node, or a shared ``teacher.cache.dir``)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun.runtime import distributed
from kdrun.config import TeacherCacheConfig, TrainerConfig, teacher_cache_config, warn_once
from kdrun.data.views import ViewDataset
from kdrun.teacher_cache.fill import CacheBuilder, CacheBusy, wait_for_fill
from kdrun.teacher_cache.key import CacheError, CacheKey, default_dir, make_key, refuse_mixup
from kdrun.teacher_cache.store import TeacherCache, cache_state

if TYPE_CHECKING:
    # Only for annotations: importing kdrun.engine.teacher runs kdrun/engine/__init__.py, whose build module
    # imports this one (an import circle at run time).
    from kdrun.data.base import DataModule
    from kdrun.engine.teacher import Teacher


def cache_root(conf: TeacherCacheConfig) -> str:
    """``teacher.cache.dir``, by default ``$KDRUN_CACHE/teacher_outputs`` (``~/.cache/kdrun`` without it)."""
    return conf.dir or os.path.join(os.environ.get("KDRUN_CACHE", "~/.cache/kdrun"), "teacher_outputs")


def cache_compute(trainer: TrainerConfig, teacher: Teacher, device: torch.device) -> dict[str, Any]:
    """The conditions of the live teacher call, part of the cache key (kdrun.teacher_cache module doc)."""
    return {"device": device.type, "precision": teacher.precision, "channels_last": bool(trainer.channels_last)}


def teacher_input(trainer: TrainerConfig, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """What KDStep.to_device does to a batch before the teacher sees it (device, memory format)."""
    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if trainer.channels_last else x
    return prepare


def cache_key_and_path(cfg: DictConfig, trainer: TrainerConfig, conf: TeacherCacheConfig, teacher: Teacher,
                       train_set: ViewDataset, device: torch.device) -> tuple[CacheKey, Path]:
    """The cache key of this run's teacher outputs (teacher weights and config, training data, transform,
    taps, storage dtype, call conditions) and the directory it names."""
    key = make_key(teacher.model.model, train_set, teacher.model.taps, conf.dtype,
                   cache_compute(trainer, teacher, device), OmegaConf.to_yaml(cfg.teacher.model, resolve=True))
    return key, default_dir(cache_root(conf), key)


def fill_cache(path: Path, key: CacheKey, conf: TeacherCacheConfig, trainer: TrainerConfig, teacher: Teacher,
               train_set: ViewDataset, device: torch.device, progress: bool) -> bool:
    """Fill the cache at ``path``: rank 0 creates it, every rank fills a contiguous slice of the images,
    rank 0 checksums and moves it into place (ranks must share the file system: one node, or a shared
    ``teacher.cache.dir``). False: another process created the fill first (``CacheBusy``; every rank
    returns at once and the caller waits for it)."""
    prepare = teacher_input(trainer, device)
    # Every rank plans (one probe forward): a tap too large to cache fails on every rank, not only rank 0.
    specs = CacheBuilder.plan(key, train_set, teacher, prepare, int(conf.max_tap_gib * 2**30))
    builder: CacheBuilder | None = None
    if distributed.is_main():
        try:
            builder = CacheBuilder.create(path, key, specs)
        except CacheBusy:
            pass
    # Also the barrier between rank 0's create and the other ranks' attach.
    if not distributed.broadcast_object(builder is not None if distributed.is_main() else None):
        return False
    builder = builder or CacheBuilder.attach(path, key)
    n, r, w = len(train_set), distributed.rank(), distributed.world_size()
    per = -(-n // w)
    bs = conf.fill_batch_size or trainer.eval_batch_size
    builder.fill(teacher, train_set, bs, prepare, rows=range(min(n, r * per), min(n, (r + 1) * per)),
                 progress=progress)
    distributed.barrier()
    if distributed.is_main():
        builder.finalize({"world_size": w})
    else:
        builder.arrays.clear()
    distributed.barrier()
    return True


def fill_or_wait(path: Path, key: CacheKey, conf: TeacherCacheConfig, trainer: TrainerConfig, teacher: Teacher,
                 train_set: ViewDataset, device: torch.device, progress: bool, fill_missing: bool) -> bool:
    """Make sure a finished cache is at ``path`` (not yet checked against ``key``): fill it when it is
    missing and ``fill_missing`` (every rank takes part), or wait while another process fills it. True:
    this process filled it."""
    # Rank 0 decides and tells the others: a rank that looked for itself could find rank 0's fresh
    # .partial, skip the fill and then fail (or leave rank 0 waiting at the fill's barrier).
    state = distributed.broadcast_object(cache_state(path) if distributed.is_main() else None)
    filled = False
    if state == "missing":
        if not fill_missing:
            raise CacheError(f"no teacher cache at {path} and teacher.cache.fill=false; build it with "
                             "`kdrun cache-teacher` (same overrides as this run) or set teacher.cache.fill=true.")
        filled = fill_cache(path, key, conf, trainer, teacher, train_set, device, progress)
        state = "ready" if filled else "busy"  # busy: another run of the sweep created the fill first
    if state == "busy":
        # Another process is filling it (kdrun.teacher_cache "Concurrent runs"); a killed fill is an error.
        # Every rank waits on the file system: no collective runs for as long as the other fill takes.
        wait_for_fill(path, say=(lambda m: print(m, flush=True)) if distributed.is_main() else None)
    return filled


@dataclass
class RunCache:
    """A run's cache, opened and checked against its key; ``filled``: this process filled it just now."""

    cache: TeacherCache
    path: Path
    filled: bool


def open_run_cache(cfg: DictConfig, trainer: TrainerConfig, conf: TeacherCacheConfig, data: DataModule,
                   teacher: Teacher, device: torch.device, train_set: ViewDataset | None = None,
                   progress: bool = False, fill_missing: bool | None = None) -> RunCache:
    """The teacher cache of the run configured by ``cfg`` (``conf`` = its ``teacher.cache``), opened and
    checked against the run's key; filled first when it does not exist and ``fill_missing`` (default
    ``teacher.cache.fill``; every rank takes part), waited for when another process is filling it. A stale,
    mismatched, damaged or half-filled cache is an error, never refilled or used.

    ``train_set``: the run's :class:`ViewDataset` (the train loader's); None: one over ``data.train``, made
    after the mixup check (``kdrun cache-teacher`` builds no loaders)."""
    refuse_mixup(data.mixup)
    train_set = train_set if train_set is not None else ViewDataset(data.train)
    key, path = cache_key_and_path(cfg, trainer, conf, teacher, train_set, device)
    filled = fill_or_wait(path, key, conf, trainer, teacher, train_set, device, progress,
                          conf.fill if fill_missing is None else fill_missing)
    return RunCache(TeacherCache.open(path, key, verify=conf.verify), path, filled)


def build_teacher_cache(cfg: DictConfig, trainer: TrainerConfig, data: DataModule, teacher: Teacher | None,
                        train_set: ViewDataset, device: torch.device, progress: bool = False) -> TeacherCache | None:
    """The training run's cache (:func:`open_run_cache`; progress bar on the main rank only), with one
    warning when it is not bit-exact. ``None``: ``teacher.cache`` is off or there is no teacher."""
    conf = teacher_cache_config(cfg)
    if conf is None or teacher is None:
        return None
    cache = open_run_cache(cfg, trainer, conf, data, teacher, device, train_set, progress and distributed.is_main()).cache
    if not cache.exact:
        warn_once(f"the teacher cache at {cache.path} is not bit-exact ("
                  + ("fp16 storage" if conf.dtype == "fp16" else
                     "the teacher's kernels are not batch-invariant on this device")
                  + "): cached outputs differ from the live teacher's by float rounding.")
    return cache

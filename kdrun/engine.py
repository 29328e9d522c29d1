"""The training engine. One step reads like DTO-KD's Algorithm 1:

    teacher forward (frozen, inference_mode) → student forward → named loss vector
    → balancer (writes .grad) → optimiser step → balancer.after_step → log

The engine owns the loop and nothing else: the *task* owns the loss terms, the objective grouping and
evaluation; the *balancer* owns how the objective vector becomes an update; loss terms own their
projectors. :func:`train` builds everything from a validated config, runs, and returns the results.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import json
import math
import os
import random
import signal
import weakref
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kdrun import checkpoint as ckpt
from kdrun import distributed as D
from kdrun import preemption as P
from kdrun.balancers.base import Balancer, StepContext, StepResult
from kdrun.balancers.gradients import (Jacobian, JacobianMode, compute_feature_jacobian, compute_jacobian,
                                       diagnostics)
from kdrun.config import ConfigError, TrainerConfig, validate
from kdrun.data.base import DataModule
from kdrun.logger import Progress, RunLogger
from kdrun.losses.base import DistillLoss
from kdrun.models.build import CheckpointError, build_model, check_fits
from kdrun.models.taps import ModelOutput, Tapped, freeze
from kdrun.tasks.base import group

TASK_API = 1  # tasks are used only through kdrun.tasks.base.Task

# ---------------------------------------------------------------------------------------------------
# What DDP wraps: the student plus every trainable module of the loss terms (projectors, regressors).


class Trainable(nn.Module):
    """Student (+ distillation modules). ``forward`` returns the student output and the named terms."""

    def set_progress(self, step: int) -> None:
        """Tell step-scheduled terms (DKD/ReviewKD warm-up) the current 0-based optimiser step."""
        for loss in self.distill.values():
            if hasattr(loss, "progress_step"):
                loss.progress_step = step

    def __init__(self, student: Tapped, distill: dict[str, DistillLoss], weights: dict[str, float],
                 task: Any) -> None:
        super().__init__()
        self.student = student
        self.distill = nn.ModuleDict(distill)
        self.weights = dict(weights)
        self.task = task

    def forward(self, x: Tensor, target: Tensor, teacher: ModelOutput | None,
                with_distill: bool = True, index: Tensor | None = None) -> tuple[ModelOutput, dict[str, Tensor]]:
        s = self.student(x)
        terms = self.task.losses(s, target)
        if with_distill and teacher is not None:
            for name, loss in self.distill.items():
                w = self.weights.get(name, 1.0)
                # CRD-style terms need each sample's position in the training set (its memory slot).
                kw = {"index": index} if getattr(loss, "needs_index", False) else {}
                value = loss(s, teacher, target, **kw).float()
                terms[name] = value * w if w != 1.0 else value
        return s, terms


def clone_output(out: ModelOutput) -> ModelOutput:
    """Teacher outputs leave inference_mode as ordinary tensors, so losses may save them for backward."""
    return ModelOutput(out.logits.clone(), {k: v.clone() for k, v in out.features.items()})


# ---------------------------------------------------------------------------------------------------
# Setup helpers.


def pick_device(accelerator: str) -> torch.device:
    """This process's device: under DDP, LOCAL_RANK picks the GPU (one GPU per process)."""
    if D.device_type(accelerator) == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator=cuda but no CUDA device is visible; use "
                              "trainer.accelerator=cpu or auto.")
        return torch.device("cuda", D.cuda_index(int(os.environ.get("LOCAL_RANK", 0))))
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``trainer.sync_batchnorm``: BatchNorm statistics over the global batch (all ranks) instead of each
    rank's slice. Only meaningful under DDP; PyTorch's SyncBatchNorm runs on GPUs only."""
    if device.type == "cpu":
        raise ConfigError("trainer.sync_batchnorm=true needs CUDA (PyTorch's SyncBatchNorm has no CPU "
                          "kernel); set trainer.sync_batchnorm=false or trainer.accelerator=cuda.")
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def freeze_bn_stats(module: nn.Module) -> Callable[[], None]:
    """Snapshot BatchNorm running statistics; the returned function restores them. Used around the
    extra no-grad forwards (recomputed or auxiliary losses) so that they leave the model untouched."""
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             and m.running_mean is not None]

    def restore() -> None:
        for m, mean, var, n in saved:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)

    return restore


class IndexedDataset(torch.utils.data.Dataset):
    """Yields ``(x, y, index)``: for loss terms that keep per-sample state (CRD's memory bank)."""

    def __init__(self, base: torch.utils.data.Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        x, y = self.base[i][:2]
        return x, y, i


def ignore_signals(signums: tuple[int, ...], worker_id: int) -> None:
    """DataLoader workers ignore the stop signals: the training process decides when to stop, but
    SLURM and the elastic launcher signal every process of a job (loader workers included), and a
    loader worker killed mid-step would crash the run before it can checkpoint. (They still exit
    with their parent.)"""
    for s in signums:
        signal.signal(s, signal.SIG_IGN)


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    sampler: D.TrainSampler | D.ResumableSampler
    generator: torch.Generator
    aux: DataLoader | None = None
    aux_sampler: D.TrainSampler | None = None
    aux_generator: torch.Generator | None = None

    def start_epoch(self, epoch: int, skip_batches: int, seed: int) -> None:
        """Position the train sampler at batch ``skip_batches`` of ``epoch`` and seed the loader.

        The loader draws its worker base seed from its own generator, seeded from (seed, epoch, rank),
        not from the global RNG: otherwise creating the iterator consumes a global random number, and a
        run resumed mid-epoch (which creates it after restoring the RNG) would diverge from one that
        was never interrupted."""
        self.sampler.set_epoch(epoch, skip=skip_batches * int(self.train.batch_size or 1))
        self.generator.manual_seed(loader_seed(seed, epoch))

    def start_aux_epoch(self, epoch: int, skip_batches: int, seed: int) -> None:
        assert self.aux_sampler is not None and self.aux_generator is not None and self.aux is not None
        self.aux_sampler.set_epoch(epoch, skip=skip_batches * int(self.aux.batch_size or 1))
        self.aux_generator.manual_seed(loader_seed(seed + 104_729, epoch))


def close_loaders(loaders: Loaders) -> None:
    """Shut persistent loader workers down now, through the loader's own orderly path (its done event).

    Needed because the workers ignore the stop signals (``ignore_signals``): multiprocessing's
    exit-time ``terminate()`` (a SIGTERM) cannot stop them, so a worker still alive at interpreter exit
    would make the exit join hang forever."""
    for dl in (loaders.train, loaders.val, loaders.aux):
        it = getattr(dl, "_iterator", None) if dl is not None else None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        if dl is not None:
            dl._iterator = None


def _close_at_exit(ref: "weakref.ReferenceType[Loaders]") -> None:
    loaders = ref()
    if loaders is not None:
        close_loaders(loaders)


def loader_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + D.rank()) % 2**63


def make_loaders(data: DataModule, t: TrainerConfig, seed: int, device: torch.device,
                 aux: bool, with_index: bool = False, task: Any = None) -> Loaders:
    common = dict(num_workers=t.num_workers, pin_memory=t.pin_memory and device.type == "cuda",
                  collate_fn=data.collate_fn or getattr(task, "collate_fn", None))
    if t.num_workers > 0:
        common["persistent_workers"] = t.persistent_workers
        common["worker_init_fn"] = functools.partial(
            ignore_signals, tuple(int(s) for s in P.parse_signals(t.preempt_signals)))
    if data.repeated_augmentation > 1:
        from kdrun.data.samplers import RepeatAugSampler  # DeiT protocol

        sampler = D.ResumableSampler(RepeatAugSampler(data.train, num_repeats=data.repeated_augmentation,
                                                      seed=seed))
    else:
        sampler = D.TrainSampler(len(data.train), seed)
    if len(sampler) < t.batch_size:
        raise ConfigError(f"trainer.batch_size={t.batch_size} is larger than the {len(sampler)} training "
                          "samples per process; lower it.")
    train_set = IndexedDataset(data.train) if with_index else data.train
    gen = torch.Generator()
    train = DataLoader(train_set, batch_size=t.batch_size, sampler=sampler, drop_last=True, generator=gen,
                       **common)
    val = DataLoader(data.val, batch_size=t.val_batch_size or 2 * t.batch_size,
                     sampler=D.EvalSampler(len(data.val)), **common)
    out = Loaders(train, val, sampler, gen)
    if aux:  # cross-batch: an independently shuffled view of the same training set
        out.aux_sampler = D.TrainSampler(len(data.train), seed + 104_729)
        out.aux_generator = torch.Generator()
        out.aux = DataLoader(data.train, batch_size=t.batch_size, sampler=out.aux_sampler, drop_last=True,
                             generator=out.aux_generator, **common)
    if t.num_workers > 0:  # a run that dies before train() closes them must not hang the exit
        atexit.register(_close_at_exit, weakref.ref(out))
    return out


# ---------------------------------------------------------------------------------------------------
# Evaluation.


def evaluate(model: nn.Module, loader: DataLoader, task: Any, device: torch.device,
             precision: str = "fp32", channels_last: bool = False,
             results_path: Path | None = None) -> dict[str, float]:
    """The task's val metrics for ``model`` (every sample once, reduced across ranks). Tasks that save
    their predictions (detection: the COCO results json that ``kdrun tide`` reads) write them to
    ``results_path``."""
    if hasattr(task, "results_path"):
        task.results_path = results_path
    return task.evaluate(model, loader, device, lambda: autocast(device, precision),
                         channels_last=channels_last)


# ---------------------------------------------------------------------------------------------------
# Teacher.


def teacher_checkpoint(cfg: DictConfig) -> Path | None:
    p = cfg.teacher.get("checkpoint")
    return Path(os.path.expanduser(str(p))) if p else None


def fit_teacher(cfg: DictConfig, path: Path) -> dict[str, Any]:
    """Train the teacher with plain supervision (the same engine, no teacher, fixed balancer) and save
    its weights to ``path``, so that the next run finds them. Returns the fit's results (a preempted
    fit saves no teacher; the next run fits it again)."""
    sub = copy.deepcopy(cfg)
    OmegaConf.set_struct(sub, False)
    sub.student = {"model": cfg.teacher.model, "checkpoint": None}
    sub.teacher = None
    sub.distill = {}
    sub.balancer = {"_target_": "kdrun.balancers.fixed.Fixed"}
    sub.task.objectives = None
    sub.trainer.epochs = int(cfg.teacher.fit_if_missing_epochs)
    sub.trainer.resume = None
    sub.trainer.max_steps = -1
    run_dir = path.with_suffix("").with_name(path.stem + "_fit")
    if D.is_main():
        print(f"[kdrun] no teacher checkpoint at {path}: training the teacher for "
              f"{sub.trainer.epochs} epochs (run dir {run_dir})", flush=True)
    results = train(sub, run_dir)
    if results.get("preempted"):
        return results
    if D.is_main():
        best = ckpt.load(run_dir / "last.pt")
        ckpt.save_atomic({"student": best["student"], "config": best["config"],
                          "val_metrics": results["final"]}, path)
    D.barrier()
    return results


# ---------------------------------------------------------------------------------------------------
# Resume.


def load_resume(path: Path, trainable: nn.Module) -> dict[str, Any]:
    """Read a training checkpoint for ``trainable``; errors name the file and what to do instead.

    A checkpoint that cannot be read (truncated, corrupted) points at the previous good one, which
    rotation kept untouched (``last.pt.prev``, ``best.pt``); a checkpoint of another model names the
    mismatched keys (:func:`kdrun.models.build.check_fits`) instead of torch's bare RuntimeError."""
    path = Path(path)
    try:
        s = ckpt.load(path)
    except CheckpointError as e:
        good = [p for p in (P.previous_path(path), path.with_name("best.pt")) if p.is_file() and p != path]
        hint = (" The previous good checkpoint is untouched: resume from it with "
                + " or ".join(f"trainer.resume={p}" for p in good) + ".") if good else ""
        raise CheckpointError(f"{e}{hint}") from None
    if not isinstance(s.get("trainable"), dict):
        raise CheckpointError(f"{path} holds no training state (no 'trainable'); resume needs a last.pt "
                              "or best.pt written by `kdrun train`.")
    check_fits(trainable, s["trainable"], path)
    return s


# ---------------------------------------------------------------------------------------------------
# The run.


@dataclass
class State:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    epoch_step: int = 0  # steps taken in the current epoch
    best_metric: float = -math.inf  # the task's primary metric (top-1, AP)
    skipped: int = 0  # non-finite steps skipped
    aux_batches: int = 0  # auxiliary batches drawn (cross-batch), so a resumed run draws the next ones
    teacher: dict[str, float] | None = None  # teacher's val metrics, measured once
    history: list[dict[str, float]] = field(default_factory=list)


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Validate ``cfg``, build everything, train, and return the results (also in results.json)."""
    cfg = copy.deepcopy(cfg)
    validate(cfg)
    t = TrainerConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))  # validated above
    P.parse_signals(t.preempt_signals)  # a bad signal name fails now, not at the first step
    lg = cfg.logger
    run_dir = Path(run_dir)
    main = D.is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(t.accelerator)
    seed = int(t.seed if t.seed is not None else cfg.get("seed", 0))
    # Every rank builds the models from the same seed (a teacher without a checkpoint, projectors and
    # balancer state must agree across ranks; DDP would only broadcast the Trainable); the per-rank
    # stream (seed + rank: augmentation, dropout) starts after building.
    seed_everything(seed)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # -- data, teacher, student, loss terms, balancer ---------------------------------------------
    data: DataModule = instantiate(cfg.dataset, _convert_="all")
    task = instantiate(cfg.task, _convert_="all")
    distill_cfg = {k: v for k, v in (cfg.get("distill") or {}).items()}
    weights = {k: float(v.get("weight", 1.0)) for k, v in distill_cfg.items()}
    distill: dict[str, DistillLoss] = {}
    for name, node in distill_cfg.items():
        node = copy.deepcopy(node)
        OmegaConf.set_struct(node, False)
        node.pop("weight", None)
        distill[name] = instantiate(node, _convert_="all")

    teacher: Tapped | None = None
    if cfg.get("teacher") is not None:
        path = teacher_checkpoint(cfg)
        if path is not None and not path.is_file() and int(cfg.teacher.get("fit_if_missing_epochs", 0)) > 0:
            fitted = fit_teacher(cfg, path)
            if fitted.get("preempted"):
                return fitted
            seed_everything(seed)
        t_model = build_model(cfg.teacher)
        teacher = Tapped(freeze(t_model), [tp for d in distill.values() for tp in d.teacher_taps])
        teacher.to(device)
        freeze(teacher)
        if t.channels_last:
            teacher.to(memory_format=torch.channels_last)
    feature_space = t.grad_space == "features"
    jac_mode = JacobianMode(t.jacobian)
    student = Tapped(build_model(cfg.student), [tp for d in distill.values() for tp in d.student_taps]
                     + ([t.grad_feature] if feature_space else []))
    student.to(device)
    if t.channels_last:
        student.to(memory_format=torch.channels_last)

    groups = task.objective_groups(distill)
    balancer: Balancer = instantiate(cfg.balancer, _convert_="all")
    balancer.bind(tuple(groups))
    balancer.to(device)

    loaders = make_loaders(data, t, seed, device, aux=balancer.needs_aux_batch,
                           with_index=any(getattr(d, "needs_index", False) for d in distill.values()),
                           task=task)
    steps_per_epoch = len(loaders.train)
    total_steps = steps_per_epoch * t.epochs if t.max_steps < 0 else min(t.max_steps, steps_per_epoch * t.epochs)
    balancer.total_steps = total_steps  # schedules inside balancers (e.g. distill_decay)
    teacher_prec = t.precision if t.teacher_precision == "same" else t.teacher_precision

    def teacher_forward(x: Tensor) -> ModelOutput | None:
        if teacher is None:
            return None
        with torch.inference_mode(), autocast(device, teacher_prec):
            out = teacher(x)
        return clone_output(out)

    # Probe one batch: loss terms build their shape-dependent modules (projectors) before the
    # optimiser and DDP see the parameters.
    if distill:
        probe = DataLoader(data.train, batch_size=2, collate_fn=data.collate_fn or getattr(task, "collate_fn", None))
        x0, _, _ = task.batch_to_device(next(iter(probe)), device)
        with torch.no_grad():
            restore = freeze_bn_stats(student)
            s0 = student(x0)
            restore()
        t0 = teacher_forward(x0)
        shapes = lambda o: {"logits": o.logits.shape[1:], **{k: v.shape[1:] for k, v in o.features.items()}}
        for d in distill.values():
            if getattr(d, "needs_index", False) and getattr(d, "num_data", None) is None:
                d.num_data = len(data.train)  # one memory slot per training sample (CRD)
            d.setup(shapes(s0), shapes(t0))

    trainable = Trainable(student, distill, weights, task).to(device)
    if D.is_dist() and t.sync_batchnorm:
        trainable = sync_batchnorm(trainable, device)  # type: ignore[assignment]
    model: nn.Module = trainable
    if D.is_dist():
        # Only the Trainable (student + loss modules) is wrapped; the frozen teacher never is.
        from torch.nn.parallel import DistributedDataParallel as DDP

        # No buffer sync in forward: BatchNorm statistics stay per rank (use SyncBatchNorm to share
        # them) and large loss buffers (CRD's memory bank) are not re-sent every step. (Newer torch
        # spells it forward_sync_buffers; its one sync at construction is harmless, since every rank
        # built the same buffers from the same seed.)
        import inspect

        sync_kw = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                   else {"broadcast_buffers": False})
        model = DDP(trainable, device_ids=[device.index] if device.type == "cuda" else None, **sync_kw)
    if t.compile:
        model = torch.compile(model)
    optimizer = instantiate(cfg.optimizer)(trainable)
    scheduler = instantiate(cfg.scheduler)(optimizer, steps_per_epoch=steps_per_epoch, epochs=t.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    params = [p for p in trainable.parameters() if p.requires_grad]
    seed_everything(seed + D.rank())

    # -- resume -----------------------------------------------------------------------------------
    st = State()
    # Rank 0 decides (a shared file system may show a fresh file to some nodes later than to others);
    # every rank then reads the same file, after a barrier, onto the CPU. Every rank looks, so that a
    # missing trainer.resume=PATH fails on all of them alike instead of leaving some waiting.
    resume_path = D.broadcast_object(ckpt.find_resume(run_dir, t.resume))
    D.barrier()
    if resume_path is not None:
        s = load_resume(resume_path, trainable)
        trainable.load_state_dict(s["trainable"])
        optimizer.load_state_dict(s["optimizer"])
        scheduler.load_state_dict(s["scheduler"])
        balancer.load_state_dict(s["balancer"])
        scaler.load_state_dict(s["scaler"])
        st = State(epoch=s["epoch"], step=s["step"], epoch_step=s["epoch_step"], best_metric=s["best_metric"],
                   skipped=s.get("skipped", 0), history=list(s.get("history", [])),
                   teacher=s.get("teacher_metrics") or None, aux_batches=int(s.get("aux_batches", 0)))
        rngs = s.get("rng_ranks") or [s["rng"]]
        if len(rngs) == D.world_size():
            ckpt.set_rng_state(rngs[D.rank()])  # each rank continues its own random stream
        else:
            seed_everything(seed + D.rank() + 1_000_003 * st.step)
            if main:
                print(f"[kdrun] warning: {resume_path} was written by {len(rngs)} process(es), this run has "
                      f"{D.world_size()}: random streams are re-seeded and the rest of epoch {st.epoch + 1} "
                      "is sharded differently, so the run is not bit-identical to an uninterrupted one.",
                      file=sys.stderr, flush=True)
        if main:
            print(f"[kdrun] resumed from {resume_path} at epoch {st.epoch}, step {st.step}"
                  + (f" (step {st.epoch_step} of the epoch)" if st.epoch_step else ""), flush=True)
    if main:
        P.clear_marker(run_dir)

    logger = RunLogger(run_dir, lg.tensorboard, lg.jsonl, enabled=main,
                       purge_step=st.step if resume_path is not None else None)
    if main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    if teacher is not None and st.teacher is None:
        st.teacher = evaluate(teacher, loaders.val, task, device, teacher_prec, t.channels_last,
                              results_path=run_dir / "teacher_val_detections.json")
        logger.log(0, {f"teacher/val_{k}": st.teacher[k] for k in task.metric_keys}, kind="teacher")

    def save(name: str, metrics: dict[str, float] | None = None) -> None:
        # Collective (every rank calls it at the same points): each rank's RNG state goes into the
        # checkpoint, so that every rank resumes its own random stream.
        rngs = D.all_gather_object(ckpt.rng_state())
        if not main:
            return
        if name == "last.pt":
            P.keep_previous(run_dir / name)  # last.pt.prev: the previous good checkpoint
        ckpt.save_atomic({
            "format": ckpt.FORMAT,
            "student": student.model.state_dict(),
            "trainable": trainable.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "balancer": balancer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": st.epoch, "step": st.step, "epoch_step": st.epoch_step,
            "best_metric": st.best_metric, "skipped": st.skipped, "history": st.history,
            "teacher_metrics": st.teacher or {},
            "aux_batches": st.aux_batches, "world_size": D.world_size(),
            "rng": rngs[0], "rng_ranks": rngs,
            "config": OmegaConf.to_yaml(cfg),
            "metrics": dict(metrics or {}),
        }, run_dir / name)

    # -- the step -----------------------------------------------------------------------------------
    aux_iter: Iterator | None = None

    def next_aux() -> tuple[Tensor, Tensor]:
        nonlocal aux_iter
        assert loaders.aux is not None and loaders.aux_sampler is not None
        while True:
            if aux_iter is None:
                # Position from the count of batches drawn so far: a resumed run continues the stream.
                per_epoch = max(1, loaders.aux_sampler.per_rank() // t.batch_size)
                loaders.start_aux_epoch(st.aux_batches // per_epoch, st.aux_batches % per_epoch, seed)
                aux_iter = iter(loaders.aux)
            try:
                batch = next(aux_iter)
                st.aux_batches += 1
                return batch
            except StopIteration:
                aux_iter = None

    def to_device(batch: Any) -> tuple[Any, Any, Tensor | None]:
        x, y, idx = task.batch_to_device(batch, device)
        if t.channels_last and isinstance(x, Tensor):
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y, idx

    # Gradient-level balancers average their own Jacobians outside DDP's reducer; in feature space the
    # update is an ordinary backward, so DDP's reducer stays on.
    ddp_sync = (lambda: contextlib.nullcontext()) if (balancer.uses_ddp_backward or feature_space
                                                       or not D.is_dist()) else model.no_sync

    def train_step(x: Any, y: Any, idx: Tensor | None) -> tuple[bool, dict[str, Tensor]]:
        trainable.set_progress(st.step)
        # 1. teacher forward (frozen, inference_mode)
        t_out = teacher_forward(x)
        if data.mixup is not None:
            x, y = data.mixup(x, y)
        # 2. student forward and 3. the named loss vector
        with ddp_sync(), autocast(device, t.precision):
            s_out, terms = model(x, y, t_out, index=idx)
        objectives = group(terms, groups)
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        diag_step = lg.grad_stats_every > 0 and st.step % lg.grad_stats_every == 0
        cache: dict[str, Jacobian] = {}

        def backward(loss: Tensor) -> None:
            scaler.scale(loss).backward()

        def jacobian() -> Jacobian:
            if "j" not in cache:
                if feature_space:
                    cache["j"] = compute_feature_jacobian(
                        objectives, s_out.features[t.grad_feature], backward, scale=scale,
                        all_reduce_sum=D.all_reduce_sum, world_size=D.world_size())
                else:
                    cache["j"] = compute_jacobian(objectives, params, retain_graph=diag_step, scale=scale,
                                                  mode=jac_mode,
                                                  all_reduce_mean=D.all_reduce_mean)
            return cache["j"]

        restores: list[Callable[[], None]] = []

        def aux_objectives() -> dict[str, Tensor]:
            xa, ya, _ = to_device(next_aux())
            # The auxiliary forward must not move BatchNorm statistics; they are restored after the
            # balancer step, because its backward still needs the saved tensors.
            restores.append(freeze_bn_stats(trainable))
            with ddp_sync(), autocast(device, t.precision):
                _, aterms = trainable(xa, ya, None, with_distill=False)
            # Only objectives whose terms need no teacher (the task) exist on the auxiliary batch.
            return group(aterms, {g: m for g, m in groups.items() if all(n in aterms for n in m)})

        def recompute_objectives() -> dict[str, Tensor]:
            restore = freeze_bn_stats(trainable)
            with torch.no_grad(), autocast(device, t.precision):
                _, rterms = trainable(x, y, t_out, index=idx)
            restore()
            return {k: v.detach() for k, v in group(rterms, groups).items()}

        ctx = StepContext(
            step=st.step, objectives=objectives,
            backward=backward,
            jacobian=jacobian,
            gradients=lambda objs: compute_jacobian(objs, params, scale=scale, all_reduce_mean=D.all_reduce_mean),
            aux_objectives=aux_objectives if balancer.needs_aux_batch else None,
            recompute_objectives=recompute_objectives,
            all_reduce_mean=D.all_reduce_mean,
            diagnostics=diag_step,
        )
        if diag_step:
            jacobian()
        # 4. the balancer turns the loss vector into .grad
        result: StepResult = balancer.step(ctx)
        for restore in restores:
            restore()
        # 5. optimiser, unless the update is non-finite (then nothing changes but a counter)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # A non-finite objective can still give finite gradients (a NaN constant has zero gradient):
        # both must be finite for the step to count. This is the one host sync per step.
        loss_vec = torch.stack([v.detach().float() for v in objectives.values()])
        finite = bool((torch.isfinite(grad_norm) & torch.isfinite(loss_vec).all()).item())
        values: dict[str, Tensor] = {}
        if finite:
            if t.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, t.grad_clip, grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            balancer.after_step(ctx)
        else:
            if scaler.is_enabled():
                scaler.update()  # fp16 overflow: lower the scale, as GradScaler does
            elif t.nonfinite == "raise":
                bad = [k for k, v in objectives.items() if not torch.isfinite(v).all()]
                raise FloatingPointError(f"non-finite gradient at step {st.step} (objectives with non-finite "
                                         f"values: {', '.join(bad) or 'none; the gradient overflowed'}).")
            st.skipped += 1
        optimizer.zero_grad(set_to_none=True)
        if diag_step or (st.step + 1) % lg.log_every == 0:
            values.update({f"loss/{k}": v.detach() for k, v in terms.items()})
            values.update({f"objective/{k}": v.detach() for k, v in objectives.items()})
            values.update({f"pi/{n}": result.weights[i].detach() for i, n in enumerate(balancer.objectives)})
            values.update({f"balancer/{k}": v.detach() if isinstance(v, Tensor) else torch.tensor(float(v))
                           for k, v in result.extras.items()})
            if result.raw_weights is not None:
                w = result.raw_weights.detach().to(device)
                values["loss/total"] = (w * torch.stack([objectives[n].detach() for n in balancer.objectives])).sum()
            values["grad/update_norm"] = grad_norm.detach() / scale
            values["lr"] = torch.tensor(optimizer.param_groups[0]["lr"])
            values["train/nonfinite_skipped"] = torch.tensor(float(st.skipped))
            if diag_step:
                j = cache["j"]
                values.update(diagnostics(j.gram(), j.names, result.raw_weights, j.scale))
        return finite, values

    def stopped(pre: P.Preemption) -> dict[str, Any]:
        """The orderly end after a stop signal: ``last.pt`` at the last completed step, a marker for
        the launcher, every rank past the save, then the handler that was there before ours."""
        save("last.pt", last_val)
        if main:
            P.write_marker(run_dir, {"signal": pre.signal_name, "step": st.step, "epoch": st.epoch,
                                     "epoch_step": st.epoch_step, "time": time.time()})
            print(f"[kdrun] {pre.signal_name}: stopped after step {st.step} (epoch {st.epoch + 1}, step "
                  f"{st.epoch_step} of it); saved {run_dir / 'last.pt'}. Continue with trainer.resume=auto.",
                  flush=True)
        logger.close()
        D.barrier()
        pre.chain()  # e.g. submitit's requeue; returns unless that handler exits the process
        return {"run_dir": str(run_dir), "preempted": pre.signal_name, "exit_code": pre.exit_code,
                "steps": st.step, "epochs": st.epoch, "epoch_step": st.epoch_step,
                "world_size": D.world_size(), "checkpoint": str(run_dir / "last.pt")}

    # -- the loop ------------------------------------------------------------------------------------
    trainable.train()
    progress = Progress(total_steps, enabled=main and lg.progress)
    t_start = time.perf_counter()
    images = 0
    window_t, window_images = time.perf_counter(), 0
    last_val: dict[str, float] = {}
    stop = False
    # Stop signals are only recorded; the loop acts on them at a step boundary that all ranks agree on.
    preempt = P.Preemption(t.preempt_signals, t.preempt_check_every)
    with preempt:  # handlers restored on exit, also when a step raises
        while st.epoch < t.epochs and not stop:
            loaders.start_epoch(st.epoch, st.epoch_step, seed)
            for batch in loaders.train:
                x, y, idx = to_device(batch)
                finite, values = train_step(x, y, idx)
                st.step += 1
                st.epoch_step += 1
                n_images = task.batch_size(x) * D.world_size()
                images += n_images
                window_images += n_images
                if values:
                    now = time.perf_counter()
                    values["train/images_per_s"] = torch.tensor(window_images / max(1e-9, now - window_t))
                    window_t, window_images = now, 0
                    vals = logger.log(st.step, values)
                    if vals:
                        progress.update(st.step, f"ep {st.epoch + 1}/{t.epochs} "
                                        f"loss {vals.get('loss/total', float('nan')):.4f}")
                if 0 < t.max_steps <= st.step:
                    stop = True
                    break
                if preempt.should_stop(st.step):  # collective: every rank stops after the same step
                    stop = True
                    break
                if 0 < t.save_every_steps and st.step % t.save_every_steps == 0 and st.epoch_step < steps_per_epoch:
                    save("last.pt", last_val)  # mid-epoch: survives a kill -9 (epoch ends save below)
            else:
                st.epoch += 1
                st.epoch_step = 0
            if preempt.agreed:
                # Saved as is, even when the epoch's last step was just taken (epoch_step == steps per
                # epoch): the resumed run then runs the epoch's end (validation, best.pt) itself, so a
                # stop costs no time for evaluation inside the grace period.
                break
            if stop and st.epoch_step == steps_per_epoch:  # max_steps landed on an epoch end
                st.epoch, st.epoch_step = st.epoch + 1, 0
            ended_epoch = st.epoch_step == 0
            if ended_epoch and (st.epoch % t.val_every == 0 or st.epoch == t.epochs or stop):
                last_val = evaluate(student, loaders.val, task, device, t.precision, t.channels_last,
                                    results_path=run_dir / "val_detections.json")
                st.history.append({"epoch": st.epoch, "step": st.step, **last_val})
                logger.log(st.step, {**{f"val/{k}": last_val[k] for k in task.metric_keys}, "epoch": st.epoch},
                           kind="val")
                improved = last_val[task.primary_metric] > st.best_metric
                st.best_metric = max(st.best_metric, last_val[task.primary_metric])
                if t.save_best and improved:
                    save("best.pt", last_val)
            if t.save_last and (ended_epoch or stop):
                save("last.pt", last_val)
    progress.close()
    if preempt.agreed:
        close_loaders(loaders)
        return stopped(preempt)
    if not last_val:  # resumed a finished run, or stopped mid-epoch: evaluate what we have
        last_val = evaluate(student, loaders.val, task, device, t.precision, t.channels_last,
                                    results_path=run_dir / "val_detections.json")
    wall = time.perf_counter() - t_start
    logger.close()
    best = max(st.history, key=lambda h: h[task.primary_metric]) if st.history else last_val
    results = {
        "run_dir": str(run_dir),
        "primary_metric": task.primary_metric,
        "final": {k: last_val[k] for k in task.metric_keys},
        "best": {**{k: best[k] for k in task.metric_keys}, "epoch": best.get("epoch")},
        "teacher": None if st.teacher is None else {k: st.teacher[k] for k in task.metric_keys},
        "val_samples": last_val.get("samples"),  # every val sample once, summed over ranks
        "epochs": st.epoch, "steps": st.step, "nonfinite_skipped": st.skipped,
        "wall_time_s": wall, "images_per_s": images / max(wall, 1e-9),
        "world_size": D.world_size(), "device": str(device),
        "git_commit": git_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if main:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    D.barrier()
    close_loaders(loaders)
    return results

"""Training and validation loaders: a resumable train sampler, an every-sample-once val sampler, and the
independently shuffled auxiliary view of the training set that extra-batch balancers (cross-batch) draw.

The train order depends only on (seed, epoch) (:class:`kdrun.runtime.distributed.TrainSampler`), and each loader
draws its worker base seed from its own generator, so a run resumed mid-epoch sees the same batches as one
that was never interrupted.
"""
from __future__ import annotations

import atexit
import functools
import signal
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from kdrun.runtime import distributed
from kdrun.runtime import preemption
from kdrun.config import ConfigError, TrainerConfig
from kdrun.data.base import DataModule


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
    sampler: distributed.TrainSampler | distributed.ResumableSampler
    generator: torch.Generator
    aux: DataLoader | None = None
    aux_sampler: distributed.TrainSampler | None = None
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


def collate_fn(data: DataModule, task: Any) -> Any:
    """The loaders' collate function: the data set's, else the task's (detection pads images)."""
    return data.collate_fn or (task.collate_fn if task is not None else None)


def loader_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + distributed.rank()) % 2**63


def make_loaders(data: DataModule, trainer: TrainerConfig, seed: int, device: torch.device,
                 aux: bool, with_index: bool = False, task: Any = None, views: bool = False) -> Loaders:
    """Train (resumable, ``drop_last``), val (every sample once) and, with ``aux``, the auxiliary
    loaders. The data set's collate function wins over the task's (``Task.collate_fn``).

    ``views`` (the teacher-output cache is on): the train set yields ``(x, y, index, view)``
    (:class:`kdrun.data.views.ViewDataset`: the same random calls and images as ``data.train``'s own
    transform, plus the view drawn), so the step can look the teacher's output up; it carries the index
    too, so ``with_index`` needs nothing more. The val and aux loaders never need the teacher's
    training-view outputs and are unchanged."""
    common = dict(num_workers=trainer.num_workers, pin_memory=trainer.pin_memory and device.type == "cuda",
                  collate_fn=collate_fn(data, task))
    if trainer.num_workers > 0:
        common["persistent_workers"] = trainer.persistent_workers
        common["worker_init_fn"] = functools.partial(
            ignore_signals, tuple(int(s) for s in preemption.parse_signals(trainer.preempt_signals)))
    if data.repeated_augmentation > 1:
        from kdrun.data.samplers import RepeatAugSampler  # DeiT protocol

        sampler = distributed.ResumableSampler(RepeatAugSampler(data.train, num_repeats=data.repeated_augmentation,
                                                      seed=seed))
    else:
        sampler = distributed.TrainSampler(len(data.train), seed)
    if len(sampler) < trainer.batch_size:
        raise ConfigError(f"trainer.batch_size={trainer.batch_size} is larger than the {len(sampler)} training "
                          "samples per process; lower it.")
    if views:
        from kdrun.data.views import ViewDataset

        train_set: torch.utils.data.Dataset = ViewDataset(data.train)
    else:
        train_set = IndexedDataset(data.train) if with_index else data.train
    gen = torch.Generator()
    train = DataLoader(train_set, batch_size=trainer.batch_size, sampler=sampler, drop_last=True, generator=gen,
                       **common)
    # Its own generator too: iterating a loader without one draws the worker base seed from the global
    # RNG, so a validation (a max_steps stop mid-epoch validates before saving last.pt) would move the
    # augmentation stream of a resumed run away from the uninterrupted one's.
    val = DataLoader(data.val, batch_size=trainer.eval_batch_size,
                     sampler=distributed.EvalSampler(len(data.val)), generator=torch.Generator(), **common)
    out = Loaders(train, val, sampler, gen)
    if aux:  # cross-batch: an independently shuffled view of the same training set
        out.aux_sampler = distributed.TrainSampler(len(data.train), seed + 104_729)
        out.aux_generator = torch.Generator()
        out.aux = DataLoader(data.train, batch_size=trainer.batch_size, sampler=out.aux_sampler, drop_last=True,
                             generator=out.aux_generator, **common)
    if trainer.num_workers > 0:  # a run that dies before train() closes them must not hang the exit
        atexit.register(_close_at_exit, weakref.ref(out))
    return out


class AuxStream:
    """The auxiliary batches of extra-batch balancers (cross-batch), as an endless stream.

    ``state.aux_batches`` counts the batches drawn so far and is saved in checkpoints; the stream is
    positioned from it (epoch = count // batches per epoch, offset = the remainder), so a resumed run
    draws exactly the batches an uninterrupted one would have drawn next."""

    def __init__(self, loaders: Loaders, batch_size: int, seed: int, state: Any) -> None:
        if loaders.aux is None or loaders.aux_sampler is None:
            raise ValueError("AuxStream needs loaders built with aux=True")
        self.loaders, self.batch_size, self.seed, self.state = loaders, batch_size, seed, state
        self._it: Any = None

    def __call__(self) -> Any:
        while True:
            if self._it is None:
                per_epoch = max(1, self.loaders.aux_sampler.per_rank() // self.batch_size)  # type: ignore[union-attr]
                n = self.state.aux_batches
                self.loaders.start_aux_epoch(n // per_epoch, n % per_epoch, self.seed)
                self._it = iter(self.loaders.aux)  # type: ignore[arg-type]
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                continue
            self.state.aux_batches += 1
            return batch

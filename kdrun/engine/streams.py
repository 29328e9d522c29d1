"""A run's random streams: what decides the batches, and what decides the model's random numbers.

Data loading, augmentation and mixup draw from the *global* generators (Python's ``random``, NumPy's,
torch's CPU and CUDA ones: torchvision and timm use them), and so do initialisation, dropout, drop-path,
CRD's negatives and any balancer randomness. A run keeps the two apart so that the data side of a step
depends on nothing the student does:

* **data stream**: the fetch of step ``s``'s batch (the loader's transforms when it has no workers; with
  workers they run in processes seeded from the loader's own generator), mixup/cutmix and the teacher's
  forward run on a global state seeded from (seed, rank, ``s``) (:func:`data_stream`);
* **auxiliary stream**: the ``n``-th auxiliary batch of an extra-batch balancer (cross-batch) is drawn on a
  state seeded from (seed, rank, ``n``) (:func:`aux_stream`);
* **model stream**: everything else runs on the global state itself: the build from the seed, then the
  per-rank stream ``seed + rank`` that a checkpoint saves and restores.

Each stream is entered with the global state saved and left with it restored, so the model stream goes
on as if the data side had drawn nothing. Consequences: the batches (and mixed batches) of a run are a
function of (seed, rank, step) alone, so the students of a group (:mod:`kdrun.engine.group`), each on its
own model stream (:class:`OwnStream`), see exactly the batches they would see alone, and a resumed run
needs no data-side state from its checkpoint.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from kdrun.runtime import distributed

DATA, AUX = 1, 2  # stream ids, one word of the seed


def cuda_device() -> int | None:
    """The CUDA device whose generator this process draws from (one device per process), None without CUDA
    in use."""
    return torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


@dataclass
class RandomState:
    """A snapshot of every global generator: Python's, NumPy's, torch's CPU one and (when CUDA is in use)
    this process's CUDA device's."""

    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    cuda: tuple[int, torch.Tensor] | None

    @classmethod
    def capture(cls) -> "RandomState":
        device = cuda_device()
        cuda = (device, torch.cuda.get_rng_state(device)) if device is not None else None
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])


MASK64 = 2**64 - 1


def splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele, Lea & Flood 2014; the seeding generator of Java's SplittableRandom and
    of xoshiro): consecutive inputs give unrelated 64-bit outputs."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, stream: int, count: int) -> int:
    """A 64-bit seed for (seed, rank, stream, count), SplitMix64 chained over the words, so that nearby counts
    and seeds give unrelated states (and none is the model stream's plain ``seed + rank``)."""
    x = 0
    for word in (seed, distributed.rank(), stream, count):
        x = splitmix64(x ^ (word & MASK64))
    return x


@contextlib.contextmanager
def seeded(value: int) -> Iterator[None]:
    """Run the block on every global generator seeded from ``value``; the state before is restored after.
    (The generators are seeded directly: ``torch.manual_seed`` also visits every other backend and costs
    more than the rest of the switch.)"""
    outer = RandomState.capture()
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.default_generator.manual_seed(value)
    if outer.cuda is not None:
        torch.cuda.default_generators[outer.cuda[0]].manual_seed(value)
    try:
        yield
    finally:
        outer.restore()


def data_stream(seed: int, step: int) -> contextlib.AbstractContextManager:
    """The data side of optimiser step ``step`` (0-based): its batch's fetch, mixup and teacher forward."""
    return seeded(stream_seed(seed, DATA, step))


def aux_stream(seed: int, count: int) -> contextlib.AbstractContextManager:
    """The ``count``-th (0-based) auxiliary batch's fetch."""
    return seeded(stream_seed(seed, AUX, count))


def aux_draws(draw: Callable[[], Any], seed: int, state: Any) -> Callable[[], Any]:
    """``draw`` (a :class:`kdrun.data.loaders.AuxStream`, which counts its batches in ``state.aux_batches``)
    on the auxiliary stream."""
    def drawn() -> Any:
        with aux_stream(seed, state.aux_batches):
            return draw()
    return drawn


class OwnStream:
    """One student's model stream inside a group: its global state, swapped in while it runs
    (:meth:`active`) and kept while the others do. The state found outside is not kept: in a group every
    model-side draw happens in some member's turn."""

    def __init__(self, state: RandomState | None = None) -> None:
        self.state = state or RandomState.capture()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self.state.restore()
        try:
            yield
        finally:
            self.state = RandomState.capture()

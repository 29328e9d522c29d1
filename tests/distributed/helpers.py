"""Test-only pieces that run inside worker processes (importable by spawned children and as Hydra
``_target_``s): a loss term that pauses a run at a chosen step, and a worker that runs several
configs in one process group and records what each rank saw."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from kdrun.runtime import distributed as D
from kdrun.runtime import preemption as P
from kdrun.losses.base import DistillLoss
from kdrun.models.taps import ModelOutput


class PauseAt(DistillLoss):
    """A zero loss term that, on rank ``rank`` at optimiser step ``at`` (0-based), writes ``marker`` and:

    * ``hang``: sleeps until killed (the test kills the job with SIGKILL);
    * ``wait_signal``: waits until a stop signal arrived (the test sends it), so that the stop lands
      at a known step whatever the machine's speed;
    * ``signal_self``: sends ``signal`` to its own process (single-process tests).

    Its value is exactly 0 and so is its gradient, so a run with it trains bit-identically to one
    without it firing.
    """

    def __init__(self, at: int, marker: str, mode: Literal["hang", "wait_signal", "signal_self"] = "hang",
                 rank: int = 0, signal_name: str = "SIGTERM") -> None:
        super().__init__()
        self.at, self.marker, self.mode, self.rank, self.signal_name = at, marker, mode, rank, signal_name
        self.progress_step = 0  # set by the engine before every step
        self.fired = False

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:
        if self.progress_step == self.at and not self.fired and D.rank() == self.rank:
            self.fired = True
            Path(self.marker).write_text(str(os.getpid()))
            if self.mode == "hang":
                while True:
                    time.sleep(0.05)
            elif self.mode == "wait_signal":
                deadline = time.monotonic() + 120
                while not P.requested() and time.monotonic() < deadline:
                    time.sleep(0.01)
            else:
                os.kill(os.getpid(), getattr(signal, self.signal_name))
        return (s.logits * 0).sum() / len(s.logits)


def run_jobs(jobs: list[tuple[str, str]]) -> int:
    """Worker: train each (resolved config YAML, run dir) in turn in one process group.

    Each rank writes ``rank{r}.json`` (its π at every logged step) and ``rank{r}.pt`` (its final
    Trainable state) into the run dir, and with ``trainer.ema`` ``rank{r}_ema.pt`` (its EMA's bare student),
    so the test can compare the ranks bit for bit.
    """
    from omegaconf import OmegaConf

    from kdrun import engine as E
    from kdrun.engine.ema import StudentEma
    from kdrun.runtime import logger as L
    D.init_process_group("cpu")
    seen: dict[int, dict[str, float]] = {}
    built: list[torch.nn.Module] = []
    emas: list[StudentEma] = []
    original_log, original_init, original_ema_init = L.RunLogger.log, E.Trainable.__init__, StudentEma.__init__

    def log(self, step, values, kind="train"):  # type: ignore[no-untyped-def]
        pis = {k: v for k, v in values.items() if k.startswith("pi/")}
        if pis:  # float(float32) is exact: equal floats are equal bits
            seen[step] = {k: float(v.detach().cpu()) for k, v in pis.items()}
        return original_log(self, step, values, kind)

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original_init(self, *args, **kwargs)
        built.append(self)

    def ema_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original_ema_init(self, *args, **kwargs)
        emas.append(self)

    L.RunLogger.log = log  # type: ignore[method-assign]
    E.Trainable.__init__ = init  # type: ignore[method-assign]
    StudentEma.__init__ = ema_init  # type: ignore[method-assign]
    try:
        for cfg_yaml, run_dir in jobs:
            seen.clear()
            built.clear()
            emas.clear()
            E.train(OmegaConf.create(cfg_yaml), Path(run_dir))
            r = D.rank()
            (Path(run_dir) / f"rank{r}.json").write_text(json.dumps(seen))
            torch.save({k: v.detach().clone() for k, v in built[-1].state_dict().items()},
                       Path(run_dir) / f"rank{r}.pt")
            if emas:
                torch.save({k: v.clone() for k, v in emas[-1].state_dict()["student"].items()},
                           Path(run_dir) / f"rank{r}_ema.pt")
        return D.rank()
    finally:
        L.RunLogger.log = original_log  # type: ignore[method-assign]
        E.Trainable.__init__ = original_init  # type: ignore[method-assign]
        StudentEma.__init__ = original_ema_init  # type: ignore[method-assign]
        D.destroy_process_group()

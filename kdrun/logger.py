"""Run logging on rank 0: TensorBoard scalars, ``metrics.jsonl`` and a console progress line.

Values arrive as tensors and are converted with one batched host transfer on log steps only, so the
training hot path never waits on the device for logging between log steps.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor


def to_floats(values: Mapping[str, Any]) -> dict[str, float]:
    """One device→host copy for all tensor values."""
    keys = [k for k, v in values.items() if isinstance(v, Tensor)]
    out = {k: float(v) for k, v in values.items() if not isinstance(v, Tensor)}
    if keys:
        flat = torch.stack([values[k].detach().reshape(()).double().cpu() if values[k].device.type == "cpu"
                            else values[k].detach().reshape(()).double() for k in keys]).cpu().tolist()
        out.update(zip(keys, flat))
    return out


class Progress:
    """A one-line progress bar with ETA; on a non-terminal it prints a line every ~10 %."""

    def __init__(self, total: int, enabled: bool, stream: Any = None) -> None:
        self.total, self.enabled = max(1, total), enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.done0: int | None = None
        self.last_decile = -1

    def update(self, done: int, text: str) -> None:
        if not self.enabled:
            return
        if self.done0 is None:
            self.done0, self.t0 = done, time.perf_counter()
        rate = (done - self.done0) / max(1e-9, time.perf_counter() - self.t0)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        eta_s = "--:--" if not math.isfinite(eta) else f"{int(eta // 60):02d}:{int(eta % 60):02d}"
        frac = done / self.total
        line = f"[{'#' * int(frac * 20):<20}] {done}/{self.total} ETA {eta_s} {text}"
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(160))
            self.stream.flush()
        elif int(frac * 10) > self.last_decile:
            self.last_decile = int(frac * 10)
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class RunLogger:
    def __init__(self, run_dir: Path, tensorboard: bool, jsonl: bool, enabled: bool = True,
                 purge_step: int | None = None) -> None:
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint, so a resumed
            # run's curves have no duplicated steps.
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)
        if jsonl:
            self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)

    def log(self, step: int, values: Mapping[str, Any], kind: str = "train") -> dict[str, float]:
        if not self.enabled:
            return {}
        vals = to_floats(values)
        if self.writer is not None:
            for k, v in vals.items():
                self.writer.add_scalar(k, v, step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"kind": kind, "step": step,
                                         **{k: (v if math.isfinite(v) else str(v)) for k, v in vals.items()}}) + "\n")
        return vals

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()

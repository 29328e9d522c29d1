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
from tqdm import tqdm


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
    """Console progress of the training steps, drawn by tqdm.

    On a terminal: one live tqdm bar (rate, ETA, the text of the last update). Elsewhere (a log file, a
    SLURM output, a pipe) a bar would write a carriage-return line per update, so instead one plain line
    is printed whenever another tenth of the run is done (~10 lines for a whole run), formatted by tqdm
    alike. ``update(step, text)`` takes the absolute step: a resumed run starts the bar at its step and
    the rate/ETA count from there. :meth:`write` prints a line (e.g. an epoch summary) without breaking
    the bar.
    """

    def __init__(self, total: int, enabled: bool, stream: Any = None) -> None:
        self.total, self.enabled = max(1, total), enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar: tqdm | None = None
        self.t0 = time.perf_counter()
        self.done0: int | None = None
        self.last_decile = -1

    def update(self, done: int, text: str) -> None:
        if not self.enabled:
            return
        if self.done0 is None:  # the first update: the rate and ETA are measured from here
            self.done0, self.t0 = done, time.perf_counter()
        if self.tty:
            if self.bar is None:
                self.bar = tqdm(total=self.total, initial=done, file=self.stream, unit="step",
                                dynamic_ncols=True, leave=True)
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(done - self.bar.n)
            return
        decile = int(done / self.total * 10)
        if decile > self.last_decile:
            self.last_decile = decile
            # ASCII bar: log files and SLURM outputs are not always read as UTF-8.
            line = tqdm.format_meter(done, self.total, time.perf_counter() - self.t0, ncols=100, unit="step",
                                     initial=self.done0, postfix=text, ascii=True)
            self.stream.write(line + "\n")
            self.stream.flush()

    def write(self, line: str) -> None:
        """Print ``line`` above the bar (the bar is redrawn under it); a plain line without a terminal."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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

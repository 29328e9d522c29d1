"""Run logging on rank 0: TensorBoard scalars, ``metrics.jsonl`` and a console progress line.

Values arrive as tensors and are converted with one batched host transfer on log steps only, so the
training hot path never waits on the device for logging between log steps.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

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


def format_value(v: float) -> str:
    """A metric or loss for the console: 2 decimals from 1 up (top-1 in %), 4 below (COCO AP in [0, 1],
    a small loss); COCO's "missing" −1 stays −1.00."""
    return f"{v:.2f}" if abs(v) >= 1.0 or not math.isfinite(v) else f"{v:.4f}"


def format_metrics(metrics: Mapping[str, float], keys: Any = None) -> str:
    """``top1 45.21  top5 80.00``: ``keys`` in their order (default: every key of ``metrics``)."""
    return "  ".join(f"{k} {format_value(float(metrics[k]))}" for k in (keys if keys is not None else metrics)
                     if k in metrics)


_PHASE: contextvars.ContextVar[str | None] = contextvars.ContextVar("kdrun_phase", default=None)


@contextlib.contextmanager
def console_phase(label: str) -> Iterator[None]:
    """Label the console output of the training run(s) started inside the block (``teacher fit``: the
    bar's prefix, the val lines, and a closing line when the phase's run ends), so a fit that runs
    before the distillation run is not mistaken for it."""
    token = _PHASE.set(label)
    try:
        yield
    finally:
        _PHASE.reset(token)


def current_phase() -> str | None:
    """The label of the innermost :func:`console_phase` (``None`` outside one)."""
    return _PHASE.get()


class Progress:
    """Console progress of the training steps, drawn by tqdm.

    On a terminal: one live tqdm bar (rate, ETA, the text of the last update). Elsewhere (a log file, a
    SLURM output, a pipe) a bar would write a carriage-return line per update, so instead one plain line
    is printed whenever another tenth of the run is done (~10 lines for a whole run), formatted by tqdm
    alike. ``update(step, text)`` takes the absolute step: a resumed run starts the bar at its step and
    the rate/ETA count from there. :meth:`finish` moves the bar to the run's last step (updates come on
    log steps only, and the last step need not be one). :meth:`write` prints a line (e.g. an epoch
    summary) without breaking the bar. ``label`` (default: the current :func:`console_phase`) prefixes
    the bar.
    """

    def __init__(self, total: int, enabled: bool, stream: Any = None, label: str | None = None) -> None:
        self.total, self.enabled = max(1, total), enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.label = label if label is not None else current_phase()
        self.bar: tqdm | None = None
        self.t0 = time.perf_counter()
        self.done0: int | None = None
        self.last_decile = -1
        self.done, self.text = -1, ""

    def update(self, done: int, text: str) -> None:
        if not self.enabled:
            return
        self.done, self.text = done, text
        if self.done0 is None:  # the first update: the rate and ETA are measured from here
            self.done0, self.t0 = done, time.perf_counter()
        if self.tty:
            if self.bar is None:
                self.bar = tqdm(total=self.total, initial=done, file=self.stream, unit="step",
                                dynamic_ncols=True, leave=True, desc=self.label)
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(done - self.bar.n)
            return
        decile = int(done / self.total * 10)
        if decile > self.last_decile:
            self.last_decile = decile
            # ASCII bar: log files and SLURM outputs are not always read as UTF-8.
            line = tqdm.format_meter(done, self.total, time.perf_counter() - self.t0, ncols=100, unit="step",
                                     initial=self.done0, postfix=text, ascii=True,
                                     prefix=self.label or "")
            self.stream.write(line + "\n")
            self.stream.flush()

    def finish(self, done: int, text: str | None = None) -> None:
        """Show step ``done`` (the run's last) unless it is already shown, with ``text`` (default: the
        last update's)."""
        if done != self.done:
            self.update(done, self.text if text is None else text)

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
    """TensorBoard scalars (``tb/``) and ``metrics.jsonl`` of one run, on the main rank.

    ``resumed_at``: the step of the checkpoint a resumed run continues from. A run killed after that
    checkpoint had already logged later steps, which the resumed run logs again; those rows are dropped
    first, so every step appears once: TensorBoard's ``purge_step`` hides the events from step
    ``resumed_at + 1`` on (the checkpoint's own step, e.g. its epoch-end val, was logged before the save
    and is not repeated), and ``metrics.jsonl`` is rewritten without the rows past ``resumed_at``."""

    def __init__(self, run_dir: Path, tensorboard: bool, jsonl: bool, enabled: bool = True,
                 resumed_at: int | None = None) -> None:
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"),
                                        purge_step=None if resumed_at is None else resumed_at + 1)
        if jsonl:
            path = run_dir / "metrics.jsonl"
            if resumed_at is not None:
                drop_rows_after(path, resumed_at)
            self.jsonl = open(path, "a", buffering=1)

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


def drop_rows_after(path: Path, step: int) -> int:
    """Rewrite ``metrics.jsonl`` (atomically) without the rows logged after ``step``; the number dropped.
    A last line cut short by a kill (no valid JSON) goes too; other lines are kept as they are."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row_step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                row_step = None if line.endswith("\n") else step + 1  # a torn last line is dropped
            if isinstance(row_step, int) and row_step > step:
                dropped += 1
                continue
            keep.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)
    return dropped

"""Run logging on rank 0: ``metrics.jsonl``, the ``logger.backends`` (TensorBoard, W&B, MLflow) and a console
progress line.

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
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from kdrun.runtime.log_backends import open_backends
from kdrun.runtime.log_backends.base import Backend


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
    """The run's scalars on the main rank: ``metrics.jsonl`` (``logger.jsonl``) and every backend of
    ``logger.backends`` (TensorBoard ``tb/``, W&B, MLflow: :mod:`kdrun.runtime.log_backends`), each given the
    same values at the same step; ``config`` (the resolved config) goes to the backends once.

    ``resumed_at``: the step of the checkpoint a resumed run continues from. A run killed after that
    checkpoint had already logged later steps, which the resumed run logs again. ``metrics.jsonl`` is
    rewritten without the rows past ``resumed_at`` and TensorBoard hides its events from ``resumed_at + 1``
    on (``purge_step``; the checkpoint's own step, e.g. its epoch-end val, was logged before the save and is
    not repeated), so every step appears once, with the resumed session's values. W&B and MLflow cannot
    drop what they hold: they are sent only the steps after the last one ``metrics.jsonl`` held (the killed
    session's last logged step), so every step appears once there too, the steps between the checkpoint
    and the kill with the killed session's values (the same values when the resume is bit-exact). Without
    ``metrics.jsonl`` that step is unknown and they are sent those steps again (W&B ignores a step it has
    passed; MLflow keeps both values).

    A backend that fails while the run logs (a tracking server gone) is dropped for the rest of the session
    with one warning; the run goes on (``metrics.jsonl`` is the run's own record)."""

    def __init__(self, run_dir: Path, backends: Sequence[str] = ("tensorboard",), jsonl: bool = True,
                 enabled: bool = True, resumed_at: int | None = None, config: Mapping[str, Any] | None = None,
                 group: str | None = None) -> None:
        self.enabled = enabled
        self.backends: list[Backend] = []
        self.jsonl = None
        self.sent_through: int | None = None  # the backends that cannot rewind hold the steps up to here
        if not enabled:
            return
        path = Path(run_dir) / "metrics.jsonl"
        if resumed_at is not None:
            self.sent_through = max(resumed_at, last_step(path) or resumed_at)
        self.backends = open_backends(backends, Path(run_dir), resumed_at, group)
        if config is not None:
            for backend in self.backends:
                backend.log_params(config)
        if jsonl:
            if resumed_at is not None:
                drop_rows_after(path, resumed_at)
            self.jsonl = open(path, "a", buffering=1)

    def log(self, step: int, values: Mapping[str, Any], kind: str = "train") -> dict[str, float]:
        if not self.enabled:
            return {}
        vals = to_floats(values)
        for backend in list(self.backends):
            if not backend.rewinds and self.sent_through is not None and step <= self.sent_through:
                continue  # it holds this step from the session the checkpoint was resumed after
            try:
                backend.log_scalars(step, vals)
            except Exception as e:  # whatever a tracker raises, the training goes on
                self.backends.remove(backend)
                print(f"kdrun: warning: logging to {backend.name} failed at step {step} "
                      f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); it gets no "
                      "more values in this session" + ("; metrics.jsonl has them all." if self.jsonl else "."),
                      file=sys.stderr, flush=True)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"kind": kind, "step": step,
                                         **{k: (v if math.isfinite(v) else str(v)) for k, v in vals.items()}}) + "\n")
        return vals

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


def last_step(path: Path) -> int | None:
    """The highest ``step`` of a ``metrics.jsonl`` (None: no file or no row with a step)."""
    if not path.is_file():
        return None
    steps = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                continue
            if isinstance(step, int):
                steps.append(step)
    return max(steps, default=None)


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

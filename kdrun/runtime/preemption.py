"""Stopping safely and starting again: preemption signals become a checkpoint at a step boundary.

A cluster ends jobs with a signal: SLURM sends SIGTERM at the time limit or on preemption (and, with
``--signal=USR1@120``, a warning signal before), submitit uses SIGUSR2, a terminal sends SIGINT. Acting
inside the signal handler would interrupt a step half-way (gradients written, optimiser not stepped),
so the handler only records the signal; the engine asks :meth:`Preemption.should_stop` after every
optimiser step, and when it says yes it writes ``last.pt`` (with ``epoch_step``, so a resumed run
continues mid-epoch) and returns.

**Agreement under DDP.** A signal may reach the ranks at different moments (or only some of them). If
one rank stopped while another ran one more step, the other would wait forever in DDP's all-reduce.
So ranks decide together: ``should_stop`` all-reduces (MAX) the received signal number at every
``check_every``-th step boundary, and every rank stops at the same step. The cost is one 8-byte
all-reduce per check, on the CPU (gloo) so it never waits on the GPU stream: measured 0.8-1.0 ms
between 2 processes on a busy 2-core VM (``scripts/bench_scaling.py --stop-check``; less on idle
cores, plus a network round trip across nodes), against steps of tens to hundreds of milliseconds;
``trainer.preempt_check_every=k`` spreads it over k steps at the price of reacting up to k-1 steps
later.

**Chaining.** A handler that was installed before (submitit's SIGUSR2 "checkpoint and requeue") is
called after kdrun's checkpoint is on disk (:meth:`Preemption.chain`), so submitit requeues a job whose
state is saved. Python's default SIGINT handler (KeyboardInterrupt) is not chained: the CLI exits with
status 130 after saving instead.

Checkpoint rotation (``last.pt.prev``) lives with saving and restoring in :mod:`kdrun.runtime.checkpoint`.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Iterable

from kdrun.runtime import distributed
from kdrun.config import ConfigError

DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
_ACTIVE: list["Preemption"] = []  # innermost last


def parse_signals(names: Iterable[str]) -> list[signal.Signals]:
    """``["SIGTERM", "USR1", 10]`` → signal enums; an unknown name is a config error."""
    out = []
    for n in names:
        if isinstance(n, int) or str(n).isdigit():
            out.append(signal.Signals(int(n)))
            continue
        name = str(n).upper()
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal, name, None)
        if not isinstance(sig, signal.Signals) or name in ("SIGKILL", "SIGSTOP"):
            raise ConfigError(f"trainer.preempt_signals: {n!r} is not a signal that can be caught; use "
                              f"names such as {', '.join(DEFAULT_SIGNALS)}.")
        out.append(sig)
    return out


def requested() -> bool:
    """Whether the innermost active handler has received a stop signal (for tests and long hooks)."""
    return bool(_ACTIVE) and _ACTIVE[-1].signum is not None


class Preemption:
    """Records stop signals; see the module docstring.

    Use as a context manager around the training loop: handlers are installed on entry (main thread
    only; elsewhere Python cannot install them and stopping is left to the default actions) and the
    previous handlers restored on exit.
    """

    def __init__(self, signals: Iterable[str] = DEFAULT_SIGNALS, check_every: int = 1) -> None:
        self.signals = parse_signals(signals)
        self.check_every = max(1, int(check_every))
        self.signum: int | None = None  # first signal received locally
        self.agreed: int | None = None  # the signal all ranks stopped for
        self.previous: dict[int, Any] = {}
        self.installed = False
        # A second SIGINT in a process that no launcher manages is the user insisting: stop now.
        # Under an elastic agent (kdrun's launcher, torchrun) one Ctrl-C arrives twice (the terminal's
        # and the agent's forwarded copy), so there it is only recorded.
        self._escalate_sigint = "TORCHELASTIC_RUN_ID" not in os.environ
        self._insisting = False  # insist() is SIGINT's handler between restore() and chain()

    # -- handlers ----------------------------------------------------------------------------------

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT and self._escalate_sigint:
            insist(signum, frame)
        if self.signum is None:
            self.signum = signum
            if distributed.is_main():
                print(f"[kdrun] received {signal.Signals(signum).name}: checkpointing at the next step "
                      "boundary", file=sys.stderr, flush=True)

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self.previous[int(sig)] = signal.signal(sig, self._handler)
            self.installed = True
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the previous handlers back. After a SIGINT the stop is still being completed (the
        checkpoint is written after the loop's ``with`` block): until :meth:`chain`, a second Ctrl-C
        exits at once with one line (:func:`insist`) instead of Python's KeyboardInterrupt traceback."""
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if self.installed:
            for sig, old in self.previous.items():
                keep = sig == signal.SIGINT and self.signum == signal.SIGINT and self._escalate_sigint
                signal.signal(sig, insist if keep else (old if old is not None else signal.SIG_DFL))
            self.installed = False
            self._insisting = self.signum == signal.SIGINT and self._escalate_sigint

    # -- decisions ---------------------------------------------------------------------------------

    def should_stop(self, step: int, force_check: bool = False) -> bool:
        """Whether every rank stops after optimiser step ``step`` (1-based count of steps taken).

        Collective under DDP: every rank must call it at the same steps (the engine does, after every
        step); only every ``check_every``-th call communicates.
        """
        if not force_check and step % self.check_every:
            return False
        agreed = distributed.all_reduce_max_int(int(self.signum or 0))
        if agreed:
            self.agreed = agreed
        return bool(agreed)

    @property
    def exit_code(self) -> int:
        """0 after a preemption signal; 130 (the shell's convention) after SIGINT."""
        return 130 if self.agreed == signal.SIGINT else 0

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.agreed).name if self.agreed else None

    def chain(self) -> None:
        """Call the handler that was installed before ours for the signal this process received.

        Runs after the checkpoint is written: submitit's SIGUSR2 handler requeues the job (and exits
        the process on rank 0). Python's KeyboardInterrupt handler and the default/ignore actions are
        not called (the CLI sets the exit status instead)."""
        self.restore()
        if self._insisting:  # the stop is complete: the previous SIGINT handler again
            old_int = self.previous.get(int(signal.SIGINT))
            signal.signal(signal.SIGINT, old_int if old_int is not None else signal.SIG_DFL)
            self._insisting = False
        if self.signum is None:
            return
        old = self.previous.get(int(self.signum))
        if callable(old) and old is not signal.default_int_handler:
            old(self.signum, None)


def insist(signum: int, frame: FrameType | None) -> None:
    """A second Ctrl-C while a stop is being completed: the user wants out now. One line and exit 130
    (``SystemExit`` unwinds ``finally`` blocks, so the run directory's lock is released); the checkpoint
    being written is a temporary file until its rename, so the previous ``last.pt`` stays good."""
    print("\n[kdrun] second interrupt: exiting now without saving (the last saved last.pt, if any, is "
          "intact; continue with trainer.resume=auto)", file=sys.stderr, flush=True)
    raise SystemExit(130)


def chain_previous(signum: int, previous: dict[int, Any]) -> None:
    """The same chaining for a launcher that caught ``signum`` itself (see :mod:`kdrun.commands.launch`)."""
    old = previous.get(int(signum))
    if callable(old) and old is not signal.default_int_handler:
        old(signum, None)


# ---------------------------------------------------------------------------------------------------
# The marker a stopped run leaves, so that a launcher whose workers it stopped can tell an orderly
# stop (checkpoint written: exit 0) from a crash.

MARKER = "preempted.json"


def write_marker(run_dir: Path, info: dict[str, Any]) -> None:
    tmp = run_dir / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, run_dir / MARKER)


def read_marker(run_dir: Path, newer_than: float = 0.0) -> dict[str, Any] | None:
    p = run_dir / MARKER
    try:
        if p.stat().st_mtime + 1.0 < newer_than:  # 1 s: coarse file-system timestamps
            return None
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def clear_marker(run_dir: Path) -> None:
    try:
        (run_dir / MARKER).unlink()
    except FileNotFoundError:
        pass

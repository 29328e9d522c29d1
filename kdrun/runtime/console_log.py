"""``cli.log``: what kdrun printed on the console for a run, kept in its run directory.

The engine's console lines are plain ``print``s and a tqdm bar on ``sys.stdout``/``sys.stderr`` (so that
SLURM's ``--output``, a terminal and a pipe all see them as they are written). :func:`tee_console` copies
both streams into ``<run_dir>/cli.log`` for the duration of a block, on the main rank, once the run
directory has been accepted (a refused command writes nothing there).

A terminal's progress bar redraws one line with carriage returns; the file gets each line's final text
only (what a terminal shows once the line is finished), not one line per redraw.
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

CONSOLE_LOG = "cli.log"


class _LineSink:
    """Writes the finished lines of one stream into the shared log. Text after the last ``\\r`` of a
    line replaces what came before it, as on a terminal."""

    def __init__(self, log: Any) -> None:
        self.log, self.pending = log, ""

    def feed(self, text: str) -> None:
        self.pending += text
        if "\n" not in self.pending:
            return
        *lines, self.pending = self.pending.split("\n")
        self.log.write("".join(line.rsplit("\r", 1)[-1] + "\n" for line in lines))
        self.log.flush()

    def close(self) -> None:
        rest = self.pending.rsplit("\r", 1)[-1]
        if rest:
            self.log.write(rest + "\n")
        self.pending = ""
        self.log.flush()


class _Tee(io.TextIOBase):
    """A text stream that writes to ``stream`` (unchanged) and to a :class:`_LineSink`."""

    def __init__(self, stream: TextIO, sink: _LineSink) -> None:
        self.stream, self.sink = stream, sink

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        try:
            self.sink.feed(text)
        except (OSError, ValueError):  # a full disk or a closed file must not break the run's console
            pass
        return n if n is not None else len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:  # the progress bar decides between a live bar and plain lines on this
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


class ConsoleLog:
    """Copies ``sys.stdout``/``sys.stderr`` into ``<run_dir>/cli.log`` while active (a context manager).

    Until :meth:`start` the copy is held in memory: a command refused or failed before its run starts
    (a finished run in the directory, a checkpoint that does not fit) must not create or extend the log of
    an existing run. :meth:`start` appends what was held and writes through from then on (appended: a
    resumed run's session follows the earlier ones). ``enabled=False`` (ranks other than the main one)
    changes nothing."""

    def __init__(self, run_dir: Path, enabled: bool = True, start: bool = False) -> None:
        self.path, self.enabled, self.start_now = Path(run_dir) / CONSOLE_LOG, enabled, start
        self.held = io.StringIO()
        self.file: TextIO | None = None
        self.sinks: list[_LineSink] = []
        self.saved: tuple[Any, Any] | None = None

    def __enter__(self) -> "ConsoleLog":
        if self.enabled:
            self.sinks = [_LineSink(self), _LineSink(self)]
            self.saved = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = _Tee(self.saved[0], self.sinks[0]), _Tee(self.saved[1], self.sinks[1])
            if self.start_now:
                self.start()
        return self

    # the sinks' file-like target: memory until start(), then the file
    def write(self, text: str) -> None:
        (self.file or self.held).write(text)

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def start(self) -> None:
        """The run has started: the log file is created (or appended to) with what was held."""
        if not self.enabled or self.file is not None:
            return
        try:
            self.file = open(self.path, "a", encoding="utf-8")
        except OSError:  # an unwritable directory is reported where the run writes its own files
            return
        self.file.write(self.held.getvalue())
        self.file.flush()
        self.held = io.StringIO()

    def __exit__(self, *exc: Any) -> None:
        if self.saved is None:
            return
        sys.stdout, sys.stderr = self.saved
        self.saved = None
        with contextlib.suppress(OSError, ValueError):
            for sink in self.sinks:
                sink.close()
            if self.file is not None:
                self.file.close()


@contextlib.contextmanager
def tee_console(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Inside the block, ``sys.stdout`` and ``sys.stderr`` also go to ``<run_dir>/cli.log`` at once (for
    lines printed after a run, such as the CLI's summary)."""
    with ConsoleLog(run_dir, enabled, start=True):
        yield


class ConsoleHandler(logging.StreamHandler):
    """Python ``logging`` to whatever ``sys.stdout`` is at the time of the record (Hydra's job logging,
    ``conf/hydra/job_logging/kdrun.yaml``): Hydra configures logging before the run directory is accepted,
    and a handler holding the stream of that moment would bypass :func:`tee_console`."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__/setStream assign it; always sys.stdout
        pass

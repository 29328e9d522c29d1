"""Run-directory protection: a run never overwrites, interleaves with or silently continues another run.

Two rules, applied by the engine on the main rank before anything is written into the run directory:

1. **A fresh run needs an empty run directory.** A directory that already holds a run (``last.pt``,
   ``best.pt`` or ``results.json``) is refused unless the user says which of the two things they mean:
   ``trainer.resume=auto`` (continue that run) or ``trainer.overwrite=true`` (start over: the old run's
   files are removed first, so that ``metrics.jsonl`` and TensorBoard files of the two never mix).
   ``trainer.resume=auto`` that finds no checkpoint says so and starts fresh.
2. **One writer per run directory.** :class:`RunLock` holds ``<run_dir>/.kdrun.lock`` for the whole run.
   It is created by :func:`create_exclusive` (a hard link of a written file), which is atomic on local file
   systems and on the shared ones clusters use (NFS, Lustre, GPFS), so two processes on different nodes
   cannot both take it, and nobody ever reads it half-written. The file records the holder (host, pid,
   start time) and its modification time is a heartbeat, refreshed by a daemon thread. A second writer fails with an error naming the holder. The lock is released on every
   orderly exit (``with`` block, ``atexit``); a holder that died without releasing it (``kill -9``, a node
   crash) leaves a *stale* lock, detected as: same host and the pid is gone, or (another host) no
   heartbeat for ``stale_after_s``. A stale lock is taken over, and the takeover is printed.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from kdrun.config import ConfigError

LOCK_NAME = ".kdrun.lock"
# Any of these: the directory holds a run (metrics.jsonl alone: one that died before its first checkpoint).
RUN_FILES = ("last.pt", "best.pt", "results.json", "metrics.jsonl")
# What a run writes; removed by trainer.overwrite=true (.hydra/ belongs to the new run; cli.log, kdrun's
# copy of the console, is opened after this removal, so the new run's log starts empty).
RUN_OUTPUTS = ("last.pt", "last.pt.prev", "best.pt", "results.json", "metrics.jsonl", "tb", "export",
               "plots", "val_detections.json", "teacher_val_detections.json", "preempted.json", "cli.log",
               "wandb", "trackers.json")  # W&B's files; the tracker run ids (a new run gets new tracker runs)


class RunDirError(ConfigError):
    """The run directory cannot be used as asked; the message says why and the ways on."""


def check_usable(run_dir: Path) -> None:
    """A run directory must be creatable and writable: say so in one paragraph instead of a traceback."""
    run_dir = Path(run_dir)
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"The run directory {run_dir} cannot be created: {parent} is a file, not a "
                                  "directory. Choose another hydra.run.dir.")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise RunDirError(f"The run directory {run_dir} cannot be written: {parent} is not writable "
                                  f"by this user. Choose a writable hydra.run.dir.")
            return


def holds_run(run_dir: Path) -> list[str]:
    """The run files already in ``run_dir`` (empty: no earlier run there)."""
    return [n for n in RUN_FILES if (Path(run_dir) / n).exists()]


def check_fresh(run_dir: Path, resume: str | None, overwrite: bool) -> str | None:
    """Apply rule 1 (module docstring). Returns a note to print, or None.

    ``resume`` is ``trainer.resume`` (None, ``"auto"`` or a path); ``overwrite`` is ``trainer.overwrite``."""
    run_dir = Path(run_dir)
    found = holds_run(run_dir)
    if resume is not None and overwrite:
        raise RunDirError("trainer.resume and trainer.overwrite=true contradict each other: resume continues "
                          "the run in the directory, overwrite deletes it. Set one of them.")
    if resume == "auto":
        if (run_dir / "last.pt").is_file():
            return None
        if found:  # a run is there but cannot be continued: starting over must be asked for
            raise RunDirError(
                f"trainer.resume=auto found no checkpoint (last.pt) in {run_dir}, but the directory holds an "
                f"earlier run's {', '.join(found)} (it stopped before its first checkpoint, or ran with "
                "trainer.save_last=false), so it cannot be continued. Start over there with "
                "trainer.resume=null trainer.overwrite=true, or choose another hydra.run.dir.")
        return f"trainer.resume=auto: no checkpoint in {run_dir}; starting a fresh run there."
    if resume is not None or not found:
        return None
    if overwrite:
        for name in RUN_OUTPUTS:
            p = run_dir / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        return f"trainer.overwrite=true: removed the earlier run's files in {run_dir}."
    raise RunDirError(
        f"The run directory {run_dir} already holds a run ({', '.join(found)}); a fresh run there would "
        "overwrite its checkpoints and results and mix its metrics. Continue that run with "
        "trainer.resume=auto, start over in the same directory with trainer.overwrite=true (deletes the "
        "earlier run's files), or choose another hydra.run.dir.")


def move_aside(path: Path, token: str) -> bool:
    """Remove a stale lock or claim file so that it can be created afresh. It is renamed under a unique name
    first: of two processes taking it over at once only one rename succeeds (True), and the other (False)
    finds the winner's fresh file on its next pass."""
    aside = path.with_name(f"{path.name}.stale-{token}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    aside.unlink(missing_ok=True)
    return True


def heartbeat(path: Path, stop: threading.Event, every_s: float) -> None:
    """Refresh ``path``'s modification time every ``every_s`` until ``stop`` is set: the liveness signal of
    a lock or claim file (a holder on another host is stale once it stops). A failed touch is retried on the
    next beat; such a file is only ever taken over by pid or age."""
    while not stop.wait(every_s):
        try:
            os.utime(path)
        except OSError:
            pass


def create_exclusive(path: Path, record: dict[str, Any]) -> bool:
    """Create ``path`` holding ``record`` (JSON) unless it exists; True when this call created it.

    The record is written to a private file first and then hard-linked to ``path``: ``link`` is atomic and
    fails if ``path`` exists (the classic lock-file idiom that also holds on NFS), so a reader never finds
    the file empty. ``O_CREAT | O_EXCL`` followed by a write left a window in which a second process read
    an empty lock and reported its holder as "host ?, pid ?". File systems without hard links fall back to
    ``O_EXCL`` (that window again, nothing worse)."""
    private = path.with_name(f"{path.name}.{record.get('token', uuid.uuid4().hex)}.new")
    with open(private, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(private, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some FUSE/SMB mounts)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return True
    finally:
        private.unlink(missing_ok=True)


def read_holder(path: Path) -> dict[str, Any] | None:
    """The record in a lock or claim file plus its heartbeat (``mtime``); None when there is no file."""
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        if not isinstance(holder, dict):
            raise ValueError
    except ValueError:
        holder = {}  # a damaged file (or one made by the O_EXCL fallback, caught before its write)
    holder["mtime"] = mtime
    return holder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def holder_dead(holder: dict[str, Any], stale_after_s: float) -> str | None:
    """Why the holder of a lock or claim is dead, or None if it may be alive: on this host, its pid is
    gone; on another host (pids mean nothing here), no heartbeat for ``stale_after_s``."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return None if _pid_alive(holder["pid"]) else "its process no longer exists"
    age = time.time() - float(holder["mtime"])
    return f"its heartbeat stopped {age:.0f} s ago" if age > stale_after_s else None


def describe(holder: dict[str, Any]) -> str:
    start = holder.get("start")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)) if isinstance(start, (int, float)) else "?"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {when}"


class RunLock:
    """The exclusive writer lock of a run directory (rule 2 of the module docstring)."""

    def __init__(self, run_dir: Path, heartbeat_s: float = 30.0, stale_after_s: float = 300.0) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat_s = float(heartbeat_s)
        self.stale_after_s = float(stale_after_s)
        self.token = uuid.uuid4().hex
        self.note: str | None = None  # set when a stale lock was taken over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False

    # -- acquiring ----------------------------------------------------------------------------------
    def _create(self) -> bool:
        return create_exclusive(self.path, {"host": socket.gethostname(), "pid": os.getpid(),
                                            "start": time.time(), "token": self.token, "argv": sys.argv[:8]})

    def _holder(self) -> dict[str, Any] | None:
        return read_holder(self.path)

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                break
            holder = self._holder()
            if holder is None:
                continue  # released meanwhile: try again
            why = holder_dead(holder, self.stale_after_s)
            if why is None:
                raise RunDirError(
                    f"Another kdrun process is writing to {self.path.parent} ({describe(holder)}); two runs "
                    "in one directory would overwrite each other's checkpoints and mix their metrics. Wait "
                    "for it to finish, stop it, or choose another hydra.run.dir. (If that process is "
                    f"certainly gone, delete {self.path}.)")
            # Move the stale file aside under a unique name: of two processes taking it over at once,
            # only one rename succeeds, and the loser finds the winner's fresh lock on the next pass.
            if not move_aside(self.path, self.token):
                continue
            self.note = (f"took over a stale lock on {self.path.parent} left by {describe(holder)}: {why} "
                         "(that run crashed or was killed; resume it with trainer.resume=auto if it is this run).")
        else:
            raise RunDirError(f"Could not take the lock {self.path} after three attempts (another process keeps "
                              "taking it); choose another hydra.run.dir.")
        self._held = True
        self._thread = threading.Thread(target=self._beat, name="kdrun-run-lock", daemon=True)
        self._thread.start()
        atexit.register(self.release)
        return self

    def _beat(self) -> None:
        heartbeat(self.path, self._stop, self.heartbeat_s)

    # -- releasing ----------------------------------------------------------------------------------
    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._holder()
        if holder is not None and holder.get("token") == self.token:  # never remove another's lock
            self.path.unlink(missing_ok=True)
        atexit.unregister(self.release)

    def __enter__(self) -> "RunLock":
        return self.acquire() if not self._held else self

    def __exit__(self, *exc: object) -> None:
        self.release()

"""Issue #21 item 14: runs that miss the same teacher fit it once. The first claims the fit
(``<teacher>.fitting``, kdrun.engine.teacher.FitClaim); the others wait for its teacher; a claim whose holder
died is taken over and the fit continues from the fit directory's last.pt.

The claim's rules are unit tests; one in-process run takes a dead claim over; one slow test starts two cold
runs on one empty ``KDRUN_CACHE`` as two processes (the quickstart's situation, with a one-epoch fit).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from kdrun.engine.teacher import FitClaim, fit_dir, wait_for_fit
from tests.conftest import QUICK, run


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped), on this host."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def plant_claim(claim: FitClaim, host: str, pid: int, age_s: float = 0.0) -> None:
    claim.path.parent.mkdir(parents=True, exist_ok=True)
    claim.path.write_text(json.dumps({"host": host, "pid": pid, "start": time.time() - age_s, "token": "x"}))
    if age_s:
        past = time.time() - age_s
        os.utime(claim.path, (past, past))


def test_the_first_claim_wins_and_the_second_sees_its_holder(tmp_path: Path) -> None:
    teacher = tmp_path / "teachers" / "t.pt"
    teacher.parent.mkdir()
    first, second = FitClaim(teacher, heartbeat_s=0.05), FitClaim(teacher)
    assert first.take() is None and first.held
    holder = second.take()
    assert holder is not None and holder["pid"] == os.getpid() and not second.held
    beat = first.path.stat().st_mtime
    time.sleep(0.3)
    assert first.path.stat().st_mtime > beat  # the heartbeat thread touches it
    first.release()
    assert not first.path.exists() and not first.held
    assert second.take() is None  # released: the next one claims it
    second.release()


def test_waiting_ends_when_the_teacher_is_saved_or_the_claim_is_given_up(tmp_path: Path) -> None:
    teacher = tmp_path / "t.pt"
    holder = FitClaim(teacher)
    assert holder.take() is None
    teacher.write_bytes(b"weights")
    assert wait_for_fit(FitClaim(teacher), poll_s=0.01) == "done"
    teacher.unlink()
    holder.release()
    assert wait_for_fit(FitClaim(teacher), poll_s=0.01) == "released"  # failed or stopped without a teacher


def test_a_dead_holder_is_detected_and_its_claim_taken_over(tmp_path: Path) -> None:
    teacher = tmp_path / "t.pt"
    waiter = FitClaim(teacher, stale_after_s=60)
    plant_claim(waiter, socket.gethostname(), dead_pid())  # this host: the pid says it is gone
    assert wait_for_fit(waiter, poll_s=0.01) == "dead"
    plant_claim(waiter, "another-host", 1, age_s=120)  # another host: the heartbeat stopped
    assert "heartbeat stopped" in (waiter.dead(waiter.holder() or {}) or "")
    plant_claim(waiter, "another-host", 1)  # another host, fresh heartbeat: alive
    assert waiter.dead(waiter.holder() or {}) is None
    plant_claim(waiter, socket.gethostname(), dead_pid())
    assert waiter.take() is None and waiter.note is not None and "its process no longer exists" in waiter.note
    assert json.loads(waiter.path.read_text())["pid"] == os.getpid()
    waiter.release()


@pytest.mark.slow
def test_a_run_takes_over_the_fit_of_a_killed_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("KDRUN_CACHE", str(tmp_path / "cache"))
    teacher = tmp_path / "cache" / "teachers" / "t.pt"
    plant_claim(FitClaim(teacher), socket.gethostname(), dead_pid())  # a run killed (-9) in its fit
    res = run([*QUICK, "trainer.epochs=1", "trainer.max_steps=1", "logger.backends=[]", "teacher=convnet_l",
               f"teacher.checkpoint={teacher}", "teacher.fit_if_missing_epochs=1", "trainer.batch_size=256",
               "distill=kl"], tmp_path / "run")
    out = capsys.readouterr().out
    assert "took over the teacher fit of host" in out and "its process no longer exists" in out
    assert teacher.is_file() and res["steps"] == 1
    assert not FitClaim(teacher).path.exists()  # released after the teacher was saved


@pytest.mark.slow
def test_two_cold_runs_on_one_empty_cache_fit_the_teacher_once(tmp_path: Path) -> None:
    """The second run starts while the first holds the fit: it waits for that teacher (it used to fail on the
    fit directory's writer lock) and both runs finish. The first is paused (SIGSTOP) from its claim until
    the second says it waits, so that the second certainly arrives during the fit, however fast the fit is."""
    cache = tmp_path / "cache"
    teacher = cache / "teachers" / "t.pt"
    argv = [sys.executable, "-m", "kdrun.cli", "train", *QUICK, "trainer.epochs=1", "trainer.max_steps=2",
            "trainer.batch_size=256", "logger.backends=[]", "teacher=convnet_l",
            f"teacher.checkpoint={teacher}", "teacher.fit_if_missing_epochs=1", "distill=kl"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(KDRUN_CACHE=str(cache), OMP_NUM_THREADS="1")
    outs: list[list[str]] = [[], []]

    def start(i: int) -> subprocess.Popen:
        p = subprocess.Popen([*argv, f"hydra.run.dir={tmp_path / str(i)}"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)
        threading.Thread(target=lambda: outs[i].extend(p.stdout), daemon=True).start()  # type: ignore[arg-type]
        return p

    def until(done: Callable[[], bool], what: str) -> None:
        deadline = time.time() + 120
        while not done() and all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.05)
        assert done(), f"{what}: {outs}"

    claim = FitClaim(teacher).path
    procs = [start(0)]
    try:
        until(claim.exists, "the first run did not claim the fit")
        procs[0].send_signal(signal.SIGSTOP)
        assert not teacher.exists()
        procs.append(start(1))  # cold too: its own imports, then the missing teacher
        until(lambda: any("waiting for it to finish" in line for line in outs[1]), "the second run did not wait")
        procs[0].send_signal(signal.SIGCONT)
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
    time.sleep(0.2)  # the reader threads take the last lines
    a, b = ("".join(o) for o in outs)
    assert [p.returncode for p in procs] == [0, 0], (a, b)
    assert "training the teacher" in a and "kdrun: done." in a
    assert f"(host {socket.gethostname()}, pid {procs[0].pid}," in b and f"is fitting the teacher {teacher}" in b
    assert "training the teacher" not in b and f"the teacher {teacher} was fitted by another process" in b
    assert "kdrun: done." in b and "Traceback" not in b
    assert teacher.is_file() and (fit_dir(teacher) / "last.pt").is_file() and not claim.exists()

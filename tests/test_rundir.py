"""Run-directory protection (kdrun/runtime/rundir.py): fresh-run refusal, overwrite, resume=auto, the writer lock."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import pytest

from kdrun.runtime import rundir as R
def _fake_run(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "last.pt").write_bytes(b"x")
    (d / "results.json").write_text("{}")
    (d / "metrics.jsonl").write_text('{"step": 1}\n')
    (d / "tb").mkdir()
    (d / "tb" / "events").write_text("e")


def test_fresh_run_into_a_run_dir_is_refused(tmp_path: Path) -> None:
    _fake_run(tmp_path)
    with pytest.raises(R.RunDirError) as e:
        R.check_fresh(tmp_path, resume=None, overwrite=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and "trainer.resume=auto" in msg and "trainer.overwrite=true" in msg
    assert "\n" not in msg  # one paragraph
    assert (tmp_path / "last.pt").exists()  # nothing touched


def test_metrics_alone_count_as_a_run(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(R.RunDirError):
        R.check_fresh(tmp_path, resume=None, overwrite=False)


def test_empty_or_hydra_only_dir_is_fresh(tmp_path: Path) -> None:
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "cli.log").write_text("")
    assert R.check_fresh(tmp_path, resume=None, overwrite=False) is None


def test_overwrite_removes_the_earlier_run_but_not_hydra(tmp_path: Path) -> None:
    _fake_run(tmp_path)
    (tmp_path / ".hydra").mkdir()
    note = R.check_fresh(tmp_path, resume=None, overwrite=True)
    assert note and "removed" in note
    assert not any((tmp_path / n).exists() for n in ("last.pt", "results.json", "metrics.jsonl", "tb"))
    assert (tmp_path / ".hydra").is_dir()


def test_resume_auto(tmp_path: Path) -> None:
    note = R.check_fresh(tmp_path / "new", resume="auto", overwrite=False)
    assert note and "no checkpoint" in note and "fresh" in note
    _fake_run(tmp_path / "run")
    assert R.check_fresh(tmp_path / "run", resume="auto", overwrite=False) is None
    (tmp_path / "dead").mkdir()
    (tmp_path / "dead" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(R.RunDirError, match="cannot be continued"):
        R.check_fresh(tmp_path / "dead", resume="auto", overwrite=False)
    with pytest.raises(R.RunDirError, match="contradict"):
        R.check_fresh(tmp_path / "run", resume="auto", overwrite=True)


def test_unusable_run_dirs(tmp_path: Path) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(R.RunDirError, match="is a file"):
        R.check_usable(f / "run")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(R.RunDirError, match="not writable"):
            R.check_usable(ro / "run")
    R.check_usable(tmp_path / "a" / "b")  # creatable


def test_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    with R.RunLock(tmp_path):
        holder = json.loads((tmp_path / R.LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(R.RunDirError) as e:
            R.RunLock(tmp_path).acquire()
        assert f"pid {os.getpid()}" in str(e.value) and socket.gethostname() in str(e.value)
    assert not (tmp_path / R.LOCK_NAME).exists()  # released
    with R.RunLock(tmp_path):  # and can be taken again
        pass


def _hold(d: str, ready, release) -> None:  # child process: takes the lock, waits
    lock = R.RunLock(Path(d)).acquire()
    ready.set()
    release.wait(20)
    lock.release()


def _hold_and_die(d: str) -> None:  # child process: takes the lock and dies without releasing it
    R.RunLock(Path(d)).acquire()
    os._exit(0)


def test_lock_between_processes_and_stale_after_kill(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(str(tmp_path), ready, release))
    p.start()
    try:
        assert ready.wait(60)
        with pytest.raises(R.RunDirError, match=f"pid {p.pid}"):
            R.RunLock(tmp_path).acquire()
    finally:
        release.set()
        p.join(30)
    # A holder killed without releasing: same host, dead pid -> stale, taken over, and said.
    q = ctx.Process(target=_hold_and_die, args=(str(tmp_path),))
    q.start()
    q.join(60)
    assert (tmp_path / R.LOCK_NAME).exists()
    lock = R.RunLock(tmp_path).acquire()
    assert lock.note and "stale" in lock.note and f"pid {q.pid}" in lock.note
    lock.release()


def test_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path: Path) -> None:
    path = tmp_path / R.LOCK_NAME
    path.write_text(json.dumps({"host": "node-that-is-not-this-one", "pid": 1, "start": time.time()}))
    with pytest.raises(R.RunDirError, match="node-that-is-not-this-one"):
        R.RunLock(tmp_path, stale_after_s=300).acquire()
    old = time.time() - 1000
    os.utime(path, (old, old))
    lock = R.RunLock(tmp_path, stale_after_s=300).acquire()
    assert lock.note and "heartbeat stopped" in lock.note
    lock.release()


def test_heartbeat_refreshes_the_lock(tmp_path: Path) -> None:
    lock = R.RunLock(tmp_path, heartbeat_s=0.05).acquire()
    try:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        deadline = time.time() + 5
        while lock.path.stat().st_mtime < time.time() - 100 and time.time() < deadline:
            time.sleep(0.05)
        assert lock.path.stat().st_mtime > time.time() - 100
    finally:
        lock.release()


def test_release_never_removes_another_holders_lock(tmp_path: Path) -> None:
    lock = R.RunLock(tmp_path).acquire()
    lock.path.write_text(json.dumps({"host": "x", "pid": 1, "start": 0, "token": "someone-else"}))
    lock.release()
    assert lock.path.exists()


def test_a_lock_is_never_seen_without_its_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file appears with its record already in it (a hard link of a written file): a second process
    that loses the race reads the holder's host and pid, never "host ?, pid ?" (a CI failure of the old
    O_CREAT | O_EXCL-then-write). Checked at the moment the lock's name appears."""
    lock_path = tmp_path / R.LOCK_NAME
    seen: list[dict] = []
    real_link = os.link

    def link_and_look(src: str, dst: str) -> None:
        real_link(src, dst)
        seen.append(json.loads(Path(dst).read_text()))

    monkeypatch.setattr(os, "link", link_and_look)
    with R.RunLock(tmp_path) as lock:
        assert seen and seen[0]["pid"] == os.getpid() and seen[0]["token"] == lock.token
        assert sorted(p.name for p in tmp_path.iterdir()) == [R.LOCK_NAME]  # no private file left over
        with pytest.raises(R.RunDirError, match=f"pid {os.getpid()},"):
            R.RunLock(tmp_path).acquire()
        assert sorted(p.name for p in tmp_path.iterdir()) == [R.LOCK_NAME]
    assert not lock_path.exists()


def test_without_hard_links_the_lock_falls_back_to_exclusive_create(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src: str, dst: str) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert R.create_exclusive(tmp_path / "f.lock", {"pid": 7, "token": "a"})
    assert not R.create_exclusive(tmp_path / "f.lock", {"pid": 8, "token": "b"})
    assert json.loads((tmp_path / "f.lock").read_text())["pid"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.lock"]

"""Issue #14: a run never loses or fakes results. Each hostile input → the expected message and exit status.

In-process wherever possible (``kdrun.cli.main`` raises ``SystemExit(2)``; ``train`` raises the user error);
one subprocess test (two ``kdrun train`` at once into one directory). Runs are tiny digits runs (+debug=quick,
a few steps, no teacher unless the case is about teachers).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

import kdrun.runtime.checkpoint as ckpt
from kdrun import cli
from kdrun.analysis import tables
from kdrun.runtime import preemption as P
from kdrun.balancers.fixed import Fixed
from kdrun.config import ConfigError
from kdrun.engine.step import StepSettings
from kdrun.engine.teacher import check_teacher_weights, fit_dir, needs_fit, teacher_cache
from kdrun.errors import NonFiniteError, find_user_error
from kdrun.models.build import CheckpointError
from kdrun.runtime.rundir import LOCK_NAME, RunDirError, RunLock
from tests.conftest import QUICK, compose_cfg, run
from tests.test_cli_errors import QUIET, kdrun  # noqa: F401  (kdrun: the in-process CLI fixture)
from tests.engine._parts import NaNAtStep, batches, make_step

TINY = [*QUICK, "trainer.epochs=1", "trainer.max_steps=2", "logger.backends=[]"]

def one_paragraph(err: str, *needles: str) -> None:
    line = err.strip().splitlines()[-1]
    assert line.startswith("kdrun: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in line, (n, line)


# -- item 1: a fresh run into a run's directory; the writer lock ------------------------------------------


def test_fresh_run_into_a_finished_run_is_refused_and_changes_nothing(tmp_path: Path, kdrun: Callable) -> None:
    d = tmp_path / "run"
    run(TINY, d)
    before = {n: (d / n).read_bytes() for n in ("results.json", "metrics.jsonl", "last.pt", "config.yaml")}
    code, err = kdrun("train", *TINY, f"hydra.run.dir={d}", *QUIET)
    assert code == 2
    one_paragraph(err, f"{d} already holds a run", "trainer.resume=auto", "trainer.overwrite=true")
    assert {n: (d / n).read_bytes() for n in before} == before  # not a byte written
    assert not (d / LOCK_NAME).exists()  # the refused run released the lock
    res = run([*TINY, "trainer.overwrite=true", "seed=5"], d)  # starting over is allowed when asked for
    assert res["config"]["seed"] == 5  # and the old metrics were removed, not appended to:
    assert len((d / "metrics.jsonl").read_text().splitlines()) == len(before["metrics.jsonl"].splitlines())


def test_second_writer_is_refused_naming_the_holder_and_lock_is_released(tmp_path: Path) -> None:
    d = tmp_path / "run"
    with RunLock(d):  # a live holder: this very process
        with pytest.raises(RunDirError, match=rf"Another kdrun process is writing to .*pid {os.getpid()}"):
            run(TINY, d)
        assert not (d / "metrics.jsonl").exists()
    run(TINY, d)
    assert not (d / LOCK_NAME).exists()  # released after a finished run
    with pytest.raises(NonFiniteError):  # and after one that raised
        run([*TINY, "trainer.resume=auto", "trainer.max_steps=4", "trainer.nonfinite=raise",
             "+distill.nan._target_=tests.helpers.NaNAt", "+distill.nan.at=[0]", "teacher=convnet_l",
             "teacher.allow_random=true", "teacher.checkpoint=null"], d)
    assert not (d / LOCK_NAME).exists()


def test_default_run_dirs_are_unique_within_a_second() -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    def run_dir() -> tuple[str, str]:
        with initialize_config_dir(config_dir=str(cli.config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", return_hydra_config=True)
        return (OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"],
                OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"])

    (raw, a), (_, b) = run_dir(), run_dir()
    assert "%f" in raw  # microseconds: two runs started in the same second get two directories
    assert a != b


@pytest.mark.slow
def test_two_simultaneous_trains_one_run_intact_other_refused(tmp_path: Path) -> None:
    """Two `kdrun train` into one explicit hydra.run.dir, started together: the one that takes the lock
    trains (long enough that the other certainly starts meanwhile) and is then stopped by SIGTERM (an
    orderly stop: last.pt, exit 0); the other exits 2 naming the holder."""
    d = tmp_path / "run"
    argv = [sys.executable, "-m", "kdrun.cli", "train", *QUICK, "trainer.epochs=500", "logger.backends=[]",
            f"hydra.run.dir={d}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    try:
        deadline = time.time() + 240
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.2)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        _, err = loser.communicate()
        assert loser.returncode == 2, err
        assert json.loads((d / LOCK_NAME).read_text())["pid"] == winner.pid
        assert f"Another kdrun process is writing to {d}" in err and f"pid {winner.pid}," in err, err
        assert "Traceback" not in err and err.strip().startswith("kdrun: error: "), err
        # The winner has logged a training step, so it is inside the loop, whose stop handler turns SIGTERM
        # into the orderly stop (metrics.jsonl alone exists from just before the loop, when SIGTERM's
        # default action would still end the process: a race this test lost now and then).
        while time.time() < deadline and '"kind": "train"' not in (
                (d / "metrics.jsonl").read_text() if (d / "metrics.jsonl").exists() else ""):
            time.sleep(0.2)
        winner.send_signal(signal.SIGTERM)
        winner.communicate(timeout=120)
        assert winner.returncode == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    state = ckpt.load(d / "last.pt")  # the winner's run is intact and resumable
    assert state["step"] > 0 and not (d / LOCK_NAME).exists()


# -- item 3: disk full during a save ----------------------------------------------------------------------


def test_disk_full_save_keeps_the_previous_checkpoint_and_says_how_to_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kdrun: Callable) -> None:
    d = tmp_path / "run"
    run([*TINY, "trainer.max_steps=2"], d)
    good = (d / "last.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # noqa: ANN001, ANN002, ANN003
        real_save({"partial": torch.zeros(10)}, f)  # some bytes reach the temporary file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    code, err = kdrun("train", *TINY, "trainer.max_steps=3", "trainer.resume=auto", f"hydra.run.dir={d}", *QUIET)
    assert code == 2
    one_paragraph(err, "The disk is full (No space left on device): saving last.pt after step 3",
                  f"previous good checkpoint {d / 'last.pt'} is intact", "trainer.resume=auto", f"hydra.run.dir={d}")
    assert (d / "last.pt").read_bytes() == good
    assert not [p for p in d.iterdir() if ".tmp." in p.name]  # no temporary file left behind
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert run([*TINY, "trainer.max_steps=3", "trainer.resume=auto"], d)["steps"] == 3  # the advice works


# -- item 4: non-finite steps --------------------------------------------------------------------------------


def test_a_streak_of_skipped_steps_stops_the_run() -> None:
    step = make_step(Fixed(),
                     extra={"nan": NaNAtStep(at=[1, 2, 4, 5, 6])}, settings=StepSettings(max_nonfinite_streak=3))
    data = batches(7)
    for i in range(6):  # skips at 1, 2 (streak 2), a finite step resets it, 4, 5 (streak 2)
        step(data[i], i)
    assert step.skipped == 4 and step.streak == 2
    with pytest.raises(NonFiniteError, match=r"the last 3 steps \(up to step 6\) were all non-finite"):
        step(data[6], 6)
    off = make_step(Fixed(),
                    extra={"nan": NaNAtStep(at=list(range(5)))}, settings=StepSettings(max_nonfinite_streak=0))
    for i in range(5):
        off(data[i], i)  # 0 disables the rule
    assert off.skipped == 5


def test_nonfinite_raise_and_streak_are_one_paragraph_exit_2(tmp_path: Path, kdrun: Callable) -> None:
    nan = ["teacher=convnet_l", "teacher.checkpoint=null", "teacher.allow_random=true", "distill=kl",
           "+distill.nan._target_=tests.helpers.NaNAt", "+distill.nan.at=[0,1,2,3]", "trainer.max_steps=5"]
    code, err = kdrun("train", *TINY, *nan, "trainer.nonfinite=raise", f"hydra.run.dir={tmp_path / 'a'}", *QUIET)
    assert code == 2
    one_paragraph(err, "non-finite gradient at step 0", "objectives with non-finite values: distill")
    code, err = kdrun("train", *TINY, *nan, "trainer.max_nonfinite_streak=3", f"hydra.run.dir={tmp_path / 'b'}",
                      *QUIET)
    assert code == 2
    one_paragraph(err, "the last 3 steps (up to step 2) were all non-finite", "trainer.max_nonfinite_streak")
    assert not (tmp_path / "b" / "results.json").exists()  # not "done"
    res = run([*TINY, *nan[:5], "+distill.nan.at=[1]", "trainer.max_steps=3"], tmp_path / "c")
    assert res["nonfinite_skipped"] == 1
    assert json.loads((tmp_path / "c" / "results.json").read_text())["nonfinite_skipped"] == 1


# -- items 6, 7: where a missing teacher is fitted; random teachers --------------------------------------


def test_a_missing_teacher_is_fitted_only_in_the_cache(tmp_path: Path, kdrun: Callable) -> None:
    typo = tmp_path / "nope" / "teacher.pt"
    cfg = compose_cfg(["+recipe=quickstart", f"teacher.checkpoint={typo}"])
    with pytest.raises(ConfigError, match=rf"teacher.checkpoint={typo} does not exist.*teacher cache "
                                          rf"{teacher_cache()}/"):
        needs_fit(cfg)
    code, err = kdrun("train", "+recipe=quickstart", f"teacher.checkpoint={typo}",
                      f"hydra.run.dir={tmp_path / 'run'}", *QUIET)
    assert code == 2
    one_paragraph(err, f"teacher.checkpoint={typo} does not exist", str(teacher_cache()))
    assert not (tmp_path / "nope").exists()  # nothing created at the typed path
    cached = compose_cfg(["+recipe=quickstart"])  # the recipe's default: under $KDRUN_CACHE/teachers/
    assert needs_fit(cached) in (None, teacher_cache() / "digits_convnet_l.pt")


def test_a_random_teacher_is_refused_unless_allowed(tmp_path: Path, kdrun: Callable) -> None:
    code, err = kdrun("train", *TINY, "teacher=convnet_l", "teacher.checkpoint=null", "distill=kl",
                      f"hydra.run.dir={tmp_path / 'run'}", *QUIET)
    assert code == 2
    one_paragraph(err, "The teacher has random weights", "teacher.allow_random=true")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    check_teacher_weights(compose_cfg(["teacher=convnet_l", "teacher.checkpoint=null", "teacher.allow_random=true"]))
    check_teacher_weights(compose_cfg(["teacher=timm", "teacher.model.pretrained=true"]))  # pretrained: not random
    with pytest.raises(ConfigError, match="random weights"):
        check_teacher_weights(compose_cfg(["teacher=timm"]))


# -- item 8: a checkpoint this user may not read ------------------------------------------------------------


def test_permission_denied_is_not_called_corruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdrun.models import build

    d = tmp_path / "run"
    run(TINY, d)
    (d / "best.pt").write_bytes((d / "last.pt").read_bytes())

    def denied(path, *a, **k):  # noqa: ANN001, ANN002, ANN003
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(build, "open", denied, raising=False)  # the tests may run as root: chmod would not deny
    with pytest.raises(CheckpointError) as e:
        ckpt.load_resume(d / "last.pt", torch.nn.Linear(1, 1))
    msg = str(e.value)
    assert f"checkpoint {d / 'last.pt'} cannot be read: permission denied" in msg
    assert "truncated" not in msg and "corrupt" not in msg and "trainer.resume=" not in msg
    monkeypatch.undo()
    (d / "last.pt").write_bytes(b"garbage")  # a damaged one still points at the good ones
    with pytest.raises(CheckpointError, match=r"truncated, corrupted.*trainer.resume=.*best.pt"):
        ckpt.load_resume(d / "last.pt", torch.nn.Linear(1, 1))


# -- item 9: Ctrl-C ----------------------------------------------------------------------------------------


def test_second_ctrl_c_exits_at_once_with_one_line(capsys: pytest.CaptureFixture) -> None:
    original = signal.getsignal(signal.SIGINT)
    pre = P.Preemption(["SIGINT"])
    pre._escalate_sigint = True
    with pytest.raises(SystemExit) as e:
        with pre:
            os.kill(os.getpid(), signal.SIGINT)  # recorded
            os.kill(os.getpid(), signal.SIGINT)  # insisting
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err.count("second interrupt") == 1 and "Traceback" not in err
    pre.chain()
    pre = P.Preemption(["SIGINT"])
    pre._escalate_sigint = True
    with pre:
        os.kill(os.getpid(), signal.SIGINT)
        assert pre.should_stop(1)
    with pytest.raises(SystemExit):  # after the loop, while the stop is completed (the save): still one line
        os.kill(os.getpid(), signal.SIGINT)
    pre.chain()
    assert signal.getsignal(signal.SIGINT) is original  # the stop is complete: the handler before ours again


@pytest.mark.slow
def test_a_stopped_teacher_fit_continues_when_the_command_is_rerun(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("KDRUN_CACHE", str(tmp_path / "cache"))
    teacher = tmp_path / "cache" / "teachers" / "t.pt"
    over = [*TINY, "teacher=convnet_l", f"teacher.checkpoint={teacher}", "teacher.fit_if_missing_epochs=1",
            "teacher.model.widths=[8,16,32]", "distill=kl", "trainer.max_steps=1"]
    real = P.Preemption.should_stop

    def ctrl_c_at_step_3(self: P.Preemption, step: int, force_check: bool = False) -> bool:
        if step == 3:
            self.signum = self.agreed = signal.SIGINT
            return True
        return real(self, step, force_check)

    monkeypatch.setattr(P.Preemption, "should_stop", ctrl_c_at_step_3)
    out = run(over, tmp_path / "run")
    assert out["preempted"] == "SIGINT" and out["run_dir"] == str(tmp_path / "run")  # the advice names this dir
    assert not teacher.exists() and ckpt.load(fit_dir(teacher) / "last.pt")["step"] == 3
    monkeypatch.setattr(P.Preemption, "should_stop", real)
    capsys.readouterr()
    res = run(over, tmp_path / "run")  # the same command again (fresh: the outer dir holds no run yet)
    printed = capsys.readouterr().out
    assert "continuing the stopped teacher fit" in printed and "at epoch 0, step 3" in printed
    assert teacher.is_file() and res["steps"] == 1


# -- item 10: kdrun tables on files that are not results ----------------------------------------------------


def test_tables_skips_bad_results_files_and_says_why_cells_are_blank(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def put(name: str, content: bytes | object) -> None:
        (tmp_path / name).mkdir()
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        (tmp_path / name / "results.json").write_bytes(data)

    paper = {"table": "cifar100", "row": "kd", "column": "resnet56_resnet20"}
    put("binary", b"\x80\x04\x95\xff\x00garbage")
    put("list", [1, 2, 3])
    put("badconfig", {"config": "oops", "final": {}})
    put("null", {"config": {"paper": paper, "seed": 0}, "best": {"top1": None}, "final": {"top1": None}})
    put("string", {"config": {"paper": paper, "seed": 1}, "best": {"top1": "71.2"}})
    put("good", {"config": {"paper": paper, "seed": 2}, "best": {"top1": 70.5}})
    assert tables.main([str(tmp_path), "--table", "cifar100", "--seeds", "all"]) == 0
    err = capsys.readouterr().err.splitlines()
    lines = {k: [line for line in err if f"{tmp_path / k}" in line] for k in ("binary", "list", "badconfig", "null",
                                                                              "string", "good")}
    assert lines["binary"] == [f"kdrun tables: skipping {tmp_path / 'binary' / 'results.json'}: it is not text "
                               "(a binary file?)"]
    assert "holds a JSON array at its top level" in lines["list"][0]
    assert "holds 'config' as a JSON string" in lines["badconfig"][0]
    assert len(lines["null"]) == 1 and "has best.top1 = null (the run's value was NaN or infinite)" in lines["null"][0]
    assert len(lines["string"]) == 1 and 'has best.top1 = "71.2", a JSON string, not a number' in lines["string"][0]
    assert lines["good"] == []


# -- item 11: wall time across a resume -----------------------------------------------------------------------


def test_wall_time_covers_every_session(tmp_path: Path) -> None:
    d = tmp_path / "run"
    first = run([*TINY, "trainer.max_steps=2"], d)
    saved = ckpt.load(d / "last.pt")["wall_time_s"]
    assert 0 < saved <= first["wall_time_s"]
    second = run([*TINY, "trainer.max_steps=4", "trainer.resume=auto"], d)
    assert second["wall_time_s"] >= saved + second["session_wall_time_s"]
    assert ckpt.load(d / "last.pt")["wall_time_s"] >= saved


def test_user_errors_include_the_new_kinds() -> None:
    assert find_user_error(RuntimeError("x")) is None
    for e in (NonFiniteError("x"), RunDirError("x"), CheckpointError("x")):
        assert find_user_error(e) is e

"""Issue #21 items 3–7: a refused or failed command changes nothing that exists and leaves no stub; a
finished run is left alone; a resumed run logs every step once; workers die with their launcher.

Every check hashes the whole directory (every file's relative path and bytes) before and after."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from kdrun.runtime.logger import RunLogger, drop_rows_after
from kdrun.runtime.run_guard import missing_dirs
from tests.conftest import QUICK, event_scalars
from tests.test_cli_errors import kdrun  # noqa: F401  (the in-process CLI fixture)

ROOT = Path(__file__).resolve().parents[1]
# Composition quiet (no Hydra logging setup in the test process); unlike QUIET in test_cli_errors, the
# project's own hydra.output_subdir (null) and run-guard callback stay as a user has them.
QUIET_LOGS = ["hydra/job_logging=none", "hydra/hydra_logging=none"]
TINY = [*QUICK, "trainer.epochs=1", "trainer.max_steps=2", "logger.backends=[]", *QUIET_LOGS]


def tree_hash(root: Path) -> dict[str, str]:
    """Relative path → sha1 of every file under ``root`` (directories by their files)."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def no_traceback(err: str) -> None:
    assert "Traceback" not in err, err


@pytest.fixture
def finished_run(tmp_path: Path, kdrun: Callable) -> Path:  # noqa: F811
    d = tmp_path / "run"
    code, err = kdrun("train", *TINY, f"hydra.run.dir={d}")
    assert code == 0, err
    assert (d / ".hydra" / "overrides.yaml").is_file() and (d / "cli.log").stat().st_size > 0
    return d


def test_a_refused_fresh_run_leaves_the_finished_run_byte_for_byte(finished_run: Path, kdrun: Callable) -> None:  # noqa: F811
    before = tree_hash(finished_run)
    code, err = kdrun("train", *TINY, "seed=7", f"hydra.run.dir={finished_run}")
    assert code == 2 and "already holds a run" in err
    no_traceback(err)
    assert tree_hash(finished_run) == before  # .hydra/config.yaml and overrides.yaml included


def test_a_failed_resume_leaves_the_run_byte_for_byte(finished_run: Path, kdrun: Callable) -> None:  # noqa: F811
    """The checkpoint does not fit the requested student: the resume fails after the run directory was
    accepted, before the run started; nothing of the run changes (cli.log not appended either)."""
    (finished_run / "results.json").unlink()  # not finished: a resume would continue it
    before = tree_hash(finished_run)
    code, err = kdrun("train", *TINY, "trainer.max_steps=4", "student.model.widths=[4,8,16]",
                      "trainer.resume=auto", f"hydra.run.dir={finished_run}")
    assert code == 2, err
    no_traceback(err)
    assert tree_hash(finished_run) == before


def test_resume_auto_of_a_finished_run_changes_nothing_and_says_so(finished_run: Path) -> None:
    before = tree_hash(finished_run)
    assert json.loads((finished_run / "results.json").read_text())["images_per_s"] > 0
    out = subprocess.run([sys.executable, "-m", "kdrun.cli", "train", *TINY, "trainer.resume=auto",
                          f"hydra.run.dir={finished_run}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert tree_hash(finished_run) == before  # results.json keeps its images_per_s, cli.log its bytes
    assert (f"the run in {finished_run} is finished (trainer.max_steps=2 reached at step 2); nothing was "
            "changed") in out.stdout
    assert "trainer.overwrite=true" in out.stdout


def test_a_refused_sweep_rerun_keeps_multirun_yaml(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    argv = [sys.executable, "-m", "kdrun.cli", "train", "-m", *TINY, "balancer.alpha_task=0.5,1.0",
            f"hydra.sweep.dir={sweep}"]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = tree_hash(sweep)
    assert "multirun.yaml" in before
    again = subprocess.run([*argv[:5], *TINY, "logger.log_every=3", "balancer.alpha_task=0.5,1.0",
                            f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    no_traceback(again.stderr)
    assert tree_hash(sweep) == before


@pytest.mark.parametrize("multirun", [False, True])
def test_a_command_failing_validation_creates_no_directory(tmp_path: Path, kdrun: Callable,  # noqa: F811
                                                           multirun: bool) -> None:
    (tmp_path / "keep").mkdir()  # an existing (empty) parent stays
    target = tmp_path / "keep" / "a" / "b"
    where = f"hydra.sweep.dir={target}" if multirun else f"hydra.run.dir={target}"
    code, err = kdrun("train", *(["-m"] if multirun else []), *TINY, "trainer.epochs=abc", where)
    assert code == 2 and "trainer.epochs" in err
    no_traceback(err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keep"]


def test_missing_dirs_are_what_mkdir_p_would_create(tmp_path: Path) -> None:
    assert missing_dirs(tmp_path / "x" / "y") == [tmp_path / "x" / "y", tmp_path / "x"]
    assert missing_dirs(tmp_path) == []


# -- item 6: every step once after a resume ---------------------------------------------------------------

def test_rows_past_the_checkpoint_are_dropped_once(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s} for s in (1, 2, 3, 4, 5)] + [{"kind": "val", "step": 4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "st')  # torn last line
    assert drop_rows_after(path, 4) == 2
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == rows[:4] + [rows[-1]]
    assert drop_rows_after(path, 4) == 0  # idempotent


def test_a_resumed_logger_purges_tensorboard_after_the_checkpoint(tmp_path: Path) -> None:
    first = RunLogger(tmp_path, backends=["tensorboard"], jsonl=True)
    for step in range(1, 7):
        first.log(step, {"loss": float(step)})
    first.close()  # as if killed after step 6, with the last checkpoint at step 4
    second = RunLogger(tmp_path, backends=["tensorboard"], jsonl=True, resumed_at=4)
    for step in (5, 6):
        second.log(step, {"loss": 10.0 * step})
    second.close()
    assert event_scalars(tmp_path)["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0)]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# -- item 7: workers die with their launcher ---------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped by its new parent yet) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_kill9_of_the_launcher_takes_its_workers_down(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "kdrun.cli", "train", *QUICK, "trainer.devices=2", "trainer.epochs=200",
         "logger.backends=[]", "trainer.preempt_grace_s=20", f"hydra.run.dir={run_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (run_dir / "metrics.jsonl").is_file():  # training
            time.sleep(0.2)
        assert (run_dir / "metrics.jsonl").is_file(), "the workers did not start training"
        workers = [int(p) for p in subprocess.run(["pgrep", "-f", f"kdrun.commands.launch .* {run_dir}"],
                                                  capture_output=True, text=True).stdout.split()]
        assert len(workers) == 2, workers
        launcher.kill()  # SIGKILL: the launcher can tell no one
        launcher.wait()
        deadline = time.monotonic() + 60
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), "workers outlived their launcher"
    finally:
        for p in workers:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- similar inputs: a recipe's role keys without the role, a group that is not in the defaults list ------

@pytest.mark.parametrize("argv, needles", [
    (["+recipe=cifar100_resnet56_resnet20_kd", "teacher=none"],
     ["teacher has no model", "teacher.checkpoint", "+recipe=cifar100_student_resnet20", "distill=none"]),
    (["+recipe=quickstart", "method=deit_kd"],
     ["method is not selected by default", "add it with +method=deit_kd", "after +recipe=NAME"]),
])
def test_a_switch_that_cannot_apply_is_one_paragraph(tmp_path: Path, kdrun: Callable,  # noqa: F811
                                                     argv: list[str], needles: list[str]) -> None:
    code, err = kdrun("train", *argv, *QUIET_LOGS, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2
    assert err.startswith("kdrun: error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)
    assert not (tmp_path / "run").exists()  # refused: no directory


def test_ctrl_c_while_the_cli_is_imported_is_one_line() -> None:
    """The console entry imports kdrun.cli inside its try: SIGINT before kdrun.cli is even loaded (the
    signal is sent first, then the import runs) is one line and 130, not an import traceback."""
    script = ("import os, signal\n"
              "from kdrun.__main__ import entry\n"
              "import builtins\n"
              "real = builtins.__import__\n"
              "def interrupt_cli(name, *a, **k):\n"
              "    if name == 'kdrun.cli':\n"
              "        os.kill(os.getpid(), signal.SIGINT)\n"
              "    return real(name, *a, **k)\n"
              "builtins.__import__ = interrupt_cli\n"
              "entry()\n")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert (p.returncode, p.stderr) == (130, "kdrun: interrupted (Ctrl-C).\n"), p.stderr

"""Issue #21 items 12 and 13 (checkpoints): a damaged checkpoint, a directory given as a checkpoint, a resume
with another balancer or optimiser, and Ctrl-C in the first seconds. Each input → exit status, no traceback,
one paragraph that names the problem and the way on.

In-process (``kdrun.cli.main``, the fixture of tests/test_cli_errors.py) except the Ctrl-C case, which
needs a process to interrupt. The runs are tiny digits runs (+debug=quick, two steps).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import kdrun.runtime.checkpoint as ckpt
from kdrun.models.build import CheckpointError
from tests.conftest import QUICK, run
from tests.test_cli_errors import QUIET, kdrun  # noqa: F401  (kdrun: the in-process CLI fixture)

TINY = [*QUICK, "trainer.epochs=1", "trainer.max_steps=2", "logger.backends=[]"]
# A distillation run (a teacher and a distill term): the balancer weighs two objectives, so that
# balancer=dto is a valid choice for it. The teacher is random on purpose: only the files matter here.
KD = ["teacher=convnet_l", "teacher.checkpoint=null", "teacher.allow_random=true", "distill=kl"]


def one_paragraph(err: str, *needles: str) -> str:
    line = err.strip().splitlines()[-1]
    assert err.count("\n") == 1 and line.startswith("kdrun: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in line, (n, line)
    return line


@pytest.fixture(scope="module")
def done_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run directory (best.pt, last.pt, config.yaml) of a two-objective run."""
    d = tmp_path_factory.mktemp("done") / "run"
    run([*TINY, *KD], d)
    assert (d / "best.pt").is_file() and (d / "last.pt").is_file()
    return d


def damaged_copy(done_run: Path, dest: Path, damage: str) -> Path:
    """A copy of the run directory whose last.pt is damaged (best.pt beside it stays good)."""
    shutil.copytree(done_run, dest)
    last = dest / "last.pt"
    data = last.read_bytes()
    last.write_bytes(b"" if damage == "empty" else data[: len(data) // 3])
    return last


# -- item 12: a 0-byte or truncated checkpoint, wherever a checkpoint is given --------------------------------


@pytest.mark.parametrize("damage", ["empty", "truncated"])
@pytest.mark.parametrize("entry", ["eval", "export", "trainer.resume", "teacher.checkpoint", "student.checkpoint"])
def test_a_damaged_checkpoint_is_one_paragraph_naming_it_and_a_good_one(
        kdrun: Callable, done_run: Path, tmp_path: Path, damage: str, entry: str) -> None:
    bad = damaged_copy(done_run, tmp_path / "copy", damage)
    good = bad.with_name("best.pt")
    if entry in ("eval", "export"):
        code, err = kdrun(entry, str(bad))
    else:
        over = KD if entry != "teacher.checkpoint" else [k for k in KD if not k.startswith("teacher.checkpoint")]
        code, err = kdrun("train", *TINY, *over, f"{entry}={bad}", f"hydra.run.dir={tmp_path / 'new'}", *QUIET)
    assert code == 2
    problem = ["is empty (0 bytes)"] if damage == "empty" else ["cannot be read (", "it is truncated, corrupted"]
    line = one_paragraph(err, f"checkpoint {bad} ", *problem)
    # the way on: the good checkpoint of the same run, as the option to give it with when resuming
    assert (f"trainer.resume={good}" if entry == "trainer.resume" else str(good)) in line
    if entry == "teacher.checkpoint":
        assert line.startswith("kdrun: error: teacher.checkpoint: ")
    assert not (tmp_path / "new" / "last.pt").exists()


def test_a_damaged_checkpoint_alone_says_to_use_a_copy_or_start_fresh(kdrun: Callable, tmp_path: Path) -> None:
    lone = tmp_path / "lone.pt"
    lone.write_bytes(b"")
    code, err = kdrun("train", *TINY, f"trainer.resume={lone}", f"hydra.run.dir={tmp_path / 'new'}", *QUIET)
    assert code == 2
    one_paragraph(err, f"checkpoint {lone} is empty (0 bytes)", "good copy", "start a fresh run (trainer.resume=null")
    lone.write_bytes(b"\x00" * 64)  # not empty, not a checkpoint
    code, err = kdrun("eval", str(lone))
    assert code == 2
    one_paragraph(err, f"checkpoint {lone} cannot be read", "not a torch checkpoint", "Use a good copy of it.")


# -- item 13: a directory given as a checkpoint is not "does not exist" -------------------------------------


def test_a_directory_given_as_a_checkpoint_names_the_file_in_it(
        kdrun: Callable, done_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    new = f"hydra.run.dir={tmp_path / 'new'}"
    for command in ("eval", "export"):
        code, err = kdrun(command, str(empty))
        assert code == 2
        one_paragraph(err, f"{empty} is a directory without best.pt or last.pt", "path of a checkpoint file")

    code, err = kdrun("train", *TINY, *KD, f"trainer.resume={done_run}", new, *QUIET)
    assert code == 2
    line = one_paragraph(err, f"trainer.resume={done_run} is a directory", f"trainer.resume={done_run / 'last.pt'}",
                         f"hydra.run.dir={done_run} trainer.resume=auto")
    assert "no such" not in line and "does not exist" not in line
    code, err = kdrun("train", *TINY, *KD, f"trainer.resume={empty}", new, *QUIET)
    assert code == 2
    one_paragraph(err, f"trainer.resume={empty} is a directory", "holds no last.pt")

    teacher = [k for k in KD if not k.startswith("teacher.checkpoint")]
    code, err = kdrun("train", *TINY, *teacher, f"teacher.checkpoint={done_run}", new, *QUIET)
    assert code == 2
    one_paragraph(err, f"teacher.checkpoint: checkpoint {done_run} is a directory", f"e.g. {done_run / 'best.pt'}")
    # with fit_if_missing_epochs the directory used to be reported as a missing file (and fitted over)
    monkeypatch.setenv("KDRUN_CACHE", str(tmp_path / "cache"))
    in_cache = tmp_path / "cache" / "teachers" / "t.pt"
    in_cache.mkdir(parents=True)
    code, err = kdrun("train", *TINY, *teacher, f"teacher.checkpoint={in_cache}", "teacher.fit_if_missing_epochs=1",
                      new, *QUIET)
    assert code == 2
    line = one_paragraph(err, f"checkpoint {in_cache} is a directory, not a checkpoint file")
    assert "does not exist" not in line and not (tmp_path / "cache" / "teachers" / "t_fit").exists()


# -- item 12: resuming with another balancer (or optimiser) --------------------------------------------------


@pytest.mark.parametrize("override,key,theirs,ours", [
    ("balancer=dto", "balancer", "kdrun.balancers.fixed.Fixed", "kdrun.balancers.dto.DTOAmortised"),
    ("optimizer=adamw", "optimizer", "kdrun.optim.optimizer.sgd", "kdrun.optim.optimizer.adamw"),
])
def test_resuming_with_another_balancer_names_both_and_how_to_start_from_the_weights(
        kdrun: Callable, done_run: Path, tmp_path: Path, override: str, key: str, theirs: str, ours: str) -> None:
    last = done_run / "last.pt"
    code, err = kdrun("train", *TINY, *KD, override, f"trainer.resume={last}", "trainer.max_steps=4",
                      f"hydra.run.dir={tmp_path / 'resumed'}", *QUIET)
    assert code == 2
    one_paragraph(err, f"checkpoint {last} was written with {key} {theirs}", f"this run asks for {key} {ours}",
                  f"resume with the checkpoint's {key} (see {done_run / 'config.yaml'})",
                  f"trainer.resume=null student.checkpoint={last}")
    assert not (tmp_path / "resumed" / "last.pt").exists()
    if key == "balancer":  # the advice works: a fresh run from the student's weights with the new balancer
        code, err = kdrun("train", *TINY, *KD, override, "trainer.resume=null", f"student.checkpoint={last}",
                          f"hydra.run.dir={tmp_path / 'fresh'}", *QUIET)
        assert code == 0, err
        assert (tmp_path / "fresh" / "last.pt").is_file()


def test_a_state_that_does_not_fit_its_part_is_a_checkpoint_error_naming_it(tmp_path: Path) -> None:
    """Same class, other state (what check_same_method cannot see): not torch's bare RuntimeError."""
    def checkpointer(balancer: nn.Module) -> ckpt.Checkpointer:
        model = nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        parts = {"trainable": model, "optimizer": opt, "balancer": balancer,
                 "scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                 "scaler": torch.amp.GradScaler("cpu", enabled=False)}
        return ckpt.Checkpointer(tmp_path, parts, model, "balancer: {_target_: x.B}\n")

    two, three = nn.Module(), nn.Module()
    two.register_buffer("w", torch.zeros(2))
    three.register_buffer("w", torch.zeros(3))
    checkpointer(two).save("last.pt", ckpt.TrainState(step=1))
    with pytest.raises(CheckpointError) as e:
        checkpointer(three).restore("auto", lambda step: None)
    msg = str(e.value)
    assert f"the balancer state in checkpoint {tmp_path / 'last.pt'} does not fit this run's Module" in msg
    assert f"student.checkpoint={tmp_path / 'last.pt'}" in msg and "\n" not in msg


# -- item 12: Ctrl-C in the first seconds ----------------------------------------------------------------------


def test_ctrl_c_while_kdrun_starts_exits_130_with_one_line(tmp_path: Path) -> None:
    """SIGINT 0.2 s into ``main`` lands in the imports of torch and the engine (seconds): one line, 130."""
    script = ("import os, signal, threading\n"
              "from kdrun.cli import main\n"
              "threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
              f"main(['train', '+debug=quick', 'trainer.accelerator=cpu', 'hydra.run.dir={tmp_path / 'run'}'])\n")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 130, p.stderr
    assert p.stderr == "kdrun: interrupted (Ctrl-C).\n", p.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_ctrl_c_keeps_its_traceback_with_the_full_error_switch(
        kdrun: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    import kdrun.cli as cli

    def interrupted(argv: list[str]) -> None:
        raise KeyboardInterrupt  # what Python's SIGINT handler raises wherever the command is

    monkeypatch.setitem(cli.COMMANDS, "train", cli.Command(interrupted, "train"))
    assert kdrun("train") == (130, "kdrun: interrupted (Ctrl-C).\n")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(KeyboardInterrupt):
        cli.main(["train"])

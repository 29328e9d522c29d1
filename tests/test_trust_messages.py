"""Issue #21 item 13: messages that gave the wrong advice. Each input → exit status 2, no traceback, one
paragraph naming the real problem and the setting to change: ``KDRUN_CACHE`` (not ``hydra.run.dir``) for a
teacher cache that is a file, the cached file to delete for a damaged cached teacher or fit, ``hydra.sweep.dir``
in a sweep, and the close matches of a misspelt config option (not the group's 200 options).

In-process (``kdrun.cli.main``); the runs fail before training (digits, +debug=quick).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from hydra.core.hydra_config import HydraConfig

from kdrun.errors import close_options, for_sweep
from kdrun.teacher_cache import CacheBuilder, CacheBusy, CacheError
from tests.conftest import QUICK
from tests.test_cli_errors import QUIET, kdrun  # noqa: F401  (kdrun: the in-process CLI fixture)
from tests.test_trust_checkpoints import one_paragraph

CONF = Path(__file__).resolve().parents[1] / "conf"

TINY = [*QUICK, "trainer.epochs=1", "trainer.max_steps=2", "logger.backends=[]"]


# -- KDRUN_CACHE pointing at a file ------------------------------------------------------------------------


def test_a_teacher_cache_that_is_a_file_names_kdrun_cache(
        kdrun: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_file = tmp_path / "cache.txt"
    a_file.write_text("not a directory")
    monkeypatch.setenv("KDRUN_CACHE", str(a_file))
    code, err = kdrun("train", "+recipe=quickstart", f"hydra.run.dir={tmp_path / 'run'}", *QUIET)
    assert code == 2
    line = one_paragraph(err, f"{a_file} is a file, not a directory", f"KDRUN_CACHE={a_file}",
                         "point KDRUN_CACHE at a writable directory")
    assert "hydra.run.dir" not in line
    assert a_file.read_text() == "not a directory"


def test_a_teacher_output_cache_under_a_file_is_not_taken_for_a_busy_fill(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mkdir under a file raises FileExistsError, which create() took for another process's fill (CacheBusy:
    the run would then wait for a fill that does not exist)."""
    a_file = tmp_path / "cache.txt"
    a_file.write_text("")
    monkeypatch.setenv("KDRUN_CACHE", str(a_file))
    with pytest.raises(CacheError) as e:
        CacheBuilder.create(a_file / "teacher_outputs" / "abc", None, {})  # type: ignore[arg-type]
    assert not isinstance(e.value, CacheBusy)
    assert f"{a_file} is a file, not a directory" in str(e.value)
    assert "teacher.cache.dir" in str(e.value) and f"KDRUN_CACHE={a_file}" in str(e.value)


# -- a damaged cached teacher, a damaged teacher fit ------------------------------------------------------------


@pytest.mark.parametrize("damage", [b"", b"\x00garbage" * 100])
def test_a_damaged_cached_teacher_names_the_file_to_delete(
        kdrun: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: bytes) -> None:
    cache = tmp_path / "cache"
    teacher = cache / "teachers" / "digits_convnet_l.pt"  # the quickstart's teacher.checkpoint
    teacher.parent.mkdir(parents=True)
    teacher.write_bytes(damage)
    monkeypatch.setenv("KDRUN_CACHE", str(cache))
    code, err = kdrun("train", "+recipe=quickstart", "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}",
                      *QUIET)
    assert code == 2
    line = one_paragraph(err, f"teacher.checkpoint: checkpoint {teacher} ", "cached teacher", f"delete {teacher}",
                         "teacher.fit_if_missing_epochs=15 then fits it anew")
    assert "hydra.run.dir" not in line and "another checkpoint of the same run" not in line


def test_a_damaged_checkpoint_of_a_stopped_teacher_fit_names_the_fit_directory(
        kdrun: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    teacher = cache / "teachers" / "t.pt"
    fit = cache / "teachers" / "t_fit"
    fit.mkdir(parents=True)
    (fit / "last.pt").write_bytes(b"")
    monkeypatch.setenv("KDRUN_CACHE", str(cache))
    code, err = kdrun("train", *TINY, "teacher=convnet_l", f"teacher.checkpoint={teacher}",
                      "teacher.fit_if_missing_epochs=1", "distill=kl", f"hydra.run.dir={tmp_path / 'run'}", *QUIET)
    assert code == 2
    line = one_paragraph(err, f"checkpoint {fit / 'last.pt'} is empty", f"delete the fit directory {fit}")
    assert "trainer.resume" not in line  # the fit's resume is kdrun's, not an option the user could set


# -- a refused sweep: hydra.sweep.dir, not hydra.run.dir ------------------------------------------------------


def test_a_refused_sweep_job_advises_hydra_sweep_dir(kdrun: Callable, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    job = sweep / "0_fixed_seed0"  # conf/config.yaml: hydra.sweep.subdir of job 0 with the default balancer
    job.mkdir(parents=True)
    (job / "results.json").write_text("{}")
    try:
        code, err = kdrun("train", "-m", *TINY, f"hydra.sweep.dir={sweep}", *QUIET)
    finally:
        HydraConfig.instance().cfg = None  # type: ignore[assignment]  # the sweep's config, left set by Hydra
    assert code == 2
    line = one_paragraph(err, f"The run directory {job} already holds a run", "choose another hydra.sweep.dir")
    assert "hydra.run.dir" not in line
    assert (job / "results.json").read_text() == "{}"


def test_sweep_wording_keeps_a_command_that_names_a_job_directory() -> None:
    message = ("The disk is full. continue from it with trainer.resume=auto and the same hydra.run.dir=/s/0_a; "
               "or choose another hydra.run.dir.")
    assert for_sweep(message) == message.replace("another hydra.run.dir", "another hydra.sweep.dir")


# -- a misspelt option: the close matches first --------------------------------------------------------------


@pytest.mark.parametrize("override,expected,listed", [
    ("+recipe=quikstart", "the config group recipe has no option 'quikstart' (did you mean quickstart?)",
     "`kdrun train --help` lists all"),
    ("balancer=dtoo", "the config group balancer has no option 'dtoo' (did you mean dto?)",
     f"`kdrun train --help` lists all {len(list((CONF / 'balancer').glob('*.yaml')))} options of balancer"),
    ("dataset=cifar", "the config group dataset has no option 'cifar' (did you mean cifar100?)",
     "The options are cifar100, coco,"),  # a short group is listed in full
])
def test_a_misspelt_option_names_the_close_matches_first(
        kdrun: Callable, override: str, expected: str, listed: str) -> None:
    code, err = kdrun("train", override)
    assert code == 2
    line = one_paragraph(err, expected, listed)
    assert "Config search path" not in err and "cifar100_resnet56_resnet20_kd" not in line
    assert len(line) < 300


def test_close_options_falls_back_to_the_options_containing_the_name() -> None:
    options = ["cifar100_resnet56_resnet20_kd", "cifar100_wrn40_2_wrn16_2_kd", "quickstart", "imagenet_deit_ti"]
    assert close_options("quikstart", options) == ["quickstart"]
    assert close_options("QuickStart", options) == ["quickstart"]
    assert close_options("resnet20", options) == ["cifar100_resnet56_resnet20_kd"]
    assert close_options("zzz", options) == []

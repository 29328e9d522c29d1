"""Hostile command lines → one paragraph on stderr, exit status 2, no traceback (in-process: kdrun.cli.main).

Each case fails before any model or data is built (Hydra's composition, the run directory, validation,
or the first instantiate), so none of them trains anything.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Callable

import pytest

from kdrun import cli
from kdrun.errors import find_user_error

KDRUN = Path(cli.__file__).resolve().parent
# In-process runs must leave the logging setup and the working directory of the test session alone.
QUIET = ["hydra/job_logging=none", "hydra/hydra_logging=none", "hydra.output_subdir=null"]


@pytest.fixture
def kdrun(kdrun_cli: Callable[..., tuple[int, str, str]]) -> Callable[..., tuple[int, str]]:
    """``kdrun(*argv)`` → (exit status, stderr) of ``kdrun.cli.main`` run in this process."""
    return lambda *argv: kdrun_cli(*argv)[::2]


def one_paragraph(err: str) -> None:
    assert err.startswith("kdrun: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "\\n" not in err and "Set the environment variable" not in err


# -- keys that do not exist: Hydra's advice (+key=value) would only move the error ----------------------

@pytest.mark.parametrize("override,expected", [
    ("trainer.epochz=3", "trainer.epochz does not exist (did you mean trainer.epochs?); valid keys of trainer "
                         "are epochs, max_steps, batch_size"),
    ("traner.epochs=3", "traner does not exist (did you mean trainer"),
    ("balancer.alpha_distil=0.5", "balancer.alpha_distil does not exist (did you mean balancer.alpha_distill"),
    ("logger.log_evry=3", "logger.log_evry does not exist (did you mean logger.log_every?)"),
    ("optimizer.zzz=3", "optimizer.zzz does not exist; valid keys of optimizer are lr, momentum"),
    # an earlier kdrun's key: the message says what replaced it (#25 item 4: logger.backends)
    ("logger.tensorboard=false", "logger.tensorboard does not exist; it was replaced by logger.backends: "
                                 "logger.tensorboard=false is now logger.backends=[]"),
])
def test_misspelt_key_names_the_close_matches(kdrun: Callable, override: str, expected: str) -> None:
    code, err = kdrun("train", override)
    assert code == 2
    one_paragraph(err)
    assert expected in err
    assert "+" + override not in err  # not Hydra's advice to append it


def test_a_parameter_the_config_does_not_set_keeps_the_advice_to_add_it(kdrun: Callable) -> None:
    # timm.create_model takes **kwargs: drop_path_rate is a real setting that conf/model/timm.yaml omits
    code, err = kdrun("train", "student=timm", "student.model.drop_path_rate=0.1")
    assert code == 2
    one_paragraph(err)
    assert "student.model.drop_path_rate is not set by this config but timm.create_model takes it; add it " \
           "with +student.model.drop_path_rate=0.1." in err


def test_model_group_is_reached_through_the_roles(kdrun: Callable) -> None:
    code, err = kdrun("train", "model=resnet56")
    assert code == 2
    one_paragraph(err)
    assert "the architecture is chosen with student=X or teacher=X" in err


def test_unknown_option_names_the_close_matches_and_exits_2(kdrun: Callable) -> None:
    # issue #21 item 13: the close matches, not Hydra's list of every option (tests/test_trust_messages.py)
    code, err = kdrun("train", "balancer=dtoo")
    assert code == 2
    one_paragraph(err)
    assert "balancer has no option 'dtoo' (did you mean dto?)" in err and "\tfixed\n" not in err


def test_full_error_switch_shows_hydras_exception(kdrun: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra.errors import ConfigCompositionException

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigCompositionException):
        kdrun("train", "trainer.epochz=3")


# -- values -------------------------------------------------------------------------------------------

def test_non_finite_learning_rate(kdrun: Callable, tmp_path: Path) -> None:
    code, err = kdrun("train", "optimizer.lr=inf", f"hydra.run.dir={tmp_path / 'run'}", *QUIET)
    assert code == 2
    one_paragraph(err)
    assert "optimizer.lr=inf is not a finite number" in err


# -- the run directory ----------------------------------------------------------------------------------

def test_run_dir_under_a_regular_file(kdrun: Callable, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, err = kdrun("train", f"hydra.run.dir={blocker}/run", *QUIET)
    assert code == 2
    one_paragraph(err)
    assert f"cannot create or write the run directory {blocker}/run (Not a directory); set hydra.run.dir" in err
    assert blocker.read_text() == "not a directory"


def test_run_dir_where_nothing_can_be_created(kdrun: Callable) -> None:
    # /proc accepts no new directories, even for root (a chmod'ed read-only dir would not stop root)
    code, err = kdrun("train", "hydra.run.dir=/proc/kdrun_test_run", *QUIET)
    assert code == 2
    one_paragraph(err)
    assert "cannot create or write the run directory /proc/kdrun_test_run" in err


# -- user errors raised inside hydra.utils.instantiate ----------------------------------------------

def test_dataset_error_is_shown_unwrapped(kdrun: Callable, tmp_path: Path) -> None:
    code, err = kdrun("train", "dataset=cifar100", f"dataset.root={tmp_path / 'no_data'}",
                      f"hydra.run.dir={tmp_path / 'run'}", "trainer.accelerator=cpu", *QUIET)
    assert code == 2
    assert err.startswith(f"kdrun: error: CIFAR-100 is missing or corrupted under dataset.root='{tmp_path / 'no_data'}'")
    assert "Error in call to target" not in err and "DatasetError(" not in err and "Traceback" not in err


def test_train_warns_once_about_distillation_weights_without_distillation(
        kdrun: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue #15: `-m balancer.alpha_distill=0.1,0.5,0.9` on the default config. The CLI and the engine both
    validate; the line comes once, before anything is built (here the data set then fails, to stop early)."""
    import kdrun.config as config

    monkeypatch.setattr(config, "_WARNED", set())
    code, err = kdrun("train", "balancer.alpha_distill=0.5", "dataset=cifar100", f"dataset.root={tmp_path}",
                      f"hydra.run.dir={tmp_path / 'run'}", "trainer.accelerator=cpu", *QUIET)
    warning, error = err.splitlines()
    assert warning.startswith("kdrun: warning: balancer.alpha_distill=0.5 has no effect: this run has no teacher")
    assert error.startswith("kdrun: error: CIFAR-100 is missing") and code == 2


def test_find_user_error_walks_the_instantiate_wrapper(tmp_path: Path) -> None:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from kdrun.data.base import DatasetError

    with pytest.raises(InstantiationException) as e:
        instantiate({"_target_": "kdrun.data.cifar100.build", "root": str(tmp_path)})
    assert "Error in call to target" in str(e.value)
    found = find_user_error(e.value)
    assert isinstance(found, DatasetError) and str(found).startswith("CIFAR-100 is missing")
    assert find_user_error(RuntimeError("a bug")) is None
    try:
        try:
            raise KeyError("x")
        except KeyError:
            raise RuntimeError("while handling") from None  # context suppressed: not followed
    except RuntimeError as err:
        assert find_user_error(err) is None


def test_worker_process_reports_a_wrapped_user_error_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """kdrun.commands.launch's worker (trainer.devices=N) reports the same errors as the CLI, unwrapped, status 2."""
    import kdrun.engine
    import kdrun.commands.launch as launch
    from hydra.errors import InstantiationException

    from kdrun.data.base import DatasetError

    def wrapped(cfg: object, run_dir: Path, record: object = None) -> None:
        try:
            raise DatasetError("no data under dataset.root='/x'.")
        except DatasetError as e:
            raise InstantiationException(f"Error in call to target 'x':\n{e!r}") from e

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(launch.distributed, "init_process_group", lambda *a: None)
    monkeypatch.setattr(launch.distributed, "destroy_process_group", lambda: None)
    monkeypatch.setattr(kdrun.engine, "train", wrapped)
    (tmp_path / "cfg.yaml").write_text("seed: 0\n")
    assert launch.train_worker(str(tmp_path / "cfg.yaml"), str(tmp_path / "run"), "cpu", 0) == 2
    assert capsys.readouterr().err == "kdrun: error: no data under dataset.root='/x'.\n"
    monkeypatch.setattr(kdrun.engine, "train", lambda cfg, run_dir, record=None: 1 / 0)  # a bug keeps its traceback
    with pytest.raises(ZeroDivisionError):
        launch.train_worker(str(tmp_path / "cfg.yaml"), str(tmp_path / "run"), "cpu", 0)


# -- the command table and the module graph -------------------------------------------------------------

def test_commands_come_from_one_table(kdrun: Callable, capsys: pytest.CaptureFixture) -> None:
    assert list(cli.COMMANDS) == ["train", "eval", "export", "tables", "plot", "tide", "cache-teacher"]
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: kdrun {train,eval,export,tables,plot,tide,cache-teacher} ...")
    for name, command in cli.COMMANDS.items():
        assert f"  {name:<13} {command.help.splitlines()[0]}" in out and callable(command.run)
    code, err = kdrun("trian")
    assert code == 2 and "valid commands are train, eval, export, tables, plot, tide" in err


def _kdrun_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("kdrun")}


def test_no_import_circle_between_cli_and_launch() -> None:
    launch = _kdrun_imports(KDRUN / "commands" / "launch.py")
    assert not launch & {"kdrun.cli", "kdrun.commands.train"}
    assert not _kdrun_imports(KDRUN / "errors.py") & {"kdrun.cli", "kdrun.commands.train", "kdrun.commands.launch"}

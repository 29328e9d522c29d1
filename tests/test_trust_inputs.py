"""Issue #21 items 8, 9, 11 and 12: inputs that used to give silent wrong numbers or a traceback are one
paragraph on stderr naming the problem and the fix, exit status 2.

In-process (``kdrun.cli.main``): the config cases fail at validation, the balancer case at ``bind`` (a
digits run that builds its models and stops before the first step), the table cases read hand-written
results.json files. The COCO files (item 10, and ``kdrun tide``) are in tests/detection/test_coco_errors.py.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from kdrun import cli
from kdrun.analysis import tables
from kdrun.balancers.base import BalancerConfigError
from kdrun.balancers.fixed import Fixed
from kdrun.balancers.objective_clip import ObjectiveClip
from tests.conftest import compose_cfg, QUICK

QUIET = ["hydra/job_logging=none", "hydra/hydra_logging=none", "hydra.output_subdir=null"]


@pytest.fixture
def kdrun(kdrun_cli: Callable[..., tuple[int, str, str]]) -> Callable[..., tuple[int, str, str]]:
    """``kdrun(*argv)`` → (exit status, stdout, stderr) of ``kdrun.cli.main`` run in this process."""
    return kdrun_cli


def one_paragraph(err: str, prefix: str = "kdrun: error: ") -> str:
    """The one error line of ``err`` (other lines may be warnings), checked for a traceback."""
    assert "Traceback" not in err and "Set the environment variable" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and err.endswith("\n"), err
    return lines[0]


# -- item 11: trainer.max_steps, seeds ------------------------------------------------------------------

@pytest.mark.parametrize("override,expected", [
    ("trainer.max_steps=0", "trainer.max_steps=0 is not allowed: give a positive integer, or -1 to run all "
                            "trainer.epochs (trainer.max_steps=-1, the default)."),
    ("trainer.max_steps=-5", "trainer.max_steps=-5 is not allowed: give a positive integer, or -1 to run all"),
    ("trainer.max_steps=null", "trainer.max_steps=null is not allowed: give a positive integer, or -1 to run all"),
    ("seed=abc", "seed='abc' is not a random seed: give an integer, e.g. seed=0"),
    ("seed=null", "seed=null is not a random seed: give an integer"),
    ("seed=1.5", "seed=1.5 is not a random seed: give an integer"),
    (f"seed={2**64}", f"seed={2**64} is out of range: it must be <= {2**62}; give an integer"),
    ("trainer.seed=abc", "trainer.seed='abc' must be an integer."),
])
def test_bad_step_limit_and_seed_are_one_paragraph(kdrun: Callable, tmp_path: Path, override: str,
                                                    expected: str) -> None:
    code, _, err = kdrun("train", *QUICK, override, f"hydra.run.dir={tmp_path / 'run'}", *QUIET)
    assert code == 2
    assert expected in one_paragraph(err)
    assert not (tmp_path / "run" / "results.json").exists()


def test_max_steps_minus_one_and_positive_still_validate() -> None:
    """The values that mean something: -1 (every epoch, the default) and a positive count."""
    from kdrun.config import TrainerConfig, check_value
    import typing

    hint = typing.get_type_hints(TrainerConfig, include_extras=True)["max_steps"]
    for ok in (-1, 1, 10**9):
        check_value("trainer.max_steps", ok, hint)
    assert TrainerConfig().max_steps == -1


# -- item 9: balancer keys that name objectives ---------------------------------------------------------

def test_alphas_naming_an_unknown_objective_fails_at_bind() -> None:
    b = Fixed(alphas={"foo": 1.0, "task": 0.5})
    with pytest.raises(BalancerConfigError) as e:
        b.bind(("distill", "task"))
    assert str(e.value) == (
        "balancer.alphas names 'foo', which is not an objective of this run: its objectives are distill, task "
        "(task.objectives groups the loss terms into them); use those names, e.g. "
        "balancer.alphas={distill: 1.0, task: 1.0}.")
    nodistill = Fixed(alphas={"distill": 0.5, "task": 1.0})  # a run without distill terms has no `distill`
    with pytest.raises(BalancerConfigError, match=r"^balancer\.alphas names 'distill', which is not an objective "
                                                  r"of this run \(there is a distill objective only with distill "
                                                  r"terms and the default task\.objectives\): its objectives are "
                                                  r"task \("):
        nodistill.bind(("task",))
    ok = Fixed(alphas={"task": 0.5})  # a known name, the others from alpha_task/alpha_distill
    ok.bind(("distill", "task"))
    assert ok._w.tolist() == [1.0, 0.5]


def test_a_wrapped_balancer_names_its_own_key() -> None:
    wrapped = ObjectiveClip(Fixed(alphas={"kl": 1.0, "ce": 1.0}))
    with pytest.raises(BalancerConfigError, match=r"^balancer\.inner\.alphas names 'kl', 'ce', which are not "
                                                  r"objectives of this run: its objectives are distill, task"):
        wrapped.bind(("distill", "task"))
    with pytest.raises(BalancerConfigError, match="is itself objective_clip"):
        ObjectiveClip(ObjectiveClip(Fixed()))


def test_every_balancer_setting_that_names_objectives_is_checked() -> None:
    """Every balancer option whose settings are {objective: ...} mappings declares them through
    named_objectives, so that bind checks them: a mapping-typed parameter without that declaration would be
    ignored silently again."""
    import inspect
    import typing

    from hydra.utils import get_class

    from kdrun.balancers.base import Balancer
    from kdrun.config import _mentions_mapping

    conf = Path(cli.__file__).resolve().parents[1] / "conf" / "balancer"
    seen = set()
    for f in sorted(conf.glob("*.yaml")):
        cls = get_class(compose_cfg([f"balancer={f.stem}"]).balancer._target_)  # named options: their base's
        if cls in seen:
            continue
        seen.add(cls)
        hints = typing.get_type_hints(cls.__init__, include_extras=True)
        mappings = [n for n in inspect.signature(cls).parameters if _mentions_mapping(hints.get(n))]
        if mappings:
            assert cls.named_objectives is not Balancer.named_objectives, (cls, mappings)
    assert Fixed in seen


def test_unknown_objective_in_alphas_stops_the_run_with_one_paragraph(kdrun: Callable, tmp_path: Path) -> None:
    code, _, err = kdrun("train", *QUICK, "teacher=convnet_l", "teacher.checkpoint=null", "teacher.allow_random=true",
                         "distill=kl", "balancer.alphas={foo: 1}", f"hydra.run.dir={tmp_path / 'run'}", *QUIET)
    assert code == 2
    line = one_paragraph(err)
    assert "balancer.alphas names 'foo', which is not an objective of this run: its objectives are distill, " \
           "task" in line and "use those names" in line
    assert not (tmp_path / "run" / "results.json").exists()  # it used to train with the default weights


def test_negative_alpha_is_a_validation_error(kdrun: Callable, tmp_path: Path) -> None:
    code, _, err = kdrun("train", *QUICK, "balancer.alphas={task: -1}", f"hydra.run.dir={tmp_path / 'run'}", *QUIET)
    assert code == 2
    assert "balancer.alphas.task=-1 is out of range: it must be >= 0.0." in one_paragraph(err)
    with pytest.raises(BalancerConfigError, match="balancer.alphas.task=-1.0 is negative"):
        Fixed(alphas={"task": -1.0})  # built directly, without validation


# -- item 8: the same seed of a cell in two directories -------------------------------------------------

DEFS = {"tables": {"mini": {
    "title": "Mini", "metric": "top-1 (%)",
    "columns": [{"id": "digits", "label": "Digits"}, {"id": "other", "label": "Other"}],
    "rows": [{"id": "fixed", "label": "Fixed"}],
    "numbers": [{"row": "fixed", "column": "digits", "value": 90.0}],
}}}


def result(root: Path, name: str, top1: float, seed: int = 0, mtime: float | None = None,
           also: bool = False, trainer_seed: int | None = None, lr: float = 0.1) -> Path:
    """A results.json as the engine writes it (the keys tables reads), in ``root/name``."""
    paper: dict[str, Any] = {"table": "mini", "row": "fixed", "column": "digits",
                             "also": [{"table": "mini", "row": "fixed", "column": "other"}] if also else []}
    config = {"seed": seed, "paper": paper, "optimizer": {"lr": lr}, "trainer": {"seed": trainer_seed}}
    d = root / name
    d.mkdir(parents=True)
    f = d / "results.json"
    f.write_text(json.dumps({"final": {"top1": top1}, "best": {"top1": top1}, "config": config}))
    if mtime is not None:
        os.utime(f, (mtime, mtime))
    return d


@pytest.fixture
def defs(tmp_path: Path) -> Path:
    path = tmp_path / "defs.yaml"
    path.write_text(yaml.safe_dump(DEFS))
    return path


def cells(out: str) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["row"], r["column"]): r for r in csv.DictReader(io.StringIO(out))}


def test_same_seed_in_two_directories_is_an_error_naming_both(kdrun: Callable, tmp_path: Path, defs: Path) -> None:
    a = result(tmp_path / "sweep1", "fixed_s0", 80.0, seed=0)
    b = result(tmp_path / "sweep2", "fixed_s0", 60.0, seed=0, lr=0.2)
    result(tmp_path / "sweep1", "fixed_s1", 70.0, seed=1)
    code, out, err = kdrun("tables", "--table", "mini", "--definitions", str(defs), "--seeds", "all",
                           str(tmp_path / "sweep1"), str(tmp_path / "sweep2"))
    assert code == 2 and out == ""
    line = one_paragraph(err, "kdrun tables: error: ")
    assert f"cell (fixed, digits): seed 0 has 2 runs, " in line
    assert str(a) in line and str(b) in line
    assert "their configs differ in optimizer.lr" in line  # what tells a copy from a different experiment
    assert "--duplicates newest (or oldest)" in line


def test_duplicates_newest_or_oldest_count_one_run_per_seed(kdrun: Callable, tmp_path: Path, defs: Path) -> None:
    result(tmp_path / "old", "s0", 80.0, seed=0, mtime=1_000_000, also=True)
    new = result(tmp_path / "new", "s0", 60.0, seed=0, mtime=2_000_000)
    result(tmp_path / "old", "s1", 70.0, seed=1, mtime=1_000_000)
    runs = [str(tmp_path / "old"), str(tmp_path / "new")]
    for policy, kept in (("newest", 60.0), ("oldest", 80.0)):
        code, out, err = kdrun("tables", "--table", "mini", "--definitions", str(defs), "--seeds", "all",
                               "--format", "csv", "--duplicates", policy, *runs)
        assert code == 0, err
        cell = cells(out)[("fixed", "digits")]
        assert int(cell["n"]) == 2  # seeds 0 and 1, each once (it was 3 before)
        assert float(cell["kdrun_mean"]) == pytest.approx((kept + 70.0) / 2)
        assert "counting" in err and f"(--duplicates {policy})" in err
    # the old seed-0 run also claims (fixed, other), where nothing duplicates it: it still counts there
    assert int(cells(out)[("fixed", "other")]["n"]) == 1
    code, out, err = kdrun("tables", "--table", "mini", "--definitions", str(defs), "--duplicates", "newest",
                           *runs)
    assert code == 0 and "1 duplicate run(s) of a counted seed left out (--duplicates newest)" in out
    assert str(new) in err


def test_distinct_seeds_are_not_duplicates(tmp_path: Path, defs: Path) -> None:
    """trainer.seed overrides the top-level seed in the engine, so it tells runs apart here too; a
    duplicate of a seed the table does not count changes nothing."""
    result(tmp_path / "r", "a", 80.0, seed=0, trainer_seed=5)
    result(tmp_path / "r", "b", 60.0, seed=0, trainer_seed=6)
    result(tmp_path / "r", "c", 50.0, seed=9)
    result(tmp_path / "r2", "c", 50.0, seed=9)
    table = tables.load_definitions(defs)["mini"]
    runs = tables.find_runs([tmp_path / "r", tmp_path / "r2"])
    assert sorted(r.seed for r in runs) == [5, 6, 9, 9]
    text = tables.render(table, runs, "final", "csv", seeds=[5, 6])
    assert int(cells(text)[("fixed", "digits")]["n"]) == 2
    with pytest.raises(tables.TableError, match="seed 9 has 2 runs"):
        tables.render(table, runs, "final", "csv", seeds="all")


# -- item 12: --definitions that are not a definitions file ---------------------------------------------

@pytest.mark.parametrize("content,expected", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not text (a binary file?)"),
    (b"tables: {mini: [unclosed", "is not valid YAML ("),
    (b"tables: {mini: [1, 2]}", "table mini must be a mapping"),
    (b"tables: {mini: {rows: fixed, columns: [a]}}", "table mini: rows must be a list"),
    (b"tables: {mini: {rows: [{id: r}], columns: [{id: c}], numbers: [{row: r, column: c}]}}",
     "every entry of numbers needs row, column and value"),
    (b"tables: {mini: {rows: [{id: r}], columns: [{id: c}], numbers: [{row: r, column: c, value: abc}]}}",
     "value 'abc' is not a number"),
    (b"tables: {mini: {rows: [{id: r}], columns: [{id: c}], metrics: [{key: AP, scale: {}}]}}",
     "scale must be a number"),
])
def test_definitions_that_are_not_definitions_are_one_paragraph(kdrun: Callable, tmp_path: Path, content: bytes,
                                                                  expected: str) -> None:
    bad = tmp_path / "defs.bin"
    bad.write_bytes(content)
    code, out, err = kdrun("tables", "--table", "mini", "--definitions", str(bad), str(tmp_path))
    assert code == 2 and out == ""
    line = one_paragraph(err, "kdrun tables: error: ")
    assert str(bad) in line or "mini" in line
    assert expected in line

"""Every option of every config group composes and validates; bad input fails early and clearly."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from kdrun.config import ConfigError, validate
from tests.conftest import CONF, compose_cfg

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "recipe")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))


def test_groups_mirror_the_package() -> None:
    """conf/<group> ↔ kdrun/<package>: the architecture you can see (ARCHITECTURE.md's table)."""
    pkg = Path(__file__).resolve().parents[1] / "kdrun"
    mapping = {"dataset": "data", "teacher": "models", "student": "models", "distill": "losses",
               "projector": "projectors", "balancer": "balancers", "optimizer": "optim",
               "scheduler": "optim", "task": "tasks"}
    for g in GROUPS:
        if g in mapping:
            assert (pkg / mapping[g]).is_dir(), g
    assert set(GROUPS) >= {"dataset", "teacher", "student", "distill", "balancer", "projector",
                           "optimizer", "scheduler", "trainer", "logger", "task"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    extra = ["teacher=convnet_l"] if group == "distill" and option != "none" else []
    if group == "teacher" and option != "none":
        extra = ["distill=kl"]
    if group == "method":  # presets are added on top (+method=mokd), like recipes
        extra = ["teacher=convnet_l"]
    prefix = "+" if group == "method" else ""
    cfg = compose_cfg([f"{prefix}{group}={option}", *extra])
    validate(cfg)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_validates(recipe: str) -> None:
    validate(compose_cfg([f"+recipe={recipe}"]))


@pytest.mark.parametrize("override,needle", [
    (["trainer.epochs=-1"], "trainer.epochs=-1 is out of range: it must be >= 1"),
    (["trainer.precision=fp8"], "valid choices are 'fp32', 'bf16', 'fp16'"),
    (["trainer.batch_size=abc"], "trainer.batch_size='abc' must be an integer"),
    (["logger.log_every=0"], "logger.log_every=0 is out of range"),
    (["+balancer.alpha_distil=0.5"], "balancer.alpha_distil is not a parameter of kdrun.balancers.fixed.Fixed; "
                                     "valid keys are alpha_task, alpha_distill, alphas"),
    (["balancer.alpha_task=-1"], "balancer.alpha_task=-1 is out of range: it must be >= 0.0"),
    (["+trainer.epochz=3"], "trainer.epochz is not a valid key; valid keys are epochs"),
    (["distill=kl"], "distill terms (kl) need a teacher but teacher is none"),
    (["dataset.val_fraction=1.5"], "dataset.val_fraction=1.5 is out of range: it must be <= 0.9"),
    (["+student.pretrained=true"], "student.pretrained is not a valid key; valid keys are model, checkpoint"),
])
def test_bad_values_fail_validation_with_a_message_naming_the_key(override: list[str], needle: str) -> None:
    cfg = compose_cfg(override)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value)


def test_unknown_option_and_key_are_rejected_by_composition() -> None:
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["balancer=dtoo"])
    assert "balancer/dtoo" in str(e.value)
    with pytest.raises((ConfigCompositionException, ConfigAttributeError, ConfigKeyError)):
        compose_cfg(["trainer.epochz=3"])


def test_validation_happens_before_anything_is_built(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import kdrun.engine as engine

    def boom(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("something was instantiated before validation failed")

    monkeypatch.setattr(engine, "instantiate", boom)
    monkeypatch.setattr(engine, "build_model", boom)
    with pytest.raises(ConfigError):
        engine.train(compose_cfg(["trainer.epochs=0"]), tmp_path)


def _kdrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.pop("HYDRA_FULL_ERROR", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "kdrun.cli", *args], capture_output=True, text=True,
                          env=e, timeout=120)


def test_cli_errors_are_one_paragraph_without_traceback() -> None:
    r = _kdrun("train", "balancer=dtoo")
    assert r.returncode != 0
    assert "Could not find 'balancer/dtoo'" in r.stderr and "Available options in 'balancer'" in r.stderr
    assert "fixed" in r.stderr and "Traceback" not in r.stderr

    r = _kdrun("train", "trainer.epochs=-1")
    assert r.returncode == 2
    assert "kdrun: error: trainer.epochs=-1 is out of range: it must be >= 1" in r.stderr
    assert "Traceback" not in r.stderr

    r = _kdrun("train", "trainer.epochs=-1", env={"HYDRA_FULL_ERROR": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_cli_help_lists_groups_and_options() -> None:
    r = _kdrun("train", "--help")
    assert r.returncode == 0
    for line in ("balancer: ", "fixed", "dto", "dataset: ", "student: ", "recipe: ", "quickstart"):
        assert line in r.stdout


@pytest.mark.parametrize("cmd", ["eval", "export", "tables", "plot", "tide"])
def test_every_subcommand_has_help(cmd: str) -> None:
    r = _kdrun(cmd, "--help")
    assert r.returncode == 0 and "usage: kdrun" in r.stdout


def test_unknown_command_lists_the_valid_ones() -> None:
    r = _kdrun("trian")
    assert r.returncode == 2 and "valid commands are train, eval, export, tables, plot, tide" in r.stderr

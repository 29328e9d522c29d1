"""Every option of every config group composes and validates; bad input fails early and clearly."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from kdrun.config import ROLE_KEYS, ConfigError, LoggerConfig, TrainerConfig, config_warnings, validate
from tests.conftest import CONF, QUICK, compose_cfg

# Groups selected as group=option. Not among them: recipe (+recipe=NAME), debug (+debug=quick) and model
# (the architectures, reached through student=X / teacher=X; tested below).
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("recipe", "debug", "model"))
# trainer/logger have one option each, `default`, stored from the dataclasses (kdrun.config), no YAML.
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))] + [
    ("trainer", "default"), ("logger", "default")]
RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
ROLE_OPTIONS = [(role, p.stem) for role in ("student", "teacher") for p in sorted((CONF / role).glob("*.yaml"))
                if p.stem != "none"]


def test_groups_mirror_the_package() -> None:
    """conf/<group> ↔ kdrun/<package>: the architecture you can see (ARCHITECTURE.md's table)."""
    pkg = Path(__file__).resolve().parents[1] / "kdrun"
    mapping = {"dataset": "data", "teacher": "models", "student": "models", "model": "models", "distill": "losses",
               "projector": "projectors", "balancer": "balancers", "optimizer": "optim",
               "scheduler": "optim", "task": "tasks"}
    for g in [*GROUPS, "model"]:
        if g in mapping:
            assert (pkg / mapping[g]).is_dir(), g
    assert {g for g, _ in OPTIONS} >= {"dataset", "teacher", "student", "distill", "balancer", "projector",
                                       "optimizer", "scheduler", "trainer", "logger", "task"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    extra = ["teacher=convnet_l"] if group == "distill" and option != "none" else []
    if group == "teacher" and option != "none":
        extra = ["distill=kl"]
    if group == "method":  # presets are added on top (+method=mokd), like recipes
        extra = ["teacher=convnet_l"]
    if (group, option) == ("balancer", "dot"):  # DOT keeps the momentum: a plain SGD beside it (check_run)
        extra = ["optimizer=sgd_plain"]
    prefix = "+" if group == "method" else ""
    cfg = compose_cfg([f"{prefix}{group}={option}", *extra])
    validate(cfg)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_validates(recipe: str) -> None:
    cfg = compose_cfg([f"+recipe={recipe}"])
    validate(cfg)
    assert config_warnings(cfg) == []  # a paper's recipe is never a run whose settings do nothing


@pytest.mark.parametrize("role,option", ROLE_OPTIONS, ids=[f"{r}={o}" for r, o in ROLE_OPTIONS])
def test_every_architecture_is_defined_once_in_conf_model(role: str, option: str) -> None:
    """student=X / teacher=X only pick conf/model/X.yaml and add the role's keys: no _target_ of their own."""
    node = OmegaConf.load(CONF / role / f"{option}.yaml")
    assert OmegaConf.to_container(node.defaults) == [{"/model@model": option}, "_self_"]
    assert "_target_" not in OmegaConf.to_yaml(node)
    assert set(node.keys()) - {"defaults", "model"} <= set(ROLE_KEYS["teacher"]) - {"model"}


def test_student_and_teacher_of_one_architecture_build_the_same_model() -> None:
    """Only the role's keys differ (and timm's default model name, set by teacher/timm.yaml)."""
    used = {o for _, o in ROLE_OPTIONS}
    assert used == set(MODELS)  # every architecture is reachable, none is defined twice
    both = sorted({o for r, o in ROLE_OPTIONS if r == "student"} & {o for r, o in ROLE_OPTIONS if r == "teacher"})
    assert len(both) >= 28
    # Every role file only names its conf/model option (the test above) and every option composes and
    # validates (test_every_option_composes_and_validates); composing a pair shows where Hydra puts it.
    for arch in ("resnet56", "convnet_l", "timm"):
        cfg = compose_cfg([f"student={arch}", f"teacher={arch}"])
        s, t = cfg.student.model, cfg.teacher.model
        model = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{arch}.yaml"))
        assert OmegaConf.to_container(s) == model, arch
        if arch == "timm":
            assert (s.model_name, t.model_name) == ("resnet18", "resnet50")
            t.model_name = s.model_name
        assert OmegaConf.to_container(s) == OmegaConf.to_container(t), arch


def test_trainer_and_logger_defaults_are_the_dataclasses() -> None:
    """One definition: the schema's defaults are the composed defaults (no YAML copy to drift)."""
    assert not (CONF / "trainer").exists() and not (CONF / "logger").exists()
    cfg = compose_cfg([])
    assert OmegaConf.to_container(cfg.trainer) == dataclasses.asdict(TrainerConfig())
    assert OmegaConf.to_container(cfg.logger) == dataclasses.asdict(LoggerConfig())
    assert TrainerConfig(**OmegaConf.to_container(cfg.trainer)) == TrainerConfig()
    # still struct: a misspelt key without + is refused during composition, with + by validation
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["trainer.epochz=3"])


def test_debug_quick_is_the_tests_quick_preset() -> None:
    """+debug=quick = the explicit overrides the tests used before it was a config option."""
    explicit = ["trainer.batch_size=64", "logger.log_every=5", "logger.grad_stats_every=5",
                "logger.progress=false", "scheduler=cosine", "scheduler.warmup_epochs=0", "scheduler.min_lr_ratio=0"]
    assert QUICK == ["+debug=quick", "trainer.accelerator=cpu"]
    preset = compose_cfg(["+debug=quick"])
    assert OmegaConf.to_container(preset) == OmegaConf.to_container(compose_cfg(explicit))
    assert preset.trainer.accelerator == "auto"  # the device is the caller's choice (tests/test_gpu.py)
    validate(preset)
    cfg = compose_cfg([*QUICK, "logger.grad_stats_every=2"])  # the command line still wins
    assert cfg.logger.grad_stats_every == 2 and cfg.trainer.accelerator == "cpu"


@pytest.mark.parametrize("override,needle", [
    (["trainer.epochs=-1"], "trainer.epochs=-1 is out of range: it must be >= 1"),
    (["trainer.precision=fp8"], "valid choices are 'fp32', 'bf16', 'fp16'"),
    (["trainer.batch_size=abc"], "trainer.batch_size='abc' must be an integer"),
    (["logger.log_every=0"], "logger.log_every=0 is out of range"),
    (["balancer.alpha_task=-1"], "balancer.alpha_task=-1 is out of range: it must be >= 0.0"),
    (["+trainer.epochz=3"], "trainer.epochz does not exist (did you mean trainer.epochs?); valid keys of "
                            "trainer are epochs, max_steps"),
    (["+balancer.alpha_distil=0.5"], "balancer.alpha_distil is not a parameter of kdrun.balancers.fixed.Fixed "
                                     "(did you mean balancer.alpha_distill"),
    (["distill=kl"], "distill terms (kl) need a teacher but teacher is none"),
    (["dataset.val_fraction=1.5"], "dataset.val_fraction=1.5 is out of range: it must be <= 0.9"),
    (["+student.pretrained=true"], "student.pretrained does not exist; valid keys of student are model, checkpoint."),
    # non-finite numbers: any float of any node, named by key (inf would pass Ge(0), nan every check)
    (["optimizer.lr=inf"], "optimizer.lr=inf is not a finite number"),
    (["optimizer.lr=nan"], "optimizer.lr=nan is not a finite number"),
    (["optimizer.weight_decay=-inf"], "optimizer.weight_decay=-inf is not a finite number"),
    (["trainer.grad_clip=inf"], "trainer.grad_clip=inf is not a finite number"),
    (["scheduler.milestones=[150,inf]"], "scheduler.milestones[1]=inf is not a finite number"),
    (["teacher=convnet_l", "distill=kl", "distill.kl.temperature=nan"], "distill.kl.temperature=nan is not a finite"),
    # a top-level node nothing reads
    (["+traner.epochs=3"], "traner does not exist (did you mean trainer"),
    (["+model=resnet56"], "model does not exist (the architecture is chosen with student=X / teacher=X, which both "
                          "read conf/model/X.yaml); valid keys are dataset, task, teacher, student, distill, projector, "
                          "balancer, optimizer, scheduler, trainer, logger, seed, paper."),
])
def test_bad_values_fail_validation_with_a_message_naming_the_key(override: list[str], needle: str) -> None:
    cfg = compose_cfg(override)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value)


def test_root_keys_are_the_composed_defaults() -> None:
    from kdrun.config import ROOT_KEYS

    assert set(compose_cfg([]).keys()) | {"hydra"} == set(ROOT_KEYS)


def test_large_finite_values_are_not_rejected_as_non_finite() -> None:
    validate(compose_cfg(["optimizer.lr=1e10", "trainer.grad_clip=1e300"]))


@pytest.mark.parametrize("override,keys,what", [
    (["balancer.alpha_distill=0.5"], "balancer.alpha_distill=0.5", "no teacher and no distill term"),
    (["balancer.alphas={distill: 0.5, task: 1.0}"], "balancer.alphas.distill=0.5", "no teacher"),
    (["teacher=convnet_l", "balancer.alpha_distill=0.1"], "balancer.alpha_distill=0.1", "no distill term"),
    (["balancer=fixed_kd"], "balancer.alpha_distill=0.9", "no teacher"),
])
def test_distillation_weights_without_distillation_warn(override: list[str], keys: str, what: str) -> None:
    """kdrun train -m balancer.alpha_distill=0.1,0.5,0.9 on the default config trains three identical
    students: one line names the key and says what to add."""
    (message,) = config_warnings(compose_cfg(override))
    assert message.startswith(f"{keys} has no effect: this run has {what}")
    assert "teacher=convnet_l distill=kl" in message and "+recipe=" in message and "\n" not in message


@pytest.mark.parametrize("override", [
    [],  # plain supervised training with the default weights is what it says
    ["balancer.alpha_task=0.5"],
    ["balancer.alpha_distill=1.0"],  # the default: nothing was set
    ["teacher=convnet_l", "distill=kl", "balancer.alpha_distill=0.5"],
])
def test_no_warning_when_the_weights_matter_or_were_not_set(override: list[str]) -> None:
    assert config_warnings(compose_cfg(override)) == []


def test_validation_prints_the_warning_once(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import kdrun.config as config

    monkeypatch.setattr(config, "_WARNED", set())
    monkeypatch.delenv("RANK", raising=False)
    for _ in range(2):  # the CLI and then the engine validate the same config
        validate(compose_cfg(["balancer.alpha_distill=0.5"]))
    err = capsys.readouterr().err
    assert err.count("kdrun: warning: balancer.alpha_distill=0.5 has no effect") == 1 and err.count("\n") == 1
    monkeypatch.setenv("RANK", "1")  # the other ranks of a job stay quiet
    monkeypatch.setattr(config, "_WARNED", set())
    validate(compose_cfg(["balancer.alpha_distill=0.5"]))
    assert capsys.readouterr().err == ""


def test_unknown_option_and_key_are_rejected_by_composition() -> None:
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["balancer=dtoo"])
    assert "balancer/dtoo" in str(e.value)
    with pytest.raises((ConfigCompositionException, ConfigAttributeError, ConfigKeyError)):
        compose_cfg(["trainer.epochz=3"])


def test_validation_happens_before_anything_is_built(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The names patched are the ones the builders call (kdrun/engine/build.py imports instantiate and
    build_model into its own namespace), so building anything before validation raises here."""
    import kdrun.engine.build as build
    from kdrun.engine import train

    def boom(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("something was instantiated before validation failed")

    monkeypatch.setattr(build, "instantiate", boom)
    monkeypatch.setattr(build, "build_model", boom)
    with pytest.raises(ConfigError):
        train(compose_cfg(["trainer.epochs=0"]), tmp_path)
    # the patches are live: the same call with a valid config reaches a builder and fails there
    with pytest.raises(AssertionError, match="instantiated before validation"):
        train(compose_cfg([*QUICK, "trainer.epochs=1"]), tmp_path / "valid")


def _kdrun(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``kdrun ARGS`` in a subprocess; in ``cwd`` when the run would create its run dir (runs/...) there."""
    e = dict(os.environ)
    e.pop("HYDRA_FULL_ERROR", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "kdrun.cli", *args], capture_output=True, text=True,
                          env=e, timeout=120, cwd=cwd)


def test_cli_errors_are_one_paragraph_without_traceback(tmp_path: Path) -> None:
    r = _kdrun("train", "balancer=dtoo")
    assert r.returncode == 2
    assert "balancer has no option 'dtoo' (did you mean dto?)" in r.stderr  # not all 20 (issue #21 item 13)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr

    r = _kdrun("train", "trainer.epochs=-1", cwd=tmp_path)  # Hydra makes the run dir before validation
    assert r.returncode == 2
    assert "kdrun: error: trainer.epochs=-1 is out of range: it must be >= 1" in r.stderr
    assert "Traceback" not in r.stderr

    r = _kdrun("train", "trainer.epochs=-1", env={"HYDRA_FULL_ERROR": "1"}, cwd=tmp_path)
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

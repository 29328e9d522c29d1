"""Every recipe takes every group switch (issue #21 items 1 and 2): `+recipe=R distill=X` (one loss, a
list, a `-m` sweep over losses), `projector=X`, `optimizer=X`, `scheduler=X`, `+method=M` after the
recipe, and `+debug=quick`.

The argument is the balancer test's (tests/recipes/test_recipes.py):

1. No recipe, method preset or debug preset sets keys of these groups in its body
   (test_recipes.test_no_global_config_sets_group_keys); recipes and presets *select* options, and protocol
   values that differ from an option's defaults are named options (conf/distill/dkd_beta2.yaml,
   conf/optimizer/sgd_lr0.01.yaml, conf/scheduler/cosine_vidt.yaml, ...). So composing `+recipe=R group=X`
   is R's config with X's node in place of R's: checked here by real composition on a recipe of every kind
   (SWITCH_SAMPLE) for switches of each shape (a single loss replacing a list, a list, each other group
   replacing a recipe's named option, a method, the debug preset).
2. Whether that swapped config validates depends, besides the option's node (validated on its own), only on
   what `validation_class` keeps: the trainer settings, the task, the distill terms and whether there is a
   teacher. One representative recipe per class × every option of each group is therefore validated, by
   swapping the option's node into the recipe's resolved config (~10 ms a check instead of ~100 ms a
   composition). The one combination that is invalid by construction, distillation on a recipe without a
   teacher (the scratch 'Student'/'Teacher' rows), must fail with validation's one-paragraph ConfigError.

The CLI tests run `kdrun.cli.main` in this process (as tests/test_cli_errors.py): the issue's inputs end
with exit 0 and no traceback (two training steps on digits, with a random teacher), or exit 2 with one
paragraph that names the problem and the fix.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from kdrun.config import ConfigError, validate
from tests.conftest import compose_cfg
from tests.recipes.test_recipes import COMPOSED, GEN, REPRESENTATIVES, ROOT, SWITCH_SAMPLE

GROUPS = ("distill", "projector", "optimizer", "scheduler")
OPTIONS = {g: sorted(p.stem for p in (ROOT / "conf" / g).glob("*.yaml")) for g in GROUPS}
METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
# What `+method=M` replaces.
METHOD_GROUPS = ("distill", "projector", "balancer")
SWAPPED = (*GROUPS, "balancer")


@functools.cache
def _plain(name: str) -> dict[str, Any]:
    """The recipe's config as plain containers, resolved once (validate() then only resolves what is swapped
    in), except the switchable nodes: a distill term's `projector: ${projector}` must follow a projector
    switch, as when composed."""
    cfg = COMPOSED[name]
    assert not isinstance(cfg, Exception), cfg
    plain = OmegaConf.to_container(cfg, resolve=True)
    for g in SWAPPED:
        plain[g] = OmegaConf.to_container(cfg[g]) if cfg[g] is not None else None
    return plain


def _resolved(name: str) -> DictConfig:
    return OmegaConf.create(_plain(name))


@pytest.fixture(scope="module")
def option_nodes() -> dict[tuple[str, str], Any]:
    """Each option of each group as Hydra composes it (named options have a defaults list), as plain
    containers: group -> its node ({term: node} for distill)."""
    out = {}
    for g in GROUPS:
        for o in OPTIONS[g]:
            out[(g, o)] = OmegaConf.to_container(compose_cfg([f"{g}={o}"])[g])
    return out


@pytest.fixture(scope="module")
def method_nodes() -> dict[str, dict[str, Any]]:
    """`+method=M`'s distill, projector and balancer nodes."""
    out = {}
    for m in METHODS:
        cfg = compose_cfg([f"+method={m}"])
        out[m] = {g: OmegaConf.to_container(cfg[g]) for g in METHOD_GROUPS}
    return out


def test_the_named_options_exist() -> None:
    """The recipes' protocol values are options a user can pick too (the test is not vacuous)."""
    assert {"dkd_beta2", "dkd_beta6", "kl_deit", "at_stages4", "reviewkd_weight0.6"} <= set(OPTIONS["distill"])
    assert {"sgd_lr0.01", "adamw_vidt"} <= set(OPTIONS["optimizer"])
    assert {"multistep_10_14", "cosine_vidt", "cosine_quick"} <= set(OPTIONS["scheduler"])
    assert {"orthogonal_affine", "subspace_identity_metric"} <= set(OPTIONS["projector"])
    assert set(METHODS) >= {"deit_kd", "dto_kd", "mokd", "vkd", "none"}


def test_the_generator_picks_the_option_that_holds_a_recipes_values() -> None:
    """scripts/gen_recipes.py states every value a recipe needs and picks the option that is exactly the
    base option with those values; a value no option holds stops the generator naming the file to add (so
    a changed option default fails `--check` rather than changing a paper recipe)."""
    option_for = GEN["option_for"]
    assert option_for("optimizer", "sgd", {"lr": 0.05, "momentum": 0.9}) == "sgd"  # sgd.yaml's own values
    assert option_for("optimizer", "sgd", {"lr": 0.01}) == "sgd_lr0.01"
    assert option_for("distill", "dkd", {"dkd": {"beta": 2.0, "warmup_epochs": 20}}) == "dkd_beta2"
    assert option_for("scheduler", "cosine", {"warmup_epochs": 0.0, "min_lr_ratio": 1.0e-3}) == "cosine_vidt"
    with pytest.raises(SystemExit, match=r"no conf/optimizer option is sgd with \{'lr': 0.123\}; add "
                                         r"conf/optimizer/<name>.yaml with `defaults: \[sgd, _self_\]`"):
        option_for("optimizer", "sgd", {"lr": 0.123})


def test_method_presets_only_select_options_and_no_recipe_selects_a_method() -> None:
    """A preset with keys in its body merges them into whatever the user picks afterwards (deit_kd's
    `distill.deit_hard.student_logits` under `distill=kl`); a recipe that selected `/method: M` would refuse
    `+method=M2` (Hydra: "Multiple values for method") and, with `method=M2`, keep its own distill
    override over M2's. Recipes select the method's parts instead (scripts/gen_recipes.py)."""
    import yaml

    for m in METHODS:
        body = yaml.safe_load((ROOT / "conf" / "method" / f"{m}.yaml").read_text()) or {}
        assert set(body) <= {"defaults"}, (m, body)
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 175
    offenders = [p.stem for p in recipes
                 if any("method" in str(d) for d in (yaml.safe_load(p.read_text()) or {}).get("defaults", []))]
    assert not offenders, offenders


# ---------------------------------------------------------------------------------------------------
# (1) A switch on the command line replaces the recipe's option whole.

SWITCHES = [("distill", "fitnet"), ("distill", "[kl,at]"), ("projector", "linear"), ("optimizer", "adamw"),
            ("scheduler", "constant")]


def _distill_node(spec: str, option_nodes: dict[tuple[str, str], Any]) -> dict[str, Any]:
    """What `distill=SPEC` composes to: the options' term nodes merged in order."""
    out: dict[str, Any] = {}
    for o in spec.strip("[]").split(","):
        out.update(option_nodes[("distill", o)])
    return out


@pytest.mark.parametrize("name", SWITCH_SAMPLE)
def test_a_switch_replaces_the_recipes_option_whole(name: str, option_nodes: dict[tuple[str, str], Any],
                                                    method_nodes: dict[str, dict[str, Any]]) -> None:
    """`+recipe=R group=X` (and `+recipe=R +method=M`) composes to R's config with X's node (M's parts) in
    place of R's and nothing else changed."""
    recipe = OmegaConf.to_container(COMPOSED[name])
    for group, spec in SWITCHES:
        got = OmegaConf.to_container(compose_cfg([f"+recipe={name}", f"{group}={spec}"]))
        want = dict(recipe)
        want[group] = _distill_node(spec, option_nodes) if group == "distill" else option_nodes[(group, spec)]
        assert got == want, (name, group, spec)
    for m in ("deit_kd", "mokd"):  # a single loss, a list of losses with a feature projector
        got = OmegaConf.to_container(compose_cfg([f"+recipe={name}", f"+method={m}"]))
        assert got == {**recipe, **method_nodes[m]}, (name, m)


# ---------------------------------------------------------------------------------------------------
# (2) Every option of each group validates on one recipe of every validation class.


def _needs_teacher_error(e: ConfigError, what: str) -> None:
    """Distillation on a recipe without a teacher: validation's one paragraph, naming the fix."""
    msg = str(e)
    assert "need a teacher but teacher is none" in msg and "teacher=" in msg and "distill=none" in msg, (what, msg)
    assert "\n" not in msg, msg


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_every_option_of_every_group_validates_on_the_recipe(
        name: str, option_nodes: dict[tuple[str, str], Any], method_nodes: dict[str, dict[str, Any]]) -> None:
    """`kdrun.config.validate` on the recipe with each option of distill, projector, optimizer, scheduler
    and each method in turn. A recipe without a teacher refuses distillation with a ConfigError; every
    other combination validates."""
    x = _resolved(name)
    recipe = _plain(name)
    no_teacher = x.teacher is None
    failed: dict[str, str] = {}
    tried = 0
    swaps = [({g: node}, f"{g}={o}") for (g, o), node in option_nodes.items()]
    swaps += [(parts, f"+method={m}") for m, parts in method_nodes.items()]
    for parts, what in swaps:
        for g in SWAPPED:  # the recipe's nodes (validate resolved them in place), but `parts`
            x[g] = parts.get(g, recipe[g])
        tried += 1
        distils = bool(x.distill)
        try:
            validate(x)
        except ConfigError as e:
            if no_teacher and distils:
                _needs_teacher_error(e, what)
                continue
            failed[what] = str(e)
            continue
        if no_teacher and distils:
            failed[what] = "validated, but distils without a teacher"
    assert tried == sum(map(len, OPTIONS.values())) + len(METHODS)
    assert not failed, failed


# ---------------------------------------------------------------------------------------------------
# Sweeps over losses (README: `distill=[kl,fitnet]`, `-m +recipe=quickstart distill=kl,dkd,dist`).


def sweep_jobs(argv: list[str]) -> list[list[str]]:
    """The job override lists Hydra's basic sweeper makes of a `-m` command line."""
    overrides = OverridesParser.create().parse_overrides(overrides=argv)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


@pytest.mark.parametrize("argv,terms", [
    (["+recipe=quickstart", "distill=kl,dkd,dist"], [{"kl"}, {"dkd"}, {"dist"}]),
    (["+recipe=quickstart", "distill=[kl,fitnet],at"], [{"kl", "fitnet"}, {"at"}]),
    (["+recipe=cifar100_resnet56_resnet20_mokd", "distill=kl,dkd_beta2", "optimizer=sgd,adamw"],
     [{"kl"}, {"kl"}, {"dkd"}, {"dkd"}]),
])
def test_loss_sweeps_compose_and_validate(argv: list[str], terms: list[set[str]]) -> None:
    """Each job of the sweep, as Hydra's basic sweeper splits it, composes to exactly the swept losses."""
    jobs = sweep_jobs(argv)
    assert len(jobs) == len(terms), jobs
    for job, want in zip(jobs, terms):
        cfg = compose_cfg(job)
        validate(cfg)
        assert set(cfg.distill) == want, job


# ---------------------------------------------------------------------------------------------------
# +debug=quick on every recipe (item 2).


@pytest.fixture(scope="module")
def quick() -> DictConfig:
    return compose_cfg(["+debug=quick"])


def _with_quick(x: DictConfig, quick: DictConfig) -> DictConfig:
    """What `+recipe=R +debug=quick` must be: R (`x`, changed in place) with the preset's schedule and its
    trainer/logger keys."""
    x.scheduler = quick.scheduler
    x.trainer.batch_size = quick.trainer.batch_size
    for k in ("log_every", "grad_stats_every", "progress"):
        x.logger[k] = quick.logger[k]
    return x


def test_debug_quick_composes_on_top_of_a_recipe(quick: DictConfig) -> None:
    """Real compositions on a recipe of every kind; the preset's schedule is an option, so `scheduler=X`
    on the command line still replaces it whole."""
    assert quick.scheduler._target_.endswith(".cosine") and quick.scheduler.warmup_epochs == 0
    for name in SWITCH_SAMPLE:
        got = compose_cfg([f"+recipe={name}", "+debug=quick"])
        want = _with_quick(COMPOSED[name].copy(), quick)
        assert OmegaConf.to_container(got) == OmegaConf.to_container(want), name
        validate(got)
    got = compose_cfg(["+recipe=quickstart", "+debug=quick", "scheduler=multistep"])
    assert got.scheduler == compose_cfg(["scheduler=multistep"]).scheduler
    validate(got)


def test_debug_quick_validates_with_every_recipe(quick: DictConfig) -> None:
    failed = {}
    for name in COMPOSED:
        try:
            validate(_with_quick(_resolved(name), quick))
        except ConfigError as e:
            failed[name] = str(e)
    assert len(COMPOSED) >= 175 and not failed, failed


# ---------------------------------------------------------------------------------------------------
# The command lines through the CLI.

# In-process runs must leave the logging setup and the working directory of the test session alone.
QUIET = ["hydra/job_logging=none", "hydra/hydra_logging=none", "hydra.output_subdir=null"]
# Two steps on digits with a random teacher: seconds, no teacher fit.
TWO_STEPS = ["trainer.max_steps=2", "trainer.epochs=1", "teacher.checkpoint=null", "teacher.allow_random=true",
             "logger.progress=false", "logger.backends=[]"]


@pytest.fixture
def kdrun(kdrun_cli: Callable[..., tuple[int, str, str]]) -> Callable[..., tuple[int, str]]:
    """``kdrun(*argv)`` → (exit status, stderr) of ``kdrun.cli.main`` run in this process, quietly."""
    return lambda *argv: kdrun_cli(*argv, *QUIET)[::2]


@pytest.mark.parametrize("switch", [["distill=fitnet"], ["+debug=quick"]], ids=["item1-distill", "item2-debug"])
def test_cli_recipe_with_a_switch_trains(kdrun: Callable, tmp_path: Path, switch: list[str]) -> None:
    """Item 1: `+recipe=quickstart distill=fitnet` was a ConfigKeyError traceback; item 2: `+recipe=quickstart
    +debug=quick` failed on `scheduler.milestones is not a parameter of ...cosine`."""
    code, err = kdrun("train", "+recipe=quickstart", *switch, *TWO_STEPS, f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    assert "Traceback" not in err and "kdrun: error" not in err, err
    assert (tmp_path / "results.json").is_file()


def test_cli_method_preset_is_refused_in_one_paragraph_where_it_cannot_run(kdrun: Callable, tmp_path: Path) -> None:
    """`+method=deit_kd` was a ConfigKeyError traceback on top of the quickstart. Alone it has no teacher;
    on the quickstart the ConvNet student has no distillation token: each is one paragraph, exit 2."""
    code, err = kdrun("train", "+method=deit_kd", f"hydra.run.dir={tmp_path / 'alone'}")
    assert code == 2
    assert err.startswith("kdrun: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "need a teacher but teacher is none" in err and "teacher=" in err
    code, err = kdrun("train", "+recipe=quickstart", "+method=deit_kd", *TWO_STEPS,
                      f"hydra.run.dir={tmp_path / 'quickstart'}")
    assert code == 2
    assert err.startswith("kdrun: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "dist_logits" in err and "distillation token" in err and "deit_" in err, err

"""Defaults once (issue #24 item 4): a ``_target_`` node's default values have one source, the signature of
the callable it names; the option files of ``conf/`` list them, and these tests keep the two from drifting.

Why the options keep listing keys whose value is the signature default (instead of dropping them or
generating the YAML from the signatures): Hydra composes in struct mode, so ``kdrun train
balancer.alpha_distill=0.9`` works only for a key the option lists -- a dropped key needs
``+balancer.alpha_distill=0.9``, is missing from ``--cfg job`` and from the valid keys the CLI suggests for a
typo (:func:`test_a_plain_override_needs_the_key_listed` pins that premise down). Generated files would lose
the hand-written sources (paper lines, code references) that stand beside the values. So a listed value must
equal the signature default -- a signature default that changes fails here until the YAML follows it -- or
its line says why it differs, with a trailing ``# deliberate: <reason>``. A marker on a value that equals
its default fails too, so every marker is true. Named options built on another option (``defaults: [kl,
_self_]``, conf/distill/kl_deit.yaml) set only what differs from it.

A distill term's ``weight`` is not an argument of the term; its default is what the engine uses when the
key is absent (:func:`kdrun.engine.build.build_distill`), asked from the engine here.
"""
from __future__ import annotations

import copy
import functools
import inspect
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from kdrun.config import import_target
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
MARKER = "deliberate:"
# Groups whose options are nodes (or pick them). Not here: method/ and debug/ (presets that select options
# of other groups and set no keys of them; tests/recipes checks that), hydra/ (Hydra's own settings), recipe/.
GROUPS = ("balancer", "dataset", "distill", "model", "optimizer", "projector", "scheduler", "student",
          "task", "teacher")
FILES = sorted(p for g in GROUPS for p in (CONF / g).glob("*.yaml"))


def _rel(path: Path) -> str:
    return str(path.relative_to(CONF)) if path.is_relative_to(CONF) else path.name


def _id(path: Path) -> str:
    return _rel(path).removesuffix(".yaml")


# ---------------------------------------------------------------------------------------------------
# Reading a file: values as OmegaConf reads them, line numbers and comments from PyYAML's node graph.


@functools.cache
def term_weight_default() -> float:
    """The ``weight`` of a distill term that sets none, as the engine builds it."""
    from kdrun.engine.build import build_distill

    _, weights = build_distill(OmegaConf.create({"distill": {"t": {"_target_": "kdrun.losses.kl.KL"}}}))
    return weights["t"]


def _comment(lines: list[str], key: yaml.Node, value: yaml.Node) -> tuple[int, str]:
    """The line (0-based) and the comment that ends ``key: value``: after a scalar or a flow collection
    (``[a, b]``), on the line where it ends; after the key, for a block collection (``- a`` lines below)."""
    if isinstance(value, yaml.ScalarNode) or getattr(value, "flow_style", False):
        line, rest = value.end_mark.line, lines[value.end_mark.line][value.end_mark.column:]
    else:
        line = key.end_mark.line
        rest = lines[line][key.end_mark.column:].lstrip().removeprefix(":")
    rest = rest.strip()
    return line, (rest[1:].strip() if rest.startswith("#") else "")


Pairs = dict[str, tuple[yaml.Node, yaml.Node]]  # key -> (key node, value node) of one mapping


def _target_nodes(plain: Any, node: yaml.Node, path: str) -> Iterator[tuple[str, dict[str, Any], Pairs]]:
    """Every mapping with a ``_target_``: its dotted path, its values and its nodes."""
    if isinstance(plain, dict) and isinstance(node, yaml.MappingNode):
        pairs = {str(k.value): (k, v) for k, v in node.value}
        if "_target_" in plain:
            yield path, plain, pairs
        for k, v in plain.items():
            if k != "defaults" and k in pairs:
                yield from _target_nodes(v, pairs[k][1], f"{path}.{k}" if path else str(k))


def _same(value: Any, default: Any) -> bool:
    """``value`` (as read from YAML) is ``default``: tuples are lists, 1 is 1.0, but a bool is no number."""
    if isinstance(default, tuple):
        default = list(default)
    if isinstance(value, bool) or isinstance(default, bool):
        return type(value) is type(default) and value == default
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return value == default
    if isinstance(value, list) and isinstance(default, list):
        return len(value) == len(default) and all(_same(v, d) for v, d in zip(value, default))
    if isinstance(value, dict) and isinstance(default, dict):
        return value.keys() == default.keys() and all(_same(value[k], default[k]) for k in value)
    return type(value) is type(default) and value == default


def signature_problems(path: Path, group: str) -> list[str]:
    """Where ``path`` (an option of ``group``) departs from its targets' signature defaults without saying
    why: a value that differs from its default without ``# deliberate: <reason>`` on its line, a marker with
    no reason, a marker on a line whose value does not differ from a default (one line each)."""
    text = path.read_text()
    lines = text.splitlines()
    plain = OmegaConf.to_container(OmegaConf.create(text), resolve=False) or {}
    graph = yaml.compose(text)
    problems: list[str] = []
    justified: set[int] = set()  # lines whose value differs from its default (where a marker belongs)
    for where, values, pairs in _target_nodes(plain, graph, ""):
        target = import_target(str(values["_target_"]), where or _rel(path))
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):  # no signature to compare with
            continue
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        term = group == "distill" and "." not in where  # a distill term: `weight` is the engine's key
        for key, value in values.items():
            if key.startswith("_") and key.endswith("_") or (key == "defaults" and not where):
                continue  # Hydra's keys: _target_, _partial_, a file's defaults list
            name = f"{_rel(path)}: {where + '.' if where else ''}{key}"
            if isinstance(value, dict) and "_target_" in value:
                continue  # a node of its own, checked against its own target
            if isinstance(value, str) and ("${" in value or value == "???"):
                continue  # wiring or a required value, not a default
            owner = f"the default of {values['_target_']}"
            if term and key == "weight":
                default: Any = term_weight_default()
                owner = "the engine's default term weight"
            elif key in params:
                default = params[key].default
                if default is inspect.Parameter.empty:
                    continue  # required: the YAML is the only source of the value
            elif var_kw:
                continue  # taken by **kwargs (timm.create_model's num_classes): no default to compare with
            else:
                problems.append(f"{name} is not a parameter of {values['_target_']}")
                continue
            if _same(value, default):
                continue
            line, comment = _comment(lines, *pairs[key])
            justified.add(line)
            if not comment.startswith(MARKER):
                problems.append(f"{name}: {value!r} is not {owner} ({default!r}); "
                                f"set the default, or say why on the line: `# {MARKER} <reason>`")
            elif len(comment.removeprefix(MARKER).split()) < 3:
                problems.append(f"{name}: `# {MARKER}` needs a reason (a few words: the source of the value)")
    for i, line in enumerate(lines):
        if f"# {MARKER}" in line and i not in justified:
            problems.append(f"{_rel(path)}:{i + 1}: `# {MARKER}` on a line whose value is not one that differs "
                            f"from its default; drop the marker: {line.strip()}")
    return problems


# ---------------------------------------------------------------------------------------------------
# Named options on a base: `defaults: [base, _self_]` and the values that differ.


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    return copy.deepcopy(over)


def _put(tree: dict[str, Any], package: str, node: dict[str, Any], replace: bool) -> dict[str, Any]:
    """``tree`` with ``node`` merged (or, for an ``override``, put in place of what is there) at ``package``."""
    if not package:
        return _merge(tree, node)
    head, _, rest = package.partition(".")
    out = dict(tree)
    below = out.get(head, {}) if isinstance(out.get(head), dict) else {}
    out[head] = (node if replace else _merge(below, node)) if not rest else _put(below, rest, node, replace)
    return out


def _defaults(path: Path) -> list[Any]:
    return list((yaml.safe_load(path.read_text()) or {}).get("defaults", []))


def _body(path: Path) -> dict[str, Any]:
    body = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    body.pop("defaults", None)
    return body


def _apply_defaults(conf: Path, group: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """conf/<group>/<name>.yaml's defaults list applied, with ``body`` at its ``_self_``, relative to the
    group's package. Reads the forms conf/ uses: `- <option of the group>`, `- /<group>@<package>: <option>`
    and its `override`; another form fails, naming it."""
    entries = _defaults(conf / group / f"{name}.yaml") or ["_self_"]
    if "_self_" not in entries:
        raise AssertionError(f"conf/{group}/{name}.yaml: its defaults list has no _self_ (say where the body goes)")
    tree: dict[str, Any] = {}
    for entry in entries:
        if entry == "_self_":
            tree = _merge(tree, body)
        elif isinstance(entry, str) and "/" not in entry and "@" not in entry:
            tree = _merge(tree, composed_option(conf, group, entry))
        elif isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)).removeprefix("override ")[:1] == "/":
            (key, option), = entry.items()
            other, _, package = key.removeprefix("override ").partition("@")
            tree = _put(tree, package, composed_option(conf, other[1:], str(option)),
                        replace=key.startswith("override "))
        else:
            raise AssertionError(f"conf/{group}/{name}.yaml: defaults entry {entry!r} is not a form this test "
                                 "reads; extend _apply_defaults")
    return tree


@functools.cache
def composed_option(conf: Path, group: str, name: str) -> dict[str, Any]:
    """conf/<group>/<name>.yaml as Hydra composes it, relative to the group's package."""
    return _apply_defaults(conf, group, name, _body(conf / group / f"{name}.yaml"))


def _leaves(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    else:
        yield path, node


def _at(tree: Any, dotted: str) -> tuple[bool, Any]:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


def repeat_problems(path: Path) -> list[str]:
    """The values that ``path`` (conf/<group>/<name>.yaml with a defaults list) sets to what its defaults
    list already gives."""
    conf, group, name = path.parents[1], path.parent.name, path.stem
    given = _apply_defaults(conf, group, name, {})  # the defaults list alone
    problems = []
    for key, value in _leaves(_body(path)):
        found, before = _at(given, key)
        if found and _same(value, before):
            problems.append(f"{_rel(path)}: {key}: {value!r} repeats what its defaults list already gives; "
                            "set only the values that differ")
    return problems


# ---------------------------------------------------------------------------------------------------
# The tests.


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_every_value_is_its_signature_default_or_deliberate(path: Path) -> None:
    problems = signature_problems(path, path.parent.name)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", [p for p in FILES if _defaults(p)], ids=_id)
def test_a_named_option_sets_only_what_differs_from_its_base(path: Path) -> None:
    problems = repeat_problems(path)
    assert not problems, "\n".join(problems)


def test_the_base_reading_is_what_hydra_composes() -> None:
    """composed_option (what the repeat check compares with) against Hydra, for every option with a
    defaults list of the groups at the root of the config, and one student and teacher (their `model`)."""
    picked = [p for p in FILES if _defaults(p) and p.parent.name not in ("student", "teacher")]
    picked += [CONF / "student" / "resnet20.yaml", CONF / "teacher" / "timm.yaml"]
    assert any(p.parent.name == "balancer" for p in picked) and any(p.parent.name == "distill" for p in picked)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for p in picked:
            group = p.parent.name
            cfg = compose(config_name="config", overrides=[f"{group}={p.stem}"])
            hydra_node = OmegaConf.to_container(cfg[group], resolve=False)
            assert composed_option(CONF, group, p.stem) == hydra_node, _rel(p)


def test_a_plain_override_needs_the_key_listed() -> None:
    """The premise of listing default values: `group.key=value` works for a listed key only (struct mode).
    Should this ever fail, keys equal to their defaults could be dropped from conf/ instead."""
    assert compose_cfg(["balancer.alpha_distill=0.9"]).balancer.alpha_distill == 0.9  # fixed lists it
    with pytest.raises(ConfigCompositionException, match=r"\+balancer.alpha_distill"):
        compose_cfg(["balancer=imtl", "balancer.alpha_distill=0.9"])  # IMTL-G lists no keys


# The checks themselves can fail: on files written for the purpose, around KL's real defaults.

def _kl(t: str, w: str) -> str:
    return f"kl:\n  _target_: kdrun.losses.kl.KL\n  temperature: {t}\n  weight: {w}\n"


def _kl_default_t() -> float:
    return float(inspect.signature(import_target("kdrun.losses.kl.KL", "kl")).parameters["temperature"].default)


T, OTHER_T = _kl_default_t(), _kl_default_t() + 1.5


@pytest.mark.parametrize("text,expect", [
    (_kl(f"{T}", "1.0"), []),                                                          # every value a default
    (_kl(f"{OTHER_T}", "1.0"), [f"kl.temperature: {OTHER_T} is not the default"]),     # differs, unmarked
    (_kl(f"{OTHER_T}  # deliberate: the paper's T for this pair", "1.0"), []),         # differs, marked
    (_kl(f"{OTHER_T}  # deliberate:", "1.0"), ["needs a reason"]),                     # marked, no reason
    (_kl(f"{T}  # deliberate: as the paper says", "1.0"), ["drop the marker"]),        # the default, marked
    (_kl(f"{T}", "3.0"), ["kl.weight: 3.0 is not the engine's default term weight"]),  # the engine's default
    (_kl(f"{T}", "1.0") + "  tempreature: 4.0\n", ["tempreature is not a parameter"]),  # (validate's case too)
], ids=["defaults", "unmarked", "marked", "no-reason", "stale-marker", "weight", "unknown-key"])
def test_signature_check_reports(tmp_path: Path, text: str, expect: list[str]) -> None:
    assert term_weight_default() == 1.0  # the texts above assume it
    path = tmp_path / "kl.yaml"
    path.write_text(text)
    problems = signature_problems(path, "distill")
    assert len(problems) == len(expect), problems
    for p, e in zip(problems, expect):
        assert e in p, (p, e)


def test_signature_check_reads_block_and_flow_values(tmp_path: Path) -> None:
    """A flow list's marker ends the line where the list ends, a block list's the key's line."""
    head = "_target_: kdrun.optim.optimizer.sgd\n_partial_: true\n"
    cases = {
        "no_decay: [a, b]  # deliberate: the model's tokens, as its paper\n": 0,
        "no_decay: [a,\n  b]  # deliberate: the model's tokens, as its paper\n": 0,
        "no_decay:  # deliberate: the model's tokens, as its paper\n  - a\n": 0,
        "no_decay:\n  - a  # deliberate: the model's tokens, as its paper\n": 2,  # unmarked + a stray marker
    }
    for body, n in cases.items():
        (tmp_path / "sgd.yaml").write_text(head + body)
        assert len(signature_problems(tmp_path / "sgd.yaml", "optimizer")) == n, body


def test_repeat_check_reports(tmp_path: Path) -> None:
    """fixed_kd with alpha_task set again to fixed's value, and kl_deit with kl's temperature (copies of the
    base options in a conf/ of its own, so that no other test sees the files)."""
    assert repeat_problems(CONF / "balancer" / "fixed_kd.yaml") == []
    problems = _repeats_of(tmp_path, "balancer", "fixed", {"alpha_task": 1.0, "alpha_distill": 0.9})
    assert len(problems) == 1 and "alpha_task: 1.0 repeats" in problems[0], problems
    problems = _repeats_of(tmp_path, "distill", "kl", {"kl": {"temperature": 4, "student_logits": "dist_logits"}})
    assert len(problems) == 1 and "kl.temperature: 4 repeats" in problems[0], problems


def _repeats_of(tmp_path: Path, group: str, base: str, body: dict[str, Any]) -> list[str]:
    """repeat_problems of an option `defaults: [base, _self_]` + body, next to a copy of the base."""
    (tmp_path / group).mkdir(parents=True, exist_ok=True)
    (tmp_path / group / f"{base}.yaml").write_text((CONF / group / f"{base}.yaml").read_text())
    path = tmp_path / group / "named.yaml"
    path.write_text(yaml.safe_dump({"defaults": [base, "_self_"], **body}))
    return repeat_problems(path)

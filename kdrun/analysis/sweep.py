"""What a set of runs varies: the settings that tell runs apart, and the seeds that replicate them.

``kdrun plot`` draws one line per setting (mean and band over seeds) and ``kdrun tables`` without
``--table`` prints one row per setting; both group the runs with :func:`group_runs`:

* A run's *settings* are its command-line overrides, as Hydra saved them (``.hydra/overrides.yaml``, e.g.
  ``+recipe=quickstart balancer=dto seed=1``; the ``+``/``++`` prefixes are not part of the key). A key
  that another run overrides and this one does not gets this run's actual value: Hydra's recorded group
  choice (``.hydra/hydra.yaml``), else the saved config's value, so ``+recipe=quickstart`` and
  ``+recipe=quickstart balancer=dto`` differ as ``balancer=fixed_mean`` / ``balancer=dto``.
* The *swept* keys are those whose values differ between the runs. ``seed`` and ``trainer.seed`` are the
  replicate axis (a group's runs are its seeds); every other swept key defines the groups, and a group is
  named by its values: ``balancer=dto``, ``balancer.alpha_distill=0.1``. What all runs share names the set.
* Runs without Hydra's record (made through the Python API) are told apart by facts of their saved config
  instead: recipe, balancer, distill terms, models, paper cell, seed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPLICATE_KEYS = ("seed", "trainer.seed")
UNSET = "(unset)"  # a key a run neither overrides nor has in its config


class SweepError(ValueError):
    """A grouping the user asked for that the runs cannot give (``--by`` a key no run has)."""


def _load(path: Path) -> Any:
    """A YAML/JSON file's content, or None when it is missing or unreadable."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _node(d: Any, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def natural_key(path: Path) -> list[Any]:
    """Sort key that puts sweep job ``10_dto_seed0`` after ``9_...`` (Hydra numbers jobs in launch order)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def parse_override(text: Any) -> tuple[str, str] | None:
    """``(key, value)`` of one Hydra override string: ``+recipe=quickstart`` → ``("recipe", "quickstart")``;
    a deletion ``~key`` → ``(key, "(deleted)")``; anything else (no ``=``) → None."""
    s = str(text).strip()
    if s.startswith("~"):
        return s[1:].split("=", 1)[0].strip(), "(deleted)"
    s = s.lstrip("+")
    if "=" not in s:
        return None
    k, v = s.split("=", 1)
    return k.strip(), v.strip()


def read_overrides(run_dir: Path) -> dict[str, str] | None:
    """The run's overrides in command-line order, or None without ``.hydra/overrides.yaml``."""
    raw = _load(Path(run_dir) / ".hydra" / "overrides.yaml")
    if not isinstance(raw, list):
        return None
    return dict(kv for kv in map(parse_override, raw) if kv is not None)


def _text(v: Any) -> str:
    # As the value would be typed as an override: YAML's spelling of booleans and null.
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else str(v)


@dataclass
class RunRecord:
    """What a run directory says about how the run was configured."""

    path: Path
    overrides: dict[str, str] | None
    choices: dict[str, Any]
    config: dict[str, Any]

    @classmethod
    def read(cls, run_dir: Path) -> "RunRecord":
        run_dir = Path(run_dir)
        cfg = _load(run_dir / "config.yaml")
        if not isinstance(cfg, dict):
            cfg = _node(_load(run_dir / "results.json"), "config")
        choices = _node(_load(run_dir / ".hydra" / "hydra.yaml"), "hydra", "runtime", "choices")
        return cls(run_dir, read_overrides(run_dir), choices if isinstance(choices, dict) else {},
                   cfg if isinstance(cfg, dict) else {})

    def value(self, key: str) -> str:
        """The run's value of an override key: its own override, else Hydra's group choice, else the
        saved config's value at that dotted path, else :data:`UNSET`."""
        if self.overrides is not None and key in self.overrides:
            return self.overrides[key]
        if self.choices.get(key) is not None:
            return str(self.choices[key])
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return UNSET
            node = node[part]
        return _text(node)


FACT_KEYS = ("recipe", "balancer", "distill", "student", "teacher", "row", "column", "seed")


def facts(rec: RunRecord) -> dict[str, str]:
    """What tells runs apart without their overrides: the recipe and balancer options Hydra recorded, else
    what the saved config says: the balancer's class, distill terms, models, paper cell and seed."""
    cfg, choices = rec.config, rec.choices

    def model(role: str) -> str:
        node = _node(cfg, role, "model") or {}
        return str(node.get("model_name") or str(node.get("_target_", "")).rsplit(".", 1)[-1])

    out: dict[str, str] = {}
    if choices.get("recipe"):
        out["recipe"] = str(choices["recipe"])
    balancer = choices.get("balancer")
    if not balancer and isinstance(cfg.get("balancer"), dict):
        b = cfg["balancer"]
        balancer = str(b.get("_target_", "")).rsplit(".", 1)[-1] + (f"({b['mode']})" if b.get("mode") else "")
    if balancer:
        out["balancer"] = str(balancer)
    if cfg:
        distill = cfg.get("distill")
        out["distill"] = "+".join(distill) if isinstance(distill, dict) and distill else "none"
        out["student"] = model("student")
        out["teacher"] = model("teacher") if cfg.get("teacher") else "none"
        paper = cfg.get("paper") if isinstance(cfg.get("paper"), dict) else {}
        if paper.get("row") is not None:
            out["row"], out["column"] = str(paper.get("row")), str(paper.get("column"))
        # trainer.seed overrides the top-level seed, as in the engine
        seed = _node(cfg, "trainer", "seed")
        seed = cfg.get("seed") if seed is None else seed
        if seed is not None:
            out["seed"] = str(seed)
    return out


def describe_facts(f: dict[str, str], keys: list[str]) -> str:
    """``quickstart dto seed=1``: recipe and balancer by their option name, other facts as key=value."""
    return " ".join(f[k] if k in ("recipe", "balancer") else f"{k}={f[k]}" for k in keys if k in f)


def identity_keys(f: dict[str, str]) -> list[str]:
    """The facts that name one run on their own: the recipe (or the model pair) + balancer + seed."""
    if "recipe" in f:
        return ["recipe", "balancer", "seed"]
    return ["student", "teacher", "balancer", "distill", "seed"]


@dataclass
class Group:
    """The runs of one setting: the values of the grouping keys; the runs are its replicates (seeds)."""

    setting: tuple[tuple[str, str], ...]
    label: str
    runs: list[Path] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)  # each run's seed, in run order ("" when it has none)


@dataclass
class Sweep:
    groups: list[Group]
    keys: list[str]                   # the keys that define the groups
    replicates: list[str]             # the replicate keys that vary (seed, trainer.seed)
    shared: list[tuple[str, str]]     # (key, value) that every run has alike
    source: str                       # "overrides" (Hydra's record) or "config" (facts of the saved config)

    @property
    def shared_label(self) -> str:
        """What all runs share, without the seed: a figure or table title."""
        kept = [(k, v) for k, v in self.shared if k not in REPLICATE_KEYS and v != UNSET]
        if self.source == "config":  # the facts that name a run (recipe or models, balancer), not every one
            f = dict(kept)
            return describe_facts(f, [k for k in identity_keys(f) if k in f] or list(f))
        return " ".join(f"{k}={v}" for k, v in kept)

    @property
    def seeds(self) -> list[str]:
        """The distinct seeds of all runs, in numeric order where they are numbers."""
        return sorted({s for g in self.groups for s in g.seeds if s}, key=order_key)


def order_key(v: str) -> tuple[int, float, str]:
    """Sort key of a setting's value: numbers by value (0.1 < 0.25 < 0.9 < 10), then other text."""
    try:
        x = float(v)
    except ValueError:
        return (1, 0.0, v)
    return (0, x, "") if math.isfinite(x) else (1, 0.0, v)  # nan would make the order undefined


def _seed_of(values: dict[str, str]) -> str:
    # trainer.seed, when set, is the seed the engine uses; else the top-level seed.
    ts = values.get("trainer.seed", UNSET)
    s = ts if ts not in (UNSET, "null") else values.get("seed", UNSET)
    return "" if s in (UNSET, "null") else s


def group_runs(run_dirs: list[Path], by: list[str] | None = None) -> Sweep:
    """Group ``run_dirs`` by what was swept (see the module docstring), or by the keys ``by``.

    Groups are ordered key by key: numerically where every value of the key is a number, else in the
    order the runs first show the value (runs in sweep-job order), so a sweep's legend reads as its
    command line. A key of ``by`` that no run has raises :class:`SweepError`."""
    recs = [RunRecord.read(d) for d in sorted(map(Path, run_dirs), key=natural_key)]
    if recs and all(r.overrides is not None for r in recs):
        source = "overrides"
        keys = list(dict.fromkeys(k for r in recs for k in r.overrides or {}))
        if by:  # a --by key no run overrides can still be a config value (balancer.alpha_distill)
            keys += [k for k in by if k not in keys]
        values = [{k: r.value(k) for k in keys} for r in recs]
    else:
        source = "config"
        values = [facts(r) for r in recs]
        keys = [k for k in FACT_KEYS if any(k in v for v in values)]
        values = [{k: v.get(k, UNSET) for k in keys} for v in values]
    swept = [k for k in keys if len({v[k] for v in values}) > 1]
    if by is not None:
        unknown = [k for k in by if all(v.get(k, UNSET) == UNSET for v in values)]
        if unknown:
            raise SweepError(f"--by {','.join(unknown)}: no run has {'that key' if len(unknown) == 1 else 'those keys'}"
                             f"; the keys that differ between these runs are {', '.join(swept) or 'none'}, "
                             f"and all their settings are {', '.join(keys) or 'none'}")
        group_keys = list(by)
    else:
        group_keys = [k for k in swept if k not in REPLICATE_KEYS]
    shared = [(k, values[0][k]) for k in keys if k not in swept] if values else []

    first_seen: dict[str, dict[str, int]] = {k: {} for k in group_keys}
    for v in values:
        for k in group_keys:
            first_seen[k].setdefault(v[k], len(first_seen[k]))
    numeric = {k: all(order_key(x)[0] == 0 for x in first_seen[k]) for k in group_keys}

    def sort_key(setting: tuple[tuple[str, str], ...]) -> list[Any]:
        return [order_key(x) if numeric[k] else (first_seen[k][x],) for k, x in setting]

    groups: dict[tuple[tuple[str, str], ...], Group] = {}
    for rec, v in zip(recs, values):
        setting = tuple((k, v[k]) for k in group_keys)
        g = groups.get(setting)
        if g is None:
            if group_keys and source == "config":
                label = describe_facts(dict(setting), group_keys)
            elif group_keys:
                label = " ".join(f"{k}={x}" for k, x in setting)
            else:  # nothing swept but the seeds: the group is named by what identifies a run, seed aside
                if source == "config":
                    label = describe_facts(v, [k for k in identity_keys(v) if k != "seed"])
                else:
                    label = " ".join(f"{k}={x}" for k, x in v.items() if k not in REPLICATE_KEYS)
            g = groups[setting] = Group(setting, label or rec.path.name)
        g.runs.append(rec.path)
        g.seeds.append(_seed_of(v))
    ordered = [groups[s] for s in sorted(groups, key=sort_key)]
    return Sweep(ordered, group_keys, [k for k in swept if k in REPLICATE_KEYS], shared, source)

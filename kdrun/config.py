"""Config validation: every bad key or value fails before any model or data is built.

Hydra already rejects an unknown group option (``balancer=dtoo`` → "Could not find 'balancer/dtoo'"
followed by the available options) and an override of a key that does not exist (the composed config is
in struct mode). This module checks what Hydra cannot: the *values* and the keys of every ``_target_``
node against the signature of the callable it names, and the plain settings groups (``trainer``,
``logger``) against their dataclass schemas below.

A signature parameter annotated ``Annotated[float, Ge(0)]`` or ``Literal["a", "b"]`` is range- and
choice-checked; ``int``/``float``/``bool``/``str`` are type-checked; no number anywhere may be ``inf`` or
``nan``; a misspelt key is answered with its close matches. The error is one paragraph that
names the key, the bad value and what is allowed; :func:`kdrun.cli.main` prints it without a traceback
(set ``HYDRA_FULL_ERROR=1`` for one) and exits with status 2. Settings that are valid but do nothing in
the run (:func:`config_warnings`) print one ``kdrun: warning:`` line.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Iterator, Literal, Optional, Sequence, Union

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict


class ConfigError(ValueError):
    """A config that cannot run; the message is meant for the user verbatim."""


# ---------------------------------------------------------------------------------------------------
# Range markers for ``Annotated`` (checked by :func:`check_value`).


@dataclass(frozen=True)
class Ge:
    bound: float

    def ok(self, v: float) -> bool:
        return v >= self.bound

    def __str__(self) -> str:
        return f">= {self.bound}"


@dataclass(frozen=True)
class Gt:
    bound: float

    def ok(self, v: float) -> bool:
        return v > self.bound

    def __str__(self) -> str:
        return f"> {self.bound}"


@dataclass(frozen=True)
class Le:
    bound: float

    def ok(self, v: float) -> bool:
        return v <= self.bound

    def __str__(self) -> str:
        return f"<= {self.bound}"


@dataclass(frozen=True)
class Lt:
    bound: float

    def ok(self, v: float) -> bool:
        return v < self.bound

    def __str__(self) -> str:
        return f"< {self.bound}"


@dataclass(frozen=True)
class CountOr:
    """A positive count, or ``sentinel`` with the meaning ``means``: ``trainer.max_steps`` (-1 = no limit).

    Its own message, because a bare range (">= -1") let 0 through, where it silently meant "no limit" as
    well; the message states what the one special value means, so that no value surprises."""

    sentinel: int
    means: str

    def ok(self, v: float) -> bool:
        return v >= 1 or v == self.sentinel

    def message(self, key: str, v: Any) -> str:
        shown = "null" if v is None else repr(v)  # null: what a user expecting "no limit" may write
        return (f"{key}={shown} is not allowed: give a positive integer, or {self.sentinel} to {self.means} "
                f"({key}={self.sentinel}, the default).")


# The seeds torch's generators accept (torch.manual_seed rejects anything outside a signed/unsigned 64-bit
# integer with an "Overflow" error mid-build); kept a little inside, as the engine adds the rank to it.
SEED_RANGE = (Ge(-(2**62)), Le(2**62))
Seed = Annotated[int, SEED_RANGE[0], SEED_RANGE[1]]


# ---------------------------------------------------------------------------------------------------
# Schemas of the groups that have no ``_target_``. These dataclasses are the only definition of the
# ``trainer`` and ``logger`` settings and their defaults: :func:`register_group_defaults` stores them in
# Hydra's ConfigStore as the option ``trainer=default`` / ``logger=default`` (there is no YAML copy to
# drift), and :func:`validate_schema_node` checks a composed node against them.

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class EmaConfig:
    """``trainer.ema``: an exponential moving average of the student's weights (parameters and buffers), kept
    by timm's ``ModelEmaV3`` (:mod:`kdrun.engine.ema`), evaluated beside the raw weights at every validation.
    ``trainer.ema={}`` turns it on with these defaults; ``null`` (the default) keeps none."""

    # ema ← decay·ema + (1 − decay)·student after every finite optimiser step. 0.9998: timm train.py's
    # --model-ema-decay default (DeiT's main.py uses 0.99996 for its ~375k steps); 1 would never move.
    decay: Annotated[float, Gt(0.0), Lt(1.0)] = 0.9998
    # The decay warms up as 1 − (1 + n/warmup_gamma)^−warmup_power after n updates (capped at decay):
    # ModelEmaV3's use_warmup; the two shape keys are its defaults (tests/engine/test_ema.py checks that).
    warmup: bool = False
    warmup_gamma: Annotated[float, Gt(0.0)] = 1.0
    warmup_power: Annotated[float, Gt(0.0)] = 2 / 3


@dataclass
class TrainerConfig:
    """``trainer`` group: the loop, precision, data loading and checkpoints."""

    epochs: Annotated[int, Ge(1)] = 10
    # stop after this many optimiser steps; -1: run all epochs. 0 is refused: it used to mean "no limit"
    # silently (trainer.max_steps=0 trained every epoch).
    max_steps: Annotated[int, CountOr(-1, "run all trainer.epochs")] = -1
    batch_size: Annotated[int, Ge(1)] = 64  # per process
    val_batch_size: Annotated[int, Ge(0)] = 0  # 0: 2 × batch_size
    num_workers: Annotated[int, Ge(0)] = 0
    pin_memory: bool = True
    persistent_workers: bool = True
    accelerator: Literal["auto", "cpu", "cuda"] = "auto"
    # Processes on this machine: N > 1 makes kdrun start N workers (one GPU each; gloo processes on
    # the CPU); "auto" = every visible GPU. Ignored when torchrun/srun already started the processes.
    devices: Any = 1  # int >= 1 or "auto"; checked by kdrun.commands.launch.resolve_devices (a clearer message)
    sync_batchnorm: bool = False  # under DDP: BatchNorm statistics over the global batch (CUDA only)
    precision: Precision = "fp32"  # autocast; a GradScaler for fp16
    teacher_precision: Literal["same", "fp32", "bf16"] = "same"
    channels_last: bool = False
    compile: bool = False  # torch.compile the student
    deterministic: bool = False
    # CPU runs: keep freed host memory in the C library for reuse instead of returning it to the OS and
    # faulting it in again every step (kdrun.engine.environment.keep_host_memory; glibc); release: the defaults.
    host_memory: Literal["keep", "release"] = "keep"
    grad_clip: Annotated[float, Ge(0.0)] = 0.0  # max global grad norm; 0 disables
    nonfinite: Literal["skip", "raise"] = "skip"  # what a step with a non-finite gradient does
    # Stop with an error when this many consecutive steps were all skipped as non-finite (a diverged run
    # must not end as "done"); 0 disables. fp16's GradScaler skips a few steps in a row while it finds its
    # scale, far fewer than this.
    max_nonfinite_streak: Annotated[int, Ge(0)] = 100
    # Where per-objective gradients live (for gradient-level balancers and the diagnostics):
    # params = the shared student parameters (exact); features = a shared representation named by
    # grad_feature (MGDA-UB style: one backward per step).
    grad_space: Literal["params", "features"] = "params"
    # How the k per-objective parameter gradients are taken: one backward each (loop), one vmapped
    # backward (batched: autograd.grad with is_grads_batched), or batched where the model's ops allow
    # it (auto; kdrun.balancers.gradients.JacobianMode).
    jacobian: Literal["loop", "batched", "auto"] = "auto"
    grad_feature: str = "pre_logits"  # the shared representation for grad_space=features
    val_every: Annotated[int, Ge(1)] = 1  # epochs
    resume: Optional[str] = None  # null | auto | PATH
    # A fresh run refuses a directory that already holds a run (kdrun.runtime.rundir); true deletes that run's
    # files first and starts over there.
    overwrite: bool = False
    save_last: bool = True
    save_best: bool = True
    save_every_steps: Annotated[int, Ge(0)] = 0  # also write last.pt every N steps mid-epoch (0: epoch ends only)
    seed: Optional[Seed] = None  # null: use the top-level `seed`
    # Preemption (kdrun.runtime.preemption): these signals make the run write last.pt at the next step boundary
    # and exit 0 (130 for SIGINT); ranks agree on the stop every preempt_check_every steps.
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"])
    preempt_check_every: Annotated[int, Ge(1)] = 1  # steps between the ranks' stop agreement (one 8-byte CPU all-reduce)
    preempt_grace_s: Annotated[float, Ge(0.0)] = 120.0  # kdrun's launcher: wait this long for workers to checkpoint before SIGKILL
    # Under torchrun/srun: a rank that has not met every other rank at the rendezvous (MASTER_ADDR:MASTER_PORT)
    # this long after it started to join exits with an error naming the ranks it waited for, instead of
    # hanging in process-group setup for the 30-minute collective timeout (kdrun.runtime.distributed.init_process_group).
    dist_timeout_s: Annotated[float, Gt(0.0)] = 300.0
    ema: Optional[EmaConfig] = None  # the student's weight EMA (EmaConfig); null: none

    @property
    def eval_batch_size(self) -> int:
        """The val loader's batch: ``val_batch_size``, where 0 means 2 × ``batch_size`` (evaluation keeps no
        activations for a backward). The one place of that rule."""
        return self.val_batch_size or 2 * self.batch_size


@dataclass
class LoggerConfig:
    """``logger`` group: what is written where and how often."""

    log_every: Annotated[int, Ge(1)] = 10  # optimiser steps
    grad_stats_every: Annotated[int, Ge(0)] = 50  # gradient diagnostics (conflict, cosine, dominance); 0 disables
    # Where the scalars go besides metrics.jsonl (kdrun.runtime.log_backends): any of LOG_BACKENDS; [] for
    # metrics.jsonl alone. wandb and mlflow need their extras (pip install -e ".[wandb]" / ".[mlflow]").
    backends: list[str] = field(default_factory=lambda: ["tensorboard"])
    # The trackers' group of this run (W&B group, MLflow tag kdrun.sweep); null: a sweep job's sweep
    # directory (set by `kdrun train -m`), none for a single run.
    group: Optional[str] = None
    jsonl: bool = True
    progress: bool = True


# The logging backends (kdrun/runtime/log_backends/<name>.py) and what installs each.
LOG_BACKENDS = {"tensorboard": "always installed", "wandb": 'pip install -e ".[wandb]"',
                "mlflow": 'pip install -e ".[mlflow]"'}


def check_log_backends(value: Any) -> None:
    """``logger.backends``: a list of backend names (the schema check does not look into lists)."""
    known = ", ".join(f"{name} ({how})" for name, how in LOG_BACKENDS.items())
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"logger.backends={value!r} must be a list, e.g. logger.backends=[tensorboard,wandb] "
                          f"([] for metrics.jsonl alone); the backends are {known}.")
    for name in value:
        if name not in LOG_BACKENDS:
            raise ConfigError(f"logger.backends: {name!r} is not a logging backend"
                              f"{did_you_mean(str(name), list(LOG_BACKENDS))}; the backends are {known}, "
                              "e.g. logger.backends=[tensorboard,wandb].")


def upgrade_saved_logger(cfg: DictConfig) -> None:
    """A config saved before ``logger.backends`` existed (a checkpoint's, which ``kdrun eval`` validates) has
    ``logger.tensorboard: true|false``: read it as ``logger.backends: [tensorboard]`` or ``[]``."""
    node = cfg.get("logger")
    if isinstance(node, DictConfig) and "tensorboard" in node and "backends" not in node:
        with open_dict(node):
            node.backends = ["tensorboard"] if node.pop("tensorboard") else []


GROUP_SCHEMAS: dict[str, type] = {"trainer": TrainerConfig, "logger": LoggerConfig}


@dataclass(frozen=True)
class RunSettings:
    """The plain settings of a run, validated once: :func:`validate` returns them, and everything
    downstream (the CLI, the engine, ``kdrun eval``, ``kdrun cache-teacher``) takes them instead of
    rebuilding them from the config. The rules that combine keys live here, once."""

    trainer: TrainerConfig
    logger: LoggerConfig
    teacher_cache: Optional["TeacherCacheConfig"]  # None: off, or no teacher
    seed: int  # trainer.seed when set, else the root seed

    @property
    def val_batch_size(self) -> int:
        return self.trainer.eval_batch_size


def register_group_defaults() -> None:
    """Store each schema's defaults in Hydra's ConfigStore as the option ``<group>=default``.

    Stored as a plain dict, not as the dataclass: a typed node would make OmegaConf reject a bad value
    during composition with its own message (and it knows no ``Literal``/``Annotated``), before
    :func:`validate` can name the key and the valid choices. Idempotent; runs when this module is
    imported, which every composition path does: they find ``conf/`` with ``kdrun.cli.config_dir``, and
    kdrun.cli imports this module."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group=group, name="default", node=dataclasses.asdict(schema()),
                    provider="kdrun")


# ---------------------------------------------------------------------------------------------------
# Validation.


_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def did_you_mean(key: str, valid: Sequence[str], prefix: str = "") -> str:
    """`` (did you mean trainer.epochs?)`` for the close matches of a misspelt ``key`` among ``valid``
    (difflib's similarity >= 0.6, at most 3, best first), or ``""``."""
    near = difflib.get_close_matches(key, [str(v) for v in valid], n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(prefix + m for m in near)}?)" if near else ""


# Keys that existed in an earlier kdrun, with what replaced them: a user's old command says so.
RENAMED_KEYS = {
    "logger.tensorboard": "logger.backends: logger.tensorboard=false is now logger.backends=[] (metrics.jsonl "
                          "alone), and the default is logger.backends=[tensorboard]",
}


def unknown_key_message(path: str, key: str, valid: Sequence[str], owner: str = "", note: str = "") -> str:
    """One paragraph for a key that does not exist: the close matches first, then every valid key.

    ``path`` is the node's dotted path (``""`` for the root), ``owner`` what defines the keys (a
    ``_target_``), if any; ``note`` a remark put after the close matches."""
    prefix = f"{path}." if path else ""
    if f"{prefix}{key}" in RENAMED_KEYS:
        note = f"{note}; it was replaced by {RENAMED_KEYS[prefix + key]}"
    what = f"is not a parameter of {owner}" if owner else "does not exist"
    valid = [str(v) for v in valid if not (str(v).startswith("_") and str(v).endswith("_"))]
    return (f"{prefix}{key} {what}{did_you_mean(key, valid, prefix)}{note}; valid keys"
            f"{' of ' + path if path and not owner else ''} are {', '.join(valid) or '(none)'}.")


def _mentions_mapping(annotation: Any) -> bool:
    """Whether ``annotation`` is (an Optional/Union/Annotated of) ``dict[...]``/``Mapping[...]``."""
    if typing.get_origin(annotation) in _MAPPINGS:
        return True
    return any(_mentions_mapping(a) for a in typing.get_args(annotation) if not isinstance(a, (str, int, float)))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def check_value(key: str, value: Any, annotation: Any) -> None:
    """Check ``value`` against ``annotation``; raise :class:`ConfigError` naming ``key``."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *markers = typing.get_args(annotation)
        worded = [m for m in markers if hasattr(m, "message")]  # markers that word their own error (CountOr)
        try:
            check_value(key, value, base)
        except ConfigError:
            if not worded:
                raise
            raise ConfigError(worded[0].message(key, value)) from None
        if value is None:
            return
        for m in markers:
            if hasattr(m, "ok") and not m.ok(value):
                if hasattr(m, "message"):
                    raise ConfigError(m.message(key, value))
                raise ConfigError(f"{key}={value!r} is out of range: it must be {m}.")
        return
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(
                f"{key}={value!r} is not a valid choice; valid choices are "
                f"{', '.join(repr(c) for c in choices)}."
            )
        return
    if origin in _MAPPINGS:  # dict[K, V] / Mapping[K, V]: a mapping whose values are checked against V
        if not isinstance(value, (dict, DictConfig)):
            raise ConfigError(f"{key}={value!r} must be a mapping ({{name: value, ...}}).")
        args = typing.get_args(annotation)
        for k in value:
            check_value(f"{key}.{k}", value[k], args[1] if len(args) == 2 else Any)
        return
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                check_value(key, value, a)
                return
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key}={value!r} matches none of {_type_name(annotation)}.")
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false.")
    elif annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer.")
    elif annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number.")
    elif annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string.")


def _resolve_hints(obj: Any) -> dict[str, Any]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolvable forward refs: fall back to raw annotations
        return {}


def import_target(path: str, key: str) -> Any:
    """Resolve ``path`` exactly as Hydra's ``instantiate`` will (``hydra.utils.get_object``), so that a
    target that validates also instantiates."""
    from hydra.utils import get_object

    try:
        return get_object(path)
    except Exception as e:
        raise ConfigError(f"{key}._target_={path!r} cannot be imported ({str(e).splitlines()[0]}).") from None


def validate_target_node(key: str, node: DictConfig, extra_keys: tuple[str, ...] = ()) -> None:
    """Check a ``_target_`` node's keys and values against the callable's signature."""
    target = import_target(str(node["_target_"]), key)
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return
    hints = _resolve_hints(target)
    params = {n: p for n, p in sig.parameters.items() if n != "self"}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items()
             if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    for k in node.keys():
        k = str(k)
        if k.startswith("_") and k.endswith("_") or k in extra_keys:
            continue
        if k not in params:
            if var_kw:
                continue
            raise ConfigError(unknown_key_message(key, k, named, owner=str(node["_target_"])))
        value = node._get_node(k)
        if OmegaConf.is_missing(node, k):
            raise ConfigError(f"{key}.{k} is required but was not set (it is '???').")
        if isinstance(value, (DictConfig, ListConfig)):
            if isinstance(value, DictConfig) and "_target_" in value:
                validate_target_node(f"{key}.{k}", value)
            elif isinstance(value, DictConfig) and _mentions_mapping(hints.get(k, params[k].annotation)):
                check_value(f"{key}.{k}", node[k], hints.get(k, params[k].annotation))
            continue
        check_value(f"{key}.{k}", node[k], hints.get(k, params[k].annotation))
    for n, p in params.items():
        if (p.default is inspect.Parameter.empty and p.kind not in
                (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
                and n not in node and not node.get("_partial_", False)):
            raise ConfigError(f"{key}.{n} is required by {node['_target_']} but is not set.")


def validate_schema_node(key: str, node: DictConfig, schema: type) -> Any:
    """Check a plain settings node against its dataclass schema; return the dataclass instance."""
    hints = typing.get_type_hints(schema, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    nested = {}
    for k in node.keys():
        if k not in fields:
            raise ConfigError(unknown_key_message(key, str(k), list(fields)))
        sub = nested_schema(hints[k])
        if sub is not None:  # a settings node of its own (trainer.ema): null, or checked against its schema
            nested[k] = validate_nested(f"{key}.{k}", node[k], sub)
            continue
        check_value(f"{key}.{k}", node[k], hints[k])
    values = OmegaConf.to_container(node, resolve=True)  # plain values (lists, not ListConfig)
    return schema(**{**values, **nested})


def nested_schema(annotation: Any) -> Optional[type]:
    """The dataclass of an ``Optional[<dataclass>]`` field (``TrainerConfig.ema``), else None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def validate_nested(key: str, value: Any, schema: type) -> Any:
    """``null``, or a node checked against ``schema`` (``{}``: its defaults)."""
    if value is None:
        return None
    if not isinstance(value, DictConfig):
        names = [f.name for f in dataclasses.fields(schema)]
        raise ConfigError(f"{key}={value!r} must be null or a node with keys {', '.join(names)} ({key}={{}} for "
                          f"the defaults, e.g. {key}={{{names[0]}:...}}).")
    return validate_schema_node(key, value, schema)


@dataclass
class TeacherCacheConfig:
    """``teacher.cache`` (:mod:`kdrun.teacher_cache`): the teacher's outputs for every (image, view) of a
    finite-view training transform, computed once and read back instead of the teacher forward.
    ``teacher.cache={}`` turns it on with these defaults; ``null`` runs the live teacher every step."""

    dir: Optional[str] = None  # null: $KDRUN_CACHE/teacher_outputs (~/.cache/kdrun/teacher_outputs)
    dtype: Literal["fp32", "fp16"] = "fp32"  # fp32: exact; fp16: half the disk, rounded (teacher_cache doc)
    fill: bool = True  # a missing cache is filled by the run (false: it is an error; `kdrun cache-teacher`)
    verify: Literal["full", "size"] = "full"  # full: sha256 of every array at open; size: file sizes only
    max_tap_gib: Annotated[float, Gt(0.0)] = 16.0  # a feature tap larger than this is refused
    fill_batch_size: Optional[Annotated[int, Ge(1)]] = None  # null: trainer.val_batch_size (or 2 × batch_size)


def check_seed(seed: Any) -> None:
    """The root ``seed`` (no schema holds it): an integer torch can seed with. ``seed=abc`` used to pass
    validation and end the run in a ValueError traceback from ``int()``; ``seed=null`` in a TypeError."""
    fix = "give an integer, e.g. seed=0 (trainer.seed, when set, overrides it)"
    if isinstance(seed, bool) or not isinstance(seed, int):
        shown = "null" if seed is None else repr(seed)
        raise ConfigError(f"seed={shown} is not a random seed: {fix}.")
    try:
        check_value("seed", seed, Seed)
    except ConfigError as e:
        raise ConfigError(f"{str(e).rstrip('.')}; {fix}.") from None


def teacher_cache_config(cfg: DictConfig) -> Optional[TeacherCacheConfig]:
    """The validated ``teacher.cache`` node (``None``: off, or no teacher)."""
    teacher = cfg.get("teacher")
    node = teacher.get("cache") if isinstance(teacher, DictConfig) else None
    if node is None:
        return None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"teacher.cache={node!r} must be null or a node with keys "
                          f"{', '.join(f.name for f in dataclasses.fields(TeacherCacheConfig))} "
                          "(teacher.cache={} for the defaults).")
    return validate_schema_node("teacher.cache", node, TeacherCacheConfig)  # type: ignore[no-any-return]


def validate(cfg: DictConfig) -> RunSettings:
    """Validate the whole composed config; raises :class:`ConfigError` with a one-paragraph message.
    Returns the run's :class:`RunSettings`.

    Resolves interpolations first, so a broken ``${...}`` is reported here too.
    """
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:  # omegaconf's errors are long; keep the first line
        raise ConfigError(f"config interpolation failed: {str(e).splitlines()[0]}") from None
    check_finite(cfg)
    check_seed(cfg.get("seed"))
    for k in cfg.keys():
        if k not in ROOT_KEYS:  # `+model=X`, `+traner.epochs=3`: a node nothing reads
            note = (" (the architecture is chosen with student=X / teacher=X, which both read conf/model/X.yaml)"
                    if k == "model" else "")
            raise ConfigError(unknown_key_message("", str(k), [r for r in ROOT_KEYS if r != "hydra"], note=note))
    upgrade_saved_logger(cfg)
    schemas = {group: validate_schema_node(group, cfg[group], schema) if cfg.get(group) is not None else schema()
               for group, schema in GROUP_SCHEMAS.items()}
    check_log_backends(schemas["logger"].backends)
    for key in ("dataset", "task", "balancer", "optimizer", "scheduler"):
        node = cfg.get(key)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"`{key}` must be a config node with a _target_; pick an option of the "
                              f"'{key}' group.")
        validate_target_node(key, node)
    for role in ("student", "teacher"):
        node = cfg.get(role)
        if node is None:
            if role == "student":
                raise ConfigError("`student` is required; pick an option of the 'student' group.")
            continue
        for k in node.keys():
            if k not in ROLE_KEYS[role]:
                raise ConfigError(unknown_key_message(role, str(k), ROLE_KEYS[role]))
        if node.get("model") is None:  # `+recipe=<a KD recipe> teacher=none`: the recipe's role keys remain
            set_keys = ", ".join(f"{role}.{k}" for k in node.keys())
            raise ConfigError(
                f"{role} has no model: {role}=none was chosen, but the config still sets {set_keys} (a "
                f"recipe's settings for its {role}). Pick a {role} option ({role}=NAME; `kdrun train --help` "
                "lists them)" + (", or, for training without a teacher, a recipe without one (e.g. "
                                 "+recipe=cifar100_student_resnet20) or no recipe with distill=none."
                                 if role == "teacher" else "."))
        validate_target_node(f"{role}.model", node.model)
    cache = teacher_cache_config(cfg)
    if cfg.get("projector") is not None:
        validate_target_node("projector", cfg.projector)
    for name, term in (cfg.get("distill") or {}).items():
        validate_target_node(f"distill.{name}", term, extra_keys=("weight",))
        check_value(f"distill.{name}.weight", term.get("weight", 1.0), Annotated[float, Ge(0.0)])
    if cfg.trainer.get("grad_space") == "features":
        cls = import_target(str(cfg.balancer._target_), "balancer")
        if not getattr(cls, "supports_feature_space", True):
            raise ConfigError(
                f"balancer {cfg.balancer._target_} needs parameter gradients and cannot run with "
                "trainer.grad_space=features; use trainer.grad_space=params.")
    # A balancer whose method constrains the rest of the run says so before anything is built (DOT: plain SGD).
    check_run = getattr(import_target(str(cfg.balancer._target_), "balancer"), "check_run", None)
    if check_run is not None:
        check_run(cfg)
    distill = dict(cfg.get("distill") or {})
    if distill and cfg.get("teacher") is None:
        raise ConfigError(
            f"distill terms ({', '.join(distill)}) need a teacher but teacher is none; pick a teacher "
            "(teacher=...) or drop the terms (distill=none)."
        )
    for message in config_warnings(cfg):
        warn_once(message)
    trainer = schemas["trainer"]
    return RunSettings(trainer=trainer, logger=schemas["logger"], teacher_cache=cache,
                       seed=int(trainer.seed if trainer.seed is not None else cfg.get("seed", 0)))


# ---------------------------------------------------------------------------------------------------
# Values that validate but cannot be what the user meant.


def _leaves(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, value


def check_finite(cfg: DictConfig) -> None:
    """Every number in the config is finite: ``optimizer.lr=inf`` or ``nan`` parses as a float and would
    pass a ``Ge(0)`` check (inf) or produce a run of NaNs (nan); no kdrun setting means anything by them.
    ``hydra`` (Hydra's own settings) is not kdrun's and is skipped."""
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    for top, node in plain.items():
        if top == "hydra":
            continue
        for key, value in _leaves(node, str(top)):
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key}={value} is not a finite number; every numeric setting must be finite.")


# A balancer key that weighs the distillation objective: alpha_distill, alphas.distill, kl_start, kd_weight.
_DISTILL_WEIGHT = re.compile(r"distill|(^|_)(kd|kl)(_|$)")


def _distill_weights_set(node: DictConfig, path: str = "balancer") -> list[str]:
    """``key=value`` for the balancer keys that weigh distillation and differ from the target's defaults
    (nested ``_target_`` nodes, e.g. a wrapper's ``inner`` balancer, against their own target's)."""
    try:
        params = inspect.signature(import_target(str(node["_target_"]), path)).parameters
    except (TypeError, ValueError):
        params = {}
    found = []
    for k in node.keys():
        k = str(k)
        if k.startswith("_"):
            continue
        value = node[k]
        if isinstance(value, DictConfig) and "_target_" in value:
            found += _distill_weights_set(value, f"{path}.{k}")
        elif isinstance(value, DictConfig):  # {objective: weight}: only its distill entries
            found += [f"{path}.{k}.{j}={value[j]}" for j in value.keys() if _DISTILL_WEIGHT.search(str(j))]
        elif _DISTILL_WEIGHT.search(k) and value != (params[k].default if k in params else inspect.Parameter.empty):
            found.append(f"{path}.{k}={value}")
    return found


def config_warnings(cfg: DictConfig) -> list[str]:
    """Valid settings that have no effect in this run (each a one-line message).

    Today one case: distillation weights on the balancer of a run that distils nothing. With no distill
    term the only objective is the task, so ``kdrun train -m balancer.alpha_distill=0.1,0.5,0.9`` would
    train three identical students without a word."""
    if dict(cfg.get("distill") or {}) or not isinstance(cfg.get("balancer"), DictConfig):
        return []
    weights = _distill_weights_set(cfg.balancer)
    if not weights:
        return []
    what = "no teacher and no distill term" if cfg.get("teacher") is None else "no distill term (distill=none)"
    return [f"{', '.join(weights)} has no effect: this run has {what}, so it trains the student on the task "
            "alone; add a teacher and distill terms (e.g. teacher=convnet_l distill=kl) or a recipe "
            "(+recipe=quickstart; `kdrun train --help` lists them)."]


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """Print ``kdrun: warning: MESSAGE`` to stderr once per process, on rank 0 only (the CLI and the
    engine both validate, and every rank of a job does)."""
    if message in _WARNED or os.environ.get("RANK", "0") != "0":
        return
    _WARNED.add(message)
    print(f"kdrun: warning: {message}", file=sys.stderr, flush=True)


# The top-level keys of a composed config (conf/config.yaml's groups and keys; recipes add none):
# tests/test_config.py checks this against the composed default.
ROOT_KEYS = ("dataset", "task", "teacher", "student", "distill", "projector", "balancer", "optimizer", "scheduler",
             "trainer", "logger", "seed", "paper", "hydra")

ROLE_KEYS = {
    "student": ("model", "checkpoint"),
    # allow_random: use a teacher with neither weights nor a fit (random init) — refused otherwise;
    # cache: the teacher-output cache (kdrun.teacher_cache), null = the live teacher every step.
    "teacher": ("model", "checkpoint", "fit_if_missing_epochs", "allow_random", "cache"),
}


register_group_defaults()

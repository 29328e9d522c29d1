"""Optimiser builders. Configs are partials: the engine calls ``factory(model)``.

Weight-decay exclusion: with ``decay_norm_and_bias: false`` (the DeiT/timm and CIFAR-benchmark practice
for AdamW) every parameter with ``ndim <= 1`` (norm weights, biases, gains) goes into a group with
``weight_decay=0``; any parameter whose name matches ``no_decay`` does too, whatever
``decay_norm_and_bias`` says (ViDT: decay everything but the backbone's norms, biases and [DET] tokens). On CUDA,
``fused=True`` kernels are used when every parameter is a floating CUDA tensor (one kernel for the
whole update instead of a loop of small ones).

Per-parameter learning-rate multipliers (``lr_mult``, ``{pattern: factor}``, default none): a parameter
whose name matches a pattern trains with ``lr × factor`` (the first matching pattern, in the order
written, decides; Deformable DETR / ViDT's ``lr_linear_proj_mult`` is
``{sampling_offsets: 0.1, reference_points: 0.1}``). Groups are split by (weight decay, factor), so the
no-decay rule and the multipliers combine: a matched bias gets ``weight_decay=0`` *and* ``lr × factor``.
Every group's ``lr`` is its own base learning rate, and the schedulers (``LambdaLR``) scale each group's
base lr by the same factor, so the ratio holds at every step. A pattern that matches no trainable
parameter is an error (a typo would otherwise change nothing, silently).

Patterns (``no_decay`` entries, ``lr_mult`` keys) are matched against the names of
``model.named_parameters()`` — for the engine's model these start with ``student.model.`` or
``distill.<term>.`` — as substrings, or, when they contain ``*``, ``?`` or ``[``, as shell-style globs
of the whole name (``fnmatch``; ``*`` crosses dots): ``"*backbone.*.bias"`` = every bias of the backbone.
"""
from __future__ import annotations

import fnmatch
from typing import Annotated, Mapping, Sequence

import torch
from torch import nn

from kdrun.config import ConfigError, Ge

_GLOB = set("*?[")


def name_matches(name: str, pattern: str) -> bool:
    """Substring match, or a whole-name glob when ``pattern`` has a glob metacharacter."""
    if _GLOB & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool,
                 no_decay: Sequence[str] = (), lr: float | None = None,
                 lr_mult: Mapping[str, float] | None = None) -> list[dict]:
    """Parameter groups: ``[{decay, ×1}, {no decay, ×1}, {decay, ×f1}, {no decay, ×f1}, ...]``, empty
    ones dropped (the first is always there). With ``lr`` given every group carries ``lr × factor`` and
    its ``lr_mult``; without it (and without multipliers) groups carry only ``weight_decay``."""
    mults = {str(k): float(v) for k, v in (lr_mult or {}).items()}
    if mults and lr is None:
        raise ValueError("param_groups: lr_mult needs the base lr")
    used: set[str] = set()
    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, True): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = 1.0
        for pattern, factor in mults.items():
            if name_matches(name, pattern):
                mult = factor
                used.add(pattern)
                break
        decay = not ((not decay_norm_and_bias and p.ndim <= 1) or any(name_matches(name, s) for s in no_decay))
        buckets.setdefault((mult, decay), []).append(p)
    unused = [k for k in mults if k not in used]
    if unused:
        raise ConfigError(
            f"optimizer.lr_mult: {', '.join(repr(k) for k in unused)} match(es) no trainable parameter name "
            f"(substring, or a glob of the whole name); names look like "
            f"{next((n for n, p in model.named_parameters() if p.requires_grad), '<none>')!r}.")
    order = [1.0] + [m for m in dict.fromkeys(mults.values()) if m != 1.0]
    groups = []
    for mult in order:
        for decay in (True, False):
            params = buckets.get((mult, decay))
            if params is None or (not params and (mult, decay) != (1.0, True)):
                continue
            g: dict = {"params": params, "weight_decay": weight_decay if decay else 0.0}
            if lr is not None and (mults or mult != 1.0):
                g["lr"] = lr * mult
                g["lr_mult"] = mult
            groups.append(g)
    return groups


def _fused_ok(model: nn.Module) -> bool:
    ps = [p for p in model.parameters() if p.requires_grad]
    return bool(ps) and all(p.is_cuda and p.is_floating_point() for p in ps)


LrMult = dict[str, Annotated[float, Ge(0.0)]] | None  # {name pattern: factor}


def sgd(model: nn.Module, lr: Annotated[float, Ge(0.0)] = 0.05, momentum: Annotated[float, Ge(0.0)] = 0.9,
        nesterov: bool = False, weight_decay: Annotated[float, Ge(0.0)] = 5e-4,
        decay_norm_and_bias: bool = True, no_decay: Sequence[str] = (),
        lr_mult: LrMult = None) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay, decay_norm_and_bias, no_decay, lr, lr_mult)
    kw = {"fused": True} if _fused_ok(model) else {}
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **kw)


def adamw(model: nn.Module, lr: Annotated[float, Ge(0.0)] = 1e-3, weight_decay: Annotated[float, Ge(0.0)] = 0.05,
          betas: Sequence[float] = (0.9, 0.999), eps: Annotated[float, Ge(0.0)] = 1e-8,
          decay_norm_and_bias: bool = False, no_decay: Sequence[str] = (),
          lr_mult: LrMult = None) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay, decay_norm_and_bias, no_decay, lr, lr_mult)
    kw = {"fused": True} if _fused_ok(model) else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kw)

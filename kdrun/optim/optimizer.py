"""Optimiser builders. Configs are partials: the engine calls ``factory(model)``.

Weight-decay exclusion (``decay_norm_and_bias: false``, the DeiT/timm and CIFAR-benchmark practice
for AdamW): parameters with ``ndim <= 1`` (norm weights, biases, gains, DTO/[DET]-style tokens) and
any parameter whose name matches ``no_decay`` go into a group with ``weight_decay=0``. On CUDA,
``fused=True`` kernels are used when every parameter is a floating CUDA tensor (one kernel for the
whole update instead of a loop of small ones).
"""
from __future__ import annotations

from typing import Annotated, Sequence

import torch
from torch import nn

from kdrun.config import Ge


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool,
                 no_decay: Sequence[str] = ()) -> list[dict]:
    decay, no = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not decay_norm_and_bias and (p.ndim <= 1 or any(s in name for s in no_decay)):
            no.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no:
        groups.append({"params": no, "weight_decay": 0.0})
    return groups


def _fused_ok(model: nn.Module) -> bool:
    ps = [p for p in model.parameters() if p.requires_grad]
    return bool(ps) and all(p.is_cuda and p.is_floating_point() for p in ps)


def sgd(model: nn.Module, lr: Annotated[float, Ge(0.0)] = 0.05, momentum: Annotated[float, Ge(0.0)] = 0.9,
        nesterov: bool = False, weight_decay: Annotated[float, Ge(0.0)] = 5e-4,
        decay_norm_and_bias: bool = True, no_decay: Sequence[str] = ()) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay, decay_norm_and_bias, no_decay)
    kw = {"fused": True} if _fused_ok(model) else {}
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **kw)


def adamw(model: nn.Module, lr: Annotated[float, Ge(0.0)] = 1e-3, weight_decay: Annotated[float, Ge(0.0)] = 0.05,
          betas: Sequence[float] = (0.9, 0.999), eps: Annotated[float, Ge(0.0)] = 1e-8,
          decay_norm_and_bias: bool = False, no_decay: Sequence[str] = ()) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay, decay_norm_and_bias, no_decay)
    kw = {"fused": True} if _fused_ok(model) else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kw)

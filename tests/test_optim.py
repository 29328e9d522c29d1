"""Optimisers (weight-decay groups) and per-step schedules against their formulas."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdrun.optim import optimizer as O
from kdrun.optim import scheduler as S


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def test_adamw_excludes_norm_and_bias_from_weight_decay() -> None:
    opt = O.adamw(model(), lr=1e-3, weight_decay=0.05)
    decay, no = opt.param_groups
    assert decay["weight_decay"] == 0.05 and all(p.ndim == 2 for p in decay["params"])
    assert no["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no["params"])
    assert len(decay["params"]) == 2 and len(no["params"]) == 4


def test_sgd_decays_everything_by_default_and_honours_names() -> None:
    opt = O.sgd(model(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["nesterov"]
    opt = O.sgd(model(), decay_norm_and_bias=False, no_decay=["0.weight"])
    assert len(opt.param_groups[1]["params"]) == 5


def lrs(sched_fn, steps: int, **kw) -> list[float]:  # noqa: ANN001
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    s = sched_fn(opt, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return out


def test_multistep_decays_at_epoch_milestones() -> None:
    out = lrs(S.multistep, 40, steps_per_epoch=10, epochs=4, milestones=[1, 3], gamma=0.1)
    assert out[9] == 1.0 and out[10] == pytest.approx(0.1) and out[29] == pytest.approx(0.1)
    assert out[30] == pytest.approx(0.01)


def test_cosine_warmup_then_half_cosine() -> None:
    out = lrs(S.cosine, 100, steps_per_epoch=10, epochs=10, warmup_epochs=1, warmup_lr_ratio=0.0,
              min_lr_ratio=0.0)
    assert out[0] == 0.0 and out[5] == pytest.approx(0.5)
    assert out[10] == pytest.approx(1.0)
    mid = 10 + (99 - 10) / 2
    assert out[int(mid)] == pytest.approx(0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))
    assert out[99] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(out[10:], out[11:]))

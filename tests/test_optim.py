"""Optimisers (weight-decay groups) and per-step schedules against their formulas."""
from __future__ import annotations

import math
import re

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


# ---------------------------------------------------------------------------------------------------
# Per-parameter lr multipliers (optimizer.lr_mult).


class Deformable(nn.Module):
    """Names like ViDT's: a matched linear (weight + bias), an unmatched linear and a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.sampling_offsets = nn.Linear(4, 4)
        self.value_proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.value_proj(x) + self.sampling_offsets(x))


def _group_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


@pytest.mark.parametrize("build", ["adamw", "sgd"])
def test_lr_mult_follows_the_schedule_and_combines_with_no_decay(build: str) -> None:
    torch.manual_seed(0)
    m = Deformable()
    opt = getattr(O, build)(m, lr=0.1, weight_decay=0.01, decay_norm_and_bias=False,
                            lr_mult={"sampling_offsets": 0.25})
    # four groups: (decay, no decay) x (x1, x0.25); the matched bias is no-decay *and* x0.25
    assert len(opt.param_groups) == 4
    w, b = _group_of(opt, m.sampling_offsets.weight), _group_of(opt, m.sampling_offsets.bias)
    assert w["weight_decay"] == 0.01 and b["weight_decay"] == 0.0
    assert w["lr"] == b["lr"] == pytest.approx(0.025)
    plain = _group_of(opt, m.value_proj.weight)
    assert plain["lr"] == 0.1 and plain["weight_decay"] == 0.01
    assert _group_of(opt, m.norm.weight)["lr"] == 0.1 and _group_of(opt, m.norm.weight)["weight_decay"] == 0.0
    sched = S.cosine(opt, steps_per_epoch=5, epochs=2, warmup_epochs=1, warmup_lr_ratio=0.1, min_lr_ratio=0.0)
    seen = set()
    for step in range(10):
        factor = sched.lr_lambdas[0](step)
        seen.add(round(w["lr"], 12))
        assert plain["lr"] == pytest.approx(0.1 * factor, abs=1e-12), step
        assert w["lr"] == pytest.approx(0.025 * factor, abs=1e-12) and b["lr"] == w["lr"], step
        opt.zero_grad()
        m(torch.randn(3, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
    assert len(seen) >= 8  # it did move along the warm-up and the cosine


def test_lr_mult_scales_the_actual_update() -> None:
    """Plain SGD (no momentum, no decay): the step of a matched parameter is factor x the step it would
    take unmatched, with the same gradient."""
    torch.manual_seed(1)
    ref, mult = Deformable(), Deformable()
    mult.load_state_dict(ref.state_dict())
    x = torch.randn(5, 4)
    deltas = []
    for m, lr_mult in ((ref, None), (mult, {"sampling_offsets": 0.1})):
        opt = O.sgd(m, lr=0.5, momentum=0.0, weight_decay=0.0, lr_mult=lr_mult)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        m(x).pow(2).sum().backward()
        opt.step()
        deltas.append({n: p.detach() - before[n] for n, p in m.named_parameters()})
    for n in deltas[0]:
        scale = 0.1 if n.startswith("sampling_offsets") else 1.0
        assert torch.allclose(deltas[1][n], scale * deltas[0][n], atol=1e-7), n
        assert deltas[0][n].abs().sum() > 0, n


def test_lr_mult_first_match_globs_and_typos() -> None:
    m = nn.ModuleDict({"backbone": Deformable(), "head": Deformable()})
    opt = O.adamw(m, lr=1.0, lr_mult={"backbone.sampling_offsets": 0.1, "sampling_offsets": 0.5})
    assert _group_of(opt, m["backbone"].sampling_offsets.weight)["lr"] == pytest.approx(0.1)  # first wins
    assert _group_of(opt, m["head"].sampling_offsets.weight)["lr"] == pytest.approx(0.5)
    # globs of the whole name, in no_decay too: the backbone's biases only
    opt = O.adamw(m, lr=1.0, weight_decay=0.1, decay_norm_and_bias=True, no_decay=["backbone.*.bias"])
    assert _group_of(opt, m["backbone"].value_proj.bias)["weight_decay"] == 0.0
    assert _group_of(opt, m["head"].value_proj.bias)["weight_decay"] == 0.1
    assert _group_of(opt, m["backbone"].norm.weight)["weight_decay"] == 0.1
    # no lr_mult: the groups are exactly the old ones (no per-group lr)
    assert all("lr_mult" not in g for g in O.adamw(m).param_groups)
    from kdrun.config import ConfigError

    with pytest.raises(ConfigError, match="sampling_offset_s"):
        O.adamw(m, lr_mult={"sampling_offset_s": 0.1})


@pytest.mark.parametrize("value, message", [
    ("{sampling_offsets: fast}", "optimizer.lr_mult.sampling_offsets='fast' must be a number"),
    ("{sampling_offsets: -0.1}", "out of range"),
    ("0.1", "must be a mapping"),
])
def test_lr_mult_bad_values_fail_validation(value: str, message: str) -> None:
    from kdrun.config import ConfigError, validate
    from tests.conftest import compose_cfg

    for opt in ("adamw", "sgd"):
        validate(compose_cfg([f"optimizer={opt}", "optimizer.lr_mult={sampling_offsets: 0.1}"]))  # a good one
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(compose_cfg([f"optimizer={opt}", f"optimizer.lr_mult={value}"]))

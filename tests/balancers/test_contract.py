"""The Balancer contract for every balancer class, on a tiny two-objective student.

* step() leaves finite .grad on every parameter that received gradient and does not touch state;
* after_step() changes the state of the stateful balancers (and of no other);
* a state_dict round trip into a fresh instance reproduces the behaviour bit for bit.
"""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch

from kdrun.balancers.base import Balancer
from kdrun.balancers.cross_batch import CrossBatch
from kdrun.balancers.distill_decay import DistillDecay
from kdrun.balancers.dto import DTOAmortised, DTOExact
from kdrun.balancers.dwa import DWA
from kdrun.balancers.famo import FAMO
from kdrun.balancers.gradnorm import GradNorm
from kdrun.balancers.gramian import CAGrad, FairGrad, IMTLG, MGDA, NashMTL, PCGrad, UPGrad
from kdrun.balancers.uncertainty import Uncertainty

from ._helpers import NAMES, TinyStudent, make_batch, make_ctx, state_copy, states_equal, train_step


def _decay() -> DistillDecay:
    b = DistillDecay(beta=0.05)
    b.total_steps = 8  # set by the engine in a real run
    return b


# name → (factory, stateful: after_step must change the state_dict)
BALANCERS: dict[str, tuple[Callable[[], Balancer], bool]] = {
    "dto": (lambda: DTOAmortised(), True),
    "dto_lagged": (lambda: DTOAmortised(next_loss="lagged"), True),
    "dto_eq18": (lambda: DTOAmortised(update="eq18"), True),
    "dto_adam_l2": (lambda: DTOAmortised(optimizer="adam_l2"), True),  # the default is adamw
    "dto_exact": (lambda: DTOExact(), False),
    "famo": (lambda: FAMO(), True),
    "cross_batch": (lambda: CrossBatch(), False),
    "cross_batch_align": (lambda: CrossBatch(objective="align", alpha=0.5), False),
    "mgda": (lambda: MGDA(), False),
    "pcgrad": (lambda: PCGrad(), False),
    "cagrad": (lambda: CAGrad(), False),
    "fairgrad": (lambda: FairGrad(), False),
    "imtl": (lambda: IMTLG(), False),
    "nash_mtl": (lambda: NashMTL(), True),
    "upgrad": (lambda: UPGrad(), False),
    "uncertainty": (lambda: Uncertainty(), True),
    "gradnorm": (lambda: GradNorm(), True),
    "dwa": (lambda: DWA(window=2), True),
    "distill_decay": (_decay, False),
}

WARMUP = 5  # steps before the checks, so that the learned states are non-trivial (DWA: 2 windows)


def warmed_up(name: str) -> tuple[Balancer, TinyStudent, torch.optim.Optimizer]:
    factory, _ = BALANCERS[name]
    bal = factory()
    bal.bind(NAMES)
    model = TinyStudent(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(WARMUP):
        train_step(bal, model, opt, t)
    return bal, model, opt


@pytest.mark.parametrize("name", list(BALANCERS))
def test_step_contract(name: str) -> None:
    bal, model, opt = warmed_up(name)
    stateful = BALANCERS[name][1]
    before = state_copy(bal)
    opt.zero_grad(set_to_none=True)
    ctx = make_ctx(model, WARMUP, make_batch(WARMUP), aux_batch=make_batch(10_000 + WARMUP))
    res = bal.step(ctx)
    # rule 1: .grad set and finite, state untouched
    assert states_equal(before, state_copy(bal)), "step() changed the state"
    got = [p for p in model.parameters() if p.grad is not None]
    assert model.trunk.weight.grad is not None and model.head_task.weight.grad is not None
    assert model.unused.weight.grad is None
    assert all(torch.isfinite(p.grad).all() for p in got)
    assert res.weights.shape == (len(NAMES),) and res.weights.is_floating_point()
    assert torch.isfinite(res.weights).all()
    if res.raw_weights is not None:
        assert res.raw_weights.shape == (len(NAMES),) and torch.isfinite(res.raw_weights).all()
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in res.extras.values())
    # after_step commits state only where the method has state
    opt.step()
    bal.after_step(ctx)
    after = state_copy(bal)
    if stateful:
        assert not states_equal(before, after), "after_step did not update the state"
    else:
        assert states_equal(before, after)


@pytest.mark.parametrize("name", list(BALANCERS))
def test_state_dict_round_trip(name: str) -> None:
    a, model_a, _ = warmed_up(name)
    b = BALANCERS[name][0]()
    b.bind(NAMES)
    b.load_state_dict(a.state_dict())
    assert states_equal(state_copy(a), state_copy(b))
    model_b = copy.deepcopy(model_a)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    for t in range(WARMUP, WARMUP + 2):
        ra, _ = train_step(a, model_a, opt_a, t)
        rb, _ = train_step(b, model_b, opt_b, t)
        assert torch.equal(ra.weights, rb.weights)
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            assert (pa.grad is None) == (pb.grad is None)
            if pa.grad is not None:
                assert torch.equal(pa.grad, pb.grad), name
        assert states_equal(state_copy(a), state_copy(b))

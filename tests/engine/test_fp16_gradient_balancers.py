"""fp16 with a gradient-level balancer: the first step must not fail in GradScaler.unscale_.

Gradient-level balancers multiply their objectives by the loss scale themselves (KDStep.scale()) and never
call ``scaler.scale(loss)``, the call that creates the scaler's scale tensor; ``unscale_`` then asserted
"_scale is None" on step 0 (found by the DOT work, #25). GradScaler runs on the CPU, so this is tested here."""
from __future__ import annotations

import pytest
import torch

from kdrun.balancers.fixed import Fixed
from kdrun.balancers.gramian import MGDA
from tests.engine._parts import batches, make_step


@pytest.mark.parametrize("make_balancer", [MGDA, Fixed], ids=["mgda", "fixed"])
def test_a_fresh_grad_scaler_takes_the_first_step(make_balancer) -> None:
    step = make_step(make_balancer())
    step.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # fresh: no scale() called yet
    before = [p.detach().clone() for p in step.params]
    outcome = step(batches(1, seed=5)[0], 0)
    assert outcome.finite
    assert any(not torch.equal(a, b) for a, b in zip(before, step.params))  # the step was taken
    assert step.scaler.get_scale() == 1024.0  # a finite step keeps the scale until growth_interval

"""One optimiser step (kdrun.engine.step.KDStep) in isolation: the order of the step, the non-finite skip,
the gradient it writes, and the DDP reducer choice."""
from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch
from timm.data import Mixup

from kdrun.balancers.base import Balancer, StepContext, StepResult
from kdrun.balancers.cross_batch import CrossBatch
from kdrun.balancers.dto import DTOAmortised, DTOExact
from kdrun.balancers.fixed import Fixed
from kdrun.balancers.gramian import MGDA
from kdrun.engine.run import json_safe
from kdrun.engine.step import StepSettings, forward_sync

from ._parts import NaNAtStep, assert_same, batches, make_step, trained_state

BALANCERS = {
    "fixed": lambda: Fixed(),
    "dto_amortised": lambda: DTOAmortised(),
    "dto_lagged": lambda: DTOAmortised(next_loss="lagged"),
    "dto_exact": lambda: DTOExact(),
    "mgda": lambda: MGDA(),
}


# -- 1. the teacher sees the batch the student sees (issue #11 item 1) -----------------------------------


def recorder(module: torch.nn.Module, seen: list[torch.Tensor]) -> None:
    """Record a copy of every input ``module`` is called with (a copy: timm's Mixup mixes in place)."""
    module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))


def test_teacher_and_student_receive_the_same_mixed_input() -> None:
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                label_smoothing=0.1, num_classes=4)
    modes: list[bool] = []
    params_per_batch = mix._params_per_batch

    def spy() -> tuple[float, bool]:
        lam, use_cutmix = params_per_batch()
        modes.append(bool(use_cutmix))
        return lam, use_cutmix

    mix._params_per_batch = spy  # type: ignore[method-assign]
    step = make_step(Fixed(), mixup=mix)
    t_in: list[torch.Tensor] = []
    s_in: list[torch.Tensor] = []
    recorder(step.teacher.model, t_in)  # type: ignore[union-attr]
    recorder(step.trainable.student, s_in)
    np.random.seed(0)  # timm draws lam and the mode from NumPy's global stream
    raw = batches(12)
    for i, (x, y) in enumerate(raw):
        step((x.clone(), y), i)
    assert len(t_in) == len(s_in) == len(raw)
    assert True in modes and False in modes, modes  # both cutmix and mixup steps were taken
    for i, (a, b) in enumerate(zip(t_in, s_in)):
        assert torch.equal(a, b), f"step {i} ({'cutmix' if modes[i] else 'mixup'}): teacher saw another input"
    assert sum(not torch.equal(a, x) for a, (x, _) in zip(t_in, raw)) >= 10  # the inputs really were mixed


def test_step_order_teacher_before_student() -> None:
    step = make_step(Fixed())
    order: list[str] = []
    step.teacher.model.register_forward_pre_hook(lambda *_: order.append("teacher"))  # type: ignore[union-attr]
    step.trainable.student.register_forward_pre_hook(lambda *_: order.append("student"))
    step(batches(1)[0], 0)
    assert order == ["teacher", "student"]


# -- 2. a non-finite step changes nothing but a counter -----------------------------------------------------


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_nonfinite_step_leaves_parameters_optimiser_and_balancer_unchanged(name: str) -> None:
    step = make_step(BALANCERS[name](), extra={"nan": NaNAtStep(at=[3])})
    data = batches(5)
    for i in range(3):
        assert step(data[i], i).finite
    before = trained_state(step)
    out = step(data[3], 3)  # the NaN term fires on this forward
    assert not out.finite and step.skipped == 1
    assert_same(before, trained_state(step))
    assert all(p.grad is None for p in step.params)  # nothing left over for the next step
    assert step(data[4], 4).finite  # and training goes on
    after = trained_state(step)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("param/"))


def test_nonfinite_raise_names_the_objective() -> None:
    step = make_step(Fixed(), extra={"nan": NaNAtStep(at=[0])}, settings=StepSettings(nonfinite="raise"))
    with pytest.raises(FloatingPointError, match="distill"):
        step(batches(1)[0], 0)


# -- 3. gradient-level balancers write Σ wᵢ ∇Lᵢ, checked against brute-force per-objective gradients ----------


def brute_force_update(step, batch, raw_weights: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Σᵢ wᵢ ∇_θ Lᵢ over every parameter, one autograd.grad per objective on the same forward."""
    x, y, _ = step.to_device(batch)
    t_out = step.teacher(x)
    _, terms = step.trainable(x, y, t_out)
    objectives = {g: sum(terms[n] for n in members) for g, members in step.groups.items()}
    names = [n for n, p in step.trainable.named_parameters() if p.requires_grad]
    params = [p for p in step.trainable.parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in zip(names, params)}
    for w, obj in zip(raw_weights.double(), (objectives[n] for n in step.balancer.objectives)):
        grads = torch.autograd.grad(obj, params, retain_graph=True, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                total[n] += w * g.double()
    return total


GRADIENT_CASES = {
    "dto_exact": (lambda: DTOExact(), None),
    "mgda": (lambda: MGDA(), None),
    "dto_exact_features": (lambda: DTOExact(), "pre_logits"),
    "fixed": (lambda: Fixed(), None),  # loss-level, for contrast: one ordinary backward
}


@pytest.mark.parametrize("name", sorted(GRADIENT_CASES))
def test_update_is_the_weighted_sum_of_brute_force_gradients(name: str) -> None:
    """θ₁ = θ₀ − Σᵢ wᵢ ∇Lᵢ(θ₀) with lr 1 and no momentum: the .grad KDStep wrote through the Jacobian
    machinery (shared/private split, batched or feature-space Jacobian) equals the weighted sum of
    per-objective gradients taken one autograd.grad each on an identical copy of the run."""
    make, feature = GRADIENT_CASES[name]
    settings = StepSettings(grad_feature=feature, jacobian="auto")
    step = make_step(make(), lr=1.0, momentum=0.0, settings=settings)
    twin = make_step(make(), lr=1.0, momentum=0.0, settings=settings)  # same seeds: same parameters
    batch = batches(1, seed=4)[0]  # a batch where every rule puts weight on both objectives
    before = {n: p.detach().clone() for n, p in step.trainable.named_parameters()}
    out = step(batch, 0)
    assert out.finite and out.result.raw_weights is not None
    assert (out.result.raw_weights > 0).all(), out.result.raw_weights
    ref = brute_force_update(twin, batch, out.result.raw_weights)
    assert any(ref[n].abs().sum() > 0 for n in ref if n.startswith("distill.feat.proj"))  # private params
    for n, p in step.trainable.named_parameters():
        torch.testing.assert_close((before[n] - p.detach()).double(), ref[n], rtol=1e-4, atol=1e-6, msg=n)


# -- 4. DDP's reducer: off for gradient-level balancers, on otherwise ---------------------------------------


class FakeDDP:
    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


@pytest.mark.parametrize("balancer, feature_space, distributed, no_sync", [
    (Fixed(), False, True, False),              # loss-level: DDP's ordinary backward averages
    (DTOAmortised(), False, True, False),       # amortised DTO is loss-level
    (DTOExact(), False, True, True),            # gradient-level: own rank-averaged Jacobian
    (MGDA(), False, True, True),
    (CrossBatch(), False, True, True),
    (DTOExact(), True, True, False),            # feature space: the update is an ordinary backward
    (MGDA(), False, False, False),              # one process: nothing to sync
], ids=["fixed", "dto", "dto_exact", "mgda", "cross_batch", "dto_exact_features", "single_process"])
def test_ddp_no_sync_choice_per_balancer_kind(balancer: Balancer, feature_space: bool, distributed: bool,
                                              no_sync: bool) -> None:
    model = FakeDDP()
    got = forward_sync(model, balancer, feature_space, distributed)  # type: ignore[arg-type]
    assert (got == model.no_sync) is no_sync
    with got():
        pass


# -- 5. the context a balancer gets ---------------------------------------------------------------------------


class Probe(Fixed):
    """Records what the step context offered."""

    def __init__(self, recompute: bool) -> None:
        super().__init__()
        self.needs_recompute = recompute
        self.seen: list[StepContext] = []

    def step(self, ctx: StepContext) -> StepResult:
        self.seen.append(ctx)
        return super().step(ctx)


@pytest.mark.parametrize("recompute", [True, False])
def test_recompute_is_offered_only_to_balancers_that_declare_it(recompute: bool) -> None:
    bal = Probe(recompute)
    step = make_step(bal)
    step(batches(1)[0], 0)
    (ctx,) = bal.seen
    assert (ctx.recompute_objectives is not None) is recompute
    assert ctx.aux_objectives is None  # Fixed is not an extra-batch balancer


def test_progress_reaches_every_term_before_its_forward() -> None:
    seen: list[int] = []

    class Spy(NaNAtStep):
        def forward(self, s, t, target):  # noqa: ANN001, ANN201
            seen.append(self.progress_step)
            return super().forward(s, t, target)

    step = make_step(Fixed(), extra={"spy": Spy(at=[])})
    for i, b in zip((5, 6, 9), batches(3)):
        step(b, i)
    assert seen == [5, 6, 9]


def test_results_json_is_valid_json() -> None:
    out = json_safe({"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": {"d": 2, "e": None, "f": "x"}})
    assert out == {"a": None, "b": [None, None, 1.5], "c": {"d": 2, "e": None, "f": "x"}}
    assert json.loads(json.dumps(out, allow_nan=False)) == out

"""The Balancer contract for every balancer option, on a tiny two-objective student.

The options are the files of ``conf/balancer/`` (composed by Hydra, as a run composes them), so a new
balancer is checked as soon as it has its YAML, and a balancer class without one fails
``test_every_balancer_class_has_an_option``. For every option:

* step() leaves finite .grad on every parameter that received gradient and does not touch state;
* after_step() changes the state where there is state (and there is none that it leaves alone);
* a state_dict round trip into a fresh instance reproduces the behaviour bit for bit;
* the update is Σᵢ wᵢ ∇Lᵢ for the reported raw weights, against one backward per objective;
* the state_dict keys of the options that existing checkpoints hold are the ones they hold.
"""
from __future__ import annotations

import copy
import functools
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

import kdrun.balancers
from kdrun.balancers.base import Balancer, StepResult
from kdrun.balancers.dot import DOT
from tests.conftest import compose_cfg

from ._helpers import NAMES, TinyStudent, make_batch, make_ctx, state_copy, states_equal, train_step

CONF = Path(__file__).resolve().parents[2] / "conf" / "balancer"
OPTIONS = sorted(p.stem for p in CONF.glob("*.yaml"))

# Settings of an option that take another code path of the same class (the options themselves need no
# entry): case name → (option, Hydra overrides).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dto_lagged": ("dto", ["balancer.next_loss=lagged"]),
    "dto_eq18": ("dto", ["balancer.update=eq18"]),
    "dto_adam_l2": ("dto", ["balancer.optimizer=adam_l2"]),  # the option's default is adamw
    "cross_batch_align": ("cross_batch", ["balancer.objective=align", "balancer.alpha=0.5"]),
    "dwa_window2": ("dwa", ["balancer.window=2"]),  # two windows complete within WARMUP: non-unit weights
    "distill_decay_beta": ("distill_decay", ["balancer.beta=0.05"]),
    "mgda_frank_wolfe": ("mgda", ["balancer.solver=frank_wolfe"]),
    "objective_clip_dto_exact": ("objective_clip", ["balancer@balancer.inner=dto_exact"]),
    "objective_clip_cross_batch": ("objective_clip", ["balancer@balancer.inner=cross_batch"]),
}
CASES: dict[str, list[str]] = {**{o: [f"balancer={o}"] for o in OPTIONS},
                               **{c: [f"balancer={o}", *ov] for c, (o, ov) in VARIANTS.items()}}

WARMUP = 5  # steps before the checks, so that the learned states are non-trivial
TOTAL_STEPS = 8  # set_total_steps, as the engine calls it: distill_decay decays within the test


@functools.cache
def node(case: str) -> DictConfig:
    return compose_cfg(CASES[case]).balancer


def build(case: str) -> Balancer:
    bal = instantiate(node(case), _convert_="all")
    bal.bind(NAMES)
    bal.set_total_steps(TOTAL_STEPS)
    return bal


def warmed_up(case: str) -> tuple[Balancer, TinyStudent, torch.optim.Optimizer]:
    bal = build(case)
    model = TinyStudent(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(WARMUP):
        train_step(bal, model, opt, t)
    return bal, model, opt


def test_variants_name_existing_options() -> None:
    assert {o for o, _ in VARIANTS.values()} <= set(OPTIONS)
    assert not set(VARIANTS) & set(OPTIONS)


def _balancer_classes() -> set[type]:
    """Every Balancer class defined in kdrun.balancers that can be instantiated (not abstract)."""
    found: set[type] = set()
    for info in pkgutil.iter_modules(kdrun.balancers.__path__):
        module = importlib.import_module(f"kdrun.balancers.{info.name}")
        found |= {c for _, c in inspect.getmembers(module, inspect.isclass)
                  if issubclass(c, Balancer) and c.__module__ == module.__name__ and not inspect.isabstract(c)}
    return found


def test_every_balancer_class_has_an_option() -> None:
    """A class without a YAML would be outside every test derived from OPTIONS."""
    from kdrun.balancers.gramian import GramianBalancer

    reached = set()
    for case in CASES:
        bal = build(case)
        reached |= {type(bal), type(getattr(bal, "inner", bal))}
    # Balancer is the engine's interface; GramianBalancer the torchjd adapter its seven subclasses share,
    # with no weighting of its own. Neither is a method.
    classes = _balancer_classes() - {Balancer, GramianBalancer}
    assert len(classes) >= 17 and classes <= reached, classes - reached


@pytest.mark.parametrize("case", list(CASES))
def test_step_contract(case: str) -> None:
    bal, model, opt = warmed_up(case)
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
    # after_step commits state, and every piece of state is live: a balancer with a state_dict must change it
    opt.step()
    bal.after_step(ctx)
    after = state_copy(bal)
    if before:
        assert not states_equal(before, after), "after_step did not update the state"
    else:
        assert after == {}


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_round_trip(case: str) -> None:
    a, model_a, _ = warmed_up(case)
    b = build(case)
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
                assert torch.equal(pa.grad, pb.grad), case
        assert states_equal(state_copy(a), state_copy(b))


def brute_force_update(model: TinyStudent, step: int, raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σᵢ wᵢ ∇Lᵢ per parameter, one separate backward per objective on a copy of the model."""
    total = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in model.named_parameters()}
    for w, name in zip(raw.double(), NAMES):
        m = copy.deepcopy(model)
        for p in m.parameters():
            p.grad = None
        m.objectives(make_batch(step))[name].backward()
        for k, p in m.named_parameters():
            if p.grad is not None:
                total[k] += w * p.grad.double()
    return total


@pytest.mark.parametrize("case", list(CASES))
def test_update_is_the_raw_weighted_sum_of_per_objective_gradients(case: str) -> None:
    """Loss-level (one backward of Σ wᵢLᵢ), gradient-level (Jacobian rows) and objective_clip (wᵢcᵢ on the
    clipped rows) all write Σᵢ wᵢ ∇Lᵢ with w = the raw weights they report; a base that applied π, or
    weights other than the ones it reports, fails here (amortised DTO: π ≠ raw)."""
    bal, model, opt = warmed_up(case)
    if isinstance(bal, DOT):
        pytest.skip("DOT writes its momentum step (raw weights: this step's gradients into its buffers); "
                    "tests/balancers/test_dot.py checks it against mdistiller's code")
    opt.zero_grad(set_to_none=True)
    ref = copy.deepcopy(model)
    res: StepResult = bal.step(make_ctx(model, WARMUP, make_batch(WARMUP), aux_batch=make_batch(10_000 + WARMUP)))
    assert res.raw_weights is not None
    want = brute_force_update(ref, WARMUP, res.raw_weights)
    for k, p in model.named_parameters():
        got = torch.zeros_like(want[k]) if p.grad is None else p.grad.double()
        torch.testing.assert_close(got, want[k], rtol=1e-5, atol=1e-7, msg=f"{case}: {k}")


# The state_dict keys of the options at the time of issue #24 (bound to two objectives): checkpoints written
# with them must keep loading. A new option has no checkpoints yet and needs no entry.
CHECKPOINT_KEYS: dict[str, list[str]] = {
    **{o: [] for o in ("cagrad", "cross_batch", "distill_decay", "dto_exact", "fairgrad", "fixed", "fixed_kd",
                       "fixed_mean", "imtl", "mgda", "objective_clip_fixed", "pcgrad", "upgrad")},
    "dto": ["logits", "optim_exp_avg", "optim_exp_avg_sq", "optim_step"],
    "dto_lagged": ["has_prev", "logits", "optim_exp_avg", "optim_exp_avg_sq", "optim_step", "prev_losses"],
    "famo": ["logits", "optim_exp_avg", "optim_exp_avg_sq", "optim_step"],
    "dwa": ["avg_before_last", "avg_last", "window_count", "window_sum", "windows_done"],
    "gradnorm": ["has_initial", "initial_losses", "optim_exp_avg", "optim_exp_avg_sq", "optim_step", "task_weights"],
    "nash_mtl": ["prev_alpha", "solve_step"],
    "objective_clip": ["inner.logits", "inner.optim_exp_avg", "inner.optim_exp_avg_sq", "inner.optim_step"],
    "uncertainty": ["log_vars", "optim_exp_avg", "optim_exp_avg_sq", "optim_step"],
}


@pytest.mark.parametrize("case", list(CHECKPOINT_KEYS))
def test_checkpoint_keys_are_unchanged(case: str) -> None:
    assert sorted(build(case).state_dict()) == CHECKPOINT_KEYS[case]

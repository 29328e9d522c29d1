"""ObjectiveClip against a brute force: one backward per objective, each full gradient clipped to
max_norm with clip_grad_norm_'s coefficient, then the wrapped balancer's weighted sum."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor

from kdrun.balancers.dto import DTOAmortised, DTOExact, amortised_raw_weights, closed_form_weights
from kdrun.balancers.fixed import Fixed
from kdrun.balancers.gradients import compute_jacobian
from kdrun.balancers.objective_clip import ObjectiveClip, clip_coefficients, objective_norms
from kdrun.config import ConfigError, validate_target_node
from tests.balancers._helpers import TinyStudent, make_batch, make_ctx

NAMES3 = ("distill", "task", "zero")


def objectives3(model: TinyStudent, seed: int) -> dict[str, Tensor]:
    out = model.objectives(make_batch(seed))
    out["zero"] = (model.trunk.weight * 0.0).sum() + 1.0  # reaches the trunk with a zero gradient
    return {n: out[n] for n in NAMES3}


def ctx3(model: TinyStudent, seed: int):  # noqa: ANN201 - a StepContext with a third objective
    ctx = make_ctx(model, 0, make_batch(seed))
    params = [p for p in model.parameters()]
    objs = objectives3(model, seed)
    cache: dict = {}

    def jacobian():  # noqa: ANN202
        if "j" not in cache:
            cache["j"] = compute_jacobian(objs, params)  # frees the graph, as the engine off diagnostic steps
        return cache["j"]

    ctx.objectives = objs
    ctx.jacobian = jacobian
    return ctx


def brute_force(model: TinyStudent, seed: int, weights: list[float], max_norm: float) -> tuple[dict[str, Tensor], list[float]]:
    """Σ wᵢ clip(∇Lᵢ) per parameter name, and the unclipped norms, by k separate backward passes."""
    per: list[dict[str, Tensor]] = []
    for name in NAMES3:
        m = copy.deepcopy(model)
        objectives3(m, seed)[name].backward()
        per.append({k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                    for k, p in m.named_parameters()})
    norms = [float(torch.sqrt(sum((g.double() ** 2).sum() for g in d.values()))) for d in per]
    out = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for w, d, n in zip(weights, per, norms):
        c = min(1.0, max_norm / (n + 1e-6))  # torch.nn.utils.clip_grad_norm_'s coefficient
        for k in out:
            out[k] = out[k] + w * c * d[k]
    return out, norms


def grads(model: TinyStudent) -> dict[str, Tensor]:
    return {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in model.named_parameters()}


def test_norm_and_coefficient_helpers() -> None:
    norms = torch.tensor([0.0, 0.05, 0.1, 3.0], dtype=torch.float64)
    c = clip_coefficients(norms, 0.1)
    assert c[0] == 1.0 and c[1] == 1.0  # zero and below the threshold: unchanged
    torch.testing.assert_close(c[2], torch.tensor(0.1 / (0.1 + 1e-6), dtype=torch.float64))
    torch.testing.assert_close(c[3], torch.tensor(0.1 / (3.0 + 1e-6), dtype=torch.float64))
    # the loss scale a GradScaler puts on the gradients is divided out of the norms
    model = TinyStudent()
    objs = model.objectives(make_batch(0))
    j1 = compute_jacobian(objs, list(model.parameters()), retain_graph=True)
    j4 = compute_jacobian(objs, list(model.parameters()), scale=4.0)
    torch.testing.assert_close(objective_norms(j4), objective_norms(j1))


@pytest.mark.parametrize("max_norm", [1e6, None, 1e-3])  # none clipped / one clipped / all but zero clipped
def test_fixed_inner_matches_brute_force(max_norm: float | None) -> None:
    model = TinyStudent(seed=1)
    alphas = {"distill": 0.3, "task": 0.7, "zero": 2.0}
    _, norms = brute_force(model, 3, [0.3, 0.7, 2.0], 1.0)
    assert norms[2] == 0.0 and norms[0] != norms[1]
    if max_norm is None:  # between the two non-zero norms: one clipped, one left unchanged
        max_norm = 0.5 * (norms[0] + norms[1])
    expected, _ = brute_force(model, 3, [0.3, 0.7, 2.0], max_norm)
    bal = ObjectiveClip(Fixed(alphas=alphas), max_norm=max_norm)
    bal.bind(NAMES3)
    res = bal.step(ctx3(model, 3))
    got = grads(model)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-7, msg=k)
    assert all(torch.isfinite(g).all() for g in got.values())
    c = [min(1.0, max_norm / (n + 1e-6)) for n in norms]
    torch.testing.assert_close(res.raw_weights, torch.tensor([0.3 * c[0], 0.7 * c[1], 2.0 * c[2]]))
    assert float(res.extras["clip/coef/zero"]) == 1.0
    torch.testing.assert_close(res.extras["clip/norm/task"], torch.tensor(norms[1]), rtol=1e-5, atol=0)
    if max_norm == 1e6:  # nothing clipped: exactly the wrapped balancer's ordinary backward
        ref = copy.deepcopy(model)
        for p in ref.parameters():
            p.grad = None
        f = Fixed(alphas=alphas)
        f.bind(NAMES3)
        f.step(ctx3(ref, 3))
        for k, p in ref.named_parameters():
            torch.testing.assert_close(got[k], grads(ref)[k], rtol=1e-5, atol=1e-7)


def test_loss_level_dto_inner_clips_its_weighted_sum_and_keeps_its_state_rule() -> None:
    model = TinyStudent(seed=2)
    inner = DTOAmortised()  # amortised: weights from the losses, one backward of Σ wᵢLᵢ
    bal = ObjectiveClip(inner, max_norm=0.2)
    assert bal.needs_recompute and not bal.uses_ddp_backward
    bal.bind(("distill", "task"))
    with torch.no_grad():
        inner.logits.copy_(torch.tensor([0.4, -0.4], dtype=torch.float64))
    ctx = make_ctx(model, 0, make_batch(5))
    losses = torch.stack([ctx.objectives[n].detach() for n in ("distill", "task")])
    w = amortised_raw_weights(torch.softmax(inner.logits, 0), losses, inner.eps).float().tolist()
    res = bal.step(ctx)
    # brute force on the two objectives: per-objective backward, clip, weighted sum
    per = []
    for name in ("distill", "task"):
        m = copy.deepcopy(model)
        for p in m.parameters():
            p.grad = None
        m.objectives(make_batch(5))[name].backward()
        per.append({k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in m.named_parameters()})
    norms = [float(torch.sqrt(sum((g.double() ** 2).sum() for g in d.values()))) for d in per]
    assert max(norms) > 0.2  # the clip is active for at least one objective
    for k, p in model.named_parameters():
        exp = sum(wi * min(1.0, 0.2 / (n + 1e-6)) * d[k] for wi, n, d in zip(w, norms, per))
        torch.testing.assert_close(grads(model)[k], exp, rtol=1e-5, atol=1e-7, msg=k)
    torch.testing.assert_close(res.weights, torch.softmax(inner.logits, 0).float())
    # after_step is the inner's: the FAMO update from the recomputed losses, state in bal.inner
    before = inner.logits.clone()
    bal.after_step(ctx)
    ref = DTOAmortised()
    ref.bind(("distill", "task"))
    with torch.no_grad():
        ref.logits.copy_(before)
    ref.after_step(ctx)
    torch.testing.assert_close(inner.logits, ref.logits)
    assert "inner.logits" in bal.state_dict()


def test_gradient_level_inner_sees_the_clipped_jacobian() -> None:
    model = TinyStudent(seed=4)
    bal = ObjectiveClip(DTOExact(), max_norm=0.05)
    bal.bind(("distill", "task"))
    ctx = make_ctx(model, 0, make_batch(7))
    losses = torch.stack([ctx.objectives[n].detach().double() for n in ("distill", "task")])
    bal.step(ctx)
    per = []
    for name in ("distill", "task"):
        m = copy.deepcopy(model)
        m.objectives(make_batch(7))[name].backward()
        per.append({k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in m.named_parameters()})
    norms = [float(torch.sqrt(sum((g.double() ** 2).sum() for g in d.values()))) for d in per]
    c = [min(1.0, 0.05 / (n + 1e-6)) for n in norms]
    # Theorem 3.1 on the Gram matrix of the clipped log-gradients of the SHARED parameters (the trunk)
    shared = ["trunk.weight", "trunk.bias"]
    rows = [torch.cat([c[i] * per[i][k].reshape(-1).double() for k in shared]) / losses[i] for i in range(2)]
    jl = torch.stack(rows)
    pi = closed_form_weights(jl @ jl.T)
    raw = (pi / losses).tolist()
    for k, p in model.named_parameters():
        exp = sum(raw[i] * c[i] * per[i][k] for i in range(2))
        torch.testing.assert_close(grads(model)[k], exp.float(), rtol=1e-4, atol=1e-7, msg=k)


def test_config_composes_validates_and_refuses_bad_values() -> None:
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    cfg = compose_cfg(["balancer=objective_clip", "balancer@balancer.inner=fixed"])
    validate_target_node("balancer", cfg.balancer)
    bal = instantiate(cfg.balancer, _convert_="all")
    assert isinstance(bal, ObjectiveClip) and isinstance(bal.inner, Fixed) and bal.max_norm == 0.1
    dto = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "balancer" / "dto.yaml")
    assert compose_cfg(["balancer=objective_clip"]).balancer.inner._target_ == dto._target_  # conf/balancer/dto.yaml
    bad = OmegaConf.create(OmegaConf.to_container(cfg.balancer))
    bad.max_norm = 0.0
    with pytest.raises(ConfigError, match="max_norm"):
        validate_target_node("balancer", bad)
    bad = OmegaConf.create(OmegaConf.to_container(cfg.balancer))
    bad.inner.alpha_task = -1.0
    with pytest.raises(ConfigError, match="inner.alpha_task"):
        validate_target_node("balancer", bad)


def test_set_total_steps_reaches_the_inner_schedule() -> None:
    """The engine calls set_total_steps on the outer balancer only; a wrapped distill_decay must still
    decay (without the planned step count its weights stay at the start values (0.9, 0.1) forever)."""
    from hydra.utils import instantiate

    from kdrun.balancers.distill_decay import DistillDecay
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["balancer=objective_clip", "balancer@balancer.inner=distill_decay"])
    bal = instantiate(cfg.balancer, _convert_="all")
    assert isinstance(bal.inner, DistillDecay)
    bal.bind(("distill", "task"))
    bal.set_total_steps(10)
    assert bal.total_steps == 10 and bal.inner.total_steps == 10
    model = TinyStudent(seed=3)
    res = bal.step(make_ctx(model, 9, make_batch(2)))  # the last step: fully decayed
    torch.testing.assert_close(res.weights, torch.tensor([0.0, 1.0]))  # (distill, task): kl_end, ce_end


def _loss_level_options() -> list[str]:
    """The conf/balancer options whose class is a LossWeighting (the composed option's _target_: a named
    option may take it from the option it builds on, `defaults: [fixed, _self_]`)."""
    from hydra.utils import get_class

    from kdrun.balancers.base import LossWeighting
    from tests.conftest import compose_cfg

    conf = Path(__file__).resolve().parents[2] / "conf" / "balancer"
    return [p.stem for p in sorted(conf.glob("*.yaml"))
            if issubclass(get_class(compose_cfg([f"balancer={p.stem}"]).balancer._target_), LossWeighting)]


LOSS_LEVEL = _loss_level_options()


def test_the_loss_level_options_are_found() -> None:
    assert {"fixed", "fixed_kd", "fixed_mean", "dto", "famo", "uncertainty", "dwa", "distill_decay"} <= set(LOSS_LEVEL)
    assert not {"dto_exact", "mgda", "objective_clip", "cross_batch"} & set(LOSS_LEVEL)


@pytest.mark.parametrize("option", LOSS_LEVEL)
def test_loss_level_inner_weighs_the_clipped_gradients_as_its_own_backward_weighs_the_raw_ones(option: str) -> None:
    """The weights objective_clip takes from a loss-level method (its weighting, kdrun/balancers/base.py) are
    the ones that method's own backward applies, read as ∂s/∂Lᵢ of the scalar s it passes to ctx.backward
    (what objective_clip did before issue #24); the update is Σ wᵢ cᵢ ∇Lᵢ, cᵢ clip_grad_norm_'s coefficient."""
    from hydra.utils import instantiate

    from tests.balancers._helpers import NAMES, train_step
    from tests.conftest import compose_cfg

    inner = instantiate(compose_cfg([f"balancer={option}"]).balancer, _convert_="all")
    bal = ObjectiveClip(inner, max_norm=0.1)
    bal.bind(NAMES)
    bal.set_total_steps(8)
    model = TinyStudent(seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(3):  # learned states move off their initial values (through the clipped path)
        train_step(bal, model, opt, t)
    step = 3
    per = []
    for name in NAMES:
        m = copy.deepcopy(model)
        for p in m.parameters():
            p.grad = None
        m.objectives(make_batch(step))[name].backward()
        per.append(grads(m))
    norms = [float(torch.sqrt(sum((g.double() ** 2).sum() for g in d.values()))) for d in per]
    bal.max_norm = (norms[0] * norms[1]) ** 0.5  # between the two: one gradient clipped, the other not
    c = clip_coefficients(torch.tensor(norms, dtype=torch.float64), bal.max_norm).tolist()
    assert min(c) < 1.0 == max(c)
    # the reference: the inner method's own step, its backward scalar differentiated w.r.t. the objectives
    twin, twin_model = copy.deepcopy(inner), copy.deepcopy(model)
    scalars: list[Tensor] = []
    ref_ctx = make_ctx(twin_model, step, make_batch(step))
    ref_ctx.backward = scalars.append
    ref = twin.step(ref_ctx)
    w = torch.autograd.grad(scalars[0], [ref_ctx.objectives[n] for n in NAMES])
    opt.zero_grad(set_to_none=True)
    res = bal.step(make_ctx(model, step, make_batch(step)))
    for k, p in model.named_parameters():
        exp = sum(float(wi) * ci * d[k] for wi, ci, d in zip(w, c, per))
        torch.testing.assert_close(grads(model)[k], exp, rtol=1e-5, atol=1e-7, msg=f"{option}: {k}")
    torch.testing.assert_close(res.raw_weights, torch.stack(w).float() * torch.tensor(c, dtype=torch.float32))
    assert torch.equal(res.weights, ref.weights)

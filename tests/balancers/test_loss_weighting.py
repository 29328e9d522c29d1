"""Uncertainty, GradNorm, DWA and distillation decay against their formulas."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdrun.balancers.base import StepContext
from kdrun.balancers.distill_decay import DistillDecay, decay_weights
from kdrun.balancers.dwa import DWA, dwa_weights
from kdrun.balancers.gradients import compute_jacobian
from kdrun.balancers.gradnorm import GradNorm, gradnorm_weight_grad, last_shared_columns, renormalise
from kdrun.balancers.logit_optim import optim_update
from kdrun.balancers.uncertainty import Uncertainty, log_variance_grad


def leaf_ctx(step: int, values: dict[str, float]) -> tuple[StepContext, dict[str, torch.Tensor]]:
    leaves = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in values.items()}
    ctx = StepContext(step=step, objectives=leaves, backward=lambda l: l.backward(),
                      jacobian=lambda: None, gradients=lambda d: None)
    return ctx, leaves


def test_uncertainty_weights_and_analytic_gradient() -> None:
    bal = Uncertainty(lr=0.1, optimizer="sgd")
    bal.bind(("distill", "task"))
    s = [0.0, 0.0]
    for t, (ld, lt) in enumerate([(2.0, 0.5), (1.5, 0.4), (1.2, 0.3)]):
        ctx, leaves = leaf_ctx(t, {"distill": ld, "task": lt})
        res = bal.step(ctx)
        w = [math.exp(-x) for x in s]
        assert [float(leaves["distill"].grad), float(leaves["task"].grad)] == pytest.approx(w, rel=1e-12)
        assert res.weights.tolist() == pytest.approx(w, rel=1e-6)
        bal.after_step(ctx)
        # ∂/∂s [exp(−s)L + s] = 1 − exp(−s)L, plain SGD step
        s = [x - 0.1 * (1 - math.exp(-x) * L) for x, L in zip(s, (ld, lt))]
        assert bal.log_vars.tolist() == pytest.approx(s, rel=1e-12)
    # the stationary point is s = log L
    s_star = torch.tensor([math.log(3.0)], dtype=torch.float64)
    assert log_variance_grad(s_star, torch.tensor([3.0], dtype=torch.float64)).abs().item() < 1e-12
    # and the gradient matches autograd of the joint objective
    sv = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    L = torch.tensor([1.7, 0.2], dtype=torch.float64)
    (g,) = torch.autograd.grad((torch.exp(-sv) * L + sv).sum(), sv)
    assert torch.allclose(log_variance_grad(sv.detach(), L), g)


def test_gradnorm_weight_gradient_by_hand() -> None:
    w = torch.tensor([1.2, 0.8], dtype=torch.float64)
    norms = torch.tensor([3.0, 0.5], dtype=torch.float64)  # ‖∇_W Lᵢ‖
    L, L0 = torch.tensor([0.9, 0.2]), torch.tensor([1.0, 1.0])
    out = gradnorm_weight_grad(w, norms, L, L0, alpha=1.5)
    G = [1.2 * 3.0, 0.8 * 0.5]
    Gbar = sum(G) / 2
    r = [0.9 / 0.55, 0.2 / 0.55]
    target = [Gbar * ri ** 1.5 for ri in r]
    grad = [math.copysign(1, Gi - Ti) * n for Gi, Ti, n in zip(G, target, [3.0, 0.5])]
    assert out.grad_norms.tolist() == pytest.approx(G)
    assert out.targets.tolist() == pytest.approx(target, rel=1e-6)
    assert out.weight_grad.tolist() == pytest.approx(grad)
    assert renormalise(torch.tensor([3.0, -1.0, 1.0], dtype=torch.float64)).sum().item() == pytest.approx(3.0)
    assert (renormalise(torch.tensor([3.0, -1.0, 1.0], dtype=torch.float64)) > 0).all()


def test_gradnorm_uses_last_shared_weight_matrix() -> None:
    torch.manual_seed(0)
    l1, l2 = nn.Linear(3, 4), nn.Linear(4, 2)
    x = torch.randn(5, 3)
    h = l2(torch.tanh(l1(x)))
    objectives = {"distill": h[:, 0].pow(2).mean() + 0.1, "task": (h[:, 1] - 1).pow(2).mean() + 0.1}
    params = list(l1.parameters()) + list(l2.parameters())
    jac = compute_jacobian(objectives, params, retain_graph=True)
    cols = last_shared_columns(jac)
    off = sum(p.numel() for p in params[:2])  # l1.weight, l1.bias
    assert (cols.start, cols.stop) == (off, off + l2.weight.numel())  # l2.weight, not l2.bias
    bal = GradNorm(lr=0.1, optimizer="sgd")
    bal.bind(("distill", "task"))
    ctx = StepContext(step=0, objectives=objectives, backward=lambda l: l.backward(),
                      jacobian=lambda: jac, gradients=lambda d: None)
    res = bal.step(ctx)
    assert torch.equal(res.weights, torch.ones(2))
    assert torch.allclose(l2.weight.grad.reshape(-1), jac.matrix[:, cols].sum(0))
    # the committed weights follow the hand formula (first step: L(0) = L, r = 1)
    norms = jac.matrix[:, cols].double().norm(dim=1)
    upd = gradnorm_weight_grad(torch.ones(2, dtype=torch.float64), norms,
                               torch.stack(list(objectives.values())).detach(),
                               torch.stack(list(objectives.values())).detach(), 1.5)
    want = renormalise(torch.ones(2, dtype=torch.float64) - 0.1 * upd.weight_grad)
    assert torch.equal(bal.task_weights, torch.ones(2, dtype=torch.float64))  # not yet committed
    bal.after_step(ctx)
    assert torch.allclose(bal.task_weights, want)
    assert bool(bal.has_initial) and int(bal.optim_step) == 1


def test_dwa_windows() -> None:
    bal = DWA(temperature=2.0, window=2)
    bal.bind(("distill", "task"))
    seq = [(4.0, 1.0), (2.0, 1.0), (2.0, 0.9), (1.0, 0.9), (1.0, 0.5)]
    for t, (ld, lt) in enumerate(seq):
        ctx, leaves = leaf_ctx(t, {"distill": ld, "task": lt})
        res = bal.step(ctx)
        if t < 4:  # fewer than two completed windows: w = 1
            assert res.weights.tolist() == [1.0, 1.0]
        else:
            last = [(2.0 + 1.0) / 2, (0.9 + 0.9) / 2]
            before = [(4.0 + 2.0) / 2, (1.0 + 1.0) / 2]
            r = [a / b for a, b in zip(last, before)]
            e = [math.exp(x / 2.0) for x in r]
            w = [2 * x / sum(e) for x in e]
            assert res.weights.tolist() == pytest.approx(w, rel=1e-6)
            assert [float(leaves["distill"].grad), float(leaves["task"].grad)] == pytest.approx(w, rel=1e-12)
        bal.after_step(ctx)
    assert dwa_weights(torch.ones(3), torch.ones(3), 2.0).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_distill_decay_schedule() -> None:
    kw = dict(kl_start=0.9, kl_end=0.0, ce_start=0.1, ce_end=1.0, decay_start=0.5, beta=0.0)
    assert decay_weights(0, 101, **kw) == (0.9, 0.1)  # p = step / 100
    assert decay_weights(49, 101, **kw) == (0.9, 0.1)
    assert decay_weights(75, 101, **kw) == pytest.approx((0.45, 0.55))
    assert decay_weights(100, 101, **kw) == pytest.approx((0.0, 1.0))  # the last step
    assert decay_weights(10**6, None, **kw) == (0.9, 0.1)  # no total_steps: no decay
    kw["beta"] = 0.2
    assert decay_weights(49, 101, **kw) == (0.9, 0.1)
    assert decay_weights(100, 101, **kw) == pytest.approx((0.2, 1.0))
    bal = DistillDecay()
    bal.bind(("task", "distill"))
    bal.total_steps = 11
    ctx, leaves = leaf_ctx(10, {"task": 0.5, "distill": 2.0})
    res = bal.step(ctx)
    assert res.weights.tolist() == pytest.approx([1.0, 0.0])  # objective order: task, distill
    assert float(leaves["task"].grad) == pytest.approx(1.0) and float(leaves["distill"].grad) == 0.0


def test_optim_sgd_and_adam_by_hand() -> None:
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    g = torch.tensor([0.5, 0.25], dtype=torch.float64)
    z = torch.zeros(2, dtype=torch.float64)
    t0 = torch.zeros((), dtype=torch.int64)
    st = optim_update(x, g, z, z, t0, lr=0.1, weight_decay=0.01, kind="sgd")
    assert st.param.tolist() == pytest.approx([1.0 - 0.1 * (0.5 + 0.01), -2.0 - 0.1 * (0.25 - 0.02)])
    # first Adam step moves each coordinate by lr·sign(g + wd·x) (bias-corrected m̂/√v̂ = ±1)
    st = optim_update(x, g, z, z, t0, lr=0.1, weight_decay=0.0, kind="adam_l2")
    assert st.param.tolist() == pytest.approx([0.9, -2.1], rel=1e-6)
    assert int(st.step) == 1
    st = optim_update(x, g, z, z, t0, lr=0.1, weight_decay=0.5, kind="adamw")
    assert st.param.tolist() == pytest.approx([1.0 * 0.95 - 0.1, -2.0 * 0.95 - 0.1], rel=1e-6)

"""Gramian baselines: the written .grad equals torchjd's aggregator output (MGDA: the exact min-norm point,
by the support enumeration of tests/balancers/test_min_norm.py); degenerate J is finite."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from kdrun.balancers.base import StepContext
from kdrun.balancers.gradients import Jacobian
from kdrun.balancers.gramian import CAGrad, FairGrad, GramianBalancer, IMTLG, MGDA, NashMTL, PCGrad, UPGrad
from tests.balancers.test_min_norm import brute_force

A = pytest.importorskip("torchjd.aggregation")
# torchjd's own Nash-MTL aggregator (the reference) warns about cvxpy's compilation cache.
pytestmark = pytest.mark.filterwarnings("ignore:.*not DPP.*")

# (balancer factory, torchjd aggregator factory for k objectives)
def exact_mgda(J: torch.Tensor) -> torch.Tensor:
    """Jᵀw* with w* the exact min-norm weights (support enumeration)."""
    return J.T @ torch.from_numpy(brute_force((J @ J.T).numpy())[1])


PAIRS: dict[str, tuple[Callable[[], GramianBalancer], Callable[[int], object]]] = {
    "mgda": (lambda: MGDA(), lambda k: exact_mgda),
    "mgda_frank_wolfe": (lambda: MGDA(solver="frank_wolfe"), lambda k: A.MGDA()),
    "pcgrad": (lambda: PCGrad(seed=3), lambda k: A.PCGrad()),
    "cagrad": (lambda: CAGrad(c=0.4), lambda k: A.CAGrad(c=0.4)),
    "fairgrad": (lambda: FairGrad(alpha=1.0), lambda k: A.FairGrad(alpha=1.0)),
    "imtl": (lambda: IMTLG(), lambda k: A.IMTLG()),
    "nash_mtl": (lambda: NashMTL(), lambda k: A.NashMTL(n_tasks=k)),
    "upgrad": (lambda: UPGrad(), lambda k: A.UPGrad()),
}


def run_balancer(bal: GramianBalancer, J: torch.Tensor, step: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, object]:
    k, n = J.shape
    p = nn.Parameter(torch.zeros(n, dtype=torch.float64))
    names = tuple(f"o{i}" for i in range(k))
    jac = Jacobian(names, J * scale, [p], [], [[] for _ in range(k)], scale)
    ctx = StepContext(step=step, objectives={}, backward=lambda l: None, jacobian=lambda: jac,
                      gradients=lambda d: None)
    res = bal.step(ctx)
    return p.grad / scale, res


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("k", [2, 3])
def test_grad_equals_torchjd_aggregator(name: str, k: int) -> None:
    make_bal, make_agg = PAIRS[name]
    g = torch.Generator().manual_seed(7 + k)
    for trial in range(3):
        J = torch.randn(k, 9, generator=g, dtype=torch.float64)
        J[1] = -0.7 * J[0] + 0.5 * J[1]  # make a conflict likely
        bal = make_bal()
        bal.bind(tuple(f"o{i}" for i in range(k)))
        got, res = run_balancer(bal, J, step=trial)
        if name == "pcgrad":  # the same seeded projection order as the balancer uses
            torch.default_generator.manual_seed(3 * 1_000_003 + trial)
        want = make_agg(k)(J)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-8), (name, trial)
        assert res.weights.shape == (k,) and torch.equal(res.weights, res.raw_weights)


@pytest.mark.parametrize("name", list(PAIRS))
def test_degenerate_jacobians_give_finite_weights(name: str) -> None:
    make_bal, _ = PAIRS[name]
    a = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    z = torch.zeros(4, dtype=torch.float64)
    for J in (torch.stack([z, a]), torch.stack([a, z]), torch.stack([a, a]), torch.stack([z, z]),
              torch.stack([a, -a]), torch.stack([a, 1e-9 * a]), torch.stack([a, z, a])):
        bal = make_bal()
        bal.bind(tuple(f"o{i}" for i in range(len(J))))
        grad, res = run_balancer(bal, J)
        assert torch.isfinite(res.weights).all(), (name, J)
        assert torch.isfinite(grad).all(), (name, J)


@pytest.mark.parametrize("name", ["fairgrad", "nash_mtl", "mgda"])
def test_loss_scale_is_divided_out(name: str) -> None:
    make_bal, _ = PAIRS[name]
    J = torch.tensor([[1.0, 0.5, -0.2], [-0.3, 0.8, 0.1]], dtype=torch.float64)
    b1, b2 = make_bal(), make_bal()
    b1.bind(("a", "b"))
    b2.bind(("a", "b"))
    g1, r1 = run_balancer(b1, J)
    g2, r2 = run_balancer(b2, J, scale=1024.0)
    assert torch.allclose(r1.weights, r2.weights, rtol=1e-4)
    assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-9)


def test_pcgrad_leaves_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    bal = PCGrad()
    bal.bind(("a", "b", "c"))
    run_balancer(bal, torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(torch.rand(3), expected)


def test_nash_state_commits_only_in_after_step() -> None:
    bal = NashMTL()
    bal.bind(("a", "b"))
    J = torch.tensor([[1.0, 0.0], [0.3, 2.0]], dtype=torch.float64)
    before = {k: v.clone() for k, v in bal.state_dict().items()}
    run_balancer(bal, J)
    assert all(torch.equal(before[k], v) for k, v in bal.state_dict().items())
    ctx = StepContext(step=0, objectives={}, backward=lambda l: None, jacobian=lambda: None,
                      gradients=lambda d: None)
    bal.after_step(ctx)
    assert int(bal.solve_step) == 1
    assert not torch.equal(bal.prev_alpha, before["prev_alpha"])


def test_mgda_exact_beats_frank_wolfe_for_three_objectives() -> None:
    """solver=exact reaches the min-norm point where torchjd's Frank-Wolfe (the old default) stops short."""
    g = torch.Generator().manual_seed(11)
    gaps = []
    for step in range(20):
        J = torch.randn(3, 6, generator=g, dtype=torch.float64)
        J[1] = -0.9 * J[0] + 0.2 * J[1]
        exact, _ = run_balancer(_bound(MGDA()), J, step)
        fw, _ = run_balancer(_bound(MGDA(solver="frank_wolfe")), J, step)
        assert torch.allclose(exact, exact_mgda(J), atol=1e-8)
        assert float(exact.norm()) <= float(fw.norm()) + 1e-12
        gaps.append(float((fw - exact).norm() / exact.norm().clamp_min(1e-12)))
    assert max(gaps) > 1e-3


def _bound(bal: GramianBalancer) -> GramianBalancer:
    bal.bind(("a", "b", "c"))
    return bal

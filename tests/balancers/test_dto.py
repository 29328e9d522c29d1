"""DTO-KD: Theorem 3.1 (clipped) vs brute force, the corollaries, amortised/FAMO and Eq. 18 updates."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from kdrun.balancers.base import StepContext
from kdrun.balancers.dto import (
    DEGENERATE_RTOL,
    DTOAmortised,
    DTOExact,
    closed_form_weights,
    eq18_logit_grad,
    famo_logit_grad,
)
from kdrun.balancers.famo import FAMO
from kdrun.balancers.logit_optim import optim_update

# ---------------------------------------------------------------------------------------------------
# Random 2 × n Jacobians of every kind.


def random_jacobians(count: int = 1400, n: int = 6, seed: int = 0) -> tuple[Tensor, list[str]]:
    g = torch.Generator().manual_seed(seed)
    out, kinds = [], []
    cats = ["random", "aligned", "conflicting", "identical", "parallel", "antiparallel",
            "zero_first", "zero_second", "zero_both", "near_identical", "orthogonal"]
    for i in range(count):
        kind = cats[i % len(cats)]
        a = torch.randn(n, generator=g, dtype=torch.float64)
        b = torch.randn(n, generator=g, dtype=torch.float64)
        c = float(torch.rand((), generator=g, dtype=torch.float64)) * 3 + 0.05
        if kind == "aligned":
            b = a + 0.3 * b
        elif kind == "conflicting":
            b = -c * a + 0.3 * b
        elif kind == "identical":
            b = a.clone()
        elif kind == "parallel":
            b = c * a
        elif kind == "antiparallel":
            b = -c * a
        elif kind == "zero_first":
            a = torch.zeros(n, dtype=torch.float64)
        elif kind == "zero_second":
            b = torch.zeros(n, dtype=torch.float64)
        elif kind == "zero_both":
            a = torch.zeros(n, dtype=torch.float64)
            b = torch.zeros(n, dtype=torch.float64)
        elif kind == "near_identical":
            b = a + 1e-7 * b
        elif kind == "orthogonal":
            b = b - (b @ a) / (a @ a) * a
        # norms from 1e-6 to 1e6, independently per row (so up to 1e12 apart)
        sa = 10.0 ** (float(torch.rand((), generator=g)) * 12 - 6)
        sb = sa if kind in ("identical", "near_identical") else 10.0 ** (float(torch.rand((), generator=g)) * 12 - 6)
        if kind in ("parallel", "antiparallel"):
            sb = sa
        out.append(torch.stack([a * sa, b * sb]))
        kinds.append(kind)
    return torch.stack(out), kinds


def brute_force(J: Tensor) -> Tensor:
    """argmin_{p∈[0,1]} ½‖p g₁ + (1−p) g₂‖², computed from J directly (never from G).

    A dense grid locates the minimum; bisection on the sign of the derivative dᵀ(g₂ + p d),
    d = g₁ − g₂ (monotone: the objective is a convex quadratic in p), refines it to ~1e-15.
    """
    g1, g2 = J[:, 0], J[:, 1]
    d = g1 - g2
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    vals = ((g2[:, None, :] + grid[None, :, None] * d[:, None, :]) ** 2).sum(-1)
    idx = vals.argmin(dim=1)
    lo = (grid[idx] - 1e-3).clamp(0, 1)
    hi = (grid[idx] + 1e-3).clamp(0, 1)

    def deriv(p: Tensor) -> Tensor:
        return (d * (g2 + p[:, None] * d)).sum(-1)

    for _ in range(200):
        mid = 0.5 * (lo + hi)
        pos = deriv(mid) > 0
        hi = torch.where(pos, mid, hi)
        lo = torch.where(pos, lo, mid)
    p = 0.5 * (lo + hi)
    p = torch.where(deriv(torch.zeros_like(p)) >= 0, torch.zeros_like(p), p)
    p = torch.where(deriv(torch.ones_like(p)) <= 0, torch.ones_like(p), p)
    return p


def objective(J: Tensor, p: Tensor) -> Tensor:
    return 0.5 * ((p[:, None] * J[:, 0] + (1 - p[:, None]) * J[:, 1]) ** 2).sum(-1)


@pytest.fixture(scope="module")
def cases() -> dict[str, object]:
    J, kinds = random_jacobians()
    G = J @ J.transpose(1, 2)
    pi = torch.stack([closed_form_weights(G[i]) for i in range(len(J))])
    return {"J": J, "G": G, "pi": pi, "kinds": kinds, "bf": brute_force(J)}


def test_closed_form_matches_brute_force(cases: dict) -> None:
    J, G, pi, bf = cases["J"], cases["G"], cases["pi"], cases["bf"]
    assert len(J) >= 1000
    assert torch.allclose(pi.sum(1), torch.ones(len(J), dtype=torch.float64))
    assert (pi >= 0).all() and (pi <= 1).all()
    scale = G[:, 0, 0] + G[:, 1, 1]
    den = ((J[:, 0] - J[:, 1]) ** 2).sum(-1)
    well = den > 1e-8 * scale
    assert well.sum() > 900
    # the weights themselves, where the minimiser is unique and resolvable
    err = (pi[:, 0] - bf).abs()
    assert err[well].max() < 1e-6, f"worst case {cases['kinds'][int(err[well].argmax())]}"
    # wherever the closed form is used: its objective value is the brute-force minimum (this also
    # covers the ill-conditioned cases whose minimiser the brute force cannot pin down to 1e-6)
    f_cf, f_bf = objective(J, pi[:, 0]), objective(J, bf)
    used = den > DEGENERATE_RTOL * scale
    assert ((f_cf - f_bf)[used] <= 1e-12 * scale[used]).all()
    # the degenerate fallback (½, ½): the update is within ‖g₁ − g₂‖ ≤ √(rtol·(g₁₁+g₂₂)) of optimal
    deg = ~used
    assert deg.sum() > 200
    assert torch.equal(pi[deg], torch.full((int(deg.sum()), 2), 0.5, dtype=torch.float64))
    g_cf = pi[:, :1] * J[:, 0] + pi[:, 1:] * J[:, 1]
    g_bf = bf[:, None] * J[:, 0] + (1 - bf[:, None]) * J[:, 1]
    assert ((g_cf - g_bf).norm(dim=1)[deg] <= (DEGENERATE_RTOL * scale[deg]).sqrt() + 1e-300).all()


def test_degenerate_denominator_gives_half(cases: dict) -> None:
    for kind in ("identical", "zero_both"):
        sel = [i for i, k in enumerate(cases["kinds"]) if k == kind]
        assert torch.equal(cases["pi"][sel], torch.full((len(sel), 2), 0.5, dtype=torch.float64))
    # just above the relative tolerance the closed form is used again
    g = torch.tensor([[1.0, 1.0 - 1e-6], [1.0 - 1e-6, 1.0]], dtype=torch.float64)
    assert (g[0, 0] + g[1, 1] - 2 * g[0, 1]) > DEGENERATE_RTOL * 2
    assert torch.allclose(closed_form_weights(g), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_clipping_edges() -> None:
    # g2 = 2 g1: the min-norm point of the segment is g1 (π₁ = 1 after clipping; Eq. 11 gives 2)
    G = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)
    assert torch.equal(closed_form_weights(G), torch.tensor([1.0, 0.0], dtype=torch.float64))
    G = torch.tensor([[4.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
    assert torch.equal(closed_form_weights(G), torch.tensor([0.0, 1.0], dtype=torch.float64))
    # one zero gradient: g* = 0 (all weight on the zero row)
    G = torch.tensor([[0.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    assert torch.equal(closed_form_weights(G), torch.tensor([1.0, 0.0], dtype=torch.float64))
    G = torch.full((2, 2), float("nan"), dtype=torch.float64)
    assert torch.equal(closed_form_weights(G), torch.tensor([0.5, 0.5], dtype=torch.float64))


def theorem_3_1(G: Tensor) -> Tensor:
    """Eq. 11–12 as printed, clipped to [0, 1], with the degenerate rule (½, ½): an independent check of
    closed_form_weights, which is the shared min-norm solver's k = 2 branch."""
    g11, g22, g12 = float(G[0, 0]), float(G[1, 1]), float(G[0, 1])
    den = g11 + g22 - 2 * g12
    if not den > DEGENERATE_RTOL * (g11 + g22):
        return torch.tensor([0.5, 0.5], dtype=torch.float64)
    p1 = min(1.0, max(0.0, (g22 - g12) / den))
    return torch.tensor([p1, 1 - p1], dtype=torch.float64)


def test_closed_form_is_theorem_3_1_as_written(cases: dict) -> None:
    G, pi = cases["G"], cases["pi"]
    for i in range(len(G)):
        assert torch.allclose(pi[i], theorem_3_1(G[i]), rtol=0, atol=1e-12), cases["kinds"][i]
    with pytest.raises(ValueError, match="2x2"):
        closed_form_weights(torch.eye(3, dtype=torch.float64))


def test_corollaries(cases: dict) -> None:
    J, G, pi = cases["J"], cases["G"], cases["pi"]
    g1, g2 = J[:, 0], J[:, 1]
    gs = pi[:, :1] * g1 + pi[:, 1:] * g2
    n1, n2, ns = g1.norm(dim=1), g2.norm(dim=1), gs.norm(dim=1)
    a1, a2 = (gs * g1).sum(1), (gs * g2).sum(1)
    big = torch.maximum(n1, n2) ** 2
    # Cor. 3.2: aligned with both gradients, always (also when clipped)
    assert (a1 >= -1e-9 * big).all() and (a2 >= -1e-9 * big).all()
    den = ((g1 - g2) ** 2).sum(1)
    interior = (pi[:, 0] > 0) & (pi[:, 0] < 1) & (den > 1e-6 * (n1 ** 2 + n2 ** 2))
    assert interior.sum() > 400
    # Cor. 3.3 (interior only): equal contribution = det(G)/‖g1 − g2‖²
    det = G[:, 0, 0] * G[:, 1, 1] - G[:, 0, 1] ** 2
    assert ((a1 - a2).abs()[interior] <= 1e-7 * big[interior]).all()
    # (det(G) cancels for (anti)parallel rows: compare up to rounding relative to the row norms)
    tol = 1e-6 * (det / den).abs() + 1e-10 * big
    assert ((a1 - det / den).abs()[interior] <= tol[interior]).all()
    # ... and it fails when the clip is active
    clipped = (pi[:, 0] == 1) & (den > 0) & (n1 > 0)
    assert ((a1 - a2).abs()[clipped] > 0).any()
    # Cor. 3.4 where it holds (non-conflicting gradients, g12 ≥ 0)
    nonconf = G[:, 0, 1] >= 0
    assert nonconf.sum() > 300
    assert (ns[nonconf] >= torch.minimum(n1, n2)[nonconf] / math.sqrt(2) * (1 - 1e-9)).all()
    # Cor. 3.5 with |‖g1‖ − ‖g2‖|, interior solutions with different norms
    sel = interior & ((n1 - n2).abs() > 1e-9 * torch.maximum(n1, n2))
    bound = n1 * n2 / (n1 - n2).abs()
    assert (ns[sel] <= bound[sel] * (1 + 1e-9)).all()


def test_cor_3_4_fails_for_conflicting_gradients() -> None:
    # Anti-parallel gradients: the min-norm point is 0 < min‖gᵢ‖/√2 (the corollary needs g12 ≥ 0).
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    J = torch.stack([g1, -2 * g1])
    pi = closed_form_weights(J @ J.T)
    assert (pi @ J).norm() < 1e-12


def test_equals_mgda_two_objective_min_norm(cases: dict) -> None:
    from torchjd.aggregation import MGDAWeighting

    J, G, pi = cases["J"], cases["G"], cases["pi"]
    den = ((J[:, 0] - J[:, 1]) ** 2).sum(-1)
    mgda = MGDAWeighting(epsilon=1e-12, max_iters=1000)
    checked = 0
    for i in range(0, len(J), 7):
        if not den[i] > 1e-6 * (G[i, 0, 0] + G[i, 1, 1]):
            continue
        w = mgda(G[i] / G[i].diagonal().sum())
        assert torch.allclose(w, pi[i], atol=1e-6), i
        checked += 1
    assert checked > 100


# ---------------------------------------------------------------------------------------------------
# Exact mode as a balancer: log-space and raw weights.


def test_exact_mode_writes_log_gradient_combination() -> None:
    torch.manual_seed(0)
    theta = nn.Parameter(torch.randn(5))
    a, b = torch.randn(5), torch.randn(5)
    objectives = {"distill": ((theta - a) ** 2).sum() + 0.3, "task": ((theta + b) ** 4).sum() + 2.0}
    from kdrun.balancers.gradients import compute_jacobian

    jac = compute_jacobian(objectives, [theta], retain_graph=True)
    bal = DTOExact()
    bal.bind(("distill", "task"))
    ctx = StepContext(step=0, objectives=objectives, backward=lambda l: l.backward(),
                      jacobian=lambda: jac, gradients=lambda d: compute_jacobian(d, [theta]))
    res = bal.step(ctx)
    L = torch.stack([objectives["distill"], objectives["task"]]).detach().double()
    gl = jac.matrix.double() / L[:, None]  # ∇log L
    pi = closed_form_weights(gl @ gl.T)
    assert torch.allclose(res.weights.double(), pi, atol=1e-6)
    assert torch.allclose(res.raw_weights.double(), pi / L, rtol=1e-6)
    assert torch.allclose(theta.grad.double(), pi @ gl, rtol=1e-5, atol=1e-7)
    assert bal.state_dict() == {}
    DTOExact().bind(("a", "b", "c"))  # Eq. 9 for any k (the k ≥ 3 tests below)
    DTOAmortised().bind(("a", "b", "c"))
    with pytest.raises(Exception, match="at least 2"):
        DTOExact().bind(("a",))


# ---------------------------------------------------------------------------------------------------
# Amortised mode: the ξ update against a hand computation.


def hand_adam(x: list[float], grads: list[list[float]], lr: float, wd: float, decoupled: bool) -> list[float]:
    """Adam by hand in plain floats (β = 0.9, 0.999, ε = 1e-8)."""
    m = [0.0] * len(x)
    v = [0.0] * len(x)
    for t, g in enumerate(grads, start=1):
        if decoupled:
            x = [xi * (1 - lr * wd) for xi in x]
        else:
            g = [gi + wd * xi for gi, xi in zip(g, x)]
        m = [0.9 * mi + 0.1 * gi for mi, gi in zip(m, g)]
        v = [0.999 * vi + 0.001 * gi * gi for vi, gi in zip(v, g)]
        mh = [mi / (1 - 0.9 ** t) for mi in m]
        vh = [vi / (1 - 0.999 ** t) for vi in v]
        x = [xi - lr * mhi / (math.sqrt(vhi) + 1e-8) for xi, mhi, vhi in zip(x, mh, vh)]
    return x


def softmax(x: list[float]) -> list[float]:
    e = [math.exp(v - max(x)) for v in x]
    return [v / sum(e) for v in e]


SEQ = [  # (L(θ_t), L(θ_t+1)) per step, objectives (distill, task)
    ((2.0, 0.5), (1.5, 0.45)),
    ((1.5, 0.45), (1.45, 0.30)),
    ((1.4, 0.31), (1.0, 0.305)),
]


class LeafCtx:
    """A StepContext over leaf loss tensors with given recomputed values."""

    def __init__(self, step: int, before: tuple[float, ...], after: tuple[float, ...]) -> None:
        self.leaves = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in before]
        self.ctx = StepContext(
            step=step, objectives={"distill": self.leaves[0], "task": self.leaves[1]},
            backward=lambda l: l.backward(), jacobian=lambda: None, gradients=lambda d: None,
            recompute_objectives=lambda: {"distill": torch.tensor(after[0], dtype=torch.float64),
                                          "task": torch.tensor(after[1], dtype=torch.float64)})


@pytest.mark.parametrize("optimizer", ["adam_l2", "adamw"])
def test_famo_logit_update_matches_hand_computation(optimizer: str) -> None:
    bal = DTOAmortised(optimizer=optimizer, lr=0.025, weight_decay=0.01)
    bal.bind(("distill", "task"))
    xi, grads = [0.0, 0.0], []
    for t, (before, after) in enumerate(SEQ):
        lc = LeafCtx(t, before, after)
        res = bal.step(lc.ctx)
        pi = softmax(xi)
        # backward: raw weights (π/L)/Σ(π/L) on the raw losses
        r = [p / L for p, L in zip(pi, before)]
        w = [ri / sum(r) for ri in r]
        assert [float(l.grad) for l in lc.leaves] == pytest.approx(w, rel=1e-6)
        assert res.weights.tolist() == pytest.approx(pi, rel=1e-6)
        bal.after_step(lc.ctx)
        delta = [math.log(b) - math.log(a) for b, a in zip(before, after)]
        pd = sum(p * d for p, d in zip(pi, delta))
        grads.append([p * (d - pd) for p, d in zip(pi, delta)])
        xi = hand_adam([0.0, 0.0], grads, 0.025, 0.01, decoupled=optimizer == "adamw")
        assert bal.logits.tolist() == pytest.approx(xi, rel=1e-12, abs=1e-15)
    assert int(bal.optim_step) == len(SEQ)
    # and the same as torch.optim on those gradients
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = (torch.optim.Adam if optimizer == "adam_l2" else torch.optim.AdamW)([p], lr=0.025, weight_decay=0.01)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    assert torch.allclose(p.detach(), bal.logits, rtol=1e-12, atol=1e-15)


def test_famo_logit_grad_is_softmax_vjp() -> None:
    xi = torch.tensor([0.3, -1.2, 0.5], dtype=torch.float64, requires_grad=True)
    delta = torch.tensor([0.1, -0.4, 0.25], dtype=torch.float64)
    (ref,) = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=delta)
    assert torch.allclose(famo_logit_grad(xi.detach(), delta), ref, rtol=1e-12)


def test_eq18_update_matches_hand_computation() -> None:
    bal = DTOAmortised(update="eq18", optimizer="sgd", lr=0.1, weight_decay=0.01)
    bal.bind(("distill", "task"))
    assert not bal.needs_recompute
    xi = [0.0, 0.0]
    for t, (before, _) in enumerate(SEQ):
        lc = LeafCtx(t, before, (float("nan"), float("nan")))  # eq18 must not use L(θ_t+1)
        bal.step(lc.ctx)
        bal.after_step(lc.ctx)
        pi = softmax(xi)
        ell = [math.log(v) for v in before]
        s = sum(p * e for p, e in zip(pi, ell))
        xi = [x - 0.1 * (s * e + 0.01 * x) for x, e in zip(xi, ell)]
        assert bal.logits.tolist() == pytest.approx(xi, rel=1e-12, abs=1e-15)
    # with Adam the same gradient goes through the Adam rule
    ell = torch.tensor([math.log(2.0), math.log(0.5)], dtype=torch.float64)
    g = eq18_logit_grad(torch.zeros(2, dtype=torch.float64), ell)
    assert g.tolist() == pytest.approx([0.0, 0.0], abs=1e-15)  # s = ½(log 2 + log ½) = 0: fixed point


def test_eq18_drives_weight_to_loss_closest_to_one() -> None:
    # both losses above 1: weight flows to the smaller log-loss (the documented fixed-point behaviour)
    xi = torch.zeros(2, dtype=torch.float64)
    ell = torch.tensor([math.log(5.0), math.log(1.5)], dtype=torch.float64)
    for _ in range(2000):
        xi = xi - 0.5 * eq18_logit_grad(xi, ell)
    assert torch.softmax(xi, 0)[1] > 0.95
    # opposite signs: s → 0, πᵢ ∝ 1/|log Lᵢ|
    xi = torch.zeros(2, dtype=torch.float64)
    ell = torch.tensor([math.log(4.0), math.log(0.5)], dtype=torch.float64)
    for _ in range(5000):
        xi = xi - 0.5 * eq18_logit_grad(xi, ell)
    pi = torch.softmax(xi, 0)
    inv = 1 / ell.abs()
    assert torch.allclose(pi, inv / inv.sum(), atol=1e-6)


def test_lagged_uses_next_steps_losses() -> None:
    bal = DTOAmortised(next_loss="lagged")
    bal.bind(("distill", "task"))
    assert not bal.needs_recompute
    lc = LeafCtx(0, (2.0, 0.5), (float("nan"), float("nan")))
    bal.step(lc.ctx)
    bal.after_step(lc.ctx)
    assert torch.equal(bal.logits, torch.zeros(2, dtype=torch.float64))  # first step only stores
    assert bal.prev_losses.tolist() == [2.0, 0.5]
    lc = LeafCtx(1, (1.5, 0.45), (float("nan"), float("nan")))
    bal.step(lc.ctx)
    bal.after_step(lc.ctx)
    delta = torch.tensor([math.log(2.0) - math.log(1.5), math.log(0.5) - math.log(0.45)], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    st = optim_update(zero, famo_logit_grad(zero, delta), zero, zero, torch.zeros((), dtype=torch.int64),
                      lr=0.025, weight_decay=0.01, kind="adamw")  # the default: the papers' AdamW
    assert torch.equal(bal.logits, st.param)
    assert bal.prev_losses.tolist() == [1.5, 0.45]


def test_nonfinite_improvement_skips_update() -> None:
    bal = DTOAmortised()
    bal.bind(("distill", "task"))
    lc = LeafCtx(0, (2.0, 0.5), (float("inf"), 0.4))
    bal.step(lc.ctx)
    bal.after_step(lc.ctx)
    assert torch.equal(bal.logits, torch.zeros(2, dtype=torch.float64))
    assert int(bal.optim_step) == 0


def test_all_reduce_applied_to_state_losses() -> None:
    calls = []

    def fake_all_reduce(t: Tensor) -> Tensor:
        calls.append(t.clone())
        return t * 2  # a stand-in "rank average": the state must see this, not the local value

    bal = DTOAmortised(next_loss="lagged")
    bal.bind(("distill", "task"))
    lc = LeafCtx(0, (2.0, 0.5), (1.0, 1.0))
    lc.ctx.all_reduce_mean = fake_all_reduce
    bal.step(lc.ctx)
    bal.after_step(lc.ctx)
    assert bal.prev_losses.tolist() == [4.0, 1.0]
    assert calls


# ---------------------------------------------------------------------------------------------------
# Toy two-objective quadratic: reaches a Pareto-stationary point.


@pytest.mark.parametrize("factory", [
    lambda: DTOAmortised(), lambda: DTOAmortised(next_loss="lagged"), lambda: DTOExact(), lambda: FAMO(),
])
def test_toy_quadratic_reaches_pareto_stationarity(factory) -> None:
    from kdrun.balancers.gradients import compute_jacobian

    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), 0.5
    theta = nn.Parameter(torch.tensor([3.0, -2.0]))
    opt = torch.optim.SGD([theta], lr=0.05)

    def objs() -> dict[str, Tensor]:
        return {"distill": ((theta - a) ** 2).sum() + c, "task": ((theta - b) ** 2).sum() + c}

    bal = factory()
    bal.bind(("distill", "task"))
    for t in range(600):
        opt.zero_grad(set_to_none=True)
        o = objs()
        cache = {}

        def jac(o=o, cache=cache):
            if "j" not in cache:
                cache["j"] = compute_jacobian(o, [theta])
            return cache["j"]

        def recompute():
            with torch.no_grad():
                return objs()

        ctx = StepContext(step=t, objectives=o, backward=lambda l: l.backward(), jacobian=jac,
                          gradients=lambda d: compute_jacobian(d, [theta]),
                          recompute_objectives=recompute)
        bal.step(ctx)
        opt.step()
        bal.after_step(ctx)
    with torch.no_grad():
        J = torch.stack([2 * (theta - a), 2 * (theta - b)]).double()
    pi = closed_form_weights(J @ J.T)
    assert (pi @ J).norm() < 1e-3


# ---------------------------------------------------------------------------------------------------
# Exact DTO with k ≥ 3 objectives: Eq. 9 on the log-loss Gram matrix vs a brute-force min-norm point.


def brute_force_min_norm(G: Tensor) -> tuple[Tensor, float]:
    """argmin_{w∈Δ} wᵀGw by enumerating every face of the simplex: on the affine hull of face S the
    minimiser is w = e/|S| + Z z with Z a basis of {v on S : Σv = 0} and (ZᵀGZ) z = −ZᵀG e/|S| (pinv:
    one minimiser when it is not unique; a non-unique face minimum is also attained on a smaller face,
    which the enumeration visits too). The best feasible candidate; its objective value is exact."""
    k = G.shape[0]
    best_w, best_f = None, math.inf
    for mask in range(1, 2 ** k):
        s = [i for i in range(k) if mask >> i & 1]
        w0 = torch.zeros(k, dtype=torch.float64)
        w0[s] = 1.0 / len(s)
        z_basis = torch.zeros(k, max(len(s) - 1, 1), dtype=torch.float64)
        for j in range(len(s) - 1):  # e_{s0} − e_{s(j+1)} spans {Σv = 0} on the face
            z_basis[s[0], j], z_basis[s[j + 1], j] = 1.0, -1.0
        w = w0
        if len(s) > 1:
            z = torch.linalg.pinv(z_basis.T @ G @ z_basis) @ (-(z_basis.T @ G @ w0))
            w = w0 + z_basis @ z
        if (w >= -1e-12).all():
            w = w.clamp_min(0) / w.clamp_min(0).sum()
            f = float(w @ G @ w)
            if best_w is None or f < best_f - 1e-15 * abs(best_f):
                best_w, best_f = w, f
    assert best_w is not None
    return best_w, best_f


def simplex_grid_min(G: Tensor, n: int = 120) -> float:
    """The smallest wᵀGw over a dense grid of the 2-simplex (k = 3): a second, cruder reference."""
    a = torch.arange(n + 1, dtype=torch.float64) / n
    w1, w2 = torch.meshgrid(a, a, indexing="ij")
    keep = (w1 + w2) <= 1 + 1e-12
    w = torch.stack([w1[keep], w2[keep], (1 - w1 - w2)[keep].clamp_min(0)], dim=1)
    return float(torch.einsum("ni,ij,nj->n", w, G, w).min())


def three_jacobians(seed: int = 3) -> list[tuple[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(60):
        J = torch.randn(3, 6, generator=g, dtype=torch.float64)
        J = J * (10.0 ** (torch.rand(3, 1, generator=g, dtype=torch.float64) * 6 - 3))  # norms 1e-3 … 1e3 apart
        out.append(("random", J))
    for i in range(20):  # three gradients in a plane: the origin is often in their hull (g* = 0)
        out.append(("planar", torch.randn(3, 2, generator=g, dtype=torch.float64)))
    a, b = torch.randn(2, 6, generator=g, dtype=torch.float64)
    out += [("duplicate", torch.stack([a, b, a])), ("zero_row", torch.stack([a, torch.zeros(6, dtype=torch.float64), b])),
            ("collinear", torch.stack([a, 2 * a, 3 * a])), ("antiparallel", torch.stack([a, -a, b])),
            ("one_dominates", torch.stack([a, a + 1e-3 * b, 10 * b]))]
    return out


def test_three_objective_min_norm_matches_brute_force() -> None:
    checked_weights = 0
    for kind, J in three_jacobians():
        G = J @ J.T
        scale = float(G.diagonal().max())
        w = DTOExact.weights(G)  # the balancer's own rule on a Gram matrix
        assert w.shape == (3,) and w.dtype == torch.float64
        assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-12, kind
        ref_w, ref_f = brute_force_min_norm(G)
        f = float(w @ G @ w)
        assert f <= ref_f + 1e-10 * scale, (kind, f, ref_f)  # the exact minimum, never worse
        assert ref_f <= simplex_grid_min(G) + 1e-12 * scale  # the reference is a minimum (grid can't beat it)
        # weights, where the minimiser is unique (G restricted to {Σv = 0} is positive definite)
        z = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]], dtype=torch.float64).T
        if float(torch.linalg.eigvalsh(z.T @ G @ z).min()) > 1e-6 * scale:
            assert torch.allclose(w, ref_w, atol=1e-7), (kind, w, ref_w)
            checked_weights += 1
        # Cor. 3.2/3.3 generalised (the KKT conditions): ⟨g*, gᵢ⟩ = ‖g*‖² on the support, ≥ off it
        gs = w @ J
        contrib, sq = J @ gs, float(gs @ gs)
        on = w > 1e-9
        assert ((contrib[on] - sq).abs() <= 1e-7 * scale).all(), kind
        assert (contrib[~on] >= sq - 1e-7 * scale).all(), kind
    assert checked_weights >= 60


def test_three_objective_degenerate_cases() -> None:
    a, b = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), torch.tensor([0.0, -1.0, 3.0], dtype=torch.float64)
    # duplicate gradients share their weight equally (the minimum-norm solution of the optimal face)
    w = DTOExact.weights(torch.stack([a, b, a]) @ torch.stack([a, b, a]).T)
    assert abs(float(w[0] - w[2])) < 1e-12
    # a zero gradient takes all the weight: the min-norm point is 0
    J = torch.stack([a, torch.zeros(3, dtype=torch.float64), b])
    assert torch.equal(DTOExact.weights(J @ J.T), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    # all-zero and non-finite G: uniform (every π gives the same update; a non-finite step is skipped)
    third = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert torch.equal(DTOExact.weights(torch.zeros(3, 3, dtype=torch.float64)), third)
    assert torch.equal(DTOExact.weights(torch.full((3, 3), float("nan"), dtype=torch.float64)), third)


def test_exact_with_three_objectives_writes_the_log_gradient_min_norm_point() -> None:
    from kdrun.balancers.gradients import compute_jacobian

    torch.manual_seed(1)
    theta = nn.Parameter(torch.randn(5))
    a, b, c = torch.randn(5), torch.randn(5), torch.randn(5)
    objectives = {"kl": ((theta - a) ** 2).sum() + 0.3, "kd": ((theta + b) ** 4).sum() + 2.0,
                  "task": (theta * c).sum().exp()}
    jac = compute_jacobian(objectives, [theta], retain_graph=True)
    bal = DTOExact()
    bal.bind(("kl", "kd", "task"))
    res = bal.step(StepContext(step=0, objectives=objectives, backward=lambda l: l.backward(),
                               jacobian=lambda: jac, gradients=lambda d: compute_jacobian(d, [theta])))
    L = torch.stack([objectives[n] for n in ("kl", "kd", "task")]).detach().double()
    gl = jac.matrix.double() / L[:, None]  # ∇log L
    ref, _ = brute_force_min_norm(gl @ gl.T)
    assert torch.allclose(res.weights.double(), ref, atol=1e-6)
    assert torch.allclose(res.raw_weights.double(), res.weights.double() / L, rtol=1e-6)
    assert torch.allclose(theta.grad.double(), res.weights.double() @ gl, rtol=1e-5, atol=1e-7)
    assert set(res.extras) == {"clipped", "degenerate"} and float(res.extras["degenerate"]) == 0.0


def test_exact_two_objective_balancer_is_the_closed_form_on_the_log_gram(cases: dict) -> None:
    """k = 2 goes through the same call as k ≥ 3 and is Theorem 3.1 clipped, to 1e-12."""
    for i in range(0, len(cases["G"]), 5):
        G = cases["G"][i]
        assert torch.allclose(DTOExact.weights(G), theorem_3_1(G), rtol=0, atol=1e-12), cases["kinds"][i]


def test_constructor_defaults_are_the_configs() -> None:
    """DTOAmortised() is conf/balancer/dto.yaml (AdamW, the papers' π optimiser); FAMO() is famo.yaml
    (FAMO's Adam-L2), so code that builds the classes directly runs the same method as the configs."""
    import inspect
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "conf" / "balancer"
    for cls, name in ((DTOAmortised, "dto"), (FAMO, "famo"), (DTOExact, "dto_exact")):
        node = OmegaConf.to_container(OmegaConf.load(conf / f"{name}.yaml"))
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
        assert {k: node[k] for k in defaults} == defaults, name
    assert DTOAmortised().optimizer == "adamw" and FAMO().optimizer == "adam_l2"
    assert FAMO().update == "famo" and isinstance(FAMO(), DTOAmortised)

"""min_norm_weights against an exact reference written here: enumeration of every support on the simplex.

The reference: the optimum w* of min wᵀGw over Δ has a support S on which it is the unique minimiser of
the equality-constrained problem (a vertex of the optimal set); for every non-empty S we solve that
problem's KKT system by least squares and keep the feasible (w ≥ 0) candidates. The smallest objective
among them is the exact optimum value — also for singular G, where w* need not be unique (then the
tests compare objective values and the update Jᵀw, which is unique, not w).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kdrun.balancers.min_norm import min_norm_weights


def brute_force(gram: np.ndarray) -> tuple[float, np.ndarray]:
    """(optimal value, one optimal w) by enumerating all 2^k - 1 supports."""
    k = gram.shape[0]
    best_val, best_w = np.inf, None
    for r in range(1, k + 1):
        for s in itertools.combinations(range(k), r):
            kkt = np.zeros((r + 1, r + 1))
            kkt[:r, :r] = gram[np.ix_(s, s)]
            kkt[:r, r] = kkt[r, :r] = 1.0
            rhs = np.zeros(r + 1)
            rhs[r] = 1.0
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:r]
            if np.any(sol < -1e-12):
                continue
            w = np.zeros(k)
            w[list(s)] = np.clip(sol, 0.0, None)
            w /= w.sum()
            val = float(w @ gram @ w)
            if val < best_val:
                best_val, best_w = val, w
    assert best_w is not None
    return best_val, best_w


def check(J: torch.Tensor, rtol: float = 1e-9) -> torch.Tensor:
    """The weights are on Δ, reach the optimum value, and satisfy the KKT conditions."""
    G = (J @ J.T).double()
    w = min_norm_weights(G)
    assert w.dtype == torch.float64 and w.shape == (J.shape[0],)
    assert bool((w >= 0).all()) and abs(float(w.sum()) - 1.0) < 1e-12
    scale = float(G.diagonal().max()) or 1.0
    want, w_ref = brute_force(G.numpy())
    got = float(w @ G @ w)
    assert got <= want + rtol * scale, (got, want)
    # The update Jᵀw is unique (the min-norm point of a convex set) even when w is not.
    d = J.double().T @ w - J.double().T @ torch.from_numpy(w_ref)
    assert float(d.norm()) <= 1e-5 * scale ** 0.5 + 1e-12, float(d.norm())
    # KKT: (Gw)_i >= wᵀGw for every i, with equality on the support (Cor. 3.2: <g*, g_i> >= ||g*||²).
    gw = G @ w
    assert bool((gw >= got - 1e-8 * scale).all())
    return w


@pytest.mark.parametrize("k", [3, 4, 5, 6])
def test_random_conflicting_problems_match_the_enumeration(k: int) -> None:
    g = torch.Generator().manual_seed(100 + k)
    for trial in range(25):
        n = int(torch.randint(2, 12, (1,), generator=g))  # n < k: rank-deficient Gram matrices too
        J = torch.randn(k, n, generator=g, dtype=torch.float64)
        J[1] = -0.8 * J[0] + 0.3 * J[1]  # conflict
        J = J * torch.rand(k, 1, generator=g, dtype=torch.float64).mul(10).exp()  # norms over e^0..e^10
        check(J)


def test_positive_definite_weights_are_unique_and_exact() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        J = torch.randn(4, 30, generator=g, dtype=torch.float64)
        J[2] = -J[0] + 0.1 * J[2]
        w = check(J)
        _, w_ref = brute_force((J @ J.T).numpy())
        assert torch.allclose(w, torch.from_numpy(w_ref), atol=1e-9)


def test_hand_computed_cases() -> None:
    e = torch.eye(3, dtype=torch.float64)
    # Orthonormal gradients: the centroid, ||g*||² = 1/3.
    assert torch.allclose(min_norm_weights(e), torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-12)
    # diag(1, 4, 9): w ∝ 1/Gᵢᵢ = (36, 9, 4)/49.
    w = min_norm_weights(torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)))
    assert torch.allclose(w, torch.tensor([36.0, 9.0, 4.0], dtype=torch.float64) / 49, atol=1e-12)
    # g3 = -(g1 + g2)/2 with g1 ⟂ g2: 0 = (g1 + g2 + 2 g3)/4 is in the hull, w = (1/4, 1/4, 1/2).
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.5, -0.5]], dtype=torch.float64)
    assert torch.allclose(min_norm_weights(J @ J.T), torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64),
                          atol=1e-12)
    # A gradient inside the others' hull far from the origin does not matter: g3 = (g1 + g2)/2 + big.
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]], dtype=torch.float64)
    assert torch.allclose(min_norm_weights(J @ J.T), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64),
                          atol=1e-12)


def test_two_objectives_closed_form() -> None:
    J = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    # g11 = 1, g22 = 2, g12 = 1: w1 = (2 - 1)/(1 + 2 - 2) = 1, i.e. the shorter gradient alone.
    assert torch.equal(min_norm_weights(J @ J.T), torch.tensor([1.0, 0.0], dtype=torch.float64))
    J = torch.tensor([[2.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # g11 = 4, g22 = 2, g12 = -2: w1 = 4/10.
    assert torch.allclose(min_norm_weights(J @ J.T), torch.tensor([0.4, 0.6], dtype=torch.float64), atol=1e-15)
    a = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    same = torch.cat([a, a]) @ torch.cat([a, a]).T
    assert torch.equal(min_norm_weights(same), torch.tensor([0.5, 0.5], dtype=torch.float64))
    for k in (2, 3, 5):
        for seed in range(5):
            J = torch.randn(k, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            check(J)


@pytest.mark.parametrize("case", ["zero_row", "two_zero_rows", "duplicates", "antiparallel", "all_zero",
                                  "scale_ratio", "rank_one", "tiny", "huge"])
def test_degenerate_gram_matrices(case: str) -> None:
    a = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    b = torch.tensor([0.3, 1.0, -1.0, 0.2], dtype=torch.float64)
    c = torch.tensor([-1.0, 0.1, 0.7, -0.4], dtype=torch.float64)
    z = torch.zeros(4, dtype=torch.float64)
    J = {"zero_row": torch.stack([a, z, b]), "two_zero_rows": torch.stack([z, a, z, b]),
         "duplicates": torch.stack([a, b, a, b]), "antiparallel": torch.stack([a, -a, b]),
         "all_zero": torch.stack([z, z, z]), "scale_ratio": torch.stack([1e8 * a, b, 1e-8 * c]),
         "rank_one": torch.stack([a, 2 * a, 3 * a]), "tiny": 1e-150 * torch.stack([a, b, c]),
         "huge": 1e150 * torch.stack([a, b, c])}[case]
    w = min_norm_weights(J @ J.T)
    assert torch.isfinite(w).all() and bool((w >= 0).all()) and abs(float(w.sum()) - 1) < 1e-12
    G = J @ J.T
    if case == "all_zero":
        assert torch.allclose(w, torch.full((3,), 1 / 3, dtype=torch.float64))
        return
    if case in ("zero_row", "two_zero_rows"):  # the zero gradient(s) take all the weight: g* = 0
        assert float(w @ G @ w) == 0.0
        zero = (J.abs().sum(1) == 0)
        assert abs(float(w[zero].sum()) - 1) < 1e-12
    if case == "duplicates":  # equal gradients share their weight
        assert abs(float(w[0] - w[2])) < 1e-9 and abs(float(w[1] - w[3])) < 1e-9
    if case == "antiparallel":  # a and -a: g* = 0 with w = (½, ½, 0)
        assert torch.allclose(w, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64), atol=1e-9)
    if case == "rank_one":  # all along a: the shortest one alone
        assert torch.allclose(w, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-9)
    if case in ("tiny", "huge"):  # scale invariance
        ref = min_norm_weights(torch.stack([a, b, c]) @ torch.stack([a, b, c]).T)
        assert torch.allclose(w, ref, atol=1e-10)
        return
    check(J)


def test_non_finite_and_shape_errors() -> None:
    G = torch.eye(3, dtype=torch.float64)
    G[0, 1] = float("nan")
    assert torch.allclose(min_norm_weights(G), torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.equal(min_norm_weights(torch.ones(1, 1)), torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        min_norm_weights(torch.ones(2, 3))


def test_better_than_frank_wolfe_on_conflicting_problems() -> None:
    """The motivation (issue #11): torchjd's Frank–Wolfe MGDA with its defaults is off; this is not."""
    A = pytest.importorskip("torchjd.aggregation")
    g = torch.Generator().manual_seed(5)
    worse = 0
    for _ in range(30):
        J = torch.randn(3, 8, generator=g, dtype=torch.float64)
        J[1] = -0.9 * J[0] + 0.2 * J[1]
        G = J @ J.T
        fw = A.MGDAWeighting()(G)
        ours = min_norm_weights(G)
        assert float(ours @ G @ ours) <= float(fw @ G @ fw) + 1e-12
        worse += float(fw @ G @ fw) > 1.001 * float(ours @ G @ ours)
    assert worse > 0  # Frank–Wolfe is measurably off somewhere (else this test shows nothing)

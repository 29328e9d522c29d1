"""Feature-space Jacobian (MGDA-UB): Gram from ∂L/∂z, update = one backward of Σ wᵢLᵢ."""
from __future__ import annotations

import torch

from kdrun.balancers.gradients import compute_feature_jacobian


def test_feature_gram_and_update_match_brute_force() -> None:
    torch.manual_seed(0)
    trunk, h1, h2 = torch.nn.Linear(5, 4), torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)
    x = torch.randn(6, 5)
    z = trunk(x)
    objectives = {"a": h1(z).pow(2).mean(), "b": h2(z).sin().mean()}
    calls = []
    jac = compute_feature_jacobian(objectives, z, lambda loss: (calls.append(1), loss.backward()))
    ga = torch.autograd.grad(objectives["a"], z, retain_graph=True)[0].reshape(-1).double()
    gb = torch.autograd.grad(objectives["b"], z, retain_graph=True)[0].reshape(-1).double()
    brute = torch.stack([torch.stack([ga @ ga, ga @ gb]), torch.stack([gb @ ga, gb @ gb])])
    assert torch.allclose(jac.gram(), brute)

    w = torch.tensor([0.3, 0.7])
    ref = torch.autograd.grad(0.3 * objectives["a"] + 0.7 * objectives["b"], trunk.weight, retain_graph=True)[0]
    jac.write_grad(w)
    assert calls == [1]  # exactly one backward
    assert torch.allclose(trunk.weight.grad, ref, atol=1e-6)


def test_feature_gram_sums_rank_grams_over_world_squared() -> None:
    z = torch.randn(3, 2, requires_grad=True)
    objectives = {"a": z.sum(), "b": (2 * z).sum()}
    jac = compute_feature_jacobian(objectives, z, lambda loss: None, all_reduce_sum=lambda t: 2 * t, world_size=2)
    # two identical ranks: (G + G) / 4 = G / 2
    g = torch.tensor([[6.0, 12.0], [12.0, 24.0]], dtype=torch.float64)
    assert torch.allclose(jac.gram(), g / 2)

"""compute_jacobian: the batched (vmapped, ``is_grads_batched``) path equals one backward per objective,
shared/private parameters are split by graph reachability in both, and ``auto`` falls back to the loop."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from kdrun.balancers import gradients
from kdrun.balancers.gradients import JacobianMode, compute_jacobian, reachable_params


def _problem(seed: int = 0) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """A BatchNorm trunk shared by three objectives, a head private to each of two of them, and a
    parameter no objective reaches."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    head_a, head_b, unused = nn.Linear(64, 5), nn.Linear(64, 2), nn.Linear(3, 3)
    x, y = torch.randn(6, 3, 6, 6), torch.randint(0, 5, (6,))
    z = trunk(x)
    objectives = {
        "a": nn.functional.cross_entropy(head_a(z), y),
        "b": head_b(z).tanh().pow(2).mean(),
        "c": z.pow(2).mean() * 0.1,
    }
    params = [*trunk.parameters(), *head_a.parameters(), *head_b.parameters(), *unused.parameters()]
    return objectives, params


def test_reachable_params_finds_exactly_the_leaves_in_the_graph() -> None:
    w, v, u = (torch.randn(3, requires_grad=True) for _ in range(3))
    loss = (w * 2 + v.exp()).sum()
    assert reachable_params(loss) == {id(w), id(v)}
    assert id(u) not in reachable_params(loss)


@pytest.mark.parametrize("seed", range(3))
def test_batched_equals_loop_with_shared_and_private_parameters(seed: int) -> None:
    objs, params = _problem(seed)
    loop = compute_jacobian(objs, params, retain_graph=True, mode=JacobianMode("loop"))
    mode = JacobianMode("batched")
    batched = compute_jacobian(objs, params, mode=mode)
    assert [id(p) for p in batched.shared] == [id(p) for p in loop.shared]
    assert [id(p) for p in batched.private_params] == [id(p) for p in loop.private_params]
    assert len(loop.shared) == 4 and len(loop.private_params) == 4  # conv+BN shared; two heads private
    torch.testing.assert_close(batched.matrix, loop.matrix, rtol=1e-5, atol=1e-7)
    for row_b, row_l in zip(batched.private, loop.private):
        for gb, gl in zip(row_b, row_l):
            assert (gb is None) == (gl is None)  # an objective that misses a head has None, not zeros
            if gb is not None:
                torch.testing.assert_close(gb, gl, rtol=1e-5, atol=1e-7)
    assert mode.mode == "batched"


def test_auto_falls_back_to_the_loop_on_an_error_and_keeps_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    objs, params = _problem()
    ref = compute_jacobian(objs, params, retain_graph=True, mode=JacobianMode("loop"))

    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("Batching rule not implemented for aten::some_op")

    monkeypatch.setattr(gradients, "_batched_grads", broken)
    mode = JacobianMode("auto")
    with pytest.warns(UserWarning, match="not usable for this model .*some_op.*one backward per objective"):
        got = compute_jacobian(objs, params, mode=mode)
    torch.testing.assert_close(got.matrix, ref.matrix)
    assert mode.mode == "loop" and not mode.batched
    with pytest.raises(RuntimeError, match="some_op"):  # an explicit "batched" does not hide the error
        objs2, params2 = _problem()
        compute_jacobian(objs2, params2, mode=JacobianMode("batched"))


def test_auto_falls_back_when_vmap_warns_of_a_slow_per_sample_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    real = gradients._batched_grads

    def slow(*a: object, **k: object) -> object:
        warnings.warn("There is a performance drop because we have not yet implemented the batching "
                      "rule for aten::foo.", UserWarning)
        return real(*a, **k)

    monkeypatch.setattr(gradients, "_batched_grads", slow)
    objs, params = _problem()
    mode = JacobianMode("auto")
    with pytest.warns(UserWarning, match="performance drop"):
        compute_jacobian(objs, params, mode=mode)
    assert mode.mode == "loop"


def test_bad_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="trainer.jacobian='vmap' is not one of loop, batched, auto"):
        JacobianMode("vmap")

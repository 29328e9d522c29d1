"""Cross-batch KD weighting: every branch of Eq. 5–11 against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from kdrun.balancers.base import BalancerConfigError
from kdrun.balancers.cross_batch import CrossBatch, cross_batch_weights, final_weights, qp_weights

from ._helpers import TinyStudent, make_batch, make_ctx


def v(*x: float) -> Tensor:
    return torch.tensor(x, dtype=torch.float64)


def run(g_ce: Tensor, g_kl: Tensor, ref: Tensor, objective: str = "orthogonal", alpha: float = 1.0):
    m = torch.stack([g_ce, g_kl, ref])
    return cross_batch_weights(m @ m.T, objective, alpha)


def hand_final(g_ce: Tensor, g_kl: Tensor, wf: tuple[float, float], alpha: float) -> Tensor:
    """g_final = g₀ + λ g_w with λ = α‖g₀‖/‖g_w‖ (λ = 0 when g_w = 0), by hand from the vectors."""
    g0 = 0.5 * (g_ce + g_kl)
    gw = wf[0] * g_ce + wf[1] * g_kl
    lam = alpha * g0.norm() / gw.norm() if gw.norm() > 0 else 0.0
    return g0 + lam * gw


def combine(res, g_ce: Tensor, g_kl: Tensor) -> Tensor:
    return res.raw[0] * g_ce + res.raw[1] * g_kl


def test_conflicting_signs_interior_root() -> None:
    g_ce, g_kl, ref = v(1.0, 0.0, 0.0), v(-2.0, 1.0, 0.5), v(1.0, 0.5, 0.0)
    u_ce, u_kl = float(g_ce @ ref), float(g_kl @ ref)
    assert u_ce > 0 > u_kl
    res = run(g_ce, g_kl, ref, alpha=0.7)
    p = u_kl / (u_kl - u_ce)
    assert res.w.tolist() == pytest.approx([p, 1 - p], rel=1e-12)
    # constraints: simplex, and the QP's update is orthogonal to the reference
    assert float(res.w.sum()) == pytest.approx(1.0) and (res.w >= 0).all()
    assert float((res.w[0] * g_ce + res.w[1] * g_kl) @ ref) == pytest.approx(0.0, abs=1e-12)
    # Eq. 8–9: both positive → w_kl^final = ‖g_ce‖/‖g_kl‖
    assert res.w_final.tolist() == pytest.approx([1.0, float(g_ce.norm() / g_kl.norm())], rel=1e-12)
    g0 = 0.5 * (g_ce + g_kl)
    gw = g_ce + float(g_ce.norm() / g_kl.norm()) * g_kl
    assert res.lam == pytest.approx(0.7 * float(g0.norm() / gw.norm()), rel=1e-12)
    gf = hand_final(g_ce, g_kl, (1.0, float(g_ce.norm() / g_kl.norm())), 0.7)
    assert torch.allclose(combine(res, g_ce, g_kl), gf, rtol=1e-12)
    cos = float(gf @ ref / (gf.norm() * ref.norm()))
    assert res.cos_final_ref == pytest.approx(cos, rel=1e-12)


def test_agreeing_signs_pick_smaller_u_vertex() -> None:
    g_ce, g_kl, ref = v(2.0, 0.0), v(0.5, 1.0), v(1.0, 0.2)
    assert float(g_ce @ ref) > float(g_kl @ ref) > 0
    res = run(g_ce, g_kl, ref)
    assert res.w.tolist() == [0.0, 1.0]  # KL has the smaller |u|: CE is switched off
    assert res.w_final.tolist() == [0.0, 1.0]  # corner (c): Eq. 9 undefined, g_w ∝ g_kl
    gf = hand_final(g_ce, g_kl, (0.0, 1.0), 1.0)
    assert torch.allclose(combine(res, g_ce, g_kl), gf, rtol=1e-12)
    assert res.lam == pytest.approx(float((0.5 * (g_ce + g_kl)).norm() / g_kl.norm()), rel=1e-12)
    # the other way round: CE has the smaller |u| → KL switched off, w_kl^final = 0, g_w = g_ce
    res = run(v(0.5, 1.0), v(2.0, 0.0), ref)
    assert res.w.tolist() == [1.0, 0.0]
    assert res.w_final.tolist() == [1.0, 0.0]
    # both negative: smaller |u| again
    res = run(v(-2.0, 0.0), v(-0.5, -1.0), ref)
    assert res.w.tolist() == [0.0, 1.0]


def test_align_objective() -> None:
    ref = v(1.0, 0.2)
    res = run(v(2.0, 0.0), v(0.5, 1.0), ref, "align")
    assert res.w.tolist() == [1.0, 0.0]  # larger u: CE
    assert res.w_final.tolist() == [1.0, 0.0]
    res = run(v(-1.0, 0.0), v(0.5, 1.0), ref, "align")
    assert res.w.tolist() == [0.0, 1.0]
    # tie → (½, ½) → interior → ‖g_ce‖/‖g_kl‖
    res = run(v(1.0, 0.0), v(1.0, 1.0), v(1.0, 0.0), "align")
    assert res.w.tolist() == [0.5, 0.5]
    assert res.w_final.tolist() == pytest.approx([1.0, 1 / math.sqrt(2)], rel=1e-12)


@pytest.mark.parametrize("objective", ["orthogonal", "align"])
def test_zero_corners_are_finite(objective: str) -> None:
    z = v(0.0, 0.0, 0.0)
    a, b = v(1.0, 2.0, -1.0), v(-0.5, 0.3, 2.0)
    for g_ce, g_kl, ref in [(a, z, b), (z, a, b), (a, b, z), (z, z, b), (z, z, z), (a, z, z),
                            (a, a, b), (a, -a, a)]:
        res = run(g_ce, g_kl, ref, objective)
        for t in (res.w, res.w_final, res.raw):
            assert torch.isfinite(t).all()
        assert math.isfinite(res.lam) and math.isfinite(res.cos_final_ref)
        assert float(res.w.sum()) == pytest.approx(1.0) and (res.w >= 0).all()
        gw = res.w_final[0] * g_ce + res.w_final[1] * g_kl
        gf = hand_final(g_ce, g_kl, tuple(res.w_final.tolist()), 1.0)
        assert torch.allclose(combine(res, g_ce, g_kl), gf, rtol=1e-12, atol=1e-15)
        if gw.norm() == 0:
            assert res.lam == 0.0


def test_zero_corner_values() -> None:
    a, b, z = v(1.0, 2.0), v(0.5, -3.0), v(0.0, 0.0)
    # g_kl = 0: u_kl = 0 is the root → w = (0, 1) → g_w = g_kl = 0 → λ = 0, g_final = g₀
    res = run(a, z, b)
    assert res.w.tolist() == [0.0, 1.0] and res.lam == 0.0 and res.raw.tolist() == [0.5, 0.5]
    # g_ce = 0: root at w_ce = 1 → g_w = g_ce = 0 → λ = 0
    res = run(z, a, b)
    assert res.w.tolist() == [1.0, 0.0] and res.lam == 0.0
    # reference 0: u = (0, 0) → (½, ½) → both positive → ‖g_ce‖/‖g_kl‖; cos = 0
    res = run(a, b, z)
    assert res.w.tolist() == [0.5, 0.5]
    assert res.w_final[1] == pytest.approx(float(a.norm() / b.norm()))
    assert res.cos_final_ref == 0.0
    # both positive weights but ‖g_kl‖ = 0 (and ref ⟂ g_ce): w_kl^final = 0, no division by zero
    assert final_weights(v(0.5, 0.5), 2.0, 0.0) == (1.0, 0.0)
    assert final_weights(v(0.5, 0.5), 0.0, 2.0) == (1.0, 0.0)
    assert final_weights(v(0.3, 0.7), 2.0, 4.0) == pytest.approx((1.0, 0.5))


def test_qp_root_on_boundary() -> None:
    assert qp_weights(v(0.0, 3.0)).tolist() == [1.0, 0.0]
    assert qp_weights(v(3.0, 0.0)).tolist() == [0.0, 1.0]
    assert qp_weights(v(2.0, 2.0)).tolist() == [0.5, 0.5]
    assert qp_weights(v(-2.0, 2.0)).tolist() == [0.5, 0.5]


def test_balancer_writes_g_final_over_all_parameters() -> None:
    model = TinyStudent(3)
    params = [p for p in model.parameters() if p.requires_grad]
    batch, aux_batch = make_batch(1), make_batch(2)
    # hand reference: full per-objective gradients (zeros where an objective does not reach)
    def full_grad(loss: Tensor) -> Tensor:
        gs = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                          for g, p in zip(gs, params)])

    o = model.objectives(batch)
    g_ce, g_kl = full_grad(o["task"]), full_grad(o["distill"])
    ref = full_grad(model.objectives(aux_batch)["task"])
    for objective in ("orthogonal", "align"):
        bal = CrossBatch(objective=objective, alpha=0.5)
        bal.bind(("distill", "task"))
        model.zero_grad(set_to_none=True)
        ctx = make_ctx(model, 0, batch, aux_batch=aux_batch)
        res = bal.step(ctx)
        hand = run(g_ce, g_kl, ref, objective, 0.5)
        gf = hand.raw[0] * g_ce + hand.raw[1] * g_kl
        got = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                         for p in params])
        assert torch.allclose(got, gf, rtol=1e-5, atol=1e-7)
        assert model.unused.weight.grad is None
        # weights are in objective order (distill, task)
        assert res.weights.tolist() == pytest.approx([float(hand.w[1]), float(hand.w[0])])
        assert res.raw_weights.tolist() == pytest.approx([float(hand.raw[1]), float(hand.raw[0])], rel=1e-6)
        assert set(res.extras) >= {"w_ce", "w_kl", "w_kl_final", "lambda", "cos_final_ref"}
        assert res.extras["cos_final_ref"].item() == pytest.approx(
            float(gf @ ref / (gf.norm() * ref.norm())), rel=1e-5)
        assert bal.state_dict() == {}


def test_needs_task_and_distill() -> None:
    with pytest.raises(BalancerConfigError):
        CrossBatch().bind(("task", "other"))
    with pytest.raises(BalancerConfigError):
        CrossBatch().bind(("task", "distill", "x"))
    assert CrossBatch.needs_aux_batch and not CrossBatch.uses_ddp_backward

"""ViDT token-matching distillation: the release's formula, projectors per token family, gradients."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from kdrun.losses.token_matching import PATCH_TAPS, TokenMatching
from kdrun.models.taps import ModelOutput
from kdrun.projectors.linear import Linear


def _tokens(seed: int, b: int = 2, q: int = 4, levels: int = 3, d: int = 8, requires_grad: bool = False) -> ModelOutput:
    g = torch.Generator().manual_seed(seed)
    feats = {name: torch.randn(b, d, 5 - i, 4 - i // 2, generator=g) for i, name in enumerate(PATCH_TAPS)}
    feats["body_det_tokens"] = torch.randn(b, q, d, generator=g)
    feats["neck_det_tokens"] = torch.randn(b, levels, q, d, generator=g)
    if requires_grad:
        feats = {k: v.requires_grad_() for k, v in feats.items()}
    return ModelOutput(torch.zeros(b, q, 3), feats)


def _shapes(out: ModelOutput) -> dict[str, torch.Size]:
    return {k: v.shape[1:] for k, v in out.features.items()}


def test_matches_the_release_formula() -> None:
    s, t = _tokens(0, requires_grad=True), _tokens(1)
    loss = TokenMatching()
    loss.setup(_shapes(s), _shapes(t))
    value = loss(s, t)
    # the release: Σ_scales mean‖Δpatch‖ + mean‖Δbody‖ + mean_{all layers}‖Δneck‖ · L, then sqrt
    total = 0.0
    for name in PATCH_TAPS:
        a, b = s.features[name], t.features[name]
        bb, c, h, w = a.shape
        total += (a.permute(0, 2, 3, 1).reshape(-1, c) - b.permute(0, 2, 3, 1).reshape(-1, c)).norm(dim=-1).mean()
    total += (s.features["body_det_tokens"] - t.features["body_det_tokens"]).norm(dim=-1).mean()
    neck_s, neck_t = s.features["neck_det_tokens"], t.features["neck_det_tokens"]
    total += (neck_s - neck_t).norm(dim=-1).mean() * neck_s.shape[1]
    assert value.item() == pytest.approx(torch.sqrt(total).item(), rel=1e-6)
    value.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in s.features.values())
    # families can be switched off
    only_patch = TokenMatching(body=False, neck=False)
    only_patch.setup(_shapes(s), _shapes(t))
    assert only_patch(s, t).item() < value.item()
    with pytest.raises(ValueError, match="at least one"):
        TokenMatching(patch=False, body=False, neck=False)


def test_projector_per_family_and_teacher_without_gradient() -> None:
    s, t = _tokens(0, requires_grad=True), _tokens(1, requires_grad=True)
    loss = TokenMatching(projector=functools.partial(Linear, bias=True))
    loss.setup(_shapes(s), _shapes(t))
    assert set(loss.projectors) == {"patch_0", "patch_1", "patch_2", "patch_3", "body", "neck"}
    assert all(isinstance(p, Linear) for p in loss.projectors.values())
    loss(s, t).backward()
    assert all(p.grad is not None for p in loss.parameters())
    assert all(v.grad is None for v in t.features.values())  # the teacher is a target only
    with pytest.raises(RuntimeError, match="setup"):
        TokenMatching()(s, t)


def test_mismatched_token_layouts_are_caught() -> None:
    s, t = _tokens(0, levels=3), _tokens(1, levels=7)
    with pytest.raises(ValueError, match="dec_layers"):
        TokenMatching().setup(_shapes(s), _shapes(t))


def test_on_vidt_models(vidt_pair: tuple) -> None:
    student, teacher, x = vidt_pair
    with torch.no_grad():
        t_out = teacher(x)
    s_out = student(x)
    loss = TokenMatching()
    loss.setup(_shapes(s_out), _shapes(t_out))
    value = loss(s_out, t_out)
    assert value.item() > 0
    value.backward()
    assert student.input_proj[0][0].weight.grad is not None and student.backbone.det_token.grad is not None
    # a student identical to its teacher has (numerically) zero loss and a finite gradient
    twin = copy.deepcopy(teacher)
    out = twin(x)
    same = loss(out, t_out)
    assert same.item() < 1e-5
    same.backward()
    assert all(torch.isfinite(p.grad).all() for p in twin.parameters() if p.grad is not None)


def _linear_out(proj: Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ proj.proj.weight.T + proj.proj.bias


def _patch_rows(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _expected(loss: TokenMatching, s: ModelOutput, t: ModelOutput, patch_keys: list[str]) -> torch.Tensor:
    """The release's formula with kdrun's projectors applied by hand (student side; Linear leaves the
    teacher as it is): sqrt(Σ_scales E‖P_k zs − zt‖ + E‖P_body Δ‖ + Σ_layers E‖P_neck Δ‖)."""
    total = torch.zeros(())
    for key, name in zip(patch_keys, PATCH_TAPS):
        zs, zt = _patch_rows(s.features[name]), _patch_rows(t.features[name])
        total = total + (_linear_out(loss.projectors[key], zs) - zt).norm(dim=-1).mean()
    b_s, b_t = s.features["body_det_tokens"], t.features["body_det_tokens"]
    total = total + (_linear_out(loss.projectors["body"], b_s) - b_t).norm(dim=-1).mean()
    n_s, n_t = s.features["neck_det_tokens"], t.features["neck_det_tokens"]
    for layer in range(n_s.shape[1]):
        total = total + (_linear_out(loss.projectors["neck"], n_s[:, layer]) - n_t[:, layer]).norm(dim=-1).mean()
    return torch.sqrt(total)


def test_per_scale_projectors_are_distinct_and_get_their_own_gradients() -> None:
    s, t = _tokens(0, requires_grad=True), _tokens(1)
    torch.manual_seed(0)
    loss = TokenMatching(projector=functools.partial(Linear, bias=True))
    loss.setup(_shapes(s), _shapes(t))
    keys = [f"patch_{i}" for i in range(4)]
    params = [loss.projectors[k].proj.weight for k in keys]
    assert len({id(p) for p in params}) == 4  # four parameters, not one shared
    assert all(not torch.equal(params[0], p) for p in params[1:])  # independently initialised
    value = loss(s, t)
    torch.testing.assert_close(value, _expected(loss, s, t, keys))
    value.backward()
    # scale i's projector gets exactly the gradient of scale i's term (chain rule through the sqrt)
    for i, (key, name) in enumerate(zip(keys, PATCH_TAPS)):
        w = loss.projectors[key].proj.weight.detach().clone().requires_grad_()
        zs, zt = _patch_rows(s.features[name].detach()), _patch_rows(t.features[name])
        term = (zs @ w.T + loss.projectors[key].proj.bias.detach() - zt).norm(dim=-1).mean()
        (g,) = torch.autograd.grad(term, w)
        torch.testing.assert_close(loss.projectors[key].proj.weight.grad, g / (2 * value.detach()))
    assert all(not torch.allclose(params[0].grad, p.grad) for p in params[1:])


def test_shared_reproduces_the_single_projector_numbers() -> None:
    s, t = _tokens(2, requires_grad=True), _tokens(3)
    torch.manual_seed(0)
    shared = TokenMatching(projector=functools.partial(Linear, bias=True), patch_projectors="shared")
    shared.setup(_shapes(s), _shapes(t))
    assert set(shared.projectors) == {"patch", "body", "neck"}  # the state_dict keys of before
    assert "projectors.patch.proj.weight" in shared.state_dict()
    value = shared(s, t)
    torch.testing.assert_close(value, _expected(shared, s, t, ["patch"] * 4))
    # per-scale projectors that all hold the shared one's weights give the same number
    per = TokenMatching(projector=functools.partial(Linear, bias=True))
    per.setup(_shapes(s), _shapes(t))
    for k in ("body", "neck"):
        per.projectors[k].load_state_dict(shared.projectors[k].state_dict())
    for i in range(4):
        per.projectors[f"patch_{i}"].load_state_dict(shared.projectors["patch"].state_dict())
    torch.testing.assert_close(per(s, t), value)
    # identity projectors (the release): the options coincide and equal the first test's formula
    a, b = TokenMatching(patch_projectors="shared"), TokenMatching()
    a.setup(_shapes(s), _shapes(t))
    b.setup(_shapes(s), _shapes(t))
    assert a(s, t).item() == b(s, t).item()
    with pytest.raises(ValueError, match="patch_projectors"):
        TokenMatching(patch_projectors="one")  # type: ignore[arg-type]

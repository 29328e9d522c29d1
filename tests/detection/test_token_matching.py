"""ViDT token-matching distillation: the release's formula, projectors per token family, gradients."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from kdrun.losses.token_matching import PATCH_TAPS, TokenMatching
from kdrun.models.taps import ModelOutput
from kdrun.models.vidt import vidt_nano
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
    assert set(loss.projectors) == {"patch", "body", "neck"}
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


def test_on_vidt_models() -> None:
    torch.manual_seed(0)
    student = vidt_nano(num_classes=3, det_tokens=6, dec_layers=2)
    teacher = vidt_nano(num_classes=3, det_tokens=6, dec_layers=2).eval()
    x = torch.randn(2, 3, 64, 48)
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

"""VkD's ViDT distillation loss against a re-derivation of roymiles/vkd vidt/methods/vidt/criterion.py
(lines 284-331) and vidt/main.py's OrthogonalLinear (lines 29-44), written out here."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from kdrun.losses.token_matching import PATCH_TAPS
from kdrun.losses.vkd_detection import VkDDetection, standardise_rows, vkd_distance
from kdrun.models.taps import ModelOutput
from kdrun.projectors.orthogonal import Orthogonal
from tests.conftest import compose_cfg

VKD_PROJECTOR = functools.partial(Orthogonal, teacher_norm="none", affine=True)


def _tokens(seed: int, b: int = 2, q: int = 5, levels: int = 3, d: int = 6, requires_grad: bool = False) -> ModelOutput:
    g = torch.Generator().manual_seed(seed)
    feats = {name: torch.randn(b, d, 5 - i, 4 - i // 2, generator=g) * (1 + i) + i for i, name in enumerate(PATCH_TAPS)}
    feats["body_det_tokens"] = torch.randn(b, q, d, generator=g) * 3
    feats["neck_det_tokens"] = torch.randn(b, levels, q, d, generator=g) - 2
    if requires_grad:
        feats = {k: v.requires_grad_() for k, v in feats.items()}
    return ModelOutput(torch.zeros(b, q, 3), feats)


def _shapes(out: ModelOutput) -> dict[str, torch.Size]:
    return {k: v.shape[1:] for k, v in out.features.items()}


def _vkd_reference(loss: VkDDetection, s: ModelOutput, t: ModelOutput, projected: bool) -> torch.Tensor:
    """criterion.py lines 289-331, with detector.py lines 268-288's student projections, literally:
    the neck is flattened as the release's hs [L, B, Q, C] -> view(l*b*d, c)."""
    def project(key: str, x: torch.Tensor) -> torch.Tensor:
        if not projected:
            return x
        p = loss.projectors[key]
        return p.scale * (x @ p.weight.T) + p.shift  # OrthogonalLinear: weight * projector(x) + bias

    def std(x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(0)) / x.std(0)

    distil_loss = torch.zeros(())
    for i, name in enumerate(PATCH_TAPS):
        patch, teacher_patch = s.features[name], t.features[name]
        b, c, w, h = patch.shape
        patch = project(f"patch_{i}", patch.permute(0, 2, 3, 1).contiguous().view(b * w * h, c))
        teacher_patch = teacher_patch.permute(0, 2, 3, 1).contiguous().view(b * w * h, c).detach()
        distil_loss = distil_loss + F.smooth_l1_loss(std(patch), std(teacher_patch))
    body, teacher_body = s.features["body_det_tokens"], t.features["body_det_tokens"]
    b, d, c = teacher_body.shape
    body = project("body", body.contiguous().view(b * d, c))
    distil_loss = distil_loss + F.smooth_l1_loss(std(body), std(teacher_body.contiguous().view(b * d, c).detach()))
    neck, teacher_neck = (s.features["neck_det_tokens"].transpose(0, 1),  # kdrun [B, L, Q, C] -> hs [L, B, Q, C]
                          t.features["neck_det_tokens"].transpose(0, 1))
    l, b, d, c = teacher_neck.shape
    neck = project("neck", neck.contiguous().view(l * b * d, c))
    distil_loss = distil_loss + F.smooth_l1_loss(std(neck), std(teacher_neck.contiguous().view(l * b * d, c).detach()))
    return distil_loss


def test_standardisation_and_distance_by_hand() -> None:
    # one channel, three rows: s = (0, 1, 2) -> mean 1, unbiased std 1 -> (-1, 0, 1);
    # t = (0, 0, 3) -> mean 1, unbiased std sqrt(6/2) = sqrt(3) -> (-1, -1, 2)/sqrt(3)
    s, t = torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[0.0], [0.0], [3.0]])
    torch.testing.assert_close(standardise_rows(s), torch.tensor([[-1.0], [0.0], [1.0]]))
    r3 = math.sqrt(3.0)
    d = [-1 + 1 / r3, 1 / r3, 1 - 2 / r3]  # all |d| < 1: smooth-L1 = d² / 2
    assert vkd_distance(s, t).item() == pytest.approx(sum(0.5 * x * x for x in d) / 3, rel=1e-6)
    # |d| > beta: the linear branch |d| - beta/2
    big = torch.tensor([[0.0], [10.0]]), torch.tensor([[10.0], [0.0]])
    # both standardise to ±1/sqrt(2) with opposite signs: |d| = sqrt(2) > 1
    assert vkd_distance(*big).item() == pytest.approx(math.sqrt(2) - 0.5, rel=1e-6)
    # eps (not VkD's) only enters the divisor
    torch.testing.assert_close(standardise_rows(s, eps=1.0), torch.tensor([[-0.5], [0.0], [0.5]]))


@pytest.mark.parametrize("projected", [False, True])
def test_matches_vkd_criterion(projected: bool) -> None:
    s, t = _tokens(0, requires_grad=True), _tokens(1)
    torch.manual_seed(0)
    loss = VkDDetection(projector=VKD_PROJECTOR if projected else None)
    loss.setup(_shapes(s), _shapes(t))
    if projected:
        assert set(loss.projectors) == {"patch_0", "patch_1", "patch_2", "patch_3", "body", "neck"}
        with torch.no_grad():  # move scale/bias off their init so the reference exercises them
            for p in loss.projectors.values():
                p.scale.uniform_(0.5, 2.0)
                p.shift.normal_()
    value = loss(s, t)
    ref = _vkd_reference(loss, s, t, projected)
    torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-6)
    (g_ref,) = torch.autograd.grad(ref, s.features["neck_det_tokens"], retain_graph=True)
    value.backward()
    torch.testing.assert_close(s.features["neck_det_tokens"].grad, g_ref, rtol=1e-4, atol=1e-7)
    # the neck is one set of rows over all decoder outputs, not a sum of per-layer terms
    per_layer = sum(vkd_distance(s.features["neck_det_tokens"][:, i].reshape(-1, 6).detach(),
                                 t.features["neck_det_tokens"][:, i].reshape(-1, 6)) for i in range(3))
    only_neck = VkDDetection(patch=False, body=False)
    only_neck.setup(_shapes(s), _shapes(t))
    assert abs(only_neck(s, t).item() - float(per_layer)) > 1e-4


def test_projector_scale_and_bias_are_cancelled_by_the_standardisation() -> None:
    s, t = _tokens(2, requires_grad=True), _tokens(3)
    torch.manual_seed(1)
    loss = VkDDetection(projector=VKD_PROJECTOR)
    loss.setup(_shapes(s), _shapes(t))
    before = loss(s, t)
    with torch.no_grad():
        for p in loss.projectors.values():
            p.scale.mul_(3.0)
            p.shift.add_(5.0)
    after = loss(s, t)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    after.backward()
    for p in loss.projectors.values():
        assert p.scale.grad.abs().max() < 1e-5 and p.shift.grad.abs().max() < 1e-5
        assert p.proj.parametrizations.weight.original.grad.abs().max() > 1e-4  # W does learn
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in s.features.values())


def test_degenerate_inputs() -> None:
    s, t = _tokens(4, requires_grad=True), _tokens(5)
    loss = VkDDetection()
    loss.setup(_shapes(s), _shapes(t))
    # a student equal to its teacher: zero loss, zero (finite) gradient
    same = ModelOutput(s.logits, {k: v.detach().clone().requires_grad_() for k, v in t.features.items()})
    zero = loss(same, t)
    assert zero.item() == 0.0
    zero.backward()
    assert all(torch.equal(v.grad, torch.zeros_like(v)) for v in same.features.values())
    # a channel constant over the rows divides by a zero std, as in VkD's code (the engine skips such a
    # step); eps > 0 keeps it finite
    const = ModelOutput(s.logits, dict(s.features))
    const.features["body_det_tokens"] = torch.ones_like(s.features["body_det_tokens"])
    assert not torch.isfinite(loss(const, t))
    safe = VkDDetection(eps=1e-5)
    safe.setup(_shapes(s), _shapes(t))
    assert torch.isfinite(safe(const, t))
    with pytest.raises(ValueError, match="at least one"):
        VkDDetection(patch=False, body=False, neck=False)


def test_on_vidt_models_and_config(vidt_pair: tuple) -> None:
    student, teacher, x = vidt_pair
    with torch.no_grad():
        t_out = teacher(x)
    s_out = student(x)
    cfg = compose_cfg(["teacher=vidt_small", "student=vidt_nano", "task=detection", "dataset=coco_synthetic",
                       "distill=token_matching_vkd", "projector=orthogonal", "projector.teacher_norm=none",
                       "projector.affine=true"])
    from hydra.utils import instantiate

    from kdrun.config import validate

    validate(cfg)
    node = dict(cfg.distill.token_matching_vkd)
    node.pop("weight")  # the engine's, not the term's
    term = instantiate(node, _convert_="all")
    assert isinstance(term, VkDDetection) and term.beta == 1.0 and term.eps == 0.0
    assert cfg.distill.token_matching_vkd.weight == 4.0
    term.setup(_shapes(s_out), _shapes(t_out))
    assert all(isinstance(p, Orthogonal) and p.scale is not None for p in term.projectors.values())
    value = term(s_out, t_out)
    assert torch.isfinite(value) and value.item() > 0
    value.backward()
    assert student.input_proj[0][0].weight.grad is not None and student.backbone.det_token.grad is not None

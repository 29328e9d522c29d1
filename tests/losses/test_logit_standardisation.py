"""Logit standardisation (Sun et al., CVPR 2024; issue #25 item 1): ``KL(standardize=True)`` and
``DKD(standardize=True)`` against the official code on the same inputs, value and gradient.

The reference is the official code (sunshangquan/logit-standardization-KD @ f6e5aa5), transcribed below
operation for operation in the order it runs, each function citing its file and lines (the repository
carries no licence, so its text is restated rather than pasted). Where torch has changed since (its
``size_average=False`` is the deprecated spelling of ``reduction="sum"``; ``keepdims`` of ``keepdim``),
the transcription uses the current spelling of the same operation.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

from kdrun.config import validate_target_node
from kdrun.engine.build import build_distill
from kdrun.losses._common import standardize_logits
from kdrun.losses.dkd import DKD, dkd_loss
from kdrun.losses.kl import KL, kl_divergence
from kdrun.models.taps import ModelOutput
from tests.conftest import compose_cfg

# --------------------------------------------------------------------------------------------------
# The reference: sunshangquan/logit-standardization-KD @ f6e5aa5, mdistiller/distillers/.


def official_normalize(logit: Tensor) -> Tensor:
    """KD.py lines 7-10 (DKD.py lines 7-10 are the same): mean and ``torch.std`` (unbiased) over the last
    dimension, ``(logit - mean) / (1e-7 + stdv)``."""
    mean = logit.mean(dim=-1, keepdim=True)
    stdv = logit.std(dim=-1, keepdim=True)
    return (logit - mean) / (1e-7 + stdv)


def official_kd_loss(logits_student_in: Tensor, logits_teacher_in: Tensor, temperature: float,
                     logit_stand: bool) -> Tensor:
    """KD.py lines 12-19."""
    logits_student = official_normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = official_normalize(logits_teacher_in) if logit_stand else logits_teacher_in
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss_kd * temperature ** 2


def _gt_mask(logits: Tensor, target: Tensor) -> Tensor:  # DKD.py lines 42-45
    return torch.zeros_like(logits).scatter_(1, target.reshape(-1).unsqueeze(1), 1).bool()


def _other_mask(logits: Tensor, target: Tensor) -> Tensor:  # DKD.py lines 48-51
    return torch.ones_like(logits).scatter_(1, target.reshape(-1).unsqueeze(1), 0).bool()


def _cat_mask(t: Tensor, mask1: Tensor, mask2: Tensor) -> Tensor:  # DKD.py lines 54-58
    return torch.cat([(t * mask1).sum(dim=1, keepdim=True), (t * mask2).sum(1, keepdim=True)], dim=1)


def official_dkd_loss(logits_student_in: Tensor, logits_teacher_in: Tensor, target: Tensor, alpha: float,
                      beta: float, temperature: float, logit_stand: bool) -> Tensor:
    """DKD.py lines 12-39 (``size_average=False`` = ``reduction="sum"``)."""
    logits_student = official_normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = official_normalize(logits_teacher_in) if logit_stand else logits_teacher_in
    gt_mask = _gt_mask(logits_student, target)
    other_mask = _other_mask(logits_student, target)
    pred_student = _cat_mask(F.softmax(logits_student / temperature, dim=1), gt_mask, other_mask)
    pred_teacher = _cat_mask(F.softmax(logits_teacher / temperature, dim=1), gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * (temperature ** 2) / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
                 * (temperature ** 2) / target.shape[0])
    return alpha * tckd_loss + beta * nckd_loss


# --------------------------------------------------------------------------------------------------
# helpers

ATOL, RTOL = 1e-6, 1e-5  # fp32; measured here: max |Δ| ≤ 1.5e-6 on values ≈ 1-8, ≤ 3e-9 on gradients


def out(logits: Tensor, **features: Tensor) -> ModelOutput:
    return ModelOutput(logits, dict(features))


LossOf = Callable[[Tensor], Tensor]  # a loss as a function of the student logits


def value_and_grad(fn: LossOf, zs: Tensor) -> tuple[Tensor, Tensor]:
    zs = zs.detach().clone().requires_grad_(True)
    loss = fn(zs)
    (grad,) = torch.autograd.grad(loss, zs)
    return loss.detach(), grad


def assert_same_value_and_grad(ours: LossOf, theirs: LossOf, zs: Tensor, grad_rtol: float = RTOL) -> None:
    v_ours, g_ours = value_and_grad(ours, zs)
    v_theirs, g_theirs = value_and_grad(theirs, zs)
    assert torch.isfinite(v_ours) and torch.isfinite(g_ours).all()
    torch.testing.assert_close(v_ours, v_theirs, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(g_ours, g_theirs, atol=ATOL, rtol=grad_rtol)


def logits(seed: int, b: int = 16, c: int = 100, scale: float = 3.0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, c, generator=g) * scale
    zt = torch.randn(b, c, generator=g) * scale * 2 + 1.0
    return zs, zt, torch.randint(0, c, (b,), generator=g)


# --------------------------------------------------------------------------------------------------
# The standardisation itself


def test_standardize_is_the_official_normalize_with_the_unbiased_std() -> None:
    zs, _, _ = logits(0)
    z = standardize_logits(zs)
    torch.testing.assert_close(z, official_normalize(zs), atol=0.0, rtol=0.0)
    torch.testing.assert_close(z.mean(-1), torch.zeros(16), atol=1e-6, rtol=0.0)
    # unbiased: the (C − 1) std of the output is 1 (up to ε); the biased one is √((C−1)/C)
    torch.testing.assert_close(z.std(-1, correction=1), torch.ones(16), atol=1e-5, rtol=0.0)
    assert not torch.allclose(z.std(-1, correction=0), torch.ones(16), atol=1e-3)


# --------------------------------------------------------------------------------------------------
# Against the official losses, value and gradient w.r.t. the student logits


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_standardized_matches_official_kd_loss(temperature: float) -> None:
    zs, zt, _ = logits(1)
    kl = KL(temperature=temperature, standardize=True)
    assert_same_value_and_grad(lambda s: kl(out(s), out(zt), torch.zeros(16)),
                               lambda s: official_kd_loss(s, zt, temperature, True), zs)


@pytest.mark.parametrize("temperature,beta", [(2.0, 8.0), (4.0, 2.0)])
def test_dkd_standardized_matches_official_dkd_loss(temperature: float, beta: float) -> None:
    zs, zt, y = logits(2)
    dkd = DKD(alpha=1.0, beta=beta, temperature=temperature, standardize=True)
    assert_same_value_and_grad(lambda s: dkd(out(s), out(zt), y),
                               lambda s: official_dkd_loss(s, zt, y, 1.0, beta, temperature, True), zs)


def test_the_distillation_token_path_standardizes_dist_logits() -> None:
    # DeiT's distillation token (conf/distill/kl_deit.yaml): the student's dist_logits are standardised,
    # its class-token logits are not read.
    zs, zt, _ = logits(3)
    kl = KL(temperature=1.0, student_logits="dist_logits", standardize=True)
    assert_same_value_and_grad(lambda s: kl(out(torch.full_like(s, float("nan")), dist_logits=s), out(zt),
                                            torch.zeros(16)),
                               lambda s: official_kd_loss(s, zt, 1.0, True), zs)


def test_standardized_loss_ignores_the_logits_scale_and_shift() -> None:
    # The point of the method (paper §3): only the logits' relations count, not their range or offset.
    zs, zt, y = logits(4)
    for loss in (KL(temperature=2.0, standardize=True), DKD(temperature=2.0, standardize=True)):
        base = loss(out(zs), out(zt), y)
        moved = loss(out(5.0 * zs - 3.0), out(0.25 * zt + 7.0), y)
        torch.testing.assert_close(moved, base, atol=1e-5, rtol=1e-5)
        plain = type(loss)(temperature=2.0)
        assert not torch.allclose(plain(out(5.0 * zs - 3.0), out(zt), y), plain(out(zs), out(zt), y))


# --------------------------------------------------------------------------------------------------
# Degenerate inputs: the same numbers as the official code, and finite


@pytest.mark.parametrize("case", ["constant_student", "constant_both", "zeros_student", "batch_of_1",
                                  "large", "large_offset"])
def test_degenerate_inputs_match_official_and_stay_finite(case: str) -> None:
    zs, zt, y = logits(5, b=4, c=10)
    if case == "constant_student":  # std 0: the ε keeps 0/0 away; torch's std backward is 0 there
        zs = torch.full_like(zs, 3.7)
    elif case == "constant_both":
        zs, zt = torch.full_like(zs, 3.7), torch.full_like(zt, -1.3)
    elif case == "zeros_student":  # a zero-initialised head: standardised exactly 0, the uniform student
        zs = torch.zeros_like(zs)
    elif case == "batch_of_1":  # the statistics are per sample, over the classes: one sample is enough
        zs, zt, y = zs[:1], zt[:1], y[:1]
    elif case == "large":
        zs, zt = zs * 1e4, zt * 1e4
    elif case == "large_offset":
        zs, zt = zs + 1e4, zt - 1e4
    # A constant student has std 0, where the gradient is 1/ε = 1e7 times an O(1) quantity (the next
    # test): fp32 rounding of that quantity (log-softmax here, softmax there) shows at 1e-5 relative.
    grad_rtol = 1e-4 if case in ("constant_student", "constant_both", "zeros_student") else RTOL
    kl = KL(temperature=2.0, standardize=True)
    dkd = DKD(temperature=2.0, standardize=True)
    assert_same_value_and_grad(lambda s: kl(out(s), out(zt), y), lambda s: official_kd_loss(s, zt, 2.0, True), zs,
                               grad_rtol)
    assert_same_value_and_grad(lambda s: dkd(out(s), out(zt), y),
                               lambda s: official_dkd_loss(s, zt, y, 1.0, 8.0, 2.0, True), zs, grad_rtol)


def test_zero_student_logits_get_the_derivative_of_the_standardisation_at_zero() -> None:
    # At z = 0 the map is z ↦ z / (ε + std(z)) with std(z) = O(|z|): its derivative is I/ε on the centred
    # direction, so the gradient is the centred upstream gradient times 1e7 (finite: training proceeds
    # from a zero-initialised head instead of skipping every step as non-finite).
    _, zt, _ = logits(6, b=3, c=10)
    zs = torch.zeros(3, 10, requires_grad=True)
    loss = kl_divergence(zs, zt, 2.0, standardize=True)
    (grad,) = torch.autograd.grad(loss, zs)
    u = torch.zeros(3, 10, requires_grad=True)  # the loss as a function of the standardised logits, at 0
    (upstream,) = torch.autograd.grad(kl_divergence(u, standardize_logits(zt), 2.0), u)
    torch.testing.assert_close(grad, (upstream - upstream.mean(-1, keepdim=True)) / 1e-7, rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# Off by default: the old results unchanged


def test_standardize_false_is_the_previous_loss() -> None:
    zs, zt, y = logits(7)
    T = 4.0
    # kl.py's kl_divergence before issue #25, written out: the same operations, so the same bits.
    before = F.kl_div(F.log_softmax(zs / T, dim=-1), F.log_softmax(zt / T, dim=-1), reduction="batchmean",
                      log_target=True) * (T * T)
    assert torch.equal(KL()(out(zs), out(zt), y), before)
    assert torch.equal(KL(standardize=False)(out(zs), out(zt), y), before)
    assert torch.equal(DKD(standardize=False)(out(zs), out(zt), y), dkd_loss(zs, zt, y, 1.0, 8.0, 4.0))
    assert torch.equal(DKD()(out(zs), out(zt), y), dkd_loss(zs, zt, y, 1.0, 8.0, 4.0))
    # and both still agree with the official code run without --logit-stand
    assert_same_value_and_grad(lambda s: KL()(out(s), out(zt), y), lambda s: official_kd_loss(s, zt, T, False), zs)
    assert_same_value_and_grad(lambda s: DKD()(out(s), out(zt), y),
                               lambda s: official_dkd_loss(s, zt, y, 1.0, 8.0, T, False), zs)
    assert not torch.allclose(KL(standardize=True)(out(zs), out(zt), y), before)


# --------------------------------------------------------------------------------------------------
# Wiring: the named options, composed and built as a run builds them


@pytest.mark.parametrize("option,cls,temperature", [("kl_ls", KL, 2.0), ("dkd_ls", DKD, 2.0)])
def test_named_option_builds_a_standardizing_term(option: str, cls: type, temperature: float) -> None:
    cfg = compose_cfg([f"distill={option}"])
    name = option.removesuffix("_ls")
    validate_target_node(f"distill.{name}", cfg.distill[name], extra_keys=("weight",))
    terms, weights = build_distill(cfg)
    term = terms[name]
    assert isinstance(term, cls) and term.standardize is True and term.temperature == temperature
    assert weights == {name: 9.0}
    zs, zt, y = logits(8)
    if cls is KL:
        expected = official_kd_loss(zs, zt, 2.0, True)
    else:
        expected = official_dkd_loss(zs, zt, y, 1.0, 8.0, 2.0, True)  # warm-up: DKD.py line 80, not compared
        term.warmup_epochs = 0.0
    torch.testing.assert_close(term(out(zs), out(zt), y), expected, atol=ATOL, rtol=RTOL)
    # the base options keep it off, and a plain override turns it on (the key is listed)
    assert compose_cfg([f"distill={name}"]).distill[name].standardize is False
    on = compose_cfg([f"distill={name}", f"distill.{name}.standardize=true"])
    assert build_distill(on)[0][name].standardize is True


def test_kl_deit_with_standardize_override_reads_dist_logits() -> None:
    cfg = compose_cfg(["distill=kl_deit", "distill.kl.standardize=true"])
    term = build_distill(cfg)[0]["kl"]
    assert term.student_logits == "dist_logits" and term.standardize and term.temperature == 1.0
    zs, zt, _ = logits(9)
    got = term(out(torch.zeros_like(zs), dist_logits=zs), out(zt), torch.zeros(16))
    torch.testing.assert_close(got, official_kd_loss(zs, zt, 1.0, True), atol=ATOL, rtol=RTOL)


def test_standardize_must_be_a_bool() -> None:
    from kdrun.config import ConfigError

    node = OmegaConf.create({"_target_": "kdrun.losses.kl.KL", "standardize": "sometimes"})
    with pytest.raises(ConfigError, match="standardize"):
        validate_target_node("distill.kl", node)

"""Distillation terms: hand-computed values, minima, finite gradients, batch structure, configs.

Batch structure: every term returns a batch mean; for per-sample terms that means the loss on a batch
equals the loss on the batch duplicated. DIST is relational but still duplication invariant; PKT keeps
the peers' mean over the B×B matrix, so duplication halves it; RKD (the √ε distance between copies enters its mean distance) and CRD (random negatives, a memory the
batch updates) are not, so for them other properties are checked.
"""
from __future__ import annotations

import functools
import inspect
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor

from kdrun.config import validate_target_node
from kdrun.losses._common import warmup_factor
from kdrun.losses.at import AT
from kdrun.losses.base import DataInfo, DistillLoss
from kdrun.losses.crd import CRD, nce_loss
from kdrun.losses.dist import DIST
from kdrun.losses.dkd import DKD
from kdrun.losses.fitnet import FitNet
from kdrun.losses.kdsvd import KDSVD
from kdrun.losses.normalized_l1 import NormalizedL1
from kdrun.losses.ofd import OFD, ofd_stage_loss
from kdrun.losses.pkt import PKT
from kdrun.losses.reviewkd import ReviewKD, hcl_loss
from kdrun.losses.rkd import RKD
from kdrun.losses.smooth_l1 import SmoothL1
from kdrun.models.taps import ModelOutput
from kdrun.projectors.identity import Identity
from kdrun.projectors.linear import Linear
from kdrun.projectors.orthogonal import Orthogonal
from tests.conftest import compose_cfg

REPO = Path(__file__).resolve().parents[2]
DISTILL_YAMLS = sorted((REPO / "conf" / "distill").glob("*.yaml"))

# --------------------------------------------------------------------------------------------------
# helpers


def out(logits: Tensor | None = None, **features: Tensor) -> ModelOutput:
    if logits is None:
        logits = torch.zeros(next(iter(features.values())).shape[0], 2)
    return ModelOutput(logits, dict(features))


def shapes(o: ModelOutput) -> dict[str, torch.Size]:
    d = {k: v.shape[1:] for k, v in o.features.items()}
    d["logits"] = o.logits.shape[1:]
    return d


def dup(o: ModelOutput) -> ModelOutput:
    return ModelOutput(torch.cat([o.logits, o.logits]), {k: torch.cat([v, v]) for k, v in o.features.items()})


def with_grad(o: ModelOutput) -> ModelOutput:
    return ModelOutput(o.logits.detach().clone().requires_grad_(True),
                       {k: v.detach().clone().requires_grad_(True) for k, v in o.features.items()})


def assert_finite_grads(loss_fn: DistillLoss, s: ModelOutput, t: ModelOutput, target: Tensor, **kw: Any) -> None:
    s = with_grad(s)
    loss = loss_fn(s, t, target, **kw)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [x.grad for x in [s.logits, *s.features.values()] if x.grad is not None]
    grads += [p.grad for p in loss_fn.parameters() if p.grad is not None]
    assert grads, "no gradient reached the student"
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def maps(b: int, channels: tuple[int, ...], sizes: tuple[int, ...], seed: int, relu: bool = True) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    out_ = {}
    for i, (c, s) in enumerate(zip(channels, sizes)):
        x = torch.randn(b, c, s, s, generator=g)
        out_[f"stage{i + 1}"] = x.relu() if relu else x
    return out_


# --------------------------------------------------------------------------------------------------
# DKD


def test_dkd_hand_computed() -> None:
    zs, zt, y, T = [1.0, 2.0, 3.0], [3.0, 1.0, 0.0], 0, 1.0
    ps = [math.exp(v) / sum(math.exp(u) for u in zs) for v in zs]
    pt = [math.exp(v) / sum(math.exp(u) for u in zt) for v in zt]
    bs, bt = [ps[0], 1 - ps[0]], [pt[0], 1 - pt[0]]
    tckd = sum(b * math.log(b / a) for a, b in zip(bs, bt))
    qs = [p / (1 - ps[0]) for p in ps[1:]]
    qt = [p / (1 - pt[0]) for p in pt[1:]]
    nckd = sum(b * math.log(b / a) for a, b in zip(qs, qt))
    loss = DKD(alpha=1.0, beta=8.0, temperature=T)(out(torch.tensor([zs])), out(torch.tensor([zt])),
                                                   torch.tensor([y]))
    assert loss.item() == pytest.approx(1.0 * tckd + 8.0 * nckd, rel=1e-5)


def test_dkd_matches_benchmark_formula_and_temperature() -> None:
    torch.manual_seed(0)
    zs, zt, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    T, a, b = 4.0, 1.0, 8.0
    # mdistiller's dkd_loss, written out.
    gt = F.one_hot(y, 5).bool()
    ps, pt = F.softmax(zs / T, 1), F.softmax(zt / T, 1)
    cat = lambda p: torch.stack([(p * gt).sum(1), (p * ~gt).sum(1)], 1)  # noqa: E731
    tckd = F.kl_div(torch.log(cat(ps)), cat(pt), reduction="sum") * T ** 2 / 6
    nckd = F.kl_div(F.log_softmax(zs / T - 1000.0 * gt, 1), F.softmax(zt / T - 1000.0 * gt, 1),
                    reduction="sum") * T ** 2 / 6
    loss = DKD(alpha=a, beta=b, temperature=T)(out(zs), out(zt), y)
    assert loss.item() == pytest.approx((a * tckd + b * nckd).item(), rel=1e-4)


def test_dkd_zero_grads_warmup_and_duplication() -> None:
    torch.manual_seed(1)
    zs, zt, y = torch.randn(4, 7), torch.randn(4, 7), torch.randint(0, 7, (4,))
    dkd = DKD(warmup_epochs=10, warmup="linear")
    dkd.bind(DataInfo(num_data=4, steps_per_epoch=1))
    assert DKD()(out(zt), out(zt), y).item() == pytest.approx(0.0, abs=1e-6)
    full = DKD()(out(zs), out(zt), y)
    dkd.progress_step = 0
    assert dkd(out(zs), out(zt), y).item() == pytest.approx(full.item() / 10, rel=1e-6)
    dkd.progress_step = 9
    assert dkd(out(zs), out(zt), y).item() == pytest.approx(full.item(), rel=1e-6)
    assert warmup_factor(10_000, 10, 1) == 1.0 and warmup_factor(4, 0, None) == 1.0
    assert_finite_grads(DKD(), out(zs), out(zt), y)
    assert DKD()(dup(out(zs)), dup(out(zt)), torch.cat([y, y])).item() == pytest.approx(full.item(), rel=1e-6)
    # Soft targets (mixup) fall back to their arg-max class.
    soft = F.one_hot(y, 7).float() * 0.9 + 0.01
    assert DKD()(out(zs), out(zt), soft).item() == pytest.approx(full.item(), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# DIST


def test_dist_hand_computed() -> None:
    # With two classes every centred row/column is ±(a, −a), so each Pearson correlation is ±1:
    # rows agree on sample 0 (+1) and disagree on sample 1 (−1): inter = 1 − 0 = 1;
    # both class columns move in opposite directions for student and teacher (−1): intra = 1 − (−1) = 2.
    zs = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    zt = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    loss = DIST(beta=1.0, gamma=1.0, tau=1.0)(out(zs), out(zt), torch.zeros(2, dtype=torch.long))
    assert loss.item() == pytest.approx(3.0, abs=1e-6)
    loss = DIST(beta=2.0, gamma=0.5, tau=1.0)(out(zs), out(zt), torch.zeros(2, dtype=torch.long))
    assert loss.item() == pytest.approx(2.0 * 1 + 0.5 * 2, abs=1e-6)


def test_dist_zero_grads_duplication() -> None:
    torch.manual_seed(2)
    zs, zt, y = torch.randn(5, 6), torch.randn(5, 6), torch.zeros(5, dtype=torch.long)
    d = DIST(tau=4.0)
    # Zero up to the reference's ε = 1e-8 in the Pearson denominator (τ² = 16 amplifies it).
    assert d(out(zt), out(zt), y).item() == pytest.approx(0.0, abs=1e-3)
    assert DIST(tau=1.0)(out(zt), out(zt), y).item() == pytest.approx(0.0, abs=1e-5)
    assert_finite_grads(d, out(zs), out(zt), y)
    base = d(out(zs), out(zt), y).item()
    assert d(dup(out(zs)), dup(out(zt)), torch.cat([y, y])).item() == pytest.approx(base, rel=1e-5)


# --------------------------------------------------------------------------------------------------
# VkD / MoKD feature matching


def _setup(term: DistillLoss, s: ModelOutput, t: ModelOutput) -> DistillLoss:
    term.setup(shapes(s), shapes(t))
    return term


def test_smooth_l1_hand_computed_and_projector() -> None:
    s, t = out(pre_logits=torch.tensor([[0.0, 2.0]])), out(pre_logits=torch.tensor([[0.5, 0.0]]))
    term = _setup(SmoothL1(), s, t)  # identity projector
    # |0 − 0.5| < 1 → 0.5·0.25 = 0.125; |2 − 0| ≥ 1 → 2 − 0.5 = 1.5; element mean.
    assert term(s, t, torch.zeros(1)).item() == pytest.approx((0.125 + 1.5) / 2)
    # The projector is applied: a bias-free linear map doubling the student.
    lin = functools.partial(Linear, bias=False)
    term = _setup(SmoothL1(projector=lin), s, t)
    with torch.no_grad():
        term.projector.proj.weight.copy_(2 * torch.eye(2))  # type: ignore[union-attr]
    # student (0, 4) vs (0.5, 0): 0.125 and 4 − 0.5 = 3.5.
    assert term(s, t, torch.zeros(1)).item() == pytest.approx((0.125 + 3.5) / 2)


def test_normalized_l1_hand_computed() -> None:
    s, t = out(pre_logits=torch.tensor([[3.0, 4.0]])), out(pre_logits=torch.tensor([[1.0, 0.0]]))
    term = _setup(NormalizedL1(), s, t)
    # (0.6, 0.8) vs (1, 0): |−0.4| + |0.8|.
    assert term(s, t, torch.zeros(1)).item() == pytest.approx(1.2, rel=1e-6)
    # Proportional features are a minimum.
    assert term(out(pre_logits=torch.tensor([[2.0, 0.0]])), t, torch.zeros(1)).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("cls", [SmoothL1, NormalizedL1])
def test_feature_matching_zero_grads_duplication(cls: type) -> None:
    torch.manual_seed(3)
    s = out(pre_logits=torch.randn(6, 8))
    t = out(pre_logits=torch.randn(6, 12, 2, 2))  # a conv map: pooled over H, W
    term = _setup(cls(projector=functools.partial(Orthogonal, teacher_norm="layernorm")), s, t)
    assert_finite_grads(term, s, t, torch.zeros(6))
    y = torch.zeros(6)
    assert term(dup(s), dup(t), torch.cat([y, y])).item() == pytest.approx(term(s, t, y).item(), rel=1e-6)
    same = _setup(cls(), s, s)
    assert same(s, s, y).item() == pytest.approx(0.0, abs=1e-7)


def test_feature_matching_needs_setup() -> None:
    s = out(pre_logits=torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="setup"):
        SmoothL1()(s, s, torch.zeros(2))


# --------------------------------------------------------------------------------------------------
# FitNet


def test_fitnet_hand_computed_and_regressors() -> None:
    s = out(stage2=torch.ones(2, 3, 4, 4))
    t = out(stage2=torch.zeros(2, 3, 4, 4))
    term = _setup(FitNet(projector=Identity), s, t)  # the identity regressor: plain MSE
    assert term(s, t, torch.zeros(2)).item() == pytest.approx(1.0)
    assert term(t, t, torch.zeros(2)).item() == 0.0
    # The benchmark's ConvReg for each resolution ratio.
    for s_hw, t_hw, kind in [(8, 4, torch.nn.Conv2d), (4, 8, torch.nn.ConvTranspose2d), (6, 4, torch.nn.Conv2d)]:
        s, t = out(stage2=torch.randn(2, 3, s_hw, s_hw)), out(stage2=torch.randn(2, 5, t_hw, t_hw))
        term = _setup(FitNet(), s, t)
        reg = term.regressor.reg  # type: ignore[union-attr]
        assert isinstance(reg.conv, kind)
        with torch.no_grad():
            expected = F.mse_loss(reg(s.features["stage2"]), t.features["stage2"])
        assert term(s, t, torch.zeros(2)).item() == pytest.approx(expected.item(), rel=1e-6)
    # A projector partial is applied per position on conv maps.
    s, t = out(stage2=torch.randn(2, 3, 4, 4)), out(stage2=torch.randn(2, 5, 4, 4))
    term = _setup(FitNet(projector=Linear), s, t)
    assert_finite_grads(term, s, t, torch.zeros(2))


def test_fitnet_grads_and_duplication() -> None:
    torch.manual_seed(4)
    s, t = out(stage2=torch.randn(4, 3, 8, 8)), out(stage2=torch.randn(4, 6, 4, 4).relu())
    term = _setup(FitNet(), s, t)
    assert_finite_grads(term, s, t, torch.zeros(4))
    # BatchNorm in training mode uses the biased batch variance: duplication leaves it unchanged.
    a = term(s, t, torch.zeros(4)).item()
    assert term(dup(s), dup(t), torch.zeros(8)).item() == pytest.approx(a, rel=1e-5)


# --------------------------------------------------------------------------------------------------
# AT


def test_at_hand_computed() -> None:
    # One stage, 1 channel, 1x2 map: attention (1, 0) vs (0, 1); squared difference (1, 1), mean 1.
    s = out(stage1=torch.tensor([[[[1.0, 0.0]]]]))
    t = out(stage1=torch.tensor([[[[0.0, 1.0]]]]))
    term = AT(student_taps=["stage1"], teacher_taps=["stage1"])
    assert term(s, t, torch.zeros(1)).item() == pytest.approx(1.0)
    # Attention maps are scale-free: a scaled teacher map is a minimum.
    assert term(s, out(stage1=3 * s.features["stage1"]), torch.zeros(1)).item() == pytest.approx(0.0, abs=1e-7)


def test_at_stages_pooling_grads_duplication() -> None:
    s = out(**maps(4, (4, 8, 16), (8, 4, 2), seed=5))
    t = out(**maps(4, (8, 16, 32), (16, 8, 4), seed=6))  # twice the resolution: pooled to the student's
    term = AT()
    assert_finite_grads(term, s, t, torch.zeros(4))
    y = torch.zeros(4)
    assert term(dup(s), dup(t), torch.cat([y, y])).item() == pytest.approx(term(s, t, y).item(), rel=1e-6)
    assert term(t, t, y).item() == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------------------------------------------
# RKD


def _rkd_reference(s: list[list[float]], t: list[list[float]], wd: float, wa: float) -> float:
    """RKD from its definition, with plain Python loops."""
    def dist(e: list[list[float]]) -> list[list[float]]:
        return [[math.dist(a, b) for b in e] for a in e]

    def huber(x: float) -> float:
        return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5

    def unit(v: list[float]) -> list[float]:
        n = math.hypot(*v)
        return [x / n for x in v] if n > 0 else [0.0 for _ in v]

    n = len(s)
    ds, dt = dist(s), dist(t)
    mean_nonzero = lambda d: sum(x for r in d for x in r if x > 0) / sum(1 for r in d for x in r if x > 0)  # noqa: E731
    ms, mt = mean_nonzero(ds), mean_nonzero(dt)
    loss_d = sum(huber(ds[i][j] / ms - dt[i][j] / mt) for i in range(n) for j in range(n)) / n ** 2

    def ang(e: list[list[float]], i: int, j: int, k: int) -> float:
        a = unit([x - y for x, y in zip(e[j], e[i])])
        b = unit([x - y for x, y in zip(e[k], e[i])])
        return sum(x * y for x, y in zip(a, b))

    loss_a = sum(huber(ang(s, i, j, k) - ang(t, i, j, k))
                 for i in range(n) for j in range(n) for k in range(n)) / n ** 3
    return wd * loss_d + wa * loss_a


def test_rkd_hand_computed() -> None:
    s = [[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]]
    t = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    term = RKD()
    loss = term(out(pre_logits=torch.tensor(s)), out(pre_logits=torch.tensor(t)), torch.zeros(3))
    assert loss.item() == pytest.approx(_rkd_reference(s, t, 25.0, 50.0), rel=1e-5)


def test_rkd_minimum_grads_and_batch_structure() -> None:
    torch.manual_seed(7)
    fs, ft = torch.randn(6, 5), torch.randn(6, 5)
    term, y = RKD(), torch.zeros(6)
    # Distances are normalised by their mean and angles are scale-free: a scaled copy is a minimum.
    assert term(out(pre_logits=2.5 * ft), out(pre_logits=ft), y).item() == pytest.approx(0.0, abs=1e-6)
    assert_finite_grads(term, out(pre_logits=fs), out(pre_logits=ft), y)
    base = term(out(pre_logits=fs), out(pre_logits=ft), y).item()
    perm = torch.randperm(6)
    assert term(out(pre_logits=fs[perm]), out(pre_logits=ft[perm]), y).item() == pytest.approx(base, rel=1e-5)
    # Not duplication invariant (documented): copies sit at distance √ε and enter the mean distance.
    doubled = term(dup(out(pre_logits=fs)), dup(out(pre_logits=ft)), torch.cat([y, y])).item()
    assert doubled != pytest.approx(base, rel=1e-3)


# --------------------------------------------------------------------------------------------------
# PKT


def test_pkt_hand_computed_and_benchmark_scale() -> None:
    # Student rows orthogonal: k = [[1, .5], [.5, 1]] → p = [[2/3, 1/3], [1/3, 2/3]];
    # teacher rows parallel: q = [[.5, .5], [.5, .5]]; KL per row = .5 ln(.75) + .5 ln(1.5) = .5 ln(1.125).
    s = out(pre_logits=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    t = out(pre_logits=torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    loss = PKT()(s, t, torch.zeros(2))
    assert loss.item() == pytest.approx(2 * 0.5 * math.log(1.125) / 2 ** 2, rel=1e-5)  # (1/B²) Σ_i KL_i
    # The benchmark code averages over the B×B matrix, and so do we.
    torch.manual_seed(8)
    fs, ft = torch.randn(64, 10), torch.randn(64, 10)
    eps = 1e-7
    def cond(f: Tensor) -> Tensor:
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        k = (f @ f.t() + 1) / 2
        return k / k.sum(1, keepdim=True)
    bench = torch.mean(cond(ft) * torch.log((cond(ft) + eps) / (cond(fs) + eps)))
    ours = PKT()(out(pre_logits=fs), out(pre_logits=ft), torch.zeros(64))
    assert ours.item() == pytest.approx(bench.item(), rel=1e-5)


def test_pkt_zero_grads_duplication() -> None:
    torch.manual_seed(9)
    s, t, y = out(pre_logits=torch.randn(5, 4)), out(pre_logits=torch.randn(5, 4)), torch.zeros(5)
    assert PKT()(t, t, y).item() == pytest.approx(0.0, abs=1e-6)
    assert_finite_grads(PKT(), s, t, y)
    # Every row KL survives duplication, the 1/B² normalisation halves the mean.
    assert PKT()(dup(s), dup(t), torch.cat([y, y])).item() == pytest.approx(PKT()(s, t, y).item() / 2, rel=1e-5)


# --------------------------------------------------------------------------------------------------
# KDSVD


def test_kdsvd_hand_computed() -> None:
    # mdistiller layout: a [1, 1, 2, 2] map is one 2x2 matrix whose right singular vectors we choose.
    c, sn = math.cos(math.pi / 6), math.sin(math.pi / 6)
    rot = torch.tensor([[c, -sn], [sn, c]])  # columns: v1 = (c, s), v2 = (−s, c)
    t1 = torch.diag(torch.tensor([1.0, 0.5]))  # V = I
    t2 = torch.diag(torch.tensor([2.0, 1.0]))  # V = I
    s2 = torch.diag(torch.tensor([2.0, 1.0])) @ rot.t()  # V = rot: its first vector is 30° off the teacher's
    s = out(stage1=t1.view(1, 1, 2, 2), stage2=s2.view(1, 1, 2, 2))
    t = out(stage1=t1.view(1, 1, 2, 2), stage2=t2.view(1, 1, 2, 2))
    loss = KDSVD(student_taps=["stage1", "stage2"], teacher_taps=["stage1", "stage2"])(s, t, torch.zeros(1)).item()

    # Teacher vectors v1 = σ1(1, 0), v2 = σ2(1, 0) (σ: LAPACK's signs); the student's are sign-aligned to
    # them: v1 = σ1(1, 0), v2 = σ2(c, s). G[a, b] = exp(−(v2[a] − v1[b])² / 8).
    def expected(sign: float) -> float:
        v1, v2t, v2s = [1.0, 0.0], [sign, 0.0], [sign * c, sign * sn]
        g = lambda v2, a, b: math.exp(-((v2[a] - v1[b]) ** 2) / 8)  # noqa: E731
        return sum((g(v2s, a, b) - g(v2t, a, b)) ** 2 for a in range(2) for b in range(2))

    assert min(abs(loss - expected(1.0)), abs(loss - expected(-1.0))) < 1e-5
    assert loss > 1e-4


def test_kdsvd_zero_grads_duplication_layouts() -> None:
    s = out(**maps(3, (4, 8, 16), (8, 4, 2), seed=10))
    t = out(**maps(3, (8, 16, 32), (8, 4, 2), seed=11))  # wider teacher, same spatial sizes
    term, y = KDSVD(), torch.zeros(3)
    assert term(t, t, y).item() == pytest.approx(0.0, abs=1e-6)
    assert_finite_grads(term, s, t, y)
    assert term(dup(s), dup(t), torch.cat([y, y])).item() == pytest.approx(term(s, t, y).item(), rel=1e-5)
    # A rank-deficient student map (repeated zero singular values) gets a zero, not a NaN, gradient.
    flat = dict(s.features)
    flat["stage1"] = flat["stage1"].clone()
    flat["stage1"][0, :, :, 2:] = 0.0
    assert_finite_grads(term, out(**flat), t, y)
    paper = KDSVD(layout="paper")
    with pytest.raises(ValueError, match="channels"):
        paper(s, t, y)  # the paper's layout needs equal channels
    assert paper(t, t, y).item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# CRD


def test_nce_loss_hand_computed() -> None:
    x = torch.tensor([[0.5, 0.1, 0.2]])  # positive, then K = 2 negatives; N = 10 → m·P_n = 0.2
    expected = -(math.log(0.5 / 0.7) + math.log(0.2 / 0.3) + math.log(0.2 / 0.4))
    assert nce_loss(x, num_data=10).item() == pytest.approx(expected, rel=1e-5)


def _crd(num_data: int = 20, k: int = 4) -> tuple[CRD, ModelOutput, ModelOutput]:
    torch.manual_seed(12)
    s, t = out(pre_logits=torch.randn(3, 6)), out(pre_logits=torch.randn(3, 5))
    crd = CRD(feat_dim=4, num_negatives=k, num_data=num_data, negatives="uniform")
    crd.setup(shapes(s), shapes(t))
    return crd, s, t


def test_crd_value_with_given_negatives() -> None:
    crd, s, t = _crd()
    index = torch.tensor([0, 5, 7])
    contrast = torch.stack([index, *[torch.tensor([1, 2, 3]) + i for i in range(4)]], dim=1)  # [3, 5]
    mem_s, mem_t = crd.memory_s.clone(), crd.memory_t.clone()
    loss = crd(s, t, torch.zeros(3), index=index, contrast_index=contrast)
    with torch.no_grad():
        gs, gt = crd.embed_s(s.features["pre_logits"]), crd.embed_t(t.features["pre_logits"])
        e_s = torch.exp(torch.einsum("bkd,bd->bk", mem_t[contrast], gs) / 0.07)
        e_t = torch.exp(torch.einsum("bkd,bd->bk", mem_s[contrast], gt) / 0.07)
        expected = nce_loss(e_s / (e_s.mean() * 20), 20) + nce_loss(e_t / (e_t.mean() * 20), 20)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # Z is fixed from the first training batch; the batch's memory rows moved (momentum 0.5, renormalised).
    assert crd.z_s.item() == pytest.approx((e_s.mean() * 20).item(), rel=1e-5)
    assert torch.allclose(crd.memory_s[index], F.normalize(0.5 * mem_s[index] + 0.5 * gs, dim=1), atol=1e-6)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(crd.memory_t[untouched], mem_t[untouched])


def test_crd_state_grads_and_errors() -> None:
    crd, s, t = _crd()
    index = torch.tensor([1, 2, 3])
    assert_finite_grads(crd, s, t, torch.zeros(3), index=index)
    state = crd.state_dict()
    assert {"memory_s", "memory_t", "z_s", "z_t"} <= set(state)
    other, _, _ = _crd()
    other.load_state_dict(state)
    assert torch.equal(other.memory_s, crd.memory_s) and other.z_t.item() == crd.z_t.item()
    # A no-grad re-evaluation of the same batch (the engine's L(θ_{t+1})) reuses the negatives and
    # leaves the bank alone.
    before = crd.memory_s.clone()
    with torch.no_grad():
        again = [crd(s, t, torch.zeros(3), index=index).item() for _ in range(2)]
    assert again[0] == again[1]
    assert torch.equal(crd.memory_s, before)
    # Evaluation leaves the bank alone.
    crd.eval()
    before = crd.memory_s.clone()
    crd(s, t, torch.zeros(3), index=index)
    assert torch.equal(crd.memory_s, before)
    with pytest.raises(ValueError, match="index"):
        crd(s, t, torch.zeros(3))
    assert CRD.needs_index is True


# --------------------------------------------------------------------------------------------------
# OFD


def test_ofd_stage_loss_hand_computed() -> None:
    # Margin −0.5: σ_m(T) = (0.5, −0.5). Position 0: T > 0 → (1 − 0.5)² = 0.25. Position 1: S = −1 is
    # below the target −0.5 → ignored. With S = 0 there instead: (0 + 0.5)² = 0.25 more.
    target, margin = torch.tensor([[[[0.5, -2.0]]]]), torch.tensor([-0.5])
    assert ofd_stage_loss(torch.tensor([[[[1.0, -1.0]]]]), target, margin).item() == pytest.approx(0.25)
    assert ofd_stage_loss(torch.tensor([[[[1.0, 0.0]]]]), target, margin).item() == pytest.approx(0.5)


def _identity_connectors(term: OFD) -> None:
    assert term.connectors is not None
    for conn in term.connectors:
        conv, bn = conn[0], conn[1]
        with torch.no_grad():
            conv.weight.copy_(torch.eye(conv.weight.shape[0]).view_as(conv.weight))
        bn.reset_running_stats()
        bn.eval()  # running stats (0, 1), γ = 1, β = 0: the connector is the identity (up to BN's ε)


def test_ofd_margin_levels_zero_grads() -> None:
    s = out(**maps(2, (3, 3), (4, 2), seed=13, relu=False))
    t = out(**maps(2, (3, 3), (4, 2), seed=14, relu=False))  # pre-ReLU-like teacher maps
    term = OFD(student_taps=["stage1", "stage2"], teacher_taps=["stage1", "stage2"], margin="estimate")
    term.setup(shapes(s), shapes(t))
    term(s, t, torch.zeros(2))
    ft = t.features["stage1"]
    neg_mean = (ft.clamp(max=0).sum(dim=(0, 2, 3)) / (ft < 0).sum(dim=(0, 2, 3)))
    assert torch.allclose(term.margin(0), neg_mean, atol=1e-6)
    term.eval()
    term(s, out(stage1=ft - 5, stage2=t.features["stage2"]), torch.zeros(2))  # eval: no update
    assert torch.allclose(term.margin(0), neg_mean, atol=1e-6)
    # With identity connectors the levels are weighted 1/2, 1 and equal maps give zero.
    _identity_connectors(term)
    y = torch.zeros(2)
    l1 = ofd_stage_loss(s.features["stage1"], t.features["stage1"], term.margin(0)) / 2
    l2 = ofd_stage_loss(s.features["stage2"], t.features["stage2"], term.margin(1))
    assert term(s, t, y).item() == pytest.approx((l1 + l2).item(), rel=1e-4)
    assert term(t, t, y).item() == pytest.approx(0.0, abs=1e-4)
    post = out(**maps(2, (3, 3), (4, 2), seed=15))  # post-ReLU teacher: margin 0
    fresh = OFD(student_taps=["stage1", "stage2"], teacher_taps=["stage1", "stage2"], margin="estimate")
    fresh.setup(shapes(s), shapes(post))
    assert_finite_grads(fresh, s, post, y)
    assert torch.equal(fresh.margin(0), torch.zeros(3))


def test_ofd_duplication() -> None:
    s = out(**maps(4, (4, 8, 16), (8, 4, 2), seed=16))
    t = out(**maps(4, (8, 16, 32), (16, 8, 4), seed=17, relu=False))
    term = OFD(student_taps=["stage1", "stage2", "stage3"], teacher_taps=["stage1", "stage2", "stage3"],
               margin="estimate")
    term.setup(shapes(s), shapes(t))
    y = torch.zeros(4)
    a = term(s, t, y).item()
    assert term(dup(s), dup(t), torch.cat([y, y])).item() == pytest.approx(a, rel=1e-5)


# --------------------------------------------------------------------------------------------------
# ReviewKD


def test_hcl_hand_computed() -> None:
    # A ±1 checkerboard vs 0: full-resolution MSE 1; the 1x1 pyramid level (l=1 < h=2, weight 1/2) sees
    # the mean 0 → MSE 0; levels 4 and 2 are skipped (≥ h). (1 + 0.5·0) / (1 + 0.5) = 2/3.
    fs = torch.tensor([[[[1.0, -1.0], [-1.0, 1.0]]]])
    assert hcl_loss([fs], [torch.zeros_like(fs)]).item() == pytest.approx(2 / 3)
    # A 1x1 level has no pyramid: plain MSE.
    assert hcl_loss([torch.full((1, 2, 1, 1), 2.0)], [torch.zeros(1, 2, 1, 1)]).item() == pytest.approx(4.0)
    assert hcl_loss([fs, fs], [fs, fs]).item() == 0.0


def _review_pair(b: int, seed: int) -> tuple[ModelOutput, ModelOutput]:
    g = torch.Generator().manual_seed(seed)
    s = out(**maps(b, (4, 8, 16), (8, 4, 2), seed=seed), pre_logits=torch.randn(b, 16, generator=g))
    t = out(**maps(b, (8, 16, 32), (8, 4, 2), seed=seed + 1), pre_logits=torch.randn(b, 32, generator=g))
    return s, t


def test_reviewkd_shapes_warmup_grads_duplication() -> None:
    s, t = _review_pair(4, 18)
    term = ReviewKD(teacher_taps=["stage1", "stage2", "stage3", "pre_logits"], warmup_epochs=4, warmup="linear")
    term.bind(DataInfo(num_data=4, steps_per_epoch=1))
    term.setup(shapes(s), shapes(t))
    review = term.review(s)
    assert [tuple(r.shape[1:]) for r in review] == [(8, 8, 8), (16, 4, 4), (32, 2, 2), (32, 1, 1)]
    y = torch.zeros(4)
    term.progress_step = 3
    full = term(s, t, y)
    term.progress_step = 0
    assert term(s, t, y).item() == pytest.approx(full.item() / 4, rel=1e-5)
    term.progress_step = 3
    assert_finite_grads(term, s, t, y)
    # BatchNorm in training mode (biased variance) and a per-sample HCL: duplication leaves the loss.
    assert term(dup(s), dup(t), torch.cat([y, y])).item() == pytest.approx(term(s, t, y).item(), rel=1e-4)


# --------------------------------------------------------------------------------------------------
# configs


def _params(target: Callable[..., Any]) -> set[str]:
    return set(inspect.signature(target).parameters) - {"self"}


@pytest.mark.parametrize("path", DISTILL_YAMLS, ids=lambda p: p.stem)
def test_distill_yaml_instantiates_with_exact_keys(path: Path) -> None:
    # Composed through Hydra: a named option (e.g. kl_deit) is its base's node plus what differs.
    # ${projector} resolves against the root config's projector group: provide one.
    root = compose_cfg([f"distill={path.stem}", "projector=linear"])
    if not root.distill:  # e.g. none.yaml: no terms
        return
    OmegaConf.resolve(root)
    assert len(root.distill) == 1, "one file defines one named term"
    for name, term in root.distill.items():
        validate_target_node(f"distill.{name}", term, extra_keys=("weight",))
        keys = {str(k) for k in term.keys()} - {"_target_"}
        assert "weight" in keys, f"{path.name}: no weight"
        # As the engine does: drop the weight, instantiate with _convert_="all".
        OmegaConf.set_struct(term, False)
        term.pop("weight")
        module = instantiate(term, _convert_="all")
        assert isinstance(module, DistillLoss)
        assert keys - {"weight"} == _params(type(module)), f"{path.name}: keys != constructor parameters"


def test_normalized_l1_neg_similarity_mode_is_minus_cosine_of_mokd_s() -> None:
    from functools import partial

    from kdrun.projectors.subspace import Subspace

    torch.manual_seed(0)
    zs, zt = torch.randn(5, 3), torch.randn(5, 4)
    term = NormalizedL1(projector=partial(Subspace, teacher_norm="none"), mode="neg_similarity")
    term.setup({"pre_logits": torch.Size([3])}, {"pre_logits": torch.Size([4])})
    with torch.no_grad():
        term.projector.d.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))  # an indefinite D
    out = term(ModelOutput(torch.zeros(5, 2), {"pre_logits": zs}), ModelOutput(torch.zeros(5, 2), {"pre_logits": zt}),
               torch.zeros(5, dtype=torch.long))
    p = term.projector
    a, b = p.d * (zs @ p.P_s.T), zt @ p.P_t.T
    s = (b * a).sum(-1)  # (P_t z_t)ᵀ D (P_s z_s)
    ref = -(s / (a.norm(dim=-1) * b.norm(dim=-1))).mean()
    assert torch.allclose(out, ref, atol=1e-6)
    same = term(ModelOutput(torch.zeros(5, 2), {"pre_logits": zs}), ModelOutput(torch.zeros(5, 2), {"pre_logits": zt}),
                torch.zeros(5, dtype=torch.long))
    assert -1.0 - 1e-6 <= float(same) <= 1.0 + 1e-6


def test_deit_hard_is_ce_against_teacher_argmax() -> None:
    from kdrun.losses.deit_hard import DeiTHard

    s = ModelOutput(torch.zeros(2, 3), {"dist_logits": torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])})
    t = ModelOutput(torch.tensor([[0.1, 5.0, 0.0], [9.0, 0.0, 1.0]]))
    out = DeiTHard()(s, t, torch.zeros(2, dtype=torch.long))
    ref = (-math.log(math.exp(0) / (math.exp(2) + 2)) - math.log(1 / 3)) / 2  # targets 1 and 0
    assert float(out) == pytest.approx(ref, rel=1e-6)

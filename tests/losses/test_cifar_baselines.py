"""The CIFAR-100 baselines are wired as RepDistiller/mdistiller wire them (issue #12).

* Every CIFAR recipe's distillation terms read the peer's feature lists: the tap names equal mdistiller's
  selection (``feats[1:]``, ``preact_feats[1:]``, ``pooled_feat``; written below from the cited lines) and
  each tapped tensor equals the re-derived RepDistiller feature (``tests/models/repdistiller_ref.py``) on
  the same weights and inputs, with the teacher in inference mode and the student in training mode.
* The loss formulas that depend on that wiring equal the peers' on those features (AT, OFD with its BN
  margin, ReviewKD's HCL, PKT), at batch sizes other than 64.
* DKD/ReviewKD's warm-up equals mdistiller's ``min(epoch / 20, 1)`` at every step of the first 21 epochs.
* CRD draws its negatives as RepDistiller's ``CIFAR100InstanceSample`` (mode 'exact').
"""
from __future__ import annotations

import copy
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from kdrun.data.digits import build as build_digits
from kdrun.data.synthetic import build as build_synthetic
from kdrun.losses._common import warmup_factor
from kdrun.losses.base import DataInfo
from kdrun.losses.crd import CRD, other_class_negatives
from kdrun.losses.dkd import DKD, dkd_loss
from kdrun.losses.ofd import OFD, bn_margin
from kdrun.losses.pkt import PKT
from kdrun.losses.reviewkd import ReviewKD
from kdrun.models.taps import ModelOutput, Tapped
from tests.conftest import compose_cfg
from tests.models.repdistiller_ref import REFS, randomise

ROOT = Path(__file__).resolve().parents[2]
SIZE = 16  # input resolution: the re-derived features are resolution-agnostic, and 16x16 keeps this fast


# ---------------------------------------------------------------------------------------------------
# Peer formulas, re-derived from the cited lines.


def peer_ofd_feat_loss(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    """mdistiller distillers/OFD.py lines 11-19."""
    margin = margin.view(1, -1, 1, 1)
    loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
            + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).float()
            + (source - target) ** 2 * (target > 0).float())
    return torch.abs(loss).mean(dim=0).sum()


def _norm_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))  # scipy.stats.norm.cdf


def peer_margins(weight: Tensor, bias: Tensor) -> Tensor:
    """mdistiller distillers/OFD.py lines 90-109, in Python floats."""
    margin = []
    for s, m in zip(weight.tolist(), bias.tolist()):
        s = abs(s)
        if _norm_cdf(-m / s) > 0.001:
            margin.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / _norm_cdf(-m / s) + m)
        else:
            margin.append(-3 * s)
    return torch.tensor(margin, dtype=torch.float32)


def peer_at(fs: list[Tensor], ft: list[Tensor], p: float = 2.0) -> Tensor:
    """mdistiller distillers/AT.py lines 8-25: Σ over stages of (at(f_s) − at(f_t))².mean()."""
    def at(f: Tensor) -> Tensor:
        return F.normalize(f.pow(p).mean(1).reshape(f.size(0), -1))

    total = torch.zeros(())
    for a, b in zip(fs, ft):
        if a.shape[2] > b.shape[2]:
            a = F.adaptive_avg_pool2d(a, b.shape[2:])
        elif a.shape[2] < b.shape[2]:
            b = F.adaptive_avg_pool2d(b, a.shape[2:])
        total = total + (at(a) - at(b)).pow(2).mean()
    return total


def peer_hcl(fstudent: list[Tensor], fteacher: list[Tensor]) -> Tensor:
    """mdistiller distillers/ReviewKD.py lines 11-28."""
    loss_all = torch.zeros(())
    for fs, ft in zip(fstudent, fteacher):
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt, tot = 1.0, 1.0
        for lvl in [4, 2, 1]:
            if lvl >= h:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, (lvl, lvl)), F.adaptive_avg_pool2d(ft, (lvl, lvl)),
                                     reduction="mean") * cnt
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


def peer_pkt(f_s: Tensor, f_t: Tensor, eps: float = 1e-7) -> Tensor:
    """RepDistiller distiller_zoo/PKT.py lines 17-42 / mdistiller distillers/PKT.py lines 8-35."""
    f_s = f_s / (torch.sqrt(torch.sum(f_s ** 2, dim=1, keepdim=True)) + eps)
    f_s = torch.where(f_s != f_s, torch.zeros_like(f_s), f_s)
    f_t = f_t / (torch.sqrt(torch.sum(f_t ** 2, dim=1, keepdim=True)) + eps)
    f_t = torch.where(f_t != f_t, torch.zeros_like(f_t), f_t)
    ms = (f_s @ f_s.t() + 1.0) / 2.0
    ts = (f_t @ f_t.t() + 1.0) / 2.0
    ms = ms / ms.sum(dim=1, keepdim=True)
    ts = ts / ts.sum(dim=1, keepdim=True)
    return torch.mean(ts * torch.log((ts + eps) / (ms + eps)))


# What mdistiller feeds each method, as tap names (n = stages after the stem, the same for both nets in
# every table pair): distillers/AT.py:44, KDSVD.py:92 feats[1:]; OFD.py:136-137 preact_feats[1:];
# ReviewKD.py:72-91 student feats (the stem is dropped by the zip) + pooled, teacher preact_feats[1:] +
# pooled; PKT.py:57, CRD.py:76-77, RKD.py:73-74 pooled_feat; DKD/KD logits; FitNet.py:40-42 feats[2].
def peer_taps(method: str, n: int) -> tuple[list[str], list[str]]:
    post = [f"stage{k}" for k in range(1, n + 1)]
    pre = [f"preact_stage{k}" for k in range(1, n + 1)]
    return {
        "at": (post, post), "kdsvd": (post, post), "ofd": (pre, pre),
        "reviewkd": ([*post, "pre_logits"], [*pre, "pre_logits"]),
        "pkt": (["pre_logits"], ["pre_logits"]), "crd": (["pre_logits"], ["pre_logits"]),
        "rkd": (["pre_logits"], ["pre_logits"]), "dkd": (["logits"], ["logits"]), "kl": (["logits"], ["logits"]),
    }[method]


PEER_METHODS = ("at", "kdsvd", "ofd", "reviewkd", "pkt", "crd", "rkd", "dkd", "kl")


# ---------------------------------------------------------------------------------------------------
# Models with trained-like weights and their re-derived features, built once per architecture.

ARCH = {"resnet20": "resnet20", "resnet56": "resnet56", "resnet110": "resnet110", "resnet8x4": "resnet8x4",
        "resnet32x4": "resnet32x4", "wrn_40_2": "wrn_40_2", "wrn_40_1": "wrn_40_1", "vgg13": "vgg13",
        "vgg8": "vgg8", "mobilenetv2": "mobilenetv2", "shufflev1": "ShuffleV1", "shufflev2": "ShuffleV2",
        "resnet34": "ResNet34", "resnet50": "ResNet50", "resnet101": "ResNet101"}
X = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@lru_cache(maxsize=None)
def zoo(arch: str) -> nn.Module:
    from kdrun.models import cifar

    torch.manual_seed(hash(arch) % 1000)
    model = getattr(cifar, ARCH[arch])()
    randomise(model)
    return model


@lru_cache(maxsize=None)
def reference(arch: str, train: bool) -> dict[str, Tensor]:
    """Tap name -> the re-derived RepDistiller tensor (stageK = feats[K], preact_stageK = preact
    feats[K], pre_logits = pooled, logits)."""
    model = copy.deepcopy(zoo(arch)).train(train)
    with torch.no_grad():
        feats, pres, pooled = REFS[ARCH[arch]](model, X)
        logits = model.get_submodule(type(model).CLASSIFIER)(pooled)
    out = {f"stage{k}": f for k, f in enumerate(feats)}
    out.update({f"preact_stage{k}": f for k, f in enumerate(pres)})
    out.update(pre_logits=pooled, logits=logits)
    return out


def all_taps(arch: str) -> tuple[str, ...]:
    return tuple(reference(arch, False))


@pytest.mark.parametrize("role", ["teacher", "student"])
@pytest.mark.parametrize("arch", sorted(ARCH))
def test_zoo_taps_equal_the_peer_features_as_the_engine_runs_them(arch: str, role: str) -> None:
    """Every tap a recipe can name, on every table architecture: the teacher frozen under inference mode,
    the student in training mode (hooks are per tap, so a recipe's subset reads the same tensors)."""
    model = copy.deepcopy(zoo(arch)).train(role == "student")
    t = Tapped(model, all_taps(arch))
    for _ in range(2):  # the probe forward and the learned copy-on-modify path
        if role == "teacher":
            with torch.inference_mode():
                o = t(X)
        else:
            o = t(X)
        for tap, want in reference(arch, role == "student").items():
            got = o.logits if tap == "logits" else o.features[tap]
            torch.testing.assert_close(got, want, msg=f"{arch} {role} {tap}")


def cifar_distill_recipes() -> list[tuple[str, str, str, str]]:
    """(recipe, teacher, student, method) for every CIFAR KD recipe, one per distinct distill config."""
    seen, out = set(), []
    for path in sorted((ROOT / "recipes").glob("cifar100_*.yaml")):
        name = path.stem
        if name.startswith(("cifar100_teacher_", "cifar100_student_")):
            continue
        rest = name.removeprefix("cifar100_")
        for t in sorted(ARCH, key=len, reverse=True):
            if rest.startswith(t + "_"):
                for s in sorted(ARCH, key=len, reverse=True):
                    if rest[len(t) + 1:].startswith(s + "_"):
                        method = rest[len(t) + len(s) + 2:]
                        break
                break
        base = next(m for m in ("dto_kd", "mokd", "reviewkd", "kdsvd", "fitnet", "kd", "at", "ofd", "crd",
                                "pkt", "rkd", "dkd", "dist") if method.startswith(m))
        if base in ("dto_kd", "mokd"):  # the papers' own methods, not benchmark baselines
            continue
        if (t, s, base) not in seen:
            seen.add((t, s, base))
            out.append((name, t, s, base))
    return out


RECIPES = cifar_distill_recipes()


def _terms(name: str) -> dict[str, Any]:
    cfg = compose_cfg([f"+recipe={name}"])
    OmegaConf.resolve(cfg)
    out = {}
    for key, node in cfg.distill.items():
        node = OmegaConf.to_container(node)
        node.pop("weight", None)
        out[str(key)] = (instantiate(node, _convert_="all"), cfg.distill[key].get("weight", 1.0))
    return out


def test_the_recipe_list_covers_the_tables() -> None:
    methods = {m for _, _, _, m in RECIPES}
    assert {"at", "kdsvd", "ofd", "reviewkd", "pkt", "crd", "dkd", "rkd", "kd", "fitnet"} <= methods
    assert len(RECIPES) > 50


@pytest.mark.parametrize("name,teacher,student,method", RECIPES, ids=[r[0] for r in RECIPES])
def test_recipe_terms_read_the_peer_features(name: str, teacher: str, student: str, method: str) -> None:
    """The tap names are mdistiller's selection, and each is one that the test above checks tensor by
    tensor against the re-derived RepDistiller feature."""
    for key, (term, _) in _terms(name).items():
        n = sum(1 for k in all_taps(teacher) if k.startswith("stage")) - 1
        if key in PEER_METHODS:
            want_s, want_t = peer_taps(key, n)
            assert list(term.student_taps) == want_s and list(term.teacher_taps) == want_t, key
        assert set(term.student_taps) <= set(all_taps(student)), (key, term.student_taps)
        assert set(term.teacher_taps) <= set(all_taps(teacher)), (key, term.teacher_taps)


# ---------------------------------------------------------------------------------------------------
# Loss formulas on the wired features.


def _outputs(teacher: str, student: str, s_taps: list[str], t_taps: list[str], b: int | None = None
             ) -> tuple[ModelOutput, ModelOutput]:
    rs, rt = reference(student, True), reference(teacher, False)
    sl = slice(None, b)
    return (ModelOutput(rs["logits"][sl], {k: rs[k][sl] for k in s_taps}),
            ModelOutput(rt["logits"][sl], {k: rt[k][sl] for k in t_taps}))


@pytest.mark.parametrize("teacher,student", [("vgg13", "vgg8"), ("resnet56", "resnet20"), ("resnet101", "resnet34")])
def test_at_recipe_equals_mdistiller(teacher: str, student: str) -> None:
    (term, weight), = _terms(f"cifar100_{teacher}_{student}_at").values()
    s, t = _outputs(teacher, student, list(term.student_taps), list(term.teacher_taps))
    ref_s, ref_t = reference(student, True), reference(teacher, False)
    n = len(term.student_taps)
    peer = peer_at([ref_s[f"stage{k}"] for k in range(1, n + 1)], [ref_t[f"stage{k}"] for k in range(1, n + 1)])
    torch.testing.assert_close(term(s, t, torch.zeros(3)), peer)
    assert weight == 1000.0


def _teacher_model(arch: str) -> nn.Module:
    return copy.deepcopy(zoo(arch)).eval()


@pytest.mark.parametrize("teacher,student", [("resnet56", "resnet20"), ("wrn_40_2", "wrn_40_1"),
                                             ("resnet32x4", "shufflev1"), ("resnet50", "mobilenetv2")])
def test_ofd_recipe_equals_mdistiller(teacher: str, student: str) -> None:
    (term, weight), = _terms(f"cifar100_{teacher}_{student}_ofd").values()
    s, t = _outputs(teacher, student, list(term.student_taps), list(term.teacher_taps))
    term.bind_teacher(Tapped(_teacher_model(teacher)))
    term.setup({k: v.shape[1:] for k, v in s.features.items()}, {k: v.shape[1:] for k, v in t.features.items()})
    model = zoo(teacher)
    margins = [peer_margins(model.get_submodule(p).weight, model.get_submodule(p).bias)
               for p in model.BN_BEFORE_RELU]
    loss = term(s, t, torch.zeros(3))
    n = len(term.student_taps)
    peer = torch.zeros(())
    for i, (a, b) in enumerate(zip(term.student_taps, term.teacher_taps)):
        fs = term.connectors[i](s.features[a])
        ft = F.adaptive_avg_pool2d(t.features[b], fs.shape[-2:])
        peer = peer + peer_ofd_feat_loss(fs, ft, margins[i]) / 2 ** (n - i - 1)
    torch.testing.assert_close(loss, peer, rtol=1e-5, atol=1e-6)
    assert all((m < 0).all() for m in margins)  # a margin of 0 (post-ReLU estimate) would be the old bug
    assert weight == 0.001


def test_ofd_bn_margin_random_and_degenerate() -> None:
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(200, generator=g), torch.randn(200, generator=g) * 2
    torch.testing.assert_close(bn_margin(w, b), peer_margins(w, b), rtol=1e-5, atol=1e-6)
    # Degenerate: Φ(−m/s) ≤ 0.001 (−3s branch), negative γ (|γ| is used), near-zero γ.
    w = torch.tensor([0.1, -0.5, 1.0, 1e-6, 2.0])
    b = torch.tensor([1.0, -0.2, 3.2, -0.3, -5.0])
    torch.testing.assert_close(bn_margin(w, b), peer_margins(w, b), rtol=1e-5, atol=1e-6)
    assert bn_margin(w, b)[0].item() == pytest.approx(-0.3)
    # γ = 0, where the reference divides by zero: the formula's limit min(β, 0).
    torch.testing.assert_close(bn_margin(torch.zeros(3), torch.tensor([-0.4, 0.0, 0.7])),
                               torch.tensor([-0.4, 0.0, 0.0]))


def test_ofd_bn_margin_needs_the_teacher_and_names_the_fix() -> None:
    term = OFD()
    term.setup({f"preact_stage{k}": torch.Size([4, 2, 2]) for k in (1, 2, 3)},
               {f"preact_stage{k}": torch.Size([4, 2, 2]) for k in (1, 2, 3)})
    fs = {f"preact_stage{k}": torch.randn(2, 4, 2, 2) for k in (1, 2, 3)}
    with pytest.raises(RuntimeError, match="bind_teacher"):
        term(ModelOutput(torch.zeros(2, 3), fs), ModelOutput(torch.zeros(2, 3), fs), torch.zeros(2))
    from kdrun.models import cifar

    with pytest.raises(ValueError, match="margin=estimate"):
        term.bind_teacher(cifar.ShuffleV1())  # no BN_BEFORE_RELU: RepDistiller has none for ShuffleNet
    est = OFD(margin="estimate")
    est.bind_teacher(cifar.ShuffleV1())  # a no-op: the estimate needs no BN


@pytest.mark.parametrize("teacher,student", [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_40_1"),
                                             ("resnet50", "mobilenetv2")])
def test_reviewkd_recipe_equals_mdistiller(teacher: str, student: str) -> None:
    (term, weight), = _terms(f"cifar100_{teacher}_{student}_reviewkd").values()
    s, t = _outputs(teacher, student, list(term.student_taps), list(term.teacher_taps))
    term.bind(DataInfo(num_data=50000, steps_per_epoch=781))
    term.setup({k: v.shape[1:] for k, v in s.features.items()}, {k: v.shape[1:] for k, v in t.features.items()})
    term.set_progress(781 * 25)  # past the warm-up
    ref_t = reference(teacher, False)
    n = len(term.student_taps) - 1
    teacher_list = [ref_t[f"preact_stage{k}"] for k in range(1, n + 1)] + [ref_t["pre_logits"][..., None, None]]
    peer = peer_hcl(term.review(s), teacher_list)
    torch.testing.assert_close(term(s, t, torch.zeros(3)), peer)
    assert bool((teacher_list[0] < 0).any())  # the teacher side really is pre-activation


@pytest.mark.parametrize("b", [64, 16, 3])
def test_pkt_equals_the_peers_at_any_batch(b: int) -> None:
    g = torch.Generator().manual_seed(b)
    fs, ft = torch.randn(b, 32, generator=g), torch.randn(b, 48, generator=g)
    term = PKT()
    ours = term(ModelOutput(torch.zeros(b, 2), {"pre_logits": fs}), ModelOutput(torch.zeros(b, 2), {"pre_logits": ft}),
                torch.zeros(b))
    torch.testing.assert_close(ours, peer_pkt(fs, ft))
    # Degenerate: zero rows (the peers zero their NaNs) and a constant batch.
    fs[0] = 0.0
    ft[1] = 0.0
    ours = term(ModelOutput(torch.zeros(b, 2), {"pre_logits": fs}), ModelOutput(torch.zeros(b, 2), {"pre_logits": ft}),
                torch.zeros(b))
    torch.testing.assert_close(ours, peer_pkt(fs, ft))
    same = torch.ones(b, 5)
    assert term(ModelOutput(torch.zeros(b, 2), {"pre_logits": same}),
                ModelOutput(torch.zeros(b, 2), {"pre_logits": same}), torch.zeros(b)).item() == pytest.approx(0, abs=1e-7)


def test_pkt_recipe_weight_is_the_benchmarks() -> None:
    (_, weight), = _terms("cifar100_resnet56_resnet20_pkt").values()
    assert weight == 30000.0
    assert OmegaConf.load(ROOT / "conf/distill/pkt.yaml").pkt.weight == 30000.0


# ---------------------------------------------------------------------------------------------------
# DKD / ReviewKD warm-up.


def mdistiller_factors(steps_per_epoch: int, epochs: int, warmup: int = 20) -> list[float]:
    """mdistiller engine/trainer.py lines 78-107: epoch = 1, 2, ...; every iteration of an epoch passes
    that epoch to the distiller, which multiplies by min(epoch / warmup, 1) (DKD.py:72, ReviewKD.py:96)."""
    out = []
    epoch = 1
    while epoch < epochs + 1:
        for _ in range(steps_per_epoch):
            out.append(min(epoch / warmup, 1.0))
        epoch += 1
    return out


@pytest.mark.parametrize("steps_per_epoch", [781, 390])  # batch 64 (drop_last), batch 128
def test_warmup_matches_mdistiller_at_every_step(steps_per_epoch: int) -> None:
    want = mdistiller_factors(steps_per_epoch, 21)
    got = [warmup_factor(step, 20, steps_per_epoch, "epoch") for step in range(len(want))]
    assert got == want
    linear = [warmup_factor(step, 20, steps_per_epoch, "linear") for step in range(len(want))]
    assert linear[0] == pytest.approx(1 / (20 * steps_per_epoch)) and linear[-1] == 1.0
    assert all(a <= b for a, b in zip(linear, linear[1:]))


@pytest.mark.parametrize("steps_per_epoch", [781, 390])
def test_dkd_and_reviewkd_apply_the_warmup_through_bind_and_set_progress(steps_per_epoch: int) -> None:
    want = mdistiller_factors(steps_per_epoch, 21)
    g = torch.Generator().manual_seed(1)
    zs, zt, y = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g), torch.randint(0, 10, (5,), generator=g)
    raw = dkd_loss(zs, zt, y, 1.0, 8.0, 4.0)
    cfg = OmegaConf.load(ROOT / "conf/distill/dkd.yaml").dkd
    node = OmegaConf.to_container(cfg)
    node.pop("weight")
    dkd = instantiate(node)
    assert isinstance(dkd, DKD) and dkd.warmup_epochs == 20 and dkd.warmup == "epoch"
    dkd.bind(DataInfo(num_data=50000, steps_per_epoch=steps_per_epoch))
    steps = sorted({0, 1, steps_per_epoch - 1, steps_per_epoch, 5 * steps_per_epoch + 7, 19 * steps_per_epoch - 1,
                    19 * steps_per_epoch, 20 * steps_per_epoch, len(want) - 1})
    for step in steps:
        dkd.set_progress(step)
        assert dkd(ModelOutput(zs), ModelOutput(zt), y).item() == pytest.approx(raw.item() * want[step], rel=1e-6)
    node = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/distill/reviewkd.yaml").reviewkd)
    node.pop("weight")
    rkd = instantiate(node, _convert_="all")
    assert isinstance(rkd, ReviewKD) and rkd.warmup_epochs == 20 and rkd.warmup == "epoch"
    rkd.bind(DataInfo(num_data=50000, steps_per_epoch=steps_per_epoch))
    feats = {"stage1": torch.randn(2, 4, 4, 4), "stage2": torch.randn(2, 4, 2, 2), "stage3": torch.randn(2, 8, 1, 1),
             "pre_logits": torch.randn(2, 8)}
    tfeats = {f"preact_{k}" if k != "pre_logits" else k: v + 0.1 for k, v in feats.items()}
    rkd.setup({k: v.shape[1:] for k, v in feats.items()}, {k: v.shape[1:] for k, v in tfeats.items()})
    rkd.eval()
    s, t = ModelOutput(torch.zeros(2, 3), feats), ModelOutput(torch.zeros(2, 3), tfeats)
    rkd.set_progress(10 ** 6)
    full = rkd(s, t, torch.zeros(2)).item()
    for step in steps:
        rkd.set_progress(step)
        assert rkd(s, t, torch.zeros(2)).item() == pytest.approx(full * want[step], rel=1e-6)


def test_warmup_without_bind_is_a_clear_error() -> None:
    dkd = DKD(warmup_epochs=20)
    with pytest.raises(RuntimeError, match="steps per epoch"):
        dkd(ModelOutput(torch.randn(2, 3)), ModelOutput(torch.randn(2, 3)), torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------------
# CRD negatives.


def test_other_class_negatives_as_repdistiller_exact_mode() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (500,))
    index = torch.tensor([3, 17, 250, 499])
    idx = other_class_negatives(index, labels, 300)
    assert idx.shape == (4, 301)
    assert torch.equal(idx[:, 0], index)  # mode 'exact': the positive is the anchor itself
    for row, i in zip(idx, index):
        neg = row[1:]
        assert bool((labels[neg] != labels[i]).all())  # cls_negative: other classes only
        assert neg.unique().numel() == neg.numel()  # replace=False while K <= len(cls_negative)
    # K larger than the other-class pool: replace=True, still other classes only.
    small = torch.tensor([0, 0, 0, 1, 1])
    idx = other_class_negatives(torch.tensor([0, 3]), small, 7)
    assert set(idx[0, 1:].tolist()) <= {3, 4} and set(idx[1, 1:].tolist()) <= {0, 1, 2}
    # Uniform over the other-class samples (chi-square bound over many draws).
    counts = torch.zeros(500)
    for _ in range(40):
        counts += torch.bincount(other_class_negatives(torch.tensor([3]), labels, 300)[0, 1:], minlength=500)
    allowed = labels != labels[3]
    expect = 40 * 300 / int(allowed.sum())
    chi2 = float(((counts[allowed] - expect) ** 2 / expect).sum())
    dof = int(allowed.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof)
    assert counts[~allowed].sum() == 0
    with pytest.raises(ValueError, match="uniform"):
        other_class_negatives(torch.tensor([0]), torch.zeros(5, dtype=torch.long), 2)


def _crd_term(**kw: Any) -> tuple[CRD, dict[str, torch.Size]]:
    term = CRD(feat_dim=4, num_negatives=8, **kw)
    return term, {"pre_logits": torch.Size([6])}


def test_crd_binds_num_data_and_labels_and_draws_other_class() -> None:
    torch.manual_seed(1)
    labels = torch.arange(40) % 4
    term, shp = _crd_term()
    term.bind(DataInfo(num_data=40, steps_per_epoch=5, labels=labels))
    term.setup(shp, shp)
    assert term.num_data == 40 and term.memory_s.shape == (40, 4)
    index = torch.tensor([0, 5, 10])
    f = torch.randn(3, 6)
    term(ModelOutput(torch.zeros(3, 2), {"pre_logits": f}), ModelOutput(torch.zeros(3, 2), {"pre_logits": f}),
         torch.zeros(3), index=index)
    used = term._last_negatives[1]
    assert torch.equal(used[:, 0], index)
    assert bool((labels[used[:, 1:]] != labels[index].unsqueeze(1)).all())
    # labels are data, not state: not in the checkpoint
    assert "labels" not in term.state_dict()


def test_crd_errors_name_the_fix() -> None:
    term, shp = _crd_term()
    term.bind(DataInfo(num_data=40, steps_per_epoch=5, labels=None))
    with pytest.raises(ValueError, match="other_class.*uniform"):
        term.setup(shp, shp)
    uni, _ = _crd_term(negatives="uniform")
    uni.bind(DataInfo(num_data=40, steps_per_epoch=5))
    uni.setup(shp, shp)
    fixed, _ = _crd_term(num_data=30)
    with pytest.raises(ValueError, match="num_data"):
        fixed.bind(DataInfo(num_data=40, steps_per_epoch=5))
    assert OmegaConf.load(ROOT / "conf/distill/crd.yaml").crd.negatives == "other_class"


def test_data_modules_give_labels() -> None:
    dm = build_synthetic(num_classes=7, train_size=64, val_size=8)
    labels = dm.train_labels()
    assert labels is not None and labels.shape == (64,)
    assert labels.tolist() == [dm.train[i][1] for i in range(64)]
    dg = build_digits()
    labels = dg.train_labels()
    assert labels is not None and labels.tolist()[:20] == [dg.train[i][1] for i in range(20)]

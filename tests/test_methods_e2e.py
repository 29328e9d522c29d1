"""Every balancer, every distillation loss and every projector runs a short digits KD run through the
real engine, with finite losses, and (balancers) logs π, conflict and dominance."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONF, QUICK, event_scalars, run

BALANCERS = sorted(p.stem for p in (CONF / "balancer").glob("*.yaml"))
# token_matching and token_matching_vkd distil ViDT detectors' tokens and are exercised in tests/detection.
# Named options (a `defaults:` list on a base option plus a recipe's values, e.g. dkd_beta2, ofd_stages4)
# are the base's loss with other settings, often for another model family (CIFAR stages, DeiT's
# distillation token): they compose and validate on their recipes in tests/recipes; the base trains here.
LOSSES = sorted(p.stem for p in (CONF / "distill").glob("*.yaml")
                if p.stem != "none" and not p.stem.startswith("token_matching")
                and "defaults" not in (yaml.safe_load(p.read_text()) or {}))
PROJECTORS = sorted(p.stem for p in (CONF / "projector").glob("*.yaml"))


def base(teacher: str, *extra: str) -> list[str]:
    return ["teacher=convnet_l", f"teacher.checkpoint={teacher}", *QUICK, "logger.grad_stats_every=2",
            "logger.log_every=2", "trainer.max_steps=4", "trainer.epochs=1", *extra]


@pytest.mark.parametrize("balancer", BALANCERS)
def test_every_balancer_trains_and_logs_diagnostics(digits_teacher: str, tmp_path: Path, balancer: str) -> None:
    # DOT is the update itself: the optimiser must be plain SGD (kdrun/balancers/dot.py, Balancer.check_run)
    own_update = ["optimizer=sgd_plain", "trainer.grad_clip=0"] if balancer == "dot" else []
    res = run(base(digits_teacher, "distill=kl", f"balancer={balancer}", *own_update), tmp_path)
    assert res["steps"] == 4 and res["nonfinite_skipped"] == 0
    s = event_scalars(tmp_path)
    for tag in ("pi/distill", "pi/task", "grad/conflict", "grad/cosine", "grad/dominance", "loss/ce", "loss/kl"):
        assert tag in s, tag
        assert all(math.isfinite(v) for _, v in s[tag]), (tag, s[tag])


@pytest.mark.parametrize("loss", LOSSES)
def test_every_distill_loss_trains(digits_teacher: str, tmp_path: Path, loss: str) -> None:
    extra = [f"distill={loss}", "projector=linear"]
    if loss == "crd":
        extra.append("distill.crd.num_negatives=64")
    if loss == "deit_hard":
        extra.append("distill.deit_hard.student_logits=logits")  # the ConvNet has no distillation token
    # The digits ConvNet has no pre-activation taps (the CIFAR zoo's preact_stageK, which OFD and ReviewKD
    # read by default as mdistiller does) and no BatchNorm declared before a ReLU for OFD's margin.
    stages = "[stage1,stage2,stage3]"
    if loss == "ofd":
        extra += [f"distill.ofd.student_taps={stages}", f"distill.ofd.teacher_taps={stages}",
                  "distill.ofd.margin=estimate"]
    if loss == "reviewkd":
        extra.append("distill.reviewkd.teacher_taps=[stage1,stage2,stage3,pre_logits]")
    res = run(base(digits_teacher, *extra), tmp_path)
    assert res["steps"] == 4 and res["nonfinite_skipped"] == 0
    s = event_scalars(tmp_path)
    assert all(math.isfinite(v) for _, v in s[f"loss/{loss}"])


@pytest.mark.parametrize("projector", PROJECTORS)
def test_every_projector_trains_with_feature_matching(digits_teacher: str, tmp_path: Path, projector: str) -> None:
    student = ["student=convnet_l"] if projector == "identity" else []  # identity needs equal dims
    res = run(base(digits_teacher, "distill=[kl,smooth_l1]", f"projector={projector}", *student), tmp_path)
    assert res["steps"] == 4 and res["nonfinite_skipped"] == 0
    s = event_scalars(tmp_path)
    assert all(math.isfinite(v) for _, v in s["loss/smooth_l1"])


def test_three_objectives_mokd_remark_a1(digits_teacher: str, tmp_path: Path) -> None:
    res = run(base(digits_teacher, "distill=[kl,smooth_l1]", "projector=orthogonal", "balancer=dto",
                   "task.objectives={kl:[kl],feature:[smooth_l1],task:[ce]}"), tmp_path)
    assert res["steps"] == 4
    s = event_scalars(tmp_path)
    for tag in ("pi/kl", "pi/feature", "pi/task", "grad/cosine/kl__feature", "grad/cosine/kl__task"):
        assert tag in s, tag


@pytest.mark.parametrize("balancer", ["dto_exact", "mgda", "upgrad"])
def test_feature_space_gradients_run_with_gram_balancers(digits_teacher: str, tmp_path: Path, balancer: str) -> None:
    res = run(base(digits_teacher, "distill=kl", f"balancer={balancer}", "trainer.grad_space=features"), tmp_path)
    assert res["steps"] == 4 and res["nonfinite_skipped"] == 0
    s = event_scalars(tmp_path)
    assert all(math.isfinite(v) for _, v in s["grad/dominance"])


def test_feature_space_is_refused_where_parameter_gradients_are_needed() -> None:
    from kdrun.config import ConfigError, validate
    from tests.conftest import compose_cfg

    with pytest.raises(ConfigError, match="cannot run with trainer.grad_space=features"):
        validate(compose_cfg(["teacher=convnet_l", "distill=kl", "balancer=cross_batch",
                              "trainer.grad_space=features"]))


def test_feature_loss_with_mismatched_dims_and_no_projector_names_both_dims(digits_teacher: str,
                                                                            tmp_path: Path) -> None:
    from kdrun.projectors.identity import ProjectorDimError

    with pytest.raises(ProjectorDimError, match="student feature dim 32 != teacher feature dim 128"):
        run(base(digits_teacher, "distill=smooth_l1", "projector=identity"), tmp_path)

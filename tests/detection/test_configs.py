"""The detection config options compose, validate and build what they name."""
from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdrun.config import ConfigError, validate
from tests.conftest import compose_cfg

BASE = ["task=detection", "distill=token_matching", "optimizer=adamw"]


@pytest.mark.parametrize("student,teacher", [("vidt_nano", "vidt_base"), ("vidt_tiny", "vidt_small"),
                                             ("vidt_small", "vidt_base")])
@pytest.mark.parametrize("dataset", ["coco", "coco_synthetic"])
def test_detection_configs_validate(student: str, teacher: str, dataset: str) -> None:
    cfg = compose_cfg([*BASE, f"dataset={dataset}", f"student={student}", f"teacher={teacher}"])
    validate(cfg)
    assert cfg.student.model.num_classes == (91 if dataset == "coco" else 4)
    assert cfg.distill.token_matching.weight == 4.0  # the release's --distil_loss_coef
    assert cfg.task.class_weight == 2.0 and cfg.task.bbox_weight == 5.0 and cfg.task.giou_weight == 2.0


def test_bad_values_fail_before_anything_is_built() -> None:
    with pytest.raises(ConfigError, match="det_tokens"):
        validate(compose_cfg([*BASE, "dataset=coco_synthetic", "student=vidt_nano", "teacher=vidt_base",
                              "student.model.det_tokens=0"]))
    with pytest.raises(ConfigError, match="focal_gamma"):
        validate(compose_cfg([*BASE, "dataset=coco_synthetic", "student=vidt_nano", "teacher=vidt_base",
                              "task.focal_gamma=-1"]))


def test_task_and_loss_build_from_config() -> None:
    cfg = compose_cfg([*BASE, "dataset=coco_synthetic", "student=vidt_nano", "teacher=vidt_base",
                       "task.objectives=remark_a1"])
    task = instantiate(cfg.task, _convert_="all")
    assert task.objective_groups(["token_matching"]) == {"distill": ["token_matching"], "class": ["class"],
                                                        "box": ["bbox", "giou"]}
    node = OmegaConf.to_container(cfg, resolve=True)["distill"]["token_matching"]
    node.pop("weight")
    loss = instantiate(node)
    assert type(loss).__name__ == "TokenMatching" and loss.families == ("patch", "body", "neck")


def test_bad_token_distillation_values_name_their_key() -> None:
    base = ["task=detection", "optimizer=adamw", "dataset=coco_synthetic", "student=vidt_nano", "teacher=vidt_base"]
    with pytest.raises(ConfigError, match="patch_projectors.*per_scale"):
        validate(compose_cfg([*base, "distill=token_matching", "distill.token_matching.patch_projectors=one"]))
    with pytest.raises(ConfigError, match="token_matching_vkd.eps"):
        validate(compose_cfg([*base, "distill=token_matching_vkd", "distill.token_matching_vkd.eps=-1"]))
    with pytest.raises(ConfigError, match="metric"):
        validate(compose_cfg([*base, "distill=token_matching", "projector=subspace", "projector.metric=diag"]))
    validate(compose_cfg([*base, "distill=token_matching_vkd", "projector=orthogonal", "projector.affine=true"]))

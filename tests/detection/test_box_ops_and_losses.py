"""Box conversions, GIoU and the focal loss on hand-computed cases; the detection task's loss terms."""
from __future__ import annotations

import math

import pytest
import torch

from kdrun.config import ConfigError
from kdrun.models.taps import ModelOutput
from kdrun.models.vidt.box_ops import (box_cxcywh_to_xyxy, box_iou, box_xywh_to_xyxy, box_xyxy_to_cxcywh,
                                       box_xyxy_to_xywh, generalized_box_iou)
from kdrun.tasks.detection import Detection, sigmoid_focal_loss


def test_box_conversions_round_trip() -> None:
    b = torch.tensor([[0.5, 0.4, 0.2, 0.6], [0.1, 0.9, 0.05, 0.1]])
    xyxy = box_cxcywh_to_xyxy(b)
    assert torch.allclose(xyxy[0], torch.tensor([0.4, 0.1, 0.6, 0.7]))
    assert torch.allclose(box_xyxy_to_cxcywh(xyxy), b)
    assert torch.allclose(box_xywh_to_xyxy(box_xyxy_to_xywh(xyxy)), xyxy)


def test_giou_hand_computed() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [3.0, 0.0, 4.0, 1.0]])
    iou, union = box_iou(a, b)
    assert torch.allclose(iou, torch.tensor([[1 / 7, 1.0, 0.0]]))
    assert torch.allclose(union, torch.tensor([[7.0, 4.0, 5.0]]))
    # GIoU = IoU − |C \ (A ∪ B)| / |C|: enclosing boxes 3×3, 2×2, 4×2
    expected = torch.tensor([[1 / 7 - 2 / 9, 1.0, 0.0 - 3 / 8]])
    assert torch.allclose(generalized_box_iou(a, b), expected)
    with pytest.raises(ValueError, match="x1 >= x0"):
        generalized_box_iou(torch.tensor([[2.0, 0, 1, 1]]), a)


def test_focal_loss_hand_computed() -> None:
    # logit 0 → p = 0.5: FL = α_t (1 − 0.5)² ln 2
    logits = torch.zeros(1, 2)
    targets = torch.tensor([[1.0, 0.0]])
    fl = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    assert torch.allclose(fl, torch.tensor([[0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)]]))
    # a confident correct prediction costs almost nothing, a confident wrong one a lot
    p = torch.tensor([[4.0, -4.0]])
    fl = sigmoid_focal_loss(p, targets)
    q = torch.sigmoid(torch.tensor(4.0))
    base = (1 - q) ** 2 * -torch.log(q)  # p_t = q for both entries; α_t = 0.25 (y = 1), 0.75 (y = 0)
    assert torch.allclose(fl, torch.stack([0.25 * base, 0.75 * base])[None], atol=1e-7)
    # γ = 0 and no α: plain binary cross-entropy
    x = torch.randn(3, 4)
    y = (torch.rand(3, 4) > 0.5).float()
    assert torch.allclose(sigmoid_focal_loss(x, y, alpha=-1, gamma=0.0),
                          torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none"))


def _output(logits: torch.Tensor, boxes: torch.Tensor) -> ModelOutput:
    # [B, L, Q, ·] levels, the last is the prediction
    return ModelOutput(logits[:, -1], {"pred_boxes": boxes[:, -1], "all_logits": logits, "all_boxes": boxes})


def test_detection_losses_hand_computed_single_level() -> None:
    task = Detection(aux_loss=False)
    # one image, two queries, 3 classes; one target of class 2 at query 1's box
    logits = torch.full((1, 1, 2, 3), -10.0)
    logits[0, 0, 1, 2] = 10.0
    boxes = torch.tensor([[[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.4, 0.2]]]])
    target = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]])}]
    terms = task.losses(_output(logits, boxes), target)
    assert set(terms) == {"class", "bbox", "giou"}
    assert terms["bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["giou"].item() == pytest.approx(0.0, abs=1e-6)
    # every entry is a confident correct call: FL ≈ Σ α_t e^{-20}·… ≈ 0
    assert terms["class"].item() < 1e-6
    # shift the box: L1 = |Δcx| = 0.1, weighted by 5; GIoU of [0.3,0.4,0.7,0.6] vs [0.4,0.4,0.8,0.6]
    boxes2 = boxes.clone()
    boxes2[0, 0, 1, 0] = 0.6
    terms = task.losses(_output(logits, boxes2), target)
    assert terms["bbox"].item() == pytest.approx(5 * 0.1, rel=1e-5)
    iou = 0.3 * 0.2 / (0.5 * 0.2)  # intersection 0.3×0.2, union = enclosing 0.5×0.2
    assert terms["giou"].item() == pytest.approx(2 * (1 - iou), rel=1e-5)


def test_detection_losses_sum_over_levels_and_normalise_by_boxes() -> None:
    torch.manual_seed(0)
    task = Detection()
    logits = torch.randn(2, 3, 5, 4, requires_grad=True)
    boxes = torch.rand(2, 3, 5, 4).mul(0.3).add(0.2).requires_grad_()
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.1]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    terms = task.losses(_output(logits, boxes), targets)
    # the sum over levels equals the per-level losses added up (with ViDT's weights 2 / 5 / 2)
    n = torch.tensor(3.0)
    manual = {k: 0.0 for k in terms}
    for lvl in range(3):
        for k, v in task.level_losses(logits[:, lvl], boxes[:, lvl], targets, n).items():
            manual[k] += v.item() * {"class": 2, "bbox": 5, "giou": 2}[k]
    for k in terms:
        assert terms[k].item() == pytest.approx(manual[k], rel=1e-5)
    sum(terms.values()).backward()
    assert logits.grad is not None and boxes.grad is not None and boxes.grad.abs().sum() > 0
    # only the last level without aux_loss
    last = Detection(aux_loss=False).losses(_output(logits, boxes), targets)
    assert last["bbox"].item() < terms["bbox"].item()
    # no targets at all: only the (background) focal term
    empty = task.losses(_output(logits, boxes), [{"labels": torch.zeros(0, dtype=torch.long),
                                                  "boxes": torch.zeros(0, 4)}] * 2)
    assert empty["bbox"].item() == 0.0 and empty["giou"].item() == 0.0 and empty["class"].item() > 0


def test_objective_groups() -> None:
    task = Detection()
    assert task.objective_groups(["token_matching"]) == {"distill": ["token_matching"],
                                                        "task": ["class", "bbox", "giou"]}
    assert task.objective_groups([]) == {"task": ["class", "bbox", "giou"]}
    a1 = Detection(objectives="remark_a1")  # MoKD Remark A.1
    assert a1.objective_groups(["token_matching"]) == {"distill": ["token_matching"], "class": ["class"],
                                                      "box": ["bbox", "giou"]}
    custom = Detection(objectives={"d": ["token_matching"], "c": ["class"], "b": ["bbox", "giou"]})
    assert list(custom.objective_groups(["token_matching"])) == ["d", "c", "b"]
    with pytest.raises(ConfigError, match="unused: giou"):
        Detection(objectives={"d": ["token_matching"], "c": ["class", "bbox"]}).objective_groups(["token_matching"])
    with pytest.raises(ConfigError, match="remark_a1"):
        Detection(objectives="remark_a2")
    terms = {"token_matching": torch.tensor(1.0), "class": torch.tensor(2.0), "bbox": torch.tensor(3.0),
             "giou": torch.tensor(4.0)}
    assert {k: v.item() for k, v in Detection.group(terms, a1.objective_groups(["token_matching"])).items()} == \
        {"distill": 1.0, "class": 2.0, "box": 7.0}

"""Box conversions and (generalised) IoU, as used by DETR-style detectors.

Boxes are ``cxcywh`` (centre x, centre y, width, height) — the detector's output format, normalised to
[0, 1] by the size of the un-padded image — or ``xyxy`` (corners), or COCO's ``xywh`` (top-left corner,
width, height; the json format).

Generalised IoU (Rezatofighi et al., CVPR 2019, Alg. 1):

    GIoU(A, B) = IoU(A, B) − |C \\ (A ∪ B)| / |C|,   C the smallest box enclosing A and B,

in [−1, 1]; the DETR/ViDT box loss is 1 − GIoU.
"""
from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(x: Tensor) -> Tensor:
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(x: Tensor) -> Tensor:
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_xyxy_to_xywh(x: Tensor) -> Tensor:
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)


def box_xywh_to_xyxy(x: Tensor) -> Tensor:
    x0, y0, w, h = x.unbind(-1)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``xyxy`` boxes (negative extents count as zero)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of ``xyxy`` boxes ``[N, 4]`` × ``[M, 4]`` → (IoU ``[N, M]``, union ``[N, M]``)."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, check: bool = True) -> Tensor:
    """Pairwise GIoU of ``xyxy`` boxes ``[N, 4]`` × ``[M, 4]`` → ``[N, M]`` (Rezatofighi et al. 2019).

    Degenerate boxes (x1 < x0) would give a meaningless value, so with ``check`` they are rejected
    (DETR asserts the same). The training loss passes ``check=False``: its boxes come from a sigmoid in
    ``cxcywh`` and cannot be degenerate, and the check would cost a host sync per decoder layer.
    """
    if check and (not bool((boxes1[:, 2:] >= boxes1[:, :2]).all())
                  or not bool((boxes2[:, 2:] >= boxes2[:, :2]).all())):
        raise ValueError("generalized_box_iou needs xyxy boxes with x1 >= x0 and y1 >= y0")
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area

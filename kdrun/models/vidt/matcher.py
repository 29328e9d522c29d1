"""Hungarian matching of predictions to ground truth (DETR, Carion et al., ECCV 2020, Eq. 1; with
Deformable DETR's focal classification cost).

For image b with predictions i and targets j the cost is

    C_ij = λ_cls · [FL⁺(p_i[c_j]) − FL⁻(p_i[c_j])] + λ_L1 · ‖b_i − b̂_j‖₁ − λ_giou · GIoU(b_i, b̂_j),

    FL⁺(p) = α (1 − p)^γ (−log p),   FL⁻(p) = (1 − α) p^γ (−log(1 − p)),   p = sigmoid(logit),

with ViDT's weights λ_cls = 2, λ_L1 = 5, λ_giou = 2 and α = 0.25, γ = 2; boxes are cxcywh in [0, 1]. The
one-to-one assignment minimising Σ C is ``scipy.optimize.linear_sum_assignment`` on each image's
``[Q, n_b]`` block.
"""
from __future__ import annotations

from typing import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from kdrun.models.vidt.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


@torch.no_grad()
def matching_cost(logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor,
                  cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                  alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """The cost matrix ``[N, M]`` between N predictions (``logits [N, C]``, ``boxes [N, 4]``) and M
    targets (``tgt_labels [M]``, ``tgt_boxes [M, 4]``); see the module docstring."""
    prob = logits.float().sigmoid()
    neg = (1 - alpha) * prob.pow(gamma) * (-(1 - prob + 1e-8).log())
    pos = alpha * (1 - prob).pow(gamma) * (-(prob + 1e-8).log())
    c_class = pos[:, tgt_labels] - neg[:, tgt_labels]
    c_bbox = torch.cdist(boxes.float(), tgt_boxes.float(), p=1)
    c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes.float()), box_cxcywh_to_xyxy(tgt_boxes.float()),
                                  check=False)
    return cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou


class HungarianMatcher:
    """Per-image optimal one-to-one assignment (see the module docstring)."""

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0) -> None:
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def __call__(self, logits: Tensor, boxes: Tensor, targets: Sequence[dict[str, Tensor]]
                 ) -> list[tuple[Tensor, Tensor]]:
        """``logits [B, Q, C]``, ``boxes [B, Q, 4]``, ``targets``: per image ``labels [n]``, ``boxes [n, 4]``.
        Returns per image (prediction indices, target indices), each ``[min(Q, n)]`` int64 on CPU."""
        b, q = logits.shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in range(b)]
        labels = torch.cat([t["labels"] for t in targets])
        tboxes = torch.cat([t["boxes"] for t in targets])
        # one batched cost computation (fp32 even under autocast: cdist in bf16 would reorder near-ties),
        # then one small assignment problem per image
        with torch.autocast(logits.device.type, enabled=False):
            cost = matching_cost(logits.flatten(0, 1), boxes.flatten(0, 1), labels, tboxes, self.cost_class,
                                 self.cost_bbox, self.cost_giou, self.alpha, self.gamma)
        # a diverged model gives NaN costs, which linear_sum_assignment rejects; the loss is then
        # non-finite anyway and the engine skips the step, so any assignment will do
        cost = torch.nan_to_num(cost.view(b, q, -1), nan=1e8, posinf=1e8, neginf=-1e8).cpu()
        out = []
        for i, c in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(c[i].numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return out

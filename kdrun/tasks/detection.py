"""Object detection (COCO) with a DETR-style set prediction loss: the task interface of
:mod:`kdrun.tasks.base` for ViDT (Song et al., ICLR 2022) students and teachers.

Task terms (MoKD Appendix A Eq. 2, L_task = L_cls + L_bbox + L_giou), for every prediction level — the
body's [DET] tokens and each decoder layer (the auxiliary outputs) — after Hungarian matching of that
level's predictions to the targets (:class:`~kdrun.models.vidt.matcher.HungarianMatcher`, costs class 2,
L1 5, GIoU 2):

* ``class``: λ_cls · Σ_{queries, classes} FL(p, y) / N_box, the sigmoid focal loss (Lin et al. 2017,
  α 0.25, γ 2) against one-hot targets (all zeros for unmatched queries), λ_cls = 2;
* ``bbox``:  λ_L1 · Σ_matched ‖b − b̂‖₁ / N_box, λ_L1 = 5 (cxcywh in [0, 1]);
* ``giou``:  λ_giou · Σ_matched (1 − GIoU(b, b̂)) / N_box, λ_giou = 2;

each summed over the levels (with ``aux_loss``; else the last level only), N_box the number of target
boxes in the batch averaged over ranks (at least 1) — exactly ViDT's ``SetCriterion`` total, split into
three named terms. The weights are inside the terms, so the fixed balancer with unit weights trains
the original objective.

Objectives: by default ``distill`` (every distillation term) and ``task`` (class + bbox + giou), DTO-KD
§4.3 / MoKD Eq. 2. ``objectives: remark_a1`` gives MoKD Remark A.1's three objectives ``distill``,
``class`` (= class) and ``box`` (= bbox + giou); any explicit mapping is accepted too.

Evaluation: the model on every val image once, Deformable DETR's post-processing (top 100 sigmoid scores
over queries × classes), detections in COCO json, ``pycocotools`` COCOeval → AP, AP50, AP75, APs, APm,
APl in [0, 1] (COCO's −1 where an area range has no ground truth). If ``results_path`` is set the
detections json is written there.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.runtime import distributed
from kdrun.config import ConfigError, Ge, Le
from kdrun.models.taps import ModelOutput
from kdrun.models.vidt.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_xywh, generalized_box_iou
from kdrun.models.vidt.detector import postprocess as detr_postprocess
from kdrun.models.vidt.matcher import HungarianMatcher
from kdrun.tasks.base import group, objective_groups

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss (Lin et al., ICCV 2017, Eq. 5) on logits:
    FL = α_t (1 − p_t)^γ · BCE(logit, y), p_t = p if y = 1 else 1 − p, α_t = α if y = 1 else 1 − α
    (``alpha < 0`` disables the α weighting)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def _output(s: Any) -> tuple[Tensor, dict[str, Tensor]]:
    if isinstance(s, ModelOutput):
        return s.logits, s.features
    if isinstance(s, dict):  # the original release's output dict
        feats = {"pred_boxes": s["pred_boxes"]}
        return s["pred_logits"], feats
    raise TypeError(f"a detector output must be a ModelOutput, not {type(s).__name__}")


class Detection:
    """The detection task (see the module docstring)."""

    task_terms = ("class", "bbox", "giou")
    primary_metric = "AP"
    metric_keys = METRIC_KEYS

    def __init__(
        self,
        objectives: Union[dict[str, list[str]], Literal["remark_a1"], None] = None,
        class_weight: Annotated[float, Ge(0.0)] = 2.0,
        bbox_weight: Annotated[float, Ge(0.0)] = 5.0,
        giou_weight: Annotated[float, Ge(0.0)] = 2.0,
        cost_class: Annotated[float, Ge(0.0)] = 2.0,
        cost_bbox: Annotated[float, Ge(0.0)] = 5.0,
        cost_giou: Annotated[float, Ge(0.0)] = 2.0,
        focal_alpha: Annotated[float, Le(1.0)] = 0.25,
        focal_gamma: Annotated[float, Ge(0.0)] = 2.0,
        aux_loss: bool = True,
        topk: Annotated[int, Ge(1)] = 100,
    ) -> None:
        if isinstance(objectives, str) and objectives != "remark_a1":
            raise ConfigError(f"task.objectives={objectives!r} is not valid; use null, remark_a1 or a mapping "
                              "{objective: [terms]}.")
        self.objectives_spec: Any = objectives if isinstance(objectives, str) or objectives is None else \
            {k: list(v) for k, v in objectives.items()}
        self.weights = {"class": float(class_weight), "bbox": float(bbox_weight), "giou": float(giou_weight)}
        self.matcher = HungarianMatcher(cost_class, cost_bbox, cost_giou, alpha=0.25, gamma=2.0)
        self.focal_alpha, self.focal_gamma = float(focal_alpha), float(focal_gamma)
        self.aux_loss = bool(aux_loss)
        self.topk = int(topk)
        self.results_path: str | os.PathLike | None = None  # set by the engine: where evaluate() writes json

    # -- batches ---------------------------------------------------------------------------------
    @staticmethod
    def collate_fn(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[Any, list[dict[str, Any]]]:
        from kdrun.data.coco import collate

        return collate(batch)

    @staticmethod
    def batch_to_device(batch: Any, device: torch.device) -> tuple[Any, list[dict[str, Any]], Tensor | None]:
        """``(ImageBatch, targets[, index])`` from :func:`kdrun.data.coco.collate` → on ``device``."""
        images, targets = batch[0], batch[1]
        index = batch[2].to(device, non_blocking=True) if len(batch) > 2 and isinstance(batch[2], Tensor) else None
        images = images.to(device, non_blocking=True)
        targets = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
                   for t in targets]
        return images, targets, index

    @staticmethod
    def batch_size(inputs: Any) -> int:
        return int(inputs.tensors.shape[0] if hasattr(inputs, "tensors") else inputs.shape[0])

    # -- losses ----------------------------------------------------------------------------------
    def level_losses(self, logits: Tensor, boxes: Tensor, targets: Sequence[dict[str, Tensor]],
                     num_boxes: Tensor) -> dict[str, Tensor]:
        """Unweighted focal / L1 / (1 − GIoU) sums over one prediction level, divided by ``num_boxes``
        (ViDT's ``SetCriterion.loss_labels`` / ``loss_boxes``)."""
        logits, boxes = logits.float(), boxes.float()
        indices = self.matcher(logits, boxes, targets)
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(logits.device)
        src_idx = torch.cat([src for src, _ in indices]).to(logits.device)
        onehot = torch.zeros_like(logits)
        if len(src_idx):
            labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
            onehot[batch_idx, src_idx, labels.to(logits.device)] = 1.0
        focal = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma).sum() / num_boxes
        src_boxes = boxes[batch_idx, src_idx]
        tgt_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)]).to(boxes)
        l1 = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes),
                                              check=False))
        return {"class": focal, "bbox": l1, "giou": (1 - giou).sum() / num_boxes}

    def losses(self, s: Any, targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        logits, feats = _output(s)
        if self.aux_loss and "all_logits" in feats:
            levels = list(zip(feats["all_logits"].unbind(1), feats["all_boxes"].unbind(1)))
        else:
            levels = [(logits, feats["pred_boxes"])]
        # N_box averaged over ranks, as DETR (kept on the device: no host sync)
        n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=logits.device)
        num_boxes = (distributed.all_reduce_sum(n) / distributed.world_size()).clamp(min=1.0)
        terms = {k: logits.new_zeros((), dtype=torch.float32) for k in self.task_terms}
        for lg, bx in levels:
            for k, v in self.level_losses(lg, bx, targets, num_boxes).items():
                terms[k] = terms[k] + v
        return {k: self.weights[k] * v for k, v in terms.items()}

    def objective_groups(self, distill_terms: Iterable[str]) -> dict[str, list[str]]:
        distill_terms = list(distill_terms)
        spec = self.objectives_spec
        if spec == "remark_a1":  # MoKD Remark A.1: (distill, class, box)
            spec = ({"distill": distill_terms} if distill_terms else {}) | {"class": ["class"],
                                                                          "box": ["bbox", "giou"]}
        return objective_groups(self.task_terms, spec, distill_terms)

    @staticmethod
    def group(terms: dict[str, Tensor], groups: dict[str, list[str]]) -> dict[str, Tensor]:
        return group(terms, groups)

    # -- evaluation ------------------------------------------------------------------------------
    def postprocess(self, out: Any, targets: Sequence[dict[str, Any]]) -> list[dict[str, Tensor]]:
        """Deformable DETR's post-processing of one batch of model outputs: per image the ``topk``
        ``scores``, ``labels`` and ``boxes`` (xyxy in original-image pixels), as tensors on the model's
        device (what ``kdrun eval`` times as the post-processing)."""
        logits, feats = _output(out)
        sizes = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(logits.device)
        return detr_postprocess(logits, feats["pred_boxes"], sizes, self.topk)

    def detections(self, out: Any, targets: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """COCO json results (``image_id``, ``category_id``, ``bbox`` xywh in original pixels, ``score``)
        for one batch of model outputs."""
        res = self.postprocess(out, targets)
        dets = []
        for t, r in zip(targets, res):
            image_id = int(t["image_id"])
            for score, label, box in zip(r["scores"].tolist(), r["labels"].tolist(),
                                         box_xyxy_to_xywh(r["boxes"]).tolist()):
                dets.append({"image_id": image_id, "category_id": int(label),
                             "bbox": [round(v, 3) for v in box], "score": round(float(score), 5)})
        return dets

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device, autocast_ctx: Any = None,
                 channels_last: bool = False) -> dict[str, float]:
        """COCO box AP of ``model`` on ``loader``'s data set (every image once, gathered over ranks).

        ``autocast_ctx``: a context manager (or a callable returning one) for the forward passes;
        ``channels_last``: the image tensors in channels-last memory format."""
        was_training = model.training
        model.eval()
        dets: list[dict[str, Any]] = []
        seen: set[int] = set()
        with torch.inference_mode():
            for batch in loader:
                images, targets, _ = self.batch_to_device(batch, device)
                if channels_last:
                    images.tensors = images.tensors.contiguous(memory_format=torch.channels_last)
                with _context(autocast_ctx):
                    out = model(images)
                dets.extend(self.detections(out, targets))
                seen.update(int(t["image_id"]) for t in targets)
        model.train(was_training)
        if distributed.is_dist():
            import torch.distributed as dist

            gathered: list[Any] = [None] * distributed.world_size()
            dist.all_gather_object(gathered, (dets, sorted(seen)))
            dets = [d for g in gathered for d in g[0]]
            seen = {i for g in gathered for i in g[1]}
        dataset = loader.dataset
        coco = getattr(dataset, "coco", None)
        if coco is None:
            raise TypeError(f"{type(dataset).__name__} has no pycocotools `coco` ground truth to evaluate against")
        if self.results_path is not None and distributed.is_main():
            path = Path(self.results_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(dets))
            os.replace(tmp, path)
        return coco_evaluate(coco, dets, img_ids=sorted(seen))


def _context(ctx: Any) -> contextlib.AbstractContextManager:
    if ctx is None:
        return contextlib.nullcontext()
    if isinstance(ctx, contextlib.AbstractContextManager):
        return ctx
    if callable(ctx):
        return ctx()
    raise TypeError(f"autocast_ctx must be a context manager or a callable returning one, not {type(ctx).__name__}")


def coco_evaluate(coco_gt: Any, detections: list[dict[str, Any]] | str | os.PathLike,
                  img_ids: Sequence[int] | None = None) -> dict[str, float]:
    """pycocotools COCOeval (box) of ``detections`` (a results list or a json file) against ``coco_gt``
    (a ``COCO`` object or an annotation json path), restricted to ``img_ids`` (default: all images).

    Returns AP (IoU .50:.95), AP50, AP75, APs, APm, APl as pycocotools' ``stats[0:6]`` (fractions; −1
    where undefined) plus ``images`` and ``detections`` counts. No detections: all APs are 0."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from kdrun.data.coco import check_detections, load_coco, read_json

    if not isinstance(coco_gt, COCO):  # a file: checked, its problems named (not a pycocotools traceback)
        coco_gt = load_coco(coco_gt)
    if isinstance(detections, (str, os.PathLike)):
        detections = check_detections(read_json(detections, "detections file"), detections,
                                      set(coco_gt.getImgIds()))
    ids = sorted(coco_gt.getImgIds()) if img_ids is None else sorted(int(i) for i in img_ids)
    keep = set(ids)
    detections = [d for d in detections if int(d["image_id"]) in keep]
    out = {k: 0.0 for k in METRIC_KEYS}
    if detections:
        # COCOeval prints its tables; the engine logs the numbers instead
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(detections)
            ev = COCOeval(coco_gt, coco_dt, "bbox")
            ev.params.imgIds = ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out = {k: float(v) for k, v in zip(METRIC_KEYS, ev.stats[:6])}
    out["images"] = float(len(ids))
    out["detections"] = float(len(detections))
    return out

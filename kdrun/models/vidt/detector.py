"""The ViDT detector (Song et al., "ViDT: An Efficient and Effective Fully Transformer-based Object
Detector", ICLR 2022): Swin-with-RAM body → encoder-free deformable decoder neck → heads.

Forward: ``model(images)`` with ``images`` an :class:`ImageBatch` (padded tensor ``[B, 3, H, W]`` and
padding mask ``[B, H, W]``, True = padding), a ``(tensor, mask)`` pair, or a bare tensor (no padding).
It returns a :class:`~kdrun.models.taps.ModelOutput`:

* ``logits``: the last decoder layer's class logits ``[B, Q, num_classes]`` (sigmoid/focal, no
  "no-object" class, as Deformable DETR);
* ``features``:
  ``pred_boxes`` ``[B, Q, 4]`` (cxcywh, normalised to the un-padded image);
  ``all_logits`` ``[B, L+1, Q, C]`` and ``all_boxes`` ``[B, L+1, Q, 4]``: the predictions of the body's
  [DET] tokens and of each of the L decoder layers (the auxiliary outputs; the last equals
  ``logits``/``pred_boxes``);
  the tokens ViDT's token-matching distillation compares (§3.4 of the ViDT+ paper, Song et al. 2022):
  ``patch_tokens_0..3`` ``[B, 256, H_l, W_l]`` (the projected multi-scale [PATCH] maps, strides
  8/16/32/64), ``body_det_tokens`` ``[B, Q, 256]`` (the body's projected [DET] tokens) and
  ``neck_det_tokens`` ``[B, L+1, Q, 256]`` (the decoder's [DET] embeddings, the body's first, as the
  original's ``hs``).

The token features are also outputs of named modules (``FEATURE_TAPS``), so that
:class:`~kdrun.models.taps.Tapped` resolves them as ordinary taps.

Heads: one class head (linear) and one 3-layer box MLP per output (L+1 = 7), initialised as
Deformable DETR (prior 0.01 class bias, zero box-delta layer, −2 size bias for the first).
Constructors :func:`vidt_nano`, :func:`vidt_tiny`, :func:`vidt_small`, :func:`vidt_base` build the
four configurations of ViDT Table 2 / DTO-KD Table 3; ``weights=PATH`` loads a state_dict of the
original release through :func:`kdrun.models.vidt.checkpoint.load_original`; ``backbone_weights=PATH|timm``
starts the body from ImageNet Swin weights as ViDT does (:mod:`kdrun.models.vidt.pretrained`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Annotated, Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.config import Ge, Le
from kdrun.models.taps import ModelOutput
from kdrun.models.vidt.box_ops import box_cxcywh_to_xyxy
from kdrun.models.vidt.neck import DeformableTransformer
from kdrun.models.vidt.swin_ram import SwinTransformer


@dataclass
class ImageBatch:
    """A padded image batch: ``tensors [B, 3, H, W]`` and ``mask [B, H, W]`` (True on padding)."""

    tensors: Tensor
    mask: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ImageBatch":
        return ImageBatch(self.tensors.to(device, non_blocking=non_blocking),
                          self.mask.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        return int(self.tensors.shape[0])

    @property
    def shape(self) -> torch.Size:
        return self.tensors.shape


def as_image_batch(x: Any, mask: Tensor | None = None) -> ImageBatch:
    """Accept an :class:`ImageBatch`, a ``(tensor, mask)`` pair or a bare tensor (nothing padded)."""
    if isinstance(x, ImageBatch):
        return x
    if isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[0], Tensor):
        return ImageBatch(x[0], x[1])
    if isinstance(x, Tensor):
        if mask is None:
            mask = torch.zeros((x.shape[0], x.shape[2], x.shape[3]), dtype=torch.bool, device=x.device)
        return ImageBatch(x, mask)
    raise TypeError(f"ViDT takes an ImageBatch, a (tensor, mask) pair or a tensor, not {type(x).__name__}")


class MLP(nn.Module):
    """Box head: ``num_layers`` linear layers with ReLU between (DETR's FFN)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class ViDT(nn.Module):
    """Swin-RAM body + deformable decoder neck + class/box heads, with iterative box refinement and
    auxiliary outputs (ViDT's default ``--aux_loss True --with_box_refine True``)."""

    FEATURE_TAPS = {
        "patch_tokens_0": "input_proj.0", "patch_tokens_1": "input_proj.1",
        "patch_tokens_2": "input_proj.2", "patch_tokens_3": "input_proj.3",
        "body_det_tokens": "body_det_tap", "neck_det_tokens": "neck_det_tap",
    }

    def __init__(self, backbone: SwinTransformer, transformer: DeformableTransformer, num_classes: int) -> None:
        super().__init__()
        hidden = transformer.d_model
        self.num_classes = num_classes
        self.num_queries = backbone.det_token_num
        self.backbone = backbone
        self.transformer = transformer
        # 1×1 conv + GroupNorm(32) projections to the neck's width, as in the original
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden, kernel_size=1), nn.GroupNorm(32, hidden))
            for c in backbone.num_channels)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.tgt_proj = nn.Sequential(nn.Conv2d(backbone.num_channels[-2], hidden, kernel_size=1),
                                      nn.GroupNorm(32, hidden))
        self.query_pos_proj = nn.Sequential(nn.Conv2d(hidden, hidden, kernel_size=1), nn.GroupNorm(32, hidden))
        for proj in (self.tgt_proj, self.query_pos_proj):
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        class_embed = nn.Linear(hidden, num_classes)
        class_embed.bias.data.fill_(-math.log((1 - 0.01) / 0.01))  # focal-loss prior 0.01
        bbox_embed = MLP(hidden, hidden, 4, 3)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        num_pred = transformer.decoder.num_layers + 1  # the body's [DET] tokens + every decoder layer
        self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
        self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
        nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        # parameter-free taps: the distillation tokens as outputs of named modules
        self.body_det_tap = nn.Identity()
        self.neck_det_tap = nn.Identity()

    @staticmethod
    def _proj_tokens(proj: nn.Sequential, tokens: Tensor) -> Tensor:
        # [B, Q, C] → 1×1 conv + GroupNorm over [B, C, Q, 1] (the original's formulation) → [B, Q, d]
        return proj(tokens.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)

    def forward(self, x: Any, mask: Tensor | None = None) -> ModelOutput:
        batch = as_image_batch(x, mask)
        images, mask = batch.tensors, batch.mask
        features, det_tgt, det_pos = self.backbone(images, mask)
        det_tgt = self.body_det_tap(self._proj_tokens(self.tgt_proj, det_tgt))
        query_pos = self._proj_tokens(self.query_pos_proj, det_pos).expand(images.shape[0], -1, -1)
        srcs = [proj(f) for proj, f in zip(self.input_proj, features)]
        masks = [F.interpolate(mask[None].float(), size=s.shape[-2:]).to(torch.bool)[0] for s in srcs]
        hs, boxes = self.transformer(srcs, masks, det_tgt, query_pos, self.bbox_embed)
        logits = torch.stack([head(h) for head, h in zip(self.class_embed, hs)], dim=1)
        all_boxes = torch.stack(boxes, dim=1)
        neck = self.neck_det_tap(torch.stack(hs, dim=1))
        feats = {"pred_boxes": all_boxes[:, -1], "all_logits": logits, "all_boxes": all_boxes,
                 "body_det_tokens": det_tgt, "neck_det_tokens": neck}
        feats.update({f"patch_tokens_{i}": s for i, s in enumerate(srcs)})
        return ModelOutput(logits[:, -1], feats)

    def no_weight_decay(self) -> set[str]:
        return {"backbone.det_token", "backbone.det_pos_embed"}


@torch.no_grad()
def postprocess(logits: Tensor, boxes: Tensor, target_sizes: Tensor, topk: int = 100) -> list[dict[str, Tensor]]:
    """Deformable DETR's ``PostProcess``: the ``topk`` highest sigmoid scores over all (query, class)
    pairs per image, boxes converted to absolute ``xyxy`` in the original image size.

    ``target_sizes`` ``[B, 2]`` holds (height, width) of each image before augmentation. Returns one
    dict per image with ``scores [K]``, ``labels [K]`` (class indices = COCO category ids) and
    ``boxes [K, 4]``."""
    b, q, c = logits.shape
    k = min(topk, q * c)
    prob = logits.float().sigmoid().view(b, -1)
    scores, idx = prob.topk(k, dim=1)
    query = torch.div(idx, c, rounding_mode="floor")
    labels = idx % c
    xyxy = torch.gather(box_cxcywh_to_xyxy(boxes.float()), 1, query.unsqueeze(-1).expand(-1, -1, 4))
    h, w = target_sizes.float().unbind(1)
    xyxy = xyxy * torch.stack([w, h, w, h], dim=1)[:, None, :]
    return [{"scores": s, "labels": lab, "boxes": bx} for s, lab, bx in zip(scores, labels, xyxy)]


# ---------------------------------------------------------------------------------------------------
# The four configurations (ViDT Table 2; window 7, patch 4, MLP ratio 4; drop-path as the release).

_CONFIGS: dict[str, dict[str, Any]] = {
    "nano": dict(embed_dim=48, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.0),
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.3),
}


def build_vidt(variant: str, num_classes: int = 91, det_tokens: int = 100, dec_layers: int = 6,
               dropout: float = 0.1, drop_path_rate: float | None = None, d_model: int = 256,
               dim_feedforward: int = 1024, nheads: int = 8, dec_n_points: int = 4,
               depths: Sequence[int] | None = None, weights: str | None = None,
               backbone_weights: str | None = None) -> ViDT:
    cfg = dict(_CONFIGS[variant])
    if drop_path_rate is not None:
        cfg["drop_path_rate"] = drop_path_rate
    if depths is not None:
        cfg["depths"] = tuple(int(d) for d in depths)
    backbone = SwinTransformer(**cfg, window_size=7, mlp_ratio=4.0, det_token_num=det_tokens, pos_dim=d_model,
                               cross_indices=(3,))
    neck = DeformableTransformer(d_model=d_model, nhead=nheads, num_decoder_layers=dec_layers,
                                 dim_feedforward=dim_feedforward, dropout=dropout,
                                 num_feature_levels=len(backbone.num_channels), dec_n_points=dec_n_points)
    model = ViDT(backbone, neck, num_classes)
    if backbone_weights and weights:
        raise ValueError("ViDT: set weights (a whole detector) or backbone_weights (ImageNet Swin for the "
                         "body), not both: the detector weights would overwrite the body.")
    if backbone_weights:
        from kdrun.models.vidt.pretrained import load_backbone

        load_backbone(model.backbone, backbone_weights, variant)
    if weights:
        from kdrun.models.vidt.checkpoint import load_original

        load_original(model, weights)
    return model


def vidt_nano(num_classes: Annotated[int, Ge(1)] = 91, det_tokens: Annotated[int, Ge(1)] = 100,
              dec_layers: Annotated[int, Ge(0)] = 6, dropout: Annotated[float, Ge(0.0), Le(1.0)] = 0.1,
              drop_path_rate: Annotated[float, Ge(0.0), Le(1.0)] | None = None,
              depths: Sequence[int] | None = None, weights: str | None = None,
              backbone_weights: str | None = None) -> ViDT:
    """ViDT with Swin-nano (C=48, depths 2-2-6-2, heads 3-6-12-24); ``depths`` overrides the stage
    depths (tests use shallower bodies); ``weights``: a state_dict of the original release;
    ``backbone_weights``: ImageNet Swin weights for the body (a path, or ``timm`` for tiny/small/base;
    :mod:`kdrun.models.vidt.pretrained`)."""
    return build_vidt("nano", num_classes, det_tokens, dec_layers, dropout, drop_path_rate, depths=depths,
                      weights=weights, backbone_weights=backbone_weights)


def vidt_tiny(num_classes: Annotated[int, Ge(1)] = 91, det_tokens: Annotated[int, Ge(1)] = 100,
              dec_layers: Annotated[int, Ge(0)] = 6, dropout: Annotated[float, Ge(0.0), Le(1.0)] = 0.1,
              drop_path_rate: Annotated[float, Ge(0.0), Le(1.0)] | None = None,
              depths: Sequence[int] | None = None, weights: str | None = None,
              backbone_weights: str | None = None) -> ViDT:
    """ViDT with Swin-tiny (C=96, depths 2-2-6-2, heads 3-6-12-24)."""
    return build_vidt("tiny", num_classes, det_tokens, dec_layers, dropout, drop_path_rate, depths=depths,
                      weights=weights, backbone_weights=backbone_weights)


def vidt_small(num_classes: Annotated[int, Ge(1)] = 91, det_tokens: Annotated[int, Ge(1)] = 100,
               dec_layers: Annotated[int, Ge(0)] = 6, dropout: Annotated[float, Ge(0.0), Le(1.0)] = 0.1,
               drop_path_rate: Annotated[float, Ge(0.0), Le(1.0)] | None = None,
               depths: Sequence[int] | None = None, weights: str | None = None,
              backbone_weights: str | None = None) -> ViDT:
    """ViDT with Swin-small (C=96, depths 2-2-18-2, heads 3-6-12-24)."""
    return build_vidt("small", num_classes, det_tokens, dec_layers, dropout, drop_path_rate, depths=depths,
                      weights=weights, backbone_weights=backbone_weights)


def vidt_base(num_classes: Annotated[int, Ge(1)] = 91, det_tokens: Annotated[int, Ge(1)] = 100,
              dec_layers: Annotated[int, Ge(0)] = 6, dropout: Annotated[float, Ge(0.0), Le(1.0)] = 0.1,
              drop_path_rate: Annotated[float, Ge(0.0), Le(1.0)] | None = None,
              depths: Sequence[int] | None = None, weights: str | None = None,
              backbone_weights: str | None = None) -> ViDT:
    """ViDT with Swin-base (C=128, depths 2-2-18-2, heads 4-8-16-32; the teacher of DTO-KD Table 3)."""
    return build_vidt("base", num_classes, det_tokens, dec_layers, dropout, drop_path_rate, depths=depths,
                      weights=weights, backbone_weights=backbone_weights)

"""ViDT's neck: an encoder-free deformable transformer decoder (Song et al., ICLR 2022, §3.3).

The [DET] tokens from the body (projected to ``d_model``) are the decoder's object queries and their
learnable position encoding its query position; there is no encoder — the [PATCH] maps of the body go
straight to the decoder as multi-scale memory. Each of the ``num_layers`` (6) layers is
Deformable DETR's decoder layer (Zhu et al., ICLR 2021): [DET] self-attention → multi-scale
deformable cross-attention to the 4 [PATCH] levels (8 heads, 4 points) → FFN (1024), post-norm.

Iterative box refinement (Deformable DETR §4.1, "with_box_refine"): the reference point starts as
``sigmoid(reference_points(query_pos))`` (2-d); the box head of the body's [DET] tokens refines it into
a box, and after every layer l the next layer's reference box is that layer's predicted box,
``sigmoid(bbox_embed[l+1](h_l) + inverse_sigmoid(ref_l))``, detached. The same expression is the
layer's box prediction, so each prediction is computed once here (the original computes it twice:
once in the decoder, once in the detector head, with identical results).

Parameter names follow ``methods/vidt/deformable_transformer.py`` of the original release.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.models.vidt.deformable import MSDeformAttn


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x), clamped away from 0 and 1 (Deformable DETR's helper)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class DeformableTransformerDecoderLayer(nn.Module):
    """Self-attention over [DET] → deformable cross-attention to [PATCH] → FFN, each post-norm."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, src: Tensor,
                spatial_shapes: Sequence[tuple[int, int]], src_padding_mask: Tensor | None) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt, need_weights=False)[0]))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, src, spatial_shapes, src_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableTransformerDecoder(nn.Module):
    def __init__(self, layer_kwargs: dict, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DeformableTransformerDecoderLayer(**layer_kwargs) for _ in range(num_layers)])
        self.num_layers = num_layers


class DeformableTransformer(nn.Module):
    """The neck (module name ``transformer`` in the detector, as in the original).

    :meth:`forward` returns the [DET] embeddings of the body and of every decoder layer and the box
    predictions of each, computed with the detector's ``bbox_embed`` heads (one per output)."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_decoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, num_feature_levels: int = 4,
                 dec_n_points: int = 4) -> None:
        super().__init__()
        self.d_model, self.nhead = d_model, nhead
        self.decoder = DeformableTransformerDecoder(
            dict(d_model=d_model, d_ffn=dim_feedforward, dropout=dropout, n_levels=num_feature_levels,
                 n_heads=nhead, n_points=dec_n_points), num_decoder_layers)
        self.reference_points = nn.Linear(d_model, 2)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()

    @staticmethod
    def valid_ratio(mask: Tensor) -> Tensor:
        """``[B, 2]`` (w, h) fraction of each map that is not padding."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def forward(self, srcs: list[Tensor], masks: list[Tensor], tgt: Tensor, query_pos: Tensor,
                bbox_embed: nn.ModuleList) -> tuple[list[Tensor], list[Tensor]]:
        """``srcs``: L maps ``[B, d, H_l, W_l]``; ``masks``: ``[B, H_l, W_l]`` (True = pad); ``tgt``:
        [DET] ``[B, Q, d]``; ``query_pos``: ``[B, Q, d]``; ``bbox_embed``: ``num_layers + 1`` box heads.

        Returns (embeddings, boxes): ``num_layers + 1`` tensors each, ``[B, Q, d]`` and ``[B, Q, 4]``
        (cxcywh in [0, 1] of the un-padded image), the first from the body's [DET] tokens."""
        shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        memory = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        valid = torch.stack([self.valid_ratio(m) for m in masks], 1)  # [B, L, 2]
        valid4 = torch.cat([valid, valid], -1)
        reference = self.reference_points(query_pos).sigmoid()  # [B, Q, 2]
        # the body's [DET] tokens: their box refines the 2-d reference point into a box
        # boxes in fp32 whatever the autocast dtype: a bf16 sigmoid output is off by ~2 px on an 800-px image
        tmp = bbox_embed[0](tgt).float()
        box = torch.cat([tmp[..., :2] + inverse_sigmoid(reference.float()), tmp[..., 2:]], -1).sigmoid()
        hs, boxes = [tgt], [box]
        output = tgt
        for lid, layer in enumerate(self.decoder.layers):
            ref = box.detach()  # refinement does not back-propagate through the reference (Deformable DETR)
            output = layer(output, query_pos, ref[:, :, None] * valid4[:, None], memory, shapes, mask_flat)
            box = (bbox_embed[lid + 1](output).float() + inverse_sigmoid(ref)).sigmoid()
            hs.append(output)
            boxes.append(box)
        return hs, boxes

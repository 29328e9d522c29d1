"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021, Eq. 2) in pure PyTorch.

For a query q with reference point p̂_q ∈ [0, 1]² (normalised, (x, y)), head m, level l and point k,

    MSDeformAttn(z_q, p̂_q, {x^l}) = Σ_m W_m [ Σ_l Σ_k A_mlqk · W'_m x^l(φ_l(p̂_q) + Δp_mlqk) ],

with the attention weights A normalised by a softmax over (l, k) and x^l(·) bilinear sampling of the
level-l value map. The original release computes the inner sum with a custom CUDA kernel; here it is
:func:`ms_deform_attn` (``F.grid_sample``, the same maths as the reference
``ms_deform_attn_core_pytorch`` of Deformable DETR: zero padding outside the map and
``align_corners=False``, i.e. normalised location u maps to pixel coordinate u·W − 0.5).
:func:`ms_deform_attn_naive` is a per-point loop with explicit bilinear interpolation, kept as the
test oracle for values and gradients.

:class:`MSDeformAttn` keeps the parameter names of the original module (``sampling_offsets``,
``attention_weights``, ``value_proj``, ``output_proj``) and its initialisation, so ViDT/Deformable DETR
state_dicts load into it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SpatialShapes = Sequence[tuple[int, int]]


def _shapes(spatial_shapes: SpatialShapes | Tensor) -> list[tuple[int, int]]:
    # Python ints: splitting the value tensor by level sizes needs them, and a list avoids a host
    # sync per call when the caller already has them.
    if isinstance(spatial_shapes, Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn(value: Tensor, spatial_shapes: SpatialShapes | Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """The deformable sampling-and-weighting core (Deformable DETR Eq. 2, inner sums), via ``grid_sample``.

    Args:
        value: ``[N, S, M, D]``: S = Σ_l H_l W_l flattened value tokens (level by level, row-major),
            M heads of D channels.
        spatial_shapes: the L levels' ``(H_l, W_l)``.
        sampling_locations: ``[N, Lq, M, L, P, 2]`` normalised ``(x, y)`` in [0, 1] (outside: zeros).
        attention_weights: ``[N, Lq, M, L, P]``.

    Returns:
        ``[N, Lq, M·D]``.
    """
    shapes = _shapes(spatial_shapes)
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    if sum(h * w for h, w in shapes) != s or len(shapes) != n_levels:
        raise ValueError(f"spatial_shapes {shapes} do not fit {s} value tokens / {n_levels} levels")
    # grid_sample needs one dtype; the promoted one keeps fp32 locations exact under autocast (a bf16
    # location is off by ~0.4 px on a 200-px-wide level).
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    value, sampling_locations = value.to(dtype), sampling_locations.to(dtype)
    attention_weights = attention_weights.to(dtype)
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] convention
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # [N, H·W, M, D] → [N·M, D, H, W]: one "image" per (sample, head)
        v = values[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # [N, Lq, M, P, 2] → [N·M, Lq, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N·M, D, Lq, L·P] weighted by [N·M, 1, Lq, L·P]
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    out = (stacked * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


def ms_deform_attn_naive(value: Tensor, spatial_shapes: SpatialShapes | Tensor, sampling_locations: Tensor,
                         attention_weights: Tensor) -> Tensor:
    """Test oracle for :func:`ms_deform_attn`: one sampling point at a time, bilinear interpolation
    written out (corner pixels outside the map contribute zero). Slow; small inputs only."""
    shapes = _shapes(spatial_shapes)
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    rows = []
    for b in range(n):
        for q in range(lq):
            heads = []
            for hd in range(m):
                acc = value.new_zeros(d)
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(n_points):
                        # normalised → pixel coordinates, pixel centres at integer + 0.5
                        px = sampling_locations[b, q, hd, lvl, p, 0] * w - 0.5
                        py = sampling_locations[b, q, hd, lvl, p, 1] * h - 0.5
                        x0, y0 = math.floor(px.item()), math.floor(py.item())
                        fx, fy = px - x0, py - y0
                        sample = value.new_zeros(d)
                        for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                            for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                                if 0 <= yy < h and 0 <= xx < w:
                                    sample = sample + wy * wx * value[b, starts[lvl] + yy * w + xx, hd]
                        acc = acc + attention_weights[b, q, hd, lvl, p] * sample
                heads.append(acc)
            rows.append(torch.cat(heads))
    return torch.stack(rows).view(n, lq, m * d)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR §4.1; ViDT's neck cross-attention).

    Reference points are ``[N, Lq, L, 2]`` (points: offsets normalised by each level's size) or
    ``[N, Lq, L, 4]`` (boxes, used with iterative box refinement: offsets scaled by half the box size
    over ``n_points``), both normalised to the padded map as the decoder passes them (× valid ratios).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: zero offset weights and a bias that places each head's
        points on a ray in its own direction (1, 2, …, P pixels away); uniform attention."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor,
                spatial_shapes: SpatialShapes, input_padding_mask: Tensor | None = None) -> Tensor:
        """``query [N, Lq, C]``, ``input_flatten [N, S, C]``, ``input_padding_mask [N, S]`` (True = pad)
        → ``[N, Lq, C]``."""
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        shapes = _shapes(spatial_shapes)
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (W_l, H_l)
            normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normalizer[None, None, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4, not {reference_points.shape[-1]}")
        out = ms_deform_attn(value, shapes, locations, weights)
        return self.output_proj(out)

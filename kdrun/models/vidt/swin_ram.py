"""Swin Transformer with the Reconfigured Attention Module (RAM): ViDT's body (Song et al., "ViDT: An
Efficient and Effective Fully Transformer-based Object Detector", ICLR 2022, §3.1–3.2, Fig. 3).

RAM turns a Swin backbone into a standalone detector body. Next to the [PATCH] tokens it carries 100
learnable [DET] tokens (object queries) with their own learnable position encoding, and splits every
attention into

* [PATCH] × [PATCH]: Swin's (shifted-)window self-attention with relative position bias, unchanged;
* [DET] × [DET]: global self-attention among the [DET] tokens, in every block;
* [DET] × [PATCH]: cross-attention from the [DET] tokens to all [PATCH] tokens (with a masked sine
  position encoding), only in the last stage ("selective cross-attention", ``cross_indices=[3]``).

All three share the block's ``qkv`` and ``proj`` projections (no extra attention parameters); the [DET]
position encoding (``det_pos_embed``, 256-d) is projected to each block's width by ``det_pos_linear``.
Patch merging concatenates each [DET] token with itself 4 times, like a 2×2 patch neighbourhood, so
the [DET] tokens follow the channel growth while staying 100 in number. The last stage's merging
reduces to 256 channels (not 2×) and gives the fourth, stride-64 feature map.

Returned to the neck: the [PATCH] maps of stages 2–4 (strides 8/16/32, 2C/4C/8C channels) and the
reduced stride-64 map (256 channels), the last stage's [DET] tokens (8C channels) and the [DET]
position encoding.

Module and parameter names follow the original release (``naver-ai/vidt``, ``methods/swin_w_ram.py``)
so that its state_dict maps onto this one; what differs is listed in :mod:`kdrun.models.vidt.checkpoint`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn


class Mlp(nn.Module):
    """Swin's token-wise FFN: Linear → GELU → Linear."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def masked_sin_pos_encoding(mask: Tensor, num_pos_feats: int, temperature: float = 10000.0,
                            scale: float = 2 * math.pi) -> Tensor:
    """DETR's sine position encoding of the un-padded area (``mask`` True = padding) →
    ``[B, H, W, num_pos_feats]`` (y half first, then x), used for the [PATCH] keys of RAM's
    cross-attention (ViDT §3.2)."""
    half = num_pos_feats // 2
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    eps = 1e-6
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(half, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / half)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3)


def window_partition(x: Tensor, ws: int) -> Tensor:
    """``[B, H, W, C]`` → ``[B·nW, ws·ws, C]`` (H, W multiples of ``ws``)."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def window_reverse(windows: Tensor, ws: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[B·nW, ws·ws, C]`` → ``[B, H, W, C]``."""
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


def shift_attention_mask(hp: int, wp: int, ws: int, shift: int, device: torch.device) -> Tensor:
    """Swin's SW-MSA mask ``[nW, ws², ws²]``: −100 between tokens that the cyclic shift brought into
    one window from different image regions, 0 otherwise."""
    img = torch.zeros((1, hp, wp, 1), device=device)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = window_partition(img, ws).squeeze(-1)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class ReconfiguredAttentionModule(nn.Module):
    """RAM (ViDT §3.2): window attention for [PATCH], global self-attention for [DET], optional
    [DET] × [PATCH] cross-attention, all with the one ``qkv``/``proj`` pair of the Swin block."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = (dim // num_heads) ** -0.5
        ws = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += ws - 1
        rel[:, :, 1] += ws - 1
        rel[:, :, 0] *= 2 * ws - 1
        # persistent, as in the original, so that its state_dict keys match
        self.register_buffer("relative_position_index", rel.sum(-1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _heads(self, t: Tensor) -> Tensor:
        # [..., L, 3C] → 3 × [..., heads, L, C/heads]
        *lead, n, _ = t.shape
        t = t.view(*lead, n, 3, self.num_heads, self.dim // self.num_heads)
        return t.movedim(-3, 0).transpose(-2, -3)

    def forward(self, x: Tensor, det: Tensor, shift_mask: Tensor | None = None,
                cross: Tensor | None = None, cross_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x``: [PATCH] ``[B, Hp, Wp, C]`` (padded to window multiples, cyclically shifted for SW-MSA);
        ``det``: ``[B, Q, C]`` (with position encoding added); ``shift_mask`` ``[nW, ws², ws²]``;
        ``cross``: un-shifted [PATCH] with sine encoding ``[B, H, W, C]`` (last stage only);
        ``cross_mask``: additive ``[B, 1, 1, H·W + Q]`` (−100 at padded pixels).
        Returns the attended [PATCH] ``[B, Hp, Wp, C]`` and [DET] ``[B, Q, C]`` (after ``proj``)."""
        b, hp, wp, c = x.shape
        ws, nh = self.window_size, self.num_heads
        drop = self.attn_drop if self.training else 0.0
        # [PATCH] × [PATCH] within windows, relative position bias (+ shift mask)
        q, k, v = self._heads(window_partition(self.qkv(x), ws))  # [B·nW, nh, ws², d]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(ws * ws, ws * ws, nh).permute(2, 0, 1)  # [nh, ws², ws²]
        if shift_mask is not None:
            nw = shift_mask.shape[0]
            bias = (bias.unsqueeze(0) + shift_mask.unsqueeze(1)).unsqueeze(0)  # [1, nW, nh, ws², ws²]
            q, k, v = (t.view(b, nw, nh, ws * ws, -1) for t in (q, k, v))
        patch = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=drop,
                                               scale=self.scale)
        patch = window_reverse(patch.reshape(-1, nh, ws * ws, c // nh).transpose(1, 2).reshape(-1, ws * ws, c),
                               ws, hp, wp)
        # [DET] × [DET] (or [DET] × [PATCH, DET] in the cross-attention stage), global
        dq, dk, dv = self._heads(self.qkv(det))  # [B, nh, Q, d]
        mask = None
        if cross is not None:
            _, ck, cv = self._heads(self.qkv(cross.flatten(1, 2)))  # keys/values of all [PATCH]
            dk, dv = torch.cat([ck, dk], dim=2), torch.cat([cv, dv], dim=2)
            mask = None if cross_mask is None else cross_mask.to(dq.dtype)
        det_out = F.scaled_dot_product_attention(dq, dk, dv, attn_mask=mask, dropout_p=drop, scale=self.scale)
        det_out = det_out.transpose(1, 2).reshape(b, -1, c)
        return self.proj_drop(self.proj(patch)), self.proj_drop(self.proj(det_out))


class SwinTransformerBlock(nn.Module):
    """A Swin block whose attention is RAM; [PATCH] and [DET] tokens share norms and MLP."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, pos_dim: int = 256) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError("shift_size must be in [0, window_size)")
        self.dim, self.window_size, self.shift_size = dim, window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ReconfiguredAttentionModule(dim, window_size, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        # projects the 256-d [DET] position encoding to this block's width (ViDT: one per block)
        self.det_pos_linear = nn.Linear(pos_dim, dim)

    def forward(self, x: Tensor, h: int, w: int, shift_mask: Tensor | None, det_pos: Tensor,
                patch_pos: Tensor | None = None, cross_mask: Tensor | None = None) -> Tensor:
        """``x``: ``[B, H·W + Q, C]`` ([PATCH] then [DET]); returns the same shape."""
        b, n, c = x.shape
        shortcut = x
        x = self.norm1(x)
        patch, det = x[:, :h * w].view(b, h, w, c), x[:, h * w:]
        ws = self.window_size
        pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
        padded = F.pad(patch, (0, 0, 0, pad_r, 0, pad_b))
        if self.shift_size > 0:
            padded = torch.roll(padded, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        det = det + self.det_pos_linear(det_pos)
        cross = patch + patch_pos if patch_pos is not None else None
        padded, det = self.attn(padded, det, shift_mask if self.shift_size > 0 else None, cross, cross_mask)
        if self.shift_size > 0:
            padded = torch.roll(padded, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        patch = padded[:, :h, :w].reshape(b, h * w, c)
        x = shortcut + self.drop_path(torch.cat([patch, det], dim=1))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Swin's 2×2 patch merging; each [DET] token is concatenated with itself 4 times (ViDT §3.2) so
    it follows the channel change while the number of [DET] tokens stays fixed."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, _, c = x.shape
        patch, det = x[:, :h * w].view(b, h, w, c), x[:, h * w:]
        if h % 2 or w % 2:
            patch = F.pad(patch, (0, 0, 0, w % 2, 0, h % 2))
        patch = torch.cat([patch[:, 0::2, 0::2], patch[:, 1::2, 0::2], patch[:, 0::2, 1::2],
                           patch[:, 1::2, 1::2]], -1).view(b, -1, 4 * c)
        x = torch.cat([patch, det.repeat(1, 1, 4)], dim=1)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One Swin stage (blocks alternating W-MSA / SW-MSA) followed by patch merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 drop_path: Sequence[float], out_dim: int, pos_dim: int, drop: float = 0.0,
                 attn_drop: float = 0.0) -> None:
        super().__init__()
        self.dim, self.window_size, self.shift_size = dim, window_size, window_size // 2
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2,
                                 mlp_ratio, True, drop, attn_drop, drop_path[i], pos_dim)
            for i in range(depth)])
        self.downsample = PatchMerging(dim, out_dim)

    def forward(self, x: Tensor, h: int, w: int, det_pos: Tensor, input_mask: Tensor,
                cross_attn: bool) -> tuple[Tensor, Tensor, int, int]:
        """Returns (stage output ``[B, H·W + Q, C]``, merged ``[B, H'·W' + Q, C']``, H', W')."""
        ws = self.window_size
        hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
        shift_mask = shift_attention_mask(hp, wp, ws, self.shift_size, x.device)
        patch_pos = cross_mask = None
        if cross_attn:
            if tuple(input_mask.shape[1:]) != (h, w):
                input_mask = F.interpolate(input_mask[None].float(), size=(h, w)).to(torch.bool)[0]
            patch_pos = masked_sin_pos_encoding(input_mask, self.dim).to(x.dtype)
            # additive mask over [PATCH keys, DET keys]: −100 at padded pixels (the original's value)
            pad = input_mask.reshape(x.shape[0], 1, 1, h * w).to(x.dtype) * -100.0
            cross_mask = F.pad(pad, (0, x.shape[1] - h * w), value=0.0)
        for blk in self.blocks:
            x = blk(x, h, w, shift_mask, det_pos, patch_pos, cross_mask)
        return x, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class PatchEmbed(nn.Module):
    """4×4 non-overlapping patches → ``embed_dim`` channels, layer-normed (Swin)."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        p = self.patch_size
        x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SwinTransformer(nn.Module):
    """Swin backbone with RAM and [DET] tokens (the ViDT body). See the module docstring."""

    def __init__(self, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.2, det_token_num: int = 100, pos_dim: int = 256,
                 cross_indices: Sequence[int] = (3,), patch_size: int = 4, in_chans: int = 3) -> None:
        super().__init__()
        self.num_layers = len(depths)
        self.det_token_num, self.pos_dim = det_token_num, pos_dim
        self.cross_indices = tuple(cross_indices)
        self.num_features = [int(embed_dim * 2 ** i) for i in range(self.num_layers)]
        # neck inputs: stages 2.. (2C, 4C, 8C) and the last merging's 256-d map
        self.num_channels = self.num_features[1:] + [pos_dim]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_drop = nn.Dropout(0.0)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # stochastic depth decay rule
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            self.layers.append(BasicLayer(
                self.num_features[i], depths[i], num_heads[i], window_size, mlp_ratio,
                dpr[sum(depths[:i]):sum(depths[:i + 1])],
                out_dim=pos_dim if last else 2 * self.num_features[i], pos_dim=pos_dim))
        self.det_token = nn.Parameter(trunc_normal_(torch.zeros(1, det_token_num, embed_dim), std=0.02))
        self.det_pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, det_token_num, pos_dim), std=0.02))
        # the cross-attention mask is first reduced to the first cross stage's grid (original order)
        self.mask_divisor = 2 ** (self.num_layers - len(self.cross_indices))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Swin's initialisation; the original ViDT always loads an ImageNet backbone over it
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def no_weight_decay(self) -> set[str]:
        return {"det_pos_embed", "det_token"}

    def forward(self, x: Tensor, mask: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """``x [B, 3, H, W]``, ``mask [B, H, W]`` (True = padding) → (4 [PATCH] maps ``[B, C_l, H_l, W_l]``
        at strides 8/16/32/64, last-stage [DET] tokens ``[B, Q, 8C]``, [DET] position encoding
        ``[1, Q, pos_dim]``)."""
        b = x.shape[0]
        x = self.patch_embed(x)
        h, w = x.shape[2], x.shape[3]
        x = self.pos_drop(x.flatten(2).transpose(1, 2))
        det = self.det_token.expand(b, -1, -1)
        det_pos = self.det_pos_embed
        mask = F.interpolate(mask[None].float(), size=(h // self.mask_divisor, w // self.mask_divisor)
                             ).to(torch.bool)[0]
        q = self.det_token_num
        outs: list[Tensor] = []
        x_out = x
        for stage, layer in enumerate(self.layers):
            x = torch.cat([x, det], dim=1)
            hh, ww = h, w
            x_out, x, h, w = layer(x, hh, ww, det_pos, mask, stage in self.cross_indices)
            x, det = x[:, :-q], x[:, -q:]
            if stage > 0:
                outs.append(x_out[:, :-q].reshape(b, hh, ww, -1).permute(0, 3, 1, 2))
        outs.append(x.reshape(b, h, w, -1).permute(0, 3, 1, 2))  # the last merging: stride 64, 256-d
        return outs, x_out[:, -q:], det_pos

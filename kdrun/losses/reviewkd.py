"""ReviewKD: Distilling Knowledge via Knowledge Review (Chen, Liu, Zhao & Jia, CVPR 2021), as in the
authors' code and mdistiller's port.

The student's multi-level features are fused from the deepest to the shallowest by attention-based
fusion (ABF) modules: at level j (deepest first) the student feature X_j is mapped to a mid width by a
1x1 conv + BN, the running fused feature Y from the deeper level is nearest-upsampled to X_j's size, and

    A = sigmoid(conv1x1([X_j, Y])) ∈ ℝ^{2×H×W},   X̃_j = A₀ ⊙ X_j + A₁ ⊙ Y,

(no fusion at the deepest level). X̃_j, resized to the teacher's size at that level, goes through a 3x3
conv + BN to the teacher's channels, giving the student's review feature R_j; X̃_j becomes Y for the
next level. The hierarchical context loss (HCL) compares R_j with the teacher's feature T_j on a
spatial pyramid,

    HCL(R, T) = [ MSE(R, T) + Σ_{l ∈ {4,2,1}, l < H} 2^{−n_l} MSE(pool_l(R), pool_l(T)) ] / (1 + Σ 2^{−n_l}),

n_l the rank of the pyramid level used (1, 2, 3), MSE the element mean; ℓ = w(step) · Σ_j HCL(R_j, T_j),
a per-sample mean so batch-size invariant; zero when R equals T.

Taps (``student_taps``/``teacher_taps``, shallow → deep), as mdistiller's ``distillers/ReviewKD.py``
lines 72-91 wire them (``STU_PREACT = False``): the student's post-ReLU stage outputs
``[stage1, stage2, stage3, pre_logits]`` and the teacher's *pre-activation* ones
``[preact_stage1, preact_stage2, preact_stage3, pre_logits]``; the pooled feature is seen as a 1x1 map
(vectors ``[B, C]`` are reshaped to ``[B, C, 1, 1]``). Shapes (mdistiller's SHAPES / OUT_SHAPES /
IN_CHANNELS / OUT_CHANNELS) come from :meth:`setup`; the mid width is min(512, channels of the deepest
student level).

Warm-up: mdistiller multiplies by min(epoch / 20, 1) with 1-based epochs (line 96 there), reproduced at
every optimiser step by :func:`~kdrun.losses._common.warmup_factor` (``warmup_epochs``, ``warmup:
epoch``; ``linear`` ramps per step), with the steps per epoch from :meth:`bind` and the 0-based step
from :meth:`set_progress`.
"""
from __future__ import annotations

from typing import Annotated, Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.config import Ge
from kdrun.losses._common import WarmupMode, as_taps, need_setup, warmup_factor
from kdrun.losses.base import DataInfo, DistillLoss, tap
from kdrun.models.taps import ModelOutput


def _as_map(x: Tensor) -> Tensor:
    return x.reshape(*x.shape, 1, 1) if x.dim() == 2 else x


def _map_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(d) for d in shape)
    if len(shape) == 1:
        return shape[0], 1, 1
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    raise ValueError(f"ReviewKD needs [C, H, W] maps or [C] vectors, got per-sample shape {shape}")


def hcl_loss(fstudent: Sequence[Tensor], fteacher: Sequence[Tensor]) -> Tensor:
    """Hierarchical context loss summed over levels (ReviewKD's ``hcl``)."""
    total = []
    for fs, ft in zip(fstudent, fteacher):
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft)
        cnt, tot = 1.0, 1.0
        for lvl in (4, 2, 1):
            if lvl >= h:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, lvl), F.adaptive_avg_pool2d(ft, lvl)) * cnt
            tot += cnt
        total.append(loss / tot)
    return torch.stack(total).sum()


class ABF(nn.Module):
    """Attention-based fusion: 1x1 conv + BN to the mid width, optional attention fusion with the deeper
    level's feature, resize to the teacher's size, 3x3 conv + BN to the teacher's channels."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, kernel_size=3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channel))
        self.att_conv = (nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid())
                         if fuse else None)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, y: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            assert y is not None
            y = F.interpolate(y, (h, w), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


class ReviewKD(DistillLoss):
    def __init__(self, student_taps: Sequence[str] = ("stage1", "stage2", "stage3", "pre_logits"),
                 teacher_taps: Sequence[str] = ("preact_stage1", "preact_stage2", "preact_stage3", "pre_logits"),
                 max_mid_channel: Annotated[int, Ge(1)] = 512, warmup_epochs: Annotated[float, Ge(0.0)] = 0.0,
                 warmup: WarmupMode = "epoch") -> None:
        super().__init__()
        self.student_taps = as_taps(student_taps, "student_taps")
        self.teacher_taps = as_taps(teacher_taps, "teacher_taps")
        if len(self.student_taps) != len(self.teacher_taps):
            raise ValueError("ReviewKD pairs levels: student_taps and teacher_taps must have the same length")
        self.max_mid_channel = int(max_mid_channel)
        self.warmup_epochs = float(warmup_epochs)
        self.warmup = warmup
        self.steps_per_epoch: int | None = None  # from bind()
        self.abfs: nn.ModuleList | None = None  # deepest level first
        self.out_sizes: list[tuple[int, int]] = []  # teacher H, W per level, deepest first

    def bind(self, info: DataInfo) -> None:
        self.steps_per_epoch = int(info.steps_per_epoch)

    def setup(self, student: dict[str, Any], teacher: dict[str, Any]) -> None:
        s_shapes = [_map_shape(student[a]) for a in self.student_taps]
        t_shapes = [_map_shape(teacher[b]) for b in self.teacher_taps]
        mid = min(self.max_mid_channel, s_shapes[-1][0])
        last = len(s_shapes) - 1
        # ABF j fuses with the deeper level unless it is the deepest one (mdistiller: idx < len - 1).
        abfs = [ABF(s[0], mid, t[0], fuse=j < last) for j, (s, t) in enumerate(zip(s_shapes, t_shapes))]
        self.abfs = nn.ModuleList(abfs[::-1])
        self.out_sizes = [(t[1], t[2]) for t in t_shapes][::-1]

    def review(self, s: ModelOutput) -> list[Tensor]:
        """The student's review features R_j, shallow → deep (aligned with ``teacher_taps``)."""
        need_setup(self, self.abfs)
        assert self.abfs is not None
        xs = [_as_map(tap(s, a)) for a in self.student_taps][::-1]
        results: list[Tensor] = []
        y: Tensor | None = None
        for x, abf, out_size in zip(xs, self.abfs, self.out_sizes):
            out, y = abf(x, y, out_size)
            results.insert(0, out)
        return results

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:
        rs = [r.float() for r in self.review(s)]
        ts = [_as_map(tap(t, b)).detach().float() for b in self.teacher_taps]
        return hcl_loss(rs, ts) * warmup_factor(self.progress_step, self.warmup_epochs, self.steps_per_epoch,
                                                self.warmup)

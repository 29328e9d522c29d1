"""FitNets: hint-based training (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, ICLR 2015).

A regressor r maps the student's guided-layer output onto the teacher's hint layer, and

    ℓ = (1/(B·C·H·W)) ‖r(F_s) − F_t‖²,

the ``F.mse_loss`` mean of the CRD/RepDistiller and mdistiller benchmarks (single-stage training with
the hint term added to the task loss, weight 100, hint at ``stage2`` — mdistiller's ``HINT_LAYER = 2`` on
its feature list [stem, stage1, stage2, stage3]). Per-sample mean, so batch-size invariant.

The regressor is part of the method, so the default (``projector: null``) is the benchmark's ``ConvReg``
built from the tapped shapes: Conv(s_C → t_C) + BatchNorm + ReLU, with a 3x3 stride-2 conv when the
student map is twice the teacher's size, a 4x4 stride-2 transposed conv when it is half, and a
(1+s_H−t_H)×(1+s_W−t_W) conv otherwise (a 1x1 conv for equal sizes). For vector hints (``[B, D]``) the
default regressor is a linear layer. A projector partial from the ``projector`` group can replace it;
on ``[B, C, H, W]`` maps it is applied at every position (channels as the feature dimension).
"""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.losses._common import ProjectorFactory, build_projector, need_setup, per_position
from kdrun.losses.base import DistillLoss, tap
from kdrun.models.taps import ModelOutput


class ConvReg(nn.Module):
    """The CRD/RepDistiller convolutional regressor (student map → teacher map), with BN and ReLU."""

    def __init__(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...], use_relu: bool = True) -> None:
        super().__init__()
        s_c, s_h, s_w = s_shape
        t_c, t_h, t_w = t_shape
        self.conv: nn.Module
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(f"FitNet ConvReg cannot map a student map of size {s_h}x{s_w} to a teacher "
                             f"map of size {t_h}x{t_w}; pick hint taps of compatible resolution.")
        self.bn = nn.BatchNorm2d(t_c)
        self.use_relu = use_relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


class _Regress(nn.Module):
    """Wrap a student-only regressor in the projector interface (teacher passes through)."""

    def __init__(self, reg: nn.Module) -> None:
        super().__init__()
        self.reg = reg

    def forward(self, zs: Tensor, zt: Tensor) -> tuple[Tensor, Tensor]:
        return self.reg(zs), zt


class FitNet(DistillLoss):
    def __init__(self, student_tap: str = "stage2", teacher_tap: str = "stage2",
                 projector: ProjectorFactory | None = None) -> None:
        super().__init__()
        self.student_tap = str(student_tap)
        self.teacher_tap = str(teacher_tap)
        self.student_taps = (self.student_tap,)
        self.teacher_taps = (self.teacher_tap,)
        self.projector_factory = projector
        self.regressor: nn.Module | None = None

    def setup(self, student: dict[str, Any], teacher: dict[str, Any]) -> None:
        s_shape = tuple(int(d) for d in student[self.student_tap])
        t_shape = tuple(int(d) for d in teacher[self.teacher_tap])
        if len(s_shape) != len(t_shape):
            raise ValueError(f"FitNet hint taps have different ranks: student {s_shape}, teacher {t_shape}")
        if self.projector_factory is not None:
            # A group projector works on the channel/feature dimension.
            self.regressor = build_projector(self.projector_factory, s_shape[0] if len(s_shape) == 3
                                             else s_shape[-1], t_shape[0] if len(t_shape) == 3 else t_shape[-1])
        elif len(s_shape) == 3:
            self.regressor = _Regress(ConvReg(s_shape, t_shape))  # type: ignore[arg-type]
        else:
            self.regressor = _Regress(nn.Linear(s_shape[-1], t_shape[-1]))

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:
        need_setup(self, self.regressor)
        assert self.regressor is not None
        fs, ft = tap(s, self.student_tap), tap(t, self.teacher_tap).detach()
        if isinstance(self.regressor, _Regress):
            fs, ft = self.regressor(fs, ft)
        else:
            fs, ft = per_position(self.regressor, fs, ft)
        return F.mse_loss(fs.float(), ft.float())
